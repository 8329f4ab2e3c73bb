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
import math
import re
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import IO, Any

import jsonschema
from jsonschema import Draft202012Validator
from jsonschema.validators import extend

from oneoff_audit.codec import decode_data
from oneoff_audit.errors import FormatError

STREAMS = ("i", "o", "e", "r", "m")
# The assembler's summary of a filed log in its S3 user metadata (read back by recovery and the API).
LOG_METADATA_FORMAT = "oneoff-audit.log/1"
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
def _ecma_regex(pattern: str) -> re.Pattern[str]:
    """``pattern`` with the ECMA-262 meaning JSON Schema gives it, for the patterns our schemas use.

    Python's ``re`` differs in two ways that matter for untrusted input: ``$`` also matches before a
    final newline (``"app\\n"`` would pass ``^[a-z0-9]+$``), and ``\\d`` matches any Unicode digit
    (fullwidth digits would pass as a resize). A trailing ``$`` becomes ``\\Z`` and classes are ASCII.
    """
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + "\\Z"
    return re.compile(pattern, re.ASCII)


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    if validator.is_type(instance, "string") and _ecma_regex(pattern).search(instance) is None:
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = extend(Draft202012Validator, {"pattern": _ecma_pattern})


@cache
def _validator(name: str) -> Any:
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    return _Validator(schema)


def _field_path(error: jsonschema.ValidationError) -> str:
    parts = list(error.absolute_path)
    # A missing or an unexpected property is named by the error, not by its path (which is the parent).
    if error.validator == "required" and isinstance(error.instance, dict):
        parts += [name for name in error.validator_value
                  if name not in error.instance and error.message.startswith(f"{name!r} ")][:1]
    elif error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {})
        parts += sorted(name for name in error.instance if name not in known)[:1]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
    return path.lstrip(".") or "(root)"


def validate(obj: Any, schema_name: str, where: str) -> Any:
    """Validate ``obj`` against a shipped schema; FormatError names ``where`` and the failing field."""
    error = jsonschema.exceptions.best_match(_validator(schema_name).iter_errors(obj))
    if error is not None:
        raise FormatError(where, _field_path(error), error.message)
    return obj


def _too_deep(value: Any) -> bool:
    """True if containers nest deeper than MAX_JSON_DEPTH (walks containers only, never string bytes)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, list | dict):
                if depth + 1 > MAX_JSON_DEPTH:
                    return True
                stack.append((child, depth + 1))
    return False


def parse_json(raw: bytes, where: str, max_bytes: int = MAX_LINE_BYTES) -> Any:
    """Parse untrusted JSON with caps on size and nesting depth."""
    if len(raw) > max_bytes:
        raise FormatError(where, "", f"larger than {max_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FormatError(where, "", f"not valid UTF-8 at byte {err.start}") from err
    # Depth is measured on the parsed containers (cheap), not by scanning bytes in Python: terminal
    # output is full of "[" inside strings. The C parser stops hostile nesting at the recursion limit.
    too_deep = FormatError(where, "", f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise too_deep from None
    except ValueError as err:
        raise FormatError(where, "", f"invalid JSON: {err}") from err
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and isinstance(value, list | dict) and _too_deep(value):
        raise too_deep
    if b"\\ud" in raw or b"\\uD" in raw:  # only a \uDXXX escape can make a lone surrogate
        _check_surrogates(value, where, [])
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Readers disagree on which of two equal keys wins; refuse to guess.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key[:100]!r}")
            seen.add(key)
    return obj


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _check_surrogates(value: Any, where: str, path: list[str | int]) -> None:
    """Reject strings holding a lone surrogate (a ``\\udXXX`` escape JSON allows but UTF-8 cannot hold)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(root)"
            raise FormatError(where, field, "string holds a lone surrogate (not valid Unicode)") from err
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_surrogates(item, where, [*path, index])
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_surrogates(key, where, [*path, "(key)"])
            _check_surrogates(item, where, [*path, key])


def dumps_line(obj: Any) -> bytes:
    """One compact JSON Lines record, UTF-8, newline-terminated."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def format_time(ts: datetime) -> str:
    """RFC 3339 UTC with microseconds: ``2026-11-25T14:46:00.123456Z``."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_RFC3339_UTC = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?Z")


def parse_time(value: str, where: str = "time", field: str = "") -> datetime:
    """Parse the RFC 3339 UTC form written by :func:`format_time` (fraction optional)."""
    try:
        if not isinstance(value, str) or _RFC3339_UTC.fullmatch(value) is None:
            raise ValueError("not YYYY-MM-DDTHH:MM:SS[.ffffff]Z")
        return datetime.fromisoformat(value[:-1]).replace(tzinfo=UTC)
    except ValueError as err:
        raise FormatError(where, field, f"not an RFC 3339 UTC time: {value!r}") from err


def check_event(event: Any, where: str) -> list[Any]:
    """Fast structural check of one event, equivalent to ``event.schema.json`` (tested against it)."""
    if not isinstance(event, list) or len(event) != 3:
        raise FormatError(where, "(root)", "an event is [t, stream, data]")
    t, stream, data = event
    if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < math.inf:
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
    if not body:
        raise FormatError(where, "", "empty chunk (no header line)")
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
    while raw := stream.readline(MAX_LINE_BYTES + 1):  # bounded: a line without newline cannot grow memory
        number += 1
        line_where = f"{where} line {number}"
        if pending_trailer is not None:
            raise FormatError(line_where, "", "data after the trailer")
        if len(raw) > MAX_LINE_BYTES:
            raise FormatError(line_where, "", f"larger than {MAX_LINE_BYTES} bytes")
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
