"""Every format: round trip, schema validation, and rejection of bad input with the exact error."""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import io
import json
import re
import struct
import zlib
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from format_samples import APP, SID, chunk_header, close_marker, events, index_entry, log_trailer, sample
from hypothesis import given, settings
from hypothesis import strategies as st

from oneoff_audit import formats
from oneoff_audit.errors import FormatError
from oneoff_audit.formats import (
    MAX_CHUNK_DECOMPRESSED,
    MAX_CLOSED_BYTES,
    MAX_JSON_DEPTH,
    MAX_LINE_BYTES,
    MAX_OPENED_BYTES,
    check_event,
    dumps_line,
    encode_chunk,
    format_time,
    iter_log_lines,
    log_header_from_session,
    parse_json,
    parse_time,
    read_chunk,
    read_json_object,
    sha256_hex,
    validate,
)

pytestmark = pytest.mark.unit

APP_PATTERN = "^(?!.*\\.\\.)[a-z0-9]([a-z0-9._-]*[a-z0-9])?$"
SID_PATTERN = "^[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?$"

# How each JSON object is read in production: (reader, the object's name in errors).
OBJECT_READERS = {
    "session-header": (lambda raw: read_json_object(raw, "session-header", "opened.json", MAX_OPENED_BYTES),
                       "opened.json"),
    "close-marker": (lambda raw: read_json_object(raw, "close-marker", "closed.json", MAX_CLOSED_BYTES),
                     "closed.json"),
    "index-entry": (lambda raw: read_json_object(raw, "index-entry", "index entry", MAX_OPENED_BYTES),
                    "index entry"),
    "chunk-header": (lambda raw: read_chunk(gzip.compress(raw + b"\n", mtime=0), "chunk 00000000")[0],
                     "chunk 00000000 header"),
    "log-header": (lambda raw: next(iter_log_lines(io.BytesIO(raw + b"\n")))[1], "log header"),
    "log-trailer": (lambda raw: _only_trailer(raw), "log trailer"),
}


def _only_trailer(raw: bytes) -> dict:
    log = dumps_line(sample("log-header")) + raw + b"\n"
    return list(iter_log_lines(io.BytesIO(log)))[-1][1]


def read_object(name: str, obj) -> dict:
    reader, _ = OBJECT_READERS[name]
    return reader(json.dumps(obj, ensure_ascii=False).encode())


def rejects(name: str, obj) -> str:
    """The exact error message the production reader of ``name`` gives for ``obj``."""
    with pytest.raises(FormatError) as info:
        read_object(name, obj)
    return str(info.value)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", list(OBJECT_READERS))
def test_every_object_round_trips_through_its_reader(name):
    obj = sample(name)
    line = dumps_line(obj)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == obj
    assert validate(copy.deepcopy(obj), name, name) == obj
    assert read_object(name, obj) == obj


def test_dumps_line_is_compact_utf8_json_lines():
    assert dumps_line([0.25, "o", "é€😀\x1b[0m\n"]) == '[0.25,"o","é€😀\\u001b[0m\\n"]\n'.encode()
    assert dumps_line({"a": None, "b": True}) == b'{"a":null,"b":true}\n'
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        dumps_line([float("nan"), "o", "x"])


def test_chunk_round_trip_and_deterministic_bytes():
    header, evs = chunk_header(seq=3), events()
    raw = encode_chunk(header, evs)
    assert read_chunk(raw, "chunk 00000003") == (header, evs)
    assert encode_chunk(header, evs) == raw  # gzip mtime 0: same content, same bytes, same SHA-256
    assert raw[4:8] == b"\0\0\0\0"
    assert sha256_hex(raw) == hashlib.sha256(raw).hexdigest()
    assert gzip.decompress(raw) == b"".join(dumps_line(x) for x in [header, *evs])


def test_chunk_with_header_only():
    raw = encode_chunk(chunk_header(), [])
    assert read_chunk(raw, "chunk 0") == (chunk_header(), [])


_TEXT = st.text(max_size=30)
_DATA = st.one_of(_TEXT, st.binary(min_size=1, max_size=20).map(lambda b: {"b64": base64.b64encode(b).decode()}))
_T = st.floats(min_value=0, max_value=1e7, allow_nan=False).map(lambda t: round(t, 6))
VALID_EVENTS = st.one_of(
    st.tuples(_T, st.sampled_from(["i", "o", "e"]), _DATA),
    st.tuples(_T, st.just("r"), st.builds("{}x{}".format, st.integers(0, 99999), st.integers(0, 99999))),
    st.tuples(_T, st.just("m"), st.fixed_dictionaries({"kind": st.text(min_size=1, max_size=64)},
                                                      optional={"bytes": st.integers(0), "note": _TEXT})),
).map(list)


@settings(max_examples=120, deadline=None)
@given(VALID_EVENTS)
def test_event_round_trip(event):
    line = dumps_line(event)
    back = check_event(parse_json(line[:-1], "line"), "line")
    assert back == event
    assert validate(back, "event", "event") == event
    assert dumps_line(back) == line  # byte-identical when written again


@settings(max_examples=30, deadline=None)
@given(name=st.text(max_size=40), target=st.dictionaries(st.from_regex(r"\A[A-Za-z0-9_.:-]{1,10}\Z"), _TEXT,
                                                         max_size=4),
       argv=st.lists(_DATA, min_size=1, max_size=4), env_keys=st.lists(_TEXT, max_size=4))
def test_session_header_with_arbitrary_metadata_round_trips(name, target, argv, env_keys):
    obj = sample("session-header")
    obj["actor"]["name"], obj["target"] = name, target
    obj["command"]["argv"], obj["command"]["env_keys"] = argv, env_keys
    raw = dumps_line(obj)
    assert read_json_object(raw, "session-header", "opened.json", MAX_OPENED_BYTES) == obj
    assert dumps_line(read_object("log-header", log_header_from_session(obj))) == dumps_line(
        {"type": "header", **obj, "format": "oneoff-audit.log"})


def test_log_header_restates_the_session():
    session = sample("session-header")
    header = log_header_from_session(session)
    assert header == {"type": "header", **session, "format": "oneoff-audit.log"}
    assert next(iter(header)) == "type"
    session["extra"] = 1
    with pytest.raises(FormatError) as info:
        log_header_from_session(session)
    assert str(info.value) == "log header: extra: Additional properties are not allowed ('extra' was unexpected)"


# ---------------------------------------------------------------- object rejections (every format)

@pytest.mark.parametrize("name", list(OBJECT_READERS))
def test_every_missing_field_is_named(name):
    _, where = OBJECT_READERS[name]
    for field in formats.load_schema(name)["required"]:
        obj = sample(name)
        del obj[field]
        assert rejects(name, obj) == f"{where}: {field}: {field!r} is a required property"


@pytest.mark.parametrize("name", list(OBJECT_READERS))
def test_extra_fields_are_named(name):
    _, where = OBJECT_READERS[name]
    obj = sample(name)
    obj["zz_extra"] = 1
    assert rejects(name, obj) == f"{where}: zz_extra: Additional properties are not allowed ('zz_extra' was unexpected)"


@pytest.mark.parametrize("name", list(OBJECT_READERS))
def test_wrong_types_are_named(name):
    _, where = OBJECT_READERS[name]
    for field, value, message in [
        ("session_id", 5, "5 is not of type 'string'"),
        ("app", None, "None is not of type 'string'"),
        ("app", ["app"], "['app'] is not of type 'string'"),
    ]:
        obj = sample(name)
        obj[field] = value
        assert rejects(name, obj) == f"{where}: {field}: {message}"
    obj = sample(name)
    if name == "log-trailer":  # in a log, a list after the header is read as an event
        assert rejects(name, [obj]) == "log line 2: (root): an event is [t, stream, data]"
    else:
        assert rejects(name, [obj]) == f"{where}: (root): [{obj!r}] is not of type 'object'"


HOSTILE_IDS = ["../x", "a/b", "%2F", "\uff41\uff50\uff50", "a..b", "app\n", "app\x00", " app", "-app"]


@pytest.mark.parametrize("name", list(OBJECT_READERS))
@pytest.mark.parametrize("bad", HOSTILE_IDS)
def test_hostile_ids_are_rejected(name, bad):
    _, where = OBJECT_READERS[name]
    obj = sample(name)
    obj["app"] = bad
    assert rejects(name, obj) == f"{where}: app: {bad!r} does not match {APP_PATTERN!r}"
    if "." not in bad:  # '.' is not a session id character at all; the app case covers '..'
        obj = sample(name)
        obj["session_id"] = bad
        assert rejects(name, obj) == f"{where}: session_id: {bad!r} does not match {SID_PATTERN!r}"


@pytest.mark.parametrize("name", list(OBJECT_READERS))
def test_empty_and_overlong_ids_are_rejected(name):
    _, where = OBJECT_READERS[name]
    for field, long_value in [("app", "a" * 200), ("session_id", "S" * 200)]:
        obj = sample(name)
        obj[field] = ""
        assert rejects(name, obj) == f"{where}: {field}: '' should be non-empty"
        obj[field] = long_value
        assert rejects(name, obj) == f"{where}: {field}: {long_value!r} is too long"


SPECIFIC_REJECTIONS = [
    ("session-header", ("format",), "oneoff-audit.log", "format: 'oneoff-audit.session' was expected"),
    ("session-header", ("version",), 2, "version: 1 was expected"),
    ("session-header", ("version",), True, "version: 1 was expected"),
    ("session-header", ("actor", "type"), "robot", "actor.type: 'robot' is not one of ['user', 'service']"),
    ("session-header", ("actor", "id"), "", "actor.id: '' should be non-empty"),
    ("session-header", ("actor", "zz"), 1, "actor.zz: Additional properties are not allowed ('zz' was unexpected)"),
    ("session-header", ("command", "argv"), [], "command.argv: [] should be non-empty"),
    ("session-header", ("command", "argv", 2), {"b64": "QQ"},
     "command.argv[2].b64: 'QQ' does not match "
     "'^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$'"),
    ("session-header", ("command", "tty"), "yes", "command.tty: 'yes' is not of type 'boolean'"),
    ("session-header", ("command", "term_size", "cols"), 70000,
     "command.term_size.cols: 70000 is greater than the maximum of 65535"),
    ("session-header", ("target", "bad key"), "x", "target: 'bad key' does not match '^[A-Za-z0-9_.:-]{1,64}$'"),
    ("session-header", ("target", "org"), 5, "target.org: 5 is not of type 'string'"),
    ("session-header", ("started_at",), "2026-11-25T14:46:00+01:00",
     "started_at: '2026-11-25T14:46:00+01:00' does not match "
     "'^\\\\d{4}-\\\\d{2}-\\\\d{2}T\\\\d{2}:\\\\d{2}:\\\\d{2}(\\\\.\\\\d{1,6})?Z$'"),
    ("session-header", ("started_at",), "\uff12026-11-25T14:46:00Z",  # a fullwidth digit is not \d
     "started_at: '\uff12026-11-25T14:46:00Z' does not match "
     "'^\\\\d{4}-\\\\d{2}-\\\\d{2}T\\\\d{2}:\\\\d{2}:\\\\d{2}(\\\\.\\\\d{1,6})?Z$'"),
    ("session-header", ("options", "chunk_max_seconds"), 0,
     "options.chunk_max_seconds: 0 is less than or equal to the minimum of 0"),
    ("session-header", ("agent", "pid"), -1, "agent.pid: -1 is less than the minimum of 0"),
    ("chunk-header", ("seq",), -1, "seq: -1 is less than the minimum of 0"),
    ("chunk-header", ("seq",), 100_000_000, "seq: 100000000 is greater than the maximum of 99999999"),
    ("chunk-header", ("seq",), 1.5, "seq: 1.5 is not of type 'integer'"),
    ("chunk-header", ("prev_chunk_sha256",), "A" * 64,
     f"prev_chunk_sha256: {'A' * 64!r} does not match '^[0-9a-f]{{64}}$'"),
    ("chunk-header", ("prev_chunk_sha256",), "a" * 64 + "\n",
     f"prev_chunk_sha256: {'a' * 64 + chr(10)!r} does not match '^[0-9a-f]{{64}}$'"),
    ("close-marker", ("status",), "abandoned", "status: 'abandoned' is not one of ['succeeded', 'failed', 'killed']"),
    ("close-marker", ("chunk_sha256", 1), "b" * 63, f"chunk_sha256[1]: {'b' * 63!r} does not match '^[0-9a-f]{{64}}$'"),
    ("close-marker", ("exit", "signal"), 0, "exit.signal: 0 is less than the minimum of 1"),
    ("close-marker", ("bytes", "o"), -1, "bytes.o: -1 is less than the minimum of 0"),
    ("close-marker", ("bytes", "x"), 1, "bytes.x: Additional properties are not allowed ('x' was unexpected)"),
    ("log-header", ("type",), "trailer", "type: 'header' was expected"),
    ("log-header", ("format",), "oneoff-audit.session", "format: 'oneoff-audit.log' was expected"),
    ("log-trailer", ("status",), "weird",
     "status: 'weird' is not one of ['succeeded', 'failed', 'killed', 'abandoned']"),
    ("log-trailer", ("gaps", "corrupt", 0, "seq"), "1", "gaps.corrupt[0].seq: '1' is not of type 'integer'"),
    ("log-trailer", ("events", "m"), None, "events.m: None is not of type 'integer'"),
    ("log-trailer", ("complete",), "true", "complete: 'true' is not of type 'boolean'"),
    ("index-entry", ("size",), -1, "size: -1 is less than the minimum of 0"),
    ("index-entry", ("sha256",), "a" * 64 + "\n", f"sha256: {'a' * 64 + chr(10)!r} does not match '^[0-9a-f]{{64}}$'"),
    ("index-entry", ("status",), "running",
     "status: 'running' is not one of ['succeeded', 'failed', 'killed', 'abandoned']"),
]


@pytest.mark.parametrize(("name", "path", "value", "message"), SPECIFIC_REJECTIONS)
def test_specific_fields_are_rejected_with_exact_error(name, path, value, message):
    obj = sample(name)
    parent = obj
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    _, where = OBJECT_READERS[name]
    assert rejects(name, obj) == f"{where}: {message}"


def test_field_and_object_are_attributes():
    obj = sample("close-marker")
    obj["bytes"]["o"] = "many"
    with pytest.raises(FormatError) as info:
        read_object("close-marker", obj)
    assert (info.value.obj, info.value.field, info.value.reason) == ("closed.json", "bytes.o",
                                                                    "'many' is not of type 'integer'")


# ---------------------------------------------------------------- raw JSON rejections

def _opened(raw: bytes, max_bytes: int = MAX_OPENED_BYTES):
    with pytest.raises(FormatError) as info:
        read_json_object(raw, "session-header", "opened.json", max_bytes)
    return str(info.value)


def test_invalid_utf8_in_metadata():
    raw = dumps_line(sample("session-header")).replace(b"Ann Auditor", b"Ann \xff\xfeAuditor")
    offset = raw.index(b"\xff")
    assert _opened(raw) == f"opened.json: not valid UTF-8 at byte {offset}"


def test_lone_surrogate_in_metadata():
    # JSON may spell a lone surrogate as an escape; it is not Unicode and could never be written as UTF-8.
    raw = dumps_line(sample("session-header")).replace(b"Ann Auditor", b"Ann \\udc80Auditor")
    assert _opened(raw) == "opened.json: actor.name: string holds a lone surrogate (not valid Unicode)"
    raw = dumps_line(sample("session-header")).replace(b'"org"', b'"\\ud800org"')
    assert _opened(raw) == "opened.json: target.(key): string holds a lone surrogate (not valid Unicode)"
    # A proper pair is fine.
    raw = dumps_line(sample("session-header")).replace(b"Ann Auditor", b"Ann \\ud83d\\ude00")
    assert read_json_object(raw, "session-header", "opened.json", MAX_OPENED_BYTES)["actor"]["name"] == "Ann 😀"


def test_deep_nesting():
    deep = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)
    assert _opened(deep) == f"opened.json: nested deeper than {MAX_JSON_DEPTH} levels"
    assert _opened(b"[" * 200_000) == f"opened.json: nested deeper than {MAX_JSON_DEPTH} levels"
    assert _opened(b'{"a":' * 40 + b"1" + b"}" * 40) == f"opened.json: nested deeper than {MAX_JSON_DEPTH} levels"
    # Exactly the limit parses; brackets inside strings do not count.
    assert parse_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, "x") is not None
    assert parse_json(b'["' + b"[{" * 1000 + b'"]', "x") == ["[{" * 1000]


def test_oversized_document():
    raw = dumps_line(sample("session-header"))
    raw = raw[:-2] + b',"pad":"' + b"x" * MAX_OPENED_BYTES + b'"}'
    assert _opened(raw) == f"opened.json: larger than {MAX_OPENED_BYTES} bytes"


@pytest.mark.parametrize(("raw", "message"), [
    (b"", "invalid JSON: Expecting value: line 1 column 1 (char 0)"),
    (b"{} x", "invalid JSON: Extra data: line 1 column 4 (char 3)"),
    (b"\xef\xbb\xbf{}", "invalid JSON: Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 column 1 (char 0)"),
    (b'{"a":NaN}', "invalid JSON: NaN is not JSON"),
    (b'{"a":-Infinity}', "invalid JSON: -Infinity is not JSON"),
    (b'{"a":1e400}', "invalid JSON: number 1e400 is out of range"),
    (b'{"app":"a","app":"b"}', "invalid JSON: duplicate key 'app'"),
    (b'{"a":' + b"9" * 5000 + b"}", "invalid JSON: Exceeds the limit (4300 digits) for integer string conversion: "
     "value has 5000 digits; use sys.set_int_max_str_digits() to increase the limit"),
])
def test_malformed_json(raw, message):
    assert _opened(raw) == f"opened.json: {message}"


# ---------------------------------------------------------------- events

EVENT_REJECTIONS = [
    ({"t": 0}, "(root): an event is [t, stream, data]"),
    ([0, "o"], "(root): an event is [t, stream, data]"),
    ([0, "o", "x", "y"], "(root): an event is [t, stream, data]"),
    ([-0.5, "o", "x"], "[0]: t must be a number >= 0"),
    ([True, "o", "x"], "[0]: t must be a number >= 0"),
    (["1", "o", "x"], "[0]: t must be a number >= 0"),
    ([None, "o", "x"], "[0]: t must be a number >= 0"),
    ([float("nan"), "o", "x"], "[0]: t must be a number >= 0"),
    ([float("inf"), "o", "x"], "[0]: t must be a number >= 0"),
    ([0, "x", "x"], "[1]: stream must be one of i, o, e, r, m"),
    ([0, "O", "x"], "[1]: stream must be one of i, o, e, r, m"),
    ([0, ["o"], "x"], "[1]: stream must be one of i, o, e, r, m"),
    ([0, "o", 5], '[2]: must be a string or {"b64": "<base64>"}'),
    ([0, "o", None], '[2]: must be a string or {"b64": "<base64>"}'),
    ([0, "i", {"b64": "//4=", "x": 1}], '[2]: must be a string or {"b64": "<base64>"}'),
    ([0, "e", {"b64": "QQ"}], "[2].b64: not valid base64"),
    ([0, "o", "\udc80"], "[2]: string holds a lone surrogate (not valid UTF-8 text)"),
    ([0, "r", "80"], "[2]: resize data must be 'COLSxROWS'"),
    ([0, "r", "80x"], "[2]: resize data must be 'COLSxROWS'"),
    ([0, "r", "80X24"], "[2]: resize data must be 'COLSxROWS'"),
    ([0, "r", "80x24x1"], "[2]: resize data must be 'COLSxROWS'"),
    ([0, "r", "123456x1"], "[2]: resize data must be 'COLSxROWS'"),
    ([0, "r", "\uff18\uff10x24"], "[2]: resize data must be 'COLSxROWS'"),
    ([0, "r", "80x24\n"], "[2]: resize data must be 'COLSxROWS'"),
    ([0, "r", [80, 24]], "[2]: resize data must be 'COLSxROWS'"),
    ([0, "m", {}], "[2]: marker data must be an object with a 'kind' string"),
    ([0, "m", {"kind": ""}], "[2]: marker data must be an object with a 'kind' string"),
    ([0, "m", {"kind": "k" * 65}], "[2]: marker data must be an object with a 'kind' string"),
    ([0, "m", {"kind": 5}], "[2]: marker data must be an object with a 'kind' string"),
    ([0, "m", "gap"], "[2]: marker data must be an object with a 'kind' string"),
]


@pytest.mark.parametrize(("event", "message"), EVENT_REJECTIONS)
def test_event_rejections(event, message):
    with pytest.raises(FormatError) as info:
        check_event(event, "chunk 00000002 line 5")
    assert str(info.value) == f"chunk 00000002 line 5: {message}"


# ---------------------------------------------------------------- chunks

def _chunk_error(raw: bytes, **kwargs) -> str:
    with pytest.raises(FormatError) as info:
        read_chunk(raw, "chunk 00000000", **kwargs)
    return str(info.value)


def _gz(body: bytes) -> bytes:
    return gzip.compress(body, mtime=0)


GOOD_CHUNK = encode_chunk(chunk_header(), events())
HEADER_LINE = dumps_line(chunk_header())


def test_gzip_bomb_is_capped():
    small_bomb = _gz(b"\n" * 4096)
    assert _chunk_error(small_bomb, cap=1024) == "chunk 00000000: decompresses to more than 1024 bytes (gzip bomb?)"
    # The real cap: ~66 KiB of valid gzip that inflates to 65 MiB is refused without inflating it all.
    # Built by repeating one fully flushed deflate segment of 1 MiB of zeros (cheap to make).
    seg_comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    segment = seg_comp.compress(bytes(1 << 20)) + seg_comp.flush(zlib.Z_FULL_FLUSH)
    count = (MAX_CHUNK_DECOMPRESSED >> 20) + 1
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(bytes(1 << 20), crc)
    final = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()
    bomb = b"\x1f\x8b\x08\0\0\0\0\0\x02\xff" + segment * count + final + struct.pack("<II", crc, count << 20)
    assert len(bomb) < 100_000
    assert _chunk_error(bomb) == (
        f"chunk 00000000: decompresses to more than {MAX_CHUNK_DECOMPRESSED} bytes (gzip bomb?)")


@pytest.mark.parametrize("cut", [0, 1, 4, 10, len(GOOD_CHUNK) // 2, len(GOOD_CHUNK) - 8, len(GOOD_CHUNK) - 1])
def test_truncated_gzip(cut):
    # Anywhere: in the gzip header, in the deflate data, in the CRC/size trailer.
    assert _chunk_error(GOOD_CHUNK[:cut]) == "chunk 00000000: truncated gzip stream"


def test_trailing_garbage_and_concatenated_members():
    assert _chunk_error(GOOD_CHUNK + b"x") == "chunk 00000000: trailing data after the gzip stream"
    assert _chunk_error(GOOD_CHUNK + GOOD_CHUNK) == "chunk 00000000: trailing data after the gzip stream"


def test_corrupt_gzip():
    assert _chunk_error(b"not gzip at all") == (
        "chunk 00000000: not valid gzip: Error -3 while decompressing data: incorrect header check")
    crc = bytearray(GOOD_CHUNK)
    crc[-8] ^= 1
    assert _chunk_error(bytes(crc)) == (
        "chunk 00000000: not valid gzip: Error -3 while decompressing data: incorrect data check")
    size = bytearray(GOOD_CHUNK)
    size[-1] ^= 1
    assert _chunk_error(bytes(size)) == (
        "chunk 00000000: not valid gzip: Error -3 while decompressing data: incorrect length check")


def test_chunk_lines():
    assert _chunk_error(_gz(b"")) == "chunk 00000000: empty chunk (no header line)"
    assert _chunk_error(_gz(HEADER_LINE + b'[1,"o","x"]')) == (
        "chunk 00000000: last line is not newline-terminated (truncated?)")
    assert _chunk_error(_gz(HEADER_LINE[:-1])) == "chunk 00000000: last line is not newline-terminated (truncated?)"
    assert _chunk_error(_gz(HEADER_LINE + b"\n")) == (
        "chunk 00000000 line 2: invalid JSON: Expecting value: line 1 column 1 (char 0)")
    assert _chunk_error(_gz(HEADER_LINE + b'[1,"o","\xff"]\n')) == "chunk 00000000 line 2: not valid UTF-8 at byte 8"
    assert _chunk_error(_gz(HEADER_LINE + b'[1,"o","x"]\n[1,"q","x"]\n')) == (
        "chunk 00000000 line 3: [1]: stream must be one of i, o, e, r, m")
    assert _chunk_error(_gz(HEADER_LINE + b"[" * 40 + b"]" * 40 + b"\n")) == (
        f"chunk 00000000 line 2: nested deeper than {MAX_JSON_DEPTH} levels")
    big = b'[1,"o","' + b"a" * MAX_LINE_BYTES + b'"]\n'
    assert _chunk_error(_gz(HEADER_LINE + big)) == f"chunk 00000000 line 2: larger than {MAX_LINE_BYTES} bytes"
    assert _chunk_error(_gz(dumps_line([0, "o", "x"]))) == (
        "chunk 00000000 header: (root): [0, 'o', 'x'] is not of type 'object'")
    assert _chunk_error(_gz(b"{oops\n")) == (
        "chunk 00000000 line 1: invalid JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)")


# ---------------------------------------------------------------- audit log

def _log(*lines: bytes) -> io.BytesIO:
    return io.BytesIO(b"".join(lines))


HEADER = dumps_line(sample("log-header"))
TRAILER = dumps_line(log_trailer())
EVENT_LINES = [dumps_line(e) for e in events()]


def _log_error(stream: io.BytesIO) -> str:
    with pytest.raises(FormatError) as info:
        list(iter_log_lines(stream))
    return str(info.value)


def test_log_reads_header_events_trailer_in_order():
    items = list(iter_log_lines(_log(HEADER, *EVENT_LINES, TRAILER)))
    assert items == [("header", sample("log-header")), *[("event", e) for e in events()], ("trailer", log_trailer())]
    assert list(iter_log_lines(_log(HEADER, TRAILER))) == [("header", sample("log-header")),
                                                          ("trailer", log_trailer())]


def test_log_is_streamed():
    # Lines are yielded as they are read: the header comes out before a bad line further down.
    reader = iter_log_lines(_log(HEADER, EVENT_LINES[0], b"garbage\n", TRAILER))
    assert next(reader) == ("header", sample("log-header"))
    assert next(reader) == ("event", events()[0])
    with pytest.raises(FormatError):
        next(reader)


def test_log_rejections():
    assert _log_error(_log()) == "log: empty log"
    assert _log_error(_log(HEADER)) == "log: no trailer (truncated log?)"
    assert _log_error(_log(HEADER, *EVENT_LINES)) == "log: no trailer (truncated log?)"
    assert _log_error(_log(HEADER, EVENT_LINES[0][:-1])) == "log line 2: not newline-terminated (truncated log?)"
    assert _log_error(_log(HEADER, TRAILER[:-1])) == "log line 2: not newline-terminated (truncated log?)"
    assert _log_error(_log(HEADER, TRAILER, EVENT_LINES[0])) == "log line 3: data after the trailer"
    assert _log_error(_log(HEADER, TRAILER, TRAILER)) == "log line 3: data after the trailer"
    assert _log_error(_log(HEADER, TRAILER, b"\n")) == "log line 3: data after the trailer"
    assert _log_error(_log(EVENT_LINES[0], TRAILER)) == (
        f"log header: (root): {events()[0]!r} is not of type 'object'")
    assert _log_error(_log(TRAILER, TRAILER)) == (
        "log header: bytes: Additional properties are not allowed ('bytes', 'chain_sha256', 'chunk_count', "
        "'complete', 'duration', 'ended_at', 'event_count', 'events', 'exit', 'expected_chunk_count', 'filed_at', "
        "'gaps', 'lost_bytes', 'reason', 'status', 'withheld_input_bytes' were unexpected)")
    assert _log_error(_log(HEADER, HEADER)) == (
        "log trailer: actor: Additional properties are not allowed ('actor', 'agent', 'command', 'format', "
        "'options', 'started_at', 'target', 'version' were unexpected)")
    assert _log_error(_log(HEADER, dumps_line({**log_trailer(), "type": "header"}))) == (
        "log trailer: type: 'trailer' was expected")
    assert _log_error(_log(HEADER, b'[1,"x","y"]\n', TRAILER)) == "log line 2: [1]: stream must be one of i, o, e, r, m"
    assert _log_error(_log(HEADER, b"\xff\n", TRAILER)) == "log line 2: not valid UTF-8 at byte 0"


def test_log_line_size_is_bounded_before_reading_it_all():
    huge = b"x" * (4 * MAX_LINE_BYTES)  # no newline: must be refused after MAX_LINE_BYTES + 1 bytes
    stream = _log(HEADER, huge)
    assert _log_error(stream) == f"log line 2: larger than {MAX_LINE_BYTES} bytes"
    assert stream.tell() == len(HEADER) + MAX_LINE_BYTES + 1
    exact = b'[1,"o","' + b"a" * (MAX_LINE_BYTES - 11) + b'"]\n'
    assert len(exact) == MAX_LINE_BYTES
    assert len(list(iter_log_lines(_log(HEADER, exact, TRAILER)))) == 3


# ---------------------------------------------------------------- times

def test_format_and_parse_time():
    when = datetime(2026, 11, 25, 14, 46, 0, 123456, tzinfo=UTC)
    assert format_time(when) == "2026-11-25T14:46:00.123456Z"
    assert format_time(datetime(2026, 11, 25, 15, 46, tzinfo=timezone(timedelta(hours=1)))) == (
        "2026-11-25T14:46:00.000000Z")
    assert parse_time("2026-11-25T14:46:00.123456Z") == when
    assert parse_time("2026-11-25T14:46:00Z") == when.replace(microsecond=0)
    assert parse_time("2026-11-25T14:46:00.5Z") == when.replace(microsecond=500000)


@settings(max_examples=50, deadline=None)
@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)))
def test_time_round_trip(when):
    text = format_time(when)
    assert parse_time(text) == when
    assert validate({**index_entry(), "started_at": text}, "index-entry", "index entry")


@pytest.mark.parametrize("bad", [
    "2026-11-25T14:46:00+05:00Z",  # an offset that would be silently dropped
    "2026-11-25T14:46:00+05:00", "2026-11-25T14:46:00", "2026-11-25Z", "2026-11-25 14:46:00Z",
    "20261125T144600Z", "2026-11-25T14:46:00.1234567Z", "2026-13-25T14:46:00Z", "2026-11-25T24:00:00Z",
    "\uff12\uff10\uff12\uff16-11-25T14:46:00Z", "2026-11-25T14:46:00Z\n", "", None, 1_795_618_760,
])
def test_parse_time_rejects(bad):
    with pytest.raises(FormatError) as info:
        parse_time(bad, "closed.json", "ended_at")
    assert str(info.value) == f"closed.json: ended_at: not an RFC 3339 UTC time: {bad!r}"


def test_sample_ids():
    # The samples use the ids the key tests use, so the docs' examples agree with both.
    assert (chunk_header()["app"], close_marker()["session_id"]) == (APP, SID)


# ---------------------------------------------------------------- the examples in docs/FORMAT.md

def _doc_blocks() -> list[tuple[str, bytes]]:
    text = (Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md").read_text("utf-8")
    return [(m.group(1), m.group(2).encode()) for m in re.finditer(r"```jsonl? ([a-z-]+)\n(.*?)```", text, re.DOTALL)]


def test_format_md_examples_are_valid():
    blocks = dict(_doc_blocks())
    assert set(blocks) == {"session-header", "chunk", "close-marker", "log", "index-entry"}
    for name in ("session-header", "close-marker", "index-entry"):
        assert read_json_object(blocks[name], name, f"FORMAT.md {name}", MAX_CLOSED_BYTES)
        assert dumps_line(json.loads(blocks[name])) == blocks[name]  # written exactly as writers write
    header, evs = read_chunk(gzip.compress(blocks["chunk"], mtime=0), "FORMAT.md chunk")
    assert b"".join(dumps_line(x) for x in [header, *evs]) == blocks["chunk"]
    log = list(iter_log_lines(io.BytesIO(blocks["log"])))
    assert [kind for kind, _ in log] == ["header", *["event"] * len(evs), "trailer"]
    assert [value for kind, value in log if kind == "event"] == evs
    assert log[0][1] == log_header_from_session(json.loads(blocks["session-header"]))
    trailer = log[-1][1]
    assert trailer["event_count"] == len(evs)
    assert trailer["bytes"] == {s: sum(len(formats.event_bytes(e)) for e in evs if e[1] == s) for s in "ioe"}
    index = json.loads(blocks["index-entry"])
    assert (index["size"], index["sha256"]) == (len(blocks["log"]), hashlib.sha256(blocks["log"]).hexdigest())
