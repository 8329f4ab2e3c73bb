"""End to end over real HTTP: a real PTY session recorded, filed by the assembler, read back by the API.

The recorded program puts its own terminal in raw mode (no echo, no line discipline), so the bytes
it reads are exactly the bytes typed, and the bytes it writes are exactly the bytes printed. It
keeps its own copy of both; the test compares them with what the API returns.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from oneoff_audit.codec import join_data
from oneoff_audit.ids import new_session_id

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "oneoff-audit")

PROGRAM = r"""
import os, sys, tty
tty.setraw(0)
read_log = open(sys.argv[1], "wb", buffering=0)
write_log = open(sys.argv[2], "wb", buffering=0)
def out(data):
    os.write(1, data)
    write_log.write(data)
out(b"READY\r\n")
received = b""
while not received.endswith(b"<END>"):
    data = os.read(0, 4096)
    if not data:
        break
    read_log.write(data)
    received += data
    out(b"got " + str(len(data)).encode() + b": " + data.replace(b"<END>", b"") + b"\r\n")
out("caf\u00e9 \u20ac \xff\xfe done\r\n".encode("utf-8", "surrogateescape") + b"\xff\xfe\r\n")
"""


@pytest.fixture
def local_stack(moto_endpoint):
    """The embedded stack (`oneoff-audit local`) in this process, on the shared moto server."""
    from oneoff_audit import local
    from oneoff_audit.aws import reset_clients

    saved = dict(os.environ)
    stack = local.start(port=0, endpoint=moto_endpoint, bucket=f"e2e-{new_session_id().lower()}")
    yield stack
    stack.stop()
    os.environ.clear()
    os.environ.update(saved)
    reset_clients()


def api_get(stack, path: str) -> tuple[int, dict]:
    request = urllib.request.Request(stack.api_url + path, headers={"Authorization": f"Bearer {stack.admin_token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def test_pty_session_bytes_survive_capture_assembly_and_api(local_stack, tmp_path):
    session_id = new_session_id()
    read_log, write_log = tmp_path / "read.bin", tmp_path / "written.bin"
    env = {**os.environ, **local_stack.env()}
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [CLI, "record", "--app", "e2e-app", "--actor-id", "u-7", "--actor-name", "Eve", "--target", "region=test",
         "--tty", "always", "--session-id", session_id, "--",
         sys.executable, "-c", PROGRAM, str(read_log), str(write_log)],
        stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
    )
    os.close(slave)
    screen = bytearray()

    def pump(until: bytes, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while until not in screen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    screen.extend(os.read(master, 65536))
                except OSError:
                    return

    pump(b"READY")
    typed = [b"hello\r", "h\u00e9llo \u20ac".encode(), bytes(range(1, 128)), bytes(range(128, 256)), b"<END>"]
    for piece in typed:
        os.write(master, piece)
        time.sleep(0.05)
    pump(b"done")
    assert proc.wait(timeout=30) == 0
    pump(b"\x00", timeout=0.5)
    os.close(master)

    deadline = time.monotonic() + 60
    status, body = api_get(local_stack, f"/apps/e2e-app/sessions/{session_id}/log")
    while status == 202 and time.monotonic() < deadline:
        time.sleep(0.2)
        status, body = api_get(local_stack, f"/apps/e2e-app/sessions/{session_id}/log")
    assert status == 200, body
    events = body["events"]
    stdin_bytes = join_data(d for _, s, d in events if s == "i")
    stdout_bytes = join_data(d for _, s, d in events if s == "o")
    assert stdin_bytes == read_log.read_bytes() == b"".join(typed)
    assert stdout_bytes == write_log.read_bytes()
    assert body["header"]["actor"]["id"] == "u-7"
    assert body["header"]["target"] == {"region": "test"}
    assert body["header"]["command"]["tty"] is True
    assert body["trailer"]["status"] == "succeeded"
    assert body["trailer"]["exit"] == {"code": 0, "signal": None}
    assert body["trailer"]["complete"] is True
    assert body["trailer"]["bytes"]["i"] == len(stdin_bytes)
    assert body["trailer"]["bytes"]["o"] == len(stdout_bytes)
    # readable text stays text: the euro sign is a plain string in some stdout event
    assert any(isinstance(d, str) and "\u20ac" in d for _, s, d in events if s == "o")

    # the index entry is written right after the log (log -> manifest -> index -> staging removed)
    status, timeline = api_get(local_stack, "/apps/e2e-app/sessions")
    while status == 200 and not timeline["sessions"] and time.monotonic() < deadline:
        time.sleep(0.2)
        status, timeline = api_get(local_stack, "/apps/e2e-app/sessions")
    assert status == 200
    assert [s["session_id"] for s in timeline["sessions"]] == [session_id]
