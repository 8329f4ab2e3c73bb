"""Reading one session's staging folder from S3: listing, the two small markers, and chunk bodies.

Everything here is untrusted input written by a runner. The markers are size-capped and validated
against their schemas; chunk objects are streamed in pieces (never loaded whole), and a body read
that breaks mid-way is resumed with a ranged GET pinned to the same ETag, so a flaky connection
costs a retry of the rest of one object, not of the whole session.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from botocore import exceptions as boto_errors
from botocore.exceptions import ClientError
from urllib3.exceptions import ProtocolError

from oneoff_audit import formats, keys
from oneoff_audit.aws import client, is_not_found, is_precondition_failed
from oneoff_audit.errors import FormatError, InvalidIdError, NotFoundError, RetryLaterError

READ_SIZE = 1 << 20
STREAM_RESUMES = 3
_STREAM_ERRORS = (boto_errors.IncompleteReadError, boto_errors.ReadTimeoutError, boto_errors.ResponseStreamingError,
                  boto_errors.ConnectionError, ProtocolError)


@dataclass(frozen=True)
class StagedChunk:
    """One chunk object as listed: its key, size and ETag (the ETag pins later reads to this content)."""

    seq: int
    key: str
    size: int
    etag: str


@dataclass
class StagedSession:
    """What a session's staging folder holds at one moment."""

    app: str
    session_id: str
    prefix: str
    opened_key: str | None = None
    closed_key: str | None = None
    chunks: dict[int, StagedChunk] = field(default_factory=dict)
    other_keys: list[str] = field(default_factory=list)
    newest: datetime | None = None

    @property
    def empty(self) -> bool:
        """True if nothing at all is staged for this session."""
        return self.opened_key is None and self.closed_key is None and not self.chunks and not self.other_keys


class StagingChangedError(RetryLaterError):
    """A staged object changed or vanished while a session was being assembled."""


class ChunkReader(Protocol):
    """Yields the raw (gzip) bytes of a staged chunk in pieces."""

    def read_chunk(self, chunk: StagedChunk) -> Iterator[bytes]:
        """Raw pieces of ``chunk``; raises RetryLaterError if the object changed or vanished."""
        ...


def list_session(bucket: str, app: str, session_id: str, staging_prefix: str) -> StagedSession:
    """List every object under the session's staging folder."""
    prefix = keys.session_prefix(app, session_id, staging_prefix)
    session = StagedSession(app, session_id, prefix)
    paginator = client("s3").get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            modified = obj["LastModified"]
            if session.newest is None or modified > session.newest:
                session.newest = modified
            try:
                parsed = keys.parse_staging_key(key, staging_prefix)
            except InvalidIdError:
                session.other_keys.append(key)
                continue
            if parsed.kind == "opened":
                session.opened_key = key
            elif parsed.kind == "closed":
                session.closed_key = key
            else:
                assert parsed.seq is not None
                session.chunks[parsed.seq] = StagedChunk(parsed.seq, key, int(obj["Size"]), obj["ETag"])
    return session


def read_small_object(bucket: str, key: str, max_bytes: int, what: str) -> bytes:
    """Read a small object whole, refusing one larger than ``max_bytes`` before reading it."""
    try:
        response = client("s3").get_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if is_not_found(err):
            raise NotFoundError(f"{what} {key} not found") from err
        raise
    body = response["Body"]
    with contextlib.closing(body):
        if int(response.get("ContentLength", 0)) > max_bytes:
            raise FormatError(what, "", f"larger than {max_bytes} bytes")
        data = body.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FormatError(what, "", f"larger than {max_bytes} bytes")
    return data


def load_opened(bucket: str, session: StagedSession) -> dict[str, Any]:
    """The session header (``opened.json``), validated and checked to name this session."""
    if session.opened_key is None:
        raise NotFoundError(f"{session.prefix}{keys.OPENED} not found")
    where = f"{session.prefix}{keys.OPENED}"
    raw = read_small_object(bucket, session.opened_key, formats.MAX_OPENED_BYTES, where)
    doc = formats.read_json_object(raw, "session-header", where, formats.MAX_OPENED_BYTES)
    _check_names(doc, session, where)
    formats.parse_time(doc["started_at"], where, "started_at")
    return doc


def load_closed(bucket: str, session: StagedSession) -> dict[str, Any] | None:
    """The close marker (``closed.json``) validated, or None if the session has none."""
    if session.closed_key is None:
        return None
    where = f"{session.prefix}{keys.CLOSED}"
    try:
        raw = read_small_object(bucket, session.closed_key, formats.MAX_CLOSED_BYTES, where)
    except NotFoundError:
        return None
    doc = formats.read_json_object(raw, "close-marker", where, formats.MAX_CLOSED_BYTES)
    _check_names(doc, session, where)
    formats.parse_time(doc["ended_at"], where, "ended_at")
    if doc["chunk_count"] != len(doc["chunk_sha256"]):
        raise FormatError(where, "chunk_sha256", f"lists {len(doc['chunk_sha256'])} digests for "
                                                 f"chunk_count {doc['chunk_count']}")
    return doc


def _check_names(doc: dict[str, Any], session: StagedSession, where: str) -> None:
    if doc["app"] != session.app:
        raise FormatError(where, "app", f"names app {doc['app']!r}, not {session.app!r}")
    if doc["session_id"] != session.session_id:
        raise FormatError(where, "session_id", f"names session {doc['session_id']!r}, not {session.session_id!r}")


class S3ChunkReader:
    """Reads chunk objects from S3, pinned to the listed ETag, resumed after broken reads.

    S3 answers each GET only after a round trip, so reading one small chunk after another leaves
    the assembler waiting most of the time. :meth:`expect` announces the order of the coming reads;
    up to ``prefetch`` objects of at most ``prefetch_max_bytes`` are then fetched ahead, concurrently,
    so at most ``prefetch * prefetch_max_bytes`` bytes wait in memory. Larger objects are streamed.
    """

    def __init__(self, bucket: str, read_size: int = READ_SIZE, prefetch: int = 6,
                 prefetch_max_bytes: int = 8 << 20) -> None:
        self.bucket = bucket
        self.read_size = read_size
        self.prefetch = prefetch
        self.prefetch_max_bytes = prefetch_max_bytes
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: deque[tuple[StagedChunk, Future[bytes]]] = deque()
        self._upcoming: deque[StagedChunk] = deque()

    def __enter__(self) -> S3ChunkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def expect(self, chunks: Iterable[StagedChunk]) -> None:
        """Announce the chunks the next reads will ask for, in order (replaces any earlier announcement)."""
        self._drop_ahead()
        self._upcoming = deque(chunks)
        self._fill()

    def close(self) -> None:
        """Drop prefetched data and stop the fetching threads."""
        self._drop_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _drop_ahead(self) -> None:
        for _, future in self._ahead:
            future.cancel()
        self._ahead.clear()
        self._upcoming.clear()

    def _fill(self) -> None:
        while len(self._ahead) < self.prefetch and self._upcoming:
            chunk = self._upcoming.popleft()
            if chunk.size > self.prefetch_max_bytes:
                self._upcoming.appendleft(chunk)  # streamed when its turn comes; nothing is fetched past it
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.prefetch, thread_name_prefix="chunk-fetch")
            self._ahead.append((chunk, self._pool.submit(self._fetch, chunk)))

    def _fetch(self, chunk: StagedChunk) -> bytes:
        return b"".join(self._stream(chunk))

    def read_chunk(self, chunk: StagedChunk) -> Iterator[bytes]:
        """Raw pieces of the chunk object as listed; StagingChangedError if it changed or vanished."""
        if self._ahead and self._ahead[0][0] == chunk:
            future = self._ahead.popleft()[1]
            self._fill()
            data = future.result()
            for start in range(0, len(data), self.read_size):
                yield data[start:start + self.read_size]
            return
        if self._upcoming and self._upcoming[0] == chunk:
            self._upcoming.popleft()
            yield from self._stream(chunk)
            self._fill()
            return
        yield from self._stream(chunk)

    def _stream(self, chunk: StagedChunk) -> Iterator[bytes]:
        offset = 0
        resumes = 0
        while True:
            request: dict[str, Any] = {"Bucket": self.bucket, "Key": chunk.key, "IfMatch": chunk.etag}
            if offset:
                request["Range"] = f"bytes={offset}-"
            try:
                body = client("s3").get_object(**request)["Body"]
            except ClientError as err:
                if is_not_found(err) or is_precondition_failed(err):
                    raise StagingChangedError(f"{chunk.key} changed or vanished while being assembled") from err
                raise
            try:
                with contextlib.closing(body):
                    while piece := body.read(self.read_size):
                        offset += len(piece)
                        yield piece
                return
            except _STREAM_ERRORS:
                resumes += 1
                if resumes > STREAM_RESUMES or offset >= chunk.size:
                    raise
