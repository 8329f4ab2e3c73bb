"""Helpers for the capture agent's integration tests: run the real CLI, read staging back, break S3.

:class:`FaultProxy` is a small HTTP reverse proxy on 127.0.0.1 in front of the moto server. The
agent talks to it as its S3 endpoint; a test switches it between ``up`` (forward), ``drop`` (close
the connection without answering, like a dead endpoint) and ``503`` (S3 SlowDown), and reads the
log of requests that S3 really accepted, in order.
"""

from __future__ import annotations

import http.client
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oneoff_audit import formats
from oneoff_audit.aws import client
from oneoff_audit.codec import join_data

CLI = str(Path(sys.executable).parent / "oneoff-audit")
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


MODULE = [sys.executable, "-m", "oneoff_audit.capture"]


def record_cmd(app: str, session_id: str, *args: str, cli: bool = False) -> list[str]:
    """``record`` with the fixed options the tests use, then ``args`` (options, ``--``, CMD).

    ``cli=True`` runs the ``oneoff-audit`` entry point; otherwise ``python -m oneoff_audit.capture``
    (the same command without loading the other components, so each test starts faster).
    """
    entry = [CLI] if cli else MODULE
    return [*entry, "record", "--app", app, "--actor-id", "tester", "--session-id", session_id, *args]


@dataclass
class Staged:
    """What one session left in staging."""

    opened: dict[str, Any] | None
    chunks: list[tuple[dict[str, Any], list[list[Any]], bytes]]
    closed: dict[str, Any] | None
    keys: list[str] = field(default_factory=list)

    @property
    def events(self) -> list[list[Any]]:
        return [e for _h, events, _raw in self.chunks for e in events]

    def stream(self, name: str) -> bytes:
        return join_data(e[2] for e in self.events if e[1] == name)

    def markers(self, kind: str) -> list[dict[str, Any]]:
        return [e[2] for e in self.events if e[1] == "m" and e[2].get("kind") == kind]


def read_staging(bucket: str, app: str, session_id: str, prefix: str = "staging/") -> Staged:
    """Read and validate every staged object of a session (latest versions)."""
    s3 = client("s3")
    base = f"{prefix}{app}/{session_id}/"
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    opened = closed = None
    chunks = []
    for key in sorted(keys):
        raw = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        name = key[len(base):]
        if name == "opened.json":
            opened = formats.read_json_object(raw, "session-header", key, formats.MAX_OPENED_BYTES)
        elif name == "closed.json":
            closed = formats.read_json_object(raw, "close-marker", key, formats.MAX_CLOSED_BYTES)
        else:
            header, events = formats.read_chunk(raw, key)
            chunks.append((header, events, raw))
    return Staged(opened, chunks, closed, keys)


def check_chain(staged: Staged) -> None:
    """Sequence numbers 0..n-1, hash chain, event indexes and the close marker's digests all agree."""
    prev = None
    index = 0
    for seq, (header, events, raw) in enumerate(staged.chunks):
        assert header["seq"] == seq
        assert header["prev_chunk_sha256"] == prev
        assert header["first_event_index"] == index
        prev = formats.sha256_hex(raw)
        index += len(events)
    if staged.closed is not None:
        assert staged.closed["chunk_count"] == len(staged.chunks)
        assert staged.closed["chunk_sha256"] == [formats.sha256_hex(raw) for _h, _e, raw in staged.chunks]
        assert staged.closed["event_count"] == index


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        time.sleep(interval)


def read_until(fd: int, needle: bytes, buf: bytearray, timeout: float = 20.0) -> bytearray:
    """Read from ``fd`` into ``buf`` until ``needle`` appears (or EOF/timeout)."""
    import select

    deadline = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.05)[0]:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            buf.extend(data)
    return buf


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _handle(self) -> None:
        proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        mode = proxy.mode
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if mode == "drop":
            proxy.note(self.command, path, None)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == "503":
            proxy.note(self.command, path, 503)
            payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS | {"expect"}}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            proxy.note(self.command, path, response.status)
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in HOP_HEADERS | {"content-length"}:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
        finally:
            upstream.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy


class FaultProxy:
    """An HTTP proxy in front of moto whose failures a test controls."""

    def __init__(self, upstream: str, mode: str = "up") -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host = parsed.hostname or "127.0.0.1"
        self.upstream_port = parsed.port or 80
        self.mode = mode
        self.log: list[tuple[str, str, int | None]] = []
        self._lock = threading.Lock()
        self._server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def note(self, method: str, path: str, status: int | None) -> None:
        with self._lock:
            self.log.append((method, path, status))

    def accepted_puts(self) -> list[str]:
        """Paths of PUTs that S3 accepted, in the order they completed."""
        with self._lock:
            return [path for method, path, status in self.log if method == "PUT" and status == 200]

    def refused(self) -> int:
        with self._lock:
            return sum(1 for _m, _p, status in self.log if status is None or status >= 500)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def spawn_record(args: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start the agent."""
    return subprocess.Popen(args, env=env, **kwargs)
