"""Legal hold through the API: admins place and release it, S3 (moto) then refuses to delete the held versions."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import test_evidence_support as support
from botocore.exceptions import ClientError

from oneoff_audit import keys
from oneoff_audit.aws import client
from oneoff_audit.config import DigestConfig
from oneoff_audit.evidence.digest import write_digests
from oneoff_audit.evidence.legalhold import lock_status

pytestmark = pytest.mark.integration

s3_clock = support.s3_clock
_kms_digest_messages = support.kms_digest_messages

EVENTS = Path(__file__).resolve().parents[2] / "events"
APP = "billing.api_v2"  # the app and session of the recorded events in events/
SID = "01M89JNXGSK9V8X5T4R2N1B0AQ"
T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def _event(name: str) -> dict:
    return json.loads((EVENTS / f"{name}.json").read_text())


def _call(event: dict, lambda_context) -> tuple[int, dict]:
    from oneoff_audit.api.app import handle

    response = handle(copy.deepcopy(event), lambda_context)
    return response["statusCode"], json.loads(response["body"])


def _delete_version(bucket: str, key: str, version_id: str) -> str:
    try:
        client("s3").delete_object(Bucket=bucket, Key=key, VersionId=version_id)
    except ClientError as err:
        return err.response["Error"]["Code"]
    return "deleted"


@pytest.fixture
def filed(stack, s3_clock):
    s3_clock.set(T0 + timedelta(minutes=5))
    return support.file_session(stack, APP, SID, T0 + timedelta(minutes=5))


def test_admin_hold_blocks_deleting_the_log_version_until_released(stack, filed, lambda_context):
    mkey = keys.manifest_key(APP, SID)
    code, body = _call(_event("api_put_legal_hold"), lambda_context)
    assert code == 200, body
    assert (body["legal_hold"], body["retain_until"], body["retention_mode"]) == ("ON", None, None)
    assert [(o["key"], o["legal_hold"]) for o in body["objects"]] == [
        (filed.log_key, True), (mkey, True), (mkey + ".sig", True)]
    assert body["objects"][0]["version_id"] == filed.log_version_id
    assert body["changed_by"] == {"subject": "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9", "name": "Grace Admin",
                                  "source": "cognito", "admin": True}

    assert _delete_version(stack.bucket, filed.log_key, filed.log_version_id) == "AccessDenied"
    manifest_version = body["objects"][1]["version_id"]
    assert _delete_version(stack.bucket, mkey, manifest_version) == "AccessDenied"
    assert client("s3").head_object(Bucket=stack.bucket, Key=filed.log_key,
                                    VersionId=filed.log_version_id)["ObjectLockLegalHoldStatus"] == "ON"

    code, body = _call(_event("api_delete_legal_hold"), lambda_context)
    assert (code, body["legal_hold"]) == (200, "OFF")
    assert _delete_version(stack.bucket, filed.log_key, filed.log_version_id) == "deleted"


def test_non_admin_gets_403_and_nothing_changes(stack, filed, lambda_context):
    code, body = _call(_event("api_put_legal_hold_not_admin"), lambda_context)
    assert (code, body) == (403, {"error": "forbidden", "message": "this action requires the custom:audit_admin claim"})
    delete = _event("api_put_legal_hold_not_admin") | {"httpMethod": "DELETE"}
    assert _call(delete, lambda_context)[0] == 403
    assert lock_status(stack.bucket, APP, SID)["legal_hold"] == "OFF"
    assert _delete_version(stack.bucket, filed.log_key, filed.log_version_id) == "deleted"


def test_caller_without_the_app_gets_403_before_any_lookup(stack, lambda_context):
    event = _event("api_put_legal_hold")
    event["path"] = event["path"].replace(APP, "other-app")
    event["pathParameters"]["app"] = "other-app"
    assert _call(event, lambda_context) == (
        403, {"error": "forbidden", "message": "not allowed to read app 'other-app'"})


def test_lock_status_reports_default_retention(stack, s3_clock):
    client("s3").put_object_lock_configuration(Bucket=stack.bucket, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 2}}})
    s3_clock.set(T0)
    support.file_session(stack, APP, "S2", T0)
    status = lock_status(stack.bucket, APP, "S2")
    assert (status["legal_hold"], status["retain_until"], status["retention_mode"]) == (
        "OFF", "2026-11-27T09:00:00.000000Z", "GOVERNANCE")


def test_unknown_session_is_404(stack, lambda_context):
    code, body = _call(_event("api_put_legal_hold"), lambda_context)
    assert (code, body) == (404, {"error": "not_found", "message": f"session {APP}/{SID} has no filed log"})


def test_integrity_route_returns_the_verify_chain_report(stack, filed, s3_clock, lambda_context):
    later = T0 + timedelta(hours=1, minutes=5)
    s3_clock.set(later)
    write_digests(DigestConfig(bucket=stack.bucket, signing_key_id=stack.signing_key_id), now=later)
    event = _event("api_get_integrity")
    event["queryStringParameters"] = {"from": "2026-11-25T09:00:00Z", "to": "2026-11-25T10:00:00Z"}
    code, body = _call(event, lambda_context)
    assert code == 200, body
    assert (body["ok"], body["findings"], body["checked"]) == (
        True, [], {"hours": 1, "digests": 1, "manifests": 1, "logs": 1})
    client("s3").delete_object(Bucket=stack.bucket, Key=filed.log_key)
    code, body = _call(event, lambda_context)
    assert (code, body["ok"], [f["kind"] for f in body["findings"]]) == (200, False, ["log-missing"])
    event["queryStringParameters"] = {"from": "2026-11-25T10:00:00Z", "to": "2026-11-25T09:00:00Z"}
    assert _call(event, lambda_context)[0] == 400
