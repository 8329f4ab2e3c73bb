"""Filed objects carry explicit Object Lock retention; staging objects never do (they are deleted once filed)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from botocore.exceptions import ClientError
from helpers_staging import build_chunks, output_events, stage

from oneoff_audit import keys
from oneoff_audit.assemble import assemble_session
from oneoff_audit.aws import client
from oneoff_audit.config import AssemblerConfig, DigestConfig, Retention
from oneoff_audit.evidence.digest import write_digests
from oneoff_audit.evidence.moto_compat import honour_kms_digest_messages

pytestmark = pytest.mark.integration
APP = "locked-app"


def _retention(bucket: str, key: str) -> tuple[str | None, datetime | None]:
    head = client("s3").head_object(Bucket=bucket, Key=key)
    return head.get("ObjectLockMode"), head.get("ObjectLockRetainUntilDate")


def test_filed_log_manifest_index_and_digest_are_locked_and_staging_is_not(stack, monkeypatch):
    honour_kms_digest_messages()
    monkeypatch.setenv("LOG_LOCK_MODE", "GOVERNANCE")
    monkeypatch.setenv("LOG_RETENTION_DAYS", "30")
    config = AssemblerConfig.from_env()
    assert config.retention == Retention("GOVERNANCE", 30)
    sid = "LOCKED1"
    stage(stack.bucket, build_chunks(APP, sid, [output_events(["hello\r\n"], start=0)]))
    staged = [o["Key"] for o in client("s3").list_objects_v2(Bucket=stack.bucket, Prefix="staging/")["Contents"]]
    assert staged and all(_retention(stack.bucket, k) == (None, None) for k in staged)

    before = datetime.now(UTC)
    filed = assemble_session(config, APP, sid)
    index = client("s3").list_objects_v2(Bucket=stack.bucket, Prefix=keys.index_prefix(APP))["Contents"][0]["Key"]
    filed_keys = [filed.log_key, keys.manifest_key(APP, sid), keys.manifest_key(APP, sid) + ".sig", index]
    for key in filed_keys:
        mode, until = _retention(stack.bucket, key)
        assert mode == "GOVERNANCE", key
        assert before + timedelta(days=30) - timedelta(minutes=1) <= until <= datetime.now(UTC) + timedelta(days=30)
    with pytest.raises(ClientError):  # a locked version cannot be deleted without bypassing governance
        client("s3").delete_object(Bucket=stack.bucket, Key=filed.log_key, VersionId=filed.log_version_id)

    digest_config = dataclasses.replace(DigestConfig.from_env(), settle_seconds=0)
    result = write_digests(digest_config, now=datetime.now(UTC) + timedelta(hours=2))
    written = [k for r in result["apps"] for k in r["written"]]
    assert written and all(k.startswith(f"digests/{APP}/") for k in written)
    for key in written:
        assert _retention(stack.bucket, key)[0] == "GOVERNANCE"


def test_retention_setting_is_validated():
    from oneoff_audit.config import ConfigError

    with pytest.raises(ConfigError, match="LOG_LOCK_MODE must be one of GOVERNANCE, COMPLIANCE, got 'FOREVER'"):
        Retention.from_env({"LOG_LOCK_MODE": "FOREVER", "LOG_RETENTION_DAYS": "1"})
    assert Retention.from_env({}).put_args() == {}
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert Retention("COMPLIANCE", 2).put_args(now) == {
        "ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": datetime(2026, 1, 3, tzinfo=UTC)}
