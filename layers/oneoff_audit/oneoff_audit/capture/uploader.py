"""Background upload of staging objects: bounded memory, backoff with jitter, spooling, never blocking.

The chunk writer calls :meth:`Uploader.submit` with each encoded object. It returns at once:

* the object is kept in memory when the memory budget (``queue_bytes``) allows, else
* it is written to the session's spool directory (atomic file), else
* ``submit`` returns False: it could be stored nowhere (the caller records a capture gap).

Worker threads take objects in order and PUT them, retrying each failure after an exponential
backoff with jitter (so the relay never waits for S3, and a recovering S3 is not hammered). The
session header (``opened.json``) goes first: no chunk is uploaded before it is durable. When the
session ends, :meth:`Uploader.finish` gives the workers until a deadline; whatever is still not in
S3 is reported, so the agent spools it with the close marker (``flush-spool`` puts it later).
"""

from __future__ import annotations

import base64
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oneoff_audit.capture.spool import SessionSpool, SpoolError


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with "equal jitter": half of each delay is fixed, half random, capped."""

    base: float = 0.25
    cap: float = 20.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1 = first failure)."""
        ceiling = min(self.cap, self.base * (2 ** min(max(attempt - 1, 0), 30)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def put_object(s3: Any, bucket: str, key: str, body: bytes, sha256: bytes | None = None) -> None:
    """One PUT of a staging object (the client makes one attempt; the caller retries).

    With ``sha256`` (the body's digest, which the chunk writer computes anyway for the hash chain)
    S3 checks the body against it (``x-amz-checksum-sha256``) and botocore does not hash the body a
    second time for its default CRC32 checksum.
    """
    if sha256 is None:
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    else:
        s3.put_object(Bucket=bucket, Key=key, Body=body, ChecksumSHA256=base64.b64encode(sha256).decode())


def put_with_retry(
    s3: Any,
    bucket: str,
    key: str,
    body: bytes,
    *,
    deadline: float,
    retry: RetryPolicy,
    on_error: Callable[[str, BaseException, int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """PUT with backoff until it succeeds (True) or the next attempt would start after ``deadline``."""
    attempt = 0
    while True:
        try:
            put_object(s3, bucket, key, body)
            return True
        except Exception as err:
            attempt += 1
            if on_error is not None:
                on_error(key, err, attempt)
            delay = retry.delay(attempt)
            if clock() + delay > deadline:
                return False
            time.sleep(delay)


@dataclass
class Item:
    """One object to upload, held in memory (``data``) or in the spool (``path``)."""

    name: str  # path inside the session's staging folder: opened.json, chunks/NNNNNNNN.gz, closed.json
    key: str
    size: int
    data: bytes | None = None
    path: Path | None = None
    first: bool = False
    sha256: bytes | None = None  # digest of the body, when the producer knows it

    def body(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


class Uploader:
    """Upload workers with a memory budget, spooling and bounded retries."""

    def __init__(
        self,
        s3: Any,
        bucket: str,
        *,
        queue_bytes: int,
        spool: SessionSpool | None,
        workers: int = 4,
        retry: RetryPolicy | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self._s3 = s3
        self.bucket = bucket
        self.queue_bytes = queue_bytes
        self.spool = spool
        self.retry = retry or RetryPolicy()
        self._log = log or (lambda _msg: None)
        self._cond = threading.Condition()
        self._items: deque[Item] = deque()
        self._inflight: list[Item] = []
        self._failed: list[Item] = []
        self._mem = 0
        self._gate_open = True  # closed while the session header is not yet durable
        self._stopping = False
        self._deadline: float | None = None
        self._wake = threading.Event()
        self._hurry = threading.Event()
        self._hurried_at: float | None = None
        self._threads = [threading.Thread(target=self._work, name=f"oneoff-audit-upload-{n}", daemon=True)
                         for n in range(max(1, workers))]
        self.uploaded = 0
        self.spooled = 0
        self.errors = 0
        self.last_error: str | None = None
        self._failing = False

    # ------------------------------------------------------------ producer side

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def memory_bytes(self) -> int:
        """Bytes of objects held in memory, waiting for or in upload."""
        return self._mem

    def submit(self, name: str, key: str, data: bytes, *, first: bool = False, force_memory: bool = False,
               sha256: bytes | None = None) -> bool:
        """Queue an object without waiting: in memory if the budget allows, else spooled; False if neither."""
        size = len(data)
        with self._cond:
            if force_memory or first or self._mem + size <= self.queue_bytes:
                self._mem += size
                self._enqueue(Item(name, key, size, data=data, first=first, sha256=sha256))
                return True
        if self.spool is None:
            return False
        try:
            path = self.spool.write(name, data)
        except SpoolError as err:
            self._log(f"cannot spool {name}: {err}")
            return False
        with self._cond:
            self.spooled += 1
            self._enqueue(Item(name, key, size, path=path, first=first, sha256=sha256))
        return True

    def _enqueue(self, item: Item) -> None:
        if item.first:
            self._gate_open = False
            self._items.appendleft(item)
        else:
            self._items.append(item)
        self._cond.notify()

    # ------------------------------------------------------------ workers

    def _next(self) -> Item | None:
        with self._cond:
            while True:
                if self._items and (self._gate_open or self._items[0].first):
                    item = self._items.popleft()
                    self._inflight.append(item)
                    return item
                if self._stopping and not self._items:
                    return None
                self._cond.wait()

    def _work(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            ok = self._upload(item)
            if ok and item.path is not None and self.spool is not None:
                self.spool.remove(item.path)  # before it counts as done: a finished uploader leaves no file
            with self._cond:
                if item in self._inflight:
                    self._inflight.remove(item)
                if ok:
                    self.uploaded += 1
                    if self._failing:
                        self._failing = False
                        self._log("S3 uploads work again")
                    if item.data is not None:
                        self._mem -= item.size
                else:
                    self._failed.append(item)
                if item.first:
                    self._gate_open = True
                self._cond.notify_all()

    def _upload(self, item: Item) -> bool:
        attempt = 0
        while True:
            deadline = self._deadline
            if deadline is not None and time.monotonic() >= deadline:
                return False
            try:
                put_object(self._s3, self.bucket, item.key, item.body(), item.sha256)
                return True
            except Exception as err:
                attempt += 1
                self._note_error(item, err, attempt)
            delay = self.retry.delay(attempt)
            deadline = self._deadline
            if deadline is not None and time.monotonic() + delay > deadline:
                return False
            if deadline is None:
                # While the session runs, back off; when it ends (finish() sets _wake), try again at once.
                self._wake.wait(delay)
            else:
                self._hurry.wait(delay)

    def _note_error(self, item: Item, err: BaseException, attempt: int) -> None:
        with self._cond:
            self.errors += 1
            self.last_error = f"{type(err).__name__}: {err}"
            first = not self._failing
            self._failing = True
        if first or attempt == 1:
            self._log(f"upload of {item.name} failed (attempt {attempt}): {self.last_error}")

    # ------------------------------------------------------------ end of session

    def finish(self, timeout: float) -> list[Item]:
        """Let the workers drain until ``timeout`` seconds from now; return the items not in S3."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._deadline = deadline if self._deadline is None else min(deadline, self._deadline)
            self._stopping = True
            self._cond.notify_all()
        self._wake.set()
        # In-flight HTTP calls may outlive the deadline by a connect timeout: wait a little for them.
        end = deadline + 5
        with self._cond:
            while self._items or self._inflight:
                now = time.monotonic()
                if self._hurried_at is not None:
                    end = min(end, self._hurried_at + 1)
                if now >= end:
                    break
                self._cond.wait(end - now)
            left = [*self._failed, *self._inflight, *self._items]
            self._items.clear()
            self._failed = []
            self._inflight = []
            return left

    @property
    def hurried(self) -> bool:
        return self._hurried_at is not None

    def hurry(self) -> None:
        """Stop retrying now (the user interrupted the final wait): what is not in S3 will be spooled."""
        with self._cond:
            self._hurried_at = time.monotonic()
            self._deadline = self._hurried_at
            self._cond.notify_all()
        self._wake.set()
        self._hurry.set()

    def put_now(self, key: str, data: bytes, timeout: float) -> bool:
        """PUT one object on the calling thread, retrying with backoff for at most ``timeout`` seconds."""
        return put_with_retry(
            self._s3, self.bucket, key, data, deadline=time.monotonic() + timeout, retry=self.retry,
            on_error=lambda k, e, n: self._log(f"PUT {k} failed (attempt {n}): {type(e).__name__}: {e}"),
        )
