"""The spool (atomic files, size cap, locks, ordered flush) and the upload workers (budget, order, retries).

S3 is played by a small in-memory stand-in for a boto3 client (``put_object`` only) that can fail on
demand; the spool is a real directory.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time

import pytest

from oneoff_audit import formats, keys
from oneoff_audit.capture.recorder import encode_chunk_lines
from oneoff_audit.capture.spool import FlushResult, Spool, SpoolError, flush_session, flush_spool, lock_session_dir
from oneoff_audit.capture.uploader import RetryPolicy, Uploader

pytestmark = pytest.mark.unit

FAST = RetryPolicy(base=0.01, cap=0.05)


class FakeS3:
    """put_object into a dict; raises while ``down`` is set."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.order: list[str] = []
        self.down = False
        self.calls = 0
        self._lock = threading.Lock()

    def put_object(self, Bucket: str, Key: str, Body: bytes) -> dict:
        with self._lock:
            self.calls += 1
            if self.down:
                raise ConnectionError("S3 is down")
            self.objects[Key] = Body
            self.order.append(Key)
        return {}


def chunk(seq: int, sid: str = "S1", app: str = "app1", text: str = "x") -> bytes:
    header = {"format": "oneoff-audit.chunk", "version": 1, "session_id": sid, "app": app, "seq": seq,
              "first_event_index": seq, "prev_chunk_sha256": None if seq == 0 else "0" * 64}
    return encode_chunk_lines(header, [formats.dumps_line([float(seq), "o", text])])


def opened(sid: str = "S1", app: str = "app1") -> bytes:
    return formats.dumps_line({
        "format": "oneoff-audit.session", "version": 1, "session_id": sid, "app": app,
        "actor": {"id": "u", "name": None, "type": "user", "source_ip": None},
        "command": {"argv": ["true"], "tty": False, "term_size": None, "env_keys": []}, "target": {},
        "started_at": "2026-11-25T14:46:00.123456Z", "agent": {"version": "0", "hostname": "h", "pid": 1},
        "options": {"record_hidden_input": False, "chunk_max_bytes": 1, "chunk_max_seconds": 1}})


def closed(chunks: list[bytes], sid: str = "S1", app: str = "app1") -> bytes:
    return formats.dumps_line({
        "format": "oneoff-audit.close", "version": 1, "session_id": sid, "app": app,
        "ended_at": "2026-11-25T14:47:00.000000Z", "exit": {"code": 0, "signal": None}, "status": "succeeded",
        "reason": None, "chunk_count": len(chunks), "chunk_sha256": [formats.sha256_hex(c) for c in chunks],
        "event_count": len(chunks), "bytes": {"i": 0, "o": len(chunks), "e": 0}, "withheld_input_bytes": 0,
        "lost_bytes": 0})


def spooled_session(spool: Spool, n: int, sid: str = "S1", with_closed: bool = True):
    session = spool.session("bucket", "staging/", "app1", sid)
    chunks = [chunk(i, sid) for i in range(n)]
    session.write("opened.json", opened(sid))
    for i, data in enumerate(chunks):
        session.write(f"chunks/{i:08d}.gz", data)
    if with_closed:
        session.write("closed.json", closed(chunks, sid))
    session.close()
    return session.dir, chunks


def uploader_to(s3: FakeS3):
    return lambda bucket, key, body: (s3.put_object(Bucket=bucket, Key=key, Body=body), True)[1]


# ---------------------------------------------------------------- spool


def test_spool_files_are_private_atomic_and_capped(tmp_path):
    spool = Spool(tmp_path / "spool", max_bytes=100)
    session = spool.session("bucket", "staging/", "app1", "S1")
    path = session.write("chunks/00000000.gz", b"a" * 60)
    assert path.read_bytes() == b"a" * 60
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(session.dir.stat().st_mode) == 0o700
    assert json.loads((session.dir / "meta.json").read_text()) == {
        "bucket": "bucket", "staging_prefix": "staging/", "app": "app1", "session_id": "S1"}
    with pytest.raises(SpoolError, match="full"):
        session.write("chunks/00000001.gz", b"b" * 50)
    session.write("closed.json", b"c" * 50, force=True)  # the end of a session may pass the cap
    assert not any(p.name.endswith(".tmp") for p in session.dir.rglob("*"))
    session.remove(path)
    session.write("chunks/00000001.gz", b"b" * 40)
    assert sorted(session.pending()) == ["chunks/00000001.gz", "closed.json"]


def test_unwritable_spool_raises_spool_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    session = Spool(blocker / "spool").session("bucket", "staging/", "app1", "S1")
    with pytest.raises(SpoolError):
        session.write("chunks/00000000.gz", b"data")


def test_spool_rejects_ids_that_are_not_safe_path_parts(tmp_path):
    with pytest.raises(ValueError):
        Spool(tmp_path).session("bucket", "staging/", "../etc", "S1")


def test_flush_uploads_header_chunks_then_close_marker_and_cleans_up(tmp_path):
    spool = Spool(tmp_path / "spool")
    directory, chunks = spooled_session(spool, 3)
    s3 = FakeS3()
    result = flush_session(directory, uploader_to(s3), spool)
    base = "staging/app1/S1/"
    assert s3.order == [base + "opened.json", *(f"{base}chunks/{i:08d}.gz" for i in range(3)), base + "closed.json"]
    assert s3.objects[base + "chunks/00000001.gz"] == chunks[1]
    assert result.sessions_done == ["app1/S1"] and result.ok
    assert not any((tmp_path / "spool").iterdir())
    assert spool.used == 0


def test_close_marker_waits_while_a_chunk_cannot_be_uploaded(tmp_path):
    spool = Spool(tmp_path / "spool")
    directory, _chunks = spooled_session(spool, 3)
    s3 = FakeS3()
    refused = {"staging/app1/S1/chunks/00000001.gz"}

    def flaky(bucket: str, key: str, body: bytes) -> bool:
        if key in refused:
            return False
        return uploader_to(s3)(bucket, key, body)

    result = flush_session(directory, flaky, spool)
    assert s3.order == ["staging/app1/S1/opened.json", "staging/app1/S1/chunks/00000000.gz"]
    assert result.sessions_left == ["app1/S1"]
    assert sorted(p.name for p in (directory / "chunks").iterdir()) == ["00000001.gz", "00000002.gz"]
    refused.clear()
    result = flush_session(directory, flaky, spool, FlushResult())
    assert s3.order[-1] == "staging/app1/S1/closed.json" and result.ok
    assert not directory.exists()


def test_damaged_spooled_chunk_is_reported_and_does_not_strand_the_rest(tmp_path):
    spool = Spool(tmp_path / "spool")
    directory, chunks = spooled_session(spool, 3)
    damaged = bytearray(chunks[1])
    damaged[len(damaged) // 2] ^= 0x40
    (directory / "chunks" / "00000001.gz").write_bytes(bytes(damaged))
    s3 = FakeS3()
    result = flush_session(directory, uploader_to(s3), spool)
    base = "staging/app1/S1/"
    assert s3.order == [base + "opened.json", *(f"{base}chunks/{i:08d}.gz" for i in range(3)), base + "closed.json"]
    assert s3.objects[base + "chunks/00000001.gz"] == bytes(damaged)  # as it is: the assembler sees the damage
    assert len(result.errors) == 1 and "app1/S1/chunks/00000001.gz: damaged in the spool" in result.errors[0]
    assert not result.ok and not directory.exists()


def test_damaged_close_marker_stays_in_the_spool(tmp_path):
    spool = Spool(tmp_path / "spool")
    directory, _chunks = spooled_session(spool, 1)
    (directory / "closed.json").write_bytes(b'{"format":"oneoff-audit.close"}\n')
    s3 = FakeS3()
    result = flush_session(directory, uploader_to(s3), spool)
    assert s3.order == ["staging/app1/S1/opened.json", "staging/app1/S1/chunks/00000000.gz"]
    assert "closed.json: damaged in the spool" in result.errors[0]
    assert (directory / "closed.json").exists() and result.sessions_left == ["app1/S1"]


def test_session_being_recorded_is_skipped(tmp_path):
    spool = Spool(tmp_path / "spool")
    live = spool.session("bucket", "staging/", "app1", "LIVE")
    live.write("chunks/00000000.gz", chunk(0, "LIVE"))  # takes the lock and keeps it
    s3 = FakeS3()
    result = flush_spool(spool, s3, timeout=1, retry=FAST)
    assert result.busy == ["app1/LIVE"] and s3.order == []
    live.close()
    result = flush_spool(spool, s3, timeout=1, retry=FAST)
    assert s3.order == ["staging/app1/LIVE/chunks/00000000.gz"] and result.ok


def test_lock_is_exclusive_and_survives_a_flusher_emptying_the_directory(tmp_path):
    directory = tmp_path / "app1" / "S1"
    fd = lock_session_dir(directory)
    assert fd is not None
    assert lock_session_dir(directory) is None
    os.close(fd)
    other = lock_session_dir(directory)
    assert other is not None
    os.close(other)


def test_flush_spool_gives_up_at_its_deadline(tmp_path):
    spool = Spool(tmp_path / "spool")
    spooled_session(spool, 1)
    s3 = FakeS3()
    s3.down = True
    started = time.monotonic()
    result = flush_spool(spool, s3, timeout=0.3, retry=FAST)
    assert time.monotonic() - started < 2
    assert result.sessions_left == ["app1/S1"] and s3.calls >= 2  # retried, then stopped


# ---------------------------------------------------------------- uploader


def make_uploader(s3: FakeS3, tmp_path, queue_bytes: int, max_spool: int = 1 << 20) -> Uploader:
    session = Spool(tmp_path / "spool", max_spool).session("bucket", "staging/", "app1", "S1")
    return Uploader(s3, "bucket", queue_bytes=queue_bytes, spool=session, workers=3, retry=FAST)


def test_header_goes_first_and_everything_arrives(tmp_path):
    s3 = FakeS3()
    s3.down = True
    up = make_uploader(s3, tmp_path, queue_bytes=1 << 20)
    up.start()
    assert up.submit("opened.json", keys.opened_key("app1", "S1"), b"header", first=True)
    for seq in range(6):
        assert up.submit(f"chunks/{seq:08d}.gz", keys.chunk_key("app1", "S1", seq), b"c%d" % seq)
    time.sleep(0.2)  # workers retry with backoff meanwhile
    s3.down = False
    assert up.finish(5) == []
    assert s3.order[0] == "staging/app1/S1/opened.json"
    assert sorted(s3.order[1:]) == [keys.chunk_key("app1", "S1", s) for s in range(6)]
    assert up.errors > 0 and up.memory_bytes == 0


def test_memory_budget_spills_to_the_spool_then_refuses(tmp_path):
    s3 = FakeS3()
    s3.down = True
    up = make_uploader(s3, tmp_path, queue_bytes=10, max_spool=25)
    up.start()
    assert up.submit("opened.json", keys.opened_key("app1", "S1"), b"h" * 50, first=True)  # always kept
    assert up.submit("chunks/00000000.gz", keys.chunk_key("app1", "S1", 0), b"a" * 10)  # spooled
    assert up.submit("chunks/00000001.gz", keys.chunk_key("app1", "S1", 1), b"b" * 10)  # spooled
    assert not up.submit("chunks/00000002.gz", keys.chunk_key("app1", "S1", 2), b"c" * 10)  # nowhere
    assert up.spooled == 2
    left = up.finish(0.2)
    assert sorted(item.name for item in left) == ["chunks/00000000.gz", "chunks/00000001.gz", "opened.json"]
    assert [item.path is not None for item in sorted(left, key=lambda i: i.name)] == [True, True, False]


def test_spooled_chunks_are_uploaded_and_deleted_once_s3_is_back(tmp_path):
    s3 = FakeS3()
    s3.down = True
    up = make_uploader(s3, tmp_path, queue_bytes=0)
    up.start()
    up.submit("opened.json", keys.opened_key("app1", "S1"), b"h", first=True)
    up.submit("chunks/00000000.gz", keys.chunk_key("app1", "S1", 0), b"data")
    spooled = tmp_path / "spool" / "app1" / "S1" / "chunks" / "00000000.gz"
    assert spooled.read_bytes() == b"data"
    s3.down = False
    assert up.finish(5) == []
    assert s3.objects[keys.chunk_key("app1", "S1", 0)] == b"data"
    assert not spooled.exists()


def test_retry_delays_grow_exponentially_with_jitter_up_to_the_cap():
    policy = RetryPolicy(base=0.5, cap=8.0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (9, 8.0), (500, 8.0)]:
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100  # jittered
