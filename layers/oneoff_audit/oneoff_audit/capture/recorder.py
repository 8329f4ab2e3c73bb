"""From reads to chunks: events with time offsets, sealed by size or age, encoded in hash-chained order.

:class:`Recorder` lives on the relay thread. Each read of a stream goes through that stream's
:class:`~oneoff_audit.codec.Utf8Splitter` (a multi-byte character cut by a read, or by a chunk
boundary, is written once and whole) and becomes ``[t, stream, data]`` events, serialized at once
as JSON lines (:func:`~oneoff_audit.formats.dumps_line`). A chunk is sealed when it holds
``chunk_bytes`` of data or its first event is ``chunk_seconds`` old, and goes to the
:class:`ChunkWriter`.

:class:`ChunkWriter` is a background thread: it numbers the sealed chunks, writes each header
(``first_event_index``, ``prev_chunk_sha256`` of the previous chunk object) and gzips header and
lines exactly as :func:`~oneoff_audit.formats.encode_chunk` does (same bytes; compression releases
the GIL, so the relay keeps running), then hands the object to the uploader, which keeps it in
memory or spools it. When neither is possible the chunk is dropped *before* it gets a sequence
number (so numbering and hash chain stay gap-free) and its byte counts become a ``capture-gap``
marker at the head of the next chunk that can be stored.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from oneoff_audit import formats, keys
from oneoff_audit.codec import Utf8Splitter, encode_bytes

CHUNK_FORMAT = "oneoff-audit.chunk"
STREAM_NAMES = ("i", "o", "e")
WITHHELD = "input-withheld"
CAPTURE_GAP = "capture-gap"
# Level 1 rather than formats.encode_chunk's 6: on log-like output it compresses ~2.5x faster for
# ~20% more bytes, and the agent's CPU is taken from the user's command on the same runner. A chunk
# is compressed only while compressing costs at most 1/COMPRESS_CPU_SHARE of the time the output
# took to fill it (about 1/8 of a core; level 1 runs at ~100 MiB/s, so below ~12 MiB/s of output)
# and no other chunk is waiting; bulk output is stored uncompressed (gzip level 0, still valid gzip):
# it never waits for compression and does not pay ~10 ms of CPU per MiB for it.
GZIP_LEVEL = 1
GZIP_LEVEL_BEHIND = 0
COMPRESS_CPU_SHARE = 8
dumps_line = formats.dumps_line


def _zero() -> dict[str, int]:
    return dict.fromkeys(STREAM_NAMES, 0)


_quote = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) uses for strings
# What json.dumps(ensure_ascii=False) escapes in a string: the C0 controls, '"' and '\\' (and nothing
# else: DEL and non-ASCII characters stay as they are). The escapes are json's own.
_JSON_ESCAPES = [(b"\\", b"\\\\")] + [  # backslash first: the escapes added after it must stay single
    (bytes([c]), _quote(chr(c))[1:-1].encode()) for c in (*range(0x20), 0x22)]
Escapes = list[tuple[bytes, bytes]]


def json_escapes_in(data: bytes) -> Escapes:
    """The escapes json.dumps(ensure_ascii=False) needs for ``data`` (C0 controls, '"', '\\'), in order."""
    return [pair for pair in _JSON_ESCAPES if pair[0] in data]  # memchr passes: cheap even on a whole chunk


def escape_utf8(data: bytes, escapes: Escapes | None = None) -> bytes:
    """The inside of the JSON string for valid UTF-8 ``data``, as json.dumps(ensure_ascii=False) writes it.

    Works on the bytes (``replace`` per special byte value present: C passes) instead of decoding,
    escaping and re-encoding a str, which costs several times more. ``escapes`` may be those of a
    larger buffer that contains ``data`` (the whole chunk: found once, not per event).
    """
    for src, dst in json_escapes_in(data) if escapes is None else escapes:
        data = data.replace(src, dst)
    return data


def event_line(t: float, stream: str, value: Any, escapes: Escapes | None = None) -> bytes:
    """``formats.dumps_line([t, stream, value])`` for a data event, without building an encoder per call.

    ``value`` is a codec data value, or ``bytes`` standing for the data value of valid UTF-8 (its
    decoded str). The bytes are identical (tested): floats use ``float.__repr__`` as json does,
    strings the same escaping; the encoder calls this for every event, so it has to be cheap.
    """
    if type(value) is bytes:
        body = escape_utf8(value, escapes)
        return b"".join((b"[", repr(float(t)).encode(), b',"', stream.encode(), b'","', body, b'"]\n'))
    body = _quote(value) if type(value) is str else '{"b64":' + _quote(value["b64"]) + "}"
    return f'[{float(t)!r},"{stream}",{body}]\n'.encode()


def serialize_lines(lines: list[bytes | tuple[float, str, Any]]) -> list[bytes]:
    """Event lines for a chunk's events (bytes stay; (t, stream, data) tuples are serialized)."""
    raw = [line[2] for line in lines if type(line) is tuple and type(line[2]) is bytes]
    escapes = json_escapes_in(b"".join(raw)) if raw else None
    return [line if type(line) is bytes else event_line(*line, escapes) for line in lines]


class RawSplitter(Utf8Splitter):
    """:class:`~oneoff_audit.codec.Utf8Splitter` that keeps valid UTF-8 as bytes (no str is built).

    ``feed`` returns the same data values as the codec's splitter, except that a read that is valid
    UTF-8 (the usual case) comes back as its bytes, which :func:`event_line` writes as that string.
    """

    def feed(self, data: bytes) -> list[Any]:
        buf = self.take(data)
        if not buf:
            return []
        if buf.isascii():
            return [buf]
        try:
            buf.decode("utf-8")
        except UnicodeDecodeError:
            return encode_bytes(buf)
        return [buf]


def encode_chunk_lines(header: dict[str, Any], lines: list[bytes], level: int = GZIP_LEVEL) -> bytes:
    """The chunk object for already serialized event lines.

    Same layout as :func:`~oneoff_audit.formats.encode_chunk` (gzip, mtime 0, header line then one
    line per event; with ``level=6`` the very same bytes), so any chunk reader reads it.
    """
    gz = zlib.compressobj(level, zlib.DEFLATED, 31)  # a gzip member with mtime 0, as gzip.compress(mtime=0)
    parts = [gz.compress(dumps_line(header))]
    parts.extend(gz.compress(line) for line in lines)  # streamed: no joined copy of the chunk
    parts.append(gz.flush())
    return b"".join(parts)


@dataclass
class SealedChunk:
    """The serialized events of one chunk, before numbering and encoding."""

    lines: list[bytes | tuple[float, str, Any]]  # serialized events, or (t, stream, data) still to serialize
    data_bytes: dict[str, int]  # exact bytes per stream carried by these events
    first_t: float
    keep: bool = False  # kept in memory even over budget: the last chunk, or one with a vital marker
    fill_seconds: float = 0.0  # from its first event to its sealing: how fast the output comes
    accounted: bool = False  # counted as stored or as lost (never both, never twice)

    @property
    def total_bytes(self) -> int:
        return sum(self.data_bytes.values())

    @property
    def event_count(self) -> int:
        return len(self.lines)


class Recorder:
    """Turns reads into events and seals them into chunks (``sink`` receives each sealed chunk)."""

    def __init__(
        self,
        sink: Callable[[SealedChunk], None],
        *,
        chunk_bytes: int,
        chunk_seconds: float,
        t0: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self.chunk_bytes = chunk_bytes
        self.chunk_seconds = chunk_seconds
        self.t0 = t0
        self._clock = clock
        self._splitters = {s: RawSplitter() for s in STREAM_NAMES}
        self._lines: list[bytes | tuple[float, str, Any]] = []
        self._withheld: list[Any] | None = None  # the last event while it may still grow
        self._bytes = _zero()
        self._size = 0
        self._opened_at: float | None = None
        self._first_t = 0.0
        self.totals = _zero()  # bytes relayed per stream
        self.withheld_bytes = 0

    def _t(self, now: float) -> float:
        return round(max(0.0, now - self.t0), 6)

    def _open(self, now: float, t: float) -> None:
        if self._opened_at is None:
            self._opened_at = now
            self._first_t = t

    def _flush_withheld(self) -> None:
        if self._withheld is not None:
            self._lines.append(dumps_line(self._withheld))
            self._withheld = None

    def record(self, stream: str, data: bytes) -> None:
        """Record one read of stream ``i``, ``o`` or ``e``."""
        if not data:
            return
        self.totals[stream] += len(data)
        splitter = self._splitters[stream]
        held_before = splitter.held
        values = splitter.feed(data)
        if not values:
            return
        now = self._clock()
        t = self._t(now)
        self._open(now, t)
        if self._withheld is not None:
            self._flush_withheld()
        lines = self._lines
        for value in values:
            lines.append((t, stream, value))  # serialized by the writer thread (overlaps the relay's reads)
        emitted = len(data) + held_before - splitter.held
        self._bytes[stream] += emitted
        self._size += emitted
        if self._size >= self.chunk_bytes:
            self.seal()

    def _event(self, event: list[Any], now: float) -> None:
        self._open(now, event[0])
        self._flush_withheld()
        self._lines.append(dumps_line(event))

    def resize(self, cols: int, rows: int) -> None:
        """Record a terminal size (``r`` event, ``COLSxROWS``)."""
        now = self._clock()
        self._event([self._t(now), "r", f"{cols}x{rows}"], now)

    def marker(self, data: dict[str, Any], *, keep: bool = False) -> None:
        """Record a marker (``m`` event); ``data`` has a ``kind``.

        ``keep`` seals the chunk at once and keeps it even when memory and spool are full, so the
        marker (e.g. why the session was terminated) reaches the log whatever happens to other bytes.
        """
        now = self._clock()
        self._event([self._t(now), "m", data], now)
        if keep:
            self.seal(keep=True)

    def withheld(self, count: int) -> None:
        """Note ``count`` typed bytes that were not recorded (echo off); consecutive ones share one marker."""
        if count <= 0:
            return
        self.withheld_bytes += count
        if self._withheld is not None:
            self._withheld[2]["bytes"] += count
            return
        now = self._clock()
        t = self._t(now)
        self._open(now, t)
        self._withheld = [t, "m", {"kind": WITHHELD, "bytes": count}]

    def deadline(self) -> float | None:
        """When the open chunk must be sealed by age (``None`` when it is empty)."""
        return None if self._opened_at is None else self._opened_at + self.chunk_seconds

    def tick(self, now: float | None = None) -> None:
        """Seal the open chunk if it is old enough."""
        opened = self._opened_at
        if opened is not None and (self._clock() if now is None else now) >= opened + self.chunk_seconds:
            self.seal()

    def seal(self, keep: bool = False) -> None:
        """Hand the open chunk to the sink (nothing happens when it is empty)."""
        self._flush_withheld()
        if not self._lines:
            self._opened_at = None
            return
        opened = self._opened_at if self._opened_at is not None else self._clock()
        chunk = SealedChunk(self._lines, self._bytes, self._first_t, keep, self._clock() - opened)
        self._lines, self._bytes, self._size, self._opened_at = [], _zero(), 0, None
        self._sink(chunk)

    def finish(self) -> None:
        """Release bytes held by the splitters (incomplete characters) and seal the last chunk."""
        now = self._clock()
        t = self._t(now)
        for stream, splitter in self._splitters.items():
            held = splitter.held
            values = splitter.flush()
            if values:
                self._event([t, stream, values[0]], now)
                for value in values[1:]:
                    self._lines.append((t, stream, value))
                self._bytes[stream] += held
        self.seal(keep=True)  # the last chunk: bounded, and it carries the end of the session


class ChunkStore(Protocol):
    """Where encoded chunks go (the uploader): True when kept (memory or spool), False when lost."""

    def submit(self, name: str, key: str, data: bytes, *, force_memory: bool = False,
               sha256: bytes | None = None) -> bool: ...


@dataclass
class ChunkTotals:
    """What the chunk writer stored and lost, for the close marker."""

    chunk_sha256: list[str] = field(default_factory=list)
    event_count: int = 0
    data_bytes: dict[str, int] = field(default_factory=_zero)
    lost_bytes: int = 0
    lost_streams: dict[str, int] = field(default_factory=_zero)
    lost_events: int = 0
    lost_chunks: int = 0


@dataclass
class _PendingGap:
    t: float
    streams: dict[str, int] = field(default_factory=_zero)
    events: int = 0
    reason: str = ""

    def marker_line(self) -> bytes:
        data = {"kind": CAPTURE_GAP, "bytes": sum(self.streams.values()), "streams": dict(self.streams),
                "events": self.events, "reason": self.reason}
        return dumps_line([self.t, "m", data])


class ChunkWriter:
    """Background encoder: numbers, chains and encodes sealed chunks, then stores them."""

    def __init__(
        self,
        app: str,
        session_id: str,
        staging_prefix: str,
        store: ChunkStore,
        *,
        on_lost: Callable[[int], None] | None = None,
        on_stored: Callable[[], None] | None = None,
        backlog: int = 1,
    ) -> None:
        self.app = app
        self.session_id = session_id
        self.staging_prefix = staging_prefix
        self._store = store
        self._on_lost = on_lost
        self._on_stored = on_stored
        self._queue: queue.Queue[SealedChunk | None] = queue.Queue(maxsize=backlog)
        self._thread = threading.Thread(target=self._run, name="oneoff-audit-encoder", daemon=True)
        self._prev: str | None = None
        self._gap: _PendingGap | None = None
        self.totals = ChunkTotals()
        self.failure_reason = "S3 unavailable and the spool full or not writable"
        self.error: BaseException | None = None
        self.uncompressed_chunks = 0
        self._compress_rate: float | None = None  # seconds per byte of the last level-1 chunk

    @property
    def seq(self) -> int:
        """The sequence number the next stored chunk gets."""
        return len(self.totals.chunk_sha256)

    def start(self) -> None:
        self._thread.start()

    def put(self, chunk: SealedChunk) -> None:
        """Queue a sealed chunk (blocks only while encoding is behind: CPU, never S3)."""
        self._queue.put(chunk)

    def close(self) -> ChunkTotals:
        """Encode what is queued, store a last gap marker if bytes were lost at the end; return totals."""
        self._queue.put(None)
        self._thread.join()
        if self._gap is not None:
            # The last chunks were lost: say so in a chunk of its own (small, so kept in memory).
            try:
                self._write(SealedChunk([], _zero(), self._gap.t), force=True)
            except Exception as err:
                self.error = err
        return self.totals

    def _run(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            try:
                self._write(chunk, force=chunk.keep)
            except Exception as err:  # a bug must not block the relay: count the chunk as lost, say why
                self.error = err
                if not chunk.accounted:  # a chunk already stored (or counted lost) is not lost again
                    self._lose(chunk, f"chunk could not be encoded: {err!r}")

    def _level(self, chunk: SealedChunk) -> int:
        """Compress unless that would make the writer fall behind the output (bulk output is stored)."""
        if self._queue.qsize() > 0:
            return GZIP_LEVEL_BEHIND  # another chunk is already waiting
        if self._compress_rate is not None:
            cost = self._compress_rate * chunk.total_bytes
            if chunk.fill_seconds < COMPRESS_CPU_SHARE * cost:  # bulk output: compressing would eat CPU
                return GZIP_LEVEL_BEHIND
        return GZIP_LEVEL

    def _write(self, chunk: SealedChunk, force: bool = False) -> None:
        lines = serialize_lines(chunk.lines)
        chunk.lines = lines  # serialized once, even if the chunk is kept for a retry
        if self._gap is not None:
            lines = [self._gap.marker_line(), *lines]
        seq = self.seq
        header = {
            "format": CHUNK_FORMAT,
            "version": 1,
            "session_id": self.session_id,
            "app": self.app,
            "seq": seq,
            "first_event_index": self.totals.event_count,
            "prev_chunk_sha256": self._prev,
        }
        level = self._level(chunk)
        started = time.perf_counter()
        data = encode_chunk_lines(header, lines, level)
        if level == GZIP_LEVEL:
            size = max(1, sum(len(line) for line in lines))
            self._compress_rate = (time.perf_counter() - started) / size
        else:
            self.uncompressed_chunks += 1
        key = keys.chunk_key(self.app, self.session_id, seq, self.staging_prefix)
        sha256 = hashlib.sha256(data).digest()
        if self._store.submit(f"chunks/{seq:08d}.gz", key, data, force_memory=force, sha256=sha256):
            chunk.accounted = True
            digest = sha256.hex()
            self.totals.chunk_sha256.append(digest)
            self._prev = digest
            self.totals.event_count += len(lines)
            for stream, count in chunk.data_bytes.items():
                self.totals.data_bytes[stream] += count
            if self._gap is not None:
                self._gap = None
                if self._on_stored is not None:
                    self._on_stored()
            return
        self._lose(chunk, self.failure_reason)

    def _lose(self, chunk: SealedChunk, reason: str) -> None:
        chunk.accounted = True
        if self._gap is None:
            self._gap = _PendingGap(t=chunk.first_t, reason=reason)
        for stream, count in chunk.data_bytes.items():
            self._gap.streams[stream] += count
            self.totals.lost_streams[stream] += count
        self._gap.events += chunk.event_count
        self.totals.lost_events += chunk.event_count
        self.totals.lost_bytes += chunk.total_bytes
        self.totals.lost_chunks += 1
        if self._on_lost is not None:
            self._on_lost(chunk.total_bytes)
