"""Every recorded event in events/ runs through its deployed handler, as `sam local invoke -e` would."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers_staging import build_chunks, output_events, stage

from oneoff_audit import keys
from oneoff_audit.aws import client
from oneoff_audit.config import DigestConfig
from oneoff_audit.evidence.moto_compat import honour_kms_digest_messages
from oneoff_audit.local import load_handler

pytestmark = pytest.mark.integration

EVENTS = Path(__file__).resolve().parents[2] / "events"
EVENT_BUCKET = "oneoff-audit-123456789012-5f2a9c0e4b1d"  # the deployment the SQS events were recorded from
APP, SID = "billing.api_v2", "01M89JNXGSK9V8X5T4R2N1B0AQ"  # the session the recorded events name
API_STATUS = {  # in the order an auditor would make the calls
    "api_list_sessions": 200, "api_list_sessions_forbidden": 403, "api_get_session": 200, "api_get_log": 200,
    "api_list_access": 200, "api_get_integrity": 200, "api_put_legal_hold_not_admin": 403,
    "api_put_legal_hold": 200, "api_delete_legal_hold": 200,
}


def load(name: str, bucket: str | None = None) -> dict:
    """A recorded event; S3 notifications re-pointed at the test's bucket (as for another deployment)."""
    text = (EVENTS / f"{name}.json").read_text("utf-8")
    return json.loads(text.replace(EVENT_BUCKET, bucket) if bucket else text)


def test_every_recorded_event_runs_through_its_handler(stack, lambda_context):
    honour_kms_digest_messages()
    assert sorted(API_STATUS) == sorted(p.stem for p in EVENTS.glob("api_*.json"))
    stage(stack.bucket, build_chunks(APP, SID, [output_events(["deploy ok\r\n"])]))

    assembler = load_handler("assembler")
    assert assembler(load("assembler_sqs_closed", stack.bucket), lambda_context) == {"batchItemFailures": []}
    assert client("s3").head_object(Bucket=stack.bucket, Key=keys.log_key(APP, SID))["ContentLength"] > 0
    for name in ("assembler_sqs_s3_test_event", "assembler_sqs_closed_bad_key", "assembler_sqs_sweep"):
        assert assembler(load(name, stack.bucket), lambda_context) == {"batchItemFailures": []}, name

    assert load_handler("sweeper")(load("sweeper_scheduled"), lambda_context) == {"enqueued": []}
    settle = timedelta(seconds=DigestConfig.from_env().settle_seconds)
    before = datetime.now(UTC) - settle
    digest = load_handler("digest")(load("digest_scheduled"), lambda_context)
    after = datetime.now(UTC) - settle
    # the chain starts with the last full hour (empty); the current hour, with the filing, is not over yet
    last_full_hours = {t.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1) for t in (before, after)}
    assert [(a["app"], a.get("error")) for a in digest["apps"]] == [(APP, None)]
    assert digest["apps"][0]["written"] in [[keys.digest_key(APP, hour)] for hour in last_full_hours]

    api = load_handler("api")
    for name, status in API_STATUS.items():
        response = api(load(name), lambda_context)
        assert response["statusCode"] == status, (name, response["body"])
    log = json.loads(api(load("api_get_log"), lambda_context)["body"])
    assert "".join(d for _, s, d in log["events"] if s == "o") == "deploy ok\r\n"
