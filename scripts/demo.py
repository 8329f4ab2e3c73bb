"""`make demo`: start the embedded stack, record two real sessions, show the timeline and the logs.

1. `oneoff-audit local` starts (moto server for S3/KMS/SQS, assembler, API) on free loopback ports.
2. An interactive bash session is recorded in a real PTY; the demo types into it, including a
   password typed with echo off (the agent withholds it).
3. The demo waits until the assembler has filed the log, prints the app's timeline and the
   decrypted log as the API returns it inline.
4. A non-interactive session printing ~1.5 MB is recorded; the API answers with a presigned
   download URL; the demo downloads it, decrypts it and verifies it.
5. Everything is stopped; no process is left running.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from oneoff_audit.ids import new_session_id

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLI = str(BIN / "oneoff-audit")
APP = "demo-shop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def title(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def api(env: dict[str, str], path: str) -> tuple[int, Any]:
    request = urllib.request.Request(env["ONEOFF_AUDIT_API_URL"] + path,
                                     headers={"Authorization": f"Bearer {env['ONEOFF_AUDIT_TOKEN']}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def wait_filed(env: dict[str, str], session_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = api(env, f"/apps/{APP}/sessions/{session_id}")
        if status == 200:
            return body
        if status != 202:
            raise SystemExit(f"demo: unexpected answer {status} for session {session_id}: {body}")
        time.sleep(0.3)
    raise SystemExit(f"demo: session {session_id} was not filed within {timeout:.0f} s")


def record_interactive(env: dict[str, str]) -> str:
    """Run bash under `oneoff-audit record` in a PTY and type into it like a person would."""
    session_id = new_session_id()
    argv = [CLI, "record", "--app", APP, "--actor-id", "u-1842", "--actor-name", "Alice Martin",
            "--actor-type", "user", "--source-ip", "203.0.113.7", "--target", "region=eu-west-1",
            "--target", "container=one-off.4821", "--tty", "always"]
    argv += ["--session-id", session_id, "--", "bash", "--noprofile", "--norc"]
    master, slave = pty.openpty()
    child_env = {**env, "PS1": "$ ", "TERM": "xterm"}
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=child_env, start_new_session=True)
    os.close(slave)
    seen = bytearray()

    def read_until(marker: bytes, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    return
                seen.extend(data)
                sys.stdout.write(data.decode("utf-8", "replace"))
                sys.stdout.flush()

    script = [
        (b"$ ", b"echo \"hotfix for $HOSTNAME\"; printf 'caf\\303\\251 \\342\\202\\254 ok\\n'\n"),
        (b"$ ", b"read -s -p 'DB password: ' pw; echo; echo \"password has ${#pw} characters\"\n"),
        (b"DB password: ", b"hunter2-secret\n"),
        (b"characters", b"ls / | head -3\n"),
        (b"$ ", b"exit 3\n"),
    ]
    for marker, line in script:
        read_until(marker)
        seen.clear()
        time.sleep(0.1)
        os.write(master, line)
    read_until(b"\x00", timeout=3)  # drain until the shell exits
    code = proc.wait(timeout=30)
    os.close(master)
    print(f"\n[record exited with {code}, the command's own exit code]")
    return session_id


def render_log(body: dict[str, Any]) -> None:
    header, trailer = body["header"], body["trailer"]
    print(f"who:      {header['actor']['name']} ({header['actor']['id']}, {header['actor']['type']}) "
          f"from {header['actor']['source_ip']}")
    print(f"what:     {' '.join(a if isinstance(a, str) else '<bytes>' for a in header['command']['argv'])} "
          f"(tty={header['command']['tty']})")
    print(f"target:   app={header['app']} {header['target']}")
    print(f"started:  {header['started_at']}   ended: {trailer['ended_at']}   status: {trailer['status']} "
          f"exit={trailer['exit']}")
    print(f"integrity: complete={trailer['complete']} chunks={trailer['chunk_count']} "
          f"chain={str(trailer['chain_sha256'])[:16]}… bytes={trailer['bytes']} "
          f"withheld={trailer['withheld_input_bytes']}")
    print("events:")
    for t, stream, data in body["events"]:
        label = {"i": "typed ", "o": "output", "e": "stderr", "r": "resize", "m": "marker"}[stream]
        shown = json.dumps(data, ensure_ascii=False)
        print(f"  {t:9.6f}  {label}  {shown[:100]}")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="oneoff-audit-demo-"))
    env_file = work / "local.env"
    base_env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL"):
        base_env.pop(name, None)
    base_env.update(AWS_ACCESS_KEY_ID="local", AWS_SECRET_ACCESS_KEY="local", AWS_DEFAULT_REGION="us-east-1")
    title("Starting the embedded stack: oneoff-audit local")
    local = subprocess.Popen([CLI, "local", "--port", str(free_port()), "--s3-port", str(free_port()),
                              "--env-file", str(env_file)], env=base_env, start_new_session=True)
    started = time.monotonic()
    try:
        while not env_file.exists():
            if local.poll() is not None or time.monotonic() - started > 60:
                raise SystemExit("demo: `oneoff-audit local` did not start")
            time.sleep(0.2)
        env = {**base_env, **dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)}
        print(f"API {env['ONEOFF_AUDIT_API_URL']}   S3/KMS/SQS {env['AWS_ENDPOINT_URL']}   "
              f"bucket {env['AUDIT_BUCKET']}")
        print(f"Dashboard (while the demo runs): {env['ONEOFF_AUDIT_API_URL']}/#token={env['ONEOFF_AUDIT_TOKEN']}")

        title("Session 1: an interactive bash in a PTY, recorded by oneoff-audit record")
        first = record_interactive(env)
        detail = wait_filed(env, first)
        print(f"filed: session {first} ({detail.get('trailer', {}).get('status', '?')})")

        title("Session 2: a non-interactive job printing ~1.5 MB")
        writer = ("import sys\nfor i in range(14000):\n"
                  "    sys.stdout.write(f'row {i:06d} ' + 'x' * 100 + '\\n')\n"
                  "sys.stderr.write('done\\n')\n")
        second = new_session_id()
        big = subprocess.run([CLI, "record", "--app", APP, "--actor-id", "svc-nightly", "--actor-type", "service",
                              "--session-id", second, "--tty", "never", "--", sys.executable, "-c", writer],
                             env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=False)
        print(f"record exited with {big.returncode}")
        wait_filed(env, second)

        title(f"Timeline of app {APP} (GET /apps/{APP}/sessions, newest first)")
        for s in api(env, f"/apps/{APP}/sessions")[1]["sessions"]:
            argv = " ".join(a if isinstance(a, str) else "<bytes>" for a in s["command"]["argv"])[:40]
            print(f"  {s['started_at']}  {s['session_id']}  {s['actor']['id']:<12} {s['status']:<9} "
                  f"exit={s['exit']['code']!s:<4} {s['size']:>9} B  complete={s['complete']}  {argv}")

        title(f"Session {first}: GET /apps/{APP}/sessions/{first}/log (inline, decrypted)")
        status, body = api(env, f"/apps/{APP}/sessions/{first}/log")
        assert status == 200 and "events" in body, (status, body)
        render_log(body)
        typed = "".join(d for _, s, d in body["events"] if s == "i" and isinstance(d, str))
        assert "hunter2-secret" not in json.dumps(body), "the password must not be recorded"
        print(f"\nThe password typed with echo off is not in the log: typed input recorded = {typed!r}")

        title(f"Session {second}: GET /apps/{APP}/sessions/{second}/log (over 1 MB: a presigned URL)")
        status, body = api(env, f"/apps/{APP}/sessions/{second}/log")
        assert status == 200 and "download_url" in body, (status, body)
        print(json.dumps({k: (v[:90] + "…" if k == "download_url" else v) for k, v in body.items()}, indent=2))
        encrypted = work / "big.jsonl.enc"
        plain = work / "big.jsonl"
        for argv in ([CLI, "download", APP, second, "-o", str(encrypted)],
                     [CLI, "decrypt", str(encrypted), "-o", str(plain)],
                     [CLI, "verify", str(plain)]):
            print("$ " + " ".join(Path(argv[0]).name if i == 0 else a for i, a in enumerate(argv)), flush=True)
            subprocess.run(argv, env=env, check=True)
        print(f"downloaded {encrypted.stat().st_size} encrypted bytes, decrypted {plain.stat().st_size} bytes")
        title(f"Done in {time.monotonic() - started:.1f} s")
        return 0
    finally:
        os.killpg(local.pid, signal.SIGTERM)
        try:
            local.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(local.pid, signal.SIGKILL)
            local.wait()


if __name__ == "__main__":
    sys.exit(main())
