"""The capture agent in interactive mode: a real PTY for the user, another one for the command.

The test plays the user's terminal: it holds the master of a PTY whose slave is the agent's
stdin/stdout/stderr and controlling terminal (``setsid -c``), so window-size changes reach the
agent as SIGWINCH from the kernel, as they would from a terminal emulator.
"""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
from capture_support import check_chain, read_staging, read_until, record_cmd

from oneoff_audit.ids import new_session_id

pytestmark = pytest.mark.integration

PY = sys.executable

ECHO_PROGRAM = r"""
import fcntl, os, signal, struct, sys, termios, tty
tty.setraw(0)  # the command's own terminal: no echo, no line discipline, bytes as they are
def size():
    rows, cols = struct.unpack("HHHH", fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8))[:2]
    return f"{cols}x{rows}"
signal.signal(signal.SIGWINCH, lambda *a: os.write(1, f"SIZE {size()}\r\n".encode()))
os.write(1, f"READY {size()}\r\n".encode())
received = b""
while not received.endswith(b"<END>"):
    data = os.read(0, 4096)
    if not data:
        break
    received += data
os.write(1, b"GOT " + str(len(received)).encode() + b" " + received.hex().encode() + b"\r\n")
"""

PASSWORD_PROGRAM = r"""
import os, sys, termios
old = termios.tcgetattr(0)
new = list(old)
new[3] &= ~termios.ECHO
termios.tcsetattr(0, termios.TCSAFLUSH, new)   # as getpass() does
os.write(1, b"Password: ")
secret = sys.stdin.readline()
termios.tcsetattr(0, termios.TCSAFLUSH, old)
os.write(1, f"\nlength {len(secret.strip())}\n".encode())
visible = sys.stdin.readline()
os.write(1, b"bye " + visible.strip().encode() + b"\n")
"""


class Terminal:
    """The user's side: a PTY whose slave becomes the agent's controlling terminal."""

    def __init__(self, cols: int = 91, rows: int = 27) -> None:
        self.master, self.slave = pty.openpty()
        self.resize(cols, rows)
        self.attrs_before = termios.tcgetattr(self.slave)
        self.screen = bytearray()

    def resize(self, cols: int, rows: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def start(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["setsid", "-c", *args], stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                env=env)

    def wait_for(self, needle: bytes, timeout: float = 20) -> bytes:
        read_until(self.master, needle, self.screen, timeout)
        assert needle in self.screen, bytes(self.screen)
        return bytes(self.screen)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminal():
    term = Terminal()
    yield term
    term.close()


def test_typed_bytes_resize_and_terminal_restored(stack, terminal):
    sid = new_session_id()
    proc = terminal.start(record_cmd("app-pty", sid, "--", PY, "-c", ECHO_PROGRAM, cli=True), stack.env())
    terminal.wait_for(b"READY 91x27\r\n")
    assert termios.tcgetattr(terminal.slave) != terminal.attrs_before  # raw while the session runs
    terminal.resize(100, 40)  # the kernel sends SIGWINCH to the agent, which passes the size on
    terminal.wait_for(b"SIZE 100x40\r\n")
    typed = [bytes(range(0, 128)), "h\u00e9llo \u20ac ".encode(), bytes(range(128, 256)), b"<END>"]
    for piece in typed:
        terminal.type(piece)
        time.sleep(0.05)
    expected = b"".join(typed)
    terminal.wait_for(b"GOT %d %s\r\n" % (len(expected), expected.hex().encode()))
    assert proc.wait(timeout=30) == 0
    assert termios.tcgetattr(terminal.slave) == terminal.attrs_before  # restored

    staged = read_staging(stack.bucket, "app-pty", sid)
    check_chain(staged)
    assert staged.opened["command"]["tty"] is True
    assert staged.opened["command"]["term_size"] == {"cols": 91, "rows": 27}
    assert staged.stream("i") == expected
    assert [e[2] for e in staged.events if e[1] == "r"] == ["100x40"]
    output = staged.stream("o")
    assert output == bytes(terminal.screen)  # the user saw exactly what was recorded
    assert output.index(b"READY") < output.index(b"SIZE 100x40") < output.index(b"GOT ")
    closed = staged.closed
    assert closed["status"] == "succeeded" and closed["bytes"]["i"] == len(expected)
    assert closed["bytes"]["o"] == len(output)


@pytest.mark.parametrize("record_hidden", [False, True])
def test_password_prompt_input_is_withheld(stack, terminal, record_hidden):
    sid = new_session_id()
    extra = ["--record-hidden-input"] if record_hidden else []
    proc = terminal.start(record_cmd("app-secret", sid, *extra, "--", PY, "-c", PASSWORD_PROGRAM), stack.env())
    terminal.wait_for(b"Password: ")
    terminal.type(b"hunter2-s3cr")
    time.sleep(0.05)
    terminal.type(b"et\r")
    terminal.wait_for(b"length 14")
    terminal.type(b"visible\r")
    terminal.wait_for(b"bye visible")
    assert proc.wait(timeout=30) == 0
    assert termios.tcgetattr(terminal.slave) == terminal.attrs_before

    staged = read_staging(stack.bucket, "app-secret", sid)
    check_chain(staged)
    assert b"hunter2" not in bytes(terminal.screen)  # the program did not echo it
    plain = b"".join(__import__("gzip").decompress(raw) for _h, _e, raw in staged.chunks)
    if record_hidden:
        assert staged.stream("i") == b"hunter2-s3cret\rvisible\r"
        assert staged.markers("input-withheld") == []
        assert staged.closed["withheld_input_bytes"] == 0
    else:
        assert b"hunter2" not in plain and b"s3cret" not in plain
        assert staged.stream("i") == b"visible\r"
        assert staged.markers("input-withheld") == [{"kind": "input-withheld", "bytes": 15}]
        assert staged.closed["withheld_input_bytes"] == 15
        assert staged.opened["options"]["record_hidden_input"] is False
    assert b"visible" in staged.stream("o")  # echoed by the PTY once echo was back on


def test_sigterm_to_agent_reaches_command_and_terminal_is_restored(stack, terminal):
    sid = new_session_id()
    program = "import os, time\nos.write(1, b'ready\\n')\ntime.sleep(60)\n"
    proc = terminal.start(record_cmd("app-pty-term", sid, "--", PY, "-c", program), stack.env())
    terminal.wait_for(b"ready")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert termios.tcgetattr(terminal.slave) == terminal.attrs_before
    staged = read_staging(stack.bucket, "app-pty-term", sid)
    assert staged.closed["exit"] == {"code": None, "signal": signal.SIGTERM}
    assert staged.closed["status"] == "killed"
    assert staged.closed["reason"] == "killed by SIGTERM"
    assert staged.stream("o") == b"ready\r\n"  # the PTY's ONLCR, exactly as the terminal showed it
