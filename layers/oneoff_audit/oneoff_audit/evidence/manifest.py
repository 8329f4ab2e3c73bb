"""The signed session manifest: what the platform filed for one session, signed with KMS.

``manifests/<app>/<session>.json`` holds canonical JSON (see :func:`signing.canonical_bytes`)
validated against ``manifest.schema.json``; ``manifests/<app>/<session>.json.sig`` holds the raw
DER ECDSA-SHA256 signature over those exact bytes, with the KMS key ARN in its object metadata.
Writing is idempotent: both objects are written with ``If-None-Match: *``; a retry that finds the
same manifest completes (or keeps) the signature, a different one is an :class:`IntegrityError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oneoff_audit import formats, keys
from oneoff_audit.errors import IntegrityError
from oneoff_audit.evidence import signing, store
from oneoff_audit.models import FiledLog

FORMAT = "oneoff-audit.manifest"
VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20


def build_manifest(filed: FiledLog, signing_key_id: str) -> dict[str, Any]:
    """The manifest document of a filed log (validated against ``manifest.schema.json``)."""
    doc = {
        "format": FORMAT,
        "version": VERSION,
        **filed.to_dict(),
        "signing_key_id": signing_key_id,
        "signing_algorithm": signing.SIGNING_ALGORITHM,
    }
    return formats.validate(doc, "manifest", f"manifest of {filed.app}/{filed.session_id}")


def signature_key(document_key: str) -> str:
    """Where the signature of an evidence document is stored."""
    return document_key + signing.SIG_SUFFIX


def write_signature(bucket: str, document_key: str, data: bytes, signing_key_id: str,
                    lock: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Sign ``data`` and store the signature beside ``document_key`` unless a valid one is there.

    Raises IntegrityError if a signature object exists that does not verify over ``data``.
    """
    sig_key = signature_key(document_key)
    existing = store.get(bucket, sig_key, max_bytes=1024)
    if existing is None:
        signature, key_arn = signing.sign(data, signing_key_id)
        meta = {signing.META_KEY_ID: key_arn, signing.META_ALGORITHM: signing.SIGNING_ALGORITHM}
        created, version = store.put_if_absent(bucket, sig_key, signature, "application/octet-stream", meta,
                                               lock=lock)
        if created:
            return {"signature_key": sig_key, "signature_version_id": version, "signature_sha256":
                    signing.sha256_hex(signature), "key_arn": key_arn, "signature_created": True}
        existing = store.get(bucket, sig_key, max_bytes=1024)  # lost a race with a concurrent writer
        if existing is None:
            raise IntegrityError(f"{sig_key}: signature vanished while being written")
    if not signing.verify(data, existing.body, signing.public_key(signing_key_id)):
        raise IntegrityError(f"{sig_key}: an existing signature does not verify over {document_key}")
    return {"signature_key": sig_key, "signature_version_id": existing.version_id, "signature_sha256":
            signing.sha256_hex(existing.body), "key_arn": existing.metadata.get(signing.META_KEY_ID),
            "signature_created": False}


def write_signed_manifest(filed: FiledLog, bucket: str, signing_key_id: str,
                          lock: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write and sign the manifest of a filed log, exactly once.

    Called by the assembler after the log is written and before the index entry. Returns
    ``{key, version_id, sha256, created, manifest, signature_key, signature_version_id,
    signature_sha256, key_arn, signature_created}``. Raises IntegrityError if a different
    manifest (or an invalid signature) is already stored for this session.
    """
    doc = build_manifest(filed, signing_key_id)
    data = signing.canonical_bytes(doc)
    key = keys.manifest_key(filed.app, filed.session_id)
    created, version = store.put_if_absent(bucket, key, data, lock=lock)
    if not created:
        existing = store.get(bucket, key, max_bytes=MAX_MANIFEST_BYTES)
        if existing is None:
            raise IntegrityError(f"{key}: manifest vanished while being written")
        if existing.body != data:
            raise IntegrityError(f"{key}: a different manifest is already filed for this session "
                                 f"(stored sha256 {signing.sha256_hex(existing.body)}, "
                                 f"new sha256 {signing.sha256_hex(data)})")
        version = existing.version_id
    result = {"key": key, "version_id": version, "sha256": signing.sha256_hex(data), "created": created,
              "manifest": doc}
    result.update(write_signature(bucket, key, data, signing_key_id, lock=lock))
    return result


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """Parse and validate stored manifest bytes."""
    return formats.validate(formats.parse_json(data, where, MAX_MANIFEST_BYTES), "manifest", where)
