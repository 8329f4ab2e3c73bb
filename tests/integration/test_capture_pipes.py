"""The capture agent in non-interactive mode (pipes), with real processes and the moto server.

Byte-exact stdout (all 256 values, 100 MB, a character split across two chunks), stderr kept apart,
stdin forwarded with its EOF, exit codes and deaths by signal reported right.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys

import pytest
from capture_support import check_chain, read_staging, record_cmd

from oneoff_audit.ids import new_session_id

pytestmark = pytest.mark.integration

PY = sys.executable


def run(stack, *args: str, input: bytes = b"", timeout: float = 60, **kwargs):
    return subprocess.run([*args], input=input, env=stack.env(), capture_output=True, timeout=timeout, **kwargs)


def test_all_256_byte_values_on_stdout_exact_and_header_written(stack, tmp_path):
    sid = new_session_id()
    payload = bytes(range(256)) * 4 + b"\xe2\x82"  # ends inside a character: released whole at the end
    env = {**stack.env(), "CAPTURE_TEST_SECRET": "value-never-recorded"}
    proc = subprocess.run(
        record_cmd("app-bytes", sid, "--tty", "never", "--target", "region=eu-1", "--actor-name", "Tess",
                   "--source-ip", "10.1.2.3", "--spool-dir", str(tmp_path / "spool"), "--",
                   PY, "-c", f"import sys; sys.stdout.buffer.write({payload!r})", "ärg\udcff", cli=True),
        env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == payload
    assert proc.stderr == b""  # the agent prints nothing of its own
    staged = read_staging(stack.bucket, "app-bytes", sid)
    check_chain(staged)
    assert staged.stream("o") == payload
    assert staged.stream("e") == b"" and staged.stream("i") == b""
    header = staged.opened
    assert header["session_id"] == sid and header["app"] == "app-bytes"
    assert header["actor"] == {"id": "tester", "name": "Tess", "type": "user", "source_ip": "10.1.2.3"}
    assert header["target"] == {"region": "eu-1"}
    assert header["command"]["tty"] is False and header["command"]["term_size"] is None
    assert header["command"]["argv"][:2] == [PY, "-c"]
    assert header["command"]["argv"][3] == {"b64": "w6RyZ/8="}  # 'ärg' + byte 0xff: not valid UTF-8
    assert "CAPTURE_TEST_SECRET" in header["command"]["env_keys"]
    assert b"value-never-recorded" not in b"".join(raw for _h, _e, raw in staged.chunks)
    assert "value-never-recorded" not in str(header)
    closed = staged.closed
    assert closed["status"] == "succeeded" and closed["exit"] == {"code": 0, "signal": None}
    assert closed["bytes"] == {"i": 0, "o": len(payload), "e": 0}
    assert closed["lost_bytes"] == 0 and closed["withheld_input_bytes"] == 0 and closed["reason"] is None
    assert staged.keys[-1].endswith("opened.json")  # sorted keys: closed.json, chunks/..., opened.json
    assert not (tmp_path / "spool").exists() or not any((tmp_path / "spool").rglob("*.gz"))


def test_stderr_apart_from_stdout_and_stdin_forwarded_with_eof(stack):
    sid = new_session_id()
    program = (
        "import sys\n"
        "data = sys.stdin.buffer.read()\n"  # returns only at EOF: the agent must forward it
        "sys.stdout.buffer.write(b'out:' + data); sys.stdout.flush()\n"
        "sys.stderr.buffer.write(b'err:' + data[::-1]); sys.stderr.flush()\n"
        "sys.stdout.buffer.write(b'|done'); sys.exit(1)\n"
    )
    stdin = "stdin bytes \u20ac\n".encode() + b"\x00\xff"
    proc = run(stack, *record_cmd("app-pipes", sid, "--tty", "auto", "--", PY, "-c", program), input=stdin)
    assert proc.returncode == 1
    assert proc.stdout == b"out:" + stdin + b"|done"
    assert proc.stderr == b"err:" + stdin[::-1]
    staged = read_staging(stack.bucket, "app-pipes", sid)
    check_chain(staged)
    assert staged.stream("i") == stdin
    assert staged.stream("o") == b"out:" + stdin + b"|done"
    assert staged.stream("e") == b"err:" + stdin[::-1]
    assert staged.closed["bytes"] == {"i": len(stdin), "o": len(stdin) + 9, "e": len(stdin) + 4}
    assert staged.closed["status"] == "failed" and staged.closed["exit"] == {"code": 1, "signal": None}
    times = [e[0] for e in staged.events]
    assert times == sorted(times)


def test_exit_codes_and_deaths_by_signal(stack):
    # Exit codes 0 and 1 are checked by the tests above; these run concurrently to save time.
    cases = {
        "forty-two": ("import sys; sys.exit(42)", 42, {"code": 42, "signal": None}, "failed"),
        "sigkill": ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 137, {"code": None, "signal": 9},
                    "killed"),
        "sigterm": ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 143, {"code": None, "signal": 15},
                    "killed"),
    }
    sids = {name: new_session_id() for name in cases}
    procs = {
        name: subprocess.Popen(record_cmd(f"app-{name}", sids[name], "--tty", "never", "--", PY, "-c", program),
                               env=stack.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        for name, (program, *_rest) in cases.items()
    }
    for name, (_program, code, exit_obj, status) in cases.items():
        out, err = procs[name].communicate(timeout=60)
        assert procs[name].returncode == code, (name, err)
        assert out == b"" and err == b""
        staged = read_staging(stack.bucket, f"app-{name}", sids[name])
        assert staged.closed["exit"] == exit_obj
        assert staged.closed["status"] == status
        assert staged.closed["chunk_count"] == 0 and staged.chunks == []
        signal_name = {9: "SIGKILL", 15: "SIGTERM"}.get(exit_obj["signal"])
        assert staged.closed["reason"] == (f"killed by {signal_name}" if signal_name else None)


def test_command_that_cannot_start_is_recorded_with_exit_127(stack):
    sid = new_session_id()
    proc = run(stack, *record_cmd("app-noexec", sid, "--tty", "never", "--", "/nonexistent/tool", "x"))
    assert proc.returncode == 127
    assert proc.stderr == b"oneoff-audit: cannot run /nonexistent/tool: No such file or directory\n"
    staged = read_staging(stack.bucket, "app-noexec", sid)
    assert staged.stream("e") == proc.stderr
    assert staged.closed["exit"] == {"code": 127, "signal": None}
    assert staged.closed["reason"] == "command could not be started: No such file or directory"


def test_utf8_character_split_across_two_chunks_is_written_whole(stack):
    sid = new_session_id()
    program = (
        "import os, time\n"
        "os.write(1, b'price: 12 \\xe2\\x82')\n"  # first two bytes of the euro sign...
        "time.sleep(0.5)\n"  # ...the chunk closes by age meanwhile...
        "os.write(1, b'\\xac and \\xf0\\x9f')\n"  # ...the third byte, then half of an emoji
        "time.sleep(0.5)\n"
        "os.write(1, b'\\x8e\\x89 ok\\n')\n"
    )
    proc = run(stack, *record_cmd("app-utf8", sid, "--tty", "never", "--chunk-seconds", "0.2", "--",
                                  PY, "-c", program))
    assert proc.returncode == 0, proc.stderr
    staged = read_staging(stack.bucket, "app-utf8", sid)
    check_chain(staged)
    assert len(staged.chunks) == 3
    per_chunk = [[e[2] for e in events if e[1] == "o"] for _h, events, _raw in staged.chunks]
    assert per_chunk == [["price: 12 "], ["\u20ac and "], ["\U0001f389 ok\n"]]
    assert staged.stream("o") == "price: 12 \u20ac and \U0001f389 ok\n".encode()


GENERATOR = r'''
def blocks():
    line = ("{:07d} the quick brown fox jumps over the lazy dog \u2014 "
            "\u00fcn\u00efc\u00f8d\u00e9 \u20ac \U0001f389 \u00bd\n")
    block = "".join(line.format(i) for i in range(12000)).encode()
    for k in range(int(TOTAL // len(block)) + 1):
        yield (b"[%d]" % k) + block
'''


def _generated(total: int):
    namespace = {"TOTAL": total}
    exec(GENERATOR, namespace)
    return namespace["blocks"]()


def test_100_mb_of_output_hashes_equal_after_capture_and_assembly(stack, tmp_path):
    total = 100_000_000
    sid = new_session_id()
    program = (
        f"import os\nTOTAL = {total}\n{GENERATOR}\n"
        "step = 65521\n"  # writes that cut multi-byte characters all over the place
        "for block in blocks():\n"
        "    for i in range(0, len(block), step):\n"
        "        view = memoryview(block)[i:i + step]\n"
        "        while view:\n"
        "            view = view[os.write(1, view):]\n"
    )
    expected = hashlib.sha256()
    size = 0
    for block in _generated(total):
        expected.update(block)
        size += len(block)
    assert size >= total
    # 8 MiB chunks (the largest allowed) keep the test fast: 13 objects instead of 97 through moto.
    proc = subprocess.run(record_cmd("app-big", sid, "--tty", "never", "--chunk-bytes", "8M", "--", PY, "-c", program),
                          env=stack.env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 0, proc.stderr
    staged = read_staging(stack.bucket, "app-big", sid)
    check_chain(staged)
    got = hashlib.sha256()
    for _header, events, _raw in staged.chunks:
        for event in events:
            assert event[1] == "o" and isinstance(event[2], str)  # valid UTF-8 stays text, never split
            got.update(event[2].encode())
    assert got.hexdigest() == expected.hexdigest()
    assert staged.closed["bytes"]["o"] == size
    for header, events, _raw in staged.chunks[:-1]:  # sealed at >= 8 MiB, overshooting by less than one read
        assert (8 << 20) <= sum(len(e[2].encode()) for e in events) < (8 << 20) + 65536, header["seq"]

    assemble = pytest.importorskip("oneoff_audit.assemble")
    if not hasattr(assemble, "assemble_session"):
        return
    from oneoff_audit import formats, keys
    from oneoff_audit.aws import client
    from oneoff_audit.config import AssemblerConfig
    from oneoff_audit.crypto import decrypt_to_file

    config = AssemblerConfig.from_env()
    assemble.assemble_session(config, "app-big", sid)
    encrypted = tmp_path / "log.enc"
    client("s3").download_file(stack.bucket, keys.log_key("app-big", sid), str(encrypted))
    plain = tmp_path / "log.jsonl"
    with open(encrypted, "rb") as source:
        decrypt_to_file(source, plain, config.kms_key_id, "app-big", sid)
    assembled = hashlib.sha256()
    with open(plain, "rb") as log:
        for kind, value in formats.iter_log_lines(log):
            if kind == "event" and value[1] == "o":
                assembled.update(formats.event_bytes(value))
            elif kind == "trailer":
                assert value["complete"] is True and value["status"] == "succeeded"
    assert assembled.hexdigest() == expected.hexdigest()


def test_agent_forwards_sigterm_to_the_command(stack):
    sid = new_session_id()
    program = ("import signal, sys, time\n"
               "signal.signal(signal.SIGTERM, lambda *a: (print('got TERM', flush=True), sys.exit(7)))\n"
               "print('ready', flush=True)\n"
               "time.sleep(30)\n")
    proc = subprocess.Popen(record_cmd("app-term", sid, "--tty", "never", "--", PY, "-c", program),
                            env=stack.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 7, err
    assert out == b"got TERM\n"
    staged = read_staging(stack.bucket, "app-term", sid)
    assert staged.stream("o") == b"ready\ngot TERM\n"
    assert staged.closed["exit"] == {"code": 7, "signal": None}


def test_broken_stdout_reader_gives_the_command_sigpipe(stack):
    sid = new_session_id()
    reader = subprocess.Popen(["head", "-c", "5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    proc = subprocess.Popen(record_cmd("app-pipe", sid, "--tty", "never", "--", "yes"),
                            env=stack.env(), stdin=subprocess.DEVNULL, stdout=reader.stdin, stderr=subprocess.PIPE)
    reader.stdin.close()
    assert reader.stdout.read() == b"y\ny\ny"
    reader.wait(timeout=10)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGPIPE, err  # as `yes | head` would end without the agent
    staged = read_staging(stack.bucket, "app-pipe", sid)
    assert staged.stream("o").startswith(b"y\ny\ny\n")
    assert staged.closed["exit"] == {"code": None, "signal": signal.SIGPIPE}
    assert staged.closed["status"] == "killed"
