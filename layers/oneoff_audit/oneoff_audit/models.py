"""Small value objects passed between the domain modules."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class FiledLog:
    """What the assembler knows about a log it has filed: the input of the evidence manifest."""

    app: str
    session_id: str
    log_key: str
    log_version_id: str | None
    ciphertext_sha256: str
    ciphertext_size: int
    plaintext_sha256: str
    plaintext_size: int
    chain_sha256: str | None
    event_count: int
    bytes: dict[str, int]
    started_at: str
    ended_at: str | None
    filed_at: str
    status: str
    complete: bool
    gaps: dict[str, Any] = field(default_factory=lambda: {"missing": [], "corrupt": []})

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)
