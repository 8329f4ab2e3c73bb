"""Finding a filed log and delivering it: inline (decrypted) when small, a presigned URL when large.

What was filed for a session is read from its evidence manifest (``manifests/<app>/<session>.json``:
log key and version, ciphertext and plaintext sizes and SHA-256, started_at). Without a manifest,
a session whose staging folder still exists is *pending* (202: ``recording`` without a close
marker, ``assembling`` with one); a log filed without a manifest (evidence signing off) is
described by the summary the assembler put in its object metadata, and its ciphertext hash is
computed when a download link needs it.

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from oneoff_audit import crypto, export, formats, keys
from oneoff_audit.api import timeline
from oneoff_audit.aws import client, error_code, is_not_found
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
INLINE_OVERHEAD = 64 << 10  # message header and frame overhead of an inline-sized log, generously
DETAIL_FULL_DECRYPT_MAX = 8 << 20  # session details decrypt smaller logs whole (header and trailer)
HASH_CHUNK = 1 << 20


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
        if is_not_found(err):
            return None
        raise


def _exists(bucket: str, key: str) -> bool:
    try:
        client("s3").head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as err:
        if is_not_found(err):
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
        if is_not_found(err):
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
        if is_not_found(err):
            raise NotFoundError(f"no session {session_id!r} in app {app!r}") from err
        raise
    # Filed without a manifest (evidence signing off): the summary the assembler put in the log's metadata.
    meta = head.get("Metadata") or {}
    try:
        if meta.get("format") != formats.LOG_METADATA_FORMAT or meta["app"] != app or meta["session-id"] != session_id:
            raise KeyError("format/app/session-id")
        started_at = meta["started-at"]
        formats.parse_time(started_at)
        plaintext_size, plaintext_sha256 = int(meta["plaintext-size"]), meta["plaintext-sha256"]
    except (KeyError, ValueError, FormatError) as err:
        raise IntegrityError(f"the log has no manifest and its metadata is not a log summary ({err})") from None
    version = head.get("VersionId") if head.get("VersionId") not in (None, "null") else None
    entry = read_index_entry(cfg, app, session_id, started_at)
    if entry is not None and entry["log_version_id"] not in (None, version):
        version = entry["log_version_id"]  # the version that was filed, not a later overwrite
        head = client("s3").head_object(Bucket=cfg.bucket, Key=log_key, VersionId=version)
        plaintext_size, plaintext_sha256 = entry["size"], entry["sha256"]
    return FiledLog(app, session_id, log_key, version, int(head["ContentLength"]), None, plaintext_size,
                    plaintext_sha256, started_at, None)


def _get_log(cfg: ApiConfig, filed: FiledLog) -> Any:
    kwargs: dict[str, Any] = {"Bucket": cfg.bucket, "Key": filed.log_key}
    if filed.version_id:
        kwargs["VersionId"] = filed.version_id
    try:
        return client("s3").get_object(**kwargs)
    except ClientError as err:
        if is_not_found(err):
            raise IntegrityError(f"the filed log {filed.log_key} (version {filed.version_id}) is gone") from err
        raise


def decrypt_message(cfg: ApiConfig, ciphertext: bytes, app: str, session_id: str) -> bytes:
    """Decrypt a whole (inline-sized) message frame by frame; its encryption context must name this session."""
    provider = crypto.key_provider(cfg.kms_key_id)
    try:
        with crypto.sdk_client().stream(mode="d", source=ciphertext, key_provider=provider) as decryptor:
            crypto.check_context(dict(decryptor.header.encryption_context), app, session_id)
            plaintext = b"".join(iter(lambda: decryptor.read(crypto.FRAME_LENGTH), b""))
            if not hasattr(decryptor, "footer"):  # the SDK marks the end of an intact message this way
                raise DecryptionError("cannot decrypt: the message ends before its final frame")
    except crypto.DECRYPT_ERRORS as err:
        raise crypto.decryption_error(err) from err
    return plaintext


def check_ciphertext(filed: FiledLog, ciphertext: bytes) -> None:
    """The stored bytes must be exactly what was filed."""
    if len(ciphertext) != filed.ciphertext_size:
        raise IntegrityError(f"the stored log is {len(ciphertext)} bytes, {filed.ciphertext_size} were filed")
    if filed.ciphertext_sha256 and hashlib.sha256(ciphertext).hexdigest() != filed.ciphertext_sha256:
        raise IntegrityError("the stored log does not match the SHA-256 in its manifest")


def check_plaintext(filed: FiledLog, plaintext: bytes) -> None:
    """The decrypted bytes must be the plaintext that was filed."""
    if len(plaintext) != filed.plaintext_size or (
            filed.plaintext_sha256 and hashlib.sha256(plaintext).hexdigest() != filed.plaintext_sha256):
        raise IntegrityError("the decrypted log does not match the plaintext size and SHA-256 recorded when filed")


def fetch_plaintext(cfg: ApiConfig, filed: FiledLog) -> bytes:
    """The whole decrypted log, after checking sizes, hashes and the encryption context."""
    ciphertext = _get_log(cfg, filed)["Body"].read(filed.ciphertext_size + 1)
    check_ciphertext(filed, ciphertext)
    plaintext = decrypt_message(cfg, ciphertext, filed.app, filed.session_id)
    check_plaintext(filed, plaintext)
    return plaintext


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="api-io")
    return _POOL


_POOL: ThreadPoolExecutor | None = None


def _speculative_get(cfg: ApiConfig, app: str, session_id: str) -> tuple[str | None, bytes] | None:
    """The current log version's first bytes, enough for any inline-sized log (None if there is no log)."""
    limit = cfg.inline_max_bytes + INLINE_OVERHEAD
    try:
        resp = client("s3").get_object(Bucket=cfg.bucket, Key=keys.log_key(app, session_id), Range=f"bytes=0-{limit}")
    except ClientError as err:
        if is_not_found(err) or error_code(err) == "InvalidRange":
            return None
        raise
    version = resp.get("VersionId")
    return (None if version in (None, "null") else version), resp["Body"].read(limit + 1)


@dataclass(frozen=True)
class Delivery:
    """What the log route answers: an inline JSON or asciicast body, or a download link."""

    how: str  # "inline" | "asciicast" | "url" | "asciicast-url"
    filed: FiledLog
    body: str | None = None
    link: dict[str, Any] | None = None


def deliver(cfg: ApiConfig, app: str, session_id: str, fmt: str, record: Callable[..., Any]) -> Delivery:
    """Answer a log request; ``record(how, **details)`` writes the access record, always before release.

    The manifest and the log's first bytes are fetched at once, and the access record is written
    while the log is decrypted, so an inline answer costs about one S3 GET and one KMS call more
    than nothing. A record is written for every request that gets as far as the log, also when it
    then fails its integrity checks (the attempt is recorded; nothing is released).
    """
    pool = _pool()
    speculative = pool.submit(_speculative_get, cfg, app, session_id)
    try:
        filed = locate(cfg, app, session_id)
    except BaseException:
        speculative.cancel()
        raise
    if filed.plaintext_size > cfg.inline_max_bytes:
        speculative.cancel()
        link = presigned_response(cfg, filed)
        record("url" if fmt == "json" else "asciicast-url", log_version_id=filed.version_id,
               expires_in=link["expires_in"])
        return Delivery("url" if fmt == "json" else "asciicast-url", filed, link=link)
    how = "inline" if fmt == "json" else "asciicast"
    recorded = pool.submit(record, how, log_version_id=filed.version_id)
    try:
        got = speculative.result()
        if got is None or got[0] != filed.version_id or len(got[1]) != filed.ciphertext_size:
            ciphertext = _get_log(cfg, filed)["Body"].read(filed.ciphertext_size + 1)  # not the filed version
        else:
            ciphertext = got[1]
        check_ciphertext(filed, ciphertext)
        plaintext = decrypt_message(cfg, ciphertext, app, session_id)
        check_plaintext(filed, plaintext)
        body = inline_json(plaintext, app, session_id) if how == "inline" else \
            export.asciicast_bytes(plaintext).decode("utf-8")
    finally:
        recorded.result()  # durable before anything is released; its failure (503) wins over success
    return Delivery(how, filed, body=body)


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
    except crypto.DECRYPT_ERRORS as err:
        raise crypto.decryption_error(err) from err
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


def header_and_trailer(plaintext: bytes, app: str, session_id: str) -> tuple[bytes, dict[str, Any], bytes,
                                                                            dict[str, Any]]:
    """The first and last lines of a decrypted log (raw and parsed), validated and naming this session."""
    first = plaintext.find(b"\n")
    last = plaintext.rfind(b"\n", 0, len(plaintext) - 1) + 1
    if first < 0 or last <= first or not plaintext.endswith(b"\n"):
        raise IntegrityError("the decrypted log has no header and trailer lines")
    header_raw, trailer_raw = plaintext[:first], plaintext[last:-1]
    try:
        header = check_header(formats.parse_json(header_raw, "log line 1"), app, session_id)
        trailer = formats.validate(formats.parse_json(trailer_raw, "log trailer"), "log-trailer", "log trailer")
    except FormatError as err:
        raise IntegrityError(f"the decrypted log is malformed: {err}") from err
    if trailer["app"] != app or trailer["session_id"] != session_id:
        raise IntegrityError("the log's trailer names another session")
    return header_raw, header, trailer_raw, trailer


def inline_json(plaintext: bytes, app: str, session_id: str) -> str:
    """The inline answer ``{"header", "events", "trailer"}`` as JSON text, spliced from the log's own lines.

    The plaintext is authenticated (AES-GCM under the KMS key, encryption context and SHA-256 checked
    against the manifest), so its compact JSON lines are exactly what the assembler validated and wrote:
    header and trailer are checked again, the event lines are joined into the array as they are. That
    keeps a 1 MiB log's answer in milliseconds instead of re-parsing every event.
    """
    header_raw, _, trailer_raw, _ = header_and_trailer(plaintext, app, session_id)
    middle = plaintext[len(header_raw) + 1:len(plaintext) - len(trailer_raw) - 1]
    events = b"[" + middle[:-1].replace(b"\n", b",") + b"]" if middle else b"[]"
    body = b"".join((b'{"header":', header_raw, b',"events":', events, b',"trailer":', trailer_raw, b"}"))
    return body.decode("utf-8")


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
        if is_not_found(err):
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
        _, header, _, trailer = header_and_trailer(fetch_plaintext(cfg, filed), filed.app, filed.session_id)
    else:
        header = read_header(cfg, filed.app, filed.session_id, filed.version_id)
    entry = read_index_entry(cfg, filed.app, filed.session_id, filed.started_at)
    manifest = filed.manifest or {}
    summary = trailer or manifest or entry or {}
    problems = []
    if entry is None:
        problems.append("index entry not written yet: filing in progress"
                        if staging_status(cfg, filed.app, filed.session_id) else
                        "index entry missing: the session is not on the timeline")
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
