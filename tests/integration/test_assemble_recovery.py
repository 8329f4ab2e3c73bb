"""Crashes between any two steps are finished by the next delivery; the handler reports partial failures.

Crashes are real: the assembler runs in a child process that SIGKILLs itself from a botocore hook at
the chosen request, so nothing after that point runs (no ``finally``, no abort of the upload).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import quote_plus

import pytest
from helpers_staging import (
    build_chunks,
    capture_logs,
    expected_log,
    index_objects,
    log_versions,
    output_events,
    read_log,
    session_header,
    stage,
    staged_keys,
)

from oneoff_audit import assemble, keys
from oneoff_audit.assemble import Spool, assemble_session, process_message
from oneoff_audit.aws import client
from oneoff_audit.config import AssemblerConfig
from oneoff_audit.evidence.moto_compat import honour_kms_digest_messages
from oneoff_audit.local import load_handler

pytestmark = pytest.mark.integration

APP = "orders"
EVENTS_DIR = Path(__file__).resolve().parents[2] / "events"

CRASHER = textwrap.dedent("""
    import os, signal, sys
    from oneoff_audit.assemble import assemble_session
    from oneoff_audit.aws import client
    from oneoff_audit.config import AssemblerConfig

    operation, prefix, skip = sys.argv[3], sys.argv[4], int(sys.argv[5])
    seen = []

    def crash(params, **_):
        if params.get("Key", "").startswith(prefix) or params.get("Bucket") and prefix == "*":
            seen.append(1)
            if len(seen) > skip:
                os.kill(os.getpid(), signal.SIGKILL)

    client("s3").meta.events.register(f"before-parameter-build.s3.{operation}", crash)
    assemble_session(AssemblerConfig.from_env(), sys.argv[1], sys.argv[2])
    print("finished without crashing")
""")


@pytest.fixture
def config(stack) -> AssemblerConfig:
    return AssemblerConfig(bucket=stack.bucket, kms_key_id=stack.kms_key_id, signing_key_id=stack.signing_key_id,
                           max_attempts=3)


def s3_event(bucket: str, key: str) -> dict:
    return {"Records": [{"eventName": "ObjectCreated:Put",
                         "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(key)}}}]}


def staged_session(stack, sid: str, n: int = 3):
    batches = [output_events([f"step {i} \u2713\r\n", b"\xff"], start=i) for i in range(n)]
    chunks = build_chunks(APP, sid, batches)
    stage(stack.bucket, chunks)
    return batches


def crash_at(stack, sid: str, operation: str, prefix: str, skip: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CRASHER, APP, sid, operation, prefix, str(skip)],
                          env=stack.env(), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("operation", "prefix", "skip", "left"), [
    ("CompleteMultipartUpload", "logs/", 0, "nothing filed"),
    ("PutObject", "index/", 0, "log and manifest"),
    ("DeleteObjects", "*", 1, "log, manifest, index; staging half deleted"),
])
def test_crash_between_steps_is_finished_by_the_next_delivery(config, stack, operation, prefix, skip, left):
    sid = f"CRASH-{operation}-{prefix.strip('/*') or 'cleanup'}"
    batches = staged_session(stack, sid)
    s3 = client("s3")
    result = crash_at(stack, sid, operation, prefix, skip)
    assert result.returncode == -9, result.stdout + result.stderr
    log_key = keys.log_key(APP, sid)
    after_crash = {
        "log": len(log_versions(stack.bucket, log_key)),
        "manifest": len(log_versions(stack.bucket, keys.manifest_key(APP, sid))),
        "index": len(index_objects(stack.bucket, APP)),
        "staged": len(staged_keys(stack.bucket, APP, sid)),
    }
    assert after_crash == {
        "nothing filed": {"log": 0, "manifest": 0, "index": 0, "staged": 5},
        "log and manifest": {"log": 1, "manifest": 1, "index": 0, "staged": 5},
        "log, manifest, index; staging half deleted": {"log": 1, "manifest": 1, "index": 1, "staged": 2},
    }[left]

    # the message becomes visible again and is redelivered
    [filed] = process_message(config, s3_event(stack.bucket, keys.closed_key(APP, sid)), 2)

    [version] = log_versions(stack.bucket, log_key)
    assert filed.log_version_id == version["VersionId"]
    log = read_log(stack.bucket, APP, sid, stack.kms_key_id)
    trailer = json.loads(log.splitlines()[-1])
    assert log == expected_log(session_header(APP, sid), batches, trailer)
    assert trailer["filed_at"] == filed.filed_at
    [index_key] = index_objects(stack.bucket, APP)
    assert len(log_versions(stack.bucket, index_key)) == 1
    entry = json.loads(s3.get_object(Bucket=stack.bucket, Key=index_key)["Body"].read())
    assert (entry["log_version_id"], entry["sha256"], entry["size"]) == (
        version["VersionId"], filed.plaintext_sha256, filed.plaintext_size)
    assert len(log_versions(stack.bucket, keys.manifest_key(APP, sid))) == 1
    manifest = json.loads(s3.get_object(Bucket=stack.bucket, Key=keys.manifest_key(APP, sid))["Body"].read())
    assert {k: manifest[k] for k in filed.to_dict()} == filed.to_dict()
    assert staged_keys(stack.bucket, APP, sid) == []


def test_recovery_reads_the_gaps_from_their_sidecar_when_metadata_cannot_hold_them(config, stack, monkeypatch):
    honour_kms_digest_messages()  # many gaps make the manifest larger than KMS's 4096-byte RAW limit
    monkeypatch.setattr(assemble, "META_MAX_BYTES", 200)
    sid = "MANYGAPS"
    batches = [output_events([f"{i}\r\n"], start=i) for i in range(40)]
    chunks = build_chunks(APP, sid, batches)
    stage(stack.bucket, chunks, skip=range(1, 40, 2))

    class Crash(BaseException):
        pass

    def crash(params, **_):
        if params["Key"].startswith("manifests/"):
            raise Crash

    s3 = client("s3")
    s3.meta.events.register("before-parameter-build.s3.PutObject", crash, unique_id="crash-manifest")
    try:
        with pytest.raises(Crash):
            assemble_session(config, APP, sid, attempt=3)
    finally:
        s3.meta.events.unregister("before-parameter-build.s3.PutObject", unique_id="crash-manifest")
    head = s3.head_object(Bucket=stack.bucket, Key=keys.log_key(APP, sid))
    assert head["Metadata"]["gaps-missing"] == "see-gaps-object"
    sidecar = keys.log_gaps_key(APP, sid, head["Metadata"]["plaintext-sha256"])
    assert json.loads(s3.get_object(Bucket=stack.bucket, Key=sidecar)["Body"].read())["gaps"] == {
        "missing": list(range(1, 40, 2)), "corrupt": []}
    # the recovering run never decrypts: no kms:Decrypt for the assembler
    def no_decrypt(**_):
        raise AssertionError("the assembler called kms:Decrypt")

    client("kms").meta.events.register("before-call.kms.Decrypt", no_decrypt, unique_id="no-decrypt")
    try:
        filed = assemble_session(config, APP, sid, attempt=3)
    finally:
        client("kms").meta.events.unregister("before-call.kms.Decrypt", unique_id="no-decrypt")
    assert filed.gaps == {"missing": list(range(1, 40, 2)), "corrupt": []}
    manifest = json.loads(s3.get_object(Bucket=stack.bucket, Key=keys.manifest_key(APP, sid))["Body"].read())
    assert {k: manifest[k] for k in filed.to_dict()} == filed.to_dict()
    assert staged_keys(stack.bucket, APP, sid) == []


@pytest.mark.parametrize("spool_limit", [0, 3000])
def test_without_local_disk_the_second_pass_reads_staging_again(config, stack, monkeypatch, spool_limit):
    """No spool at all, or a spool that gives up half way: pass 2 re-reads (and re-verifies) the chunks."""
    monkeypatch.setattr(assemble, "new_spool", lambda: Spool(spool_limit))
    sid = f"NOSPOOL{spool_limit}"
    batches = [output_events([f"line {j} of chunk {i}\r\n" for j in range(40)], start=i * 10) for i in range(4)]
    stage(stack.bucket, build_chunks(APP, sid, batches))
    with capture_logs() as logs:
        filed = assemble_session(config, APP, sid)
    assert bool(logs.find("not spooling the log locally; pass 2 reads staging again")) == (spool_limit > 0)
    log = read_log(stack.bucket, APP, sid, stack.kms_key_id)
    assert log == expected_log(session_header(APP, sid), batches, json.loads(log.splitlines()[-1]))
    assert filed.plaintext_size == len(log)


def sqs_record(message_id: str, body: dict | str, receive_count: int = 1) -> dict:
    return {"messageId": message_id, "receiptHandle": "r-" + message_id,
            "body": body if isinstance(body, str) else json.dumps(body),
            "attributes": {"ApproximateReceiveCount": str(receive_count)}, "messageAttributes": {},
            "md5OfBody": "", "eventSource": "aws:sqs", "awsRegion": "us-east-1",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:assembly"}


def test_handler_reports_only_the_failing_messages(stack, lambda_context, capsys):
    handler = load_handler("assembler")
    assemble.metrics.clear_metrics()  # what earlier tests that called assemble_session directly recorded
    good, gappy = "HANDLERGOOD", "HANDLERGAP"
    staged_session(stack, good)
    stage(stack.bucket, build_chunks(APP, gappy, [output_events(["a"]), output_events(["b"])]), skip=[0])
    event = {"Records": [
        sqs_record("m-good", s3_event(stack.bucket, keys.closed_key(APP, good))),
        sqs_record("m-gap", s3_event(stack.bucket, keys.closed_key(APP, gappy))),
        sqs_record("m-test", json.loads(json.loads((EVENTS_DIR / "assembler_sqs_s3_test_event.json").read_text())
                                        ["Records"][0]["body"])),
        sqs_record("m-badkey", json.loads(json.loads((EVENTS_DIR / "assembler_sqs_closed_bad_key.json")
                                                     .read_text())["Records"][0]["body"].replace(
            "oneoff-audit-123456789012-5f2a9c0e4b1d", stack.bucket))),
        sqs_record("m-notjson", "{not json"),
        sqs_record("m-sweep-gone", {"oneoff_audit": "sweep", "app": APP, "session_id": "NEVERSTAGED"}),
    ]}
    with capture_logs() as logs:
        response = handler(event, lambda_context)
    assert response == {"batchItemFailures": [{"itemIdentifier": "m-gap"}, {"itemIdentifier": "m-notjson"}]}
    [retry] = logs.find("message not processed; it will be retried, then dead-lettered", message_id="m-gap")
    assert retry["level"] == "WARNING" and retry["reason"].startswith(f"RetryLaterError: {APP}/{gappy}: gaps")
    [broken] = logs.find("message not processed; it will be retried, then dead-lettered", message_id="m-notjson")
    assert broken["level"] == "ERROR" and broken["reason"].startswith("JSONDecodeError")
    assert logs.find("dropping S3 event for a key outside the staging layout")
    assert logs.find("ignoring s3:TestEvent") and logs.find("dropping sweeper message: nothing to file")
    assert staged_keys(stack.bucket, APP, good) == []
    assert len(staged_keys(stack.bucket, APP, gappy)) == 3
    # the metrics of the invocation, flushed as one CloudWatch embedded-metric-format line
    [emf] = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    names = [m["Name"] for m in emf["_aws"]["CloudWatchMetrics"][0]["Metrics"]]
    assert {"SessionsFiled", "SessionsIncomplete", "SessionsAbandoned", "BytesFiled", "AssemblyDuration"} <= set(names)
    assert (emf["SessionsFiled"], emf["SessionsIncomplete"], emf["SessionsAbandoned"]) == ([1.0], [0.0], [0.0])
    assert emf["BytesFiled"][0] > 0 and emf["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "OneoffAudit"
