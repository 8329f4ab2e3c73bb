"""Exact bytes in JSON: text stays text, only invalid runs become base64, split characters stay whole."""

from __future__ import annotations

import base64
import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oneoff_audit.codec import Utf8Splitter, decode_data, encode_bytes, iter_encoded, join_data
from oneoff_audit.errors import FormatError
from oneoff_audit.formats import check_event, dumps_line, encode_chunk, parse_json, read_chunk

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- an independent model of UTF-8

def _well_formed_length(data: bytes, i: int) -> int:
    """Length of the well-formed UTF-8 sequence at ``i`` (Unicode Table 3-7), 0 if none."""
    ranges = [  # lead range, then the allowed range of each following byte
        ((0x00, 0x7F), []),
        ((0xC2, 0xDF), [(0x80, 0xBF)]),
        ((0xE0, 0xE0), [(0xA0, 0xBF), (0x80, 0xBF)]),
        ((0xE1, 0xEC), [(0x80, 0xBF), (0x80, 0xBF)]),
        ((0xED, 0xED), [(0x80, 0x9F), (0x80, 0xBF)]),
        ((0xEE, 0xEF), [(0x80, 0xBF), (0x80, 0xBF)]),
        ((0xF0, 0xF0), [(0x90, 0xBF), (0x80, 0xBF), (0x80, 0xBF)]),
        ((0xF1, 0xF3), [(0x80, 0xBF), (0x80, 0xBF), (0x80, 0xBF)]),
        ((0xF4, 0xF4), [(0x80, 0x8F), (0x80, 0xBF), (0x80, 0xBF)]),
    ]
    for (lo, hi), rest in ranges:
        if lo <= data[i] <= hi:
            if i + len(rest) >= len(data) + (0 if rest else 1):
                return 0
            for k, (clo, chi) in enumerate(rest, start=1):
                if not clo <= data[i + k] <= chi:
                    return 0
            return 1 + len(rest)
    return 0


def model(data: bytes) -> list:
    """The expected data values: maximal runs of well-formed characters as str, the rest as base64."""
    runs: list[tuple[bool, bytearray]] = []
    i = 0
    while i < len(data):
        n = _well_formed_length(data, i)
        valid, piece = (True, data[i:i + n]) if n else (False, data[i:i + 1])
        if runs and runs[-1][0] == valid:
            runs[-1][1].extend(piece)
        else:
            runs.append((valid, bytearray(piece)))
        i += len(piece)
    return [bytes(b).decode("utf-8") if ok else {"b64": base64.b64encode(bytes(b)).decode()} for ok, b in runs]


def merge(values: list) -> list:
    """Merge adjacent values of the same kind (reads split runs; the bytes are what matters)."""
    out: list = []
    for value in values:
        if out and isinstance(value, str) and isinstance(out[-1], str):
            out[-1] += value
        elif out and isinstance(value, dict) and isinstance(out[-1], dict):
            joined = decode_data(out[-1]) + decode_data(value)
            out[-1] = {"b64": base64.b64encode(joined).decode()}
        else:
            out.append(value)
    return out


TRICKY = [
    b"\xe2\x82", b"\xac", b"\xf0\x9f\x98", b"\x80", b"\xff", b"\xfe", b"\xc0\x80", b"\xc1\xbf",
    b"\xed\xa0\x80",  # an encoded surrogate: invalid
    b"\xe0\x80\x80", b"\xf0\x80\x80\x80",  # overlong
    b"\xf4\x90\x80\x80", b"\xf5\x80", b"\xe0", b"\xf0", b"\xed", b"\xf4", b"\xc2",
    "€".encode(), "😀".encode(), "ࠀ".encode(), "\U00010000".encode(), "\U0010ffff".encode(), b"\x00", b"\x1b[0m",
]
BYTES = st.lists(
    st.one_of(st.binary(max_size=6), st.text(max_size=6).map(str.encode), st.sampled_from(TRICKY)), max_size=12,
).map(b"".join)
TEXT_BYTES = st.text(max_size=40).map(str.encode)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


def run_splitter(reads: list[bytes]) -> list:
    splitter = Utf8Splitter()
    out = []
    for read in reads:
        out.extend(splitter.feed(read))
        assert 0 <= splitter.held <= 3
    out.extend(splitter.flush())
    assert splitter.held == 0
    return out


# ---------------------------------------------------------------- encode_bytes

def test_examples():
    assert encode_bytes(b"") == []
    assert encode_bytes(b"ls -la\r\n") == ["ls -la\r\n"]
    assert encode_bytes("€ 😀".encode()) == ["€ 😀"]
    assert encode_bytes(b"ok\xff\xfeok") == ["ok", {"b64": "//4="}, "ok"]
    assert encode_bytes(b"\xe2\x82") == [{"b64": "4oI="}]  # a character cut at the end of the data
    assert encode_bytes(b"\xed\xa0\x80") == [{"b64": "7aCA"}]  # an encoded surrogate is not UTF-8
    assert encode_bytes(b"\xc0\xaf") == [{"b64": "wK8="}]  # overlong '/'


@settings(max_examples=200, deadline=None)
@given(BYTES)
def test_encode_bytes_is_exact_and_matches_the_model(data):
    values = encode_bytes(data)
    assert join_data(values) == data
    assert values == model(data)  # valid runs as str, invalid runs (and only those) as base64
    assert all(v for v in values)
    assert all(isinstance(a, str) != isinstance(b, str) for a, b in itertools.pairwise(values))


@settings(max_examples=100, deadline=None)
@given(TEXT_BYTES)
def test_valid_utf8_is_one_string(data):
    assert encode_bytes(data) == ([data.decode()] if data else [])


# ---------------------------------------------------------------- Utf8Splitter

def test_euro_split_across_two_reads_is_one_string():
    splitter = Utf8Splitter()
    assert splitter.feed(b"price: \xe2\x82") == ["price: "]
    assert splitter.held == 2
    assert splitter.feed(b"\xac!") == ["€!"]
    assert splitter.flush() == []


@pytest.mark.parametrize("char", ["é", "€", "ࠀ", "😀", "\U00010000", "\U0010ffff", "\ud7ff", "\ue000"])
def test_every_split_of_a_character_is_held_back(char):
    encoded = char.encode()
    for cut in range(1, len(encoded)):
        splitter = Utf8Splitter()
        assert splitter.feed(encoded[:cut]) == []
        assert splitter.held == cut
        assert splitter.feed(encoded[cut:]) == [char]
    # Byte by byte, too.
    splitter = Utf8Splitter()
    assert [v for b in encoded for v in splitter.feed(bytes([b]))] == [char]


@pytest.mark.parametrize(("first", "second", "expected"), [
    (b"\xe2\x82", b"A", [{"b64": "4oI="}, "A"]),  # the character never completed
    (b"\xe0", b"\x80", [{"b64": "4IA="}]),  # E0 80 is overlong: E0 is held, then both are invalid
    (b"\xed", b"\xa0\x80", [{"b64": "7aCA"}]),  # surrogate
    (b"\xf4", b"\x90\x80\x80", [{"b64": "9JCAgA=="}]),  # above U+10FFFF
])
def test_held_bytes_that_never_complete_come_out_as_base64(first, second, expected):
    splitter = Utf8Splitter()
    assert splitter.feed(first) == []
    assert splitter.feed(second) + splitter.flush() == expected


@pytest.mark.parametrize("tail", [b"\xc0", b"\xc1", b"\xf5", b"\xff", b"\x80", b"\xe0\x80", b"\xf0\x80", b"\xed\xa0",
                                  b"\xf4\x90"])
def test_bytes_that_cannot_start_a_character_are_not_held(tail):
    splitter = Utf8Splitter()
    assert splitter.feed(b"a" + tail) == ["a", {"b64": base64.b64encode(tail).decode()}]
    assert splitter.held == 0


def test_flush_releases_an_incomplete_character_as_base64():
    splitter = Utf8Splitter()
    assert splitter.feed(b"ab\xf0\x9f\x98") == ["ab"]
    assert splitter.flush() == [{"b64": "8J+Y"}]
    assert splitter.flush() == []


@settings(max_examples=250, deadline=None)
@given(BYTES, st.lists(st.integers(min_value=0), max_size=8))
def test_any_stream_split_anywhere_round_trips_exactly(data, cuts):
    values = run_splitter(split_at(data, cuts))
    assert join_data(values) == data
    # Wherever the reads were cut, the text is text and the base64 holds exactly the invalid bytes.
    assert merge(values) == model(data)


@settings(max_examples=150, deadline=None)
@given(TEXT_BYTES, st.lists(st.integers(min_value=0), max_size=8))
def test_valid_text_split_inside_characters_never_becomes_base64(data, cuts):
    values = run_splitter(split_at(data, cuts))
    assert all(isinstance(v, str) for v in values)
    assert "".join(values) == data.decode()


@settings(max_examples=60, deadline=None)
@given(BYTES, st.lists(st.integers(min_value=0), max_size=6), st.lists(st.integers(min_value=0), max_size=3))
def test_stream_split_across_chunks_round_trips_through_gzip(data, read_cuts, chunk_cuts):
    # As the agent does: one splitter per stream, each value an event, events cut into chunks.
    splitter = Utf8Splitter()
    events = []
    for n, read in enumerate(split_at(data, read_cuts)):
        events += [[round(n * 0.1, 6), "o", v] for v in splitter.feed(read)]
    events += [[9.0, "o", v] for v in splitter.flush()]
    got = []
    for seq, group in enumerate(split_at_list(events, chunk_cuts)):
        header = {"format": "oneoff-audit.chunk", "version": 1, "session_id": "S1", "app": "app", "seq": seq,
                  "first_event_index": 0, "prev_chunk_sha256": None}
        _, back = read_chunk(encode_chunk(header, group), f"chunk {seq}")
        assert back == group
        got += back
    assert join_data(e[2] for e in got) == data


def split_at_list(items: list, cuts: list[int]) -> list[list]:
    points = sorted({c % (len(items) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(items)]:
        out.append(items[last:p])
        last = p
    return out


def test_iter_encoded_is_a_splitter_over_reads():
    reads = [b"a\xe2", b"\x82", b"\xacb\xff", b"\xf0\x9f"]
    assert list(iter_encoded(reads)) == ["a", "€b", {"b64": "/w=="}, {"b64": "8J8="}]


# ---------------------------------------------------------------- decode_data

@settings(max_examples=100, deadline=None)
@given(BYTES)
def test_values_survive_json(data):
    values = encode_bytes(data)
    line = dumps_line(values)
    assert json.loads(line) == values
    assert join_data(parse_json(line[:-1], "line")) == data


def test_decode_data_accepts_both_forms():
    assert decode_data("é") == b"\xc3\xa9"
    assert decode_data({"b64": "//4="}) == b"\xff\xfe"
    assert decode_data({"b64": ""}) == b""
    assert decode_data({"b64": "aGk="}) == b"hi"  # valid UTF-8 in base64 is unusual but still exact


@pytest.mark.parametrize(("value", "message"), [
    (5, 'event: data: must be a string or {"b64": "<base64>"}'),
    (None, 'event: data: must be a string or {"b64": "<base64>"}'),
    (["a"], 'event: data: must be a string or {"b64": "<base64>"}'),
    ({"b64": 5}, 'event: data: must be a string or {"b64": "<base64>"}'),
    ({"b64": "//4=", "x": 1}, 'event: data: must be a string or {"b64": "<base64>"}'),
    ({"B64": "//4="}, 'event: data: must be a string or {"b64": "<base64>"}'),
    ({"b64": "QQ"}, "event: data.b64: not valid base64"),
    ({"b64": "Q"}, "event: data.b64: not valid base64"),
    ({"b64": "QQ==\n"}, "event: data.b64: not valid base64"),
    ({"b64": "QQ=="[:3] + "*"}, "event: data.b64: not valid base64"),
    ({"b64": "QQ==QQ=="}, "event: data.b64: not valid base64"),
    ({"b64": "AAAA="}, "event: data.b64: not valid base64"),  # excess padding: b64decode alone accepts it
    ({"b64": "AAAA=="}, "event: data.b64: not valid base64"),
    ({"b64": "=="}, "event: data.b64: not valid base64"),
    ("\udc80", "event: data: string holds a lone surrogate (not valid UTF-8 text)"),
])
def test_decode_data_rejects_with_exact_error(value, message):
    with pytest.raises(FormatError) as info:
        decode_data(value)
    assert str(info.value) == message


def test_decode_data_names_the_caller_object_and_field():
    with pytest.raises(FormatError) as info:
        check_event([0.5, "o", {"b64": "!"}], "chunk 3 line 7")
    assert str(info.value) == "chunk 3 line 7: [2].b64: not valid base64"
    assert (info.value.obj, info.value.field) == ("chunk 3 line 7", "[2].b64")
