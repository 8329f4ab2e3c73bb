"""The on-disk spool: staging objects that could not reach S3 yet, and ``flush-spool``.

Layout (one directory per session, files named like their staging keys)::

    <spool>/<app>/<session>/.lock              flock held by the agent recording the session
    <spool>/<app>/<session>/meta.json          {"bucket", "staging_prefix", "app", "session_id"}
    <spool>/<app>/<session>/opened.json
    <spool>/<app>/<session>/chunks/<seq:08d>.gz
    <spool>/<app>/<session>/closed.json        only written once every chunk is in S3 or here

Files are written atomically (temporary file, fsync, rename) with mode 0600, so a crash never
leaves a torn object. A size cap (``max_bytes``) bounds the disk used; when a write would pass it,
or the disk refuses it, :class:`SpoolError` is raised and the caller counts the bytes as lost.

Flushing (``flush-spool``, and every ``record`` in the background when it starts) uploads each
unlocked session in order: ``opened.json``, the chunks by sequence number, and ``closed.json`` last,
only when no chunk of the session is left in the spool. Each file is validated before upload and
deleted only after S3 accepted it. A chunk damaged on disk is reported and uploaded as it is (the
close marker's digest marks it corrupt and the assembler keeps its bytes); a damaged header or
close marker is reported and stays.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oneoff_audit import formats, keys
from oneoff_audit.errors import OneoffAuditError

LOCK_NAME = ".lock"
META_NAME = "meta.json"
CHUNKS_DIR = "chunks"
DEFAULT_MAX_BYTES = 1 << 30


class SpoolError(OneoffAuditError):
    """The spool cannot take an object (over its size cap, or the disk refused the write)."""


def default_spool_dir() -> Path:
    """``$XDG_STATE_HOME/oneoff-audit/spool`` (``~/.local/state/...`` when unset)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "oneoff-audit" / "spool"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file, or all of the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def lock_session_dir(directory: Path) -> int | None:
    """Create ``directory`` and take its lock without waiting; the lock fd, or None if another holds it.

    The lock file may be unlinked by a flusher that empties the directory, so after locking we check
    that the file we locked is still the one at the path, and retry otherwise.
    """
    while True:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:  # a flusher removed the emptied directory meanwhile: create it again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(directory / LOCK_NAME).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


class Spool:
    """A spool directory with a size cap shared by the sessions written through this object."""

    def __init__(self, root: Path | str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._used: int | None = None

    @property
    def used(self) -> int:
        """Bytes in the spool (measured once, then tracked; approximate when agents share it)."""
        with self._lock:
            if self._used is None:
                self._used = _tree_size(self.root) if self.root.is_dir() else 0
            return self._used

    def reserve(self, size: int, *, force: bool = False) -> None:
        """Account for ``size`` new bytes, or raise SpoolError when they would pass the cap."""
        used = self.used
        with self._lock:
            if not force and used + size > self.max_bytes:
                raise SpoolError(f"spool {self.root} is full ({used} of {self.max_bytes} bytes used)")
            self._used = used + size

    def release(self, size: int) -> None:
        """Account for ``size`` bytes removed."""
        with self._lock:
            if self._used is not None:
                self._used = max(0, self._used - size)

    def session(self, bucket: str, staging_prefix: str, app: str, session_id: str) -> SessionSpool:
        """The spool of one session (its directory is created and locked on the first write)."""
        return SessionSpool(self, bucket, staging_prefix, app, session_id)

    def session_dirs(self) -> list[Path]:
        """Session directories present in the spool, oldest session id first."""
        if not self.root.is_dir():
            return []
        found = []
        for app_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()):
            found.extend(sorted(p for p in app_dir.iterdir() if p.is_dir() and not p.is_symlink()))
        return sorted(found, key=lambda p: p.name)


class SessionSpool:
    """Spooled objects of one session, written by the agent that records it (which holds the lock)."""

    def __init__(self, spool: Spool, bucket: str, staging_prefix: str, app: str, session_id: str) -> None:
        keys.session_prefix(app, session_id, staging_prefix)  # validates all three
        self.spool = spool
        self.meta = {"bucket": bucket, "staging_prefix": staging_prefix, "app": app, "session_id": session_id}
        self.dir = spool.root / app / session_id
        self._lock_fd: int | None = None
        self._guard = threading.Lock()

    def _ensure_locked(self) -> None:
        if self._lock_fd is not None:
            return
        fd = lock_session_dir(self.dir)
        if fd is None:
            raise SpoolError(f"spool directory {self.dir} is locked by another process")
        self._lock_fd = fd
        try:
            (self.dir / CHUNKS_DIR).mkdir(exist_ok=True, mode=0o700)
            meta = self.dir / META_NAME
            if not meta.exists():
                write_atomic(meta, json.dumps(self.meta).encode())
        except OSError:
            self.close()
            raise

    def write(self, name: str, data: bytes, *, force: bool = False) -> Path:
        """Store one object (``opened.json``, ``chunks/NNNNNNNN.gz``, ``closed.json``); raises SpoolError."""
        self.spool.reserve(len(data), force=force)
        try:
            with self._guard:
                self._ensure_locked()
                path = self.dir / name
                write_atomic(path, data)
            return path
        except OSError as err:
            self.spool.release(len(data))
            raise SpoolError(f"cannot write {self.dir / name}: {err.strerror or err}") from err

    def remove(self, path: Path) -> None:
        """Delete a spooled object once it is in S3."""
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        self.spool.release(size)

    def pending(self) -> list[str]:
        """Names of the objects still spooled for this session."""
        if not self.dir.is_dir():
            return []
        names = [n for n in ("opened.json", "closed.json") if (self.dir / n).exists()]
        chunk_dir = self.dir / CHUNKS_DIR
        if chunk_dir.is_dir():
            names.extend(f"{CHUNKS_DIR}/{p.name}" for p in sorted(chunk_dir.glob("*.gz")))
        return names

    def close(self) -> None:
        """Release the lock, removing the directory if nothing is left in it."""
        with self._guard:
            if self._lock_fd is None:
                return
            _cleanup_if_empty(self.dir)
            os.close(self._lock_fd)
            self._lock_fd = None


def _cleanup_if_empty(directory: Path) -> None:
    """Remove an emptied session directory (caller holds its lock); keeps it if anything is left."""
    chunk_dir = directory / CHUNKS_DIR
    for stale in [*directory.glob(".*.tmp"), *chunk_dir.glob(".*.tmp")]:  # torn writes of a crashed agent
        with contextlib.suppress(OSError):
            stale.unlink()
    if chunk_dir.is_dir() and any(chunk_dir.iterdir()):
        return
    if any((directory / n).exists() for n in ("opened.json", "closed.json")):
        return
    for path in (directory / META_NAME, directory / LOCK_NAME):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    for path in (chunk_dir, directory, directory.parent):
        try:
            path.rmdir()
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                raise
            if err.errno != errno.ENOENT:
                return


# ---------------------------------------------------------------- flush


@dataclass
class FlushResult:
    """What a flush did."""

    uploaded: list[str] = field(default_factory=list)  # S3 keys
    sessions_done: list[str] = field(default_factory=list)  # app/session fully flushed
    sessions_left: list[str] = field(default_factory=list)  # app/session with files still spooled
    busy: list[str] = field(default_factory=list)  # locked by a running agent
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.sessions_left and not self.errors


def _read_meta(directory: Path) -> dict[str, str]:
    raw = (directory / META_NAME).read_bytes()
    meta = formats.parse_json(raw, str(directory / META_NAME), max_bytes=4096)
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), str) for k in
                                             ("bucket", "staging_prefix", "app", "session_id")):
        raise SpoolError(f"{directory / META_NAME}: not a spool meta file")
    keys.session_prefix(meta["app"], meta["session_id"], meta["staging_prefix"])
    if directory.name != meta["session_id"] or directory.parent.name != meta["app"]:
        raise SpoolError(f"{directory}: meta.json names another session")
    return meta


def _check_object(name: str, raw: bytes, meta: dict[str, str]) -> None:
    """Validate a spooled object against its format and its session before it is uploaded."""
    where = f"spooled {meta['app']}/{meta['session_id']}/{name}"
    if name == "opened.json":
        obj = formats.read_json_object(raw, "session-header", where, formats.MAX_OPENED_BYTES)
    elif name == "closed.json":
        obj = formats.read_json_object(raw, "close-marker", where, formats.MAX_CLOSED_BYTES)
    else:
        obj, _events = formats.read_chunk(raw, where)
        if f"{CHUNKS_DIR}/{obj['seq']:08d}.gz" != name:
            raise SpoolError(f"{where}: header says seq {obj['seq']}")
    if obj["app"] != meta["app"] or obj["session_id"] != meta["session_id"]:
        raise SpoolError(f"{where}: belongs to {obj['app']}/{obj['session_id']}")


def _session_files(directory: Path) -> Iterator[str]:
    if (directory / "opened.json").exists():
        yield "opened.json"
    chunk_dir = directory / CHUNKS_DIR
    if chunk_dir.is_dir():
        for path in sorted(chunk_dir.iterdir()):
            if path.name.endswith(".gz") and not path.name.startswith("."):
                yield f"{CHUNKS_DIR}/{path.name}"
    if (directory / "closed.json").exists():
        yield "closed.json"


def _key_for(name: str, meta: dict[str, str]) -> str:
    app, sid, prefix = meta["app"], meta["session_id"], meta["staging_prefix"]
    if name == "opened.json":
        return keys.opened_key(app, sid, prefix)
    if name == "closed.json":
        return keys.closed_key(app, sid, prefix)
    parsed = keys.parse_staging_key(keys.session_prefix(app, sid, prefix) + name, prefix)
    assert parsed.seq is not None
    return keys.chunk_key(app, sid, parsed.seq, prefix)


def flush_session(
    directory: Path,
    upload: Callable[[str, str, bytes], bool],
    spool: Spool | None = None,
    result: FlushResult | None = None,
) -> FlushResult:
    """Upload one spooled session in order (``upload(bucket, key, body) -> bool``), deleting what S3 took.

    ``closed.json`` is uploaded only when no chunk of the session remains in the spool. The session is
    skipped while another process (the agent recording it) holds its lock.
    """
    result = result if result is not None else FlushResult()
    label = f"{directory.parent.name}/{directory.name}"
    fd = lock_session_dir(directory)
    if fd is None:
        result.busy.append(label)
        return result
    try:
        if not (directory / META_NAME).exists():
            if any(_session_files(directory)):
                result.errors.append(f"{label}: spooled files without meta.json")
                result.sessions_left.append(label)
            else:
                _cleanup_if_empty(directory)
            return result
        meta = _read_meta(directory)
        for name in _session_files(directory):
            path = directory / name
            if name == "closed.json" and any(n.startswith(CHUNKS_DIR) for n in _session_files(directory)):
                break  # a chunk is still here: the close marker must wait for it
            raw = path.read_bytes()
            try:
                _check_object(name, raw, meta)
            except OneoffAuditError as err:
                result.errors.append(f"{label}/{name}: damaged in the spool: {err}")
                if not name.startswith(CHUNKS_DIR):
                    break  # a damaged header or close marker stays here; nothing after it is uploaded
                # A damaged chunk is uploaded as it is: the close marker's digest shows it corrupt, the
                # assembler keeps its bytes, and the intact chunks after it are not stranded here.
            key = _key_for(name, meta)
            if not upload(meta["bucket"], key, raw):
                break
            path.unlink()
            if spool is not None:
                spool.release(len(raw))
            result.uploaded.append(key)
        if any(_session_files(directory)):
            result.sessions_left.append(label)
        else:
            result.sessions_done.append(label)
            _cleanup_if_empty(directory)
    except (OSError, OneoffAuditError) as err:
        result.errors.append(f"{label}: {err}")
        result.sessions_left.append(label)
    finally:
        os.close(fd)
    return result


def flush_spool(
    spool: Spool,
    s3: Any,
    *,
    timeout: float,
    retry: Any = None,
    skip: set[Path] | None = None,
    log: Callable[[str], None] | None = None,
) -> FlushResult:
    """Upload every unlocked spooled session (``flush-spool``; ``record`` runs it in the background)."""
    from oneoff_audit.capture.uploader import RetryPolicy, put_with_retry

    retry = retry or RetryPolicy()
    deadline = time.monotonic() + timeout
    log = log or (lambda _msg: None)

    def upload(bucket: str, key: str, body: bytes) -> bool:
        return put_with_retry(s3, bucket, key, body, deadline=deadline, retry=retry,
                              on_error=lambda k, e, n: log(f"flush: PUT {k} failed (attempt {n}): {e}"))

    result = FlushResult()
    for directory in spool.session_dirs():
        if skip and directory in skip:
            continue
        if time.monotonic() >= deadline:
            result.sessions_left.append(f"{directory.parent.name}/{directory.name}")
            continue
        flush_session(directory, upload, spool, result)
    for line in result.errors:
        log(f"flush: {line}")
    return result
