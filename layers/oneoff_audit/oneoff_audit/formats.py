"""The wire formats: JSON Schemas, strict readers for untrusted input, canonical writers.

Everything in staging is written by runners and is therefore untrusted: readers cap sizes before
parsing, validate against the shipped JSON Schemas, and raise :class:`FormatError` naming the
object and the field. Writers produce compact UTF-8 JSON Lines (``\\n``-terminated).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import IO, Any

import jsonschema
from jsonschema import Draft202012Validator

from oneoff_audit.codec import decode_data
from oneoff_audit.errors import FormatError

STREAMS = ("i", "o", "e", "r", "m")
BYTE_STREAMS = ("i", "o", "e")
STATUSES = ("succeeded", "failed", "killed", "abandoned")

MAX_LINE_BYTES = 1 << 20  # one JSON line (header or event) in a chunk or a log
MAX_OPENED_BYTES = 256 << 10
MAX_CLOSED_BYTES = 64 << 20  # 10^6 chunk digests fit
MAX_CHUNK_DECOMPRESSED = 64 << 20  # gzip-bomb cap for one chunk
MAX_JSON_DEPTH = 32

SCHEMA_NAMES = ("session-header", "chunk-header", "event", "close-marker", "log-header", "log-trailer", "index-entry",
                "manifest", "digest")


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema ``name`` shipped in ``oneoff_audit/schemas/``."""
    if name not in SCHEMA_NAMES:
        raise KeyError(name)
    text = resources.files("oneoff_audit").joinpath("schemas", f"{name}.schema.json").read_text("utf-8")
    return json.loads(text)


@cache
def _validator(name: str) -> Draft202012Validator:
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _field_path(error: jsonschema.ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return path.lstrip(".") or "(root)"


def validate(obj: Any, schema_name: str, where: str) -> Any:
    """Validate ``obj`` against a shipped schema; FormatError names ``where`` and the failing field."""
    error = jsonschema.exceptions.best_match(_validator(schema_name).iter_errors(obj))
    if error is not None:
        raise FormatError(where, _field_path(error), error.message)
    return obj


def _depth_ok(raw: bytes) -> bool:
    depth = 0
    in_str = False
    escaped = False
    for byte in raw:
        if in_str:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_str = False
        elif byte == 0x22:
            in_str = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


def parse_json(raw: bytes, where: str, max_bytes: int = MAX_LINE_BYTES) -> Any:
    """Parse untrusted JSON with caps on size and nesting depth."""
    if len(raw) > max_bytes:
        raise FormatError(where, "", f"larger than {max_bytes} bytes")
    if (raw.count(b"[") + raw.count(b"{")) > MAX_JSON_DEPTH and not _depth_ok(raw):
        raise FormatError(where, "", f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FormatError(where, "", f"not valid UTF-8 at byte {err.start}") from err
    try:
        return json.loads(text)
    except ValueError as err:
        raise FormatError(where, "", f"invalid JSON: {err}") from err


def dumps_line(obj: Any) -> bytes:
    """One compact JSON Lines record, UTF-8, newline-terminated."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def format_time(ts: datetime) -> str:
    """RFC 3339 UTC with microseconds: ``2026-11-25T14:46:00.123456Z``."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str, where: str = "time", field: str = "") -> datetime:
    """Parse the RFC 3339 UTC form written by :func:`format_time` (fraction optional)."""
    try:
        if not isinstance(value, str) or not value.endswith("Z"):
            raise ValueError("must end with Z")
        return datetime.fromisoformat(value[:-1]).replace(tzinfo=UTC)
    except ValueError as err:
        raise FormatError(where, field, f"not an RFC 3339 UTC time: {value!r}") from err


def check_event(event: Any, where: str) -> list[Any]:
    """Fast structural check of one event, equivalent to ``event.schema.json`` (tested against it)."""
    if not isinstance(event, list) or len(event) != 3:
        raise FormatError(where, "(root)", "an event is [t, stream, data]")
    t, stream, data = event
    if isinstance(t, bool) or not isinstance(t, int | float) or t < 0:
        raise FormatError(where, "[0]", "t must be a number >= 0")
    if stream in BYTE_STREAMS:
        decode_data(data, where, "[2]")
    elif stream == "r":
        if not isinstance(data, str) or "x" not in data:
            raise FormatError(where, "[2]", "resize data must be 'COLSxROWS'")
        cols, _, rows = data.partition("x")
        if not (cols.isascii() and cols.isdigit() and rows.isascii() and rows.isdigit()
                and 1 <= len(cols) <= 5 and 1 <= len(rows) <= 5):
            raise FormatError(where, "[2]", "resize data must be 'COLSxROWS'")
    elif stream == "m":
        kind = data.get("kind") if isinstance(data, dict) else None
        if not isinstance(kind, str) or not 1 <= len(kind) <= 64:
            raise FormatError(where, "[2]", "marker data must be an object with a 'kind' string")
    else:
        raise FormatError(where, "[1]", f"stream must be one of {', '.join(STREAMS)}")
    return event


def event_bytes(event: list[Any]) -> bytes:
    """The raw bytes carried by an ``i``/``o``/``e`` event."""
    return decode_data(event[2])


# ---------------------------------------------------------------- chunks

def encode_chunk(header: dict[str, Any], events: list[list[Any]]) -> bytes:
    """Gzip (mtime 0, so identical content gives identical bytes) of header line + event lines."""
    body = io.BytesIO()
    body.write(dumps_line(header))
    for event in events:
        body.write(dumps_line(event))
    return gzip.compress(body.getvalue(), compresslevel=6, mtime=0)


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _gunzip_capped(raw: bytes, where: str, cap: int) -> bytes:
    decomp = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = decomp.decompress(raw, cap + 1)
    except zlib.error as err:
        raise FormatError(where, "", f"not valid gzip: {err}") from err
    if len(out) > cap:
        raise FormatError(where, "", f"decompresses to more than {cap} bytes (gzip bomb?)")
    if not decomp.eof:
        raise FormatError(where, "", "truncated gzip stream")
    if decomp.unused_data:
        raise FormatError(where, "", "trailing data after the gzip stream")
    return out


def read_chunk(raw: bytes, where: str, cap: int = MAX_CHUNK_DECOMPRESSED) -> tuple[dict[str, Any], list[list[Any]]]:
    """Decompress (capped) and validate a chunk: its header and every event line."""
    body = _gunzip_capped(raw, where, cap)
    if not body.endswith(b"\n"):
        raise FormatError(where, "", "last line is not newline-terminated (truncated?)")
    lines = body[:-1].split(b"\n")
    header = validate(parse_json(lines[0], f"{where} line 1"), "chunk-header", f"{where} header")
    events = []
    for number, line in enumerate(lines[1:], start=2):
        line_where = f"{where} line {number}"
        events.append(check_event(parse_json(line, line_where), line_where))
    return header, events


def read_json_object(raw: bytes, schema_name: str, where: str, max_bytes: int) -> dict[str, Any]:
    """Parse and validate one small JSON document (opened.json, closed.json, index entry)."""
    return validate(parse_json(raw, where, max_bytes), schema_name, where)


# ---------------------------------------------------------------- audit log

def log_header_from_session(session: dict[str, Any]) -> dict[str, Any]:
    """The log's first line: the session header restated as ``type: header``."""
    header = {"type": "header", **session, "format": "oneoff-audit.log"}
    return validate(header, "log-header", "log header")


def iter_log_lines(stream: IO[bytes], where: str = "log") -> Iterator[tuple[str, Any]]:
    """Read an audit log's JSON Lines, yielding ``("header"|"event"|"trailer", value)`` validated.

    Raises FormatError if the header is not first, the trailer not last, or a line is malformed.
    """
    number = 0
    pending_trailer = None
    for raw in stream:
        number += 1
        line_where = f"{where} line {number}"
        if pending_trailer is not None:
            raise FormatError(line_where, "", "data after the trailer")
        if not raw.endswith(b"\n"):
            raise FormatError(line_where, "", "not newline-terminated (truncated log?)")
        value = parse_json(raw[:-1], line_where)
        if number == 1:
            yield "header", validate(value, "log-header", f"{where} header")
        elif isinstance(value, dict):
            pending_trailer = validate(value, "log-trailer", f"{where} trailer")
        else:
            yield "event", check_event(value, line_where)
    if number == 0:
        raise FormatError(where, "", "empty log")
    if pending_trailer is None:
        raise FormatError(where, "", "no trailer (truncated log?)")
    yield "trailer", pending_trailer
