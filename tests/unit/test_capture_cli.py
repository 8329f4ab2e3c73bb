"""`record` and `flush-spool` arguments, the session header and close marker, exit status mapping."""

from __future__ import annotations

import argparse
import os

import pytest

from oneoff_audit.capture import cli as capture_cli
from oneoff_audit.capture.agent import RecordOptions, close_marker, session_header
from oneoff_audit.capture.recorder import ChunkTotals
from oneoff_audit.capture.relay import ExitStatus
from oneoff_audit.cli import main
from oneoff_audit.errors import FormatError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("1048576", 1 << 20), ("64K", 64 << 10), ("1M", 1 << 20),
                                             ("2g", 2 << 30), ("16MiB", 16 << 20), ("3KB", 3 << 10)])
def test_sizes(text, value):
    assert capture_cli._size(text) == value


@pytest.mark.parametrize("text", ["", "M", "1.5M", "-1", "ten"])
def test_bad_sizes(text):
    with pytest.raises(argparse.ArgumentTypeError):
        capture_cli._size(text)


def test_targets():
    assert capture_cli._target("region=eu-1") == ("region", "eu-1")
    assert capture_cli._target("k=a=b") == ("k", "a=b")
    for bad in ("noequals", "=value"):
        with pytest.raises(argparse.ArgumentTypeError):
            capture_cli._target(bad)


def test_record_without_a_command_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setenv("AUDIT_BUCKET", "bucket")
    assert main(["record", "--app", "app1", "--actor-id", "u", "--"]) == 2
    assert "no command given" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "bad key=1"], "session header: target"),
    (["--source-ip", "not-an-ip"], "--source-ip"),
    (["--target", "a=1", "--target", "a=2"], "--target a given twice"),
    (["--session-id", "../x"], "invalid session id"),
    (["--chunk-bytes", "9M"], "--chunk-bytes must be between 1 and 8388608"),
    (["--chunk-bytes", "0"], "--chunk-bytes must be between 1 and 8388608"),
    (["--", "x" * 300_000], "session header: command: "),
])
def test_invalid_session_metadata_means_the_command_never_runs(args, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("AUDIT_BUCKET", "bucket")
    marker = tmp_path / "ran"
    command = ["touch", str(marker)] if "--" not in args else []
    code = main(["record", "--app", "app1", "--actor-id", "u", "--spool-dir", str(tmp_path / "spool"), *args,
                 *(["--"] if command else []), *command])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not marker.exists()


def test_record_needs_the_bucket(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("AUDIT_BUCKET", raising=False)
    assert main(["record", "--app", "app1", "--actor-id", "u", "--", "touch", str(tmp_path / "ran")]) == 2
    assert "AUDIT_BUCKET" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists()


def test_session_header_keeps_argv_bytes_and_env_keys_only():
    opts = RecordOptions(app="app1", actor_id="u-1", command=["echo", "caf\u00e9", os.fsdecode(b"\xff\xfe")],
                         bucket="b", target={"org": "acme"}, actor_name="Ann", source_ip="::1")
    header = session_header(opts, "S1", tty=True, term_size=(120, 40), env_keys=["PATH", "HOME"],
                            started_at="2026-11-25T14:46:00.123456Z")
    assert header["command"] == {"argv": ["echo", "caf\u00e9", {"b64": "//4="}], "tty": True,
                                 "term_size": {"cols": 120, "rows": 40}, "env_keys": ["HOME", "PATH"]}
    assert header["actor"] == {"id": "u-1", "name": "Ann", "type": "user", "source_ip": "::1"}
    assert header["options"] == {"record_hidden_input": False, "chunk_max_bytes": 1 << 20, "chunk_max_seconds": 5.0}
    with pytest.raises(FormatError):
        session_header(RecordOptions(app="app1", actor_id="", command=["x"], bucket="b"), "S1", tty=False,
                       term_size=None, env_keys=[], started_at="2026-11-25T14:46:00.123456Z")


@pytest.mark.parametrize(("status", "code", "sig", "exit_code", "name"), [
    (0, 0, None, 0, "succeeded"), (1 << 8, 1, None, 1, "failed"), (42 << 8, 42, None, 42, "failed"),
    (9, None, 9, 137, "killed"), (15, None, 15, 143, "killed"),
])
def test_exit_status_mapping(status, code, sig, exit_code, name):
    result = ExitStatus.from_wait(status)
    assert (result.code, result.signal, result.exit_code, result.status) == (code, sig, exit_code, name)


def test_close_marker_is_validated():
    totals = ChunkTotals(chunk_sha256=["a" * 64], event_count=3, data_bytes={"i": 1, "o": 2, "e": 0}, lost_bytes=5)
    marker = close_marker("app1", "S1", ExitStatus(None, 9), "killed by SIGKILL", totals, 4,
                          "2026-11-25T14:47:00.000000Z")
    assert marker["exit"] == {"code": None, "signal": 9} and marker["status"] == "killed"
    assert marker["chunk_count"] == 1 and marker["lost_bytes"] == 5 and marker["withheld_input_bytes"] == 4
    with pytest.raises(FormatError):
        close_marker("app1", "S1", ExitStatus(0, None), None, ChunkTotals(chunk_sha256=["nothex"]), 0,
                     "2026-11-25T14:47:00.000000Z")
