"""Signed manifests: exact bytes, a signature that verifies, write-once idempotence."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime

import pytest
import test_evidence_support as support

from oneoff_audit import formats, keys
from oneoff_audit.aws import client
from oneoff_audit.errors import IntegrityError
from oneoff_audit.evidence import signing
from oneoff_audit.evidence.manifest import write_signed_manifest

pytestmark = pytest.mark.integration

s3_clock = support.s3_clock  # fixtures shared by the evidence tests
_kms_digest_messages = support.kms_digest_messages
file_session, put_log = support.file_session, support.put_log

FILED = datetime(2026, 11, 25, 10, 15, 30, 123456, tzinfo=UTC)


def _get(bucket: str, key: str) -> dict:
    return client("s3").get_object(Bucket=bucket, Key=key)


def test_manifest_is_canonical_signed_and_schema_valid(stack):
    filed = put_log(stack, "app1", "S1", b"hello\n", FILED)
    result = write_signed_manifest(filed, stack.bucket, stack.signing_key_id)

    key = keys.manifest_key("app1", "S1")
    stored = _get(stack.bucket, key)
    data = stored["Body"].read()
    expected = {"format": "oneoff-audit.manifest", "version": 1, **filed.to_dict(),
                "signing_key_id": stack.signing_key_id, "signing_algorithm": "ECDSA_SHA_256"}
    assert json.loads(data) == expected
    assert data == json.dumps(expected, sort_keys=True, separators=(",", ":")).encode()
    formats.validate(json.loads(data), "manifest", "stored manifest")
    assert result["key"] == key and result["created"] is True and result["signature_created"] is True
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert result["version_id"] == stored["VersionId"]

    sig = _get(stack.bucket, key + ".sig")
    signature = sig["Body"].read()
    assert sig["Metadata"] == {"signing-key-id": stack.signing_key_id, "signing-algorithm": "ECDSA_SHA_256"}
    assert signing.verify(data, signature, signing.public_key(stack.signing_key_id))
    assert not signing.verify(data.replace(b"succeeded", b"failed\x20\x20\x20"), signature,
                              signing.public_key(stack.signing_key_id))
    assert result["signature_sha256"] == hashlib.sha256(signature).hexdigest()


def test_rewriting_the_same_manifest_is_a_no_op(stack):
    filed = put_log(stack, "app1", "S2", b"x", FILED)
    first = write_signed_manifest(filed, stack.bucket, stack.signing_key_id)
    again = write_signed_manifest(filed, stack.bucket, stack.signing_key_id)
    assert again["created"] is False and again["signature_created"] is False
    assert again["version_id"] == first["version_id"]
    assert again["signature_sha256"] == first["signature_sha256"]
    versions = client("s3").list_object_versions(Bucket=stack.bucket, Prefix="manifests/app1/S2.json")["Versions"]
    assert sorted(v["Key"] for v in versions) == ["manifests/app1/S2.json", "manifests/app1/S2.json.sig"]


def test_retry_after_crash_before_signature_completes_it(stack):
    filed = put_log(stack, "app1", "S3", b"x", FILED)
    first = write_signed_manifest(filed, stack.bucket, stack.signing_key_id)
    client("s3").delete_object(Bucket=stack.bucket, Key=first["signature_key"])  # as if we crashed before it
    again = write_signed_manifest(filed, stack.bucket, stack.signing_key_id)
    assert again["created"] is False and again["signature_created"] is True


def test_a_different_manifest_for_the_same_session_is_refused(stack):
    filed = put_log(stack, "app1", "S4", b"x", FILED)
    write_signed_manifest(filed, stack.bucket, stack.signing_key_id)
    other = dataclasses.replace(filed, event_count=filed.event_count + 1)
    with pytest.raises(IntegrityError, match=r"manifests/app1/S4.json: a different manifest is already filed"):
        write_signed_manifest(other, stack.bucket, stack.signing_key_id)


def test_an_invalid_existing_signature_is_refused(stack):
    filed = put_log(stack, "app1", "S5", b"x", FILED)
    first = write_signed_manifest(filed, stack.bucket, stack.signing_key_id)
    client("s3").put_object(Bucket=stack.bucket, Key=first["signature_key"], Body=b"0" * 70)
    with pytest.raises(IntegrityError, match=r"S5.json.sig: an existing signature does not verify"):
        write_signed_manifest(filed, stack.bucket, stack.signing_key_id)
