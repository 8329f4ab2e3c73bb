"""The auditor's commands: ``sessions``, ``show``, ``download``, ``decrypt``, ``verify``, ``export``.

``sessions``, ``show`` and ``download`` talk to the API: its URL and bearer token come from
``--api-url``/``--token`` or ``ONEOFF_AUDIT_API_URL``/``ONEOFF_AUDIT_TOKEN``. ``decrypt`` needs KMS
(``kms:Decrypt`` on the log key; ``--key-id`` or ``AUDIT_KMS_KEY_ID`` pins the key, otherwise the
key named in the message is used). ``verify`` and ``export`` work offline on a decrypted log (an
encrypted one is decrypted first). Every failure is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import io
import json
import logging
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, Any

from oneoff_audit import crypto, export, formats
from oneoff_audit.errors import IntegrityError, OneoffAuditError
from oneoff_audit.files import replace_when_done
from oneoff_audit.ids import validate_app, validate_session_id
from oneoff_audit.verify import verify_log

API_URL_ENV = "ONEOFF_AUDIT_API_URL"
TOKEN_ENV = "ONEOFF_AUDIT_TOKEN"
KEY_ENV = "AUDIT_KMS_KEY_ID"
TIMEOUT = 60
BLOCK = 1 << 20
EXIT_PENDING = 75  # EX_TEMPFAIL: the session is still recording or being assembled


class ApiError(OneoffAuditError):
    """The API answered with an error, or could not be reached."""


class PendingError(OneoffAuditError):
    """The session is not filed yet."""


# ---------------------------------------------------------------- API client

class ApiClient:
    """A minimal client of the audit API (urllib, bearer token)."""

    def __init__(self, base_url: str, token: str | None, timeout: float = TIMEOUT) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ApiError(f"API URL {base_url!r} is not an http(s) URL")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def get(self, path: str, query: dict[str, Any] | None = None) -> tuple[int, dict[str, str], bytes]:
        """GET ``path``; returns (status, headers, body) for 2xx, raises ApiError/PendingError otherwise."""
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json", "User-Agent": "oneoff-audit-cli"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout) as resp:
                status, resp_headers, body = resp.status, dict(resp.headers.items()), resp.read()
        except urllib.error.HTTPError as err:
            raise ApiError(_error_line(err.code, err.read())) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ApiError(f"cannot reach the API at {self.base_url}: {reason}") from None
        if status == 202:
            state = _json_or_none(body) or {}
            raise PendingError(f"the session is still {state.get('status', 'pending')}; try again later")
        return status, resp_headers, body

    def get_json(self, path: str, query: dict[str, Any] | None = None) -> tuple[dict[str, str], Any]:
        """GET a JSON document."""
        _, headers, body = self.get(path, query)
        value = _json_or_none(body)
        if value is None:
            raise ApiError(f"the API returned something that is not JSON for {path}")
        return headers, value


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _error_line(status: int, body: bytes) -> str:
    value = _json_or_none(body)
    if isinstance(value, dict) and isinstance(value.get("message"), str):
        return safe(f"{status} {value.get('error', 'error')}: {value['message']}")
    return f"HTTP {status}"


# Runner-controlled text (argv, actor, target) must never drive the auditor's terminal: C0 controls
# (tab and newline too: a value must not forge lines), DEL, C1 controls (U+009B is a CSI on many
# terminals) and bidirectional overrides are shown as escapes.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")  # C0: JSON escapes


def safe(text: object) -> str:
    """``text`` with every control or bidi-override character made visible (``\\x1b``, ``\\u202e``)."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else
                       f"\\u{ord(m.group()):04x}", str(text))


def safe_json(value: Any, **kwargs: Any) -> str:
    """JSON that keeps readable text readable but escapes what :func:`safe` escapes (still valid JSON)."""
    text = json.dumps(value, ensure_ascii=False, **kwargs)
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _client(args: argparse.Namespace) -> ApiClient:
    url = args.api_url or os.environ.get(API_URL_ENV)
    if not url:
        raise ApiError(f"no API URL: pass --api-url or set {API_URL_ENV}")
    return ApiClient(url, args.token or os.environ.get(TOKEN_ENV))


def _path(app: str, session_id: str | None = None, tail: str = "") -> str:
    path = f"/apps/{urllib.parse.quote(validate_app(app), safe='')}/sessions"
    if session_id is not None:
        path += "/" + urllib.parse.quote(validate_session_id(session_id), safe="")
    return path + tail


# ---------------------------------------------------------------- helpers

def _quiet_libraries() -> None:
    """The SDK logs a traceback when a broken message is closed; the command says it in one line."""
    for name in ("aws_encryption_sdk", "botocore", "urllib3"):
        log = logging.getLogger(name)
        log.addHandler(logging.NullHandler())
        log.propagate = False


def _human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _argv_text(argv: list[Any]) -> str:
    import shlex

    from oneoff_audit.codec import decode_data
    return safe(shlex.join(decode_data(a).decode("utf-8", "replace") for a in argv))


class _Progress:
    """A one-line progress bar on stderr when it is a terminal."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.done = 0
        self.last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or (self.total is not None and self.done >= self.total)):
            self.last = now
            if self.total:
                width = 30
                filled = int(width * self.done / self.total)
                sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {_human_size(self.done)} / "
                                 f"{_human_size(self.total)} {100 * self.done // self.total:3d}%")
            else:
                sys.stderr.write(f"\r{_human_size(self.done)}")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _open_plaintext(path: str, stack: contextlib.ExitStack, key_id: str | None) -> IO[bytes]:
    """``path`` opened for reading as a plaintext log; an encrypted log is decrypted to a temp file first."""
    try:
        src = stack.enter_context(open(path, "rb"))  # noqa: SIM115 (closed by the exit stack)
    except OSError as err:
        raise OneoffAuditError(f"cannot read {path}: {err.strerror}") from None
    first = src.peek(1)[:1] if hasattr(src, "peek") else b""
    if first == b"{" or first == b"":
        return src
    if first not in (b"\x01", b"\x02"):
        raise OneoffAuditError(f"{path} is neither an audit log (JSON Lines) nor an encrypted one")
    tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="oneoff-audit-"))
    plain = os.path.join(tmpdir, "log.jsonl")
    crypto.decrypt_to_file(src, plain, key_id)
    return stack.enter_context(open(plain, "rb"))


# ---------------------------------------------------------------- commands

def cmd_sessions(args: argparse.Namespace) -> int:
    """List an app's sessions, newest first."""
    api = _client(args)
    query = {"from": args.from_, "to": args.to, "actor": args.actor, "status": args.status, "limit": args.limit}
    shown = 0
    if not args.json:
        print(f"{'STARTED':<27} {'SESSION':<26} {'ACTOR':<16} {'STATUS':<10} {'EXIT':<5} {'DURATION':>9} "
              f"{'SIZE':>10}  COMMAND")
    while True:
        _, page = api.get_json(_path(args.app), query)
        for entry in page["sessions"]:
            shown += 1
            if args.json:
                print(safe_json(entry))
                continue
            status = entry["status"] if entry["complete"] else f"{entry['status']}*"
            code = entry["exit"]["code"] if entry["exit"]["signal"] is None else f"S{entry['exit']['signal']}"
            duration = "-" if entry["duration"] is None else f"{entry['duration']:.1f}s"
            print(f"{entry['started_at']:<27} {entry['session_id']:<26} {safe(entry['actor']['id'][:16]):<16} "
                  f"{status:<10} {code!s:<5} {duration:>9} {_human_size(entry['size']):>10}  "
                  f"{_argv_text(entry['command']['argv'])}")
        for skipped in page.get("skipped", []):
            print(safe(f"oneoff-audit sessions: skipped index entry {skipped['key']}: {skipped['reason']}"),
                  file=sys.stderr)
        if not args.all or not page.get("cursor"):
            break
        query["cursor"] = page["cursor"]
    if not args.json and shown and not args.all and page.get("cursor"):
        print("(more: use --all)", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Show a session's metadata and integrity summary."""
    api = _client(args)
    try:
        _, details = api.get_json(_path(args.app, args.session))
    except PendingError as err:
        print(f"oneoff-audit show: {err}", file=sys.stderr)
        return EXIT_PENDING
    views = None
    if args.access:
        _, views = api.get_json(_path(args.app, args.session, "/access"))
    if args.json:
        print(safe_json({**details, **({"access": views["access"]} if views else {})}, indent=2))
        return 0
    header, trailer, integrity = details["header"], details["trailer"] or {}, details["integrity"]
    actor = header["actor"]
    lines = [
        ("session", f"{details['app']} / {details['session_id']}"),
        ("actor", f"{actor['id']} ({actor['type']}{', ' + actor['name'] if actor['name'] else ''}"
                  f"{', from ' + actor['source_ip'] if actor['source_ip'] else ''})"),
        ("command", _argv_text(header["command"]["argv"])),
        ("tty", str(header["command"]["tty"])),
        ("target", ", ".join(f"{k}={v}" for k, v in header["target"].items()) or "-"),
        ("started", header["started_at"]),
        ("ended", str(trailer.get("ended_at", (details["summary"] or {}).get("ended_at")))),
        ("status", str(trailer.get("status", (details["summary"] or {}).get("status")))),
        ("exit", json.dumps(trailer.get("exit", (details["summary"] or {}).get("exit")))),
        ("complete", str(integrity["complete"])),
        ("gaps", json.dumps(integrity["gaps"])),
        ("events", str(integrity["event_count"])),
        ("chain sha256", str(integrity["chain_sha256"])),
        ("log sha256", f"{integrity['plaintext_sha256']} ({integrity['plaintext_size']} bytes plaintext)"),
        ("encrypted", f"{integrity['ciphertext_sha256']} ({integrity['ciphertext_size']} bytes)"),
        ("retention", json.dumps(details["retention"])),
    ]
    lines += [("problem", p) for p in integrity["problems"]]
    for name, value in lines:
        print(f"{name + ':':<14}{safe(value)}")
    if views:
        for view in views["access"]:
            who = view.get("who", {})
            print(safe(f"{'viewed:':<14}{view.get('at')} {who.get('subject')} {view.get('how')}"))
    return 0


def _stream_to(url: str, dest: str, size: int, sha256: str, progress: bool) -> None:
    """Download ``url`` to ``dest`` via a temp file; rename only when size and SHA-256 match."""
    digest = hashlib.sha256()
    bar = _Progress(size, progress)
    with replace_when_done(dest) as out:
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
                for block in iter(lambda: resp.read(BLOCK), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        except urllib.error.HTTPError as err:
            raise ApiError(f"download failed: HTTP {err.code} (the link may have expired)") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", None) or type(err).__name__
            raise IntegrityError(f"download truncated: got {bar.done} of {size} bytes ({reason})") from None
        bar.finish()
        if bar.done != size:
            raise IntegrityError(f"download truncated: got {bar.done} of {size} bytes")
        if digest.hexdigest() != sha256:
            raise IntegrityError(f"downloaded file's SHA-256 {digest.hexdigest()} is not the filed {sha256}")


def cmd_download(args: argparse.Namespace) -> int:
    """Fetch a session's log: follow the presigned URL (encrypted) or write the inline log (plaintext)."""
    api = _client(args)
    if os.path.exists(args.output) and not args.force:
        raise OneoffAuditError(f"{args.output} exists (use --force to replace it)")
    try:
        _, resp_headers, body = api.get(_path(args.app, args.session, "/log"))
    except PendingError as err:
        print(f"oneoff-audit download: {err}", file=sys.stderr)
        return EXIT_PENDING
    value = _json_or_none(body)
    if not isinstance(value, dict):
        raise ApiError("the API's answer is not JSON")
    if "download_url" in value:
        _stream_to(value["download_url"], args.output, int(value["size"]), value["sha256"],
                   sys.stderr.isatty() and not args.quiet)
        print(f"wrote the encrypted log ({value['size']} bytes, sha256 {value['sha256']}) to {args.output}; "
              f"decrypt it with: oneoff-audit decrypt {args.output} --app {args.app} --session {args.session}",
              file=sys.stderr)
        return 0
    if not {"header", "events", "trailer"} <= set(value):
        raise ApiError("the API's answer is neither a log nor a download link")
    expected = {k.lower(): v for k, v in resp_headers.items()}.get("x-oneoff-audit-sha256")
    digest = hashlib.sha256()
    with replace_when_done(args.output) as out:
        for line in ([value["header"]], value["events"], [value["trailer"]]):
            for item in line:
                data = formats.dumps_line(item)
                digest.update(data)
                out.write(data)
        if expected and digest.hexdigest() != expected:
            raise IntegrityError(f"the inline log re-serialized to SHA-256 {digest.hexdigest()}, "
                                 f"the filed plaintext is {expected}")
    print(f"wrote the decrypted log (inline, sha256 {digest.hexdigest()}) to {args.output}", file=sys.stderr)
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    """Decrypt a downloaded log; the output appears only if the whole message decrypted intact."""
    _quiet_libraries()
    dest = args.output or (args.file[:-4] if args.file.endswith(".enc") else args.file + ".jsonl")
    if os.path.abspath(dest) == os.path.abspath(args.file):
        raise OneoffAuditError("the output would overwrite the input; pass -o")
    if os.path.exists(dest) and not args.force:
        raise OneoffAuditError(f"{dest} exists (use --force to replace it)")
    app = validate_app(args.app) if args.app else None
    session_id = validate_session_id(args.session) if args.session else None
    try:
        src = open(args.file, "rb")  # noqa: SIM115 (closed below; the decrypt may raise)
    except OSError as err:
        raise OneoffAuditError(f"cannot read {args.file}: {err.strerror}") from None
    with src:
        if src.peek(1)[:1] == b"{":
            raise OneoffAuditError(f"{args.file} is already a plaintext audit log")
        context = crypto.decrypt_to_file(src, dest, args.key_id or os.environ.get(KEY_ENV) or None, app, session_id)
    try:
        with open(dest, "rb") as plain:
            header = json.loads(plain.readline())
        if (header.get("app"), header.get("session_id")) != (context.get("app"), context.get("session_id")):
            raise IntegrityError(f"the log inside names {header.get('app')}/{header.get('session_id')} but was "
                                 f"encrypted for {context.get('app')}/{context.get('session_id')}")
    except (ValueError, AttributeError) as err:
        os.unlink(dest)
        raise IntegrityError(f"the decrypted content is not an audit log: {err}") from None
    except IntegrityError:
        os.unlink(dest)
        raise
    print(f"decrypted {context.get('app')}/{context.get('session_id')} to {dest}", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify a log offline; exit 1 naming what is off."""
    _quiet_libraries()
    expected: dict[str, Any] | None = None
    if args.manifest:
        try:
            with open(args.manifest, "rb") as fh:
                expected = formats.parse_json(fh.read(), args.manifest, 16 << 20)
        except OSError as err:
            raise OneoffAuditError(f"cannot read {args.manifest}: {err.strerror}") from None
        if not isinstance(expected, dict):
            raise OneoffAuditError(f"{args.manifest} is not a manifest")
    if args.sha256:
        expected = {**(expected or {}), "plaintext_sha256": args.sha256.lower()}
    with contextlib.ExitStack() as stack:
        report = verify_log(_open_plaintext(args.file, stack, args.key_id or os.environ.get(KEY_ENV)), expected)
    summary = report.summary()
    if args.json:
        print(safe_json(summary, indent=2))
    else:
        for name in ("app", "session_id", "status", "complete", "chunk_count", "expected_chunk_count",
                     "chain_sha256", "event_count", "events", "bytes", "sha256", "size"):
            value = summary[name]
            print(f"{name + ':':<22}{safe(json.dumps(value) if isinstance(value, dict) else value)}")
    if not report.ok:
        print(safe(f"oneoff-audit verify: FAILED: {'; '.join(report.problems)}"), file=sys.stderr)
        return 1
    print("OK", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a log as asciicast v2 or as the raw bytes of its streams."""
    _quiet_libraries()
    if not args.streams or set(args.streams) - set(formats.BYTE_STREAMS):
        raise OneoffAuditError("--streams takes letters from i, o, e")
    with contextlib.ExitStack() as stack:
        src = _open_plaintext(args.file, stack, args.key_id or os.environ.get(KEY_ENV))
        try:
            if args.format == "asciicast":
                if args.output:
                    out: IO[Any] = stack.enter_context(open(args.output, "w", encoding="utf-8", newline=""))
                else:  # UTF-8 whatever the locale says
                    out = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="", write_through=True)
                    stack.callback(out.detach)
                export.write_asciicast(src, out)
            else:
                out = stack.enter_context(open(args.output, "wb")) if args.output else sys.stdout.buffer
                export.write_text(src, out, args.streams)
            out.flush()
        except OSError as err:
            raise OneoffAuditError(f"cannot write {args.output or 'stdout'}: {err.strerror}") from None
    return 0


# ---------------------------------------------------------------- registration

def _api_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-url", help=f"API base URL (default ${API_URL_ENV})")
    p.add_argument("--token", help=f"bearer token (default ${TOKEN_ENV})")


def register(subparsers: Any) -> None:
    """Add the auditor subcommands."""
    p = subparsers.add_parser("sessions", help="list an app's sessions, newest first")
    p.add_argument("--app", required=True)
    p.add_argument("--from", dest="from_", metavar="TIME", help="started at or after (RFC 3339 UTC)")
    p.add_argument("--to", metavar="TIME", help="started before (RFC 3339 UTC)")
    p.add_argument("--actor")
    p.add_argument("--status", help="succeeded, failed, killed, abandoned, incomplete (comma-separated)")
    p.add_argument("--limit", type=int)
    p.add_argument("--all", action="store_true", help="follow the cursor to the end")
    p.add_argument("--json", action="store_true", help="one JSON entry per line")
    _api_args(p)
    p.set_defaults(func=cmd_sessions)

    p = subparsers.add_parser("show", help="a session's metadata and integrity summary")
    p.add_argument("app")
    p.add_argument("session")
    p.add_argument("--access", action="store_true", help="also list who viewed the log")
    p.add_argument("--json", action="store_true")
    _api_args(p)
    p.set_defaults(func=cmd_show)

    p = subparsers.add_parser("download", help="download a session's log (encrypted, or plaintext when inline)")
    p.add_argument("app")
    p.add_argument("session")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _api_args(p)
    p.set_defaults(func=cmd_download)

    p = subparsers.add_parser("decrypt", help="decrypt a downloaded log (written only if intact)")
    p.add_argument("file")
    p.add_argument("-o", "--output", help="plaintext log (default: FILE without .enc)")
    p.add_argument("--app", help="require this app in the encryption context")
    p.add_argument("--session", help="require this session id in the encryption context")
    p.add_argument("--key-id", help=f"KMS key to use (default ${KEY_ENV}, else the key named in the message)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_decrypt)

    p = subparsers.add_parser("verify", help="verify a log offline: counts, hashes, completeness")
    p.add_argument("file")
    p.add_argument("--manifest", help="the session's manifest JSON to check against")
    p.add_argument("--sha256", help="expected SHA-256 of the plaintext log")
    p.add_argument("--key-id", help="KMS key, if FILE is still encrypted")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("export", help="export a log as asciicast v2 or raw text")
    p.add_argument("file")
    p.add_argument("--format", choices=("asciicast", "text"), required=True)
    p.add_argument("-o", "--output", help="default: stdout")
    p.add_argument("--streams", default="oe", help="text: which streams' bytes (i, o, e; default oe)")
    p.add_argument("--key-id", help="KMS key, if FILE is still encrypted")
    p.set_defaults(func=cmd_export)
