"""Recorder and chunk writer: exact bytes, whole characters across reads and chunks, gaps, chain."""

from __future__ import annotations

import base64
import gzip
import hashlib
import itertools
import os
import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oneoff_audit import formats
from oneoff_audit.capture.recorder import (
    ChunkWriter,
    RawSplitter,
    Recorder,
    SealedChunk,
    encode_chunk_lines,
    event_line,
    serialize_lines,
)
from oneoff_audit.capture.relay import SignalWaker
from oneoff_audit.codec import Utf8Splitter, decode_data

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class MemoryStore:
    """Keeps what the writer submits; refuses (as if S3 were down and the spool full) chunks holding ``refuse``."""

    def __init__(self, refuse: bytes | None = None) -> None:
        self.objects: dict[str, bytes] = {}
        self.refuse = refuse
        self.forced: list[str] = []

    def submit(self, name: str, key: str, data: bytes, *, force_memory: bool = False,
               sha256: bytes | None = None) -> bool:
        assert sha256 == hashlib.sha256(data).digest()
        if self.refuse is not None and self.refuse in gzip.decompress(data) and not force_memory:
            return False
        if force_memory:
            self.forced.append(name)
        self.objects[key] = data
        return True

    def chunks(self) -> list[tuple[dict, list, bytes]]:
        out = []
        for key in sorted(self.objects):
            header, events = formats.read_chunk(self.objects[key], key)
            out.append((header, events, self.objects[key]))
        return out


def run_writer(feed, *, chunk_bytes: int = 1 << 20, chunk_seconds: float = 5.0, store: MemoryStore | None = None):
    store = store or MemoryStore()
    writer = ChunkWriter("app1", "S1", "staging/", store)
    writer.start()
    clock = Clock()
    recorder = Recorder(writer.put, chunk_bytes=chunk_bytes, chunk_seconds=chunk_seconds, t0=clock.now, clock=clock)
    feed(recorder, clock, store)
    recorder.finish()
    totals = writer.close()
    return store, totals, recorder


def check_chain(chunks, totals) -> None:
    prev, index = None, 0
    for seq, (header, events, raw) in enumerate(chunks):
        assert header == {"format": "oneoff-audit.chunk", "version": 1, "session_id": "S1", "app": "app1",
                          "seq": seq, "first_event_index": index, "prev_chunk_sha256": prev}
        prev = formats.sha256_hex(raw)
        index += len(events)
    assert totals.chunk_sha256 == [formats.sha256_hex(raw) for _h, _e, raw in chunks]
    assert totals.event_count == index


def stream_bytes(chunks, stream: str) -> bytes:
    return b"".join(decode_data(e[2]) for _h, events, _r in chunks for e in events if e[1] == stream)


text_no_surrogates = st.text(alphabet=st.characters(blacklist_categories=("Cs",)))


@given(t=st.floats(min_value=0, max_value=1e7, allow_nan=False).map(lambda x: round(x, 6)),
       stream=st.sampled_from("ioe"),
       value=st.one_of(text_no_surrogates, st.binary().map(lambda b: {"b64": base64.b64encode(b).decode()})))
def test_event_line_is_byte_identical_to_dumps_line(t, stream, value):
    assert event_line(t, stream, value) == formats.dumps_line([t, stream, value])


# Every byte json escapes (C0 controls, quote, backslash), DEL, and 2-, 3- and 4-byte characters.
special_text = st.text(alphabet=st.sampled_from(
    [chr(c) for c in range(0x20)] + list('"\\\x7fa \u00e9\u2028\u20ac\U0001f600')))


@given(t=st.floats(min_value=0, max_value=1e7, allow_nan=False).map(lambda x: round(x, 6)),
       stream=st.sampled_from("ioe"), text=st.one_of(special_text, text_no_surrogates))
def test_event_line_of_utf8_bytes_is_byte_identical_to_dumps_line_of_the_text(t, stream, text):
    assert event_line(t, stream, text.encode()) == formats.dumps_line([t, stream, text])


@given(texts=st.lists(st.one_of(special_text, text_no_surrogates), max_size=6))
def test_serialize_lines_escapes_each_event_with_the_chunks_escapes(texts):
    # The escapes are found once on the whole chunk; an event without some of them is unchanged by them.
    events = [(0.25 * n, "o", text.encode()) for n, text in enumerate(texts)]
    assert serialize_lines([b"[0.0,\"r\",\"80x24\"]\n", *events]) == [
        b"[0.0,\"r\",\"80x24\"]\n", *(formats.dumps_line([0.25 * n, "o", text]) for n, text in enumerate(texts))]


@given(data=st.one_of(st.binary(max_size=60), special_text.map(str.encode)), cuts=st.lists(st.integers(0, 60)))
def test_raw_splitter_gives_the_codec_splitters_data_values(data, cuts):
    codec, raw = Utf8Splitter(), RawSplitter()
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for start, end in itertools.pairwise(bounds):
        expected, got = codec.feed(data[start:end]), raw.feed(data[start:end])
        assert [event_line(1.0, "o", v) for v in got] == [event_line(1.0, "o", v) for v in expected]
        assert raw.held == codec.held
    assert raw.flush() == codec.flush()


def test_encode_chunk_lines_has_the_layout_of_encode_chunk():
    header = {"format": "oneoff-audit.chunk", "version": 1, "session_id": "S1", "app": "a", "seq": 3,
              "first_event_index": 7, "prev_chunk_sha256": "0" * 64}
    events = [[0.5, "o", "h\u00e9llo\n"], [0.6, "e", {"b64": "/w=="}], [0.7, "r", "80x24"],
              [0.8, "m", {"kind": "input-withheld", "bytes": 3}]]
    lines = [formats.dumps_line(e) for e in events]
    assert encode_chunk_lines(header, lines, level=6) == formats.encode_chunk(header, events)
    assert gzip.decompress(encode_chunk_lines(header, lines)) == gzip.decompress(formats.encode_chunk(header, events))
    assert formats.read_chunk(encode_chunk_lines(header, lines), "chunk") == (header, events)


reads = st.lists(st.tuples(st.sampled_from("ioe"), st.binary(min_size=1, max_size=40),
                           st.booleans()), max_size=60)


@settings(max_examples=150, deadline=None)
@given(reads=reads, chunk_bytes=st.integers(1, 64))
def test_every_byte_of_every_stream_comes_back_in_order(reads, chunk_bytes):
    def feed(recorder, clock, _store):
        for stream, data, tick in reads:
            recorder.record(stream, data)
            clock.now += 0.01
            if tick:
                recorder.seal()

    store, totals, _recorder = run_writer(feed, chunk_bytes=chunk_bytes)
    chunks = store.chunks()
    check_chain(chunks, totals)
    for stream in "ioe":
        expected = b"".join(d for s, d, _t in reads if s == stream)
        assert stream_bytes(chunks, stream) == expected
        assert totals.data_bytes[stream] == len(expected)
    times = [e[0] for _h, events, _r in chunks for e in events]
    assert times == sorted(times)


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=200),
       cuts=st.lists(st.integers(0, 800), max_size=30), chunk_bytes=st.integers(1, 50))
def test_valid_utf8_cut_anywhere_stays_text_and_characters_stay_whole(text, cuts, chunk_bytes):
    raw = text.encode()
    points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})

    def feed(recorder, clock, _store):
        for start, end in itertools.pairwise(points):
            recorder.record("o", raw[start:end])
            clock.now += 1
            recorder.seal()  # a chunk boundary after every read

    store, totals, _recorder = run_writer(feed, chunk_bytes=chunk_bytes)
    chunks = store.chunks()
    check_chain(chunks, totals)
    values = [e[2] for _h, events, _r in chunks for e in events]
    assert all(isinstance(v, str) for v in values)  # never base64: no character was split
    assert "".join(values) == text


def test_character_split_by_the_size_limit_moves_whole_to_the_next_chunk():
    def feed(recorder, clock, _store):
        recorder.record("o", b"abcd\xe2\x82")  # 4 bytes reach the limit; the euro sign's start is held
        recorder.record("o", b"\xac!")

    store, totals, _recorder = run_writer(feed, chunk_bytes=4)
    chunks = store.chunks()
    assert [[e[2] for e in events] for _h, events, _r in chunks] == [["abcd"], ["\u20ac!"]]
    assert totals.data_bytes["o"] == 8


def test_chunks_close_by_age_of_their_first_event():
    def feed(recorder, clock, _store):
        recorder.record("o", b"a")
        clock.now += 4.9
        recorder.tick()
        recorder.record("o", b"b")
        assert recorder.deadline() == pytest.approx(105.0)
        clock.now += 0.1
        recorder.tick()  # 5 s after "a": sealed
        assert recorder.deadline() is None
        recorder.resize(100, 40)

    store, _totals, _recorder = run_writer(feed)
    assert [[e for e in events] for _h, events, _r in store.chunks()] == [
        [[0.0, "o", "a"], [4.9, "o", "b"]], [[5.0, "r", "100x40"]]]


def test_withheld_input_is_counted_in_one_marker_per_hidden_run():
    def feed(recorder, clock, _store):
        recorder.record("o", b"Password: ")
        clock.now += 1
        recorder.withheld(3)
        clock.now += 1
        recorder.withheld(4)
        clock.now += 1
        recorder.record("o", b"\n")
        recorder.withheld(2)
        recorder.seal()
        recorder.withheld(1)

    store, _totals, recorder = run_writer(feed)
    events = [e for _h, evs, _r in store.chunks() for e in evs]
    assert events == [[0.0, "o", "Password: "], [1.0, "m", {"kind": "input-withheld", "bytes": 7}],
                      [3.0, "o", "\n"], [3.0, "m", {"kind": "input-withheld", "bytes": 2}],
                      [3.0, "m", {"kind": "input-withheld", "bytes": 1}]]
    assert recorder.withheld_bytes == 10


def test_lost_chunks_leave_an_exact_gap_marker_and_no_hole_in_the_chain():
    def feed(recorder, clock, store):
        recorder.record("o", b"kept-1")
        recorder.seal()
        clock.now += 1
        recorder.record("o", b"lost-o")
        recorder.record("e", b"lost-e!")
        recorder.seal()
        clock.now += 1
        recorder.record("i", b"lost-i")
        recorder.seal()
        clock.now += 1
        recorder.record("o", b"kept-2")

    store, totals, _recorder = run_writer(feed, store=MemoryStore(refuse=b"lost"))
    chunks = store.chunks()
    check_chain(chunks, totals)
    assert len(chunks) == 2
    gap = chunks[1][1][0]
    assert gap == [1.0, "m", {"kind": "capture-gap", "bytes": 19, "streams": {"i": 6, "o": 6, "e": 7},
                              "events": 3, "reason": "S3 unavailable and the spool full or not writable"}]
    assert chunks[1][1][1] == [3.0, "o", "kept-2"]
    assert totals.lost_bytes == 19 and totals.lost_chunks == 2 and totals.lost_events == 3
    assert totals.data_bytes == {"i": 0, "o": 12, "e": 0}


def test_bytes_lost_at_the_very_end_are_still_marked():
    def feed(recorder, clock, store):
        recorder.record("o", b"kept")
        recorder.seal()
        recorder.record("o", b"lost")
        recorder.seal()

    store, totals, _recorder = run_writer(feed, store=MemoryStore(refuse=b"lost"))
    chunks = store.chunks()
    check_chain(chunks, totals)
    assert [e[2]["kind"] for e in chunks[-1][1]] == ["capture-gap"]
    assert chunks[-1][1][0][2]["bytes"] == 4 and totals.lost_bytes == 4
    assert store.forced == ["chunks/00000001.gz"]


def test_final_chunk_is_kept_even_when_memory_is_full():
    def feed(recorder, clock, store):
        recorder.record("o", b"last words")

    store, totals, _recorder = run_writer(feed, store=MemoryStore(refuse=b"last"))
    assert stream_bytes(store.chunks(), "o") == b"last words" and totals.lost_bytes == 0


def test_chunk_object_is_gzip_of_json_lines():
    store, _totals, _recorder = run_writer(lambda r, c, s: r.record("o", b"x\xffy"))
    (raw,) = store.objects.values()
    lines = gzip.decompress(raw).split(b"\n")
    assert lines[1] == b'[0.0,"o","x"]' and lines[2] == b'[0.0,"o",{"b64":"/w=="}]' and lines[3] == b'[0.0,"o","y"]'


def test_a_kept_marker_survives_when_memory_and_spool_are_full():
    def feed(recorder, clock, store):
        recorder.record("o", b"lost output ")
        recorder.marker({"kind": "session-terminated", "reason": "recording failed"}, keep=True)
        recorder.record("o", b"lost again")
        recorder.seal()

    store, totals, _recorder = run_writer(feed, store=MemoryStore(refuse=b"lost"))
    events = [e for _h, evs, _r in store.chunks() for e in evs]
    assert [e[1:] for e in events] == [["o", "lost output "], ["m", {"kind": "session-terminated",
                                                                      "reason": "recording failed"}],
                                       ["m", events[2][2]]]
    assert events[2][2]["kind"] == "capture-gap" and events[2][2]["bytes"] == 10 == totals.lost_bytes


def _raising_writer(store: MemoryStore, *, lost_raises: bool = False, stored_raises: bool = False) -> ChunkWriter:
    def boom(*_args) -> None:
        raise OSError(9, "Bad file descriptor")  # what waking a closed relay used to raise

    return ChunkWriter("app1", "S1", "staging/", store, on_lost=boom if lost_raises else None,
                       on_stored=boom if stored_raises else None)


def test_a_failing_on_lost_callback_does_not_count_the_lost_chunk_twice():
    """A chunk lost while the failure callback raised was once counted twice (a second, too large gap)."""
    store = MemoryStore(refuse=b"lost")
    writer = _raising_writer(store, lost_raises=True)
    writer.start()
    writer.put(SealedChunk([(0.5, "o", b"lost-o")], {"i": 0, "o": 6, "e": 0}, 0.5))
    writer.put(SealedChunk([(1.0, "o", b"kept")], {"i": 0, "o": 4, "e": 0}, 1.0, keep=True))
    totals = writer.close()
    chunks = store.chunks()
    check_chain(chunks, totals)
    assert [events for _h, events, _raw in chunks] == [[
        [0.5, "m", {"kind": "capture-gap", "bytes": 6, "streams": {"i": 0, "o": 6, "e": 0}, "events": 1,
                    "reason": "S3 unavailable and the spool full or not writable"}],
        [1.0, "o", "kept"]]]
    assert (totals.lost_bytes, totals.lost_chunks, totals.lost_events) == (6, 1, 1)
    assert isinstance(writer.error, OSError)  # still reported


def test_a_failing_on_stored_callback_does_not_turn_a_stored_chunk_into_a_lost_one():
    store = MemoryStore(refuse=b"lost")
    writer = _raising_writer(store, stored_raises=True)
    writer.start()
    writer.put(SealedChunk([(0.5, "o", b"lost-o")], {"i": 0, "o": 6, "e": 0}, 0.5))
    writer.put(SealedChunk([(1.0, "o", b"kept-1")], {"i": 0, "o": 6, "e": 0}, 1.0))  # stored: on_stored raises
    writer.put(SealedChunk([(2.0, "o", b"kept-2")], {"i": 0, "o": 6, "e": 0}, 2.0, keep=True))
    totals = writer.close()
    chunks = store.chunks()
    check_chain(chunks, totals)
    assert [e for _h, events, _raw in chunks for e in events if e[1] == "m"] == [
        [0.5, "m", {"kind": "capture-gap", "bytes": 6, "streams": {"i": 0, "o": 6, "e": 0}, "events": 1,
                    "reason": "S3 unavailable and the spool full or not writable"}]]
    assert stream_bytes(chunks, "o") == b"kept-1kept-2"
    assert (totals.lost_bytes, totals.lost_chunks) == (6, 1)
    assert totals.data_bytes == {"i": 0, "o": 12, "e": 0}


def test_waking_a_closed_relay_is_a_no_op_and_never_writes_to_a_reused_fd():
    waker = SignalWaker([signal.SIGUSR2])
    waker.close()
    r, w = os.pipe()  # may reuse the waker's fd numbers
    try:
        waker.wake()  # raised OSError(EBADF) before, or wrote into whatever reused the fd
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 1)
    finally:
        os.close(r)
        os.close(w)
