"""The sweeper: sessions without a close marker, silent for ABANDON_AFTER, are filed as abandoned."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from helpers_staging import (
    build_chunks,
    capture_logs,
    close_marker,
    expected_log,
    index_objects,
    log_versions,
    output_events,
    put,
    read_log,
    session_header,
    stage,
    staged_keys,
)

from oneoff_audit import formats, keys
from oneoff_audit.assemble import ABANDONED_REASON, UnfiledStagingError, process_message
from oneoff_audit.aws import client
from oneoff_audit.config import AssemblerConfig, SweeperConfig
from oneoff_audit.local import load_handler
from oneoff_audit.sweep import sweep, sweep_message

pytestmark = pytest.mark.integration

APP = "ledger"


@pytest.fixture
def configs(stack) -> tuple[SweeperConfig, AssemblerConfig]:
    return (SweeperConfig(bucket=stack.bucket, queue_url=stack.queue_url, abandon_after=3600),
            AssemblerConfig(bucket=stack.bucket, kms_key_id=stack.kms_key_id, signing_key_id=stack.signing_key_id))


def sweep_messages(queue_url: str) -> list[dict]:
    """Sweeper messages on the queue (the queue also gets S3 events for closed.json), deleted once read."""
    sqs = client("sqs")
    found = []
    while messages := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", []):
        for message in messages:
            body = json.loads(message["Body"])
            if body.get("oneoff_audit") == "sweep":
                found.append(body)
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return found


def test_abandoned_sessions_are_enqueued_and_filed_as_abandoned(configs, stack):
    sweeper, assembler = configs
    now = formats.utc_now()
    died = [output_events([f"working {i}\r\n"], start=i) for i in range(4)]
    died[3].append([3.75, "m", {"kind": "capture-gap", "bytes": 5, "streams": {"o": 5}}])
    stage(stack.bucket, build_chunks(APP, "DIED", died), closed=False, skip=[2])
    put(stack.bucket, keys.opened_key(APP, "NOCHUNKS"), json.dumps(session_header(APP, "NOCHUNKS")).encode())
    closed = build_chunks(APP, "CLOSED", died[:1])
    stage(stack.bucket, closed)
    put(stack.bucket, "staging/not a valid app/x/opened.json", b"{}")

    with capture_logs() as logs:
        assert sweep(sweeper, now=now + timedelta(minutes=30)) == []  # silent for less than ABANDON_AFTER
        found = sweep(sweeper, now=now + timedelta(hours=2))
    assert found == [(APP, "DIED"), (APP, "NOCHUNKS")]
    assert logs.find("ignoring a staging key outside the layout", key="staging/not a valid app/x/opened.json")
    enqueued = logs.find("session abandoned: enqueued for assembly")
    assert [line["session_id"] for line in enqueued] == ["DIED", "NOCHUNKS"]
    messages = sweep_messages(stack.queue_url)
    assert messages == [{"oneoff_audit": "sweep", "app": APP, "session_id": "DIED"},
                        {"oneoff_audit": "sweep", "app": APP, "session_id": "NOCHUNKS"}]

    for message in messages:
        process_message(assembler, message, 1)

    log = read_log(stack.bucket, APP, "DIED", stack.kms_key_id)
    trailer = json.loads(log.splitlines()[-1])
    assert log == expected_log(session_header(APP, "DIED"), [died[0], died[1], None, died[3]], trailer)
    assert {k: trailer[k] for k in ("status", "reason", "ended_at", "exit", "duration", "complete", "gaps",
                                    "expected_chunk_count", "chunk_count", "lost_bytes")} == {
        "status": "abandoned", "reason": ABANDONED_REASON, "ended_at": None, "exit": {"code": None, "signal": None},
        "duration": 3.75, "complete": False, "gaps": {"missing": [2], "corrupt": []},
        "expected_chunk_count": None, "chunk_count": 3, "lost_bytes": 5}
    empty = read_log(stack.bucket, APP, "NOCHUNKS", stack.kms_key_id)
    assert len(empty.splitlines()) == 2 and json.loads(empty.splitlines()[-1])["status"] == "abandoned"
    entries = [json.loads(client("s3").get_object(Bucket=stack.bucket, Key=k)["Body"].read())
               for k in index_objects(stack.bucket, APP)]
    assert sorted((e["session_id"], e["status"], e["ended_at"], e["complete"]) for e in entries) == [
        ("DIED", "abandoned", None, False), ("NOCHUNKS", "abandoned", None, False)]
    assert staged_keys(stack.bucket, APP, "DIED") == staged_keys(stack.bucket, APP, "NOCHUNKS") == []
    assert len(staged_keys(stack.bucket, APP, "CLOSED")) == 3  # closed sessions are the S3 event's business


def test_sweeper_finishes_the_cleanup_of_a_session_filed_by_a_run_that_crashed(configs, stack):
    sweeper, assembler = configs
    sid = "HALFCLEANED"
    stage(stack.bucket, build_chunks(APP, sid, [output_events(["x\r\n"])]))
    process_message(assembler, {"oneoff_audit": "sweep", "app": APP, "session_id": sid}, 1)
    put(stack.bucket, keys.opened_key(APP, sid), json.dumps(session_header(APP, sid)).encode())  # left behind
    assert sweep(sweeper, now=formats.utc_now() + timedelta(hours=2)) == [(APP, sid)]
    with capture_logs() as logs:
        [filed] = process_message(assembler, sweep_messages(stack.queue_url)[0], 1)
    assert logs.find("log already filed; finishing evidence, index and cleanup", session_id=sid)
    assert filed.status == "succeeded"  # it had closed normally; the sweep only finished the cleanup
    assert staged_keys(stack.bucket, APP, sid) == []
    assert len(log_versions(stack.bucket, keys.log_key(APP, sid))) == 1


def test_objects_staged_after_an_abandoned_filing_are_kept_and_the_message_fails(configs, stack):
    _, assembler = configs
    sid = "LATECOMER"
    batches = [output_events([f"{i}\r\n"], start=i) for i in range(3)]
    chunks = build_chunks(APP, sid, batches)
    stage(stack.bucket, chunks, closed=False, skip=[1])
    process_message(assembler, {"oneoff_audit": "sweep", "app": APP, "session_id": sid}, 1)
    # the runner was only slow: its last chunk upload and close marker arrive after the filing
    put(stack.bucket, keys.chunk_key(APP, sid, 1), chunks.blobs[1])
    put(stack.bucket, keys.closed_key(APP, sid), json.dumps(close_marker(chunks)).encode())
    event = {"Records": [{"eventName": "ObjectCreated:Put", "s3": {
        "bucket": {"name": stack.bucket}, "object": {"key": keys.closed_key(APP, sid)}}}]}
    with capture_logs() as logs, pytest.raises(UnfiledStagingError, match="arrived after the log was filed"):
        process_message(assembler, event, 1)  # fails, so the message ends in the dead-letter queue
    [line] = logs.find("staged objects not covered by the filed log are left in staging", session_id=sid)
    late = sorted([keys.chunk_key(APP, sid, 1), keys.closed_key(APP, sid)])
    assert line["level"] == "ERROR" and sorted(line["keys"]) == late
    assert sorted(staged_keys(stack.bucket, APP, sid)) == late  # never deleted
    assert len(log_versions(stack.bucket, keys.log_key(APP, sid))) == 1


def test_sweeper_handler_reads_its_configuration_and_reports(stack, lambda_context, monkeypatch):
    monkeypatch.setenv("ABANDON_AFTER", "600")
    stage(stack.bucket, build_chunks(APP, "FRESH", [output_events(["x"])]), closed=False)
    handler = load_handler("sweeper")
    assert handler({"detail-type": "Scheduled Event", "detail": {}}, lambda_context) == {"enqueued": []}
    assert sweep_message(APP, "S") == '{"oneoff_audit":"sweep","app":"ledger","session_id":"S"}'
