"""A streaming S3 multipart upload that is completed only if the key does not exist yet.

Parts are hashed and uploaded by one background thread while the caller produces the next part, so
producing (parsing, encrypting) and sending overlap; at most ``3 * part_size`` bytes are held. The
SHA-256 (complete once :meth:`MultipartUpload.complete` returns) and size of everything written are
computed on the way. :meth:`MultipartUpload.complete`
sends ``If-None-Match: *``: if the key already exists the upload is aborted and
:class:`AlreadyExistsError` is raised, so an object is created exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from typing import Any

from botocore.exceptions import ClientError

from oneoff_audit.aws import client, is_precondition_failed, is_write_conflict

MIN_PART_SIZE = 8 << 20
MAX_PARTS = 10_000


class AlreadyExistsError(Exception):
    """The conditional completion found the key already there (another writer filed it first)."""


def part_size_for(expected_size: int, minimum: int = MIN_PART_SIZE) -> int:
    """A part size (whole MiB, at least ``minimum``) that fits ``expected_size`` into MAX_PARTS parts."""
    needed = -(-expected_size // (MAX_PARTS - 100))
    mib = 1 << 20
    return max(minimum, -(-needed // mib) * mib)


class MultipartUpload:
    """One multipart upload; use as a context manager so a failure aborts it."""

    def __init__(self, bucket: str, key: str, *, metadata: dict[str, str], content_type: str,
                 part_size: int = MIN_PART_SIZE, lock: dict[str, Any] | None = None) -> None:
        self.bucket = bucket
        self.key = key
        self.part_size = part_size
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._s3: Any = client("s3")
        self._buffer = bytearray(part_size)
        self._filled = 0
        self._parts: list[dict[str, Any]] = []
        self._queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._done = False
        self._sent = 0
        self._lock = dict(lock or {})
        self.upload_id: str = self._s3.create_multipart_upload(
            Bucket=bucket, Key=key, Metadata=metadata, ContentType=content_type, **(lock or {}),
        )["UploadId"]
        self._thread = threading.Thread(target=self._sender, name=f"upload-{key[-40:]}", daemon=True)
        self._thread.start()

    def __enter__(self) -> MultipartUpload:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._done:
            self.abort()

    def _sender(self) -> None:
        while (item := self._queue.get()) is not None:
            number, data = item
            if self._error is not None:
                continue  # drain: the caller will see the error
            self.sha256.update(data)  # here, off the producing thread (hashlib releases the GIL)
            try:
                etag = self._s3.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                            PartNumber=number, Body=data)["ETag"]
                self._parts.append({"PartNumber": number, "ETag": etag})
            except BaseException as err:  # handed to the producing thread
                self._error = err

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, data: bytes) -> None:
        """Append ``data``; full parts are handed to the sender thread."""
        self._raise_pending()
        self.size += len(data)
        view = memoryview(data)
        while view:
            take = min(len(view), self.part_size - self._filled)
            self._buffer[self._filled:self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == self.part_size:
                self._send(bytes(self._buffer))
                self._filled = 0

    def _send(self, data: bytes) -> None:
        self._sent += 1
        number = self._sent
        if number > MAX_PARTS:
            raise ValueError(f"{self.key}: more than {MAX_PARTS} parts; use a larger part size")
        while True:
            self._raise_pending()
            try:
                self._queue.put((number, data), timeout=1)
                return
            except queue.Full:
                continue

    def _finish_sending(self) -> None:
        if self._filled or self._sent == 0:
            self._send(bytes(self._buffer[:self._filled]))
            self._filled = 0
        self._queue.put(None)
        self._thread.join()
        self._raise_pending()

    def complete(self) -> dict[str, Any]:
        """Upload the rest and complete with ``If-None-Match: *``; returns the S3 response.

        Raises AlreadyExistsError (after aborting this upload) if the key exists.
        """
        self._finish_sending()
        parts = sorted(self._parts, key=lambda p: p["PartNumber"])
        try:
            response: dict[str, Any] = self._s3.complete_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                MultipartUpload={"Parts": parts}, IfNoneMatch="*",
            )
        except ClientError as err:
            # 412: the key exists. 409 ConditionalRequestConflict: a concurrent write to the key is in
            # progress; either way another writer got there first (the caller checks what is there).
            if is_precondition_failed(err) or is_write_conflict(err):
                self.abort()
                raise AlreadyExistsError(self.key) from err
            raise
        self._done = True
        if self._lock and response.get("VersionId"):
            # S3 applies the retention given at CreateMultipartUpload; stating it again on the new version is a
            # no-op there (same date) and makes emulators that drop it (moto) hold the log too.
            self._s3.put_object_retention(
                Bucket=self.bucket, Key=self.key, VersionId=response["VersionId"],
                Retention={"Mode": self._lock["ObjectLockMode"],
                           "RetainUntilDate": self._lock["ObjectLockRetainUntilDate"]},
            )
        return response

    def abort(self) -> None:
        """Stop the sender and abort the upload (best effort: S3 lifecycle rules clean up the rest)."""
        if self._done:
            return
        self._done = True
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("upload aborted")
            while self._thread.is_alive():  # the sender drains without uploading once _error is set
                try:
                    self._queue.put(None, timeout=0.5)
                    break
                except queue.Full:
                    continue
            self._thread.join(timeout=300)
        with contextlib.suppress(ClientError):
            self._s3.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
