"""The auditor CLI as real processes against the API and the local KMS: download, decrypt (ours and the
standard aws-encryption-cli), verify, export to asciicast for asciinema, refusals with one-line errors."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from api_support import CLI, api_world, file_session, stage_pending

from oneoff_audit import cli, export

pytestmark = pytest.mark.integration
__all__ = ["api_world"]

ENCRYPTION_CLI = str(Path(sys.executable).parent / "aws-encryption-cli")
ASCIINEMA = str(Path(sys.executable).parent / "asciinema")
# ~1.3 MB of output in 4 chunks: the log spans two 1 MiB frames; all valid UTF-8 so asciicast is exact
BIG_TEXTS = ["".join(f"chunk {c} line {n:05d}: caf\u00e9 \u20ac \U0001F600 {'x' * 40}\r\n" for n in range(4500))
             for c in range(4)]


@pytest.fixture(scope="module")
def world(api_world):
    file_session(api_world, "app1", "BIG", BIG_TEXTS, "2026-11-25T12:00:00Z")
    file_session(api_world, "app1", "SMALL", ["hello \u20ac\r\n", b"bin \xff\r\n"], "2026-11-25T12:30:00Z")
    file_session(api_world, "app2", "OTHER", ["other app\r\n"], "2026-11-25T13:00:00Z")
    stage_pending(api_world, "app1", "REC", closed=False)
    return api_world


def run(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, env=env, capture_output=True, timeout=120, cwd=cwd, start_new_session=True)


def test_download_decrypt_with_both_tools_verify_and_replay(world, tmp_path):
    enc, ours, theirs = tmp_path / "big.jsonl.enc", tmp_path / "big.jsonl", tmp_path / "stock.jsonl"
    got = run([CLI, "download", "app1", "BIG", "-o", str(enc)], world.env())
    assert got.returncode == 0, got.stderr
    assert enc.read_bytes() == world.stored("app1", "BIG")
    assert got.stderr.decode().startswith(f"wrote the encrypted log ({enc.stat().st_size} bytes, sha256 ")

    got = run([CLI, "decrypt", str(enc), "--app", "app1", "--session", "BIG"], world.env())
    assert got.returncode == 0, got.stderr
    assert ours.read_bytes() == world.plaintext["app1/BIG"]
    assert len(ours.read_bytes()) > 1 << 20  # more than one 1 MiB frame

    got = run([ENCRYPTION_CLI, "--decrypt-unsigned", "--input", str(enc), "--output", str(theirs),
               "--wrapping-keys", f"key={world.kms_key_id}", "--commitment-policy", "require-encrypt-require-decrypt",
               "--encryption-context", "purpose=oneoff-audit-log", "app=app1", "session_id=BIG", "-S"], world.env())
    assert got.returncode == 0, got.stderr
    assert theirs.read_bytes() == ours.read_bytes()

    sha = world.filed["app1/BIG"].plaintext_sha256
    got = run([CLI, "verify", str(ours), "--sha256", sha], world.env())
    assert (got.returncode, got.stderr) == (0, b""), got.stderr
    out = got.stdout.decode()
    assert f"sha256:               {sha}\n" in out and out.endswith("OK\n")
    assert "complete:             True\n" in out and "event_count:          4\n" in out

    cast = tmp_path / "big.cast"
    got = run([CLI, "export", "--format", "asciicast", str(enc), "-o", str(cast)], world.env())  # decrypts first
    assert got.returncode == 0, got.stderr
    played = run([ASCIINEMA, "cat", str(cast)], world.env())
    assert played.returncode == 0, played.stderr
    assert played.stdout == world.output["app1/BIG"]


def test_inline_download_and_api_asciicast(world, tmp_path):
    out = tmp_path / "small.jsonl"
    got = run([CLI, "download", "app1", "SMALL", "-o", str(out)], world.env())
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == world.plaintext["app1/SMALL"]  # the inline answer re-serializes byte for byte
    status, headers, body = world.get("/apps/app1/sessions/SMALL/log?format=asciicast")
    assert (status, headers["Content-Type"]) == (200, "application/x-asciicast")
    assert body == export.asciicast_bytes(world.plaintext["app1/SMALL"])
    text = [json.loads(line) for line in body.decode().splitlines()[1:]]
    assert "".join(e[2] for e in text if e[1] == "o") == "hello \u20ac\r\nbin \ufffd\r\n"


def _no_plaintext_left(directory: Path, inputs: set[str]) -> None:
    assert {p.name for p in directory.iterdir()} == inputs


def test_tampered_truncated_and_foreign_logs_are_refused_without_leftovers(world, tmp_path, capsys, monkeypatch):
    good = world.stored("app1", "BIG")
    full, rest = divmod(len(world.plaintext["app1/BIG"]), 1 << 20)
    frame = 4 + 12 + (1 << 20) + 16  # sequence number, IV, 1 MiB of content, tag
    header_len = len(good) - full * frame - (4 + 4 + 12 + 4 + rest + 16)  # the final frame: marker and length too
    assert full == 1 and good[header_len:header_len + 4] == b"\x00\x00\x00\x01"  # frame 1 starts here
    cases = {
        "flipped.enc": good[:5000] + bytes([good[5000] ^ 1]) + good[5001:],
        "flipped-last.enc": good[:-20] + bytes([good[-20] ^ 1]) + good[-19:],
        "cut-at-frame.enc": good[:header_len + frame],  # a whole frame: 1 MiB released, then the end
        "cut-mid-frame.enc": good[:header_len + frame + 1000],
        "cut-in-frame-1.enc": good[:header_len + 1000],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "other.enc").write_bytes(world.stored("app2", "OTHER"))
    inputs = {p.name for p in tmp_path.iterdir()}

    got = run([CLI, "decrypt", str(tmp_path / "cut-at-frame.enc"), "-o", str(tmp_path / "out.jsonl")], world.env())
    assert got.returncode == 2
    assert got.stderr.count(b"\n") == 1 and b"Traceback" not in got.stderr, got.stderr
    assert got.stderr.startswith(b"oneoff-audit decrypt: cannot decrypt: ")
    _no_plaintext_left(tmp_path, inputs)

    monkeypatch.setenv("AUDIT_KMS_KEY_ID", world.kms_key_id)
    for name in cases:
        assert cli.main(["decrypt", str(tmp_path / name), "-o", str(tmp_path / "out.jsonl")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("oneoff-audit decrypt: cannot decrypt: ") and err.count("\n") == 1, (name, err)
        _no_plaintext_left(tmp_path, inputs)
    assert cli.main(["decrypt", str(tmp_path / "other.enc"), "--app", "app1", "--session", "OTHER",
                     "-o", str(tmp_path / "out.jsonl")]) == 2
    assert capsys.readouterr().err == "oneoff-audit decrypt: log was encrypted for app 'app2', not 'app1'\n"
    _no_plaintext_left(tmp_path, inputs)


class _ShortServer(http.server.BaseHTTPRequestHandler):
    """Promises 1000 bytes; sends 400 and closes (or sends an honest but short 400-byte body)."""

    def do_GET(self) -> None:
        honest = self.path.endswith("honest")
        self.send_response(200)
        self.send_header("Content-Length", "400" if honest else "1000")
        self.end_headers()
        self.wfile.write(b"x" * 400)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def test_a_truncated_download_is_refused_and_leaves_nothing(tmp_path):
    from oneoff_audit.auditor import _stream_to
    from oneoff_audit.errors import IntegrityError

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ShortServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        sha = hashlib.sha256(b"x" * 1000).hexdigest()
        for path in ("/cut", "/honest"):
            with pytest.raises(IntegrityError) as err:
                _stream_to(base + path, str(tmp_path / "log.enc"), 1000, sha, progress=False)
            assert str(err.value) == "download truncated: got 400 of 1000 bytes"
            assert list(tmp_path.iterdir()) == []
    finally:
        server.shutdown()
        server.server_close()


def test_listing_showing_and_one_line_errors(world, capsys, monkeypatch):
    got = run([CLI, "sessions", "--app", "app1"], world.env("reader-token"))
    assert got.returncode == 0, got.stderr
    lines = got.stdout.decode().splitlines()
    assert lines[0].split() == ["STARTED", "SESSION", "ACTOR", "STATUS", "EXIT", "DURATION", "SIZE", "COMMAND"]
    assert [line.split()[1] for line in lines[1:]] == ["SMALL", "BIG"]
    assert lines[1].split()[2:5] == ["u-42", "succeeded", "0"] and lines[1].endswith("bash -c 'echo hi'")

    env = world.env("reader-token")
    for name in ("ONEOFF_AUDIT_API_URL", "ONEOFF_AUDIT_TOKEN"):
        monkeypatch.setenv(name, env[name])
    assert cli.main(["sessions", "--app", "app1", "--json", "--limit", "1", "--all"]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["session_id"] for e in entries] == ["SMALL", "BIG"]
    assert cli.main(["sessions", "--app", "app2"]) == 2
    assert capsys.readouterr().err == \
        "oneoff-audit sessions: 403 forbidden: not allowed to read app 'app2'\n"
    assert cli.main(["show", "app1", "REC"]) == 75
    assert capsys.readouterr().err == "oneoff-audit show: the session is still recording; try again later\n"
    assert cli.main(["show", "app1", "NOPE"]) == 2
    assert capsys.readouterr().err == "oneoff-audit show: 404 not_found: no session 'NOPE' in app 'app1'\n"
    assert cli.main(["show", "app1", "SMALL", "--access"]) == 0
    shown = capsys.readouterr().out
    assert "session:      app1 / SMALL\n" in shown and "complete:     True\n" in shown
    assert "viewed:" in shown and "u-reader details" in shown
    assert cli.main(["sessions", "--app", "app1", "--api-url", "http://127.0.0.1:9"]) == 2
    assert capsys.readouterr().err.startswith(
        "oneoff-audit sessions: cannot reach the API at http://127.0.0.1:9: ")
    monkeypatch.delenv("ONEOFF_AUDIT_API_URL")
    assert cli.main(["sessions", "--app", "app1"]) == 2
    assert capsys.readouterr().err == \
        "oneoff-audit sessions: no API URL: pass --api-url or set ONEOFF_AUDIT_API_URL\n"
    assert cli.main(["sessions", "--app", "../x", "--api-url", "http://127.0.0.1:9"]) == 2
    assert capsys.readouterr().err.startswith("oneoff-audit sessions: invalid app id '../x'")


def test_verify_and_export_of_a_bad_file_fail_in_one_line(world, tmp_path, capsys):
    plain = world.plaintext["app1/SMALL"]
    bad = tmp_path / "bad.jsonl"
    lines = plain.split(b"\n")
    bad.write_bytes(b"\n".join(lines[:1] + lines[2:]))  # an event line removed
    assert cli.main(["verify", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.err == ("oneoff-audit verify: FAILED: events per stream {'i': 0, 'o': 3, 'e': 0, 'r': 0, 'm': 0} "
                            "differ from the trailer's {'i': 0, 'o': 4, 'e': 0, 'r': 0, 'm': 0}; 3 events, the "
                            "trailer says 4; bytes per stream {'i': 0, 'o': 7, 'e': 0} differ from the trailer's "
                            "{'i': 0, 'o': 18, 'e': 0}\n")
    assert cli.main(["export", "--format", "text", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("oneoff-audit export: cannot read ")


def test_runner_controlled_text_never_reaches_the_terminal_raw(world, capsys, monkeypatch):
    import helpers_staging as staging

    from oneoff_audit.assemble import assemble_session
    from oneoff_audit.config import AssemblerConfig

    opened = staging.session_header("app4", "HOSTILE", started_at="2026-11-25T09:00:00Z")
    opened["command"]["argv"] = ["bash", "-c", "printf '\x1b]52;c;cm0gLXJmIH4K\x07'", "\u202egnp.exe"]
    opened["actor"] = {"id": "u\x1b[2J", "name": "Ada\x1b[H\u009b31m", "type": "user", "source_ip": None}
    opened["target"] = {"org": "acme\x1b[1A\x1b[2Kforged\nline\x7f"}
    chunks = staging.build_chunks("app4", "HOSTILE", [staging.output_events(["x\r\n"])])
    staging.stage(world.bucket, chunks, opened=opened)
    assemble_session(AssemblerConfig.from_env(), "app4", "HOSTILE")
    monkeypatch.setenv("ONEOFF_AUDIT_API_URL", world.api_url)
    monkeypatch.setenv("ONEOFF_AUDIT_TOKEN", "admin-token")
    control = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80[\xae\xab-\xad]")
    outputs = {}
    for argv in (["sessions", "--app", "app4"], ["sessions", "--app", "app4", "--json"],
                 ["show", "app4", "HOSTILE"], ["show", "app4", "HOSTILE", "--json"]):
        assert cli.main(argv) == 0
        outputs[" ".join(argv)] = capsys.readouterr().out
        assert not control.search(outputs[" ".join(argv)].encode()), argv
    shown = outputs["show app4 HOSTILE"]
    assert "\\x1b]52;c;cm0gLXJmIH4K\\x07" in shown and " '\\u202egnp.exe'\n" in shown
    assert "target:       org=acme\\x1b[1A\\x1b[2Kforged\\x0aline\\x7f\n" in shown
    entry = json.loads(outputs["sessions --app app4 --json"])
    assert entry["actor"]["name"] == "Ada\x1b[H\u009b31m"  # escaped on the terminal, exact in the data
