"""The assembler's two passes without S3: verification fixes the log's bytes, rendering produces them.

Chunks come from an in-memory reader that hands out raw bytes in uneven pieces, so piece
boundaries inside gzip members, lines and UTF-8 characters are exercised.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json

import pytest
from helpers_staging import (
    CORRUPTIONS,
    ENDED_AT,
    MemoryReader,
    build_chunks,
    chunk_header,
    close_marker,
    corrupt_case,
    expected_log,
    sample_batches,
    session_header,
    with_bad_chunk,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oneoff_audit import assemble, formats
from oneoff_audit.assemble import Plan, render_log, verify_session
from oneoff_audit.errors import FormatError
from oneoff_audit.staging import StagingChangedError

pytestmark = pytest.mark.unit

APP, SID = "billing.api", "01JDQ4W3ZC8N7R6T5Y4X3W2V1A"
FILED_AT = "2026-11-25T15:00:00.000001Z"


def plan_for(blobs: dict[int, bytes], closed: dict | None, seed: int = 0) -> tuple[Plan, MemoryReader]:
    reader = MemoryReader(blobs, seed, APP, SID)
    plan = verify_session(APP, SID, session_header(APP, SID), closed, reader.staged(), reader, FILED_AT)
    return plan, reader


def render(plan: Plan, reader: MemoryReader) -> bytes:
    return b"".join(render_log(plan, reader))


def lines(log: bytes) -> list:
    return [json.loads(line) for line in log.splitlines()]


def test_complete_session_renders_exactly_the_verified_bytes():
    batches = sample_batches(4)
    chunks = build_chunks(APP, SID, batches)
    closed = close_marker(chunks)
    plan, reader = plan_for(dict(enumerate(chunks.blobs)), closed)
    log = render(plan, reader)
    trailer = lines(log)[-1]
    assert log == expected_log(session_header(APP, SID), batches, trailer)
    assert plan.plaintext_sha256 == hashlib.sha256(log).hexdigest()
    assert plan.plaintext_size == len(log)
    assert trailer == {
        "type": "trailer", "session_id": SID, "app": APP, "ended_at": ENDED_AT,
        "exit": {"code": 0, "signal": None}, "status": "succeeded", "reason": None, "duration": 90.5,
        "bytes": closed["bytes"], "events": {"i": 4, "o": 4 * 5, "e": 0, "r": 4, "m": 0},
        "event_count": chunks.event_count, "chunk_count": 4, "expected_chunk_count": 4,
        "chain_sha256": chunks.digests[-1], "complete": True, "gaps": {"missing": [], "corrupt": []},
        "withheld_input_bytes": 0, "lost_bytes": 0, "filed_at": FILED_AT,
    }
    kinds = [kind for kind, _ in formats.iter_log_lines(io.BytesIO(log))]
    assert kinds == ["header"] + ["event"] * chunks.event_count + ["trailer"]


def test_piece_boundaries_do_not_change_the_log():
    batches = sample_batches(3, per=50)
    chunks = build_chunks(APP, SID, batches)
    closed = close_marker(chunks)
    outputs = set()
    for seed in range(5):
        plan, reader = plan_for(dict(enumerate(chunks.blobs)), closed, seed)
        outputs.add(render(plan, reader).replace(FILED_AT.encode(), b"T"))
    assert len(outputs) == 1


def test_missing_chunk_becomes_an_exact_gap_marker():
    batches = sample_batches(4)
    chunks = build_chunks(APP, SID, batches)
    closed = close_marker(chunks)
    blobs = dict(enumerate(chunks.blobs))
    del blobs[2]
    plan, reader = plan_for(blobs, closed)
    log = render(plan, reader)
    trailer = lines(log)[-1]
    assert log == expected_log(session_header(APP, SID), [batches[0], batches[1], None, batches[3]], trailer)
    assert trailer["complete"] is False
    assert trailer["gaps"] == {"missing": [2], "corrupt": []}
    assert trailer["chunk_count"] == 3 and trailer["expected_chunk_count"] == 4
    assert trailer["chain_sha256"] == chunks.digests[3]
    gap = [e for e in lines(log)[1:-1] if e[1] == "m"]
    assert gap == [[batches[1][-1][0], "m", {"kind": "gap", "seq": 2, "reason": "missing"}]]
    assert trailer["events"]["m"] == 1 and trailer["event_count"] == sum(len(b) for b in batches) - len(batches[2]) + 1
    assert reader.reads.count(2) == 0


@pytest.mark.parametrize("reason", CORRUPTIONS)
def test_corrupt_chunk_is_a_gap_with_its_raw_bytes_preserved(reason):
    batches = sample_batches(3)
    chunks = build_chunks(APP, SID, batches)
    fragment, bad = corrupt_case(chunks, reason)
    blobs, closed = with_bad_chunk(chunks, bad)  # the runner wrote these very bytes
    plan, reader = plan_for(blobs, closed)
    log = render(plan, reader)
    parsed = lines(log)
    trailer = parsed[-1]
    assert trailer["gaps"] == {"missing": [], "corrupt": [{"seq": 1, "reason": reason}]}
    assert trailer["complete"] is False
    markers = [e for e in parsed[1:-1] if e[1] == "m"]
    gap = markers[0][2]
    assert gap["kind"] == "gap" and gap["seq"] == 1 and gap["reason"] == reason
    assert fragment in gap["detail"], gap["detail"]
    assert gap["sha256"] == hashlib.sha256(bad).hexdigest() and gap["size"] == len(bad) and gap["preserved"] is True
    data = [m[2] for m in markers[1:]]
    assert all(d["kind"] == "gap-data" and d["seq"] == 1 for d in data)
    assert [d["offset"] for d in data] == [i * assemble.RAW_PIECE for i in range(len(data))]
    assert b"".join(base64.b64decode(d["data"]["b64"]) for d in data) == bad
    # the chunks around it are there, byte for byte, and the log is valid
    events = [e for e in parsed[1:-1] if e[1] != "m"]
    assert events == [json.loads(formats.dumps_line(e)) for e in batches[0] + batches[2]]
    assert plan.plaintext_sha256 == hashlib.sha256(log).hexdigest()
    list(formats.iter_log_lines(io.BytesIO(log)))


def test_sha256_mismatch_wins_over_content_errors():
    chunks = build_chunks(APP, SID, sample_batches(2))
    closed = close_marker(chunks)
    tampered = gzip.compress(gzip.decompress(chunks.blobs[1]).replace(b"chunk 1", b"chunk X"), mtime=0)
    plan, _ = plan_for({0: chunks.blobs[0], 1: tampered}, closed)
    assert plan.gaps == {"missing": [], "corrupt": [{"seq": 1, "reason": "sha256-mismatch"}]}
    assert plan.slots[1].detail.startswith(f"object sha256 {hashlib.sha256(tampered).hexdigest()}, close marker says")


def test_chunks_beyond_the_close_marker_are_preserved_as_unexpected():
    chunks = build_chunks(APP, SID, sample_batches(3))
    closed = close_marker(build_chunks(APP, SID, chunks.batches[:2]))
    plan, reader = plan_for(dict(enumerate(chunks.blobs)), closed)
    assert plan.gaps == {"missing": [], "corrupt": [{"seq": 2, "reason": "unexpected-chunk"}]}
    assert plan.chunk_slots == 2 and plan.trailer["chain_sha256"] == chunks.digests[1]
    log = render(plan, reader)
    data = [e[2] for e in lines(log)[1:-1] if e[1] == "m" and e[2]["kind"] == "gap-data"]
    assert b"".join(base64.b64decode(d["data"]["b64"]) for d in data) == chunks.blobs[2]


def test_oversized_object_is_not_read(monkeypatch):
    monkeypatch.setattr(assemble, "MAX_CHUNK_OBJECT_BYTES", 100)
    chunks = build_chunks(APP, SID, sample_batches(2, per=20))
    closed = close_marker(chunks)
    plan, reader = plan_for(dict(enumerate(chunks.blobs)), closed)
    assert plan.gaps["corrupt"] == [{"seq": 0, "reason": "too-large"}, {"seq": 1, "reason": "too-large"}]
    assert reader.reads == []
    gap = lines(render(plan, reader))[1][2]
    assert gap["preserved"] is False and gap["sha256"] is None


def test_abandoned_session_without_close_marker():
    batches = sample_batches(4)
    batches[3].append([batches[3][-1][0], "m", {"kind": "input-withheld", "bytes": 12}])
    batches[3].append([batches[3][-1][0] + 1.5, "m", {"kind": "capture-gap", "bytes": 3, "streams": {"o": 3}}])
    chunks = build_chunks(APP, SID, batches)
    blobs = dict(enumerate(chunks.blobs))
    del blobs[1]
    plan, reader = plan_for(blobs, None)
    log = render(plan, reader)
    trailer = lines(log)[-1]
    assert log == expected_log(session_header(APP, SID), [batches[0], None, batches[2], batches[3]], trailer)
    assert {k: trailer[k] for k in ("ended_at", "exit", "status", "reason", "duration", "complete", "gaps",
                                    "expected_chunk_count", "withheld_input_bytes", "lost_bytes")} == {
        "ended_at": None, "exit": {"code": None, "signal": None}, "status": "abandoned",
        "reason": assemble.ABANDONED_REASON, "duration": batches[3][-1][0], "complete": False,
        "gaps": {"missing": [1], "corrupt": []}, "expected_chunk_count": None,
        "withheld_input_bytes": 12, "lost_bytes": 3}
    assert plan.chunk_slots == 4


def test_abandoned_session_with_no_chunks_at_all():
    plan, reader = plan_for({}, None)
    log = render(plan, reader)
    trailer = lines(log)[-1]
    assert len(log.splitlines()) == 2
    assert trailer["status"] == "abandoned" and trailer["duration"] is None and trailer["chunk_count"] == 0
    assert trailer["chain_sha256"] is None and trailer["gaps"] == {"missing": [], "corrupt": []}


def test_chunk_changed_between_passes_is_detected():
    chunks = build_chunks(APP, SID, sample_batches(2))
    plan, reader = plan_for(dict(enumerate(chunks.blobs)), close_marker(chunks))
    reader.blobs[1] = build_chunks(APP, SID, sample_batches(2, per=4)).blobs[1]
    with pytest.raises(StagingChangedError, match="changed while being assembled"):
        render(plan, reader)


def test_metadata_round_trips_ranges_and_fits_s3_limits():
    assert assemble._ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert assemble._unranges("0-2,5,7-8") == [0, 1, 2, 5, 7, 8]
    assert assemble._unranges("") == []
    chunks = build_chunks(APP, SID, sample_batches(3))
    plan, _ = plan_for({0: chunks.blobs[0]}, close_marker(chunks))
    meta = assemble.log_metadata(plan)
    assert meta["gaps-missing"] == "1-2" and meta["gaps-corrupt"] == ""
    assert meta["plaintext-sha256"] == plan.plaintext_sha256 and meta["plaintext-size"] == str(plan.plaintext_size)
    assert meta["events"] == "i:1,o:5,e:0,r:1,m:2" and meta["exit"] == "0,-" and meta["chunk-slots"] == "3"
    assert all(v.isascii() for v in meta.values())
    assert assemble._meta_size(meta) <= assemble.META_MAX_BYTES


@st.composite
def arrivals(draw):
    n = draw(st.integers(min_value=0, max_value=7))
    lost = draw(st.sets(st.integers(min_value=0, max_value=max(n - 1, 0)), max_size=n)) if n else set()
    order = draw(st.permutations(range(n)))
    dups = draw(st.lists(st.integers(min_value=0, max_value=max(n - 1, 0)), max_size=3)) if n else []
    return n, lost, [*order, *dups]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrivals(), st.integers(min_value=0, max_value=2**32 - 1))
def test_any_arrival_order_duplicates_and_losses_give_exact_or_explicitly_incomplete_logs(arrival, seed):
    n, lost, order = arrival
    batches = sample_batches(n, per=2)
    chunks = build_chunks(APP, SID, batches)
    store: dict[int, bytes] = {}
    for seq in order:  # arrival order and duplicate deliveries of the same object
        if seq not in lost:
            store[seq] = chunks.blobs[seq]
    plan, reader = plan_for(store, close_marker(chunks), seed)
    log = render(plan, reader)
    trailer = lines(log)[-1]
    expected_batches = [None if seq in lost else batches[seq] for seq in range(n)]
    assert log == expected_log(session_header(APP, SID), expected_batches, trailer)
    assert trailer["complete"] is (not lost)
    assert trailer["gaps"] == {"missing": sorted(lost), "corrupt": []}
    assert trailer["event_count"] == sum(len(b) for b in expected_batches if b) + len(lost)
    assert plan.plaintext_sha256 == hashlib.sha256(log).hexdigest()


def test_a_stray_chunk_far_beyond_does_not_open_millions_of_gaps():
    batches = sample_batches(2)
    chunks = build_chunks(APP, SID, batches)
    stray = formats.encode_chunk(chunk_header(APP, SID, 99_999_999, 0, None), [[9.0, "o", "?"]])
    plan, _ = plan_for({0: chunks.blobs[0], 1: chunks.blobs[1], 99_999_999: stray}, None)
    assert plan.chunk_slots == 2
    assert plan.gaps == {"missing": [], "corrupt": [{"seq": 99_999_999, "reason": "unexpected-chunk"}]}
    assert "more than 10000 would be missing" in plan.slots[-1].detail


def test_close_marker_with_too_many_chunks_is_refused(monkeypatch):
    monkeypatch.setattr(assemble, "MAX_CHUNK_COUNT", 3)
    chunks = build_chunks(APP, SID, sample_batches(4))
    with pytest.raises(FormatError, match=r"closed\.json: chunk_count: 4 chunks is more than the 3"):
        plan_for(dict(enumerate(chunks.blobs)), close_marker(chunks))


def test_bytes_the_runner_lost_make_the_log_incomplete_without_gaps():
    chunks = build_chunks(APP, SID, sample_batches(2))
    plan, _ = plan_for(dict(enumerate(chunks.blobs)), close_marker(chunks, lost_bytes=4096))
    assert plan.trailer["lost_bytes"] == 4096 and plan.trailer["complete"] is False
    assert not plan.has_gaps  # nothing to wait for: no retry, filed at once
