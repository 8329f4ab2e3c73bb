"""One recorded session, from the session header to the close marker.

Order of writes in ``staging/<app>/<session>/`` (see docs/CAPTURE.md):

1. ``opened.json`` (validated session header), queued first; no chunk is uploaded before it.
2. ``chunks/<seq:08d>.gz`` every ``chunk_bytes`` of data or ``chunk_seconds``, in the background.
3. ``closed.json`` (validated close marker) only after every chunk is durable in S3. When S3 is
   still unreachable at the end, the remaining chunks and then the close marker go to the spool,
   and ``flush-spool`` (or the next ``record``) puts them in that order.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import sys
import termios
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oneoff_audit import __version__, formats, keys
from oneoff_audit.capture.recorder import ChunkTotals, ChunkWriter, Recorder
from oneoff_audit.capture.relay import (
    ExitStatus,
    RawTerminal,
    Relay,
    SignalWaker,
    ensure_std_fds,
    get_winsize,
    has_controlling_terminal,
    set_nonblocking,
    set_winsize,
    spawn,
    tune_malloc,
)
from oneoff_audit.capture.spool import SessionSpool, Spool, SpoolError, flush_spool
from oneoff_audit.capture.uploader import RetryPolicy, Uploader
from oneoff_audit.codec import encode_bytes
from oneoff_audit.errors import FormatError

SESSION_FORMAT = "oneoff-audit.session"
CLOSE_FORMAT = "oneoff-audit.close"
DEFAULT_TERM_SIZE = (80, 24)


@dataclass
class RecordOptions:
    """Everything ``oneoff-audit record`` was asked to do."""

    app: str
    actor_id: str
    command: list[str]
    bucket: str
    staging_prefix: str = keys.DEFAULT_STAGING_PREFIX
    actor_name: str | None = None
    actor_type: str = "user"
    source_ip: str | None = None
    target: dict[str, str] = field(default_factory=dict)
    tty: str = "auto"  # auto | always | never
    session_id: str | None = None
    spool_dir: Path | None = None
    spool_max_bytes: int = 1 << 30
    chunk_bytes: int = 1 << 20
    chunk_seconds: float = 5.0
    queue_bytes: int = 4 << 20
    upload_workers: int = 2
    record_hidden_input: bool = False
    on_capture_failure: str = "continue"  # continue | terminate
    flush_timeout: float = 30.0
    retry_max_delay: float = 20.0
    flush_spool_on_start: bool = True
    log_file: Path | None = None


class Diagnostics:
    """The agent's own messages: a log file if given; stderr only for failures (each said once)."""

    def __init__(self, log_file: Path | None) -> None:
        self._file = open(log_file, "a", encoding="utf-8") if log_file else None  # noqa: SIM115
        self._said: set[str] = set()
        self._lock = threading.Lock()

    def log(self, message: str) -> None:
        if self._file is None:
            return
        with self._lock:
            self._file.write(f"{formats.format_time(formats.utc_now())} {message}\n")
            self._file.flush()

    def failure(self, message: str, once: str | None = None) -> None:
        """Say ``message`` on stderr (once per ``once`` key) and in the log."""
        self.log(message)
        with self._lock:
            if once is not None:
                if once in self._said:
                    return
                self._said.add(once)
        end = "\r\n" if os.isatty(2) else "\n"
        with contextlib.suppress(OSError):
            os.write(2, f"oneoff-audit: {message}{end}".encode(errors="replace"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _data_value(arg: str) -> Any:
    raw = os.fsencode(arg)
    values = encode_bytes(raw)
    if len(values) == 1:
        return values[0]
    if not values:
        return ""
    return {"b64": base64.b64encode(raw).decode("ascii")}


def session_header(opts: RecordOptions, session_id: str, *, tty: bool, term_size: tuple[int, int] | None,
                   env_keys: Sequence[str], started_at: str) -> dict[str, Any]:
    """The validated ``opened.json`` document."""
    header = {
        "format": SESSION_FORMAT,
        "version": 1,
        "session_id": session_id,
        "app": opts.app,
        "actor": {"id": opts.actor_id, "name": opts.actor_name, "type": opts.actor_type,
                  "source_ip": opts.source_ip},
        "command": {
            "argv": [_data_value(a) for a in opts.command],
            "tty": tty,
            "term_size": None if term_size is None else {"cols": term_size[0], "rows": term_size[1]},
            "env_keys": sorted(env_keys),
        },
        "target": dict(opts.target),
        "started_at": started_at,
        "agent": {"version": __version__, "hostname": socket.gethostname()[:255], "pid": os.getpid()},
        "options": {"record_hidden_input": opts.record_hidden_input, "chunk_max_bytes": opts.chunk_bytes,
                    "chunk_max_seconds": opts.chunk_seconds},
    }
    formats.validate(header, "session-header", "session header")
    size = len(formats.dumps_line(header))
    if size > formats.MAX_OPENED_BYTES:  # readers refuse bigger headers: the session would not be filed
        raise FormatError("session header", "command", f"{size} bytes, more than {formats.MAX_OPENED_BYTES}")
    return header


def close_marker(app: str, session_id: str, exit_status: ExitStatus, reason: str | None, totals: ChunkTotals,
                 withheld: int, ended_at: str) -> dict[str, Any]:
    """The validated ``closed.json`` document."""
    marker = {
        "format": CLOSE_FORMAT,
        "version": 1,
        "session_id": session_id,
        "app": app,
        "ended_at": ended_at,
        "exit": {"code": exit_status.code, "signal": exit_status.signal},
        "status": exit_status.status,
        "reason": reason[:1024] if reason else None,
        "chunk_count": len(totals.chunk_sha256),
        "chunk_sha256": list(totals.chunk_sha256),
        "event_count": totals.event_count,
        "bytes": dict(totals.data_bytes),
        "withheld_input_bytes": withheld,
        "lost_bytes": totals.lost_bytes,
    }
    return formats.validate(marker, "close-marker", "close marker")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Session:
    """One recording: spawn, relay, upload, close."""

    def __init__(self, opts: RecordOptions, s3: Any, diag: Diagnostics) -> None:
        self.opts = opts
        self.s3 = s3
        self.diag = diag
        self.session_id = keys.validate_session_id(opts.session_id) if opts.session_id else None
        self.relay: Relay | None = None
        self._failure_lock = threading.Lock()
        self._failing = False
        self._leftovers: threading.Thread | None = None

    # ------------------------------------------------------------ capture failure policy

    def _on_lost(self, _count: int) -> None:
        with self._failure_lock:
            first = not self._failing
            self._failing = True
        if self.opts.on_capture_failure == "terminate":
            reason = "terminated by oneoff-audit: recording failed (S3 unreachable and the spool full or not writable)"
            self.diag.failure(reason + "; ending the session", once="terminate")
            if self.relay is not None:
                self.relay.request_termination(reason)
        elif first:
            self.diag.failure(
                "recording failed: S3 unreachable and the spool full or not writable; the session continues, "
                "and the lost bytes will be marked in the log", once="continue")

    def _on_stored(self) -> None:
        with self._failure_lock:
            self._failing = False
        self.diag.log("recording works again; a capture-gap marker records the lost bytes")

    # ------------------------------------------------------------ run

    def run(self) -> int:
        opts = self.opts
        ensure_std_fds()
        # The relay thread blocks in read/poll; when it wakes it must get the GIL back quickly even if
        # an upload or encoder thread is running Python code (default hand-over interval: 5 ms).
        sys.setswitchinterval(0.0005)
        tune_malloc()
        session_id = self.session_id or keys.validate_session_id(_new_id())
        keys.session_prefix(opts.app, session_id, opts.staging_prefix)
        stdin_tty = os.isatty(0)
        interactive = opts.tty == "always" or (opts.tty == "auto" and stdin_tty)
        attached = not interactive and has_controlling_terminal()
        env = dict(os.environb)
        term_size: tuple[int, int] | None = None
        if interactive:
            term_size = next((s for s in (get_winsize(fd) for fd in (0, 1, 2)) if s and s != (0, 0)),
                             DEFAULT_TERM_SIZE)
        started = formats.utc_now()
        header = session_header(opts, session_id, tty=interactive, term_size=term_size,
                                env_keys=[os.fsdecode(k) for k in env], started_at=formats.format_time(started))

        spool = Spool(opts.spool_dir, opts.spool_max_bytes) if opts.spool_dir else None
        session_spool: SessionSpool | None = (
            spool.session(opts.bucket, opts.staging_prefix, opts.app, session_id) if spool else None)
        retry = RetryPolicy(cap=opts.retry_max_delay)
        uploader = Uploader(self.s3, opts.bucket, queue_bytes=opts.queue_bytes, spool=session_spool,
                            workers=opts.upload_workers, retry=retry, log=self.diag.log)
        writer = ChunkWriter(opts.app, session_id, opts.staging_prefix, uploader,
                             on_lost=self._on_lost, on_stored=self._on_stored)

        signals = [signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT]
        if interactive:
            signals.append(signal.SIGWINCH)
        waker = SignalWaker(signals)
        raw: RawTerminal | None = None
        to_close: list[int] = []
        try:
            argv = [os.fsencode(a) for a in opts.command]
            if interactive:
                master, slave = os.openpty()
                to_close.append(master)
                if stdin_tty:
                    raw = RawTerminal(0)
                    termios.tcsetattr(slave, termios.TCSANOW, raw.saved)
                assert term_size is not None
                set_winsize(slave, *term_size)
                t0 = time.monotonic()
                pid, exec_errno = spawn(argv, env, (slave, slave, slave), pty=True)
                os.close(slave)
                set_nonblocking(master)
                if raw is not None:
                    raw.enter()
                outputs = {master: (1, "o")}
                input_fd: int | None = master
            else:
                in_r, in_w = os.pipe()
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                t0 = time.monotonic()
                pid, exec_errno = spawn(argv, env, (in_r, out_w, err_w), pty=False, own_group=not attached)
                for fd in (in_r, out_w, err_w):
                    os.close(fd)
                for fd in (in_w, out_r, err_r):
                    set_nonblocking(fd)
                outputs = {out_r: (1, "o"), err_r: (2, "e")}
                input_fd = in_w
                master = None

            self.diag.log(f"session {opts.app}/{session_id}: started pid {pid} ({'pty' if interactive else 'pipes'})")
            # Threads start only now: the fork above happened in a single-threaded process.
            recorder = Recorder(writer.put, chunk_bytes=opts.chunk_bytes, chunk_seconds=opts.chunk_seconds, t0=t0)
            uploader.submit("opened.json", keys.opened_key(opts.app, session_id, opts.staging_prefix),
                            formats.dumps_line(header), first=True)
            uploader.start()
            writer.start()
            if spool is not None and opts.flush_spool_on_start:
                self._flush_leftovers_in_background(spool, session_spool)

            self.relay = Relay(recorder, pid, waker, outputs=outputs, input_fd=input_fd, pty_master=master,
                               term_fd=0 if (interactive and stdin_tty) else None,
                               record_hidden_input=opts.record_hidden_input, term_size=term_size,
                               forward_keyboard=not attached)
            exit_status = self.relay.run()
            ended = formats.utc_now()
        finally:
            if raw is not None:
                raw.restore()
            waker.close()
            for fd in to_close:
                with contextlib.suppress(OSError):
                    os.close(fd)

        self.diag.log(f"command ended: {exit_status}")
        recorder.finish()
        totals = writer.close()
        reason = self._reason(exit_status, exec_errno, self.relay.terminated_reason, writer)
        marker = close_marker(opts.app, session_id, exit_status, reason, totals, recorder.withheld_bytes,
                              formats.format_time(ended))
        self._close(uploader, session_spool, marker)
        return exit_status.exit_code

    def _reason(self, status: ExitStatus, exec_errno: int, terminated: str | None, writer: ChunkWriter) -> str | None:
        parts = []
        if terminated:
            parts.append(terminated)
        if exec_errno:
            parts.append(f"command could not be started: {os.strerror(exec_errno)}")
        if status.signal is not None and not terminated:
            parts.append(f"killed by {_signal_name(status.signal)}")
        if writer.totals.lost_bytes:
            parts.append(f"{writer.totals.lost_bytes} bytes could not be recorded")
        if writer.error is not None:
            parts.append(f"recording error: {writer.error!r}")
        return "; ".join(parts) or None

    def _flush_leftovers_in_background(self, spool: Spool, own: SessionSpool | None) -> None:
        skip = {own.dir} if own is not None else set()

        def run() -> None:
            try:
                result = flush_spool(spool, self.s3, timeout=self.opts.flush_timeout,
                                     retry=RetryPolicy(cap=self.opts.retry_max_delay), skip=skip, log=self.diag.log)
                if result.uploaded:
                    self.diag.log(f"flushed {len(result.uploaded)} spooled objects of earlier sessions")
            except Exception as err:  # the leftovers wait for the next run
                self.diag.log(f"flushing the spool failed: {err!r}")

        self._leftovers = threading.Thread(target=run, name="oneoff-audit-flush-leftovers", daemon=True)
        self._leftovers.start()

    def _close(self, uploader: Uploader, spool: SessionSpool | None, marker: dict[str, Any]) -> None:
        opts = self.opts
        deadline = time.monotonic() + opts.flush_timeout
        # The command has ended and the terminal is back: ^C (or SIGTERM) now means "stop waiting for
        # S3", not "lose the recording": what is not uploaded yet goes to the spool at once.
        previous = {sig: signal.signal(sig, lambda *_: uploader.hurry())
                    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
        try:
            self._finish_uploads(uploader, spool, marker, deadline)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _finish_uploads(self, uploader: Uploader, spool: SessionSpool | None, marker: dict[str, Any],
                        deadline: float) -> None:
        opts = self.opts
        left = uploader.finish(opts.flush_timeout)
        closed_key = keys.closed_key(opts.app, marker["session_id"], opts.staging_prefix)
        body = formats.dumps_line(marker)
        unsaved = []
        for item in left:
            if item.path is not None:
                continue  # already in the spool
            if spool is None:
                unsaved.append(item.name)
                continue
            try:
                spool.write(item.name, item.body(), force=True)
            except SpoolError as err:
                self.diag.log(f"cannot spool {item.name}: {err}")
                unsaved.append(item.name)
        try:
            if not left:
                remaining = 0.0 if uploader.hurried else max(1.0, deadline - time.monotonic())
                if uploader.put_now(closed_key, body, remaining):
                    self.diag.log(f"closed: {marker['chunk_count']} chunks, {marker['event_count']} events, "
                                  f"{uploader.uploaded} uploads, {uploader.spooled} spooled, {uploader.errors} errors")
                    return
            if unsaved:
                self.diag.failure(
                    f"{len(unsaved)} objects of session {opts.app}/{marker['session_id']} could not be uploaded "
                    f"or spooled ({uploader.last_error}); the close marker is not written, the sweeper will "
                    "file the session as abandoned")
                return
            if spool is None:
                self.diag.failure(f"close marker of {opts.app}/{marker['session_id']} could not be uploaded "
                                  f"({uploader.last_error}) and there is no spool")
                return
            try:
                spool.write("closed.json", body, force=True)
            except SpoolError as err:
                self.diag.failure(f"close marker could not be uploaded or spooled: {err}")
                return
            self.diag.failure(
                f"not every chunk reached S3 within {opts.flush_timeout:g}s (last error: {uploader.last_error}); "
                f"session {opts.app}/{marker['session_id']} is complete in the spool {spool.dir}; "
                "`oneoff-audit flush-spool` (or the next record) uploads it")
        finally:
            if spool is not None:
                spool.close()
            if self._leftovers is not None:  # earlier sessions' leftovers: bounded by the same timeout
                self._leftovers.join(0 if uploader.hurried else max(0.0, deadline - time.monotonic()))


def _new_id() -> str:
    from oneoff_audit.ids import new_session_id

    return new_session_id()


def record(opts: RecordOptions, s3: Any) -> int:
    """Run ``opts.command`` recorded; returns its exit code (128+N when killed by signal N)."""
    diag = Diagnostics(opts.log_file)
    try:
        return Session(opts, s3, diag).run()
    finally:
        diag.close()


def run_flush_spool(spool: Spool, s3: Any, timeout: float, log: Callable[[str], None]) -> int:
    """``flush-spool``: upload what earlier runs left; 0 when the spool is empty afterwards."""
    result = flush_spool(spool, s3, timeout=timeout, log=log)
    out = sys.stdout
    print(f"uploaded {len(result.uploaded)} objects; sessions flushed: {len(result.sessions_done)}, "
          f"left: {len(result.sessions_left)}, busy (being recorded): {len(result.busy)}", file=out)
    for line in result.errors:
        print(f"error: {line}", file=sys.stderr)
    return 0 if result.ok else 1
