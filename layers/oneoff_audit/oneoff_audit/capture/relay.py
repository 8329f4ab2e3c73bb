"""Run the command and relay its bytes: a PTY for interactive sessions, separate pipes otherwise.

The relay is one ``poll`` loop on the main thread. It never waits for S3: recorded reads go to the
:class:`~oneoff_audit.capture.recorder.Recorder`, which hands sealed chunks to background threads.

* Interactive: the command runs in a new session on a PTY whose slave is its controlling terminal,
  with the user's terminal settings and window size. The user's terminal is put in raw mode and
  always restored. SIGWINCH is propagated (and recorded as ``r``); SIGINT and SIGQUIT go to the
  PTY's foreground process group, SIGTERM and SIGHUP to the command.
* Non-interactive: stdout and stderr are separate pipes (``o`` and ``e``); stdin is forwarded
  through a pipe, including its end (EOF). The command gets its own process group so that a
  terminal's ^C reaches it once, through the agent.
* Password prompts: when the PTY has echo off in canonical mode (``getpass``, ``read -s``, sudo,
  ssh), typed bytes are forwarded but not recorded; an ``input-withheld`` marker counts them.

If the agent itself dies, the kernel kills the command (``PR_SET_PDEATHSIG``): no session runs
unrecorded.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import os
import select
import signal
import struct
import sys
import termios
import threading
import time
import tty
from collections.abc import Sequence
from dataclasses import dataclass

from oneoff_audit.capture.recorder import Recorder

READ_SIZE = 64 * 1024  # one read (or burst of PTY reads), so one event line, stays small
INPUT_BUFFER_MAX = 64 * 1024  # typed/piped bytes waiting for the command before stdin is paused
DRAIN_IDLE = 0.1  # after the command exits: stop when its outputs are silent this long...
DRAIN_MAX = 2.0  # ...or after this long (background processes still holding the PTY or pipes)
TERMINATE_GRACE = 3.0  # SIGHUP, then SIGKILL after this many seconds
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
KEYBOARD_SIGNALS = (signal.SIGINT, signal.SIGQUIT)
_PR_SET_PDEATHSIG = 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters
_POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR
_POLL_OUT = select.POLLOUT | select.POLLHUP | select.POLLERR


@dataclass(frozen=True)
class ExitStatus:
    """How the command ended: an exit code or a signal."""

    code: int | None
    signal: int | None

    @classmethod
    def from_wait(cls, status: int) -> ExitStatus:
        if os.WIFSIGNALED(status):
            return cls(None, os.WTERMSIG(status))
        return cls(os.WEXITSTATUS(status), None)

    @property
    def exit_code(self) -> int:
        """The agent's own exit code: the command's, or 128+N when killed by signal N."""
        return self.code if self.code is not None else 128 + (self.signal or 0)

    @property
    def status(self) -> str:
        """``succeeded`` (0), ``failed`` (non-zero) or ``killed`` (signal)."""
        if self.signal is not None:
            return "killed"
        return "succeeded" if self.code == 0 else "failed"


def ensure_std_fds() -> None:
    """Open /dev/null on any of fds 0-2 that is closed, so new fds never land on them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def set_nonblocking(fd: int) -> None:
    """Set O_NONBLOCK on an fd the agent owns (never on the user's inherited ones)."""
    os.set_blocking(fd, False)


def get_winsize(fd: int) -> tuple[int, int] | None:
    """(cols, rows) of a terminal, or None."""
    try:
        rows, cols, _x, _y = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return cols, rows


def set_winsize(fd: int, cols: int, rows: int) -> None:
    """Set a PTY's window size."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class RawTerminal:
    """The user's terminal in raw mode; :meth:`restore` puts back the saved settings (idempotent)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved = termios.tcgetattr(fd)
        self._raw = False

    def enter(self) -> None:
        tty.setraw(self.fd, termios.TCSANOW)
        self._raw = True

    def restore(self) -> None:
        if not self._raw:
            return
        old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # also when the agent is in the background
        try:
            termios.tcsetattr(self.fd, termios.TCSANOW, self.saved)
            self._raw = False
        except termios.error:
            pass
        finally:
            signal.signal(signal.SIGTTOU, old)


class SignalWaker:
    """Signals and cross-thread requests turned into readiness of one fd for the poll loop."""

    def __init__(self, signals: Sequence[int]) -> None:
        self._r, self._w = os.pipe()
        self._closed = False
        self._close_lock = threading.Lock()
        set_nonblocking(self._r)
        set_nonblocking(self._w)
        self.pending: list[int] = []
        self._old_wakeup = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._old = {sig: signal.signal(sig, self._handler) for sig in signals}

    @property
    def fd(self) -> int:
        return self._r

    def _handler(self, signum: int, _frame: object) -> None:
        self.pending.append(signum)

    def wake(self) -> None:
        """Make the poll loop run (from any thread); a no-op once closed (its fd number may be reused)."""
        with self._close_lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):
                os.write(self._w, b"\0")

    def drain(self) -> list[int]:
        """The signals received since the last call, in order."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._r, 4096):
                pass
        got, self.pending = self.pending, []
        return got

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        signal.set_wakeup_fd(self._old_wakeup)
        with self._close_lock:
            self._closed = True
            os.close(self._r)
            os.close(self._w)


_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return None
    return _libc


def has_controlling_terminal() -> bool:
    """Whether the agent runs attached to a terminal (then a non-interactive command shares its job)."""
    try:
        os.close(os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY))
    except OSError:
        return False
    return True


def tune_malloc() -> None:
    """Keep the agent's RSS flat (glibc): few arenas, big buffers mmapped and returned when freed.

    Chunks are built and freed continuously by several threads; glibc's defaults (an arena per
    thread, a dynamic mmap threshold that grows to 32 MiB) keep freed megabytes resident.
    """
    libc = _load_libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return
    for param, value in ((_M_ARENA_MAX, 2), (_M_MMAP_THRESHOLD, 128 << 10), (_M_TRIM_THRESHOLD, 256 << 10)):
        with contextlib.suppress(Exception):
            mallopt(param, value)


GIL_SWITCH_INTERVAL = 0.001  # seconds; Python's default is 0.005
GC_THRESHOLD_GEN0 = 20_000  # Python's default is 700


def tune_interpreter() -> None:
    """Make the agent's process cheaper to run; call once, after start-up, in the ``record`` process only.

    * ``gc.freeze()``: the tens of thousands of objects of the imports and the S3 client go to the
      permanent generation, so the cyclic collector no longer walks them again and again (it was
      ~7% of the agent's CPU under bulk output); and young collections run less often.
    * A shorter GIL switch interval: when the relay thread wakes up (a keystroke, output) while an
      encoder or upload thread runs Python code, it gets the GIL back within ~1 ms instead of 5.
    """
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD_GEN0, gen1, gen2)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)


def spawn(argv: Sequence[bytes], env: dict[bytes, bytes], fds: tuple[int, int, int], *, pty: bool,
          own_group: bool = True) -> tuple[int, int]:
    """Fork and exec ``argv`` with ``fds`` as its stdin/stdout/stderr; returns (pid, exec errno or 0).

    With ``pty`` the child starts a new session with ``fds[0]`` (the PTY slave) as its controlling
    terminal; otherwise it gets its own process group when ``own_group`` (no terminal: signals reach
    it only through the agent), or stays in the agent's job, so that it may still use the agent's
    terminal (``/dev/tty``) in the foreground. It dies with the agent (PDEATHSIG). If exec
    fails, the child writes the reason on its stderr (so it is recorded) and exits 127 (126 when the
    file exists but cannot be executed), like a shell.
    """
    libc = _load_libc()
    parent = os.getpid()
    err_r, err_w = os.pipe()  # close-on-exec: EOF means exec succeeded
    pid = os.fork()
    if pid == 0:  # child: single-threaded here (threads start after the spawn)
        code = 127
        try:
            os.close(err_r)
            if pty:
                os.setsid()
                fcntl.ioctl(fds[0], termios.TIOCSCTTY, 0)
            elif own_group:
                os.setpgid(0, 0)
            if libc is not None:
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(137)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            for sig in (signal.SIGPIPE, signal.SIGXFSZ, *FORWARDED, signal.SIGCHLD, signal.SIGWINCH,
                        signal.SIGTTOU, signal.SIGTTIN, signal.SIGTSTP):
                signal.signal(sig, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            os.execvpe(argv[0], list(argv), env)
        except BaseException as err:
            number = getattr(err, "errno", None) or errno.ENOEXEC
            code = 127 if number == errno.ENOENT else 126
            with contextlib.suppress(BaseException):
                name = os.fsdecode(argv[0])
                end = "\r\n" if pty else "\n"
                os.write(2, f"oneoff-audit: cannot run {name}: {os.strerror(number)}{end}".encode())
                os.write(err_w, str(number).encode())
        finally:
            os._exit(code)
    os.close(err_w)
    chunks = []
    while data := os.read(err_r, 64):  # EINTR is retried by Python itself (PEP 475)
        chunks.append(data)
    os.close(err_r)
    return pid, int(b"".join(chunks) or b"0")


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write everything, waiting for POLLOUT if the fd is non-blocking; raises OSError on failure."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)


class Relay:
    """The poll loop between the user's fds and the command's, feeding the recorder."""

    def __init__(
        self,
        recorder: Recorder,
        pid: int,
        waker: SignalWaker,
        *,
        outputs: dict[int, tuple[int, str]],
        input_fd: int | None,
        stdin_fd: int = 0,
        pty_master: int | None = None,
        term_fd: int | None = None,
        record_hidden_input: bool = False,
        term_size: tuple[int, int] | None = None,
        forward_keyboard: bool = True,
    ) -> None:
        self.recorder = recorder
        self.pid = pid
        self.waker = waker
        self.outputs = dict(outputs)  # child fd -> (our fd, stream)
        self.input_fd = input_fd
        self.stdin_fd = stdin_fd
        self.master = pty_master
        self.term_fd = term_fd
        self.record_hidden_input = record_hidden_input
        self.size = term_size
        self.forward_keyboard = forward_keyboard
        self.in_open = input_fd is not None
        self.in_eof = False
        self.in_buf = bytearray()
        self.dead_dst: set[int] = set()
        self.exit: ExitStatus | None = None
        self.terminated_reason: str | None = None
        self._terminate_request: str | None = None
        self._kill_at: float | None = None
        self._drain_until = 0.0
        self._drain_hard = 0.0
        self._lock = threading.Lock()

    # ------------------------------------------------------------ requests from other threads

    def request_termination(self, reason: str) -> None:
        """End the session (SIGHUP, then SIGKILL): recording failed and policy says terminate."""
        with self._lock:
            if self._terminate_request is None:
                self._terminate_request = reason
        self.waker.wake()

    # ------------------------------------------------------------ loop

    def run(self) -> ExitStatus:
        """Relay until the command has exited and its outputs are drained; return its exit status."""
        poller = select.poll()
        registered: dict[int, int] = {}
        next_reap = time.monotonic() + 1.0
        while True:
            now = time.monotonic()
            if self.exit is not None and (not self.outputs or now >= self._drain_until):
                break
            wanted = self._wanted()
            if wanted != registered:
                for fd in registered.keys() - wanted.keys():
                    poller.unregister(fd)
                for fd, mask in wanted.items():
                    if registered.get(fd) != mask:
                        poller.register(fd, mask)
                registered = wanted
            ready = poller.poll(self._timeout_ms(now, next_reap))
            woke = False
            for fd, ev in ready:
                if fd == self.waker.fd:
                    woke = True
                    continue
                if fd in self.outputs and ev & _POLL_IN:
                    self._read_output(fd)
                if fd == self.stdin_fd and self.in_open and ev & _POLL_IN:
                    self._read_input()
                if fd == self.input_fd and self.in_buf and ev & _POLL_OUT:
                    self._write_input()
            now = time.monotonic()
            if woke:
                self._handle_signals()
            if self.exit is None and (now >= next_reap or not self.outputs):
                self._reap()
                next_reap = now + 1.0
            self._check_termination(now)
            self.recorder.tick(now)
        return self.exit

    def _wanted(self) -> dict[int, int]:
        wanted = {self.waker.fd: select.POLLIN}
        for fd in self.outputs:
            wanted[fd] = select.POLLIN
        if (self.in_open and len(self.in_buf) < INPUT_BUFFER_MAX and self.exit is None
                and self.stdin_fd not in self.outputs):
            wanted[self.stdin_fd] = wanted.get(self.stdin_fd, 0) | select.POLLIN
        if self.in_buf and self.input_fd is not None:
            wanted[self.input_fd] = wanted.get(self.input_fd, 0) | select.POLLOUT
        return wanted

    def _timeout_ms(self, now: float, next_reap: float) -> int:
        deadlines = [next_reap]
        chunk_deadline = self.recorder.deadline()
        if chunk_deadline is not None:
            deadlines.append(chunk_deadline)
        if self.exit is not None:
            deadlines.append(self._drain_until)
        if self._kill_at is not None:
            deadlines.append(self._kill_at)
        return max(0, int((min(deadlines) - now) * 1000) + 1)

    # ------------------------------------------------------------ data

    def _read_output(self, fd: int) -> None:
        """Read what the command wrote; a burst of PTY reads (~4 KiB each) becomes one event, one write."""
        dst, stream = self.outputs[fd]
        parts = []
        size = 0
        eof = False
        while size < READ_SIZE:
            try:
                data = os.read(fd, READ_SIZE - size)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno != errno.EIO:  # EIO: the PTY's slave side is closed
                    raise
                data = b""
            if not data:
                eof = True
                break
            parts.append(data)
            size += len(data)
            if len(data) < 512:
                break  # interactive trickle: relay it now (keystroke echo latency)
        if parts:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            # Forward first, record after: recording never delays what the user sees.
            if dst not in self.dead_dst:
                try:
                    write_all(dst, data)
                except OSError:
                    # The reader of our stdout/stderr went away. With pipes the command now gets
                    # EPIPE/SIGPIPE, as it would have without the agent; on a PTY we keep recording.
                    self.dead_dst.add(dst)
                    if fd != self.master:
                        eof = True
            self.recorder.record(stream, data)
            if self.exit is not None:
                self._drain_until = min(time.monotonic() + DRAIN_IDLE, self._drain_hard)
        if eof:
            self._close_output(fd)

    def _close_output(self, fd: int) -> None:
        self.outputs.pop(fd, None)
        if fd != self.master:
            os.close(fd)

    def _echo_off(self) -> bool:
        """True while the PTY reads a hidden line: echo off in canonical mode (password prompts)."""
        try:
            lflag = termios.tcgetattr(self.master)[3]
        except termios.error:
            return False
        return not lflag & termios.ECHO and bool(lflag & termios.ICANON)

    def _read_input(self) -> None:
        try:
            data = os.read(self.stdin_fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as err:
            if err.errno not in (errno.EIO, errno.EBADF):
                raise
            data = b""
        if not data:
            self.in_open = False
            self.in_eof = True
            if self.master is not None:
                with contextlib.suppress(termios.error):
                    attrs = termios.tcgetattr(self.master)
                    if attrs[3] & termios.ICANON:
                        self.in_buf += attrs[6][termios.VEOF]  # what ^D would send: end of input
            if not self.in_buf:
                self._close_input()
            return
        # Whether the bytes are hidden is decided before they reach the command (which may turn echo
        # back on as soon as it has read a password); they are recorded after being forwarded.
        hidden = self.master is not None and not self.record_hidden_input and self._echo_off()
        self.in_buf += data
        self._write_input()
        if hidden:
            self.recorder.withheld(len(data))
        else:
            self.recorder.record("i", data)

    def _write_input(self) -> None:
        if self.input_fd is None:
            self.in_buf.clear()
            return
        try:
            written = os.write(self.input_fd, self.in_buf[:INPUT_BUFFER_MAX])
        except BlockingIOError:
            return
        except OSError as err:
            if err.errno not in (errno.EPIPE, errno.EIO):
                raise
            # The command closed its stdin (or exited): nothing more can reach it.
            self.in_buf.clear()
            self.in_open = False
            self._close_input()
            return
        del self.in_buf[:written]
        if not self.in_buf and self.in_eof:
            self._close_input()

    def _close_input(self) -> None:
        if self.input_fd is not None and self.input_fd != self.master:
            os.close(self.input_fd)
            self.input_fd = None

    # ------------------------------------------------------------ signals and the child

    def _handle_signals(self) -> None:
        for sig in self.waker.drain():
            if sig == signal.SIGCHLD:
                self._reap()
            elif sig == signal.SIGWINCH:
                self._resize()
            elif sig in FORWARDED:
                self._forward(sig)

    def _forward(self, sig: int) -> None:
        if sig in KEYBOARD_SIGNALS and not self.forward_keyboard:
            return  # the terminal sent it to the whole job, the command included
        target = self.pid
        if self.master is not None and sig in KEYBOARD_SIGNALS:
            with contextlib.suppress(OSError):
                target = -os.tcgetpgrp(self.master)  # like the terminal: the foreground job
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(target, sig)

    def _resize(self) -> None:
        if self.term_fd is None or self.master is None:
            return
        size = get_winsize(self.term_fd)
        if size is None:
            return
        with contextlib.suppress(OSError):
            set_winsize(self.master, *size)  # the kernel sends SIGWINCH to the PTY's foreground job
        if size != self.size:
            self.size = size
            self.recorder.resize(*size)

    def _reap(self) -> None:
        if self.exit is not None:
            return
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0
        if pid == 0:
            return
        self.exit = ExitStatus.from_wait(status)
        now = time.monotonic()
        self._drain_hard = now + DRAIN_MAX
        self._drain_until = now + DRAIN_IDLE
        self.in_open = False
        self.in_buf.clear()
        self._close_input()

    # ------------------------------------------------------------ terminate policy

    def _check_termination(self, now: float) -> None:
        with self._lock:
            reason = self._terminate_request
        if reason is not None and self.terminated_reason is None:
            self.terminated_reason = reason
            self.recorder.marker({"kind": "session-terminated", "reason": reason}, keep=True)
            # No more input reaches a session that can no longer be recorded.
            self.in_open = False
            self.in_buf.clear()
            if self.exit is None:
                self._signal_session(signal.SIGHUP)
                self._kill_at = now + TERMINATE_GRACE
        if self._kill_at is not None and now >= self._kill_at:
            self._kill_at = None
            if self.exit is None:
                self._signal_session(signal.SIGKILL)

    def _signal_session(self, sig: int) -> None:
        if self.master is None and not self.forward_keyboard:  # the command shares the agent's group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, sig)
            return
        groups = {self.pid}
        if self.master is not None:
            with contextlib.suppress(OSError):
                groups.add(os.tcgetpgrp(self.master))
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
