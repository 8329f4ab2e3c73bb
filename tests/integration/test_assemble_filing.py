"""Filing over real HTTP (moto server): exact bytes, exactly once, gaps retried then filed as incomplete."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
from urllib.parse import quote_plus

import pytest
from helpers_staging import (
    CORRUPTIONS,
    atomic_moto_conditional_writes,
    build_chunks,
    capture_logs,
    close_marker,
    corrupt_case,
    expected_log,
    index_objects,
    log_versions,
    output_events,
    put,
    read_log,
    session_header,
    stage,
    staged_keys,
    with_bad_chunk,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oneoff_audit import formats, keys
from oneoff_audit.assemble import assemble_session, process_message
from oneoff_audit.aws import client
from oneoff_audit.config import AssemblerConfig
from oneoff_audit.errors import FormatError, RetryLaterError
from oneoff_audit.ids import new_session_id

pytestmark = pytest.mark.integration

APP = "billing.api_v2"


@pytest.fixture
def config(stack) -> AssemblerConfig:
    return AssemblerConfig(bucket=stack.bucket, kms_key_id=stack.kms_key_id, signing_key_id=stack.signing_key_id,
                           max_attempts=3)


def s3_event(bucket: str, key: str) -> dict:
    """The body S3 sends to the queue for a created object (keys arrive URL-encoded)."""
    return {"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                         "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(key), "size": 1}}}]}


def rich_batches() -> list[list[list]]:
    """Three chunks: text, a split multi-byte character, invalid UTF-8, stdin, stderr, resize, marker."""
    first = output_events(["$ ls\r\n", "caf\u00e9 \u20ac\r\n", b"\xe2\x82", b"\xac ok\r\n"])
    second = [[1.5, "i", "ls -l\r"], [1.6, "o", {"b64": "//4="}], [1.7, "e", "warn: \u00fc\n"], [1.8, "r", "120x40"]]
    third = [[2.0, "m", {"kind": "input-withheld", "bytes": 9}], *output_events(["bye\r\n"], start=2.0)]
    return [first, second, third]


def test_filed_log_is_exact_encrypted_indexed_signed_and_staging_is_gone(config, stack):
    sid = "01JDQ4W3ZC8N7R6T5Y4X3W2V1A"
    batches = rich_batches()
    chunks = build_chunks(APP, sid, batches)
    marker = stage(stack.bucket, chunks)
    s3 = client("s3")

    [filed] = process_message(config, s3_event(stack.bucket, keys.closed_key(APP, sid)), 1)

    log = read_log(stack.bucket, APP, sid, stack.kms_key_id)  # also checks the encryption context
    trailer = json.loads(log.splitlines()[-1])
    assert log == expected_log(session_header(APP, sid), batches, trailer)
    assert [kind for kind, _ in formats.iter_log_lines(io.BytesIO(log))][-1] == "trailer"
    assert trailer["bytes"] == marker["bytes"] == {"i": 6, "o": 32, "e": 9}
    assert trailer["events"] == {"i": 1, "o": 7, "e": 1, "r": 1, "m": 1}
    assert trailer["complete"] is True and trailer["chain_sha256"] == chunks.digests[-1]

    head = s3.head_object(Bucket=stack.bucket, Key=filed.log_key)
    stored = s3.get_object(Bucket=stack.bucket, Key=filed.log_key)["Body"].read()
    assert filed.to_dict() == {
        "app": APP, "session_id": sid, "log_key": f"logs/{APP}/{sid}.jsonl.enc",
        "log_version_id": head["VersionId"], "ciphertext_sha256": hashlib.sha256(stored).hexdigest(),
        "ciphertext_size": len(stored), "plaintext_sha256": hashlib.sha256(log).hexdigest(),
        "plaintext_size": len(log), "chain_sha256": chunks.digests[-1], "event_count": 11,
        "bytes": {"i": 6, "o": 32, "e": 9}, "started_at": "2026-11-25T14:46:00.123456Z",
        "ended_at": "2026-11-25T14:47:30.623456Z", "filed_at": trailer["filed_at"], "status": "succeeded",
        "complete": True, "gaps": {"missing": [], "corrupt": []},
    }
    assert head["Metadata"] == {
        "format": "oneoff-audit.log/1", "app": APP, "session-id": sid, "started-at": "2026-11-25T14:46:00.123456Z",
        "ended-at": "2026-11-25T14:47:30.623456Z", "filed-at": trailer["filed_at"], "status": "succeeded",
        "complete": "true", "duration": "90.5", "exit": "0,-", "plaintext-size": str(len(log)),
        "plaintext-sha256": hashlib.sha256(log).hexdigest(), "chain-sha256": chunks.digests[-1],
        "event-count": "11", "events": "i:1,o:7,e:1,r:1,m:1", "bytes": "i:6,o:32,e:9", "chunk-count": "3",
        "expected-chunk-count": "3", "chunk-slots": "3", "close-marker": "true",
        "close-sha256": hashlib.sha256(formats.dumps_line(marker)).hexdigest(), "gaps-missing": "",
        "gaps-corrupt": "",
    }

    [index_key] = index_objects(stack.bucket, APP)
    assert index_key == f"index/{APP}/20261125T144600.123456Z_{sid}.json"
    entry = json.loads(s3.get_object(Bucket=stack.bucket, Key=index_key)["Body"].read())
    opened = session_header(APP, sid)
    assert entry == {
        "format": "oneoff-audit.index", "version": 1, "session_id": sid, "app": APP, "actor": opened["actor"],
        "command": opened["command"], "target": opened["target"], "started_at": opened["started_at"],
        "ended_at": "2026-11-25T14:47:30.623456Z", "duration": 90.5, "exit": {"code": 0, "signal": None},
        "status": "succeeded", "complete": True, "size": len(log), "sha256": hashlib.sha256(log).hexdigest(),
        "ciphertext_size": len(stored), "log_key": filed.log_key, "log_version_id": head["VersionId"],
        "event_count": 11, "filed_at": trailer["filed_at"],
    }
    manifest = json.loads(s3.get_object(Bucket=stack.bucket, Key=keys.manifest_key(APP, sid))["Body"].read())
    assert {k: manifest[k] for k in filed.to_dict()} == filed.to_dict()
    s3.head_object(Bucket=stack.bucket, Key=keys.manifest_key(APP, sid) + ".sig")

    # staging is gone; the bucket is versioned, so the deleted objects stay as noncurrent versions
    assert staged_keys(stack.bucket, APP, sid) == []
    versions = s3.list_object_versions(Bucket=stack.bucket, Prefix=keys.session_prefix(APP, sid))
    assert len(versions["Versions"]) == 5 and len(versions["DeleteMarkers"]) == 5


def test_out_of_order_arrival_close_marker_before_chunks(config, stack):
    sid = "OUTOFORDER1"
    batches = [output_events([f"part {i}\r\n"], start=i) for i in range(4)]
    chunks = build_chunks(APP, sid, batches)
    # opened, then chunks 3 and 0, then the close marker: 1 and 2 are still in flight
    stage(stack.bucket, chunks, order=[3, 0])
    with pytest.raises(RetryLaterError, match=r"missing': '1-2'"):
        process_message(config, s3_event(stack.bucket, keys.closed_key(APP, sid)), 1)
    assert client("s3").list_objects_v2(Bucket=stack.bucket, Prefix="logs/").get("KeyCount") == 0
    for seq in (2, 1):
        put(stack.bucket, keys.chunk_key(APP, sid, seq), chunks.blobs[seq])
    [filed] = process_message(config, s3_event(stack.bucket, keys.closed_key(APP, sid)), 2)
    log = read_log(stack.bucket, APP, sid, stack.kms_key_id)
    assert log == expected_log(session_header(APP, sid), batches, json.loads(log.splitlines()[-1]))
    assert filed.complete is True


def test_duplicate_close_events_file_once(config, stack):
    sid = "DUPLICATE1"
    chunks = build_chunks(APP, sid, rich_batches())
    stage(stack.bucket, chunks)
    event = s3_event(stack.bucket, keys.closed_key(APP, sid))
    first = process_message(config, event, 1)
    log_reads = []

    def count_log_reads(params, **_):
        if params.get("Key") == keys.log_key(APP, sid):
            log_reads.append(params)

    s3 = client("s3")
    s3.meta.events.register("before-parameter-build.s3.GetObject", count_log_reads, unique_id="count-log-reads")
    try:
        with capture_logs() as logs:
            again = process_message(config, event, 1)
            twice = process_message(config, {"Records": event["Records"] * 2}, 3)
    finally:
        s3.meta.events.unregister("before-parameter-build.s3.GetObject", unique_id="count-log-reads")
    assert again == first and twice == first * 2
    assert log_reads == []  # the ciphertext hash comes from the manifest of that version, not a re-read
    assert len(logs.find("log already filed; finishing evidence, index and cleanup", app=APP, session_id=sid)) == 3
    assert len(log_versions(stack.bucket, keys.log_key(APP, sid))) == 1
    [index_key] = index_objects(stack.bucket, APP)
    assert len(log_versions(stack.bucket, index_key)) == 1
    assert len(log_versions(stack.bucket, keys.manifest_key(APP, sid))) == 1


def test_concurrent_assemblers_file_one_log_and_one_index_entry(config, stack, monkeypatch):
    atomic_moto_conditional_writes(monkeypatch)
    sid = "CONCURRENT1"
    texts = [f"row {i:05d} " * 40 + "\r\n" for i in range(3000)]
    batches = [output_events(texts[i::6], start=i * 100, step=0.01) for i in range(6)]
    chunks = build_chunks(APP, sid, batches)
    stage(stack.bucket, chunks)
    barrier = threading.Barrier(3)
    results: list = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(assemble_session(config, APP, sid))
        except Exception as err:  # collected: the assertion below shows it
            results.append(err)

    threads = [threading.Thread(target=run) for _ in range(3)]
    with capture_logs() as logs:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert len(logs.find("log filed", app=APP, session_id=sid)) == 1
    assert len(logs.find("log already filed; finishing evidence, index and cleanup", app=APP, session_id=sid)) == 2
    assert len(results) == 3 and all(r == results[0] for r in results), results
    assert len(log_versions(stack.bucket, keys.log_key(APP, sid))) == 1
    [index_key] = index_objects(stack.bucket, APP)
    assert len(log_versions(stack.bucket, index_key)) == 1
    assert len(log_versions(stack.bucket, keys.manifest_key(APP, sid))) == 1
    assert staged_keys(stack.bucket, APP, sid) == []
    log = read_log(stack.bucket, APP, sid, stack.kms_key_id)
    assert log == expected_log(session_header(APP, sid), batches, json.loads(log.splitlines()[-1]))
    assert results[0].log_version_id == log_versions(stack.bucket, keys.log_key(APP, sid))[0]["VersionId"]


def test_missing_chunk_is_retried_then_filed_incomplete_with_the_exact_gap(config, stack):
    sid = "MISSING1"
    batches = [output_events([f"part {i}\r\n"], start=i) for i in range(4)]
    chunks = build_chunks(APP, sid, batches)
    stage(stack.bucket, chunks, skip=[1])
    before = sorted(staged_keys(stack.bucket, APP, sid))
    for attempt in (1, 2):
        with capture_logs() as logs, pytest.raises(RetryLaterError):
            assemble_session(config, APP, sid, attempt=attempt)
        [line] = logs.find("chunks missing or corrupt: retrying later", app=APP, session_id=sid)
        assert line["level"] == "WARNING" and line["gaps"] == {"missing": "1", "corrupt": []}
        assert (line["attempt"], line["max_attempts"]) == (attempt, 3)
        assert sorted(staged_keys(stack.bucket, APP, sid)) == before  # nothing deleted
    with capture_logs() as logs:
        filed = assemble_session(config, APP, sid, attempt=3)
    [line] = logs.find("log filed", app=APP, session_id=sid)
    assert line["complete"] is False and line["gaps"] == {"missing": "1", "corrupt": []}
    assert filed.complete is False and filed.gaps == {"missing": [1], "corrupt": []}
    log = read_log(stack.bucket, APP, sid, stack.kms_key_id)
    trailer = json.loads(log.splitlines()[-1])
    assert log == expected_log(session_header(APP, sid), [batches[0], None, batches[2], batches[3]], trailer)
    assert trailer["expected_chunk_count"] == 4 and trailer["chunk_count"] == 3
    entry = json.loads(client("s3").get_object(Bucket=stack.bucket, Key=index_objects(stack.bucket, APP)[0])
                       ["Body"].read())
    assert entry["complete"] is False
    assert staged_keys(stack.bucket, APP, sid) == []


@pytest.mark.parametrize("reason", ["sha256-mismatch", *CORRUPTIONS])
def test_corrupt_chunk_is_retried_then_filed_with_its_bytes_preserved(config, stack, reason):
    sid = "CORRUPT" + hashlib.sha256(reason.encode()).hexdigest()[:8].upper()
    batches = [output_events([f"part {i}\r\n"], start=i) for i in range(3)]
    chunks = build_chunks(APP, sid, batches)
    if reason == "sha256-mismatch":  # altered after the runner recorded its hash
        bad = build_chunks(APP, sid, [batches[0], output_events(["forged\r\n"], start=1)]).blobs[1]
        fragment = f"object sha256 {hashlib.sha256(bad).hexdigest()}, close marker says {chunks.digests[1]}"
        blobs, marker = with_bad_chunk(chunks, bad, marker_lists_bad=False)
    else:
        fragment, bad = corrupt_case(chunks, reason)
        blobs, marker = with_bad_chunk(chunks, bad)
    stage(stack.bucket, chunks, closed=marker, replace=blobs)
    before = sorted(staged_keys(stack.bucket, APP, sid))
    with capture_logs() as logs, pytest.raises(RetryLaterError):
        assemble_session(config, APP, sid, attempt=1)
    [line] = logs.find("chunk is corrupt", app=APP, session_id=sid)
    assert line["level"] == "WARNING" and line["seq"] == 1 and line["reason"] == reason
    assert fragment in line["detail"]
    assert sorted(staged_keys(stack.bucket, APP, sid)) == before
    filed = assemble_session(config, APP, sid, attempt=3)
    assert filed.gaps == {"missing": [], "corrupt": [{"seq": 1, "reason": reason}]} and filed.complete is False
    parsed = [json.loads(x) for x in read_log(stack.bucket, APP, sid, stack.kms_key_id).splitlines()]
    markers = [e[2] for e in parsed[1:-1] if e[1] == "m"]
    assert markers[0]["kind"] == "gap" and markers[0]["reason"] == reason and fragment in markers[0]["detail"]
    assert b"".join(base64.b64decode(m["data"]["b64"]) for m in markers[1:]) == bad
    events = [e for e in parsed[1:-1] if e[1] != "m"]
    assert events == [json.loads(formats.dumps_line(e)) for e in batches[0] + batches[2]]
    assert staged_keys(stack.bucket, APP, sid) == []


def test_close_marker_and_header_must_name_the_session(config, stack):
    sid = "NAMES1"
    chunks = build_chunks(APP, sid, rich_batches())
    stage(stack.bucket, chunks, closed=close_marker(chunks, session_id="SOMEONE-ELSE"))
    with pytest.raises(FormatError, match=r"closed\.json: session_id: names session 'SOMEONE-ELSE'"):
        assemble_session(config, APP, sid)
    assert len(staged_keys(stack.bucket, APP, sid)) == 5


@st.composite
def deliveries(draw):
    """How a runner's chunks reached S3: arrival order, duplicate PUTs, and chunks that never arrived."""
    n = draw(st.integers(min_value=1, max_value=5))
    lost = draw(st.sets(st.integers(min_value=0, max_value=n - 1), max_size=n - 1))
    order = draw(st.permutations(range(n)))
    duplicates = draw(st.lists(st.integers(min_value=0, max_value=n - 1), max_size=3))
    close_first = draw(st.booleans())
    return n, lost, [*order, *duplicates], close_first


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(delivery=deliveries())
def test_any_delivery_over_s3_gives_an_exact_or_explicitly_incomplete_log(config, stack, delivery):
    n, lost, order, close_first = delivery
    sid = new_session_id()
    batches = [output_events([f"{sid} part {i} \u00e9\r\n"], start=i) for i in range(n)]
    chunks = build_chunks(APP, sid, batches)
    stage(stack.bucket, chunks, closed=False, order=[])
    if close_first:
        put(stack.bucket, keys.closed_key(APP, sid), json.dumps(close_marker(chunks)).encode())
    for seq in order:
        if seq not in lost:
            put(stack.bucket, keys.chunk_key(APP, sid, seq), chunks.blobs[seq])
    if not close_first:
        put(stack.bucket, keys.closed_key(APP, sid), json.dumps(close_marker(chunks)).encode())
    filed = assemble_session(config, APP, sid, attempt=config.max_attempts)
    log = read_log(stack.bucket, APP, sid, stack.kms_key_id)
    trailer = json.loads(log.splitlines()[-1])
    assert log == expected_log(session_header(APP, sid), [None if s in lost else b for s, b in enumerate(batches)],
                               trailer)
    assert filed.complete is (not lost) and filed.gaps == {"missing": sorted(lost), "corrupt": []}
    assert staged_keys(stack.bucket, APP, sid) == []


def test_objects_outside_the_staging_layout_are_left_and_reported(config, stack):
    sid = "PLANTED1"
    chunks = build_chunks(APP, sid, rich_batches())
    planted = [keys.session_prefix(APP, sid) + "chunks/\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff11.gz",
               keys.session_prefix(APP, sid) + "notes.txt"]
    for key in planted:
        put(stack.bucket, key, chunks.blobs[1])
    stage(stack.bucket, chunks)
    with capture_logs() as logs:
        filed = assemble_session(config, APP, sid)
    assert filed.complete is True and filed.gaps == {"missing": [], "corrupt": []}
    [line] = logs.find("objects outside the staging layout are left in the session's folder", session_id=sid)
    assert line["level"] == "ERROR" and sorted(line["keys"]) == sorted(planted)
    assert sorted(staged_keys(stack.bucket, APP, sid)) == sorted(planted)
