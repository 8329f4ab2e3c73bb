"""The fault table: one row per attack or failure, its expected outcome, and the check that proves it.

Every row ends in one of three outcomes, never a silent drop: a precise error, a retry that
succeeds, or a session filed ``complete: false`` naming its gaps. Rows that record or stage a
session put its bytes in the ledger (``h.account*``): what the process wrote and read, or what was
staged intact, against what the filed log holds. Row ids are referenced by docs/THREAT_MODEL.md.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import hmac
import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import helpers_staging as hs
import pytest
from faultkit import (
    CLI,
    Filed,
    Harness,
    Recorded,
    SimulatedCrash,
    crash,
    credential_endpoint,
    kms_error,
    s3_error,
    timeout,
)

from oneoff_audit import formats, keys
from oneoff_audit.aws import client
from oneoff_audit.codec import decode_data
from oneoff_audit.errors import OneoffAuditError
from oneoff_audit.ids import new_session_id
from oneoff_audit.local import sqs_batch_event

TEMPLATE = Path(__file__).resolve().parents[2] / "template.yaml"

CATEGORIES = ("infrastructure", "runner", "hostile-runner", "hostile-api", "tampering")


@dataclass(frozen=True)
class Row:
    """One attack or failure."""

    id: str
    category: str
    description: str
    expected: str
    check: Callable[[Harness], None]

    def __str__(self) -> str:
        return self.id


ROWS: list[Row] = []


def row(row_id: str, category: str, description: str, expected: str) -> Callable[[Callable[[Harness], None]], Any]:
    """Register the decorated function as the check of a new row."""
    assert category in CATEGORIES, category

    def register(check: Callable[[Harness], None]) -> Callable[[Harness], None]:
        assert all(r.id != row_id for r in ROWS), f"duplicate row id {row_id}"
        ROWS.append(Row(row_id, category, description, expected, check))
        return check
    return register


# ---------------------------------------------------------------- shared pieces

APP = "app-a"
OTHER_APP = "app-b"


def session_batches(seqs: int, seed: int = 0) -> list[list[list[Any]]]:
    """Event batches for ``seqs`` KB-sized chunks: text, multi-byte text, invalid UTF-8, stdin, stderr, resizes."""
    batches = []
    t = 0.0
    for seq in range(seqs):
        lines = [f"[{seed}] chunk {seq} line {n}: caf\u00e9 \u20ac \U0001f600 {'x' * 40}\r\n".encode()
                 for n in range(12)]
        batch = hs.output_events(lines, start=t, step=0.01)
        t = batch[-1][0]
        batch += hs.output_events([bytes([0xFF, 0xFE, seq % 256, 0x80]), b"ls -la\r"], start=t, step=0.01,
                                  stream="i")
        t = batch[-1][0]
        batch += hs.output_events([f"warn {seq}\n".encode(), b"\xe2\x82"], start=t, step=0.01, stream="e")
        t = round(batch[-1][0] + 0.01, 6)
        batch.append([t, "r", f"{80 + seq}x24"])
        batches.append(batch)
    return batches


def staged(h: Harness, seqs: int = 3, app: str = APP, *, sid: str | None = None, seed: int = 0,
           **stage_kwargs: Any) -> hs.StagedChunks:
    """Build and stage a session (opened, chunks, closed) the way a runner writes it."""
    chunks = hs.build_chunks(app, sid or new_session_id(), session_batches(seqs, seed))
    hs.stage(h.bucket, chunks, **stage_kwargs)
    return chunks


def file_and_account(h: Harness, chunks: hs.StagedChunks, intact: Any = None, *, rounds: int = 1,
                     complete: bool = True) -> Any:
    """Deliver the queue, then check the session was filed once with the expected completeness; ledger it."""
    h.deliver(rounds)
    filed = h.filed(chunks.app, chunks.session_id)
    intact = set(range(len(chunks.blobs))) if intact is None else set(intact)
    account = h.account_staged(chunks, intact, filed)
    h.assert_no_loss(account)
    assert filed.trailer["complete"] is complete, filed.trailer
    h.assert_filed_once(chunks.app, chunks.session_id)
    return filed


def staging_intact(h: Harness, chunks: hs.StagedChunks) -> None:
    """Nothing filed, every staged object still there byte for byte (the bytes are not lost: they wait)."""
    assert not h.is_filed(chunks.app, chunks.session_id)
    for seq, blob in enumerate(chunks.blobs):
        key = keys.chunk_key(chunks.app, chunks.session_id, seq)
        assert h.s3.get_object(Bucket=h.bucket, Key=key)["Body"].read() == blob
    assert h.keys_under(keys.closed_key(chunks.app, chunks.session_id))


def json_body(raw: bytes) -> Any:
    return json.loads(raw) if raw else None


def api_log(body: dict[str, Any]) -> Filed:
    """The inline API answer as a :class:`Filed` (its events are what an auditor reads)."""
    return Filed(b"", body["header"], body["events"], body["trailer"])


# ================================================================ infrastructure faults

@row("INF-02", "infrastructure", "S3 500 InternalError and 503 SlowDown on the assembler's reads "
     "(ListObjectsV2, HeadObject, GetObject of the markers and of every chunk), twice each",
     "botocore retries them; the session is filed once, complete, byte-exact")
def inf_s3_assembler_reads(h: Harness) -> None:
    chunks = staged(h, 3)
    rules = [h.inj.add("s3", op, fault, times=2)
             for op, fault in (("ListObjectsV2", s3_error("InternalError", 500)), ("HeadObject", s3_error()),
                               ("GetObject", s3_error("InternalError", 500)))]
    file_and_account(h, chunks)
    assert all(r.hits == 2 for r in rules), [(r.operation, r.hits) for r in rules]


@row("INF-03", "infrastructure", "S3 faults on the assembler's writes, once each: 500 on CreateMultipartUpload, "
     "UploadPart and the first PUT (the manifest), 503 SlowDown on CompleteMultipartUpload, 503 ServiceUnavailable "
     "on DeleteObjects",
     "botocore retries them; one log version, one manifest, one index entry, staging cleaned")
def inf_s3_assembler_writes(h: Harness) -> None:
    chunks = staged(h, 3)
    faults = {"CreateMultipartUpload": s3_error("InternalError", 500), "UploadPart": s3_error("InternalError", 500),
              "CompleteMultipartUpload": s3_error("SlowDown", 503), "PutObject": s3_error("InternalError", 500),
              "DeleteObjects": s3_error("ServiceUnavailable", 503)}
    rules = [h.inj.add("s3", op, fault, times=1) for op, fault in faults.items()]
    file_and_account(h, chunks)
    assert [r.hits for r in rules] == [1] * len(faults)


@row("INF-04", "infrastructure", "S3 answers 500 to every assembler call for longer than botocore retries",
     "the message is a batch item failure (retried, then dead-lettered with the reason); nothing filed, staging "
     "untouched; when S3 is back the next delivery files the session once, byte-exact")
def inf_s3_assembler_down(h: Harness) -> None:
    chunks = staged(h, 2)
    down = h.inj.add("s3", None, s3_error("InternalError", 500))
    handled = h.deliver(1)
    assert [failed for _, failed in handled] == [True]
    assert down.hits >= 8  # every attempt botocore makes
    h.inj.clear()
    staging_intact(h, chunks)
    assert h.multipart_uploads() == []
    file_and_account(h, chunks)


@row("INF-05", "infrastructure", "S3 faults on the API's calls: 503 SlowDown on the GetObject of the filed log "
     "(twice) and of its manifest; 500 on the timeline's listing (twice) and 503 on an index entry's GetObject",
     "botocore retries them; 200 with the inline log, byte-exact, and the view recorded; 200 with the full "
     "timeline, nothing skipped")
def inf_s3_api_throttled(h: Harness) -> None:
    chunks = staged(h, 2)
    file_and_account(h, chunks)
    log_rule = h.inj.add("s3", "GetObject", s3_error(), times=2, key="/logs/")
    manifest_rule = h.inj.add("s3", "GetObject", s3_error(), times=1, key="/manifests/")
    status, body = h.api_json(f"/apps/{APP}/sessions/{chunks.session_id}/log")
    assert status == 200, body
    assert (log_rule.hits, manifest_rule.hits) == (2, 1)
    h.assert_no_loss(h.account(APP, chunks.session_id, "staged", h.filed(APP, chunks.session_id).stream_bytes(),
                               api_log(body), "as served inline by the API"))
    assert len(h.keys_under(keys.access_prefix(APP, chunks.session_id))) == 1
    listing = h.inj.add("s3", "ListObjectsV2", s3_error("InternalError", 500), times=2, key=f"/{h.bucket}")
    entry = h.inj.add("s3", "GetObject", s3_error(), times=1, key="/index/")
    status, body = h.api_json(f"/apps/{APP}/sessions")
    assert status == 200 and [s["session_id"] for s in body["sessions"]] == [chunks.session_id], body
    assert (listing.hits, entry.hits) == (2, 1) and body["skipped"] == []


@row("INF-06", "infrastructure", "S3 answers 500 to every API call for longer than botocore retries",
     "503 {\"error\": \"unavailable\"} with Retry-After, no traceback, no log bytes in the answer")
def inf_s3_api_down(h: Harness) -> None:
    chunks = staged(h, 1)
    file_and_account(h, chunks)
    h.inj.add("s3", None, s3_error("InternalError", 500))
    status, headers, raw = h.api_get(f"/apps/{APP}/sessions/{chunks.session_id}/log")
    assert status == 503, raw
    assert json_body(raw) == {"error": "unavailable", "message": "storage or key service unavailable, retry later"}
    assert headers.get("Retry-After") == "5"


@row("INF-07", "infrastructure", "the access record of a log view cannot be written (S3 500 on PutObject under "
     "access/, every attempt)",
     "503, and nothing of the log is released: an unrecorded view never happens")
def inf_access_record_fails(h: Harness) -> None:
    chunks = staged(h, 1)
    filed = file_and_account(h, chunks)
    rule = h.inj.add("s3", "PutObject", s3_error("InternalError", 500), key="/access/")
    status, _, raw = h.api_get(f"/apps/{APP}/sessions/{chunks.session_id}/log")
    assert status == 503, raw
    body = json_body(raw)
    assert body["error"] == "unavailable" and "access audit could not record this view" in body["message"]
    assert rule.hits >= 2
    some_output = filed.stream_bytes()["o"][:20]
    assert some_output and some_output not in raw
    h.inj.clear()
    assert h.keys_under(keys.access_prefix(APP, chunks.session_id)) == []


@row("INF-08", "infrastructure", "KMS ThrottlingException on the assembler's GenerateDataKey (twice) and on the "
     "manifest's Sign (once)",
     "retried; the session is filed once, complete, byte-exact, with a signed manifest")
def inf_kms_throttled_assembler(h: Harness) -> None:
    chunks = staged(h, 2)
    gen = h.inj.add("kms", "GenerateDataKey", kms_error("ThrottlingException"), times=2)
    sign = h.inj.add("kms", "Sign", kms_error("ThrottlingException"), times=1)
    file_and_account(h, chunks)
    assert (gen.hits, sign.hits) == (2, 1)
    assert h.keys_under(keys.manifest_key(APP, chunks.session_id) + ".sig")


@row("INF-09", "infrastructure", "KMS KMSInternalException on every GenerateDataKey while the assembler runs",
     "batch item failure: nothing filed, no multipart upload left open, staging untouched; when KMS is back the "
     "next delivery files the session once, byte-exact")
def inf_kms_down_assembler(h: Harness) -> None:
    h.monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the Encryption SDK's KMS client: one retry, not four
    chunks = staged(h, 2)
    rule = h.inj.add("kms", "GenerateDataKey", kms_error("KMSInternalException", 500))
    handled = h.deliver(1)
    assert [failed for _, failed in handled] == [True]
    assert rule.hits >= 2
    h.inj.clear()
    staging_intact(h, chunks)
    assert h.multipart_uploads() == []
    file_and_account(h, chunks)


@row("INF-10", "infrastructure", "KMS ThrottlingException on the API's Decrypt of an inline log (twice)",
     "retried; 200 with the log byte-exact")
def inf_kms_throttled_api(h: Harness) -> None:
    chunks = staged(h, 2)
    file_and_account(h, chunks)
    rule = h.inj.add("kms", "Decrypt", kms_error("ThrottlingException"), times=2)
    status, body = h.api_json(f"/apps/{APP}/sessions/{chunks.session_id}/log")
    assert status == 200, body
    assert rule.hits == 2
    h.assert_no_loss(h.account_staged(chunks, range(2), api_log(body), "as served inline by the API"))


@row("INF-11", "infrastructure", "KMS KMSInternalException on every Decrypt while the API serves a log",
     "503 unavailable with Retry-After (a key-service outage, not a tampered log), nothing released; the "
     "attempt itself is in the access records (they are written before release, alongside decryption)")
def inf_kms_down_api(h: Harness) -> None:
    h.monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    chunks = staged(h, 1)
    file_and_account(h, chunks)
    h.inj.add("kms", "Decrypt", kms_error("KMSInternalException", 500))
    status, headers, raw = h.api_get(f"/apps/{APP}/sessions/{chunks.session_id}/log")
    assert status == 503, raw
    assert json_body(raw)["error"] == "unavailable"
    assert headers.get("Retry-After") == "5"
    assert set(json_body(raw)) == {"error", "message"}  # nothing of the log is released
    assert len(h.keys_under(keys.access_prefix(APP, chunks.session_id))) <= 1  # at most the recorded attempt


@row("INF-12", "infrastructure", "a read timeout in the middle of the multipart upload (UploadPart and "
     "CompleteMultipartUpload each time out once)",
     "the requests are retried; one log version, complete, byte-exact; no multipart upload left open")
def inf_timeout_mid_upload(h: Harness) -> None:
    chunks = staged(h, 3)
    part = h.inj.add("s3", "UploadPart", timeout(), times=1)
    done = h.inj.add("s3", "CompleteMultipartUpload", timeout(), times=1)
    file_and_account(h, chunks)
    assert (part.hits, done.hits) == (1, 1)
    assert h.multipart_uploads() == []


@row("INF-13", "infrastructure", "the assembler is killed (Lambda timeout: SIGKILL, no cleanup) while its "
     "multipart upload is open",
     "no log exists after the kill (a log is created only by the conditional completion); the redelivered "
     "message files it once, byte-exact; the orphaned upload is left to the bucket's AbortIncompleteMultipartUpload "
     "lifecycle rule")
def inf_lambda_killed_mid_upload(h: Harness) -> None:
    chunks = staged(h, 3)
    sqs = client("sqs")
    arn = sqs.get_queue_attributes(QueueUrl=h.stack.queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    messages = h.queue_messages()
    assert len(messages) == 1
    event, ready = h.tmp / "event.json", h.tmp / "ready"
    event.write_text(json.dumps(sqs_batch_event(messages, arn)))
    child = subprocess.Popen([sys.executable, str(Path(__file__).with_name("assembler_child.py")), str(event),
                              str(ready)], env={**h.stack.env(), "FAULT_HANG_ON": "UploadPart"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), f"the child never reached UploadPart (exit {child.poll()})"
    child.send_signal(signal.SIGKILL)
    assert child.wait(10) == -signal.SIGKILL
    assert len(h.multipart_uploads()) == 1  # what a killed Lambda leaves behind
    assert not h.is_filed(APP, chunks.session_id)
    staging_intact(h, chunks)
    sqs.change_message_visibility(QueueUrl=h.stack.queue_url, ReceiptHandle=messages[0]["ReceiptHandle"],
                                  VisibilityTimeout=0)  # the visibility timeout of the killed invocation ends
    file_and_account(h, chunks)
    assert "AbortIncompleteMultipartUpload" in TEMPLATE.read_text()


@row("INF-14", "infrastructure", "the same closed.json event delivered twice, one delivery after the other",
     "the second finds the log filed and finishes idempotently: one log version, one manifest, one index entry")
def inf_sqs_duplicate(h: Harness) -> None:
    chunks = staged(h, 2)
    (message,) = h.queue_messages()
    client("sqs").send_message(QueueUrl=h.stack.queue_url, MessageBody=message["Body"])
    client("sqs").change_message_visibility(QueueUrl=h.stack.queue_url, ReceiptHandle=message["ReceiptHandle"],
                                            VisibilityTimeout=0)
    first, second = h.queue_messages()
    handled = h.deliver(1, messages=[first]) + h.deliver(1, messages=[second])
    assert [failed for _, failed in handled] == [False, False]
    file_and_account(h, chunks, rounds=0)


@row("INF-15", "infrastructure", "the same closed.json event handled by two assemblers at the same time (both "
     "pass the 'already filed?' check together, then race to complete the upload)",
     "one wins the If-None-Match completion, the other finds the log and finishes: one log version, one manifest, "
     "one index entry, staging cleaned, both report success (conditional writes are serialized as S3 does; moto's "
     "own check-then-write is not atomic)")
def inf_sqs_concurrent(h: Harness) -> None:
    from oneoff_audit.assemble import process_message

    chunks = staged(h, 3)
    (message,) = h.queue_messages()
    body = json.loads(message["Body"])
    barrier = threading.Barrier(2, timeout=30)
    h.inj.add("s3", "HeadObject", lambda request: (barrier.wait(), None)[1], times=2, key="/logs/")
    h.inj.serialize_conditional_writes()
    config = h.assembler_config()
    results: list[Any] = [None, None]

    def run(n: int) -> None:
        try:
            results[n] = process_message(config, body, 1)
        except Exception as err:
            results[n] = err

    threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(isinstance(r, list) and len(r) == 1 for r in results), results
    assert results[0][0].log_version_id == results[1][0].log_version_id
    client("sqs").delete_message(QueueUrl=h.stack.queue_url, ReceiptHandle=message["ReceiptHandle"])
    file_and_account(h, chunks, rounds=0)


def _crash_between(h: Harness, operation: str, key: str, after: int = 0) -> None:
    chunks = staged(h, 3)
    rule = h.inj.add("s3", operation, crash(f"{operation} {key}"), times=1, key=key, after=after)
    handled = h.deliver(1)
    assert [failed for _, failed in handled] == [True] and rule.hits == 1
    assert isinstance(h.handler_errors[-1], SimulatedCrash)
    h.inj.clear()
    file_and_account(h, chunks)


@row("INF-16", "infrastructure", "the assembler dies after the log is completed, before the manifest is written",
     "the redelivery finds the log, writes the manifest, index entry and cleans up: nothing twice, nothing lost")
def inf_crash_log_manifest(h: Harness) -> None:
    _crash_between(h, "PutObject", "/manifests/")


@row("INF-17", "infrastructure", "the assembler dies after the manifest and its signature, before the index entry",
     "the redelivery rebuilds the same manifest (byte-identical, so write-once accepts it), writes the index "
     "entry and cleans up")
def inf_crash_manifest_index(h: Harness) -> None:
    _crash_between(h, "PutObject", "/index/")


@row("INF-18", "infrastructure", "the assembler dies after the index entry, before deleting staging",
     "the redelivery finds log, manifest and index entry, and only cleans up: one index entry")
def inf_crash_index_delete(h: Harness) -> None:
    _crash_between(h, "DeleteObjects", "/", after=0)


@row("INF-19", "infrastructure", "the assembler dies in the middle of the cleanup (chunks deleted, close marker "
     "and header not yet)",
     "the redelivery finishes the cleanup; the filed log still holds every byte")
def inf_crash_mid_delete(h: Harness) -> None:
    _crash_between(h, "DeleteObjects", "/", after=1)


# ================================================================ hostile runner input

def rechain(chunks: hs.StagedChunks, seq: int, blob: bytes | None = None, **header: Any) -> hs.StagedChunks:
    """A copy of ``chunks`` whose chunk ``seq`` is ``blob`` or has a forged header, the rest re-chained after it.

    Only that one lie remains: every later chunk names the hash of the object before it, as a runner
    that wrote the lie itself would do.
    """
    forged = hs.StagedChunks(chunks.app, chunks.session_id, chunks.batches, list(chunks.blobs))
    if blob is not None:
        forged.blobs[seq] = blob
    for n in range(seq + (blob is not None), len(forged.blobs)):
        prev = formats.sha256_hex(forged.blobs[n - 1]) if n else None
        first = sum(len(b) for b in forged.batches[:n])
        values = hs.chunk_header(chunks.app, chunks.session_id, n, first, prev)
        if n == seq:
            values.update(header)
        forged.blobs[n] = formats.encode_chunk(values, forged.batches[n])
    return forged


def filed_incomplete(h: Harness, chunks: hs.StagedChunks, intact: set[int], *, missing: tuple[int, ...] = (),
                     corrupt: dict[int, str] | None = None, first_is_retry: bool = True) -> Filed:
    """First delivery: retry later (gaps may still fill), staging untouched; last attempt: filed incomplete."""
    first = h.deliver(1)
    assert [failed for _, failed in first] == [first_is_retry], first
    if first_is_retry:
        assert not h.is_filed(chunks.app, chunks.session_id)
    h.deliver(1)
    filed = h.filed(chunks.app, chunks.session_id)
    gaps = filed.trailer["gaps"]
    assert filed.trailer["complete"] is False
    assert gaps["missing"] == list(missing), gaps
    assert {g["seq"]: g["reason"] for g in gaps["corrupt"]} == (corrupt or {}), gaps
    h.assert_no_loss(h.account_staged(chunks, intact, filed))
    assert [d["seq"] for d in filed.markers("gap")] == sorted([*missing, *(corrupt or {})])
    return filed


def preserved(filed: Filed, seq: int, blob: bytes) -> None:
    """A corrupt chunk's object bytes are kept in the log as gap-data markers, never as events."""
    data = b"".join(decode_data(d["data"]) for d in filed.markers("gap-data") if d["seq"] == seq)
    assert data == blob


def refused(h: Harness, app: str, sid: str, text: str) -> None:
    """The session's message fails with an error naming the problem; nothing is filed."""
    from oneoff_audit.assemble import assemble_session

    with pytest.raises(OneoffAuditError) as err:
        assemble_session(h.assembler_config(), app, sid)
    assert text in str(err.value), str(err.value)
    handled = h.deliver(8)  # every receive fails, until the redrive policy moves the message away
    assert handled and all(failed for _, failed in handled), handled
    assert h.queue_messages() == []
    dead = h.queue_messages(h.stack.dlq_url)
    assert [json.loads(m["Body"])["Records"][0]["s3"]["object"]["key"] for m in dead] == \
        [quote(keys.closed_key(app, sid), safe="")]
    assert not h.is_filed(app, sid)


@row("HRI-01", "hostile-runner", "a runner (any app: the runner policy allows all of staging/) plants an extra "
     "chunk object in another app's live session, past the close marker's chunk count",
     "filed complete: false with gaps.corrupt [{seq: 3, reason: unexpected-chunk}]; every genuine byte is in the log; "
     "the planted bytes appear only as gap-data evidence, never as events")
def hri_plant_in_other_app(h: Harness) -> None:
    chunks = staged(h, 3)
    planted = formats.encode_chunk(hs.chunk_header(OTHER_APP, "ATTACKER", 3, 0, None),
                                   hs.output_events([b"rm -rf /\r\n"]))
    h.put(keys.chunk_key(APP, chunks.session_id, 3), planted)
    filed = filed_incomplete(h, chunks, {0, 1, 2}, corrupt={3: "unexpected-chunk"}, first_is_retry=True)
    preserved(filed, 3, planted)


@row("HRI-02", "hostile-runner", "a chunk whose header names another session (forged session id), otherwise "
     "valid and listed with its true SHA-256 in the close marker",
     "filed complete: false with gaps.corrupt [{seq: 1, reason: wrong-session}]; its bytes are not taken as events")
def hri_forged_session_id(h: Harness) -> None:
    chunks = rechain(hs.build_chunks(APP, new_session_id(), session_batches(3)), 1, session_id="01OTHERSESSION")
    hs.stage(h.bucket, chunks)
    filed = filed_incomplete(h, chunks, {0, 2}, corrupt={1: "wrong-session"})
    preserved(filed, 1, chunks.blobs[1])


@row("HRI-03", "hostile-runner", "a replayed old chunk: chunk 0 of an earlier, filed session of the same app "
     "PUT over chunk 1 of a live session",
     "the close marker's SHA-256 does not match: retry later, then filed complete: false with gaps.corrupt "
     "[{seq: 1, reason: sha256-mismatch}]; the genuine chunk 1 stays as a noncurrent object version")
def hri_replayed_chunk(h: Harness) -> None:
    old = staged(h, 1, seed=7)
    h.deliver(1)
    assert h.is_filed(APP, old.session_id)
    chunks = hs.build_chunks(APP, new_session_id(), session_batches(3))
    hs.stage(h.bucket, chunks, replace={1: old.blobs[0]})
    filed = filed_incomplete(h, chunks, {0, 2}, corrupt={1: "sha256-mismatch"})
    preserved(filed, 1, old.blobs[0])


@row("HRI-04", "hostile-runner", "chunk objects 1 and 2 swapped (reordered sequence numbers)",
     "filed complete: false with gaps.corrupt [{1: sha256-mismatch}, {2: sha256-mismatch}]; chunk 0 intact")
def hri_reordered(h: Harness) -> None:
    chunks = hs.build_chunks(APP, new_session_id(), session_batches(3))
    hs.stage(h.bucket, chunks, replace={1: chunks.blobs[2], 2: chunks.blobs[1]})
    filed_incomplete(h, chunks, {0}, corrupt={1: "sha256-mismatch", 2: "sha256-mismatch"})


@row("HRI-05", "hostile-runner", "a duplicated sequence number: the runner's own close marker lists chunk 1's "
     "object twice, as chunk 1 and as chunk 2 (header seq 1 under key seq 2)",
     "filed complete: false with gaps.corrupt [{seq: 2, reason: wrong-seq}]: no event is filed twice")
def hri_duplicated_seq(h: Harness) -> None:
    chunks = hs.build_chunks(APP, new_session_id(), session_batches(3))
    duplicated = hs.StagedChunks(APP, chunks.session_id, chunks.batches, [chunks.blobs[0], chunks.blobs[1],
                                                                         chunks.blobs[1]])
    hs.stage(h.bucket, duplicated)
    filed_incomplete(h, chunks, {0, 1}, corrupt={2: "wrong-seq"})


@row("HRI-06", "hostile-runner", "a close marker that lies about chunk 1's SHA-256 (every chunk genuine)",
     "first delivery: retry later, staging untouched; last attempt: filed complete: false with gaps.corrupt "
     "[{seq: 1, reason: sha256-mismatch}, {seq: 2, reason: broken-chain}] (chunk 2 links to the object, not to the "
     "marker's digest: the evidence conflicts), both preserved as gap-data")
def hri_lying_digest(h: Harness) -> None:
    chunks = hs.build_chunks(APP, new_session_id(), session_batches(3))
    marker = hs.close_marker(chunks)
    marker["chunk_sha256"][1] = "0" * 64
    hs.stage(h.bucket, chunks, closed=marker)
    filed = filed_incomplete(h, chunks, {0}, corrupt={1: "sha256-mismatch", 2: "broken-chain"})
    preserved(filed, 1, chunks.blobs[1])
    preserved(filed, 2, chunks.blobs[2])


@row("HRI-07", "hostile-runner", "a close marker that lies about the chunk count (5 chunks listed, 3 staged)",
     "filed complete: false with gaps.missing [3, 4] and expected_chunk_count 5")
def hri_lying_count(h: Harness) -> None:
    chunks = hs.build_chunks(APP, new_session_id(), session_batches(3))
    marker = hs.close_marker(chunks)
    marker["chunk_count"] = 5
    marker["chunk_sha256"] += ["1" * 64, "2" * 64]
    hs.stage(h.bucket, chunks, closed=marker)
    filed = filed_incomplete(h, chunks, {0, 1, 2}, missing=[3, 4])
    assert filed.trailer["expected_chunk_count"] == 5


@row("HRI-08", "hostile-runner", "a chunk holding one JSON line of 1.5 MiB (over the 1 MiB line cap)",
     "filed complete: false with gaps.corrupt [{seq: 1, reason: oversized-line}]; the line is not parsed")
def hri_giant_line(h: Harness) -> None:
    batches = session_batches(3)
    batches[1] = [[0.5, "o", "x" * (3 << 19)]]
    chunks = hs.build_chunks(APP, new_session_id(), batches)
    hs.stage(h.bucket, chunks)
    filed = filed_incomplete(h, chunks, {0, 2}, corrupt={1: "oversized-line"})
    preserved(filed, 1, chunks.blobs[1])


@row("HRI-09", "hostile-runner", "deeply nested JSON: opened.json whose target nests 5000 levels, and a chunk "
     "event nesting 100 levels",
     "the header is refused with 'nested deeper than 32 levels' (every delivery fails, the redrive policy moves "
     "the message to the dead-letter queue, nothing filed); the nested event alone makes its chunk corrupt "
     "(invalid-json)")
def hri_deep_json(h: Harness) -> None:
    sid = new_session_id()
    hs.stage(h.bucket, hs.build_chunks(APP, sid, session_batches(1)))
    h.put(keys.opened_key(APP, sid), b'{"format":"oneoff-audit.session","target":' + b"[" * 5000 + b"]" * 5000 + b"}")
    refused(h, APP, sid, "nested deeper than 32 levels")
    nested = {"kind": "note", "v": json.loads("[" * 100 + "]" * 100)}
    deep = hs.build_chunks(APP, new_session_id(), [session_batches(1)[0], [[1.0, "m", nested]]])
    hs.stage(h.bucket, deep)
    filed_incomplete(h, deep, {0}, corrupt={1: "invalid-json"})


@row("HRI-10", "hostile-runner", "invalid UTF-8 in metadata: opened.json whose actor name holds the bytes FF FE",
     "refused with 'not valid UTF-8 at byte N' naming opened.json; nothing filed; the message is dead-lettered")
def hri_bad_utf8_metadata(h: Harness) -> None:
    sid = new_session_id()
    chunks = hs.build_chunks(APP, sid, session_batches(1))
    hs.stage(h.bucket, chunks)
    raw = json.dumps(hs.session_header(APP, sid)).encode().replace(b'"Ada"', b'"Ad\xff\xfe"')
    h.put(keys.opened_key(APP, sid), raw)
    refused(h, APP, sid, f"not valid UTF-8 at byte {raw.index(bytes([0xFF]))}")


_BOMB: dict[str, bytes] = {}


def gzip_bomb(app: str, session_id: str, seq: int, prev: str, first_event_index: int) -> bytes:
    """A well-formed chunk that inflates past the 64 MiB cap (65 event lines of 1 MiB zeros, under 1 MiB of gzip)."""
    key = f"{app}/{session_id}/{seq}/{prev}/{first_event_index}"
    if key not in _BOMB:
        packer = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # one gzip member, fast
        parts = [packer.compress(formats.dumps_line(hs.chunk_header(app, session_id, seq, first_event_index, prev)))]
        line = b'[0,"o","' + b"0" * ((1 << 20) - 16) + b'"]\n'
        parts += [packer.compress(line) for _ in range(65)]
        _BOMB[key] = b"".join([*parts, packer.flush()])
    return _BOMB[key]


@row("HRI-11", "hostile-runner", "a gzip bomb as chunk 1: a well-formed chunk of 65 one-MiB event lines (under "
     "1 MiB of gzip), chained and listed with its true SHA-256 (ASSEMBLE_MAX_ATTEMPTS 1: filed at once)",
     "decompression stops at the 64 MiB cap: filed complete: false with gaps.corrupt [{seq: 1, reason: gzip-bomb}], "
     "its object preserved as gap-data, chunks 0 and 2 intact")
def hri_gzip_bomb(h: Harness) -> None:
    chunks = hs.build_chunks(APP, new_session_id(), session_batches(3))
    bomb = gzip_bomb(APP, chunks.session_id, 1, formats.sha256_hex(chunks.blobs[0]), len(chunks.batches[0]))
    assert len(bomb) < 1 << 20  # over 64 MiB from well under 1 MiB
    chunks = rechain(chunks, 1, blob=bomb)
    hs.stage(h.bucket, chunks)
    h.monkeypatch.setenv("ASSEMBLE_MAX_ATTEMPTS", "1")  # inflating 64 MiB once is enough
    filed = filed_incomplete(h, chunks, {0, 2}, corrupt={1: "gzip-bomb"}, first_is_retry=False)
    preserved(filed, 1, bomb)


def _hostile_keys(h: Harness, hostile: list[str], markers: list[str]) -> None:
    """PUT close markers at hostile keys beside a genuine session; none may lead to any S3 read or write.

    ``markers``: strings that only the hostile keys contain; no S3 request may mention one.
    """
    genuine = staged(h, 2)
    for key in hostile:
        h.put(key, json.dumps(hs.close_marker(genuine)).encode())
    calls = h.inj.count("s3")
    handled = h.deliver(1)
    assert len(handled) == len(hostile) + 1 and not any(failed for _, failed in handled), handled
    touched = [r for r in calls.requests if any(marker in r for marker in markers)]
    assert touched == [], touched  # nothing was read, written or deleted for the hostile keys
    file_and_account(h, genuine, rounds=0)
    for prefix in (keys.LOGS_PREFIX, keys.INDEX_PREFIX, keys.MANIFESTS_PREFIX):
        assert all(genuine.session_id in k for k in h.keys_under(prefix))
    assert sorted(h.keys_under(keys.DEFAULT_STAGING_PREFIX)) == sorted(hostile)  # left as they are, not filed


@row("HRI-12", "hostile-runner", "close markers at keys with '..': staging/app-a/../app-b/S/closed.json, "
     "staging/app-a/S/../../logs/app-a/S/closed.json, staging/../logs/app-a/closed.json",
     "each S3 event is dropped before any S3 call with an error log naming the key; nothing is written outside "
     "staging; the genuine session in the same batch is filed")
def hri_dotdot_keys(h: Harness) -> None:
    sid = new_session_id()
    _hostile_keys(h, [f"staging/{APP}/../{OTHER_APP}/{sid}/closed.json",
                      f"staging/{APP}/{sid}/../../logs/{APP}/{sid}/closed.json",
                      "staging/../logs/app-a/closed.json"], [sid, "/../", "logs/app-a/closed"])


@row("HRI-13", "hostile-runner", "close markers at keys with percent-escapes and '+': literal '%2F' "
     "(staging/app-a%2F..%2Fapp-b/S/closed.json, staging/app-a/S%2Fclosed.json), '%252F', and 'app+a'",
     "the event key is decoded exactly once (S3 events are URL-encoded): every one is an invalid id, dropped "
     "before any S3 call; the genuine session is filed")
def hri_percent_keys(h: Harness) -> None:
    sid = new_session_id()
    _hostile_keys(h, [f"staging/{APP}%2F..%2F{OTHER_APP}/{sid}/closed.json",
                      f"staging/{APP}/{sid}%2Fclosed.json",
                      f"staging/{APP}%252F{sid}/x/closed.json",
                      f"staging/app+a/{sid}/closed.json"], [sid, "app+a", "app a"])


@row("HRI-14", "hostile-runner", "unicode look-alikes: a close marker under an app id with a Cyrillic a (U+0430) "
     "and one with a fullwidth a (U+FF41); a chunk named with fullwidth digits (U+FF10..U+FF11) planted in a "
     "genuine session",
     "the look-alike sessions are dropped before any S3 call; the fullwidth chunk is not taken as chunk 1: the "
     "genuine session is filed complete from its real chunks and the planted object is left in staging, reported")
def hri_lookalike_keys(h: Harness) -> None:
    sid = new_session_id()
    _hostile_keys(h, [f"staging/\u0430pp-a/{sid}/closed.json", f"staging/\uff41pp-a/{sid}/closed.json"], [sid])
    chunks = hs.build_chunks(APP, new_session_id(), session_batches(2))
    planted = keys.session_prefix(APP, chunks.session_id) + "chunks/\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff11.gz"
    h.put(planted, formats.encode_chunk(hs.chunk_header(APP, chunks.session_id, 1, 0, None),
                                        hs.output_events([b"forged\r\n"])))
    hs.stage(h.bucket, chunks)
    handled = h.deliver(1)
    filed = h.filed(APP, chunks.session_id)
    assert filed.trailer["complete"] is True and filed.trailer["chunk_count"] == 2
    h.assert_no_loss(h.account_staged(chunks, {0, 1}, filed))
    # Not a chunk name, so it belongs to no log: left where it is (and reported in an error log line).
    assert [failed for _, failed in handled] == [False], handled
    assert h.keys_under(keys.session_prefix(APP, chunks.session_id)) == [planted]


@row("HRI-15", "hostile-runner", "a close marker replayed (PUT again, same bytes) after its session was filed "
     "and staging cleaned",
     "the assembler finds the log filed: no second log version, no second index entry or manifest; the replayed "
     "marker is cleaned up")
def hri_replayed_close(h: Harness) -> None:
    chunks = staged(h, 2)
    file_and_account(h, chunks)
    h.put(keys.closed_key(APP, chunks.session_id), json.dumps(hs.close_marker(chunks)).encode())
    handled = h.deliver(1)
    assert [failed for _, failed in handled] == [False]
    h.assert_filed_once(APP, chunks.session_id)


@row("HRI-16", "hostile-runner", "a runner writes a session into another app's staging prefix whose opened.json "
     "names its own app (staging/app-b/S/ with header app 'app-a')",
     "refused with \"names app 'app-a', not 'app-b'\"; filed under neither app; the message is dead-lettered")
def hri_cross_app_header(h: Harness) -> None:
    sid = new_session_id()
    chunks = hs.build_chunks(OTHER_APP, sid, session_batches(1))
    hs.stage(h.bucket, chunks, opened=hs.session_header(APP, sid))
    refused(h, OTHER_APP, sid, "names app 'app-a', not 'app-b'")
    assert not h.is_filed(APP, sid)


# ================================================================ runner faults (the real agent)

ALL_BYTES = bytes(range(256))
TEXT = "caf\u00e9 \u20ac \U0001f600 ok\r\n".encode()


def output_steps(n: int, pause: float, size: int = 300) -> list[tuple[Any, ...]]:
    """``n`` rounds of stdout and stderr writes (every byte value, split UTF-8) with pauses between them."""
    steps: list[tuple[Any, ...]] = []
    for k in range(n):
        steps += [("o", ALL_BYTES + TEXT[:5]), ("o", TEXT[5:] + f" round {k} ".encode() + b"y" * size),
                  ("e", f"stderr {k}\n".encode() + ALL_BYTES[::-1])]
        if pause:
            steps.append(("sleep", pause))
    return steps


def file_recorded(h: Harness, rec: Any, *, complete: bool = True, stdin: bytes = b"") -> Filed:
    """Deliver the recorded session's close event; compare what the process wrote and read with the log."""
    h.deliver(1)
    filed = h.filed(rec.app, rec.session_id)
    expected = {"i": stdin, "o": rec.wrote["o"], "e": rec.wrote["e"]}
    account = h.account(rec.app, rec.session_id, "process", expected, filed)
    h.assert_no_loss(account)
    assert filed.trailer["complete"] is complete, filed.trailer
    h.assert_filed_once(rec.app, rec.session_id)
    return filed


@row("INF-01", "infrastructure", "S3 throttles and fails the capture agent's PUTs: 503 SlowDown on opened.json "
     "and on the first two chunk PUTs, 500 on the close marker; the agent makes one attempt per call",
     "the agent backs off and retries without blocking the command; every chunk arrives in order, the close "
     "marker last; the session is filed complete and byte-exact (stdin, stdout, stderr)")
def inf_s3_agent(h: Harness) -> None:
    proxy = h.proxy()
    proxy.add("503", "PUT", "/opened.json", times=1)
    proxy.add("503", "PUT", "/chunks/", times=2)
    proxy.add("500", "PUT", "/closed.json", times=1)
    stdin = ALL_BYTES + TEXT
    rec = h.record(APP, output_steps(3, 0.1), stdin=stdin, via_proxy=True)
    assert rec.returncode == 0, rec.stderr
    assert rec.stderr == rec.wrote["e"], rec.stderr[-600:]  # the agent adds nothing of its own to stderr
    assert sum(r.hits for r in proxy.rules) == 4
    file_recorded(h, rec, stdin=stdin)


def staged_stream_bytes(h: Harness, app: str, sid: str) -> dict[str, bytes]:
    """The bytes per stream of the chunks staged so far for a session (read the way the assembler does)."""
    out = {s: bytearray() for s in ("i", "o", "e")}
    prefix = keys.session_prefix(app, sid) + keys.CHUNKS_DIR
    for key in sorted(h.keys_under(prefix)):
        _, events = formats.read_chunk(h.s3.get_object(Bucket=h.bucket, Key=key)["Body"].read(), key)
        for _, stream, data in events:
            if stream in out:
                out[stream] += decode_data(data)
    return {s: bytes(v) for s, v in out.items()}


@row("RUN-01", "runner", "the capture agent is SIGKILLed mid-session (after its last chunk was flushed, while the "
     "command is still running)",
     "no close marker; the sweeper finds the session after ABANDON_AFTER and the assembler files it as "
     "status abandoned, complete: false, expected_chunk_count null, with every byte the flushed chunks hold")
def run_agent_sigkilled(h: Harness) -> None:
    def kill_when_flushed(proc: subprocess.Popen[bytes]) -> None:
        assert h.last_work is not None
        done = h.last_work / "wrote.mark.burst-done"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if done.exists():
                wrote = {name: (h.last_work / f"wrote.{name}").read_bytes() for name in ("o", "e")}
                staged_now = staged_stream_bytes(h, APP, sid)
                if all(staged_now[name] == wrote[name] for name in ("o", "e")):
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("the agent never flushed what the command wrote")
        os.kill(proc.pid, signal.SIGKILL)

    sid = new_session_id()
    rec = h.record(APP, [*output_steps(3, 0.1), ("mark", "burst-done"), ("sleep", 2.0), ("o", b"after the kill\n")],
                   session_id=sid, kill_after=kill_when_flushed)
    assert rec.returncode == -signal.SIGKILL
    assert h.keys_under(keys.closed_key(APP, sid)) == []
    assert h.sweep(after=60) == []  # not yet abandoned
    assert h.sweep(after=3601) == [(APP, sid)]
    h.deliver(1)
    filed = h.filed(APP, sid)
    t = filed.trailer
    assert (t["status"], t["complete"], t["expected_chunk_count"], t["ended_at"]) == ("abandoned", False, None, None)
    wrote_before_kill = {"i": b"", "o": rec.wrote["o"].removesuffix(b"after the kill\n"), "e": rec.wrote["e"]}
    h.assert_no_loss(h.account(APP, sid, "process", wrote_before_kill, filed,
                               "bytes written before the kill (the write after it hit a dead pipe)"))
    h.assert_filed_once(APP, sid)


@row("RUN-02", "runner", "the runner's network is cut (every connection to S3 dropped) for 1.5 s, longer than "
     "seven chunk intervals of 0.2 s, while the command writes",
     "the agent keeps relaying, retries with backoff, and when the network is back every chunk arrives in order: "
     "filed complete, byte-exact")
def run_network_cut(h: Harness) -> None:
    proxy = h.proxy()
    sid = new_session_id()

    def cut() -> None:
        proxy.add("cut")
        timer = threading.Timer(1.5, proxy.clear)
        timer.start()
        h.on_stop(timer.cancel)

    h.when(lambda: bool(h.keys_under(keys.opened_key(APP, sid))), cut)
    stdin = TEXT * 3
    rec = h.record(APP, output_steps(5, 0.2), stdin=stdin, via_proxy=True, session_id=sid)
    assert rec.returncode == 0, rec.stderr
    assert sum("/chunks/" in r for r in proxy.refused) >= 2, proxy.refused
    file_recorded(h, rec, stdin=stdin)


def _spool_full(h: Harness, policy: str) -> tuple[Recorded, Filed, str]:
    """S3 refuses chunk PUTs while the command writes incompressible output; the spool is a 64 KiB tmpfs."""
    spool, how = h.small_spool("64k")
    proxy = h.proxy()
    proxy.add("cut", "PUT", "/chunks/")
    bursts = [("o", os.urandom(16 << 10)) for _ in range(6)]
    steps: list[tuple[Any, ...]] = []
    for burst in bursts:
        steps += [burst, ("sleep", 0.2)]
    steps += [("mark", "bursts-done"), ("sleep", 1.0), ("o", b"after S3 came back\n"), ("e", b"bye\n")]
    if policy == "continue":
        h.when(lambda: h.last_work is not None and (h.last_work / "wrote.mark.bursts-done").exists(), proxy.clear)
    else:
        h.when(lambda: h.last_work is not None and (h.last_work / "agent.log").exists()
               and b"ending the session" in (h.last_work / "agent.log").read_bytes(), proxy.clear)
    rec = h.record(APP, steps, via_proxy=True, spool_dir=spool,
                   options=("--queue-bytes", "1K", "--on-capture-failure", policy))
    h.deliver(1)
    return rec, h.filed(APP, rec.session_id), how


def _capture_gap_declared(h: Harness, rec: Recorded, filed: Filed, how: str) -> int:
    gaps = filed.markers("capture-gap")
    lost = sum(g["bytes"] for g in gaps)
    assert gaps and lost > 0, filed.trailer
    assert filed.trailer["lost_bytes"] == lost
    account = h.account(APP, rec.session_id, "process", {"i": b"", "o": rec.wrote["o"], "e": rec.wrote["e"]},
                        filed, f"spool: {how}")
    h.assert_no_loss(account)  # every byte not in the log is declared by a capture-gap marker
    return lost


def _not_complete(filed: Filed) -> None:
    t = filed.trailer
    assert t["complete"] is False, (f"lost_bytes {t['lost_bytes']} but filed complete: true (gaps {t['gaps']}): the "
                                    "timeline's 'incomplete' filter and the SessionsIncomplete alarm miss it")


@row("RUN-03", "runner", "the spool disk is full (a 64 KiB tmpfs) while S3 refuses every chunk, "
     "--on-capture-failure continue",
     "the session runs to its end (exit 0); the agent says once on stderr that recording failed; a capture-gap "
     "marker carries the exact lost byte count per stream, the close marker and trailer say lost_bytes, and the "
     "session is filed complete: false; every other byte is in the log")
def run_spool_full_continue(h: Harness) -> None:
    rec, filed, how = _spool_full(h, "continue")
    assert rec.returncode == 0
    agent_said = rec.stderr.removeprefix(rec.wrote["e"]) if rec.stderr.startswith(rec.wrote["e"]) else rec.stderr
    assert b"recording failed" in rec.stderr and rec.stderr.count(b"recording failed") == 1, agent_said
    _capture_gap_declared(h, rec, filed, how)
    assert filed.trailer["status"] == "succeeded"
    _not_complete(filed)


@row("RUN-04", "runner", "the spool disk is full (a 64 KiB tmpfs) while S3 refuses every chunk, "
     "--on-capture-failure terminate",
     "the agent ends the command (SIGHUP, then SIGKILL) as soon as a chunk cannot be stored; the close marker "
     "and trailer say status killed and why; the lost bytes are declared by a capture-gap marker")
def run_spool_full_terminate(h: Harness) -> None:
    rec, filed, how = _spool_full(h, "terminate")
    assert rec.returncode in (128 + signal.SIGHUP, 128 + signal.SIGKILL), rec.returncode
    assert b"after S3 came back" not in rec.wrote["o"]  # the command did not get to run on unrecorded
    t = filed.trailer
    assert t["status"] == "killed" and "terminated by oneoff-audit: recording failed" in (t["reason"] or ""), t
    assert b"ending the session" in rec.stderr
    _capture_gap_declared(h, rec, filed, how)
    _not_complete(filed)


# ---------------------------------------------------------------- runner clocks and late chunks

@row("RUN-05", "runner", "the runner's wall clock jumps back during the session: the close marker's ended_at is "
     "an hour before the header's started_at (event offsets come from the monotonic clock and stay ordered)",
     "filed complete and byte-exact with the times as the runner reported them and duration clamped to 0 (never "
     "negative); the timeline and session details serve it")
def run_clock_back(h: Harness) -> None:
    chunks = hs.build_chunks(APP, new_session_id(), session_batches(2))
    hs.stage(h.bucket, chunks, closed=hs.close_marker(chunks, ended_at="2026-11-25T13:46:00.123456Z"))
    filed = file_and_account(h, chunks)
    assert filed.trailer["ended_at"] == "2026-11-25T13:46:00.123456Z" and filed.trailer["duration"] == 0
    status, body = h.api_json(f"/apps/{APP}/sessions")
    assert status == 200 and [s["session_id"] for s in body["sessions"]] == [chunks.session_id], body
    status, body = h.api_json(f"/apps/{APP}/sessions/{chunks.session_id}")
    assert status == 200 and body["trailer"]["duration"] == 0, body


@row("RUN-06", "runner", "runner clocks far off: one session started_at 2099-01-01 (clock far ahead), one at "
     "1999-01-01 (clock far behind), beside a session of today",
     "all three filed; the timeline lists them newest first by their reported start (2099, today, 1999) without "
     "losing any, and time-window filters select them by that start")
def run_clock_far_off(h: Harness) -> None:
    sessions = []
    for started in ("2099-01-01T00:00:00.000000Z", hs.STARTED_AT, "1999-01-01T00:00:00.000000Z"):
        chunks = hs.build_chunks(APP, new_session_id(), session_batches(1))
        hs.stage(h.bucket, chunks, opened=hs.session_header(APP, chunks.session_id, started_at=started),
                 closed=hs.close_marker(chunks, ended_at=started))
        sessions.append(chunks)
    h.deliver(1)
    for chunks in sessions:
        h.assert_no_loss(h.account_staged(chunks, {0}, h.filed(APP, chunks.session_id)))
        h.assert_filed_once(APP, chunks.session_id)
    status, body = h.api_json(f"/apps/{APP}/sessions")
    assert status == 200 and [s["session_id"] for s in body["sessions"]] == [c.session_id for c in sessions], body
    status, body = h.api_json(f"/apps/{APP}/sessions?from=2000-01-01T00:00:00Z&to=2098-01-01T00:00:00Z")
    assert status == 200 and [s["session_id"] for s in body["sessions"]] == [sessions[1].session_id], body


@row("RUN-07", "runner", "chunks arrive after their session was filed: the runner was partitioned longer than "
     "ABANDON_AFTER, the sweeper filed what existed as abandoned, then chunk 2 and the real close marker arrive",
     "the late bytes are not dropped silently: they are filed (a later filing names them) or the message fails "
     "and is dead-lettered with the reason (so the DeadLetterQueueNotEmpty alarm fires) -- never deleted, never "
     "left to expire with the staging lifecycle rule while the message succeeds")
def run_late_chunks(h: Harness) -> None:
    chunks = hs.build_chunks(APP, new_session_id(), session_batches(3))
    hs.stage(h.bucket, chunks, closed=False, skip=[2])
    assert h.sweep(after=3601) == [(APP, chunks.session_id)]
    h.deliver(1)
    first = h.filed(APP, chunks.session_id)
    assert (first.trailer["status"], first.trailer["complete"]) == ("abandoned", False)
    h.put(keys.chunk_key(APP, chunks.session_id, 2), chunks.blobs[2])
    h.put(keys.closed_key(APP, chunks.session_id), json.dumps(hs.close_marker(chunks)).encode())
    handled = h.deliver(1)
    versions = h.versions(keys.log_key(APP, chunks.session_id))
    later = [h.filed(APP, chunks.session_id, v["VersionId"]) for v in versions]
    late_bytes = b"".join(decode_data(d) for _, stream, d in chunks.batches[2] if stream == "o")
    in_a_log = any(late_bytes in f.stream_bytes()["o"] for f in later)
    dead_lettered = all(failed for _, failed in handled)
    left = h.keys_under(keys.session_prefix(APP, chunks.session_id))
    if not dead_lettered:  # the run says it is done: every byte the runner staged must be in the filed log(s)
        newest = h.filed(APP, chunks.session_id)
        h.account_staged(chunks, {0, 1, 2}, newest, "late chunk 2 in no log; left in staging until it expires")
    assert in_a_log or dead_lettered, (
        f"late chunk 2 is in no filed log, the message succeeded ({handled!r}), and staging holds {left}: "
        "nothing will ever file these bytes and the staging lifecycle rule will delete them")
    if not in_a_log:  # then the late objects must stay put and the message must reach the dead-letter queue
        assert keys.chunk_key(APP, chunks.session_id, 2) in left and keys.closed_key(APP, chunks.session_id) in left
        h.deliver(8)
        assert h.queue_messages() == [] and len(h.queue_messages(h.stack.dlq_url)) == 1
        assert h.s3.get_object(Bucket=h.bucket, Key=keys.chunk_key(APP, chunks.session_id, 2))[
            "Body"].read() == chunks.blobs[2]


# ================================================================ hostile API callers

UNAUTHORIZED = {"error": "unauthorized"}


def no_s3(h: Harness, calls: Any) -> None:
    assert calls.requests == [], f"S3 was called before the request was refused: {calls.requests}"


@row("API-01", "hostile-api", "no identity: requests without an Authorization header, with an empty bearer, with "
     "a Basic scheme, and with identity-looking headers (X-Amzn-Oidc-Identity, X-Forwarded-User)",
     "401 {\"error\": \"unauthorized\"} on every route before any S3 call")
def api_no_identity(h: Harness) -> None:
    sid = new_session_id()
    calls = h.inj.count("s3")
    for path in (f"/apps/{APP}/sessions", f"/apps/{APP}/sessions/{sid}", f"/apps/{APP}/sessions/{sid}/log",
                 f"/apps/{APP}/sessions/{sid}/access"):
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Basic dG9rLWE6"},
                        {"X-Amzn-Oidc-Identity": "auditor-a", "X-Forwarded-User": "auditor-a"}):
            status, _, raw = h.api_get(path, token=None, headers=headers)
            assert status == 401 and json_body(raw)["error"] == "unauthorized", (path, headers, raw)
    no_s3(h, calls)


@row("API-02", "hostile-api", "forged or broken identity: a bearer token the authorizer does not know, claims "
     "without a subject, a blank subject",
     "401 for each, naming what is missing, before any S3 call")
def api_forged_identity(h: Harness) -> None:
    calls = h.inj.count("s3")
    for token, text in (("tok-forged", "did not pass an authorizer"), ("tok-a.forged", "did not pass an authorizer"),
                        ("TOK-A", "did not pass an authorizer"), ("tok-nosub", "no subject"),
                        ("tok-blanksub", "no subject")):
        status, _, raw = h.api_get(f"/apps/{APP}/sessions", token=token)
        body = json_body(raw)
        assert status == 401 and body["error"] == "unauthorized" and text in body["message"], (token, raw)
    no_s3(h, calls)


@row("API-03", "hostile-api", "another app's ids: a caller of app-a reads app-b's timeline, session, log and "
     "access list; callers whose claim says 'app-*', 'app' or a list with look-alikes",
     "403 {\"error\": \"forbidden\"}, byte-identical before and after app-b has a filed session (existence is not "
     "revealed), before any S3 call")
def api_other_app(h: Harness) -> None:
    sid = new_session_id()
    paths = [f"/apps/{OTHER_APP}/sessions", f"/apps/{OTHER_APP}/sessions/{sid}",
             f"/apps/{OTHER_APP}/sessions/{sid}/log", f"/apps/{OTHER_APP}/sessions/{sid}/access"]
    calls = h.inj.count("s3")
    before = [h.api_get(p, "tok-a") for p in paths]
    no_s3(h, calls)
    chunks = staged(h, 1, app=OTHER_APP, sid=sid)
    file_and_account(h, chunks)
    h.inj.clear()
    calls = h.inj.count("s3")
    after = [h.api_get(p, "tok-a") for p in paths]
    for (s1, _, b1), (s2, _, b2) in zip(before, after, strict=True):
        assert (s1, b1) == (s2, b2) and s1 == 403 and json_body(b1)["error"] == "forbidden", (b1, b2)
    for token in ("tok-glob", "tok-list"):
        status, _, raw = h.api_get(f"/apps/{APP}/sessions/{sid}/log", token)
        assert status == 403, (token, raw)
    no_s3(h, calls)
    status, _ = h.api_json(f"/apps/{OTHER_APP}/sessions/{sid}/log", "tok-b")  # the right caller still reads it
    assert status == 200


@row("API-04", "hostile-api", "path traversal and look-alikes in ids: '..', '%2E%2E', '..%2F..%2Flogs', NUL, "
     "fullwidth digits, a Cyrillic letter, upper case, 200-character ids",
     "400 {\"error\": \"bad_request\"} naming the id (or 404 'no such route' when the path no longer has the route's "
     "shape), before any S3 call and before the identity is even looked at")
def api_path_traversal(h: Harness) -> None:
    sid = new_session_id()
    bad_ids = {
        f"/apps/{APP}/sessions/..": 400, f"/apps/{APP}/sessions/%2E%2E/log": 400, "/apps/%2E%2E/sessions": 400,
        f"/apps/{APP}/sessions/{sid}%00/log": 404, f"/apps/{APP}/sessions/{sid[:-1]}%EF%BC%91": 400,
        f"/apps/%D0%B0pp-a/sessions/{sid}": 400, "/apps/APP-A/sessions": 400, f"/apps/{'a' * 200}/sessions": 400,
        f"/apps/{APP}/sessions/{'S' * 200}/log": 400, f"/apps/{APP}/sessions/{sid}..x": 400,
        f"/apps/..%2F{OTHER_APP}/sessions": 404, f"/apps/{APP}/sessions/..%2F..%2Flogs%2F{OTHER_APP}%2F{sid}": 404,
        f"/apps/{APP}/sessions/{sid}/..%2F..%2F..%2F{OTHER_APP}/sessions": 404,
    }
    calls = h.inj.count("s3")
    for path, expected in bad_ids.items():
        for token in ("tok-all", None):
            status, _, raw = h.api_get(path, token)
            body = json_body(raw)
            assert status == expected, (path, token, status, raw)
            assert body["error"] == ("bad_request" if expected == 400 else "not_found"), (path, raw)
            assert "Traceback" not in raw.decode(), raw
            if expected == 400:
                assert "invalid app id" in body["message"] or "invalid session id" in body["message"], body
    no_s3(h, calls)


@row("API-05", "hostile-api", "oversized, repeated and unknown query parameters: actor of 2000 characters, "
     "limit given twice, an unknown parameter, a 100 KB URL",
     "400 naming the parameter ('longer than 1024 characters', 'given more than once', 'unknown parameter'); "
     "the 100 KB URL is refused by the HTTP layer with 414 before the function runs; no S3 call")
def api_oversized_query(h: Harness) -> None:
    base = f"/apps/{APP}/sessions"
    calls = h.inj.count("s3")
    for query, field, text in ((f"actor={'x' * 2000}", "actor", "longer than 1024 characters"),
                               ("limit=1&limit=2", "limit", "given more than once"),
                               ("debug=1", "debug", "unknown parameter"),
                               (f"cursor={'A' * 1100}", "cursor", "longer than 1024 characters")):
        status, _, raw = h.api_get(f"{base}?{query}", "tok-all")
        body = json_body(raw)
        assert status == 400 and body["message"].startswith(f"query: {field}: ") and text in body["message"], raw
    invoked = h.api().requests
    status, _, _ = h.api_get(f"{base}?actor={'y' * 100_000}", "tok-all")
    assert status == 414 and h.api().requests == invoked
    no_s3(h, calls)


@row("API-06", "hostile-api", "malformed query values: limit 0, 201, -1, 1.5, an Arabic-Indic digit; from "
     "'yesterday', a time with an offset, from after to; status 'bogus' and empty; format 'html' on the log route",
     "400 naming the parameter for each; no S3 call")
def api_malformed_query(h: Harness) -> None:
    sid = new_session_id()
    calls = h.inj.count("s3")
    cases = [("limit=0", "limit"), ("limit=201", "limit"), ("limit=-1", "limit"), ("limit=1.5", "limit"),
             ("limit=%D9%A3", "limit"), ("from=yesterday", "from"), ("from=2026-11-25T00:00:00%2B01:00", "from"),
             ("from=2026-11-25T00:00:00Z&to=2026-11-24T00:00:00Z", "from"), ("status=bogus", "status"),
             ("status=", "status"), ("to=2026-13-01T00:00:00Z", "to")]
    for query, field in cases:
        status, _, raw = h.api_get(f"/apps/{APP}/sessions?{query}", "tok-all")
        assert status == 400 and json_body(raw)["message"].startswith(f"query: {field}"), (query, raw)
    status, _, raw = h.api_get(f"/apps/{APP}/sessions/{sid}/log?format=html", "tok-all")
    assert status == 400 and json_body(raw)["message"].startswith("query: format"), raw
    no_s3(h, calls)


@row("API-07", "hostile-api", "cursor tampering: another app's cursor, a cursor naming a key with '../', padded, "
     "re-ordered JSON, garbage, and one edited into another valid position of the same app",
     "400 'belongs to another app' / 'malformed' / 'not in canonical form' for each tampered cursor; an edited but "
     "well-formed cursor only moves within the caller's own app; the genuine cursors page through every session "
     "exactly once")
def api_cursor_tampering(h: Harness) -> None:
    from oneoff_audit.api.timeline import encode_cursor

    sessions: list[hs.StagedChunks] = []
    for n in range(3):
        sid = new_session_id()
        chunks = hs.build_chunks(APP, sid, session_batches(1))
        hs.stage(h.bucket, chunks, opened=hs.session_header(APP, sid, started_at=f"2026-11-25T1{n}:00:00.000000Z"))
        sessions.append(chunks)
    h.deliver(1)
    seen, cursor = [], None
    while True:
        status, body = h.api_json(f"/apps/{APP}/sessions?limit=1" + (f"&cursor={cursor}" if cursor else ""), "tok-all")
        assert status == 200, body
        seen += [s["session_id"] for s in body["sessions"]]
        cursor = body["cursor"]
        if cursor is None:
            break
        genuine = cursor
    assert seen == [c.session_id for c in reversed(sessions)]
    raw = json.loads(base64.urlsafe_b64decode(genuine + "=" * (-len(genuine) % 4)))
    name = raw["before"]

    def b64(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    tampered = {
        encode_cursor(OTHER_APP, name): "belongs to another app",
        encode_cursor(APP, "../" + name): "malformed",
        genuine + "==": "malformed",
        b64(json.dumps({"v": 1, "before": name, "app": APP})): "not in canonical form",
        b64(json.dumps({"app": APP, "before": name, "v": 1, "admin": True}, sort_keys=True)): "malformed",
        "!!!garbage": "malformed",
        "A" * 600: "malformed",
    }
    calls = h.inj.count("s3")
    for token, text in tampered.items():
        status, _, raw_body = h.api_get(f"/apps/{APP}/sessions?cursor={quote(token)}", "tok-all")
        body = json_body(raw_body)
        assert status == 400 and body["message"].startswith("query: cursor") and text in body["message"], (token, body)
    no_s3(h, calls)
    moved = encode_cursor(APP, name.replace("20261125T11", "20261125T12"))
    status, body = h.api_json(f"/apps/{APP}/sessions?cursor={moved}", "tok-all")
    assert status == 200 and {s["app"] for s in body["sessions"]} <= {APP}, body


def _sigv4_signature(url: str, secret: str) -> tuple[str, str]:
    """(signature in the URL, signature recomputed over the URL's method, path, query and host)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = dict(query)["X-Amz-Signature"]
    canonical_query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                               for k, v in sorted(query) if k != "X-Amz-Signature")
    canonical = "\n".join(["GET", parts.path, canonical_query, f"host:{parts.netloc}", "", "host",
                           "UNSIGNED-PAYLOAD"])
    params = dict(query)
    date, scope = params["X-Amz-Date"], params["X-Amz-Credential"].split("/", 1)[1]
    to_sign = "\n".join(["AWS4-HMAC-SHA256", date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return given, hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def _presigned(h: Harness, sid: str) -> tuple[dict[str, Any], dict[str, str]]:
    status, body = h.api_json(f"/apps/{APP}/sessions/{sid}/log")
    assert status == 200 and set(body) == {"download_url", "expires_in", "size", "sha256", "encryption"}, body
    return body, dict(parse_qsl(urlsplit(body["download_url"]).query))


@row("API-08", "hostile-api", "presigned URLs (INLINE_MAX_BYTES 0, PRESIGN_TTL 3600): their expiry, their key "
     "scope, reuse for another object, and replay after expiry",
     "expires_in = X-Amz-Expires = 900 (PRESIGN_TTL capped); the URL names exactly logs/app-a/<session>.jsonl.enc "
     "and the filed versionId, signs only the host header, and its SigV4 signature covers path, version and "
     "expiry (any edit yields a signature S3 refuses); fetched within its life it returns exactly the stored "
     "object; the issue of the URL is an access record")
def api_presigned_scope(h: Harness) -> None:
    h.monkeypatch.setenv("INLINE_MAX_BYTES", "0")
    h.monkeypatch.setenv("PRESIGN_TTL", "3600")
    chunks = staged(h, 1)
    file_and_account(h, chunks)
    log_key = keys.log_key(APP, chunks.session_id)
    (version,) = h.versions(log_key)
    before = time.time()
    body, params = _presigned(h, chunks.session_id)
    url = body["download_url"]
    assert body["expires_in"] == 900 and params["X-Amz-Expires"] == "900"
    signed_at = datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    assert before - 5 <= signed_at <= time.time() + 5
    assert urlsplit(url).path == f"/{h.bucket}/{log_key}" and params["versionId"] == version["VersionId"]
    assert params["X-Amz-SignedHeaders"] == "host" and params["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert params["X-Amz-Credential"].endswith("/us-east-1/s3/aws4_request")
    given, recomputed = _sigv4_signature(url, os.environ["AWS_SECRET_ACCESS_KEY"])
    assert given == recomputed
    edits = (url.replace(chunks.session_id, new_session_id()), url.replace("X-Amz-Expires=900", "X-Amz-Expires=99999"),
             url.replace(params["versionId"], "null"))
    for edit in edits:
        assert _sigv4_signature(edit, os.environ["AWS_SECRET_ACCESS_KEY"])[1] != given  # S3 refuses the edit
    with urllib.request.urlopen(url, timeout=30) as response:
        data = response.read()
    stored = h.s3.get_object(Bucket=h.bucket, Key=log_key, VersionId=version["VersionId"])["Body"].read()
    assert data == stored and hashlib.sha256(data).hexdigest() == body["sha256"] and len(data) == body["size"]
    records = [json.loads(h.s3.get_object(Bucket=h.bucket, Key=k)["Body"].read())
               for k in h.keys_under(keys.access_prefix(APP, chunks.session_id))]
    assert [(r["how"], r["expires_in"], r["who"]["subject"]) for r in records] == [("url", 900, "auditor-a")]
    # Expiry is enforced by S3 from X-Amz-Date + X-Amz-Expires (moto does not check it): a replay after
    # signed_at + 900 s is refused by AWS. The URL carries nothing that could extend it.
    assert signed_at + int(params["X-Amz-Expires"]) <= time.time() + 905


@row("API-09", "hostile-api", "presigned URL signed with credentials that expire sooner than PRESIGN_TTL (the API's "
     "credentials come from a container endpoint and expire in 300 s)",
     "expires_in <= 300 and equal to X-Amz-Expires: a URL never outlives the credentials that signed it")
def api_presigned_credential_expiry(h: Harness) -> None:
    h.monkeypatch.setenv("INLINE_MAX_BYTES", "0")
    h.monkeypatch.setenv("PRESIGN_TTL", "900")
    chunks = staged(h, 1)
    file_and_account(h, chunks)
    server = credential_endpoint(300)
    h.on_stop(server.shutdown)
    # The container credentials hold only for this block: clients are cached per environment, so the
    # clients built here are never served to anything after it (the endpoint stops with the row).
    with h.monkeypatch.context() as scoped:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            scoped.delenv(name, raising=False)
        scoped.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://127.0.0.1:{server.server_address[1]}/creds")
        body, params = _presigned(h, chunks.session_id)
    assert 0 < body["expires_in"] <= 300 and params["X-Amz-Expires"] == str(body["expires_in"]), body
    assert params["X-Amz-Security-Token"] == "container-token"


@row("API-10", "hostile-api", "reading a session that is still in staging (recording, then assembling)",
     "202 {\"status\": \"recording\"} then 202 {\"status\": \"assembling\"} with Retry-After, and nothing else: no "
     "staged byte is released before the session is filed")
def api_pending(h: Harness) -> None:
    chunks = hs.build_chunks(APP, new_session_id(), session_batches(1))
    hs.stage(h.bucket, chunks, closed=False)
    for expected in ("recording", "assembling"):
        for path in (f"/apps/{APP}/sessions/{chunks.session_id}", f"/apps/{APP}/sessions/{chunks.session_id}/log"):
            status, headers, raw = h.api_get(path)
            assert (status, json_body(raw)) == (202, {"status": expected}) and headers.get("Retry-After"), raw
        h.put(keys.closed_key(APP, chunks.session_id), json.dumps(hs.close_marker(chunks)).encode())
    file_and_account(h, chunks)


# ================================================================ tampering at rest

def cli(*argv: str) -> tuple[int, str, str]:
    """Run ``oneoff-audit ARGV`` in this process; (exit code, stdout, stderr)."""
    from oneoff_audit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def verify_chain_findings(h: Harness) -> list[dict[str, Any]]:
    code, out, err = cli("verify-chain", "--app", APP, "--deep", "--json")
    report = json.loads(out)
    assert code == (0 if report["ok"] else 1), (code, err)
    return report["findings"]


def filed_pair(h: Harness) -> tuple[hs.StagedChunks, hs.StagedChunks]:
    first, second = staged(h, 2, seed=1), staged(h, 2, seed=2)
    h.deliver(1)
    for chunks in (first, second):
        h.assert_no_loss(h.account_staged(chunks, {0, 1}, h.filed(APP, chunks.session_id)))
    assert verify_chain_findings(h) == []
    return first, second


def ciphertext(h: Harness, sid: str) -> tuple[bytes, str]:
    (version,) = h.versions(keys.log_key(APP, sid))
    body = h.s3.get_object(Bucket=h.bucket, Key=keys.log_key(APP, sid), VersionId=version["VersionId"])
    return body["Body"].read(), version["VersionId"]


@row("TAM-01", "tampering", "a flipped byte in a filed log: the log overwritten with one byte changed and the "
     "filed version deleted; and a downloaded copy with one byte changed",
     "the API answers 502 {\"error\": \"integrity\"} for the log and releases nothing; verify-chain --deep reports "
     "log-replaced naming the filed version as no longer stored and exits 1; `oneoff-audit decrypt` of the "
     "flipped copy exits non-zero with one line and writes no plaintext")
def tam_flipped_byte(h: Harness) -> None:
    first, _ = filed_pair(h)
    sid, key = first.session_id, keys.log_key(APP, first.session_id)
    data, version = ciphertext(h, sid)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x01
    h.put(key, bytes(flipped))
    h.s3.delete_object(Bucket=h.bucket, Key=key, VersionId=version)
    status, _, raw = h.api_get(f"/apps/{APP}/sessions/{sid}/log")
    assert status == 502 and json_body(raw)["error"] == "integrity", raw
    assert first.blobs and b'"o"' not in raw
    findings = verify_chain_findings(h)
    assert [(f["kind"], f["key"]) for f in findings] == [("log-replaced", key)], findings
    assert "no longer stored" in findings[0]["detail"]
    copy, out = h.tmp / "copy.jsonl.enc", h.tmp / "copy.jsonl"
    copy.write_bytes(bytes(flipped))
    code, _, err = cli("decrypt", str(copy), "-o", str(out), "--key-id", h.stack.kms_key_id)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "cannot decrypt" in err, err
    assert not out.exists() and not list(h.tmp.glob(".oneoff-audit-*"))


@row("TAM-02", "tampering", "a log swapped between sessions: session 1's ciphertext PUT at session 2's log key",
     "the API keeps serving session 2's filed version (pinned by the manifest) byte-exact; verify-chain reports "
     "log-replaced for session 2; decrypting the swapped object as session 2 fails on the encryption context; "
     "once the filed version is also deleted the API answers 502 integrity")
def tam_swapped_log(h: Harness) -> None:
    first, second = filed_pair(h)
    key = keys.log_key(APP, second.session_id)
    swapped, _ = ciphertext(h, first.session_id)
    _, filed_version = ciphertext(h, second.session_id)
    h.put(key, swapped)
    status, body = h.api_json(f"/apps/{APP}/sessions/{second.session_id}/log")
    assert status == 200, body
    h.assert_no_loss(h.account_staged(second, {0, 1}, api_log(body), "served after the swap"))
    findings = verify_chain_findings(h)
    assert [(f["kind"], f["key"]) for f in findings] == [("log-replaced", key)], findings
    copy = h.tmp / "swapped.jsonl.enc"
    copy.write_bytes(swapped)
    code, _, err = cli("decrypt", str(copy), "-o", str(h.tmp / "swapped.jsonl"), "--app", APP,
                       "--session", second.session_id)
    assert code != 0 and f"not {second.session_id!r}" in err, err
    h.s3.delete_object(Bucket=h.bucket, Key=key, VersionId=filed_version)
    status, _, raw = h.api_get(f"/apps/{APP}/sessions/{second.session_id}/log")
    assert status == 502 and json_body(raw)["error"] == "integrity", raw


@row("TAM-03", "tampering", "a deleted index entry",
     "the session disappears from the timeline but stays reachable by id: its details report 'index entry "
     "missing: the session is not on the timeline' and its log is still served byte-exact")
def tam_deleted_index(h: Harness) -> None:
    first, second = filed_pair(h)
    (entry,) = [k for k in h.keys_under(keys.index_prefix(APP)) if first.session_id in k]
    h.s3.delete_object(Bucket=h.bucket, Key=entry)
    status, body = h.api_json(f"/apps/{APP}/sessions")
    assert status == 200 and [s["session_id"] for s in body["sessions"]] == [second.session_id], body
    status, body = h.api_json(f"/apps/{APP}/sessions/{first.session_id}")
    assert status == 200 and any("index entry missing" in p for p in body["integrity"]["problems"]), body
    status, body = h.api_json(f"/apps/{APP}/sessions/{first.session_id}/log")
    assert status == 200
    h.assert_no_loss(h.account_staged(first, {0, 1}, api_log(body), "served without an index entry"))


@row("TAM-04", "tampering", "an edited plaintext log (a downloaded, decrypted copy): one output byte changed; "
     "one event line removed; the trailer's byte counts edited to match",
     "`oneoff-audit verify FILE --manifest M` exits 1 naming the SHA-256 difference (and the count difference); "
     "the untouched copy verifies OK")
def tam_edited_plaintext(h: Harness) -> None:
    first, _ = filed_pair(h)
    sid = first.session_id
    plain = h.filed(APP, sid).plaintext
    manifest = h.tmp / "manifest.json"
    manifest.write_bytes(h.s3.get_object(Bucket=h.bucket, Key=keys.manifest_key(APP, sid))["Body"].read())
    good = h.tmp / "good.jsonl"
    good.write_bytes(plain)
    assert cli("verify", str(good), "--manifest", str(manifest))[0] == 0
    lines = plain.splitlines(keepends=True)
    edited = bytearray(plain)
    at = plain.index(b"chunk 1 line 3")
    edited[at] = ord("C")
    dropped = b"".join(lines[:5] + lines[6:])
    trailer = json.loads(lines[-1])
    trailer["bytes"]["o"] += 1
    recounted = b"".join(lines[:-1]) + formats.dumps_line(trailer)
    for name, content, text in (("edited", bytes(edited), "SHA-256"), ("dropped", dropped, "differ from the trailer"),
                                ("recounted", recounted, "SHA-256")):
        path = h.tmp / f"{name}.jsonl"
        path.write_bytes(content)
        code, _, err = cli("verify", str(path), "--manifest", str(manifest))
        assert code == 1 and "FAILED" in err and text in err, (name, err)


@row("TAM-05", "tampering", "an edited manifest: complete and ciphertext_sha256 changed and re-PUT (canonical "
     "JSON, old signature kept); then the signature replaced by another manifest's",
     "verify-chain reports manifest-edited (the signature does not verify over the stored bytes); the API refuses "
     "to serve the log against the edited manifest (502 integrity), releasing nothing")
def tam_edited_manifest(h: Harness) -> None:
    from oneoff_audit.evidence import signing

    first, second = filed_pair(h)
    key = keys.manifest_key(APP, first.session_id)
    doc = json.loads(h.s3.get_object(Bucket=h.bucket, Key=key)["Body"].read())
    doc["ciphertext_sha256"] = "f" * 64
    h.put(key, signing.canonical_bytes(doc))
    findings = verify_chain_findings(h)
    assert [(f["kind"], f["key"]) for f in findings] == [("manifest-edited", key)], findings
    assert "signature does not verify" in findings[0]["detail"]
    status, _, raw = h.api_get(f"/apps/{APP}/sessions/{first.session_id}/log")
    assert status == 502 and json_body(raw)["error"] == "integrity", raw
    other_sig = h.s3.get_object(Bucket=h.bucket, Key=keys.manifest_key(APP, second.session_id) + ".sig")
    h.put(key + ".sig", other_sig["Body"].read())
    findings = verify_chain_findings(h)
    assert [(f["kind"], f["key"]) for f in findings] == [("manifest-edited", key)], findings


@row("INF-20", "infrastructure", "S3 503 SlowDown on the sweeper's listing of staging (twice) and SQS 500 on its "
     "SendMessageBatch (once)",
     "botocore retries them: the abandoned session is enqueued exactly once and filed as abandoned with every "
     "staged byte")
def inf_sweeper_faults(h: Harness) -> None:
    chunks = hs.build_chunks(APP, new_session_id(), session_batches(2))
    hs.stage(h.bucket, chunks, closed=False)
    listing = h.inj.add("s3", "ListObjectsV2", s3_error(), times=2)
    send = h.inj.add("sqs", "SendMessageBatch", kms_error("InternalError", 500), times=1)
    assert h.sweep(after=3601) == [(APP, chunks.session_id)]
    assert (listing.hits, send.hits) == (2, 1)
    h.inj.clear()
    handled = h.deliver(2)
    assert [failed for _, failed in handled] == [False]
    filed = h.filed(APP, chunks.session_id)
    assert (filed.trailer["status"], filed.trailer["complete"]) == ("abandoned", False)
    h.assert_no_loss(h.account_staged(chunks, {0, 1}, filed))
    h.assert_filed_once(APP, chunks.session_id)


CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]")  # C0 (but tab, newline) and C1 controls


@row("HRI-17", "hostile-runner", "terminal escape sequences in runner-controlled metadata: an argv with an OSC 52 "
     "clipboard write and a window-title OSC, an actor name that clears the screen, a target value with a CSI "
     "cursor move and a C1 CSI; an auditor runs `oneoff-audit sessions` and `oneoff-audit show`",
     "the CLI prints every runner-controlled string with control characters made visible (escaped): no ESC, BEL "
     "or C1 byte reaches the auditor's terminal; --json output is escaped JSON")
def hri_terminal_escapes(h: Harness) -> None:
    sid = new_session_id()
    chunks = hs.build_chunks(APP, sid, session_batches(1))
    opened = hs.session_header(APP, sid)
    opened["command"]["argv"] = ["bash", "-c", "printf '\x1b]52;c;cm0gLXJmIH4K\x07\x1b]0;auditor@prod\x07'"]
    opened["actor"]["name"] = "Ada\x1b[2J\x1b[H(root)"
    opened["target"] = {"org": "acme\x1b[1A\x1b[2Kforged line", "space": "prod\u009b31m"}
    hs.stage(h.bucket, chunks, opened=opened)
    file_and_account(h, chunks)
    api = ["--api-url", h.api().url, "--token", "tok-a"]
    leaks = {}
    for argv in (["sessions", "--app", APP, *api], ["show", APP, sid, *api],
                 ["sessions", "--app", APP, "--json", *api], ["show", APP, sid, "--json", *api]):
        code, out, err = cli(*argv)
        assert code == 0, err
        found = CONTROL.findall(out.encode())
        if found:
            leaks[" ".join(argv[:argv.index("--api-url")])] = sorted(set(found))
    assert leaks == {}, f"control characters printed raw to the auditor's terminal: {leaks}"


HOSTILE_EVENT_LINES = (
    b'[-1,"o","x"]', b'[1e999,"o","x"]', b'[true,"o","x"]', b'[1,"x","y"]', b'[1,"o",{"b64":"!!"}]',
    b'[1,"o",{"b64":"AA==","x":1}]', b'[1,"o","\\ud800"]', b'[1,"r","80x24x1"]', b'[1,"m",{"nokind":1}]',
    b'[1,"o","x"]garbage', b'[1,"o","x",4]', b'{"t":1,"stream":"o","data":"x"}', b'[NaN,"o","x"]',
    b'[1,"i","\xff"]',
)


@row("HRI-18", "hostile-runner", "event lines that look almost right, one per chunk: negative, infinite, boolean "
     "and NaN times; unknown stream; bad or extended base64 objects; a lone surrogate; a bad resize; a marker "
     "without kind; trailing garbage; four elements; an object; raw invalid UTF-8 (trailing whitespace is valid "
     "JSON and accepted)",
     "every such chunk is corrupt (invalid-json or invalid-event, the line named in the log), the session is filed "
     "complete: false naming each of them, and the genuine first and last chunks are intact")
def hri_almost_events(h: Harness) -> None:
    sid = new_session_id()
    genuine = session_batches(2, seed=3)
    blobs: list[bytes] = []
    batches: list[list[list[Any]]] = [genuine[0]]
    prev = None
    index = 0
    seq_lines = [None, *HOSTILE_EVENT_LINES, None]
    for seq, line in enumerate(seq_lines):
        header = formats.dumps_line(hs.chunk_header(APP, sid, seq, index, prev))
        if line is None:
            batch = genuine[0] if seq == 0 else genuine[1]
            body = header + b"".join(formats.dumps_line(e) for e in batch)
            index += len(batch)
        else:
            body = header + formats.dumps_line([0.5, "o", "before"]) + line + b"\n"
            batches.append([])
        blobs.append(gzip.compress(body, mtime=0))
        prev = formats.sha256_hex(blobs[-1])
    batches.append(genuine[1])
    chunks = hs.StagedChunks(APP, sid, batches, blobs)
    hs.stage(h.bucket, chunks)
    h.monkeypatch.setenv("ASSEMBLE_MAX_ATTEMPTS", "1")
    h.deliver(1)
    filed = h.filed(APP, sid)
    corrupt = {g["seq"]: g["reason"] for g in filed.trailer["gaps"]["corrupt"]}
    assert sorted(corrupt) == list(range(1, len(HOSTILE_EVENT_LINES) + 1)), corrupt
    assert set(corrupt.values()) <= {"invalid-json", "invalid-event"}, corrupt
    details = [d["detail"] for d in filed.markers("gap")]
    assert all(d.startswith("line 3") or "line 3:" in d for d in details), details
    assert filed.trailer["complete"] is False and filed.trailer["gaps"]["missing"] == []
    h.assert_no_loss(h.account_staged(chunks, {0, len(seq_lines) - 1}, filed))


def _assemble_in_child(h: Harness, memory: int = 1 << 30, limit: float = 90) -> tuple[int, list[tuple[str, bool]]]:
    """Run one delivery of the queue in a child process bounded in memory and time; (exit code, outcomes)."""
    sqs = client("sqs")
    arn = sqs.get_queue_attributes(QueueUrl=h.stack.queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    messages = h.queue_messages()
    event = h.tmp / "event.json"
    event.write_text(json.dumps(sqs_batch_event(messages, arn)))

    def bound() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    child = subprocess.run([sys.executable, str(Path(__file__).with_name("assembler_child.py")), str(event),
                            str(h.tmp / "ready")], env=h.stack.env(), capture_output=True, timeout=limit,
                           preexec_fn=bound)
    failed = set()
    if child.returncode == 0:
        failed = {i["itemIdentifier"] for i in json.loads(child.stdout.splitlines()[-1])["batchItemFailures"]}
    for message in messages:
        if child.returncode == 0 and message["MessageId"] not in failed:
            sqs.delete_message(QueueUrl=h.stack.queue_url, ReceiptHandle=message["ReceiptHandle"])
        else:
            sqs.change_message_visibility(QueueUrl=h.stack.queue_url, ReceiptHandle=message["ReceiptHandle"],
                                          VisibilityTimeout=0)
    return child.returncode, [(m["Body"], child.returncode != 0 or m["MessageId"] in failed) for m in messages]


@row("HRI-19", "hostile-runner", "sequence numbers far apart: a session without a close marker whose runner also "
     "PUT chunks/99999999.gz (the highest seq a key may name), then abandoned: without a bound the assembler "
     "would account for 100 million missing chunks",
     "the assembler stays bounded (run in a child process limited to 1 GiB and 90 s): the session is filed "
     "abandoned, complete: false, with the far chunk as corrupt unexpected-chunk preserved as gap-data, and every "
     "genuine byte in the log")
def hri_far_sequence_numbers(h: Harness) -> None:
    chunks = hs.build_chunks(APP, new_session_id(), session_batches(2))
    hs.stage(h.bucket, chunks, closed=False)
    far = formats.encode_chunk(hs.chunk_header(APP, chunks.session_id, 99_999_999, 0, None),
                               hs.output_events([b"far away\r\n"]))
    h.put(keys.chunk_key(APP, chunks.session_id, 99_999_999), far)
    assert h.sweep(after=3601) == [(APP, chunks.session_id)]
    code, handled = _assemble_in_child(h)
    assert code == 0 and [failed for _, failed in handled] == [False], (code, handled)
    filed = h.filed(APP, chunks.session_id)
    corrupt = {g["seq"]: g["reason"] for g in filed.trailer["gaps"]["corrupt"]}
    assert corrupt == {99_999_999: "unexpected-chunk"} and filed.trailer["gaps"]["missing"] == [], filed.trailer
    preserved(filed, 99_999_999, far)
    h.assert_no_loss(h.account_staged(chunks, {0, 1}, filed))


@row("RUN-08", "runner", "S3 is unreachable for the whole session and the close: every chunk and the close "
     "marker end in the spool; before `oneoff-audit flush-spool` runs, someone on the runner flips one byte of a "
     "spooled chunk (chunks/00000001.gz)",
     "flush-spool uploads what it can and reports the damaged file; the session is filed with every intact "
     "chunk's bytes and complete: false naming chunk 1 (corrupt or missing) -- the damaged file does not strand "
     "the valid rest of the session on the runner")
def run_spool_tampered(h: Harness) -> None:
    proxy = h.proxy()
    proxy.add("cut", "PUT", "/chunks/")
    proxy.add("cut", "PUT", "/closed.json")
    spool = h.tmp / "spool"
    rec = h.record(APP, output_steps(4, 0.25), via_proxy=True, spool_dir=spool,
                   options=("--queue-bytes", "1K", "--flush-timeout", "1"))
    assert rec.returncode == 0
    session_dir = spool / APP / rec.session_id
    spooled = sorted(p.name for p in (session_dir / "chunks").iterdir())
    assert len(spooled) >= 3 and (session_dir / "closed.json").exists(), spooled
    assert h.keys_under(keys.session_prefix(APP, rec.session_id)) == [keys.opened_key(APP, rec.session_id)]
    target = session_dir / "chunks" / "00000001.gz"
    _, original = formats.read_chunk(target.read_bytes(), "spooled chunk 1")
    damaged = {s: sum(len(decode_data(d)) for _, stream, d in original if stream == s) for s in ("i", "o", "e")}
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x40
    target.write_bytes(bytes(data))
    proxy.clear()
    flush = subprocess.run([CLI, "flush-spool", "--spool-dir", str(spool), "--timeout", "20"], env=h.stack.env(),
                           capture_output=True, timeout=60)
    assert b"00000001.gz" in flush.stderr, flush.stderr
    if not h.keys_under(keys.closed_key(APP, rec.session_id)):
        h.sweep(after=3601)  # no close marker reached S3: the sweeper files what did
    h.deliver(2)
    filed = h.filed(APP, rec.session_id)
    gaps = filed.trailer["gaps"]
    named = set(gaps["missing"]) | {g["seq"] for g in gaps["corrupt"]}
    expected = {"i": b"", "o": rec.wrote["o"], "e": rec.wrote["e"]}
    h.assert_no_loss(h.account(APP, rec.session_id, "process", expected, filed, "chunk 1 damaged in the spool",
                               gap_bytes={1: damaged}))
    stored_seqs = len(spooled)
    left = sorted(str(p.relative_to(session_dir)) for p in session_dir.rglob("*") if p.is_file())
    assert filed.trailer["expected_chunk_count"] == stored_seqs and filed.trailer["chunk_count"] >= stored_seqs - 1, (
        f"the filed log knows {filed.trailer['chunk_count']} of the session's {stored_seqs} chunks "
        f"(expected_chunk_count {filed.trailer['expected_chunk_count']}, gaps {gaps}); flush-spool stopped at the "
        f"damaged file and left {left} on the runner: {flush.stderr.decode(errors='replace').strip()}")
    assert filed.trailer["complete"] is False and 1 in named, filed.trailer


@row("HRI-20", "hostile-runner", "a premature, forged close marker: another runner PUTs closed.json (guessed digests) "
     "into a live session after its chunks 0-1; the session is filed from it; then the genuine chunks 2-3 and the "
     "genuine close marker arrive",
     "the first filing is complete: false naming chunks 0-1 as sha256-mismatch (their bytes kept as gap-data); "
     "the genuine chunks 2-3 and the genuine close marker (the evidence of what the runner really wrote) are "
     "kept in staging, not deleted, and the message is dead-lettered naming them")
def hri_premature_close(h: Harness) -> None:
    chunks = hs.build_chunks(APP, new_session_id(), session_batches(4))
    hs.stage(h.bucket, chunks, closed=False, skip=[2, 3])
    forged = hs.close_marker(hs.StagedChunks(APP, chunks.session_id, chunks.batches[:2], chunks.blobs[:2]))
    forged["chunk_sha256"] = ["a" * 64, "b" * 64]
    h.put(keys.closed_key(APP, chunks.session_id), json.dumps(forged).encode())
    filed = filed_incomplete(h, chunks, set(), corrupt={0: "sha256-mismatch", 1: "sha256-mismatch"})
    preserved(filed, 0, chunks.blobs[0])
    preserved(filed, 1, chunks.blobs[1])
    genuine = json.dumps(hs.close_marker(chunks)).encode()
    for seq in (2, 3):
        h.put(keys.chunk_key(APP, chunks.session_id, seq), chunks.blobs[seq])
    h.put(keys.closed_key(APP, chunks.session_id), genuine)
    handled = h.deliver(1)
    assert [failed for _, failed in handled] == [True], handled
    left = h.keys_under(keys.session_prefix(APP, chunks.session_id))
    for key in (keys.chunk_key(APP, chunks.session_id, 2), keys.chunk_key(APP, chunks.session_id, 3)):
        assert key in left, left
    assert keys.closed_key(APP, chunks.session_id) in left, (
        f"the genuine close marker (the only record of the real chunk digests) was deleted; staging holds {left}")
    assert h.s3.get_object(Bucket=h.bucket, Key=keys.closed_key(APP, chunks.session_id))["Body"].read() == genuine
