"""Helpers shared by the evidence tests (no tests here): file logs, control moto's S3 clock."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from oneoff_audit import keys
from oneoff_audit.aws import client
from oneoff_audit.crypto import ALGORITHM, encryption_context, key_provider, sdk_client
from oneoff_audit.evidence.moto_compat import honour_kms_digest_messages
from oneoff_audit.formats import format_time
from oneoff_audit.models import FiledLog


@dataclass
class S3Clock:
    """The time moto's S3 stamps on new objects (LastModified), settable by a test."""

    now: datetime = field(default_factory=lambda: datetime(2026, 11, 25, 9, 0, tzinfo=UTC))

    def set(self, when: datetime) -> None:
        self.now = when.astimezone(UTC)

    def naive(self) -> datetime:
        return self.now.replace(tzinfo=None)


@pytest.fixture
def s3_clock(monkeypatch: pytest.MonkeyPatch) -> S3Clock:
    """Control LastModified of objects the in-process moto server stores (and its Object Lock clock)."""
    import moto.s3.models

    clock = S3Clock()
    monkeypatch.setattr(moto.s3.models, "utcnow", clock.naive)
    return clock


@pytest.fixture(autouse=True)
def kms_digest_messages() -> None:
    """Let moto sign KMS DIGEST messages as AWS does (documents over 4096 bytes)."""
    honour_kms_digest_messages()


def encrypt_log(kms_key_id: str, app: str, sid: str, plaintext: bytes) -> bytes:
    """A real Encryption SDK message of ``plaintext`` bound to (app, sid)."""
    ciphertext, _ = sdk_client().encrypt(source=plaintext, key_provider=key_provider(kms_key_id),
                                         encryption_context=encryption_context(app, sid), algorithm=ALGORITHM,
                                         frame_length=4096)
    return ciphertext


def put_log(stack: Any, app: str, sid: str, plaintext: bytes, filed_at: datetime) -> FiledLog:
    """Put an encrypted log at its key and describe it as the assembler would."""
    ciphertext = encrypt_log(stack.kms_key_id, app, sid, plaintext)
    key = keys.log_key(app, sid)
    resp = client("s3").put_object(Bucket=stack.bucket, Key=key, Body=ciphertext)
    return FiledLog(
        app=app, session_id=sid, log_key=key, log_version_id=resp.get("VersionId"),
        ciphertext_sha256=hashlib.sha256(ciphertext).hexdigest(), ciphertext_size=len(ciphertext),
        plaintext_sha256=hashlib.sha256(plaintext).hexdigest(), plaintext_size=len(plaintext),
        chain_sha256="ab" * 32, event_count=3, bytes={"i": 2, "o": 5, "e": 0},
        started_at=format_time(filed_at.replace(second=0, microsecond=0)), ended_at=format_time(filed_at),
        filed_at=format_time(filed_at), status="succeeded", complete=True,
    )


def file_session(stack: Any, app: str, sid: str, filed_at: datetime, plaintext: bytes | None = None) -> FiledLog:
    """Put a log and its signed manifest (what the assembler does when it files a session)."""
    from oneoff_audit.evidence.manifest import write_signed_manifest

    filed = put_log(stack, app, sid, plaintext or f"log of {sid}\n".encode(), filed_at)
    write_signed_manifest(filed, stack.bucket, stack.signing_key_id)
    return filed




def store_keys(bucket: str, prefix: str) -> list[str]:
    """Current keys under ``prefix``."""
    return [o["Key"] for o in client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
