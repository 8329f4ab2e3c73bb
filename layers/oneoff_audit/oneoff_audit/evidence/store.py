"""The few S3 operations evidence needs: write-once puts, exact reads, and existence checks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError

from oneoff_audit.aws import client, error_code, is_not_found, is_precondition_failed, is_write_conflict
from oneoff_audit.errors import RetryLaterError


@dataclass(frozen=True)
class StoredObject:
    """One object version's bytes and the metadata evidence cares about."""

    key: str
    body: bytes
    version_id: str | None
    last_modified: datetime
    metadata: dict[str, str]


def put_if_absent(bucket: str, key: str, body: bytes, content_type: str = "application/json",
                  metadata: dict[str, str] | None = None,
                  lock: Mapping[str, Any] | None = None) -> tuple[bool, str | None]:
    """PUT ``key`` only if no object is there (``If-None-Match: *``), with Object Lock ``lock`` arguments.

    Returns ``(True, new version id)`` (``None`` on an unversioned bucket), or ``(False, None)`` if an
    object is already there.
    """
    try:
        resp = client("s3").put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type,
                                       Metadata=metadata or {}, IfNoneMatch="*", **(lock or {}))
    except ClientError as err:
        if is_precondition_failed(err):
            return False, None
        if is_write_conflict(err):  # a concurrent conditional write in flight
            raise RetryLaterError(f"{key}: a concurrent write is in progress") from err
        raise
    return True, resp.get("VersionId")


def get(bucket: str, key: str, version_id: str | None = None, max_bytes: int = 64 << 20) -> StoredObject | None:
    """The object's current (or given) version, or None if it does not exist.

    At most ``max_bytes + 1`` bytes are read: an oversized object comes back truncated (so it can
    never match a recorded hash or verify), never loaded whole.
    """
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if version_id:
        kwargs["VersionId"] = version_id
    try:
        resp = client("s3").get_object(**kwargs)
    except ClientError as err:
        if is_not_found(err):
            return None
        raise
    body = resp["Body"]
    try:
        data = body.read(max_bytes + 1)
    finally:
        body.close()
    return StoredObject(key, data, resp.get("VersionId"), resp["LastModified"], dict(resp.get("Metadata") or {}))


def head(bucket: str, key: str, version_id: str | None = None) -> dict[str, Any] | None:
    """HEAD of the current (or given) version, or None if it does not exist."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if version_id:
        kwargs["VersionId"] = version_id
    try:
        return client("s3").head_object(**kwargs)
    except ClientError as err:
        if is_not_found(err) or error_code(err) in ("405", "MethodNotAllowed"):  # 405: a delete marker
            return None
        raise


def list_objects(bucket: str, prefix: str, start_after: str | None = None,
                 delimiter: str | None = None) -> Iterator[dict[str, Any]]:
    """Every current object under ``prefix`` in key order (or common prefixes with ``delimiter``)."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if start_after:
        kwargs["StartAfter"] = start_after
    if delimiter:
        kwargs["Delimiter"] = delimiter
    for page in client("s3").get_paginator("list_objects_v2").paginate(**kwargs):
        if delimiter:
            yield from page.get("CommonPrefixes", [])
        else:
            yield from page.get("Contents", [])


def history(bucket: str, key: str) -> dict[str, list[dict[str, Any]]]:
    """Every version and delete marker of exactly ``key`` (newest first)."""
    versions: list[dict[str, Any]] = []
    markers: list[dict[str, Any]] = []
    paginator = client("s3").get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=bucket, Prefix=key):
        versions += [v for v in page.get("Versions", []) if v["Key"] == key]
        markers += [m for m in page.get("DeleteMarkers", []) if m["Key"] == key]
    return {"versions": versions, "delete_markers": markers}


@dataclass(frozen=True)
class KeyState:
    """The state of one key in a versioned listing: its newest entry and its newest real version."""

    key: str
    deleted: bool  # the newest entry is a delete marker
    deleted_at: datetime | None
    version_id: str | None  # the newest real version (None if only markers are left)
    written_at: datetime | None


def key_states(bucket: str, prefix: str) -> Iterator[KeyState]:
    """Every key under ``prefix`` that has versions or delete markers, with its current state (key order)."""
    entries: dict[str, list[tuple[datetime, bool, dict[str, Any]]]] = {}
    for page in client("s3").get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Versions", []):
            entries.setdefault(item["Key"], []).append((item["LastModified"], False, item))
        for item in page.get("DeleteMarkers", []):
            entries.setdefault(item["Key"], []).append((item["LastModified"], True, item))
    for key in sorted(entries):
        items = entries[key]
        latest = next((i for i in items if i[2].get("IsLatest")), max(items, key=lambda i: i[0]))
        versions = sorted((i for i in items if not i[1]), key=lambda i: i[0], reverse=True)
        yield KeyState(
            key=key,
            deleted=latest[1],
            deleted_at=latest[0] if latest[1] else None,
            version_id=versions[0][2].get("VersionId") if versions else None,
            written_at=versions[0][0] if versions else None,
        )


def sha256_of_object(bucket: str, key: str, version_id: str | None = None) -> str:
    """SHA-256 of a stored object (version), streamed in 1 MiB reads."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if version_id:
        kwargs["VersionId"] = version_id
    body = client("s3").get_object(**kwargs)["Body"]
    digest = hashlib.sha256()
    try:
        for block in iter(lambda: body.read(1 << 20), b""):
            digest.update(block)
    finally:
        body.close()
    return digest.hexdigest()
