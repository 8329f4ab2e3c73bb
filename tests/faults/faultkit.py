"""Machinery of the fault suite: boto-level fault injection, a faulty HTTP proxy, and the byte ledger.

* :class:`Injector` registers ``before-send`` hooks on the in-process clients (``oneoff_audit.aws``'s
  cached clients and the botocore session the Encryption SDK's KMS clients come from). A matching
  request gets a crafted error response (S3 ``SlowDown``/``InternalError``, KMS
  ``ThrottlingException``/``KMSInternalException``), a read timeout, or a simulated crash, *before*
  it leaves the process, so botocore's own retry machinery sees it exactly as it would see AWS's.
* :class:`FaultProxy` is an HTTP proxy on 127.0.0.1 in front of the moto server, for processes the
  suite does not run in-process (the capture agent): it forwards, answers 503, or cuts connections.
* :data:`LEDGER` collects, for every session a row records or stages, the bytes the session really
  carried and the bytes its filed log holds; the terminal summary prints the total loss.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from botocore.awsrequest import AWSResponse
from botocore.exceptions import ReadTimeoutError

from oneoff_audit import formats, keys
from oneoff_audit.api.httpbridge import serve
from oneoff_audit.aws import client, reset_clients
from oneoff_audit.codec import decode_data
from oneoff_audit.crypto import decrypt_bytes
from oneoff_audit.ids import new_session_id
from oneoff_audit.local import load_handler, sqs_batch_event

STREAMS = ("i", "o", "e")

# ---------------------------------------------------------------- the byte ledger


Pieces = list[bytes | int]  # one stream of a filed log: its bytes, and declared gaps (byte counts) between them


def _single_hole(expected: bytes, filed: bytes, declared: int) -> tuple[int, int]:
    """(lost beyond ``declared``, altered) when ``filed`` is ``expected`` with at most one hole.

    The common prefix and suffix are matched; what is left of ``expected`` is the hole, what is
    left of ``filed`` was invented or altered.
    """
    if filed == expected:
        return 0, 0
    limit = min(len(expected), len(filed))
    prefix = 0
    while prefix < limit and expected[prefix] == filed[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and expected[-1 - suffix] == filed[-1 - suffix]:
        suffix += 1
    return max(0, len(expected) - prefix - suffix - declared), len(filed) - prefix - suffix


def stream_loss(expected: bytes, pieces: Pieces) -> tuple[int, int]:
    """(bytes of ``expected`` neither in the log nor declared lost, bytes in the log that ``expected`` lacks).

    The log's pieces are walked in order: each run of bytes must continue ``expected`` exactly, each
    declared gap (a capture-gap marker's count for this stream) skips that many expected bytes. From
    the first piece that does not fit, the rest is compared as one block with one hole.
    """
    pos = 0
    for index, piece in enumerate(pieces):
        if isinstance(piece, int):
            pos += piece
        elif expected.startswith(piece, pos):
            pos += len(piece)
        else:
            rest = b"".join(p for p in pieces[index:] if isinstance(p, bytes))
            return _single_hole(expected[pos:], rest, sum(p for p in pieces[index:] if isinstance(p, int)))
    return max(0, len(expected) - pos), 0


@dataclass
class SessionAccount:
    """One session's bytes: what it carried, and what its filed log holds or declares lost."""

    row: str
    app: str
    session_id: str
    source: str  # "process" (recorded: what the process wrote and read) or "staged" (intact staged chunks)
    expected: dict[str, bytes]
    filed: dict[str, Pieces] | None
    note: str = ""

    @property
    def compared(self) -> int:
        return sum(len(v) for v in self.expected.values())

    @property
    def declared(self) -> int:
        return sum(p for pieces in (self.filed or {}).values() for p in pieces if isinstance(p, int))

    def loss(self) -> tuple[int, int]:
        """(undeclared bytes lost, bytes altered or invented) over the three streams."""
        if self.filed is None:
            return self.compared, 0
        lost = altered = 0
        for stream in STREAMS:
            a, b = stream_loss(self.expected.get(stream, b""), self.filed.get(stream, []))
            lost += a
            altered += b
        return lost, altered


@dataclass
class Ledger:
    """Everything the suite accounted for in this pytest run."""

    sessions: list[SessionAccount] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, account: SessionAccount) -> SessionAccount:
        with self.lock:
            self.sessions.append(account)
        return account

    def totals(self) -> dict[str, int]:
        lost = altered = compared = declared = 0
        for account in self.sessions:
            a, b = account.loss()
            lost += a
            altered += b
            compared += account.compared
            declared += account.declared
        return {"sessions": len(self.sessions), "compared": compared, "lost": lost, "altered": altered,
                "declared": declared}


LEDGER = Ledger()


# ---------------------------------------------------------------- boto-level injection


class SimulatedCrash(BaseException):
    """Raised by a hook to stop the code under test where a Lambda timeout or crash would."""


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


def s3_error(code: str = "SlowDown", status: int = 503, message: str = "injected fault") -> Callable[..., Any]:
    """A fault answering like S3 does (XML error body)."""
    body = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>FAULT</RequestId></Error>").encode()

    def fault(request: Any) -> AWSResponse:
        return AWSResponse(request.url, status, {"Content-Type": "application/xml", "x-amz-request-id": "FAULT"},
                           _Raw(body))
    return fault


def kms_error(code: str = "ThrottlingException", status: int = 400,
              message: str = "injected fault") -> Callable[..., Any]:
    """A fault answering like KMS does (JSON error body)."""
    body = json.dumps({"__type": code, "message": message}).encode()

    def fault(request: Any) -> AWSResponse:
        return AWSResponse(request.url, status, {"Content-Type": "application/x-amz-json-1.1",
                                                 "x-amzn-RequestId": "FAULT"}, _Raw(body))
    return fault


def timeout() -> Callable[..., Any]:
    """A fault raising the read timeout botocore raises when a response never comes."""
    def fault(request: Any) -> None:
        raise ReadTimeoutError(endpoint_url=request.url)
    return fault


def crash(where: str) -> Callable[..., Any]:
    """A fault that ends the code under test like a killed process (no except clause catches it)."""
    def fault(request: Any) -> None:
        raise SimulatedCrash(where)
    return fault


@dataclass
class Rule:
    """Which requests a fault applies to, and how often."""

    service: str
    operation: str | None
    fault: Callable[..., Any] | None  # None: only count matching requests
    times: int | None = None  # None: every matching request
    key: str | None = None  # substring of the unquoted URL path (S3 key)
    after: int = 0  # let this many matching requests through first
    seen: int = 0
    hits: int = 0
    requests: list[str] = field(default_factory=list)

    def matches(self, service: str, operation: str, request: Any) -> bool:
        if service != self.service or (self.operation is not None and operation != self.operation):
            return False
        return self.key is None or self.key in unquote(urlsplit(request.url).path)


class Injector:
    """Fault hooks on every in-process AWS request; use as a context manager.

    botocore's ``Endpoint`` is wrapped so that the hook sees each request of *every* client of the
    process (the cached clients of ``oneoff_audit.aws``, the Encryption SDK's KMS clients, clients
    cached by the code under test) just before it would be sent, with its service and operation. A
    fault returns the response botocore then parses and retries as usual, or raises.
    """

    SERVICES = ("s3", "kms", "sqs")
    _active: Injector | None = None
    _saved: tuple[Any, Any] | None = None
    _current = threading.local()

    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.lock = threading.Lock()
        self.throttled = False  # a fault was injected: the clients' retry state is no longer fresh
        self.atomic_conditional: threading.Lock | None = None

    def serialize_conditional_writes(self) -> None:
        """Send S3 writes carrying If-None-Match one at a time, as S3 decides them atomically.

        moto checks the condition and then writes without a lock (``moto.s3.responses``: the
        CompleteMultipartUpload and PutObject paths), so two concurrent conditional writes to one key
        can both succeed there, which S3 never allows (one gets 412 or 409). Rows about concurrent
        writers use this to test the code, not the emulator's race.
        """
        self.atomic_conditional = threading.Lock()

    def __enter__(self) -> Injector:
        from botocore.endpoint import Endpoint

        assert Injector._active is None, "one injector at a time"
        Injector._active = self
        if Injector._saved is None:
            do_get, send = Endpoint._do_get_response, Endpoint._send
            Injector._saved = (do_get, send)

            def _do_get_response(endpoint: Any, request: Any, operation_model: Any, context: Any) -> Any:
                Injector._current.op = (operation_model.service_model.service_id.hyphenize(), operation_model.name)
                try:
                    return do_get(endpoint, request, operation_model, context)
                finally:
                    Injector._current.op = None

            def _send(endpoint: Any, request: Any) -> Any:
                active, op = Injector._active, getattr(Injector._current, "op", None)
                if active is not None and op is not None:
                    response = active._hook(request, event_name=f"before-send.{op[0]}.{op[1]}")
                    if response is not None:
                        return response
                    if active.atomic_conditional and op[0] == "s3" and "If-None-Match" in request.headers:
                        with active.atomic_conditional:  # S3 decides conditional writes atomically
                            return send(endpoint, request)
                return send(endpoint, request)

            Endpoint._do_get_response = _do_get_response  # type: ignore[method-assign]
            Endpoint._send = _send  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        Injector._active = None

    @classmethod
    def uninstall(cls) -> None:
        """Restore botocore's Endpoint (end of the test session)."""
        from botocore.endpoint import Endpoint

        if cls._saved is not None:
            Endpoint._do_get_response, Endpoint._send = cls._saved  # type: ignore[method-assign]
            cls._saved = None

    def add(self, service: str, operation: str | None, fault: Callable[..., Any] | None, *, times: int | None = None,
            key: str | None = None, after: int = 0) -> Rule:
        """Apply ``fault`` to matching requests (``times`` of them, after letting ``after`` through)."""
        rule = Rule(service, operation, fault, times, key, after)
        with self.lock:
            self.rules.append(rule)
        return rule

    def count(self, service: str, operation: str | None = None, key: str | None = None) -> Rule:
        """A rule that only counts matching requests."""
        return self.add(service, operation, None, key=key)

    def clear(self) -> None:
        """Remove every rule (the hooks stay, passing everything through)."""
        with self.lock:
            self.rules.clear()

    def _hook(self, request: Any, event_name: str = "", **_: Any) -> Any:
        parts = event_name.split(".")
        service, operation = (parts[1], parts[2]) if len(parts) >= 3 else ("", "")
        fault = None
        with self.lock:
            for rule in self.rules:
                if not rule.matches(service, operation, request):
                    continue
                rule.seen += 1
                body = request.body if isinstance(request.body, bytes) and len(request.body) < 65536 else b""
                url = urlsplit(request.url)
                rule.requests.append(f"{operation} {unquote(url.path)}?{unquote(url.query)} "
                                     f"{body.decode('utf-8', 'replace')}")
                if rule.fault is None or rule.seen <= rule.after:
                    continue
                if rule.times is not None and rule.hits >= rule.times:
                    continue
                rule.hits += 1
                fault = rule.fault
                self.throttled = True
                break
        return fault(request) if fault is not None else None


def fresh_retry_state() -> None:
    """Give the cached clients a full retry quota and an idle adaptive rate limiter again.

    Both remember injected faults (a spent quota means no more retries; an enabled limiter paces
    every later request), which would let one row change the next. Rebuilding the clients costs
    seconds per row, so the two pieces of state are reset in place; if botocore's layout is not the
    one expected, the clients are rebuilt after all.
    """
    try:
        for service in Injector.SERVICES:
            emitter = client(service).meta.events._emitter
            for handler in emitter._handlers.prefix_search(f"needs-retry.{service}.X"):
                owner = getattr(handler, "__self__", None)
                quota = getattr(getattr(owner, "_retry_quota", None), "_quota", None)
                if quota is not None:
                    with quota._lock:
                        quota._available_capacity = quota._max_capacity
                if hasattr(owner, "_enabled") and hasattr(owner, "_token_bucket"):
                    owner._enabled = False
    except AttributeError:
        reset_clients()


# ---------------------------------------------------------------- the faulty proxy


@dataclass
class ProxyRule:
    """What the proxy does to matching requests: ``cut`` the connection or answer ``503``."""

    action: str  # "cut" | "503" | "500"
    method: str | None = None
    path: str | None = None  # substring of the unquoted path
    times: int | None = None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        return self.path is None or self.path in path


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 forwarding to ``target`` unless a rule says otherwise."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target_host = parts.hostname or "127.0.0.1"
        self.target_port = parts.port or 80
        self.rules: list[ProxyRule] = []
        self.lock = threading.Lock()
        self.forwarded: list[str] = []
        self.refused: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = unquote(urlsplit(self.path).path)
                rule = proxy._rule(self.command, path)
                if rule is not None:
                    with proxy.lock:
                        proxy.refused.append(f"{rule.action} {self.command} {path}")
                    if rule.action == "cut":
                        self.close_connection = True
                        with contextlib.suppress(OSError):
                            self.connection.shutdown(2)
                        return
                    code = "SlowDown" if rule.action == "503" else "InternalError"
                    data = f"<Error><Code>{code}</Code><Message>proxy fault</Message></Error>".encode()
                    self.send_response(int(rule.action))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                upstream = http.client.HTTPConnection(proxy.target_host, proxy.target_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    self.send_response(response.status)
                    for name, value in response.getheaders():
                        if name.lower() not in ("content-length", "transfer-encoding", "connection", "server",
                                                "date"):
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()
                with proxy.lock:
                    proxy.forwarded.append(f"{self.command} {path}")

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, action: str, method: str | None = None, path: str | None = None,
            times: int | None = None) -> ProxyRule:
        rule = ProxyRule(action, method, path, times)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def _rule(self, method: str, path: str) -> ProxyRule | None:
        with self.lock:
            for rule in self.rules:
                if rule.matches(method, path) and (rule.times is None or rule.hits < rule.times):
                    rule.hits += 1
                    return rule
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def credential_endpoint(lifetime: int) -> ThreadingHTTPServer:
    """A container-credentials endpoint on 127.0.0.1 handing out credentials that expire in ``lifetime`` s."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            expiry = datetime.now(UTC) + timedelta(seconds=lifetime)
            body = json.dumps({"AccessKeyId": "testing", "SecretAccessKey": "testing", "Token": "container-token",
                               "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---------------------------------------------------------------- the harness a row's check receives

API_TOKENS: dict[str, dict[str, str]] = {
    "tok-a": {"sub": "auditor-a", "name": "Auditor A", "custom:audit_apps": "app-a"},
    "tok-b": {"sub": "auditor-b", "name": "Auditor B", "custom:audit_apps": "app-b"},
    "tok-all": {"sub": "auditor-all", "custom:audit_apps": "*", "custom:audit_admin": "true"},
    "tok-nosub": {"custom:audit_apps": "*", "name": "no subject"},
    "tok-blanksub": {"sub": "   ", "custom:audit_apps": "*"},
    "tok-glob": {"sub": "auditor-glob", "custom:audit_apps": "app-* app"},
    "tok-list": {"sub": "auditor-list", "custom:audit_apps": "[app-b APP-A app-a/x ..]"},
}

CLI = str(Path(sys.executable).parent / "oneoff-audit")

# The recorded program: writes what it is told to stdout/stderr, reads stdin to EOF, and keeps its
# own copy of every byte it wrote and read (what the session's process *really* did).
PROGRAM = r"""
import json, os, sys, time
plan = json.loads(open(sys.argv[1], "rb").read())
logs = {name: open(sys.argv[2] + "." + name, "wb", buffering=0) for name in ("i", "o", "e")}
def write(fd, name, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        logs[name].write(view[:n])
        view = view[n:]
for step in plan["steps"]:
    if step[0] == "sleep":
        time.sleep(step[1])
    elif step[0] == "mark":
        open(sys.argv[2] + ".mark." + step[1], "wb").close()
    else:
        write(1 if step[0] == "o" else 2, step[0], bytes.fromhex(step[1]))
if plan.get("read_stdin"):
    while data := os.read(0, 65536):
        logs["i"].write(data)
sys.exit(plan.get("exit", 0))
"""


@dataclass
class Filed:
    """A filed log, decrypted and parsed."""

    plaintext: bytes
    header: dict[str, Any]
    events: list[list[Any]]
    trailer: dict[str, Any]

    def stream_bytes(self) -> dict[str, bytes]:
        out = {s: bytearray() for s in STREAMS}
        for _, stream, data in self.events:
            if stream in out:
                out[stream] += decode_data(data)
        return {s: bytes(v) for s, v in out.items()}

    def pieces(self, gap_bytes: dict[int, dict[str, int]] | None = None) -> dict[str, Pieces]:
        """Per stream, in order: runs of bytes, and the byte counts the log declares lost.

        Declared are a capture-gap marker's per-stream counts and, for a chunk the log names as a gap
        whose content the row knows (``gap_bytes``: seq -> bytes per stream), that chunk's bytes.
        """
        out: dict[str, Pieces] = {s: [] for s in STREAMS}
        for _, stream, data in self.events:
            if stream in out:
                chunk = decode_data(data)
                if out[stream] and isinstance(out[stream][-1], bytes):
                    out[stream][-1] += chunk
                else:
                    out[stream].append(chunk)
            elif stream == "m" and data.get("kind") in ("capture-gap", "gap"):
                counts = data.get("streams") if data["kind"] == "capture-gap" else \
                    (gap_bytes or {}).get(data.get("seq"), {})  # type: ignore[arg-type]
                for name, count in (counts or {}).items():
                    if name in out and count:
                        out[name].append(int(count))
        return out

    def markers(self, kind: str) -> list[dict[str, Any]]:
        return [data for _, stream, data in self.events if stream == "m" and data.get("kind") == kind]


@dataclass
class Recorded:
    """A session run through ``oneoff-audit record``: its exit code, agent stderr and the process's own bytes."""

    app: str
    session_id: str
    returncode: int
    stderr: bytes
    wrote: dict[str, bytes]
    elapsed: float


class Harness:
    """Everything a row needs: the stack, fault injection, the pipeline's functions, the API, the ledger."""

    def __init__(self, row: str, stack: Any, tmp_path: Path, monkeypatch: Any, lambda_context: Any) -> None:
        self.row = row
        self.stack = stack
        self.tmp = tmp_path
        self.monkeypatch = monkeypatch
        self.context = lambda_context
        self.inj = Injector()
        self._api: Any = None
        self._proxy: FaultProxy | None = None
        self._cleanups: list[Callable[[], None]] = []
        self.handler_errors: list[BaseException] = []
        self.last_work: Path | None = None
        monkeypatch.setenv("ASSEMBLE_MAX_ATTEMPTS", "2")

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Harness:
        self.inj.__enter__()
        sqs = client("sqs")
        for message in self.queue_messages():  # the s3:TestEvent moto sends when the notification is set
            assert "s3:TestEvent" in message["Body"], message["Body"]
            sqs.delete_message(QueueUrl=self.stack.queue_url, ReceiptHandle=message["ReceiptHandle"])
        return self

    def stop(self) -> None:
        self.inj.__exit__()
        for cleanup in reversed(self._cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        if self._api is not None:
            self._api.shutdown()
        if self._proxy is not None:
            self._proxy.close()
        if self.inj.throttled:
            fresh_retry_state()

    def on_stop(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    # ------------------------------------------------------------ S3

    @property
    def s3(self) -> Any:
        return client("s3")

    @property
    def bucket(self) -> str:
        return self.stack.bucket

    def keys_under(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def versions(self, key: str) -> list[dict[str, Any]]:
        resp = self.s3.list_object_versions(Bucket=self.bucket, Prefix=key)
        return [v for v in resp.get("Versions", []) if v["Key"] == key]

    def put(self, key: str, body: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)

    def multipart_uploads(self) -> list[dict[str, Any]]:
        return self.s3.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])

    # ------------------------------------------------------------ assembly

    def assembler(self) -> Callable[[dict[str, Any], Any], Any]:
        return load_handler("assembler")

    def queue_messages(self, queue_url: str | None = None, wait: float = 0) -> list[dict[str, Any]]:
        """Receive every visible message (each becomes invisible for the queue's timeout)."""
        sqs = client("sqs")
        out: list[dict[str, Any]] = []
        while True:
            got = sqs.receive_message(QueueUrl=queue_url or self.stack.queue_url, MaxNumberOfMessages=10,
                                      WaitTimeSeconds=int(wait), AttributeNames=["All"]).get("Messages", [])
            if not got:
                return out
            out.extend(got)
            wait = 0

    def deliver(self, rounds: int = 1, messages: list[dict[str, Any]] | None = None) -> list[tuple[str, bool]]:
        """Run the assembler handler on what the queue holds, like Lambda's SQS event source, ``rounds`` times.

        Successful messages are deleted; failed ones become visible again at once. Returns
        ``(body, failed)`` for every message handled.
        """
        sqs = client("sqs")
        arn = sqs.get_queue_attributes(QueueUrl=self.stack.queue_url,
                                       AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        handled: list[tuple[str, bool]] = []
        for _ in range(rounds):
            batch = messages if messages is not None else self.queue_messages()
            messages = None
            if not batch:
                break
            try:
                response = self.assembler()(sqs_batch_event(batch, arn), self.context) or {}
                failed = {item["itemIdentifier"] for item in response.get("batchItemFailures", [])}
            except (Exception, SimulatedCrash) as err:  # the invocation failed or died: the whole batch is retried
                self.handler_errors.append(err)
                failed = {m["MessageId"] for m in batch}
            for message in batch:
                if message["MessageId"] in failed:
                    sqs.change_message_visibility(QueueUrl=self.stack.queue_url,
                                                  ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0)
                else:
                    sqs.delete_message(QueueUrl=self.stack.queue_url, ReceiptHandle=message["ReceiptHandle"])
                handled.append((message["Body"], message["MessageId"] in failed))
        return handled

    def sweep(self, after: float = 3601) -> list[tuple[str, str]]:
        """Run the sweeper as if ``after`` seconds had passed."""
        from oneoff_audit.config import SweeperConfig
        from oneoff_audit.sweep import sweep

        return sweep(SweeperConfig.from_env(), now=datetime.now(UTC) + timedelta(seconds=after))

    def assembler_config(self) -> Any:
        from oneoff_audit.config import AssemblerConfig

        return AssemblerConfig.from_env()

    # ------------------------------------------------------------ filed logs

    def filed(self, app: str, session_id: str, version_id: str | None = None) -> Filed:
        """The decrypted, parsed filed log (raises if it is not there or not intact)."""
        request: dict[str, Any] = {"Bucket": self.bucket, "Key": keys.log_key(app, session_id)}
        if version_id:
            request["VersionId"] = version_id
        ciphertext = self.s3.get_object(**request)["Body"].read()
        plaintext = decrypt_bytes(ciphertext, self.stack.kms_key_id, app, session_id)
        parts = list(formats.iter_log_lines(io.BytesIO(plaintext)))
        return Filed(plaintext, parts[0][1], [v for k, v in parts[1:-1]], parts[-1][1])

    def is_filed(self, app: str, session_id: str) -> bool:
        return bool(self.keys_under(keys.log_key(app, session_id)))

    def assert_filed_once(self, app: str, session_id: str) -> None:
        """One log version, one manifest (+ signature), one index entry, nothing left in staging."""
        log_versions = self.versions(keys.log_key(app, session_id))
        assert len(log_versions) == 1, f"{len(log_versions)} log versions: {log_versions}"
        assert len(self.versions(keys.manifest_key(app, session_id))) == 1
        index = [k for k in self.keys_under(keys.index_prefix(app)) if k.endswith(f"_{session_id}.json")]
        assert len(index) == 1, index
        assert len(self.versions(index[0])) == 1
        assert self.keys_under(keys.session_prefix(app, session_id)) == []

    # ------------------------------------------------------------ byte accounting

    def account(self, app: str, session_id: str, source: str, expected: dict[str, bytes],
                filed: Filed | None, note: str = "", gap_bytes: dict[int, dict[str, int]] | None = None
                ) -> SessionAccount:
        """Record a session's bytes in the ledger and return the account (lost and altered are asserted by callers).

        ``gap_bytes``: for chunks the row damaged itself, their bytes per stream; the log must name
        them as gaps, and then they count as declared, not lost.
        """
        account = SessionAccount(self.row, app, session_id, source, expected,
                                 filed.pieces(gap_bytes) if filed is not None else None, note)
        return LEDGER.add(account)

    def account_staged(self, chunks: Any, intact: Any, filed: Filed | None, note: str = "") -> SessionAccount:
        """Expected bytes: the byte events of the staged chunks in ``intact`` (sequence order)."""
        expected = {s: bytearray() for s in STREAMS}
        for seq in sorted(intact):
            for _, stream, data in chunks.batches[seq]:
                if stream in expected:
                    expected[stream] += decode_data(data)
        return self.account(chunks.app, chunks.session_id, "staged", {s: bytes(v) for s, v in expected.items()},
                            filed, note)

    def assert_no_loss(self, account: SessionAccount) -> None:
        lost, altered = account.loss()
        assert (lost, altered) == (0, 0), f"{account.app}/{account.session_id}: lost {lost}, altered {altered}"

    # ------------------------------------------------------------ recorded sessions

    def proxy(self) -> FaultProxy:
        if self._proxy is None:
            self._proxy = FaultProxy(self.stack.endpoint)
        return self._proxy

    def record(self, app: str, steps: list[tuple[Any, ...]], *, stdin: bytes = b"", exit_code: int = 0,
               via_proxy: bool = False, options: tuple[str, ...] = (), spool_dir: Path | None = None,
               timeout: float = 60, session_id: str | None = None,
               kill_after: Callable[[subprocess.Popen[bytes]], None] | None = None) -> Recorded:
        """Run ``oneoff-audit record --tty never`` around :data:`PROGRAM` following ``steps``.

        ``steps``: ``("o"|"e", bytes)`` writes, ``("sleep", seconds)`` pauses, ``("mark", name)`` creates
        the file ``<work>/wrote.mark.<name>`` (see :meth:`wait_mark`).
        """
        sid = session_id or new_session_id()
        plan = {"steps": [[s[0], s[1].hex()] if s[0] in ("o", "e") else list(s) for s in steps],
                "read_stdin": True, "exit": exit_code}
        work = self.tmp / f"rec-{sid}"
        work.mkdir()
        self.last_work = work
        (work / "plan.json").write_text(json.dumps(plan))
        (work / "program.py").write_text(PROGRAM)
        env = self.stack.env()
        if via_proxy:
            env["AWS_ENDPOINT_URL"] = self.proxy().url
        argv = [CLI, "record", "--app", app, "--actor-id", "u-fault", "--actor-name", "Fault Row",
                "--tty", "never", "--session-id", sid, "--spool-dir", str(spool_dir or work / "spool"),
                "--chunk-seconds", "0.2", "--flush-timeout", "10", "--retry-max-delay", "0.5",
                "--no-flush-spool", "--log-file", str(work / "agent.log"), *options,
                "--", sys.executable, str(work / "program.py"), str(work / "plan.json"), str(work / "wrote")]
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, start_new_session=True)
        if kill_after is not None:
            kill_after(proc)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"oneoff-audit record did not end in {timeout}s: "
                                 f"{err.decode(errors='replace')}") from None
        wrote = {name: (work / f"wrote.{name}").read_bytes() if (work / f"wrote.{name}").exists() else b""
                 for name in STREAMS}
        assert out == wrote["o"] or kill_after is not None, "the agent did not relay stdout byte for byte"
        return Recorded(app, sid, proc.returncode, err, wrote, time.monotonic() - started)

    def when(self, condition: Callable[[], bool], action: Callable[[], None], timeout: float = 30) -> threading.Thread:
        """Run ``action`` in the background as soon as ``condition()`` holds (polled every 20 ms)."""
        def watch() -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if condition():
                    action()
                    return
                time.sleep(0.02)
        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread

    def small_spool(self, size: str = "64k") -> tuple[Path, str]:
        """A spool directory that runs out of space: a tmpfs of ``size`` (we are root), else a path that is a file.

        Returns the directory and which of the two it is (the row reports it).
        """
        path = self.tmp / "small-spool"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                              capture_output=True)
        if done.returncode == 0:
            self.on_stop(lambda: subprocess.run(["umount", "-l", str(path)], capture_output=True))
            return path, f"tmpfs of {size}"
        path.rmdir()
        path.write_bytes(b"")  # not a directory: every spool write fails with ENOTDIR
        return path, "a file in place of the spool directory (tmpfs mount refused)"

    # ------------------------------------------------------------ the API over real HTTP

    def api(self) -> Any:
        if self._api is None:
            self._api = serve(load_handler("api"), "127.0.0.1", 0, API_TOKENS)
        return self._api

    def api_get(self, path: str, token: str | None = "tok-a",
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """GET ``path`` from the API; returns status, headers and the raw body."""
        server = self.api()
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
        try:
            hdrs = dict(headers or {})
            if token is not None:
                hdrs["Authorization"] = f"Bearer {token}"
            conn.request("GET", path, headers=hdrs)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def api_json(self, path: str, token: str | None = "tok-a") -> tuple[int, Any]:
        status, _, body = self.api_get(path, token)
        return status, json.loads(body) if body else None
