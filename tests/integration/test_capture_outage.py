"""S3 outages under a running session: the agent spools, retries, recovers, marks what it lost.

The agent's S3 endpoint is a :class:`~capture_support.FaultProxy` in front of moto, switched
between forwarding, dropping connections and answering 503 while real sessions run. The staging
area is then read back and checked chunk by chunk: every chunk present once, in order, chained,
and the recorded bytes equal to what the command wrote, except for gaps that are marked with their
exact size and position.
"""

from __future__ import annotations

import gzip
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from capture_support import CLI, FaultProxy, check_chain, read_staging, record_cmd, wait_for

from oneoff_audit.aws import client
from oneoff_audit.codec import decode_data
from oneoff_audit.ids import new_session_id

pytestmark = pytest.mark.integration

PY = sys.executable
FAST = ["--tty", "never", "--chunk-seconds", "0.2", "--retry-max-delay", "0.3", "--no-flush-spool"]

LINES = r'''
import base64, random
def line(n):
    rng = random.Random(n)
    return b"%06d " % n + base64.b64encode(rng.randbytes(rng.randint(300, 900))) + b"\n"
'''


def lines(start: int, stop: int) -> bytes:
    namespace: dict = {}
    exec(LINES, namespace)
    return b"".join(namespace["line"](n) for n in range(start, stop))


def writer_program(count: int, pause: float, go_file: str | None = None, go_after: int = 0,
                   pause_after_go: float = 0.0) -> str:
    """A command printing ``count`` deterministic lines, waiting for ``go_file`` after ``go_after`` lines."""
    return (
        f"import os, sys, time\n{LINES}\n"
        f"pause = {pause}\n"
        f"for n in range({count}):\n"
        f"    if {go_file!r} and n == {go_after}:\n"
        f"        while not os.path.exists({go_file!r}):\n"
        "            time.sleep(0.02)\n"
        f"        pause = {pause_after_go}\n"
        "    sys.stdout.buffer.write(line(n)); sys.stdout.flush()\n"
        "    time.sleep(pause)\n"
    )


@pytest.fixture
def proxy(moto_endpoint):
    fault = FaultProxy(moto_endpoint)
    yield fault
    fault.stop()


def env_via(stack, proxy: FaultProxy) -> dict[str, str]:
    return {**stack.env(), "AWS_ENDPOINT_URL": proxy.url}


def staged_keys(bucket: str, app: str, sid: str) -> list[str]:
    listing = client("s3").list_objects_v2(Bucket=bucket, Prefix=f"staging/{app}/{sid}/")
    return [o["Key"] for o in listing.get("Contents", [])]


def check_puts(proxy: FaultProxy, app: str, sid: str, chunk_count: int) -> None:
    """S3 accepted the header first, each chunk exactly once, and the close marker last."""
    base = f"/staging/{app}/{sid}/"
    puts = [p.split(base, 1)[1] for p in proxy.accepted_puts() if base in p]
    assert puts[0] == "opened.json"
    assert puts[-1] == "closed.json"
    assert sorted(puts[1:-1]) == [f"chunks/{n:08d}.gz" for n in range(chunk_count)]


def walk_with_gaps(staged, expected: bytes, stream: str = "o") -> int:
    """Check recorded bytes against ``expected``, skipping each capture gap by its byte count; returns the end."""
    pos = 0
    for _t, name, data in staged.events:
        if name == stream:
            chunk = decode_data(data)
            assert expected[pos:pos + len(chunk)] == chunk, f"mismatch at byte {pos}"
            pos += len(chunk)
        elif name == "m" and data["kind"] == "capture-gap":
            pos += data["streams"][stream]
    return pos


def test_s3_down_at_start_then_back(stack, proxy, tmp_path):
    proxy.mode = "drop"
    sid = new_session_id()
    log = tmp_path / "agent.log"
    proc = subprocess.Popen(
        record_cmd("app-down", sid, *FAST, "--queue-bytes", "2K", "--spool-dir", str(tmp_path / "spool"),
                   "--log-file", str(log), "--", PY, "-c", writer_program(40, 0.04)),
        env=env_via(stack, proxy), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: proxy.refused() >= 3)  # the agent is running and S3 is refusing it
    time.sleep(0.3)
    assert staged_keys(stack.bucket, "app-down", sid) == []
    proxy.mode = "up"
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert err == b""
    assert out == lines(0, 40)
    staged = read_staging(stack.bucket, "app-down", sid)
    check_chain(staged)
    assert staged.stream("o") == lines(0, 40)
    assert staged.closed["lost_bytes"] == 0 and staged.markers("capture-gap") == []
    check_puts(proxy, "app-down", sid, len(staged.chunks))
    assert proxy.refused() > 0
    summary = log.read_text()
    assert " 0 spooled" not in summary and "spooled" in summary  # some chunks waited on disk
    assert not list((tmp_path / "spool").rglob("*.gz"))  # and left it once uploaded


def test_s3_failing_mid_session(stack, proxy, tmp_path):
    sid = new_session_id()
    proc = subprocess.Popen(
        record_cmd("app-flaky", sid, *FAST, "--queue-bytes", "4K", "--spool-dir", str(tmp_path / "spool"), "--",
                   PY, "-c", writer_program(60, 0.04)),
        env=env_via(stack, proxy), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: len(staged_keys(stack.bucket, "app-flaky", sid)) >= 3)
    proxy.mode = "503"
    wait_for(lambda: proxy.refused() >= 3)
    time.sleep(0.3)
    proxy.mode = "drop"
    wait_for(lambda: proxy.refused() >= 6)
    proxy.mode = "up"
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out == lines(0, 60)
    staged = read_staging(stack.bucket, "app-flaky", sid)
    check_chain(staged)
    assert staged.stream("o") == lines(0, 60)
    assert staged.closed["lost_bytes"] == 0
    check_puts(proxy, "app-flaky", sid, len(staged.chunks))
    assert proxy.refused() > 0


def test_s3_down_until_the_end_then_flush_spool_puts_close_marker_last(stack, proxy, tmp_path):
    proxy.mode = "drop"
    sid = new_session_id()
    spool = tmp_path / "spool"
    log = tmp_path / "agent.log"
    proc = subprocess.Popen(
        record_cmd("app-offline", sid, *FAST, "--queue-bytes", "1K", "--flush-timeout", "60", "--log-file", str(log),
                   "--spool-dir", str(spool), "--", PY, "-c", writer_program(12, 0.03) + "sys.exit(3)\n"),
        env=env_via(stack, proxy), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: log.exists() and "command ended" in log.read_text())
    time.sleep(0.3)
    interrupted = time.monotonic()
    proc.send_signal(signal.SIGINT)  # the user gives up waiting for S3: spool now, exit now
    _out, err = proc.communicate(timeout=30)
    assert time.monotonic() - interrupted < 5
    assert proc.returncode == 3
    assert b"flush-spool" in err and err.count(b"\n") == 1  # one line saying where the session is
    assert staged_keys(stack.bucket, "app-offline", sid) == []
    session_dir = spool / "app-offline" / sid
    assert (session_dir / "opened.json").exists() and (session_dir / "closed.json").exists()
    spooled_chunks = sorted(p.name for p in (session_dir / "chunks").iterdir())
    assert spooled_chunks and spooled_chunks[0] == "00000000.gz"

    proxy.mode = "up"
    flush = subprocess.run([CLI, "flush-spool", "--spool-dir", str(spool)], env=env_via(stack, proxy),
                           capture_output=True, timeout=60)
    assert flush.returncode == 0, flush.stderr
    assert flush.stdout.startswith(b"uploaded %d objects" % (len(spooled_chunks) + 2))
    staged = read_staging(stack.bucket, "app-offline", sid)
    check_chain(staged)
    assert staged.stream("o") == lines(0, 12)
    assert staged.closed["exit"] == {"code": 3, "signal": None}
    check_puts(proxy, "app-offline", sid, len(staged.chunks))
    assert not any(spool.iterdir())  # nothing left behind, not even empty folders


def test_record_uploads_earlier_leftovers_when_it_starts(stack, proxy, tmp_path):
    proxy.mode = "drop"
    spool = tmp_path / "spool"
    old = new_session_id()
    first = subprocess.run(
        record_cmd("app-left", old, *FAST, "--flush-timeout", "0.5", "--spool-dir", str(spool), "--",
                   PY, "-c", writer_program(5, 0.01)),
        env=env_via(stack, proxy), stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert first.returncode == 0 and (spool / "app-left" / old / "closed.json").exists()
    proxy.mode = "up"
    new = new_session_id()
    args = [a for a in record_cmd("app-left", new, *FAST, "--spool-dir", str(spool), "--", "true")
            if a != "--no-flush-spool"]
    second = subprocess.run(args, env=env_via(stack, proxy), stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=60)
    assert second.returncode == 0, second.stderr
    earlier = read_staging(stack.bucket, "app-left", old)
    check_chain(earlier)
    assert earlier.closed is not None and earlier.stream("o") == lines(0, 5)
    assert read_staging(stack.bucket, "app-left", new).closed is not None
    assert not any(spool.iterdir())


def test_spool_full_with_s3_down_continue_marks_the_gap_exactly(stack, proxy, tmp_path):
    proxy.mode = "drop"
    sid = new_session_id()
    go = tmp_path / "go"
    proc = subprocess.Popen(
        record_cmd("app-gap", sid, *FAST, "--chunk-bytes", "1K", "--queue-bytes", "16K", "--spool-max-bytes", "0",
                   "--spool-dir", str(tmp_path / "spool"), "--",
                   PY, "-c", writer_program(260, 0.0, str(go), go_after=200, pause_after_go=0.02)),
        env=env_via(stack, proxy), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    line = proc.stderr.readline()
    assert line.startswith(b"oneoff-audit: recording failed: S3 unreachable and the spool full"), line
    proxy.mode = "up"
    wait_for(lambda: staged_keys(stack.bucket, "app-gap", sid))
    time.sleep(0.5)  # memory drains: recording works again
    go.touch()
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 0
    assert rest == b""  # said once
    staged = read_staging(stack.bucket, "app-gap", sid)
    check_chain(staged)
    expected = lines(0, 260)
    gaps = staged.markers("capture-gap")
    assert gaps, "no gap marker"
    assert walk_with_gaps(staged, expected) == len(expected)  # every gap marker has the exact byte count
    lost = sum(g["bytes"] for g in gaps)
    assert lost == staged.closed["lost_bytes"] == len(expected) - len(staged.stream("o")) > 0
    assert staged.closed["bytes"]["o"] == len(staged.stream("o"))
    assert staged.stream("o").endswith(lines(250, 260))  # recorded again once S3 was back
    assert staged.closed["status"] == "succeeded"
    assert staged.closed["reason"] == f"{lost} bytes could not be recorded"


def test_unwritable_spool_with_s3_down_terminate_ends_the_session(stack, proxy, tmp_path):
    proxy.mode = "drop"
    sid = new_session_id()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    written = tmp_path / "written.bin"
    program = (
        f"import os, time\n{LINES}\n"
        f"log = open({str(written)!r}, 'wb', buffering=0)\n"
        "n = 0\n"
        "while True:\n"
        "    data = line(n); n += 1\n"
        "    log.write(data)\n"
        "    os.write(1, data)\n"
        "    time.sleep(0.001)\n"
    )
    proc = subprocess.Popen(
        record_cmd("app-term", sid, *FAST, "--chunk-bytes", "1K", "--queue-bytes", "8K",
                   "--spool-dir", str(blocker / "spool"), "--on-capture-failure", "terminate", "--",
                   PY, "-c", program),
        env=env_via(stack, proxy), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    line = proc.stderr.readline()
    assert line.startswith(b"oneoff-audit: terminated by oneoff-audit: recording failed"), line
    proxy.mode = "up"
    assert proc.wait(timeout=60) == 128 + signal.SIGHUP
    staged = read_staging(stack.bucket, "app-term", sid)
    check_chain(staged)
    closed = staged.closed
    assert closed["status"] == "killed" and closed["exit"] == {"code": None, "signal": signal.SIGHUP}
    assert closed["reason"].startswith("terminated by oneoff-audit: recording failed (S3 unreachable")
    assert [m["kind"] for m in staged.markers("session-terminated")] == ["session-terminated"]
    expected = written.read_bytes()
    end = walk_with_gaps(staged, expected)
    assert len(expected) - 2000 < end <= len(expected)  # up to the line the command was killed in
    assert closed["lost_bytes"] == sum(g["bytes"] for g in staged.markers("capture-gap")) > 0


def test_agent_killed_with_sigkill_leaves_flushed_chunks_and_takes_the_command_down(stack, tmp_path):
    sid = new_session_id()
    program = (
        "import os, sys, time\n"
        "print(os.getpid(), flush=True)\n"
        "n = 0\n"
        "while True:\n"
        "    print(f'line {n}', flush=True); n += 1\n"
        "    time.sleep(0.02)\n"
    )
    proc = subprocess.Popen(record_cmd("app-crash", sid, *FAST, "--spool-dir", str(tmp_path / "spool"), "--",
                                       PY, "-c", program),
                            env=stack.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child = int(proc.stdout.readline())
    reader = threading.Thread(target=proc.stdout.read, daemon=True)
    reader.start()
    wait_for(lambda: len([k for k in staged_keys(stack.bucket, "app-crash", sid) if k.endswith(".gz")]) >= 3)
    proc.kill()
    proc.wait(timeout=10)

    def command_gone() -> bool:
        try:
            with open(f"/proc/{child}/stat") as stat:
                return stat.read().split(")")[1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True

    wait_for(command_gone, timeout=10)  # PR_SET_PDEATHSIG: no session runs unrecorded
    time.sleep(0.3)
    staged = read_staging(stack.bucket, "app-crash", sid)
    assert staged.opened is not None and staged.closed is None  # the sweeper files it as abandoned
    assert len(staged.chunks) >= 3
    check_chain(staged)
    text = staged.stream("o").decode()
    got = text.split("\n")
    assert got[0] == str(child)
    assert got[1:-1] == [f"line {n}" for n in range(len(got) - 2)]  # a prefix of what it printed, in order
    assert b"line" in gzip.decompress(staged.chunks[-1][2])
    assert not Path(tmp_path / "spool").exists() or not list(Path(tmp_path / "spool").rglob("*.gz"))
