"""Smaller pieces of the assembler: the fast event check against the reference, the spool, message routing."""

from __future__ import annotations

import gzip
import hashlib
import json

import pytest
from botocore.exceptions import ClientError
from helpers_staging import (
    MemoryReader,
    build_chunks,
    chunk_header,
    close_marker,
    corrupt_case,
    output_events,
    sample_batches,
    session_header,
)
from helpers_staging import with_bad_chunk as bad_session
from hypothesis import given, settings
from hypothesis import strategies as st

from oneoff_audit import assemble, formats
from oneoff_audit.assemble import Spool, describe_failure, process_message, render_log, render_spooled, verify_session
from oneoff_audit.codec import decode_data
from oneoff_audit.config import AssemblerConfig
from oneoff_audit.errors import FormatError
from oneoff_audit.multipart import MIN_PART_SIZE, part_size_for

pytestmark = pytest.mark.unit

APP, SID = "billing.api", "01JDQ4W3ZC8N7R6T5Y4X3W2V1A"
FILED_AT = "2026-11-25T15:00:00.000001Z"
CONFIG = AssemblerConfig(bucket="audit-bucket", kms_key_id="arn:aws:kms:us-east-1:123456789012:key/k")


def check_line(line: bytes) -> tuple[str, dict[str, int]]:
    """Outcome of the assembler's check of one event line: ("ok"|reason, byte counts)."""
    header = formats.dumps_line(chunk_header(APP, SID, 0, 0, None))
    check = assemble._ChunkCheck(APP, SID, 0, "chunk 0", None, 0, hashlib.sha256())
    check.feed(gzip.compress(header + line + b"\n", mtime=0))
    check.finish()
    failure = check.failure
    return ("ok" if failure is None else failure.reason), check.totals.bytes


def reference(line: bytes) -> tuple[str, dict[str, int]]:
    """The same check done by formats.parse_json and formats.check_event."""
    totals = dict.fromkeys(formats.BYTE_STREAMS, 0)
    if len(line) > formats.MAX_LINE_BYTES:
        return "oversized-line", totals
    try:
        event = formats.parse_json(line, "ref")
    except FormatError:
        return "invalid-json", totals
    try:
        formats.check_event(event, "ref")
    except FormatError:
        return "invalid-event", totals
    if event[1] in totals:
        totals[event[1]] += len(decode_data(event[2]))
    return "ok", totals


TIMES = st.sampled_from(["0", "1", "1.5", "0.000001", "-1", "1e999", "-0.0", "NaN", "Infinity", "true", "null",
                         '"1"', "1e2", "12345678901234567890", "01"])
STREAMS = st.sampled_from(['"i"', '"o"', '"e"', '"r"', '"m"', '"x"', "1", '"oo"', '"\\u006f"'])
DATA = st.one_of(
    st.text().map(lambda s: json.dumps(s, ensure_ascii=False)),
    st.text().map(json.dumps),
    st.sampled_from(['"\\ud800"', '"a\\udc80b"', '{"b64": "//4="}', '{"b64": "!!"}', '{"b64": 1}', '{}',
                     '{"kind": "gap", "seq": 1}', '{"kind": ""}', '{"kind": "x", "n": 1e999}', '"80x24"',
                     '"80x"', '"\uff18\uff10x24"', "[]", "null", "3", '{"kind": "x", "s": "\\ud800"}',
                     '{"kind": "x", "d": ' + "[" * 40 + "]" * 40 + "}"]),
)


@settings(max_examples=400, deadline=None)
@given(TIMES, STREAMS, DATA, st.sampled_from(["", " ", "\r", "\t", ",", "]", "x"]), st.booleans())
def test_fast_event_check_agrees_with_the_reference_checks(t, stream, data, suffix, spaced):
    sep = ", " if spaced else ","
    line = f"[{t}{sep}{stream}{sep}{data}]{suffix}".encode("utf-8", "surrogatepass")
    assert check_line(line) == reference(line)


@given(st.binary(max_size=40))
def test_fast_event_check_agrees_on_arbitrary_bytes(raw):
    line = raw.replace(b"\n", b" ")
    assert check_line(line) == reference(line)


def test_oversized_and_non_utf8_lines_are_named_by_line_number():
    assert check_line(b'[1,"o","' + b"a" * formats.MAX_LINE_BYTES + b'"]')[0] == "oversized-line"
    header = formats.dumps_line(chunk_header(APP, SID, 0, 0, None))
    check = assemble._ChunkCheck(APP, SID, 0, "chunk 0", None, 0, hashlib.sha256())
    check.feed(gzip.compress(header + b'[1,"o","a"]\n[2,"o","\xff"]\n', mtime=0))
    check.finish()
    assert (check.failure.reason, check.failure.detail) == ("invalid-json", "line 3: not valid UTF-8")


def test_spooled_and_re_read_second_pass_produce_the_same_bytes():
    batches = sample_batches(5, per=30)
    chunks = build_chunks(APP, SID, batches)
    fragment, bad = corrupt_case(chunks, "invalid-json", seq=2)
    blobs, marker = bad_session(chunks, bad, seq=2)
    del blobs[3]
    reader = MemoryReader(blobs, 0, APP, SID)
    with Spool(1 << 30) as spool:
        plan = verify_session(APP, SID, session_header(APP, SID), marker, reader.staged(), reader, FILED_AT, spool)
        assert spool.usable
        spooled = b"".join(render_spooled(plan, spool))
    assert spooled == b"".join(render_log(plan, reader))
    assert hashlib.sha256(spooled).hexdigest() == plan.plaintext_sha256
    assert plan.gaps == {"missing": [3], "corrupt": [{"seq": 2, "reason": "invalid-json"}]}
    assert fragment in plan.slots[2].detail


def test_spool_gives_up_beyond_its_limit():
    batches = sample_batches(3, per=30)
    chunks = build_chunks(APP, SID, batches)
    reader = MemoryReader(dict(enumerate(chunks.blobs)), 0, APP, SID)
    with Spool(2000) as spool:
        verify_session(APP, SID, session_header(APP, SID), close_marker(chunks), reader.staged(), reader,
                       FILED_AT, spool)
        assert not spool.usable
    assert not Spool(0).usable


def test_part_size_keeps_within_ten_thousand_parts():
    assert part_size_for(1) == MIN_PART_SIZE
    assert part_size_for(10 << 30) == MIN_PART_SIZE
    assert part_size_for(200 << 30) == 21 << 20
    assert part_size_for(200 << 30) * 9_900 >= 200 << 30


def s3_record(key: str, bucket: str = "audit-bucket", event: str = "ObjectCreated:Put") -> dict:
    return {"eventName": event, "s3": {"bucket": {"name": bucket}, "object": {"key": key}}}


@pytest.mark.parametrize("body", [
    {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "audit-bucket"},
    {"Records": [s3_record("staging/app1/S1/closed.json", bucket="another-bucket")]},
    {"Records": [s3_record("staging/app1/S1/chunks/00000000.gz")]},
    {"Records": [s3_record("staging/app1/S1/opened.json")]},
    {"Records": [s3_record("staging/app1/S1/closed.json", event="ObjectRemoved:Delete")]},
    {"Records": [s3_record("staging/app+1/S1/closed.json")]},
    {"Records": [s3_record("staging/app1/..%2F..%2Fx/closed.json")]},
    {"Records": [s3_record("logs/app1/S1.jsonl.enc")]},
    {"oneoff_audit": "sweep", "app": "../x", "session_id": "S1"},
])
def test_messages_that_need_no_assembly_are_dropped_without_touching_aws(body):
    assert process_message(CONFIG, body, 1) == []


@pytest.mark.parametrize("body", [{"hello": "world"}, {"Records": "nope"}, ["not", "an", "object"]])
def test_unknown_messages_fail(body):
    with pytest.raises(FormatError, match="assembly message"):
        process_message(CONFIG, body, 1)


def test_failure_reasons_name_the_aws_error_underneath():
    error = ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}}, "GetObject")
    assert describe_failure(error) == "GetObject: SlowDown: Please reduce your request rate."
    try:
        try:
            raise error
        except ClientError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert describe_failure(outer) == ("RuntimeError: wrapped; caused by GetObject: SlowDown: "
                                           "Please reduce your request rate.")


def test_sweeper_ids_are_validated_before_any_call():
    assert process_message(CONFIG, {"oneoff_audit": "sweep", "app": "app1", "session_id": "a/b"}, 1) == []


def test_output_events_helper_round_trips_bytes():
    events = output_events([b"\xe2\x82", b"\xac"])
    assert b"".join(decode_data(e[2]) for e in events) == "\u20ac".encode()
