"""Build staged sessions the way a runner writes them (opened.json, chunks, closed.json) for tests.

Chunks are made with :func:`oneoff_audit.formats.encode_chunk` and keys with :mod:`oneoff_audit.keys`;
:func:`expected_log` builds, independently of the assembler, the exact plaintext log a staged
session must become. Reusable by any test that needs a staged or filed session.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import json
import logging
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from oneoff_audit import formats, keys
from oneoff_audit.aws import client
from oneoff_audit.codec import decode_data, encode_bytes

STARTED_AT = "2026-11-25T14:46:00.123456Z"
ENDED_AT = "2026-11-25T14:47:30.623456Z"


def session_header(app: str, session_id: str, started_at: str = STARTED_AT, **overrides: Any) -> dict[str, Any]:
    """A valid opened.json document."""
    doc = {
        "format": "oneoff-audit.session",
        "version": 1,
        "session_id": session_id,
        "app": app,
        "actor": {"id": "u-42", "name": "Ada", "type": "user", "source_ip": "10.0.0.7"},
        "command": {"argv": ["bash", "-c", "echo hi"], "tty": True, "term_size": {"cols": 80, "rows": 24},
                    "env_keys": ["HOME", "PATH"]},
        "target": {"org": "acme", "space": "prod"},
        "started_at": started_at,
        "agent": {"version": "0.1.0", "hostname": "runner-1", "pid": 4242},
        "options": {"record_hidden_input": False, "chunk_max_bytes": 1 << 20, "chunk_max_seconds": 5},
    }
    doc.update(overrides)
    return doc


def output_events(texts: Iterable[bytes | str], start: float = 0.0, step: float = 0.25,
                  stream: str = "o") -> list[list[Any]]:
    """Events carrying ``texts`` (bytes are split into text/base64 data values like the codec does)."""
    events: list[list[Any]] = []
    t = start
    for text in texts:
        raw = text.encode("utf-8") if isinstance(text, str) else text
        t = round(t + step, 6)
        events.extend([t, stream, value] for value in encode_bytes(raw))
    return events


@dataclass
class StagedChunks:
    """Chunk objects of one session, with what the close marker needs."""

    app: str
    session_id: str
    batches: list[list[list[Any]]]
    blobs: list[bytes] = field(default_factory=list)

    @property
    def digests(self) -> list[str]:
        return [hashlib.sha256(b).hexdigest() for b in self.blobs]

    @property
    def event_count(self) -> int:
        return sum(len(b) for b in self.batches)

    def stream_bytes(self) -> dict[str, int]:
        totals = dict.fromkeys(formats.BYTE_STREAMS, 0)
        for batch in self.batches:
            for _, stream, data in batch:
                if stream in totals:
                    totals[stream] += len(decode_data(data))
        return totals


def chunk_header(app: str, session_id: str, seq: int, first_event_index: int, prev: str | None) -> dict[str, Any]:
    """A valid chunk header."""
    return {"format": "oneoff-audit.chunk", "version": 1, "session_id": session_id, "app": app, "seq": seq,
            "first_event_index": first_event_index, "prev_chunk_sha256": prev}


def build_chunks(app: str, session_id: str, batches: Sequence[list[list[Any]]], compresslevel: int | None = None
                 ) -> StagedChunks:
    """Encode one chunk per batch of events, chained by hash like the runner does."""
    staged = StagedChunks(app, session_id, [list(b) for b in batches])
    prev = None
    index = 0
    for seq, batch in enumerate(staged.batches):
        header = chunk_header(app, session_id, seq, index, prev)
        if compresslevel is None:
            blob = formats.encode_chunk(header, batch)
        else:
            body = io.BytesIO()
            body.write(formats.dumps_line(header))
            for event in batch:
                body.write(formats.dumps_line(event))
            blob = gzip.compress(body.getvalue(), compresslevel=compresslevel, mtime=0)
        staged.blobs.append(blob)
        prev = hashlib.sha256(blob).hexdigest()
        index += len(batch)
    return staged


def close_marker(chunks: StagedChunks, status: str = "succeeded", code: int | None = 0, signal: int | None = None,
                 ended_at: str = ENDED_AT, **overrides: Any) -> dict[str, Any]:
    """A valid closed.json for ``chunks``."""
    doc = {
        "format": "oneoff-audit.close",
        "version": 1,
        "session_id": chunks.session_id,
        "app": chunks.app,
        "ended_at": ended_at,
        "exit": {"code": code, "signal": signal},
        "status": status,
        "reason": None,
        "chunk_count": len(chunks.blobs),
        "chunk_sha256": chunks.digests,
        "event_count": chunks.event_count,
        "bytes": chunks.stream_bytes(),
        "withheld_input_bytes": 0,
        "lost_bytes": 0,
    }
    doc.update(overrides)
    return doc


def put(bucket: str, key: str, body: bytes) -> None:
    """PUT one staged object."""
    client("s3").put_object(Bucket=bucket, Key=key, Body=body)


def stage(bucket: str, chunks: StagedChunks, *, opened: dict[str, Any] | None = None,
          closed: dict[str, Any] | bool = True, order: Sequence[int] | None = None,
          skip: Iterable[int] = (), replace: dict[int, bytes] | None = None,
          staging_prefix: str = keys.DEFAULT_STAGING_PREFIX) -> dict[str, Any] | None:
    """Write opened.json, the chunks (in ``order``, minus ``skip``, with ``replace``d bodies), then closed.json.

    Returns the close marker written (None if ``closed`` is False).
    """
    app, sid = chunks.app, chunks.session_id
    put(bucket, keys.opened_key(app, sid, staging_prefix), json.dumps(opened or session_header(app, sid)).encode())
    skipped = set(skip)
    replaced = replace or {}
    for seq in order if order is not None else range(len(chunks.blobs)):
        if seq in skipped:
            continue
        put(bucket, keys.chunk_key(app, sid, seq, staging_prefix), replaced.get(seq, chunks.blobs[seq]))
    marker = None
    if closed:
        marker = close_marker(chunks) if closed is True else closed
        put(bucket, keys.closed_key(app, sid, staging_prefix), json.dumps(marker).encode())
    return marker


def staged_keys(bucket: str, app: str, session_id: str, staging_prefix: str = keys.DEFAULT_STAGING_PREFIX) -> list[str]:
    """Current keys under the session's staging folder."""
    prefix = keys.session_prefix(app, session_id, staging_prefix)
    pages = client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def expected_log(opened: dict[str, Any], batches: Sequence[list[list[Any]] | None], trailer: dict[str, Any]) -> bytes:
    """The plaintext log for a session whose chunks are ``batches`` (None marks a missing chunk).

    Built from the events, not from chunk bytes, with the trailer given (the filed one, whose
    counts the caller asserts separately).
    """
    out = io.BytesIO()
    out.write(formats.dumps_line({"type": "header", **opened, "format": "oneoff-audit.log"}))
    last_t: float | int = 0
    for seq, batch in enumerate(batches):
        if batch is None:
            out.write(formats.dumps_line([last_t, "m", {"kind": "gap", "seq": seq, "reason": "missing"}]))
            continue
        for event in batch:
            out.write(formats.dumps_line(event))
            last_t = event[0]
    out.write(formats.dumps_line(trailer))
    return out.getvalue()


def read_log(bucket: str, app: str, session_id: str, kms_key_id: str, version_id: str | None = None) -> bytes:
    """The decrypted plaintext of a filed log (checks the encryption context)."""
    from oneoff_audit.crypto import decrypt_bytes

    request: dict[str, Any] = {"Bucket": bucket, "Key": keys.log_key(app, session_id)}
    if version_id:
        request["VersionId"] = version_id
    ciphertext = client("s3").get_object(**request)["Body"].read()
    return decrypt_bytes(ciphertext, kms_key_id, app, session_id)


def log_versions(bucket: str, key: str) -> list[dict[str, Any]]:
    """Every version (and delete marker) of ``key``."""
    response = client("s3").list_object_versions(Bucket=bucket, Prefix=key)
    return [v for v in response.get("Versions", []) if v["Key"] == key] + \
        [m for m in response.get("DeleteMarkers", []) if m["Key"] == key]


def index_objects(bucket: str, app: str) -> list[str]:
    """Keys of the app's index entries."""
    response = client("s3").list_objects_v2(Bucket=bucket, Prefix=keys.index_prefix(app))
    return [obj["Key"] for obj in response.get("Contents", [])]


class CapturedLogs(list):
    """JSON log lines of the Powertools logger, as they would be printed (see :func:`capture_logs`)."""

    def find(self, message: str, **fields: Any) -> list[dict[str, Any]]:
        """Lines with this message whose fields include ``fields``."""
        return [line for line in self if line.get("message") == message
                and all(line.get(k) == v for k, v in fields.items())]


@contextlib.contextmanager
def capture_logs(service: str = "oneoff-audit") -> Iterator[CapturedLogs]:
    """Collect the JSON lines the Powertools logger of ``service`` emits (formatted by its own formatter)."""
    from aws_lambda_powertools import Logger

    formatter = Logger(service=service).registered_formatter
    lines = CapturedLogs()

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(formatter.format(record)))

    handler = _Handler()
    target = logging.getLogger(service)
    target.addHandler(handler)
    try:
        yield lines
    finally:
        target.removeHandler(handler)


# ---------------------------------------------------------------- corrupt chunks

CORRUPTIONS = ("wrong-session", "broken-chain", "wrong-seq", "event-index", "invalid-json", "invalid-event",
               "oversized-line", "invalid-header", "truncated", "invalid-gzip", "gzip-bomb")


def zeros_bomb(size: int = 128 << 20) -> bytes:
    """``size`` zero bytes, gzip-compressed in pieces (a 230:1 bomb, twice the decompression cap)."""
    comp = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    return b"".join(comp.compress(block) for _ in range(size >> 20)) + comp.flush()


def corrupt_case(chunks: StagedChunks, reason: str, seq: int = 1) -> tuple[str, bytes]:
    """(fragment of the expected detail, a bad object to stand as chunk ``seq``) for a corruption ``reason``."""
    app, sid = chunks.app, chunks.session_id
    good_prev = chunks.digests[seq - 1] if seq else None
    first_index = sum(len(b) for b in chunks.batches[:seq])

    def chunk(header_overrides: dict[str, Any] | None = None, body: bytes = b'[1.0,"o","x"]\n') -> bytes:
        header = {**chunk_header(app, sid, seq, first_index, good_prev), **(header_overrides or {})}
        return gzip.compress(formats.dumps_line(header) + body, compresslevel=1, mtime=0)

    cases = {
        "wrong-session": lambda: (f"names {app}/OTHER", chunk({"session_id": "OTHER"})),
        "broken-chain": lambda: ("prev_chunk_sha256 is " + "0" * 64, chunk({"prev_chunk_sha256": "0" * 64})),
        "wrong-seq": lambda: ("header says seq 7", chunk({"seq": 7})),
        "event-index": lambda: ("first_event_index is 999", chunk({"first_event_index": 999})),
        "invalid-json": lambda: ("line 3: invalid JSON", chunk(body=b'[1.0,"o","x"]\n[1.0,"o",\n')),
        "invalid-event": lambda: ("line 2: [1]: stream must be one of", chunk(body=b'[1.0,"z","x"]\n')),
        "oversized-line": lambda: ("line 2 is longer than 1048576 bytes",
                                   chunk(body=b'[1.0,"o","' + b"y" * formats.MAX_LINE_BYTES + b'"]\n')),
        "invalid-header": lambda: ("header: format", chunk({"format": "nope"})),
        "truncated": lambda: ("line 3 is not newline-terminated", chunk(body=b'[1.0,"o","x"]\n[1.0,"o","x"]')),
        "invalid-gzip": lambda: ("not valid gzip", b"\x1f\x8b\x08\x00garbage-garbage-garbage"),
        # the classic bomb: 128 MiB of zeros (one endless "line") in about half a megabyte
        "gzip-bomb": lambda: ("decompresses to more than 67108864 bytes (gzip bomb); first oversized-line",
                              zeros_bomb()),
    }
    return cases[reason]()


def with_bad_chunk(chunks: StagedChunks, bad: bytes, seq: int = 1,
                   marker_lists_bad: bool = True) -> tuple[dict[int, bytes], dict[str, Any]]:
    """Objects and close marker of a session whose chunk ``seq`` is ``bad``, as a runner would have written it.

    The chunks after it chain to the bad object's hash and the marker lists the objects' hashes, unless
    ``marker_lists_bad`` is False (the object was altered after the runner recorded its hash).
    """
    blobs = dict(enumerate(chunks.blobs))
    blobs[seq] = bad
    prev = hashlib.sha256(bad).hexdigest() if marker_lists_bad else chunks.digests[seq]
    index = sum(len(b) for b in chunks.batches[:seq + 1])
    for later in range(seq + 1, len(chunks.blobs)):
        blobs[later] = formats.encode_chunk(chunk_header(chunks.app, chunks.session_id, later, index, prev),
                                            chunks.batches[later])
        prev = hashlib.sha256(blobs[later]).hexdigest()
        index += len(chunks.batches[later])
    marker = close_marker(chunks)
    digests = [hashlib.sha256(blobs[i]).hexdigest() for i in range(len(chunks.blobs))]
    if not marker_lists_bad:
        digests[seq] = chunks.digests[seq]
    marker["chunk_sha256"] = digests
    return blobs, marker


def atomic_moto_conditional_writes(monkeypatch: Any) -> None:
    """Make the in-process moto server check-and-write conditional requests atomically, as S3 does.

    moto (5.x) checks ``If-None-Match: *`` and then builds the object in a separate step, so two
    uploads completing at the same moment can both succeed; S3 guarantees that only the first does
    (the other gets 412 or 409). Object POSTs (multipart completion) and PUTs are serialized here for
    the duration of a test (``monkeypatch`` restores moto afterwards).
    """
    from moto.s3.responses import S3Response

    lock = threading.RLock()
    for name in ("_key_response_post", "put_object"):
        original = getattr(S3Response, name)

        @functools.wraps(original)
        def serialized(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            with lock:
                return _original(self, *args, **kwargs)

        monkeypatch.setattr(S3Response, name, serialized)


# ---------------------------------------------------------------- big sessions

@dataclass
class SyntheticSession:
    """What was staged by :func:`stage_synthetic`: enough to predict the filed log's summary exactly."""

    app: str
    session_id: str
    digests: list[str]
    events: int
    out_bytes: int
    body_sha256: Any  # hashlib object over header line + every event line
    body_size: int


def _gzip_member(header_line: bytes, body: bytes, body_deflate: bytes, level: int = 1) -> bytes:
    """One gzip member of ``header_line + body``, reusing ``body``'s raw deflate stream.

    The header line is deflated and followed by a full flush (which resets the compressor, so what
    follows does not depend on it); the body's stream, made once by a fresh compressor, is appended.
    """
    comp = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = comp.compress(header_line) + comp.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(body, zlib.crc32(header_line))
    size = (len(header_line) + len(body)) & 0xFFFFFFFF
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + head + body_deflate + struct.pack("<II", crc, size)


def stage_synthetic(bucket: str, app: str, session_id: str, total_bytes: int, chunk_bytes: int = 1 << 20,
                    seed: int = 7, compresslevel: int = 1) -> SyntheticSession:
    """Stage a session of about ``total_bytes`` of event lines (terminal-like text, some non-ASCII).

    For speed every chunk carries the same ~``chunk_bytes`` of events (compressed once); the chunks
    differ in their headers (seq, hash chain, first event index), which is all the assembler checks
    across chunks.
    """
    import random

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(2000)] + ["caf\u00e9", "\u20ac", "\u2713", "na\u00efve", "\U0001f680"]
    lines = []
    size = out_bytes = 0
    micros = 0
    while size < chunk_bytes:
        text = " ".join(rng.choice(words) for _ in range(rng.choice([6, 30, 160, 600]))) + "\r\n"
        micros += rng.randint(1, 5000)
        line = b'[%d.%06d,"o",%s]\n' % (micros // 1_000_000, micros % 1_000_000,
                                         json.dumps(text, ensure_ascii=False).encode("utf-8"))
        lines.append(line)
        size += len(line)
        out_bytes += len(text.encode("utf-8"))
    body = b"".join(lines)
    comp = zlib.compressobj(compresslevel, zlib.DEFLATED, -zlib.MAX_WBITS)
    body_deflate = comp.compress(body) + comp.flush()
    per_chunk = len(lines)
    count = -(-total_bytes // len(body))

    header = session_header(app, session_id)
    put(bucket, keys.opened_key(app, session_id), json.dumps(header).encode())
    header_line = formats.dumps_line({"type": "header", **header, "format": "oneoff-audit.log"})
    body_sha = hashlib.sha256(header_line)
    digests: list[str] = []
    prev = None
    for seq in range(count):
        blob = _gzip_member(formats.dumps_line(chunk_header(app, session_id, seq, seq * per_chunk, prev)),
                            body, body_deflate, compresslevel)
        put(bucket, keys.chunk_key(app, session_id, seq), blob)
        body_sha.update(body)
        prev = hashlib.sha256(blob).hexdigest()
        digests.append(prev)
    marker = {"format": "oneoff-audit.close", "version": 1, "session_id": session_id, "app": app,
              "ended_at": ENDED_AT, "exit": {"code": 0, "signal": None}, "status": "succeeded", "reason": None,
              "chunk_count": count, "chunk_sha256": digests, "event_count": count * per_chunk,
              "bytes": {"i": 0, "o": count * out_bytes, "e": 0}, "withheld_input_bytes": 0, "lost_bytes": 0}
    put(bucket, keys.closed_key(app, session_id), json.dumps(marker).encode())
    return SyntheticSession(app, session_id, digests, count * per_chunk, count * out_bytes, body_sha,
                            len(header_line) + count * len(body))


def expected_trailer_line(staged: SyntheticSession, filed_at: str) -> bytes:
    """The trailer line the assembler must write for a complete synthetic session."""
    n = len(staged.digests)
    return formats.dumps_line({
        "type": "trailer", "session_id": staged.session_id, "app": staged.app, "ended_at": ENDED_AT,
        "exit": {"code": 0, "signal": None}, "status": "succeeded", "reason": None, "duration": 90.5,
        "bytes": {"i": 0, "o": staged.out_bytes, "e": 0},
        "events": {"i": 0, "o": staged.events, "e": 0, "r": 0, "m": 0}, "event_count": staged.events,
        "chunk_count": n, "expected_chunk_count": n, "chain_sha256": staged.digests[-1], "complete": True,
        "gaps": {"missing": [], "corrupt": []}, "withheld_input_bytes": 0, "lost_bytes": 0, "filed_at": filed_at,
    })


# ---------------------------------------------------------------- without S3

class MemoryReader:
    """A chunk reader over a dict of objects, handing out pieces of random (seeded) size."""

    def __init__(self, blobs: dict[int, bytes], seed: int = 0, app: str = "billing.api",
                 session_id: str = "01JDQ4W3ZC8N7R6T5Y4X3W2V1A") -> None:
        import random

        self.blobs = dict(blobs)
        self.rng = random.Random(seed)
        self.reads: list[int] = []
        self.prefix = keys.session_prefix(app, session_id)

    def staged(self) -> dict[int, Any]:
        """The listing the assembler would get: StagedChunk per seq."""
        from oneoff_audit.staging import StagedChunk

        return {seq: StagedChunk(seq, f"{self.prefix}chunks/{seq:08d}.gz", len(b), f'"{seq}"')
                for seq, b in self.blobs.items()}

    def read_chunk(self, chunk: Any) -> Iterator[bytes]:
        self.reads.append(chunk.seq)
        data = self.blobs[chunk.seq]
        pos = 0
        while pos < len(data):
            step = self.rng.choice([1, 7, 100, 4096, 65536, 1 << 20])
            yield data[pos:pos + step]
            pos += step


def sample_batches(n: int, per: int = 3) -> list[list[list[Any]]]:
    """``n`` chunks' worth of events: text lines, a character split across events, stdin, a resize."""
    out = []
    t = 0.0
    for seq in range(n):
        texts: list[bytes | str] = [f"chunk {seq} line {i}\r\n" for i in range(per)]
        texts += ["caf\u00e9 ", "\u20ac".encode()[:2]]
        events = output_events(texts, start=t)
        events.append([events[-1][0], "i", "ls -l\r"])
        events.append([events[-1][0], "r", "120x40"])
        t = events[-1][0]
        out.append(events)
    return out
