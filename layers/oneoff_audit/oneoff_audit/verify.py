"""Offline verification of a decrypted audit log: structure, counts, hashes, completeness.

Everything is recomputed from the log's own lines and compared with what its trailer claims: the
number of events per stream, the bytes per stream, withheld and lost byte counts against their
markers, gap markers against the trailer's gaps, header and trailer naming the same session, and
whether the session is complete. The file's SHA-256 and size are computed; given the session's
manifest (or an expected SHA-256), they and the chunk hash chain's final hash are checked against
it. The chain itself runs over the staged chunk objects, which the log does not contain: its final
hash is reported, and matched against the signed manifest when one is given.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import IO, Any

from oneoff_audit import formats
from oneoff_audit.codec import decode_data
from oneoff_audit.errors import FormatError

READ_BLOCK = 1 << 20


@dataclass
class Report:
    """The outcome of verifying one log: ``ok`` only when ``problems`` is empty."""

    sha256: str = ""
    size: int = 0
    header: dict[str, Any] | None = None
    trailer: dict[str, Any] | None = None
    events: dict[str, int] = field(default_factory=lambda: dict.fromkeys(formats.STREAMS, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(formats.BYTE_STREAMS, 0))
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is off."""
        return not self.problems

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        trailer = self.trailer or {}
        return {
            "ok": self.ok,
            "problems": self.problems,
            "app": (self.header or {}).get("app"),
            "session_id": (self.header or {}).get("session_id"),
            "sha256": self.sha256,
            "size": self.size,
            "status": trailer.get("status"),
            "complete": trailer.get("complete"),
            "gaps": trailer.get("gaps"),
            "chunk_count": trailer.get("chunk_count"),
            "expected_chunk_count": trailer.get("expected_chunk_count"),
            "chain_sha256": trailer.get("chain_sha256"),
            "event_count": sum(self.events.values()),
            "events": self.events,
            "bytes": self.bytes,
        }


class _HashingReader:
    """A binary reader that hashes and counts every byte read through it."""

    def __init__(self, src: IO[bytes], report: Report) -> None:
        self.src = src
        self.report = report
        self.digest = hashlib.sha256()

    def readline(self, size: int = -1) -> bytes:
        line = self.src.readline(size)
        self.digest.update(line)
        self.report.size += len(line)
        return line

    def finish(self) -> None:
        for block in iter(lambda: self.src.read(READ_BLOCK), b""):  # whatever a parse error left unread
            self.digest.update(block)
            self.report.size += len(block)
        self.report.sha256 = self.digest.hexdigest()


def verify_log(src: IO[bytes], expected: dict[str, Any] | None = None) -> Report:
    """Verify the plaintext log read from ``src``; ``expected`` is a manifest or ``{"plaintext_sha256": ...}``."""
    report = Report()
    lines = _HashingReader(src, report)
    withheld = lost = 0
    gap_seqs: set[int] = set()
    last_t = 0.0
    try:
        for kind, value in formats.iter_log_lines(lines):  # type: ignore[arg-type]
            if kind == "header":
                report.header = value
            elif kind == "trailer":
                report.trailer = value
            else:
                t, stream, data = value
                if t < last_t:
                    report.problems.append(f"event {sum(report.events.values()) + 1}: time goes back ({t} < {last_t})")
                last_t = max(last_t, t)
                report.events[stream] += 1
                if stream in formats.BYTE_STREAMS:
                    report.bytes[stream] += len(decode_data(data))
                elif stream == "m":
                    if data["kind"] == "input-withheld":
                        withheld += int(data.get("bytes", 0))
                    elif data["kind"] == "capture-gap":
                        lost += int(data.get("bytes", 0))
                    elif data["kind"] == "gap" and isinstance(data.get("seq"), int):
                        gap_seqs.add(data["seq"])
    except FormatError as err:
        report.problems.append(f"malformed log: {err}")
    lines.finish()
    if report.header is not None and report.trailer is not None:
        _check_trailer(report, withheld, lost, gap_seqs)
    if expected is not None:
        _check_expected(report, expected)
    return report


def _check_trailer(report: Report, withheld: int, lost: int, gap_seqs: set[int]) -> None:
    header, trailer, problems = report.header or {}, report.trailer or {}, report.problems
    if (header["app"], header["session_id"]) != (trailer["app"], trailer["session_id"]):
        problems.append(f"header names {header['app']}/{header['session_id']} but trailer names "
                        f"{trailer['app']}/{trailer['session_id']}")
    if trailer["events"] != report.events:
        problems.append(f"events per stream {report.events} differ from the trailer's {trailer['events']}")
    if trailer["event_count"] != sum(report.events.values()):
        problems.append(f"{sum(report.events.values())} events, the trailer says {trailer['event_count']}")
    if trailer["bytes"] != report.bytes:
        problems.append(f"bytes per stream {report.bytes} differ from the trailer's {trailer['bytes']}")
    if trailer["withheld_input_bytes"] != withheld:
        problems.append(f"input-withheld markers add up to {withheld} bytes, the trailer says "
                        f"{trailer['withheld_input_bytes']}")
    if trailer["lost_bytes"] != lost:
        problems.append(f"capture-gap markers add up to {lost} bytes, the trailer says {trailer['lost_bytes']}")
    missing = trailer["gaps"]["missing"]
    corrupt = [c["seq"] for c in trailer["gaps"]["corrupt"]]
    if gap_seqs != set(missing) | set(corrupt):
        problems.append(f"gap markers name chunks {sorted(gap_seqs)}, the trailer's gaps name "
                        f"{sorted(set(missing) | set(corrupt))}")
    if trailer["complete"] and (missing or corrupt or trailer["chunk_count"] != trailer["expected_chunk_count"]):
        problems.append("the trailer says complete but lists gaps or a chunk count short of the expected one")
    if not trailer["complete"]:
        detail = [f"missing chunks {missing}" if missing else "",
                  f"corrupt chunks {[(c['seq'], c['reason']) for c in trailer['gaps']['corrupt']]}" if corrupt else "",
                  f"{trailer['chunk_count']} of {trailer['expected_chunk_count']} chunks"
                  if trailer["expected_chunk_count"] is not None else "no close marker"]
        problems.append("the session is incomplete: " + ", ".join(d for d in detail if d))
    if lost:
        problems.append(f"capture lost {lost} bytes (capture-gap markers)")


def _check_expected(report: Report, expected: dict[str, Any]) -> None:
    problems = report.problems
    sha = expected.get("plaintext_sha256") or expected.get("sha256")
    if sha and sha != report.sha256:
        problems.append(f"SHA-256 {report.sha256} differs from the expected {sha}")
    size = expected.get("plaintext_size")
    if size is not None and size != report.size:
        problems.append(f"size {report.size} differs from the expected {size}")
    trailer = report.trailer or {}
    header = report.header or {}
    for name, actual in (("app", header.get("app")), ("session_id", header.get("session_id")),
                         ("chain_sha256", trailer.get("chain_sha256")), ("event_count", trailer.get("event_count")),
                         ("bytes", trailer.get("bytes")), ("status", trailer.get("status")),
                         ("complete", trailer.get("complete")), ("gaps", trailer.get("gaps"))):
        if name in expected and expected[name] != actual:
            problems.append(f"{name} {actual!r} differs from the manifest's {expected[name]!r}")
