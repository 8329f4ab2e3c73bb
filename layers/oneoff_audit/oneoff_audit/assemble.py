"""The assembler: turns a session's staging folder into one encrypted audit log, filed exactly once.

Order of work for one session (each step idempotent, so any redelivery finishes a crashed run):

1. **Already filed?** If ``logs/<app>/<session>.jsonl.enc`` exists, its :class:`FiledLog` is
   recovered from the object's metadata (and its ciphertext hash from its bytes) and the run
   goes straight to step 5.
2. **Verify** (pass 1): read ``opened.json`` and ``closed.json``, then stream every chunk once:
   SHA-256 against the close marker, gunzip with a size cap, header (session, seq, hash chain,
   first event index), every event line. This fixes the exact plaintext of the log (its size,
   SHA-256 and event counts) before anything is written. Missing or corrupt chunks raise
   :class:`RetryLaterError` until the last attempt, then the log is filed with ``complete: false``.
3. **Stream** (pass 2): the same chunks are read again (pinned to the same ETags and hashes) and
   the log (header line, the chunks' event lines byte for byte, gap markers, trailer) goes through
   the Encryption SDK straight into a multipart upload whose metadata carries the plaintext
   summary; the upload is completed with ``If-None-Match: *``.
4. **Evidence**: the signed manifest (when a signing key is configured).
5. **Index** entry (``If-None-Match: *``), then **cleanup** of exactly the staged objects the log
   covers (plain deletes: the bucket is versioned, so a deleted object stays as a noncurrent version).

A missing chunk becomes ``[t, "m", {"kind": "gap", "seq": N, "reason": "missing"}]``. A corrupt one
becomes a gap marker with the reason and its raw object bytes, base64, in ``gap-data`` markers:
what exists is never dropped, and nothing unverified is passed off as an event.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from botocore.exceptions import ClientError

from oneoff_audit import crypto, formats, keys
from oneoff_audit.aws import client, is_not_found, is_precondition_failed, is_write_conflict
from oneoff_audit.codec import decode_data
from oneoff_audit.config import AssemblerConfig
from oneoff_audit.crypto import encrypting_reader
from oneoff_audit.errors import FormatError, IntegrityError, InvalidIdError, NotFoundError, RetryLaterError
from oneoff_audit.ids import validate_app, validate_session_id
from oneoff_audit.models import FiledLog
from oneoff_audit.multipart import AlreadyExistsError, MultipartUpload, part_size_for
from oneoff_audit.staging import (
    ChunkReader,
    S3ChunkReader,
    StagedChunk,
    StagedSession,
    StagingChangedError,
    list_session,
    load_closed,
    load_opened,
    read_small_object,
)

logger = Logger()
metrics = Metrics()
tracer = Tracer()

SWEEP_MESSAGE = "sweep"
GAP = "gap"
GAP_DATA = "gap-data"
MAX_CHUNK_OBJECT_BYTES = 256 << 20  # larger chunk objects are not read (nor preserved) at all
MAX_CHUNK_COUNT = 1_000_000  # chunk positions in one log (what a 64 MB closed.json can list)
MAX_UNMARKED_MISSING = 10_000  # holes accepted below the highest chunk of a session without a close marker
RAW_PIECE = 384 << 10  # raw bytes per gap-data marker: 512 KiB of base64, well under a log line's cap
OUT_PIECE = 1 << 20  # decompressed bytes per step
DETAIL_MAX = 300
META_MAX_BYTES = 1900  # S3 allows 2 KiB of user metadata
LOG_CONTENT_TYPE = "application/octet-stream"
ABANDONED_REASON = "no close marker: the runner stopped reporting before closing the session"

# Why a chunk is a gap (the trailer's gaps.corrupt[].reason and the gap marker's "reason").
MISSING = "missing"
SHA256_MISMATCH = "sha256-mismatch"
TOO_LARGE = "too-large"
INVALID_GZIP = "invalid-gzip"
GZIP_BOMB = "gzip-bomb"
TRUNCATED = "truncated"
INVALID_HEADER = "invalid-header"
WRONG_SESSION = "wrong-session"
WRONG_SEQ = "wrong-seq"
BROKEN_CHAIN = "broken-chain"
EVENT_INDEX = "event-index"
OVERSIZED_LINE = "oversized-line"
INVALID_JSON = "invalid-json"
INVALID_EVENT = "invalid-event"
UNEXPECTED_CHUNK = "unexpected-chunk"


class NothingStagedError(NotFoundError):
    """Neither a filed log nor anything in staging exists for the session."""


class UnfiledStagingError(IntegrityError):
    """Staged objects remain that the filed log does not hold (they arrived after it was filed)."""


# ---------------------------------------------------------------- pass 1: verification


@dataclass(slots=True)
class Slot:
    """One chunk position of the log: a verified chunk, or a gap (missing or corrupt)."""

    seq: int
    status: str  # "ok" | "missing" | "corrupt"
    chunk: StagedChunk | None = None
    sha256: str | None = None  # of the object bytes as read (None if not read)
    reason: str | None = None
    detail: str | None = None
    t: float | int = 0  # time given to the gap markers: that of the last event before them

    def gap_line(self) -> bytes:
        """The gap marker that stands in for this slot in the log."""
        data: dict[str, Any] = {"kind": GAP, "seq": self.seq, "reason": self.reason}
        if self.status == "corrupt":
            assert self.chunk is not None
            data.update(detail=self.detail, size=self.chunk.size, sha256=self.sha256,
                        preserved=self.chunk.size <= MAX_CHUNK_OBJECT_BYTES)
        return formats.dumps_line([self.t, "m", data])


@dataclass
class Plan:
    """The verified content of the log, fixed before it is written."""

    app: str
    session_id: str
    opened: dict[str, Any]
    closed: dict[str, Any] | None
    header_line: bytes
    slots: list[Slot]
    trailer: dict[str, Any]
    trailer_line: bytes
    plaintext_sha256: str
    plaintext_size: int
    chunk_slots: int  # chunk positions 0..n-1 the log accounts for (the close marker's count, else the highest seen)

    @property
    def gaps(self) -> dict[str, Any]:
        """The trailer's ``gaps``."""
        return self.trailer["gaps"]

    @property
    def has_gaps(self) -> bool:
        """True if any chunk is missing or corrupt."""
        return bool(self.gaps["missing"] or self.gaps["corrupt"])


@dataclass
class _Totals:
    events: dict[str, int] = field(default_factory=lambda: dict.fromkeys(formats.STREAMS, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(formats.BYTE_STREAMS, 0))
    agent_events: int = 0
    withheld: int = 0
    lost: int = 0
    last_t: float | int = 0
    last_agent_t: float | int | None = None

    def add(self, other: _Totals) -> None:
        for stream, count in other.events.items():
            self.events[stream] += count
        for stream, count in other.bytes.items():
            self.bytes[stream] += count
        self.agent_events += other.agent_events
        self.withheld += other.withheld
        self.lost += other.lost
        if other.last_agent_t is not None:
            self.last_t = other.last_t
            self.last_agent_t = other.last_agent_t


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)
_SCAN = _DECODER.scan_once  # the C scanner: one JSON value at an index, no whitespace handling
_HEADER_KEYS = frozenset(formats.load_schema("chunk-header")["required"])
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TEXT_STREAMS = frozenset(formats.BYTE_STREAMS)


class _ChunkFailure(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail[:DETAIL_MAX]


@dataclass
class _ChunkCheck:
    """Verification of one chunk object, fed its raw bytes piece by piece."""

    app: str
    session_id: str
    seq: int
    where: str
    expected_prev: str | bool | None  # False: unknown (not checked)
    expected_index: int | None
    body_hash: Any
    spool: Spool | None = None
    cap: int = formats.MAX_CHUNK_DECOMPRESSED
    raw_hash: Any = field(default_factory=hashlib.sha256)
    totals: _Totals = field(default_factory=_Totals)
    first_index: int | None = None
    body_size: int = 0
    content_failure: _ChunkFailure | None = None  # a header or line is bad (decompression goes on)
    stream_failure: _ChunkFailure | None = None  # the gzip stream is bad or too big (reading stops)
    _decomp: Any = None
    _head: bytearray | None = field(default_factory=bytearray)
    _carry: bytes = b""
    _out: int = 0
    _line: int = 1

    def __post_init__(self) -> None:
        self._decomp = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)

    @property
    def failure(self) -> _ChunkFailure | None:
        """Why the chunk is corrupt: a gzip bomb first (whatever else), else the first problem found."""
        bomb = self.stream_failure
        if bomb is not None and bomb.reason == GZIP_BOMB:
            if self.content_failure is not None:
                return _ChunkFailure(GZIP_BOMB, f"{bomb.detail}; first {self.content_failure.reason}: "
                                                f"{self.content_failure.detail}")
            return bomb
        return self.content_failure or self.stream_failure

    def feed(self, raw: bytes) -> None:
        """Hash ``raw``; decompress it (capped) and check the text until something is wrong with it."""
        self.raw_hash.update(raw)
        if self.stream_failure is not None:
            return
        try:
            data = raw
            while data:
                if self._decomp.eof:
                    raise _ChunkFailure(INVALID_GZIP, "trailing data after the gzip stream")
                try:
                    out = self._decomp.decompress(data, OUT_PIECE)
                except zlib.error as err:
                    raise _ChunkFailure(INVALID_GZIP, f"not valid gzip: {err}") from None
                data = self._decomp.unconsumed_tail
                self._out += len(out)
                if self._out > self.cap:
                    raise _ChunkFailure(GZIP_BOMB, f"decompresses to more than {self.cap} bytes (gzip bomb)")
                if out and self.content_failure is None:
                    try:
                        self._text(out)
                    except _ChunkFailure as failure:
                        self.content_failure = failure
                if self._decomp.eof and self._decomp.unused_data:
                    raise _ChunkFailure(INVALID_GZIP, "trailing data after the gzip stream")
        except _ChunkFailure as failure:
            self.stream_failure = failure

    def finish(self) -> None:
        """Called after the last piece: detect truncation."""
        if self.failure is not None:
            return
        if not self._decomp.eof:
            self.stream_failure = _ChunkFailure(TRUNCATED, "truncated gzip stream")
        elif self._head is not None:
            self.content_failure = _ChunkFailure(TRUNCATED, "no complete header line")
        elif self._carry:
            self.content_failure = _ChunkFailure(TRUNCATED, f"line {self._line + 1} is not newline-terminated")

    def _text(self, out: bytes) -> None:
        if self._head is not None:
            self._head += out
            newline = self._head.find(b"\n")
            if newline < 0:
                if len(self._head) > formats.MAX_LINE_BYTES:
                    raise _ChunkFailure(OVERSIZED_LINE, f"line 1 is longer than {formats.MAX_LINE_BYTES} bytes")
                return
            head = bytes(self._head)
            self._head = None
            self._header(head[:newline])
            out = head[newline + 1:]
            if not out:
                return
        self.body_hash.update(out)
        self.body_size += len(out)
        if self.spool is not None:
            self.spool.write(out)
        end = out.rfind(b"\n")
        if end < 0:
            self._carry += out
        else:
            block = self._carry + out[:end] if self._carry else out[:end]
            self._carry = out[end + 1:]
            self._lines(block)
        if len(self._carry) > formats.MAX_LINE_BYTES:
            raise _ChunkFailure(OVERSIZED_LINE, f"line {self._line + 1} is longer than {formats.MAX_LINE_BYTES} bytes")

    def _plain_header(self, header: Any) -> bool:
        """True if ``header`` is an ordinary valid chunk header of this chunk (what the schema would accept,
        checked without jsonschema's per-call cost, which is felt over thousands of chunks)."""
        return (type(header) is dict and header.keys() == _HEADER_KEYS
                and header["format"] == "oneoff-audit.chunk" and type(header["version"]) is int
                and header["version"] == 1 and header["app"] == self.app and header["session_id"] == self.session_id
                and type(header["seq"]) is int and header["seq"] == self.seq
                and type(header["first_event_index"]) is int and header["first_event_index"] >= 0
                and (header["prev_chunk_sha256"] is None or (type(header["prev_chunk_sha256"]) is str
                                                             and _HEX64.fullmatch(header["prev_chunk_sha256"]))))

    def _lines(self, block: bytes) -> None:
        """Check complete event lines (``block`` holds one or more, without the final newline)."""
        first = self._line + 1
        if len(block) > formats.MAX_LINE_BYTES:
            for number, raw in enumerate(block.split(b"\n"), start=first):
                if len(raw) > formats.MAX_LINE_BYTES:
                    raise _ChunkFailure(OVERSIZED_LINE, f"line {number} is longer than {formats.MAX_LINE_BYTES} bytes")
        try:
            text = block.decode("utf-8")  # lines end in ASCII newlines, so a block never splits a character
        except UnicodeDecodeError as err:
            number = first + block.count(b"\n", 0, err.start)
            raise _ChunkFailure(INVALID_JSON, f"line {number}: not valid UTF-8") from None
        totals = self.totals
        events, nbytes = totals.events, totals.bytes
        last_t: Any = None
        scan = _SCAN
        for number, line in enumerate(text.split("\n"), start=first):
            # Fast path for the common compact [t, "i"|"o"|"e", "text"] line; anything else (and every
            # error) goes through the reference checks formats.parse_json + formats.check_event.
            try:
                event, end = scan(line, 0)
            except (ValueError, StopIteration, RecursionError):
                event, end = None, -1
            if end == len(line) and type(event) is list and len(event) == 3:
                t, stream, data = event
                if type(data) is str and stream in _TEXT_STREAMS and type(t) in (float, int) and 0 <= t < math.inf:
                    if data.isascii():
                        nbytes[stream] += len(data)
                        events[stream] += 1
                        last_t = t
                        continue
                    try:
                        nbytes[stream] += len(data.encode("utf-8"))
                    except UnicodeEncodeError:
                        pass  # a lone surrogate: let the reference checks say so
                    else:
                        events[stream] += 1
                        last_t = t
                        continue
            event = self._slow_event(line.encode("utf-8"), number)
            last_t = event[0]
        self._line = first + text.count("\n")
        if last_t is not None:
            totals.agent_events = sum(events.values())
            totals.last_t = totals.last_agent_t = last_t

    def _slow_event(self, raw: bytes, number: int) -> list[Any]:
        try:
            event = formats.parse_json(raw, self.where)
        except FormatError as err:
            raise _ChunkFailure(INVALID_JSON, f"line {number}: {err.reason}") from None
        try:
            formats.check_event(event, self.where)
        except FormatError as err:
            raise _ChunkFailure(INVALID_EVENT, f"line {number}: {err.field}: {err.reason}") from None
        _, stream, data = event
        totals = self.totals
        totals.events[stream] += 1
        if stream in formats.BYTE_STREAMS:
            totals.bytes[stream] += len(decode_data(data))
        elif stream == "m":
            amount = data.get("bytes")
            if isinstance(amount, int) and not isinstance(amount, bool) and amount >= 0:
                if data["kind"] == "input-withheld":
                    totals.withheld += amount
                elif data["kind"] == "capture-gap":
                    totals.lost += amount
        return event

    def _header(self, raw: bytes) -> None:
        where = f"{self.where} header"
        try:
            header = formats.parse_json(raw, where)
            if not self._plain_header(header):  # anything unusual gets the full schema check
                formats.validate(header, "chunk-header", where)
        except FormatError as err:
            raise _ChunkFailure(OVERSIZED_LINE if len(raw) > formats.MAX_LINE_BYTES else INVALID_HEADER,
                                str(err)) from None
        if header["app"] != self.app or header["session_id"] != self.session_id:
            raise _ChunkFailure(WRONG_SESSION, f"header names {header['app']}/{header['session_id']}, "
                                               f"not {self.app}/{self.session_id}")
        if header["seq"] != self.seq:
            raise _ChunkFailure(WRONG_SEQ, f"header says seq {header['seq']}, the key says {self.seq}")
        prev = header["prev_chunk_sha256"]
        if self.expected_prev is not False and prev != self.expected_prev:
            raise _ChunkFailure(BROKEN_CHAIN, f"prev_chunk_sha256 is {prev}, expected {self.expected_prev}")
        if self.expected_index is not None and header["first_event_index"] != self.expected_index:
            raise _ChunkFailure(EVENT_INDEX, f"first_event_index is {header['first_event_index']}, "
                                             f"expected {self.expected_index}")
        self.first_index = header["first_event_index"]

class Spool:
    """A local temporary file holding the log's bytes (all but the trailer) as pass 1 verifies them.

    With it, pass 2 encrypts from local disk instead of reading and decompressing every chunk from
    S3 again. It gives up (and pass 2 falls back to S3) when it would grow past ``limit`` bytes or the
    disk is full, so a session larger than the function's ephemeral storage is still filed.
    """

    def __init__(self, limit: int, directory: str | None = None) -> None:
        self.limit = limit
        self.size = 0
        self._file: Any = tempfile.TemporaryFile(dir=directory) if limit > 0 else None  # noqa: SIM115 - closed by discard()

    @classmethod
    def for_local_disk(cls, reserve: int = 256 << 20) -> Spool:
        """A spool limited to the free space of the temporary directory minus ``reserve``."""
        directory = tempfile.gettempdir()
        return cls(shutil.disk_usage(directory).free - reserve, directory)

    @property
    def usable(self) -> bool:
        """False once the spool gave up."""
        return self._file is not None

    def write(self, data: bytes) -> None:
        """Append ``data`` (or give up if it does not fit)."""
        if self._file is None:
            return
        if self.size + len(data) > self.limit:
            self.discard(f"the log is larger than the {self.limit} bytes of local disk allowed")
            return
        try:
            self._file.write(data)
        except OSError as err:
            self.discard(f"local disk: {err}")
            return
        self.size += len(data)

    def truncate(self, size: int) -> None:
        """Drop everything after the first ``size`` bytes (a chunk that turned out corrupt)."""
        if self._file is None or size == self.size:
            return
        self._file.flush()
        self._file.truncate(size)
        self._file.seek(size)
        self.size = size

    def pieces(self, read_size: int = 1 << 20) -> Iterator[bytes]:
        """The spooled bytes, from the start."""
        assert self._file is not None
        self._file.flush()
        self._file.seek(0)
        while piece := self._file.read(read_size):
            yield piece

    def discard(self, why: str = "") -> None:
        """Give up spooling (pass 2 then reads staging again)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            if why:
                logger.info("not spooling the log locally; pass 2 reads staging again", extra={"why": why})

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def _raw_pieces(reader: ChunkReader, chunk: StagedChunk) -> Iterator[bytes]:
    """The chunk's raw bytes re-cut into RAW_PIECE blocks (deterministic gap-data boundaries)."""
    buffer = bytearray()
    for piece in reader.read_chunk(chunk):
        buffer += piece
        while len(buffer) >= RAW_PIECE:
            yield bytes(buffer[:RAW_PIECE])
            del buffer[:RAW_PIECE]
    if buffer:
        yield bytes(buffer)


def _gap_data_lines(slot: Slot, reader: ChunkReader) -> Iterator[bytes]:
    """The corrupt chunk's object bytes as gap-data markers; checks they are the bytes verified."""
    assert slot.chunk is not None
    if slot.chunk.size > MAX_CHUNK_OBJECT_BYTES:
        return
    digest = hashlib.sha256()
    offset = 0
    for piece in _raw_pieces(reader, slot.chunk):
        digest.update(piece)
        data = {"kind": GAP_DATA, "seq": slot.seq, "offset": offset,
                "data": {"b64": base64.b64encode(piece).decode("ascii")}}
        offset += len(piece)
        yield formats.dumps_line([slot.t, "m", data])
    if digest.hexdigest() != slot.sha256:
        raise StagingChangedError(f"{slot.chunk.key} changed while being assembled")


def verify_session(app: str, session_id: str, opened: dict[str, Any], closed: dict[str, Any] | None,
                   chunks: dict[int, StagedChunk], reader: ChunkReader, filed_at: str,
                   spool: Spool | None = None) -> Plan:
    """Pass 1: verify every staged chunk and fix the log's exact content and summary.

    If a ``spool`` is given, the log's bytes before the trailer are also written to it.
    """
    header_line = formats.dumps_line(formats.log_header_from_session(opened))
    log_hash = hashlib.sha256(header_line)
    size = len(header_line)
    if spool is not None:
        spool.write(header_line)
    totals = _Totals()
    expected = closed["chunk_count"] if closed is not None else None
    digests: list[str] = closed["chunk_sha256"] if closed is not None else []
    if expected is not None and expected > MAX_CHUNK_COUNT:
        raise FormatError("closed.json", "chunk_count", f"{expected} chunks is more than the {MAX_CHUNK_COUNT} "
                                                        "the assembler files in one log")
    limit = expected if expected is not None else _unmarked_limit(chunks)
    seqs = list(range(limit)) + sorted(seq for seq in chunks if seq >= limit)
    expect = getattr(reader, "expect", None)
    if expect is not None:
        expect(chunks[seq] for seq in seqs if seq in chunks and chunks[seq].size <= MAX_CHUNK_OBJECT_BYTES
               and seq < limit)
    slots: list[Slot] = []
    index: int | None = 0
    prev_actual: str | None = None  # hash of the previous slot's object, if it was read

    def add_lines(lines: Iterator[bytes], counts: bool = True) -> None:
        nonlocal size
        for line in lines:
            log_hash.update(line)
            size += len(line)
            if spool is not None:
                spool.write(line)
            if counts:
                totals.events["m"] += 1

    for seq in seqs:
        chunk = chunks.get(seq)
        where = f"chunk {seq}"
        if chunk is None:
            slot = Slot(seq, "missing", reason=MISSING, t=totals.last_t)
            add_lines(iter([slot.gap_line()]))
            slots.append(slot)
            index = None
            prev_actual = None
            continue
        if seq >= limit:
            slot = Slot(seq, "corrupt", chunk, reason=UNEXPECTED_CHUNK, t=totals.last_t,
                        detail=f"the close marker lists {expected} chunks" if expected is not None
                        else f"too far beyond the other chunks (more than {MAX_UNMARKED_MISSING} would be missing)")
        elif chunk.size > MAX_CHUNK_OBJECT_BYTES:
            slot = Slot(seq, "corrupt", chunk, reason=TOO_LARGE,
                        detail=f"object is {chunk.size} bytes (limit {MAX_CHUNK_OBJECT_BYTES}); not read",
                        t=totals.last_t)
        else:
            if seq == 0:
                expected_prev: str | bool | None = None
            elif closed is not None:
                expected_prev = digests[seq - 1]
            else:
                expected_prev = prev_actual if prev_actual is not None else False
            mark = spool.size if spool is not None else 0
            check = _ChunkCheck(app, session_id, seq, where, expected_prev, index, log_hash.copy(), spool)
            for piece in reader.read_chunk(chunk):
                check.feed(piece)
            check.finish()
            actual = check.raw_hash.hexdigest()
            failure = check.failure
            if closed is not None and actual != digests[seq]:
                detail = f"object sha256 {actual}, close marker says {digests[seq]}"
                if failure is not None:
                    detail += f"; also {failure.reason}: {failure.detail}"
                failure = _ChunkFailure(SHA256_MISMATCH, detail)
            if failure is None:
                slot = Slot(seq, "ok", chunk, actual)
                log_hash = check.body_hash
                size += check.body_size
                totals.add(check.totals)
                assert check.first_index is not None
                index = check.first_index + check.totals.agent_events
            else:
                slot = Slot(seq, "corrupt", chunk, actual, failure.reason, failure.detail, totals.last_t)
                if spool is not None:
                    spool.truncate(mark)
            prev_actual = actual
        if slot.status == "corrupt":
            logger.warning("chunk is corrupt", extra={"seq": seq, "reason": slot.reason, "detail": slot.detail,
                                                      "key": chunk.key})
            add_lines(iter([slot.gap_line()]))
            if chunk.size <= MAX_CHUNK_OBJECT_BYTES:
                if slot.sha256 is None:
                    slot.sha256 = _object_sha256(reader, chunk)
                add_lines(_gap_data_lines(slot, reader))
            index = None
            if slot.reason in (TOO_LARGE, UNEXPECTED_CHUNK):
                prev_actual = None
        slots.append(slot)

    missing = [s.seq for s in slots if s.status == "missing"]
    corrupt = [{"seq": s.seq, "reason": s.reason} for s in slots if s.status == "corrupt"]
    if missing:
        logger.warning("chunks missing", extra={"missing": missing[:100], "missing_count": len(missing)})
    # The chain's final hash: that of the last chunk position's object, when it verified (its header
    # chains back, through the close marker's digests, to chunk 0).
    last = slots[limit - 1] if limit else None
    chain = last.sha256 if last is not None and last.status == "ok" else None
    started = formats.parse_time(opened["started_at"])
    if closed is not None:
        duration: float | int | None = max(0.0, round((formats.parse_time(closed["ended_at"]) - started)
                                                      .total_seconds(), 6))
        withheld, lost = closed["withheld_input_bytes"], closed["lost_bytes"]
    else:
        duration = totals.last_agent_t
        withheld, lost = totals.withheld, totals.lost
    if closed is not None and (totals.agent_events != closed["event_count"] or totals.bytes != closed["bytes"]) \
            and not (missing or corrupt):
        logger.warning("close marker totals differ from the chunks", extra={
            "marker_events": closed["event_count"], "events": totals.agent_events,
            "marker_bytes": closed["bytes"], "bytes": totals.bytes})
    trailer = {
        "type": "trailer",
        "session_id": session_id,
        "app": app,
        "ended_at": closed["ended_at"] if closed is not None else None,
        "exit": dict(closed["exit"]) if closed is not None else {"code": None, "signal": None},
        "status": closed["status"] if closed is not None else "abandoned",
        "reason": closed["reason"] if closed is not None else ABANDONED_REASON,
        "duration": duration,
        "bytes": dict(totals.bytes),
        "events": dict(totals.events),
        "event_count": sum(totals.events.values()),
        "chunk_count": sum(1 for s in slots if s.chunk is not None),
        "expected_chunk_count": expected,
        "chain_sha256": chain,
        # complete: closed normally, every chunk verified, and the runner lost no bytes while capturing
        "complete": closed is not None and not missing and not corrupt and lost == 0,
        "gaps": {"missing": missing, "corrupt": corrupt},
        "withheld_input_bytes": withheld,
        "lost_bytes": lost,
        "filed_at": filed_at,
    }
    formats.validate(trailer, "log-trailer", "log trailer")
    trailer_line = formats.dumps_line(trailer)
    log_hash.update(trailer_line)
    size += len(trailer_line)
    return Plan(app, session_id, opened, closed, header_line, slots, trailer, trailer_line,
                log_hash.hexdigest(), size, limit)


def _unmarked_limit(chunks: dict[int, StagedChunk]) -> int:
    """Chunk positions of a session without a close marker: up to the highest chunk seen, unless that
    means more than MAX_UNMARKED_MISSING holes (a stray chunk far beyond is kept, as unexpected)."""
    limit = missing = 0
    for seq in sorted(chunks):
        missing += seq - limit
        if missing > MAX_UNMARKED_MISSING or seq >= MAX_CHUNK_COUNT:
            break
        limit = seq + 1
    return limit


def _object_sha256(reader: ChunkReader, chunk: StagedChunk) -> str:
    digest = hashlib.sha256()
    for piece in reader.read_chunk(chunk):
        digest.update(piece)
    return digest.hexdigest()


# ---------------------------------------------------------------- pass 2: the log's bytes


def _chunk_body(slot: Slot, reader: ChunkReader) -> Iterator[bytes]:
    """The verified chunk's event lines, byte for byte (its decompressed bytes after line 1)."""
    assert slot.chunk is not None
    digest = hashlib.sha256()
    decomp = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    head: bytearray | None = bytearray()
    produced = 0
    for raw in reader.read_chunk(slot.chunk):
        digest.update(raw)
        data = raw
        while data:
            try:
                out = decomp.decompress(data, OUT_PIECE)
            except zlib.error as err:
                raise StagingChangedError(f"{slot.chunk.key} no longer decompresses") from err
            data = decomp.unconsumed_tail
            produced += len(out)
            if produced > formats.MAX_CHUNK_DECOMPRESSED:
                raise StagingChangedError(f"{slot.chunk.key} grew while being assembled")
            if head is not None:
                head += out
                newline = head.find(b"\n")
                if newline < 0:
                    continue
                out = bytes(head[newline + 1:])
                head = None
            if out:
                yield out
    if digest.hexdigest() != slot.sha256 or not decomp.eof:
        raise StagingChangedError(f"{slot.chunk.key} changed while being assembled")


def render_log(plan: Plan, reader: ChunkReader) -> Iterator[bytes]:
    """Pass 2: the plaintext log in pieces, exactly the bytes whose hash pass 1 computed."""
    expect = getattr(reader, "expect", None)
    if expect is not None:
        expect(s.chunk for s in plan.slots if s.chunk is not None and s.chunk.size <= MAX_CHUNK_OBJECT_BYTES)
    yield plan.header_line
    for slot in plan.slots:
        if slot.status == "ok":
            yield from _chunk_body(slot, reader)
            continue
        yield slot.gap_line()
        if slot.status == "corrupt":
            yield from _gap_data_lines(slot, reader)
    yield plan.trailer_line


def render_spooled(plan: Plan, spool: Spool) -> Iterator[bytes]:
    """Pass 2 from the spool: the log's bytes as pass 1 wrote them locally, then the trailer."""
    yield from spool.pieces()
    yield plan.trailer_line


class _PieceReader(io.RawIOBase):
    """A readable file over an iterator of byte pieces, hashing what is read.

    ``read(n)`` returns at most ``n`` bytes and may return fewer (the SDK's reader insists until it
    has a frame's worth), so pieces are handed on without being gathered into a second buffer.
    """

    def __init__(self, pieces: Iterator[bytes]) -> None:
        super().__init__()
        self._pieces = pieces
        self._current = memoryview(b"")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        while not self._current:
            try:
                self._current = memoryview(next(self._pieces))
            except StopIteration:
                return b""
        out = bytes(self._current[:size])
        self._current = self._current[len(out):]
        self.sha256.update(out)
        self.size += len(out)
        return out


# ---------------------------------------------------------------- object metadata


def _ranges(seqs: list[int]) -> str:
    parts: list[str] = []
    for seq in seqs:
        if parts and "-" in parts[-1] and int(parts[-1].split("-")[1]) == seq - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{seq}"
        elif parts and "-" not in parts[-1] and int(parts[-1]) == seq - 1:
            parts[-1] = f"{parts[-1]}-{seq}"
        else:
            parts.append(str(seq))
    return ",".join(parts)


def _unranges(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        out.extend(range(int(first), int(last or first) + 1))
    return out


def _opt(value: Any) -> str:
    return "-" if value is None else str(value)


def _unopt(text: str, kind: Callable[[str], Any] = str) -> Any:
    return None if text == "-" else kind(text)


def _counts(values: dict[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in values.items())


def _uncounts(text: str) -> dict[str, int]:
    return {k: int(v) for k, _, v in (item.partition(":") for item in text.split(","))}


def _number(text: str) -> float | int:
    value = float(text)
    return int(value) if text.lstrip("-").isdigit() else value


def close_marker_digest(closed: dict[str, Any] | None) -> str | None:
    """SHA-256 of a close marker's canonical form: which marker a log was built from."""
    return None if closed is None else hashlib.sha256(formats.dumps_line(closed)).hexdigest()


def log_metadata(plan: Plan) -> dict[str, str]:
    """The log object's user metadata: the plaintext summary a recovering run rebuilds FiledLog from."""
    t = plan.trailer
    exit_ = t["exit"]
    meta = {
        "format": formats.LOG_METADATA_FORMAT,
        "app": plan.app,
        "session-id": plan.session_id,
        "started-at": plan.opened["started_at"],
        "ended-at": _opt(t["ended_at"]),
        "filed-at": t["filed_at"],
        "status": t["status"],
        "complete": "true" if t["complete"] else "false",
        "duration": _opt(t["duration"]),
        "exit": f"{_opt(exit_['code'])},{_opt(exit_['signal'])}",
        "plaintext-size": str(plan.plaintext_size),
        "plaintext-sha256": plan.plaintext_sha256,
        "chain-sha256": _opt(t["chain_sha256"]),
        "event-count": str(t["event_count"]),
        "events": _counts(t["events"]),
        "bytes": _counts(t["bytes"]),
        "chunk-count": str(t["chunk_count"]),
        "expected-chunk-count": _opt(t["expected_chunk_count"]),
        "chunk-slots": str(plan.chunk_slots),
        "close-marker": "true" if plan.closed is not None else "false",
        "close-sha256": _opt(close_marker_digest(plan.closed)),
        "gaps-missing": _ranges(t["gaps"]["missing"]),
        "gaps-corrupt": ",".join(f"{g['seq']}:{g['reason']}" for g in t["gaps"]["corrupt"]),
    }
    if _meta_size(meta) > META_MAX_BYTES:
        meta["gaps-missing"] = meta["gaps-corrupt"] = GAPS_IN_SIDECAR
    return meta


GAPS_IN_SIDECAR = "see-gaps-object"


def _write_gaps_sidecar(config: AssemblerConfig, plan: Plan) -> None:
    """Store a gap list too large for metadata beside the log, before the log is completed.

    A recovering run reads it back without decrypting the log (the assembler may only generate data keys).
    It is keyed by the plaintext SHA-256, so it always describes exactly the log version that names it.
    """
    key = keys.log_gaps_key(plan.app, plan.session_id, plan.plaintext_sha256)
    body = formats.dumps_line({"format": "oneoff-audit.gaps", "version": 1, "app": plan.app,
                               "session_id": plan.session_id, "plaintext_sha256": plan.plaintext_sha256,
                               "gaps": plan.trailer["gaps"]})
    try:
        client("s3").put_object(Bucket=config.bucket, Key=key, Body=body, IfNoneMatch="*",
                                ContentType="application/json", **config.retention.put_args())
    except ClientError as err:
        if not (is_precondition_failed(err) or is_write_conflict(err)):
            raise
        existing = client("s3").get_object(Bucket=config.bucket, Key=key)["Body"].read(len(body) + 1)
        if existing != body:
            raise IntegrityError(f"{key}: a different gap list is already stored for this log") from err


def _read_gaps_sidecar(config: AssemblerConfig, app: str, session_id: str, plaintext_sha256: str) -> dict[str, Any]:
    """The gap list stored by :func:`_write_gaps_sidecar` for the log with this plaintext."""
    key = keys.log_gaps_key(app, session_id, plaintext_sha256)
    raw = client("s3").get_object(Bucket=config.bucket, Key=key)["Body"].read(formats.MAX_LINE_BYTES + 1)
    doc = formats.parse_json(raw.rstrip(b"\n"), key)
    if not isinstance(doc, dict) or (doc.get("app"), doc.get("session_id"), doc.get("plaintext_sha256")) != (
            app, session_id, plaintext_sha256):
        raise IntegrityError(f"{key}: gap list does not name this log")
    gaps = doc.get("gaps")
    trailer_gaps = formats.load_schema("log-trailer")["properties"]["gaps"]
    errors = list(formats.Draft202012Validator(trailer_gaps).iter_errors(gaps))
    if errors:
        raise IntegrityError(f"{key}: malformed gap list: {errors[0].message}")
    return gaps


def _meta_size(meta: dict[str, str]) -> int:
    return sum(len(k) + len(v) for k, v in meta.items())


@dataclass(frozen=True)
class LogSummary:
    """A filed log as recorded in its metadata: FiledLog plus what the index entry needs."""

    filed: FiledLog
    duration: float | int | None
    exit: dict[str, int | None]
    chunk_slots: int
    close_marker: bool
    close_sha256: str | None = None  # close_marker_digest of the marker the log was built from

    def covers(self) -> Callable[[int], bool]:
        """A test of whether the log holds the bytes of chunk ``seq`` (as events or as gap-data)."""
        missing = set(self.filed.gaps["missing"])
        corrupt = {g["seq"] for g in self.filed.gaps["corrupt"]}
        slots = self.chunk_slots
        return lambda seq: (seq < slots and seq not in missing) or seq in corrupt


def _summary_from_plan(plan: Plan, log_key: str, version_id: str | None, ct_sha: str, ct_size: int) -> LogSummary:
    t = plan.trailer
    filed = FiledLog(
        app=plan.app, session_id=plan.session_id, log_key=log_key, log_version_id=version_id,
        ciphertext_sha256=ct_sha, ciphertext_size=ct_size, plaintext_sha256=plan.plaintext_sha256,
        plaintext_size=plan.plaintext_size, chain_sha256=t["chain_sha256"], event_count=t["event_count"],
        bytes=dict(t["bytes"]), started_at=plan.opened["started_at"], ended_at=t["ended_at"],
        filed_at=t["filed_at"], status=t["status"], complete=t["complete"],
        gaps={"missing": list(t["gaps"]["missing"]), "corrupt": [dict(g) for g in t["gaps"]["corrupt"]]},
    )
    return LogSummary(filed, t["duration"], dict(t["exit"]), plan.chunk_slots, plan.closed is not None,
                      close_marker_digest(plan.closed))


def _summary_from_head(config: AssemblerConfig, app: str, session_id: str, log_key: str,
                       head: dict[str, Any]) -> LogSummary:
    """Rebuild the summary of a log filed earlier (possibly by a run that crashed or lost a race)."""
    meta = head.get("Metadata", {})
    version_id = head.get("VersionId")
    if version_id in (None, "null"):
        version_id = None
    try:
        if meta.get("format") != formats.LOG_METADATA_FORMAT or meta["app"] != app or meta["session-id"] != session_id:
            raise KeyError("format/app/session-id")
        if meta["gaps-missing"] == GAPS_IN_SIDECAR:
            gaps = _read_gaps_sidecar(config, app, session_id, meta["plaintext-sha256"])
        else:
            corrupt = [{"seq": int(s), "reason": r} for s, _, r in
                       (item.partition(":") for item in filter(None, meta["gaps-corrupt"].split(",")))]
            gaps = {"missing": _unranges(meta["gaps-missing"]), "corrupt": corrupt}
        code, _, signal = meta["exit"].partition(",")
        filed = FiledLog(
            app=app, session_id=session_id, log_key=log_key, log_version_id=version_id,
            ciphertext_sha256=_ciphertext_sha256(config, app, session_id, log_key, version_id, head),
            ciphertext_size=int(head["ContentLength"]),
            plaintext_sha256=meta["plaintext-sha256"], plaintext_size=int(meta["plaintext-size"]),
            chain_sha256=_unopt(meta["chain-sha256"]), event_count=int(meta["event-count"]),
            bytes=_uncounts(meta["bytes"]), started_at=meta["started-at"], ended_at=_unopt(meta["ended-at"]),
            filed_at=meta["filed-at"], status=meta["status"], complete=meta["complete"] == "true", gaps=gaps,
        )
        return LogSummary(filed, _unopt(meta["duration"], _number),
                          {"code": _unopt(code, int), "signal": _unopt(signal, int)},
                          int(meta["chunk-slots"]), meta["close-marker"] == "true",
                          _unopt(meta.get("close-sha256", "-")))
    except (KeyError, ValueError) as err:
        raise IntegrityError(f"{log_key}: object metadata is not an oneoff-audit log summary ({err})") from err


def _ciphertext_sha256(config: AssemblerConfig, app: str, session_id: str, log_key: str, version_id: str | None,
                       head: dict[str, Any]) -> str:
    """The filed log's ciphertext SHA-256: from its manifest if one was written for this very version
    (no need to read a large log again), else by hashing the stored object."""
    try:
        from oneoff_audit.evidence.manifest import MAX_MANIFEST_BYTES, parse_manifest

        key = keys.manifest_key(app, session_id)
        raw = client("s3").get_object(Bucket=config.bucket, Key=key)["Body"].read(MAX_MANIFEST_BYTES + 1)
        doc = parse_manifest(raw, key)
        meta = head.get("Metadata", {})
        if (doc["log_key"], doc["log_version_id"], doc["ciphertext_size"], doc["plaintext_sha256"]) == (
                log_key, version_id, int(head["ContentLength"]), meta.get("plaintext-sha256")):
            return str(doc["ciphertext_sha256"])
        logger.warning("manifest does not describe the stored log; hashing the log", extra={"manifest": key})
    except ClientError as err:
        if not is_not_found(err):
            raise
    except (ImportError, FormatError, KeyError, ValueError):
        pass
    from oneoff_audit.evidence.store import sha256_of_object

    return sha256_of_object(config.bucket, log_key, version_id)


def _head(bucket: str, key: str) -> dict[str, Any] | None:
    try:
        return client("s3").head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if is_not_found(err):
            return None
        raise


def _upload(config: AssemblerConfig, plan: Plan, reader: ChunkReader, log_key: str,
            spool: Spool | None = None) -> LogSummary:
    """Pass 2 into a multipart upload completed with If-None-Match; AlreadyExistsError if we lost."""
    part_size = part_size_for(plan.plaintext_size + plan.plaintext_size // 1000 + (1 << 20))
    pieces = render_spooled(plan, spool) if spool is not None and spool.usable else render_log(plan, reader)
    source = _PieceReader(pieces)
    metadata = log_metadata(plan)
    if metadata["gaps-missing"] == GAPS_IN_SIDECAR:
        _write_gaps_sidecar(config, plan)
    with MultipartUpload(config.bucket, log_key, metadata=metadata, content_type=LOG_CONTENT_TYPE,
                         part_size=part_size, lock=config.retention.put_args()) as upload:
        with encrypting_reader(source, config.kms_key_id, plan.app, plan.session_id) as encryptor:
            while data := encryptor.read(crypto.FRAME_LENGTH):  # one frame at a time: small temporaries
                upload.write(data)
        if source.sha256.hexdigest() != plan.plaintext_sha256 or source.size != plan.plaintext_size:
            raise StagingChangedError("the log's bytes differ from the verified plan; staging changed")
        response = upload.complete()
    return _summary_from_plan(plan, log_key, response.get("VersionId"), upload.sha256.hexdigest(), upload.size)


def index_entry(opened: dict[str, Any], summary: LogSummary) -> dict[str, Any]:
    """The timeline entry of a filed log, validated against ``index-entry.schema.json``."""
    filed = summary.filed
    entry = {
        "format": "oneoff-audit.index",
        "version": 1,
        "session_id": filed.session_id,
        "app": filed.app,
        "actor": opened["actor"],
        "command": opened["command"],
        "target": opened["target"],
        "started_at": filed.started_at,
        "ended_at": filed.ended_at,
        "duration": summary.duration,
        "exit": summary.exit,
        "status": filed.status,
        "complete": filed.complete,
        "size": filed.plaintext_size,
        "sha256": filed.plaintext_sha256,
        "ciphertext_size": filed.ciphertext_size,
        "log_key": filed.log_key,
        "log_version_id": filed.log_version_id,
        "event_count": filed.event_count,
        "filed_at": filed.filed_at,
    }
    return formats.validate(entry, "index-entry", f"index entry of {filed.app}/{filed.session_id}")


def _write_index(config: AssemblerConfig, summary: LogSummary, opened: dict[str, Any] | None) -> bool:
    """Write the index entry once; True if this call created it."""
    filed = summary.filed
    key = keys.index_key(filed.app, filed.session_id, formats.parse_time(filed.started_at))
    if _head(config.bucket, key) is not None:
        return False
    if opened is None:
        raise IntegrityError(f"{key} is missing and opened.json is gone: cannot rebuild the index entry")
    body = formats.dumps_line(index_entry(opened, summary))
    try:
        client("s3").put_object(Bucket=config.bucket, Key=key, Body=body, ContentType="application/json",
                                IfNoneMatch="*", **config.retention.put_args())
    except ClientError as err:
        if is_precondition_failed(err) or is_write_conflict(err):
            return False
        raise
    return True


def _cleanup(config: AssemblerConfig, summary: LogSummary) -> int:
    """Delete the staged objects the log covers: chunks, then closed.json, then opened.json.

    A chunk or close marker the log does not cover (it arrived after the log was filed) is never
    deleted: :class:`UnfiledStagingError` is raised so that the message fails and ends in the
    dead-letter queue with the keys in the reason. Objects outside the staging layout cannot belong
    to any log; they are left and reported in an error log line.
    """
    filed = summary.filed
    staged = list_session(config.bucket, filed.app, filed.session_id, config.staging_prefix)
    covered = summary.covers()
    chunk_keys = [c.key for seq, c in sorted(staged.chunks.items()) if covered(seq)]
    late = [c.key for seq, c in sorted(staged.chunks.items()) if not covered(seq)]
    batches = [chunk_keys[i:i + 1000] for i in range(0, len(chunk_keys), 1000)]
    if staged.closed_key is not None:
        if summary.close_marker and _is_filed_close_marker(config, staged.closed_key, summary.close_sha256):
            batches.append([staged.closed_key])
        else:  # no marker was filed, or this one is another (e.g. the genuine one after a forged one)
            late.append(staged.closed_key)
    if staged.opened_key is not None:
        batches.append([staged.opened_key])
    deleted = 0
    s3 = client("s3")
    for batch in batches:
        response = s3.delete_objects(Bucket=config.bucket,
                                     Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        if response.get("Errors"):
            raise RetryLaterError(f"could not delete staged objects: {response['Errors'][:3]}")
        deleted += len(batch)
    if staged.other_keys:
        logger.error("objects outside the staging layout are left in the session's folder",
                     extra={"keys": staged.other_keys[:50], "count": len(staged.other_keys)})
    if late:
        logger.error("staged objects not covered by the filed log are left in staging",
                     extra={"keys": late[:50], "count": len(late)})
        raise UnfiledStagingError(f"{len(late)} staged object(s) arrived after the log was filed and are in no "
                                  f"log; left in staging: {', '.join(late[:5])}")
    return deleted


def _is_filed_close_marker(config: AssemblerConfig, key: str, filed_sha256: str | None) -> bool:
    """True if the staged close marker is the one the log was built from (never delete another one)."""
    if filed_sha256 is None:
        return True  # a log filed before close-sha256 was recorded
    try:
        raw = read_small_object(config.bucket, key, formats.MAX_CLOSED_BYTES, "close marker")
        closed = formats.read_json_object(raw, "close-marker", key, formats.MAX_CLOSED_BYTES)
    except NotFoundError:
        return True  # already deleted (by a concurrent run): nothing is left to keep
    except FormatError:
        return False
    return close_marker_digest(closed) == filed_sha256


def _write_manifest(config: AssemblerConfig, filed: FiledLog) -> None:
    if not config.signing_key_id:
        return
    from oneoff_audit.evidence.manifest import write_signed_manifest

    write_signed_manifest(filed, config.bucket, config.signing_key_id, lock=config.retention.put_args())


def _finish(config: AssemblerConfig, summary: LogSummary, opened: dict[str, Any] | None) -> None:
    _write_manifest(config, summary.filed)
    if _write_index(config, summary, opened):
        logger.info("index entry written")
    deleted = _cleanup(config, summary)
    logger.info("staging cleaned up", extra={"deleted": deleted})


def _finish_existing(config: AssemblerConfig, app: str, session_id: str, log_key: str,
                     head: dict[str, Any]) -> FiledLog:
    summary = _summary_from_head(config, app, session_id, log_key, head)
    opened: dict[str, Any] | None = None
    index = keys.index_key(app, session_id, formats.parse_time(summary.filed.started_at))
    if _head(config.bucket, index) is None:
        session = list_session(config.bucket, app, session_id, config.staging_prefix)
        opened = load_opened(config.bucket, session)
    logger.info("log already filed; finishing evidence, index and cleanup",
                extra={"log_version_id": summary.filed.log_version_id})
    _finish(config, summary, opened)
    metrics.add_metric(name="FilingsResumed", unit=MetricUnit.Count, value=1)
    return summary.filed


# ---------------------------------------------------------------- entry points

#: Makes the local spool of a run; replace with ``lambda: Spool(0)`` to always re-read staging in pass 2.
new_spool: Callable[[], Spool] = Spool.for_local_disk


@tracer.capture_method
def assemble_session(config: AssemblerConfig, app: str, session_id: str, *, attempt: int = 1,
                     abandoned: bool = False) -> FiledLog:
    """File one session's log exactly once (or finish filing it), then index it and clean staging.

    Raises RetryLaterError while chunks are missing or corrupt and ``attempt < config.max_attempts``;
    at the last attempt (or for an abandoned session, which has no close marker) the log is filed
    with ``complete: false`` and the exact gaps.
    """
    validate_app(app)
    validate_session_id(session_id)
    logger.thread_safe_append_keys(app=app, session_id=session_id)
    try:
        return _assemble(config, app, session_id, attempt, abandoned)
    finally:
        logger.thread_safe_remove_keys(["app", "session_id"])


def _assemble(config: AssemblerConfig, app: str, session_id: str, attempt: int, abandoned: bool) -> FiledLog:
    started = time.monotonic()
    log_key = keys.log_key(app, session_id)
    head = _head(config.bucket, log_key)
    if head is not None:
        return _finish_existing(config, app, session_id, log_key, head)
    with S3ChunkReader(config.bucket) as reader, new_spool() as spool:
        return _assemble_staged(config, app, session_id, attempt, abandoned, log_key, reader, spool, started)


def _assemble_staged(config: AssemblerConfig, app: str, session_id: str, attempt: int, abandoned: bool,
                     log_key: str, reader: S3ChunkReader, spool: Spool, started: float) -> FiledLog:
    try:
        opened, closed, plan = _verify(config, app, session_id, reader, spool, abandoned)
    except (NotFoundError, StagingChangedError):
        head = _head(config.bucket, log_key)  # a concurrent run may have filed it and cleaned up
        if head is not None:
            return _finish_existing(config, app, session_id, log_key, head)
        raise
    if plan.has_gaps and closed is not None and attempt < config.max_attempts:
        logger.warning("chunks missing or corrupt: retrying later", extra={
            "attempt": attempt, "max_attempts": config.max_attempts, "gaps": _short_gaps(plan.gaps)})
        raise RetryLaterError(f"{app}/{session_id}: gaps {_short_gaps(plan.gaps)} "
                              f"(attempt {attempt} of {config.max_attempts})")
    try:
        verified = time.monotonic()
        summary = _upload(config, plan, reader, log_key, spool)
    except (AlreadyExistsError, StagingChangedError) as err:
        head = _head(config.bucket, log_key)
        if head is None:
            if isinstance(err, StagingChangedError):
                raise
            raise RetryLaterError(f"{log_key}: completion conflicted but the log is not there") from None
        logger.info("another run filed this log first")
        return _finish_existing(config, app, session_id, log_key, head)
    filed = summary.filed
    logger.info("log filed", extra={
        "log_key": log_key, "log_version_id": filed.log_version_id, "complete": filed.complete,
        "status": filed.status, "gaps": _short_gaps(filed.gaps), "plaintext_size": filed.plaintext_size,
        "ciphertext_size": filed.ciphertext_size, "event_count": filed.event_count, "attempt": attempt,
        "verify_seconds": round(verified - started, 3), "upload_seconds": round(time.monotonic() - verified, 3)})
    metrics.add_metric(name="SessionsFiled", unit=MetricUnit.Count, value=1)
    metrics.add_metric(name="SessionsIncomplete", unit=MetricUnit.Count, value=0 if filed.complete else 1)
    metrics.add_metric(name="SessionsAbandoned", unit=MetricUnit.Count, value=int(filed.status == "abandoned"))
    metrics.add_metric(name="BytesFiled", unit=MetricUnit.Bytes, value=filed.plaintext_size)
    _finish(config, summary, opened)
    metrics.add_metric(name="AssemblyDuration", unit=MetricUnit.Seconds, value=round(time.monotonic() - started, 3))
    return filed


def _verify(config: AssemblerConfig, app: str, session_id: str, reader: ChunkReader, spool: Spool,
            abandoned: bool) -> tuple[dict[str, Any], dict[str, Any] | None, Plan]:
    session: StagedSession = list_session(config.bucket, app, session_id, config.staging_prefix)
    if session.empty:
        raise NothingStagedError(f"nothing staged for {app}/{session_id} and no log filed")
    opened = load_opened(config.bucket, session)
    closed = load_closed(config.bucket, session)
    if closed is None and not abandoned:
        raise NotFoundError(f"{session.prefix}{keys.CLOSED} not found (the sweeper files sessions without one)")
    filed_at = formats.format_time(formats.utc_now())
    plan = verify_session(app, session_id, opened, closed, session.chunks, reader, filed_at, spool)
    return opened, closed, plan


def _short_gaps(gaps: dict[str, Any]) -> dict[str, Any]:
    return {"missing": _ranges(gaps["missing"]),
            "corrupt": [f"{g['seq']}:{g['reason']}" for g in gaps["corrupt"][:50]]}


def process_message(config: AssemblerConfig, body: dict[str, Any], receive_count: int) -> list[FiledLog]:
    """Handle one assembly-queue message: an S3 event (closed.json) or a sweeper message.

    Returns the logs filed (or finished). Raises (so the message is retried, and finally dead-lettered)
    on anything that a later attempt may fix; messages that can never be processed are logged and dropped.
    """
    if not isinstance(body, dict):
        raise FormatError("assembly message", "(root)", "not a JSON object")
    if body.get("Event") == "s3:TestEvent":
        logger.info("ignoring s3:TestEvent")
        return []
    if body.get("oneoff_audit") == SWEEP_MESSAGE:
        try:
            app, session_id = validate_app(body.get("app")), validate_session_id(body.get("session_id"))
        except InvalidIdError as err:
            logger.error("dropping sweeper message with an invalid id", extra={"reason": str(err)})
            return []
        try:
            return [assemble_session(config, app, session_id, attempt=receive_count, abandoned=True)]
        except NothingStagedError as err:  # swept, then filed and cleaned up by someone else: nothing to do
            logger.warning("dropping sweeper message: nothing to file", extra={"reason": str(err)})
            return []
    records = body.get("Records")
    if not isinstance(records, list):
        raise FormatError("assembly message", "(root)", "neither an S3 event nor a sweeper message")
    filed: list[FiledLog] = []
    for record in records:
        s3 = record.get("s3", {}) if isinstance(record, dict) else {}
        bucket = s3.get("bucket", {}).get("name")
        raw_key = s3.get("object", {}).get("key", "")
        if not str(record.get("eventName", "")).startswith("ObjectCreated") or bucket != config.bucket:
            logger.info("ignoring S3 event record", extra={"event_name": record.get("eventName"), "bucket": bucket,
                                                            "key": raw_key})
            continue
        try:
            parsed = keys.parse_staging_key(raw_key, config.staging_prefix, url_encoded=True)
        except InvalidIdError as err:
            logger.error("dropping S3 event for a key outside the staging layout", extra={"reason": str(err)})
            continue
        if parsed.kind != "closed":
            logger.info("ignoring S3 event for a non-close object", extra={"key": raw_key})
            continue
        filed.append(assemble_session(config, parsed.app, parsed.session_id, attempt=receive_count))
    return filed


def describe_failure(err: BaseException) -> str:
    """One line saying why a message failed, naming the AWS error at the root of it (for the logs)."""

    def one(e: BaseException) -> str:
        if isinstance(e, ClientError):
            info = e.response.get("Error", {})
            return f"{e.operation_name}: {info.get('Code')}: {info.get('Message')}"
        return f"{type(e).__name__}: {e}"

    text = one(err)
    seen = {id(err)}
    cause = err.__cause__ or err.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ClientError):
            return f"{text}; caused by {one(cause)}"
        cause = cause.__cause__ or cause.__context__
    return text


def dumps_filed(filed: list[FiledLog]) -> str:
    """Compact JSON of filed logs (for logs and the local stack)."""
    return json.dumps([f.to_dict() for f in filed], separators=(",", ":"))
