"""Finding a filed log and delivering it: inline (decrypted) when small, a presigned URL when large.

What was filed for a session is read from its evidence manifest (``manifests/<app>/<session>.json``:
log key and version, ciphertext and plaintext sizes and SHA-256, started_at). Without a manifest,
a session whose staging folder still exists is *pending* (202: ``recording`` without a close
marker, ``assembling`` with one); a log filed without a manifest is found through its own header
and index entry, and its ciphertext hash is computed.

Inline delivery decrypts the exact filed version, checking its ciphertext hash and size against
the manifest, the encryption context (this app, this session) and the plaintext hash, and
returns ``{header, events, trailer}`` with events as the log holds them (text stays text).
Above ``INLINE_MAX_BYTES`` of plaintext the answer is a SigV4 presigned URL of that exact object
version, valid ``min(PRESIGN_TTL, 900, remaining lifetime of the signing credentials)`` seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aws_encryption_sdk.exceptions import AWSEncryptionSDKClientError
from botocore.exceptions import BotoCoreError, ClientError

from oneoff_audit import crypto, formats, keys
from oneoff_audit.api import timeline
from oneoff_audit.aws import client
from oneoff_audit.config import ApiConfig
from oneoff_audit.errors import (
    DecryptionError,
    FormatError,
    IntegrityError,
    NotFoundError,
    RetryLaterError,
    SessionPendingError,
)

MAX_PRESIGN_TTL = 900
MIN_PRESIGN_TTL = 1
MAX_MANIFEST_BYTES = 16 << 20
DETAIL_FULL_DECRYPT_MAX = 8 << 20  # session details decrypt smaller logs whole (header and trailer)
HASH_CHUNK = 1 << 20
_MISSING = ("404", "NoSuchKey", "NotFound", "NoSuchVersion")


def _missing(err: ClientError) -> bool:
    return str(err.response.get("Error", {}).get("Code", "")) in _MISSING


@dataclass(frozen=True)
class FiledLog:
    """Where a session's filed log is and what it must hash to."""

    app: str
    session_id: str
    log_key: str
    version_id: str | None
    ciphertext_size: int
    ciphertext_sha256: str | None
    plaintext_size: int
    plaintext_sha256: str | None
    started_at: str
    manifest: dict[str, Any] | None


def _get_bytes(bucket: str, key: str, cap: int, version_id: str | None = None) -> bytes | None:
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if version_id:
        kwargs["VersionId"] = version_id
    try:
        return client("s3").get_object(**kwargs)["Body"].read(cap + 1)
    except ClientError as err:
        if _missing(err):
            return None
        raise


def _exists(bucket: str, key: str) -> bool:
    try:
        client("s3").head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as err:
        if _missing(err):
            return False
        raise


def staging_status(cfg: ApiConfig, app: str, session_id: str) -> str | None:
    """``"assembling"`` (close marker present), ``"recording"`` (other staging objects), or None."""
    if _exists(cfg.bucket, keys.closed_key(app, session_id, cfg.staging_prefix)):
        return "assembling"
    prefix = keys.session_prefix(app, session_id, cfg.staging_prefix)
    listed = client("s3").list_objects_v2(Bucket=cfg.bucket, Prefix=prefix, MaxKeys=1)
    return "recording" if listed.get("KeyCount", 0) else None


def read_manifest(cfg: ApiConfig, app: str, session_id: str) -> dict[str, Any] | None:
    """The session's manifest, validated, or None if there is none."""
    key = keys.manifest_key(app, session_id)
    raw = _get_bytes(cfg.bucket, key, MAX_MANIFEST_BYTES)
    if raw is None:
        return None
    try:
        manifest = formats.read_json_object(raw, "manifest", key, MAX_MANIFEST_BYTES)
    except FormatError as err:
        raise IntegrityError(f"the manifest of this session is damaged: {err}") from err
    if manifest["app"] != app or manifest["session_id"] != session_id or manifest["log_key"] != keys.log_key(
            app, session_id):
        raise IntegrityError(f"{key} describes another log ({manifest['log_key']})")
    return manifest


def read_index_entry(cfg: ApiConfig, app: str, session_id: str, started_at: str) -> dict[str, Any] | None:
    """The session's timeline entry, or None if it is missing."""
    key = keys.index_key(app, session_id, formats.parse_time(started_at))
    try:
        return timeline.read_entry(client("s3"), cfg.bucket, app, key)
    except ClientError as err:
        if _missing(err):
            return None
        raise
    except FormatError as err:
        raise IntegrityError(f"the index entry of this session is damaged: {err}") from err


def locate(cfg: ApiConfig, app: str, session_id: str) -> FiledLog:
    """What was filed for the session; SessionPendingError (202) or NotFoundError (404) otherwise."""
    manifest = read_manifest(cfg, app, session_id)
    if manifest is not None:
        return FiledLog(app, session_id, manifest["log_key"], manifest["log_version_id"],
                        manifest["ciphertext_size"], manifest["ciphertext_sha256"], manifest["plaintext_size"],
                        manifest["plaintext_sha256"], manifest["started_at"], manifest)
    pending = staging_status(cfg, app, session_id)
    if pending is not None:
        raise SessionPendingError(pending)
    log_key = keys.log_key(app, session_id)
    try:
        head = client("s3").head_object(Bucket=cfg.bucket, Key=log_key)
    except ClientError as err:
        if _missing(err):
            raise NotFoundError(f"no session {session_id!r} in app {app!r}") from err
        raise
    # Filed without a manifest (evidence signing disabled): the log's own header names its index entry.
    header = read_header(cfg, app, session_id, head.get("VersionId"))
    entry = read_index_entry(cfg, app, session_id, header["started_at"])
    if entry is None:
        raise IntegrityError("the log has neither a manifest nor an index entry")
    version = head.get("VersionId")
    if entry["log_version_id"] not in (None, version):
        version = entry["log_version_id"]
        head = client("s3").head_object(Bucket=cfg.bucket, Key=log_key, VersionId=version)
    return FiledLog(app, session_id, log_key, version, int(head["ContentLength"]), None, entry["size"],
                    entry["sha256"], entry["started_at"], None)


def _get_log(cfg: ApiConfig, filed: FiledLog) -> Any:
    kwargs: dict[str, Any] = {"Bucket": cfg.bucket, "Key": filed.log_key}
    if filed.version_id:
        kwargs["VersionId"] = filed.version_id
    try:
        return client("s3").get_object(**kwargs)
    except ClientError as err:
        if _missing(err):
            raise IntegrityError(f"the filed log {filed.log_key} (version {filed.version_id}) is gone") from err
        raise


def fetch_plaintext(cfg: ApiConfig, filed: FiledLog) -> bytes:
    """The whole decrypted log, after checking sizes, hashes and the encryption context."""
    body = _get_log(cfg, filed)["Body"]
    ciphertext = body.read(filed.ciphertext_size + 1)
    if len(ciphertext) != filed.ciphertext_size:
        raise IntegrityError(f"the stored log is {len(ciphertext)} bytes, the manifest says {filed.ciphertext_size}")
    if filed.ciphertext_sha256 and hashlib.sha256(ciphertext).hexdigest() != filed.ciphertext_sha256:
        raise IntegrityError("the stored log does not match the SHA-256 in its manifest")
    plaintext = crypto.decrypt_bytes(ciphertext, cfg.kms_key_id, filed.app, filed.session_id)
    if len(plaintext) != filed.plaintext_size or (
            filed.plaintext_sha256 and hashlib.sha256(plaintext).hexdigest() != filed.plaintext_sha256):
        raise IntegrityError("the decrypted log does not match the plaintext size and SHA-256 recorded when filed")
    return plaintext


def read_header(cfg: ApiConfig, app: str, session_id: str, version_id: str | None) -> dict[str, Any]:
    """The log's first line, from its first frame only (each frame is authenticated on its own)."""
    kwargs: dict[str, Any] = {"Bucket": cfg.bucket, "Key": keys.log_key(app, session_id)}
    if version_id:
        kwargs["VersionId"] = version_id
    body = client("s3").get_object(**kwargs)["Body"]
    decryptor = None
    try:
        decryptor = crypto.sdk_client().stream(mode="d", source=body, key_provider=crypto.key_provider(cfg.kms_key_id))
        buf = b""
        while b"\n" not in buf and len(buf) <= formats.MAX_LINE_BYTES:
            block = decryptor.read(64 << 10)
            if not block:
                break
            buf += block
        crypto.check_context(dict(decryptor.header.encryption_context), app, session_id)
    except (AWSEncryptionSDKClientError, ClientError, BotoCoreError) as err:
        raise DecryptionError(f"cannot decrypt the log: {err or type(err).__name__}") from err
    finally:
        if decryptor is not None:
            io.IOBase.close(decryptor)  # the SDK's close() insists on the end of the message
        body.close()
    line, newline, _ = buf.partition(b"\n")
    if not newline:
        raise IntegrityError("the log's first line is missing or too long")
    return check_header(formats.parse_json(line, "log line 1"), app, session_id)


def check_header(value: Any, app: str, session_id: str) -> dict[str, Any]:
    """A log header, validated and naming this session."""
    header = formats.validate(value, "log-header", "log header")
    if header["app"] != app or header["session_id"] != session_id:
        raise IntegrityError(f"the log's header names {header['app']}/{header['session_id']}")
    return header


def split_log(plaintext: bytes, app: str, session_id: str) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    """(header, events, trailer) of a decrypted log, each line parsed and checked."""
    try:
        parts = list(formats.iter_log_lines(io.BytesIO(plaintext)))
    except FormatError as err:
        raise IntegrityError(f"the decrypted log is malformed: {err}") from err
    header = check_header(parts[0][1], app, session_id)
    trailer = parts[-1][1]
    if trailer["app"] != app or trailer["session_id"] != session_id:
        raise IntegrityError("the log's trailer names another session")
    return header, [value for kind, value in parts[1:-1] if kind == "event"], trailer


def inline_body(plaintext: bytes, app: str, session_id: str) -> dict[str, Any]:
    """The inline answer: ``{"header", "events", "trailer"}``."""
    header, events, trailer = split_log(plaintext, app, session_id)
    return {"header": header, "events": events, "trailer": trailer}


def credentials_remaining(now: float | None = None) -> float | None:
    """Seconds until the S3 client's signing credentials expire (None if they do not say)."""
    credentials = client("s3")._request_signer._credentials  # botocore keeps them here; no public accessor
    if credentials is None:
        return None
    credentials.get_frozen_credentials()  # refreshes credentials that are about to expire
    expiry = getattr(credentials, "_expiry_time", None)
    if expiry is None:
        return None
    if expiry.tzinfo is None:
        expiry = expiry.replace(tzinfo=UTC)
    return expiry.timestamp() - (time.time() if now is None else now)


def presign_ttl(cfg: ApiConfig) -> int:
    """min(PRESIGN_TTL, 900, what is left of the signing credentials), whole seconds."""
    ttl = float(min(cfg.presign_ttl, MAX_PRESIGN_TTL))
    remaining = credentials_remaining()
    if remaining is not None:
        ttl = min(ttl, remaining)
    if ttl < MIN_PRESIGN_TTL:
        raise RetryLaterError("the API's credentials are about to expire; no download URL can be signed now")
    return math.floor(ttl)


def presigned_response(cfg: ApiConfig, filed: FiledLog) -> dict[str, Any]:
    """The answer for a log above the inline limit: a presigned URL of the exact filed object version."""
    ttl = presign_ttl(cfg)
    params: dict[str, Any] = {"Bucket": cfg.bucket, "Key": filed.log_key}
    if filed.version_id:
        params["VersionId"] = filed.version_id
    url = client("s3").generate_presigned_url("get_object", Params=params, ExpiresIn=ttl)
    sha256 = filed.ciphertext_sha256 or _hash_object(cfg, filed)
    return {"download_url": url, "expires_in": ttl, "size": filed.ciphertext_size, "sha256": sha256,
            "encryption": "aws-encryption-sdk"}


def _hash_object(cfg: ApiConfig, filed: FiledLog) -> str:
    digest = hashlib.sha256()
    body = _get_log(cfg, filed)["Body"]
    for block in iter(lambda: body.read(HASH_CHUNK), b""):
        digest.update(block)
    return digest.hexdigest()


def object_lock(cfg: ApiConfig, filed: FiledLog) -> dict[str, Any]:
    """Retention of the filed log version: mode, retain-until date, legal hold."""
    kwargs: dict[str, Any] = {"Bucket": cfg.bucket, "Key": filed.log_key}
    if filed.version_id:
        kwargs["VersionId"] = filed.version_id
    try:
        head = client("s3").head_object(**kwargs)
    except ClientError as err:
        if _missing(err):
            raise IntegrityError(f"the filed log {filed.log_key} (version {filed.version_id}) is gone") from err
        raise
    until = head.get("ObjectLockRetainUntilDate")
    return {
        "mode": head.get("ObjectLockMode"),
        "retain_until": formats.format_time(until) if isinstance(until, datetime) else None,
        "legal_hold": head.get("ObjectLockLegalHoldStatus") == "ON",
    }


def session_details(cfg: ApiConfig, filed: FiledLog) -> dict[str, Any]:
    """Header, trailer (when the log is small enough to read whole), timeline entry and integrity summary."""
    trailer = None
    if filed.plaintext_size <= DETAIL_FULL_DECRYPT_MAX:
        header, _, trailer = split_log(fetch_plaintext(cfg, filed), filed.app, filed.session_id)
    else:
        header = read_header(cfg, filed.app, filed.session_id, filed.version_id)
    entry = read_index_entry(cfg, filed.app, filed.session_id, filed.started_at)
    manifest = filed.manifest or {}
    summary = trailer or manifest or entry or {}
    problems = []
    if entry is None:
        problems.append("index entry missing: the session is not on the timeline")
    if filed.manifest is None:
        problems.append("manifest missing: the log has no signed evidence")
    integrity = {
        "complete": summary.get("complete"),
        "gaps": summary.get("gaps"),
        "chain_sha256": summary.get("chain_sha256"),
        "event_count": summary.get("event_count"),
        "ciphertext_size": filed.ciphertext_size,
        "ciphertext_sha256": filed.ciphertext_sha256,
        "plaintext_size": filed.plaintext_size,
        "plaintext_sha256": filed.plaintext_sha256,
        "log_version_id": filed.version_id,
        "manifest": filed.manifest is not None,
        "verified": "decrypted and hashed" if trailer is not None else "header frame only",
        "problems": problems,
    }
    return {
        "app": filed.app,
        "session_id": filed.session_id,
        "summary": timeline.public_entry(entry) if entry else None,
        "header": header,
        "trailer": trailer,
        "integrity": integrity,
        "retention": object_lock(cfg, filed),
    }


def dumps(value: Any) -> str:
    """Compact JSON keeping text readable (no \\u escapes for non-ASCII)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
