"""``oneoff-audit local``: the whole system on one machine, over real HTTP.

A moto server on 127.0.0.1 plays S3, KMS and SQS. The assembly queue is polled the way Lambda's
SQS event source does it: messages become an SQS batch event for the real assembler handler, and
the reported batch item failures stay on the queue. The API handler is served over HTTP, each
request turned into an API Gateway proxy event carrying the claims of its bearer token. The
sweeper and the digest function run on their schedules.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from oneoff_audit.aws import client, reset_clients
from oneoff_audit.errors import OneoffAuditError
from oneoff_audit.provision import Resources, provision

DEFAULT_BUCKET = "oneoff-audit-local"
FUNCTIONS_DIR = Path(__file__).resolve().parents[3] / "functions"
STATIC_DIR = Path(__file__).resolve().parent / "static"
Handler = Callable[[dict[str, Any], Any], Any]


@dataclass
class LocalContext:
    """A LambdaContext stand-in for handlers run by the local stack."""

    function_name: str
    memory_limit_in_mb: int = 1024
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:local"
    aws_request_id: str = field(default_factory=lambda: secrets.token_hex(16))

    def get_remaining_time_in_millis(self) -> int:
        return 900_000


def load_handler(name: str) -> Handler:
    """The ``lambda_handler`` of ``functions/<name>/<name>_handler.py`` (the deployed code)."""
    path = FUNCTIONS_DIR / name / f"{name}_handler.py"
    if not path.is_file():
        raise FileNotFoundError(f"handler {path} not found: `oneoff-audit local` runs from a source checkout")
    module_name = f"{name}_handler"
    module: ModuleType | None = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return module.lambda_handler


STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}
# The page loads only its own files; the player compiles its bundled WebAssembly and sets inline styles.
DASHBOARD_CSP = ("default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self' 'unsafe-inline'; "
                 "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                 "form-action 'none'; frame-ancestors 'none'")


def _static_error(status: int, message: str) -> dict[str, Any]:
    return {"statusCode": status, "headers": {"Content-Type": "application/json"},
            "body": json.dumps({"message": message})}


def static_response(path: str, root: Path = STATIC_DIR) -> dict[str, Any]:
    """A proxy response with the dashboard file for ``/`` or ``/static/<file>`` (404 outside ``root``)."""
    if path in ("/", "/index.html"):
        relative = "index.html"
    elif path.startswith("/static/"):
        relative = path[len("/static/"):]
    else:
        return _static_error(404, "not found")
    parts = relative.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") or "\\" in part or "\0" in part for part in parts):
        return _static_error(404, "not found")
    base = root.resolve()
    file = base.joinpath(*parts).resolve()
    if not file.is_relative_to(base) or not file.is_file() or file.suffix not in STATIC_TYPES:
        return _static_error(404, "not found")
    content_type = STATIC_TYPES[file.suffix]
    headers = {"Content-Type": content_type, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer"}
    if file.suffix == ".html":
        headers["Content-Security-Policy"] = DASHBOARD_CSP
    data = file.read_bytes()
    if content_type.startswith(("text/", "application/json", "image/svg")):
        return {"statusCode": 200, "headers": headers, "body": data.decode("utf-8"), "isBase64Encoded": False}
    return {"statusCode": 200, "headers": headers, "body": base64.b64encode(data).decode("ascii"),
            "isBase64Encoded": True}


def with_dashboard(api_handler: Handler, root: Path = STATIC_DIR) -> Handler:
    """Wrap the API handler so ``GET /`` and ``GET /static/...`` serve the dashboard's files."""

    def handler(event: dict[str, Any], context: Any) -> Any:
        method = event.get("httpMethod") or event.get("requestContext", {}).get("http", {}).get("method")
        path = event.get("path") or event.get("rawPath") or ""
        if method in ("GET", "HEAD") and (path in ("/", "/index.html") or path.startswith("/static/")):
            return static_response(path, root)
        return api_handler(event, context)

    return handler


def sqs_batch_event(messages: list[dict[str, Any]], queue_arn: str) -> dict[str, Any]:
    """The event Lambda's SQS event source mapping builds from received messages."""
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": {k: str(v) for k, v in m.get("Attributes", {}).items()},
                "messageAttributes": {},
                "md5OfBody": m.get("MD5OfBody", ""),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            }
            for m in messages
        ]
    }


class QueuePoller(threading.Thread):
    """Polls the assembly queue and runs the assembler handler on each batch, like Lambda does."""

    def __init__(self, queue_url: str, handler: Handler, retry_delay: int = 2, batch_size: int = 5) -> None:
        super().__init__(name="assembly-poller", daemon=True)
        self.queue_url = queue_url
        self.handler = handler
        self.retry_delay = retry_delay
        self.batch_size = batch_size
        self.stopping = threading.Event()
        self.batches = 0

    def run(self) -> None:
        sqs = client("sqs")
        arn = sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        while not self.stopping.is_set():
            try:
                received = sqs.receive_message(
                    QueueUrl=self.queue_url, MaxNumberOfMessages=self.batch_size, WaitTimeSeconds=1,
                    AttributeNames=["All"],
                ).get("Messages", [])
            except Exception as err:  # the server is stopping, or a transient error: try again
                if self.stopping.wait(0.5):
                    return
                print(f"oneoff-audit local: queue receive failed: {err}", file=sys.stderr)
                continue
            if not received:
                continue
            self.batches += 1
            failed = self._run_batch(received, arn)
            for message in received:
                if message["MessageId"] in failed:
                    sqs.change_message_visibility(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"],
                                                  VisibilityTimeout=self.retry_delay)
                else:
                    sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])

    def _run_batch(self, messages: list[dict[str, Any]], arn: str) -> set[str]:
        try:
            response = self.handler(sqs_batch_event(messages, arn), LocalContext("assembler")) or {}
        except Exception as err:  # the whole batch failed: every message is retried
            print(f"oneoff-audit local: assembler failed: {err}", file=sys.stderr)
            return {m["MessageId"] for m in messages}
        return {item["itemIdentifier"] for item in response.get("batchItemFailures", [])}

    def stop(self) -> None:
        self.stopping.set()


class Scheduled(threading.Thread):
    """Runs a scheduled handler every ``interval`` seconds (EventBridge schedule stand-in)."""

    def __init__(self, name: str, handler: Handler, interval: float) -> None:
        super().__init__(name=f"schedule-{name}", daemon=True)
        self.fn_name = name
        self.handler = handler
        self.interval = interval
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            event = {"version": "0", "source": "aws.events", "detail-type": "Scheduled Event",
                     "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "detail": {}}
            try:
                self.handler(event, LocalContext(self.fn_name))
            except Exception as err:
                print(f"oneoff-audit local: {self.fn_name} failed: {err}", file=sys.stderr)

    def stop(self) -> None:
        self.stopping.set()


@dataclass
class LocalStack:
    """A running embedded stack; :meth:`stop` shuts every part down."""

    endpoint: str
    api_url: str
    resources: Resources
    tokens: dict[str, dict[str, str]]
    admin_token: str
    _stoppers: list[Callable[[], None]] = field(default_factory=list)

    def dashboard_url(self, token: str | None = None) -> str:
        """The dashboard's address, the token in the fragment (the browser never sends it to the server)."""
        return f"{self.api_url}/#token={token or self.admin_token}"

    def env(self) -> dict[str, str]:
        """What a runner or an auditor needs to talk to this stack."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
            "AWS_DEFAULT_REGION": os.environ["AWS_DEFAULT_REGION"],
            **self.resources.env(),
            "ONEOFF_AUDIT_API_URL": self.api_url,
            "ONEOFF_AUDIT_TOKEN": self.admin_token,
        }

    def stop(self) -> None:
        """Stop the poller, schedules, API server and moto server (in that order)."""
        for stopper in reversed(self._stoppers):
            with contextlib.suppress(Exception):
                stopper()
        self._stoppers.clear()


def _start_moto(port: int, stoppers: list[Callable[[], None]]) -> str:
    """Start moto's server on 127.0.0.1:``port``; fail clearly when the port is taken."""
    from moto.server import ThreadedMotoServer

    if port:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as err:
                raise OneoffAuditError(f"cannot start the moto server on 127.0.0.1:{port}: {err.strerror}") from err
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    stoppers.append(moto.stop)
    host, bound = moto.get_host_and_port()
    return f"http://{host}:{bound}"


def start(
    port: int = 0,
    s3_port: int = 0,
    bucket: str = DEFAULT_BUCKET,
    tokens: dict[str, dict[str, str]] | None = None,
    sweep_interval: float = 60.0,
    digest_interval: float = 3600.0,
    abandon_after: int = 3600,
    endpoint: str | None = None,
) -> LocalStack:
    """Start every part on 127.0.0.1 and return the running stack (ports 0 = pick free ones).

    With ``endpoint`` an already running moto server is used instead of starting one.
    """

    for name, value in (("AWS_ACCESS_KEY_ID", "local"), ("AWS_SECRET_ACCESS_KEY", "local"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("POWERTOOLS_SERVICE_NAME", "oneoff-audit")
    os.environ.setdefault("POWERTOOLS_METRICS_NAMESPACE", "OneoffAudit")
    os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
    stoppers: list[Callable[[], None]] = []
    if endpoint is None:
        endpoint = _start_moto(s3_port, stoppers)
    from oneoff_audit.evidence.moto_compat import honour_kms_digest_messages

    honour_kms_digest_messages()  # moto signs DIGEST messages like AWS does (large digests)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    reset_clients()
    resources = provision(bucket=bucket)
    os.environ.update(resources.env())
    os.environ["ABANDON_AFTER"] = str(abandon_after)

    admin_token = secrets.token_urlsafe(24)
    table = {admin_token: {"sub": "local-admin", "name": "Local auditor", "custom:audit_apps": "*",
                           "custom:audit_admin": "true"}}
    table.update(tokens or {})

    from oneoff_audit.api.httpbridge import serve

    server = serve(with_dashboard(load_handler("api")), "127.0.0.1", port, table)
    stoppers.append(server.shutdown)
    api_url = f"http://127.0.0.1:{server.server_address[1]}"

    poller = QueuePoller(resources.queue_url, load_handler("assembler"))
    poller.start()
    stoppers.append(poller.stop)
    for name, interval in (("sweeper", sweep_interval), ("digest", digest_interval)):
        if (FUNCTIONS_DIR / name / f"{name}_handler.py").is_file():
            job = Scheduled(name, load_handler(name), interval)
            job.start()
            stoppers.append(job.stop)
    return LocalStack(endpoint, api_url, resources, table, admin_token, stoppers)


def _cmd_local(args: argparse.Namespace) -> int:
    os.environ["POWERTOOLS_LOG_LEVEL"] = args.log_level  # before the handlers (and their Loggers) load
    logging.getLogger("werkzeug").setLevel(logging.DEBUG if args.log_level == "DEBUG" else logging.ERROR)
    if args.log_level in ("WARNING", "ERROR"):  # no CloudWatch EMF metric lines on the terminal
        os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
        warnings.filterwarnings("ignore", message="No application metrics to publish")
    tokens: dict[str, dict[str, str]] = {}
    if args.tokens_file:
        tokens = json.loads(Path(args.tokens_file).read_text("utf-8"))
    stack = start(port=args.port, s3_port=args.s3_port, bucket=args.bucket, tokens=tokens,
                  sweep_interval=args.sweep_interval, abandon_after=args.abandon_after)
    lines = [f"{k}={v}" for k, v in stack.env().items()]
    if args.env_file:
        tmp = Path(args.env_file + ".tmp")
        tmp.write_text("\n".join(lines) + "\n", "utf-8")
        tmp.replace(args.env_file)
    print("oneoff-audit local is running. For a runner or an auditor:", flush=True)
    for line in lines:
        print(f"  export {line}", flush=True)
    print(f"Dashboard: {stack.dashboard_url()}   (Ctrl-C to stop)", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    stack.stop()
    print("oneoff-audit local stopped.", flush=True)
    return 0


def register(subparsers: Any) -> None:
    """Add the ``local`` subcommand."""
    p = subparsers.add_parser("local", help="run the whole system on 127.0.0.1 (moto server, assembler, API)")
    p.add_argument("--port", type=int, default=8700, help="API port (0 = any free port)")
    p.add_argument("--s3-port", type=int, default=8701, help="moto server port for S3/KMS/SQS (0 = any free port)")
    p.add_argument("--bucket", default=DEFAULT_BUCKET)
    p.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="level of the functions' JSON logs (stdout) and of the moto server's request log")
    p.add_argument("--env-file", help="also write the environment (KEY=VALUE lines) to this file once ready")
    p.add_argument("--tokens-file", help="JSON {token: claims} of extra API callers")
    p.add_argument("--sweep-interval", type=float, default=60.0, help="seconds between sweeper runs")
    p.add_argument("--abandon-after", type=int, default=3600, help="seconds of silence before a session is abandoned")
    p.set_defaults(func=_cmd_local)
