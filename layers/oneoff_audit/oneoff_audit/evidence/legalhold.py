"""Legal hold: S3 Object Lock legal hold on the exact versions that make up a session's evidence.

The held versions are the filed log version the manifest names, the manifest and its signature.
While a legal hold is on, S3 refuses to delete or overwrite-delete those versions (whatever the
retention date); retention itself (mode and retain-until date) comes from the bucket's default
Object Lock configuration and is reported, never changed, here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError

from oneoff_audit import formats, keys
from oneoff_audit.aws import client, is_not_found
from oneoff_audit.errors import IntegrityError, NotFoundError
from oneoff_audit.evidence import store
from oneoff_audit.evidence.manifest import MAX_MANIFEST_BYTES, parse_manifest, signature_key
from oneoff_audit.ids import validate_app, validate_session_id


def evidence_versions(bucket: str, app: str, session_id: str) -> list[tuple[str, str | None]]:
    """(key, version id) of the filed log, the manifest and its signature.

    Without a manifest (a log filed without evidence) the log's current version stands in.
    Raises NotFoundError if the session has neither a manifest nor a log.
    """
    app, session_id = validate_app(app), validate_session_id(session_id)
    mkey = keys.manifest_key(app, session_id)
    manifest = store.get(bucket, mkey, max_bytes=MAX_MANIFEST_BYTES)
    if manifest is None:
        head = store.head(bucket, keys.log_key(app, session_id))
        if head is None:
            raise NotFoundError(f"session {app}/{session_id} has no filed log")
        return [(keys.log_key(app, session_id), head.get("VersionId"))]
    doc = parse_manifest(manifest.body, mkey)
    found = [(doc["log_key"], doc["log_version_id"]), (mkey, manifest.version_id)]
    sig = store.head(bucket, signature_key(mkey))
    if sig is not None:
        found.append((signature_key(mkey), sig.get("VersionId")))
    return found


def _version_args(bucket: str, key: str, version_id: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if version_id:
        kwargs["VersionId"] = version_id
    return kwargs


def set_legal_hold(bucket: str, app: str, session_id: str, on: bool) -> dict[str, Any]:
    """Turn the legal hold on (or off) for every evidence version of a session; returns :func:`lock_status`."""
    status = "ON" if on else "OFF"
    for key, version_id in evidence_versions(bucket, app, session_id):
        try:
            client("s3").put_object_legal_hold(**_version_args(bucket, key, version_id), LegalHold={"Status": status})
        except ClientError as err:
            if is_not_found(err):
                raise IntegrityError(f"{key} version {version_id} is gone; run oneoff-audit verify-chain") from err
            raise
    return lock_status(bucket, app, session_id)


def lock_status(bucket: str, app: str, session_id: str) -> dict[str, Any]:
    """Legal hold and retention of a session's evidence, for session details.

    ``{"legal_hold": "ON"|"OFF"|"PARTIAL", "retain_until": earliest retain-until date or None,
    "retention_mode": "COMPLIANCE"|"GOVERNANCE"|None, "objects": [{key, version_id, legal_hold,
    retention_mode, retain_until, present}]}``. Raises NotFoundError for an unknown session.
    """
    objects = []
    for key, version_id in evidence_versions(bucket, app, session_id):
        head = store.head(bucket, key, version_id)
        until = head.get("ObjectLockRetainUntilDate") if head else None
        objects.append({
            "key": key,
            "version_id": version_id,
            "present": head is not None,
            "legal_hold": (head or {}).get("ObjectLockLegalHoldStatus") == "ON",
            "retention_mode": (head or {}).get("ObjectLockMode"),
            "retain_until": formats.format_time(until) if isinstance(until, datetime) else None,
        })
    holds = {o["legal_hold"] for o in objects if o["present"]}
    dates = [(o["retain_until"], o["retention_mode"]) for o in objects if o["retain_until"]]
    earliest = min(dates) if dates else (None, None)
    return {
        "legal_hold": "ON" if holds == {True} else "OFF" if holds <= {False} else "PARTIAL",
        "retain_until": earliest[0],
        "retention_mode": earliest[1],
        "objects": objects,
    }
