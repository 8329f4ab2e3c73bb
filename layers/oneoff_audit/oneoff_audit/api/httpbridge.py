"""Serve a Lambda proxy handler over real HTTP on loopback, the way API Gateway (REST) calls it.

Each HTTP request becomes an API Gateway REST proxy event (``path``, ``httpMethod``, ``headers`` and
``multiValueHeaders``, ``queryStringParameters`` and ``multiValueQueryStringParameters``, ``body``
with ``isBase64Encoded``, ``requestContext`` with ``requestId``, ``identity.sourceIp`` and
``stage``). A bearer token found in the ``tokens`` table puts its claims in
``requestContext.authorizer.claims``, as a Cognito user-pool authorizer does; without a known token
the event carries no authorizer, so the handler itself answers 401. Path parameters are left for
the resolver to fill, as Powertools does from ``path``.

The handler's proxy response (``statusCode``, ``headers``, ``multiValueHeaders``, ``body``,
``isBase64Encoded``) is written back as the HTTP response. A handler that raises yields a 502 like
API Gateway's "Internal server error". Calls into the handler are serialized (one at a time, as
one Lambda instance runs them): Powertools' resolver keeps the current event in class state.

Used by the integration tests and by ``oneoff-audit local`` (which serves the dashboard's files by
wrapping the handler: ``local.with_dashboard``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

Handler = Callable[[dict[str, Any], Any], Any]

MAX_BODY = 10 << 20  # API Gateway's payload limit
STAGE = "local"


class _Context:
    """The LambdaContext attributes Powertools reads."""

    def __init__(self, request_id: str) -> None:
        self.function_name = "oneoff-audit-api"
        self.memory_limit_in_mb = 1024
        self.invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:oneoff-audit-api"
        self.aws_request_id = request_id

    def get_remaining_time_in_millis(self) -> int:
        return 29_000


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any (scheme case-insensitive)."""
    value = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _multi(pairs: list[tuple[str, str]]) -> tuple[dict[str, str] | None, dict[str, list[str]] | None]:
    if not pairs:
        return None, None
    single: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    for key, value in pairs:
        single[key] = value  # API Gateway keeps the last value in the single-value map
        multi.setdefault(key, []).append(value)
    return single, multi


def build_event(
    method: str,
    raw_path: str,
    headers: list[tuple[str, str]],
    body: bytes,
    source_ip: str,
    tokens: Mapping[str, Mapping[str, Any]],
    request_id: str | None = None,
) -> dict[str, Any]:
    """The API Gateway REST proxy event for one HTTP request."""
    parts = urlsplit(raw_path)
    path = unquote(parts.path) or "/"
    query, multi_query = _multi(parse_qsl(parts.query, keep_blank_values=True))
    header_map, multi_headers = _multi(headers)
    header_map = header_map or {}
    request_id = request_id or str(uuid.uuid4())
    context: dict[str, Any] = {
        "accountId": "123456789012",
        "apiId": "local",
        "resourcePath": path,
        "httpMethod": method,
        "path": path,
        "stage": STAGE,
        "protocol": "HTTP/1.1",
        "requestId": request_id,
        "extendedRequestId": request_id,
        "requestTimeEpoch": int(time.time() * 1000),
        "domainName": header_map.get("Host") or header_map.get("host") or "127.0.0.1",
        "identity": {
            "sourceIp": source_ip,
            "userAgent": next((v for k, v in header_map.items() if k.lower() == "user-agent"), None),
        },
    }
    token = bearer_token(header_map)
    claims = tokens.get(token) if token else None
    if claims is not None:
        context["authorizer"] = {"claims": dict(claims)}
    if body:
        try:
            body_field: str | None = body.decode("utf-8")
            is_b64 = False
        except UnicodeDecodeError:
            body_field = base64.b64encode(body).decode("ascii")
            is_b64 = True
    else:
        body_field, is_b64 = None, False
    return {
        "resource": path,
        "path": path,
        "httpMethod": method,
        "headers": header_map,
        "multiValueHeaders": multi_headers or {},
        "queryStringParameters": query,
        "multiValueQueryStringParameters": multi_query,
        "pathParameters": None,
        "stageVariables": None,
        "requestContext": context,
        "body": body_field,
        "isBase64Encoded": is_b64,
    }


def response_parts(response: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body bytes of a Lambda proxy response (502 if it is not one)."""
    if not isinstance(response, Mapping) or not isinstance(response.get("statusCode"), int):
        return 502, [("Content-Type", "application/json")], b'{"message":"Internal server error"}'
    headers: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, values in (response.get("multiValueHeaders") or {}).items():
        seen.add(name.lower())
        headers.extend((name, str(v)) for v in (values if isinstance(values, list) else [values]))
    for name, value in (response.get("headers") or {}).items():
        if name.lower() not in seen:
            headers.append((name, str(value)))
    body = response.get("body") or ""
    if response.get("isBase64Encoded"):
        data = base64.b64decode(body)
    else:
        data = body.encode("utf-8") if isinstance(body, str) else json.dumps(body).encode("utf-8")
    return int(response["statusCode"]), headers, data


class BridgeServer(ThreadingHTTPServer):
    """A threading HTTP server bound to one handler; ``shutdown()`` also closes the socket."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: Handler, tokens: Mapping[str, Mapping[str, Any]],
                 quiet: bool) -> None:
        super().__init__(address, _RequestHandler)
        self.lambda_handler = handler
        self.tokens = tokens
        self.quiet = quiet
        self.invoke_lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.requests = 0

    @property
    def url(self) -> str:
        """Base URL of the server (``http://127.0.0.1:PORT``)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def invoke(self, event: dict[str, Any]) -> Any:
        """Call the Lambda handler with ``event`` (one call at a time)."""
        with self.invoke_lock:
            self.requests += 1
            return self.lambda_handler(event, _Context(event["requestContext"]["requestId"]))

    def shutdown(self) -> None:
        """Stop serving, close the listening socket and wait for the serving thread."""
        super().shutdown()
        self.server_close()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=5)


class _RequestHandler(BaseHTTPRequestHandler):
    server: BridgeServer
    protocol_version = "HTTP/1.1"
    server_version = "oneoff-audit-bridge"

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            sys.stderr.write(f"oneoff-audit api: {self.address_string()} {format % args}\n")

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes, head_only: bool = False) -> None:
        self.send_response(status)
        names = {name.lower() for name, _ in headers}
        for name, value in headers:
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        if "content-type" not in names and body:
            self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _read_body(self) -> bytes | None:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self._send(411, [("Content-Type", "application/json")], b'{"message":"Content-Length required"}')
            self.close_connection = True
            return None
        length_header = self.headers.get("Content-Length") or "0"
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if length < 0:
            self._send(400, [("Content-Type", "application/json")], b'{"message":"bad Content-Length"}')
            self.close_connection = True
            return None
        if length > MAX_BODY:
            self._send(413, [("Content-Type", "application/json")], b'{"message":"Request too large"}')
            self.close_connection = True
            return None
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        if body is None:
            return
        event = build_event(self.command, self.path, list(self.headers.items()), body,
                            self.client_address[0], self.server.tokens)
        try:
            response = self.server.invoke(event)
        except Exception as err:  # what API Gateway does when the function fails
            sys.stderr.write(f"oneoff-audit api: handler failed: {type(err).__name__}: {err}\n")
            response = None
        status, headers, data = response_parts(response)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._send(status, headers, data, self.command == "HEAD")

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _handle


def serve(
    handler: Handler,
    host: str = "127.0.0.1",
    port: int = 0,
    tokens: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    quiet: bool = True,
) -> BridgeServer:
    """Start serving ``handler`` on ``host:port`` (0 = a free port) in a daemon thread; return the server.

    ``tokens`` maps bearer tokens to the claims an authorizer would pass. Stop with ``shutdown()``.
    """
    server = BridgeServer((host, port), handler, tokens or {}, quiet)
    server.thread = threading.Thread(target=server.serve_forever, name=f"api-bridge-{server.server_address[1]}",
                                     daemon=True)
    server.thread.start()
    return server
