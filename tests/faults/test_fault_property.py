"""PROP-01: through the whole pipeline, any arrival order, duplication and loss: an exact or explicitly incomplete log.

tests/unit/test_assemble_plan.py proves the same of the assembler's plan and render passes with an
in-memory reader. Here each example goes through everything that runs in production: the chunk
objects are PUT to S3 (moto) in a drawn order with drawn duplicate PUTs, some only after the first
assembly attempt (they arrive late); S3 notifies the queue; the close event is delivered once or
more (duplicate SQS deliveries); the real assembler handler files the log through the Encryption
SDK and a multipart upload; the log is read back and decrypted. The filed log must hold exactly the
bytes of every chunk that arrived, in order, and be ``complete: true`` only if nothing was lost,
with ``gaps.missing`` naming exactly the lost sequence numbers; and it must be filed once.
"""

from __future__ import annotations

import json

import helpers_staging as hs
import pytest
from faultkit import Harness
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rows import APP, session_batches

from oneoff_audit import keys
from oneoff_audit.aws import client
from oneoff_audit.ids import new_session_id

pytestmark = [pytest.mark.faults, pytest.mark.integration]


@st.composite
def arrivals(draw: st.DrawFn) -> dict[str, object]:
    """A session of 0..4 chunks: which are lost, which arrive late, in what order, what is PUT twice."""
    n = draw(st.integers(min_value=0, max_value=4))
    seqs = list(range(n))
    lost = draw(st.sets(st.sampled_from(seqs), max_size=n)) if n else set()
    arriving = [s for s in seqs if s not in lost]
    late = draw(st.sets(st.sampled_from(arriving), max_size=len(arriving))) if arriving else set()
    order = draw(st.permutations(arriving))
    duplicates = draw(st.lists(st.sampled_from(arriving), max_size=3)) if arriving else []
    close_deliveries = draw(st.integers(min_value=1, max_value=3))
    return {"n": n, "lost": lost, "late": late, "order": [*order, *duplicates], "close_deliveries": close_deliveries}


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(arrival=arrivals())
def test_pipeline_output_is_byte_exact_or_explicitly_incomplete(harness: Harness, arrival: dict) -> None:
    h = harness
    n, lost, late, order = arrival["n"], arrival["lost"], arrival["late"], arrival["order"]
    sid = new_session_id()
    chunks = hs.build_chunks(APP, sid, session_batches(n, seed=n))
    hs.stage(h.bucket, chunks, order=[s for s in order if s not in late], closed=True)
    first = h.deliver(1)  # attempt 1 of 2: files at once when nothing is missing, else retries later
    gaps_at_first = bool(lost or late)
    assert [failed for _, failed in first] == [gaps_at_first], first
    for _ in range(arrival["close_deliveries"] - 1):  # the same S3 event delivered again
        client("sqs").send_message(QueueUrl=h.stack.queue_url, MessageBody=first[0][0])
    for seq in [s for s in order if s in late]:  # late arrivals (and their duplicate PUTs)
        h.put(keys.chunk_key(APP, sid, seq), chunks.blobs[seq])
    h.deliver(3)
    assert h.queue_messages() == []

    filed = h.filed(APP, sid)
    trailer = filed.trailer
    arrived = set(range(n)) - lost
    account = h.account_staged(chunks, arrived, filed, "PROP-01")
    h.assert_no_loss(account)
    assert trailer["complete"] is (not lost)
    assert trailer["gaps"] == {"missing": sorted(lost), "corrupt": []}
    assert trailer["expected_chunk_count"] == n and trailer["chunk_count"] == len(arrived)
    assert [d["seq"] for d in filed.markers("gap")] == sorted(lost)
    expected = hs.expected_log(hs.session_header(APP, sid), [None if s in lost else chunks.batches[s]
                                                            for s in range(n)], trailer)
    assert filed.plaintext == expected
    h.assert_filed_once(APP, sid)
    assert json.loads(h.s3.get_object(Bucket=h.bucket, Key=keys.manifest_key(APP, sid))["Body"].read())[
        "complete"] is (not lost)
