"""``oneoff-audit record`` and ``oneoff-audit flush-spool``."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import Any

from oneoff_audit.capture.spool import DEFAULT_MAX_BYTES, default_spool_dir
from oneoff_audit.errors import OneoffAuditError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
MAX_CHUNK_BYTES = 8 << 20


class UsageError(OneoffAuditError):
    """A command-line value is not acceptable (the command is not run)."""


def _size(text: str) -> int:
    """``1048576``, ``64K``, ``1M``, ``2G`` (binary units)."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = raw[-1:] if raw[-1:] in _UNITS else ""
    try:
        value = int(raw[: len(raw) - len(unit)]) * _UNITS[unit]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from err
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _target(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def register(subparsers: Any) -> None:
    """Add ``record`` and ``flush-spool``."""
    rec = subparsers.add_parser(
        "record",
        help="run a command and record every byte of the session to the audit bucket",
        description="Run CMD (in a PTY when interactive), relay and record every byte, upload chunks to "
                    "staging in the background. Exit code: the command's (128+N when killed by signal N).",
    )
    rec.add_argument("--app", required=True, help="app id the session belongs to")
    rec.add_argument("--actor-id", required=True, help="who runs the session (user or service id)")
    rec.add_argument("--actor-name", help="display name of the actor")
    rec.add_argument("--actor-type", choices=("user", "service"), default="user")
    rec.add_argument("--source-ip", help="IP address the actor connected from")
    rec.add_argument("--target", action="append", type=_target, default=[], metavar="KEY=VALUE",
                     help="free-form target label (org, space, region, container id); repeatable")
    rec.add_argument("--tty", choices=("auto", "always", "never"), default="auto",
                     help="run in a PTY: auto = when stdin is a terminal (default)")
    rec.add_argument("--session-id", help="session id (default: a new ULID)")
    rec.add_argument("--spool-dir", type=Path,
                     help="where chunks wait while S3 is slow or down (default: $ONEOFF_AUDIT_SPOOL_DIR or "
                          f"{default_spool_dir()})")
    rec.add_argument("--spool-max-bytes", type=_size, default=DEFAULT_MAX_BYTES,
                     help="disk the spool may use (default 1G)")
    rec.add_argument("--chunk-bytes", type=_size, default=1 << 20, help="close a chunk at this much data (1M)")
    rec.add_argument("--chunk-seconds", type=_positive_float, default=5.0,
                     help="close a chunk when its first event is this old (5)")
    rec.add_argument("--queue-bytes", type=_size,
                     help="memory for encoded chunks waiting for S3; beyond it chunks are spooled "
                          "(default 4M, at least 2 x --chunk-bytes)")
    rec.add_argument("--upload-workers", type=int, default=2, help="parallel uploads (2)")
    rec.add_argument("--record-hidden-input", action="store_true",
                     help="also record input typed while the terminal does not echo (password prompts)")
    rec.add_argument("--on-capture-failure", choices=("continue", "terminate"), default="continue",
                     help="when S3 is unreachable and the spool full: keep the session running and mark the "
                          "gap (continue, default), or end the session (terminate)")
    rec.add_argument("--flush-timeout", type=_positive_float, default=30.0,
                     help="seconds to keep retrying uploads after the command exited before spooling (30)")
    rec.add_argument("--retry-max-delay", type=_positive_float, default=20.0,
                     help="cap of the exponential backoff between upload attempts, seconds (20)")
    rec.add_argument("--no-flush-spool", dest="flush_spool_on_start", action="store_false",
                     help="do not upload earlier sessions' spooled objects in the background")
    rec.add_argument("--log-file", type=Path, help="append the agent's own diagnostics here")
    rec.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    rec.set_defaults(func=run_record)

    flush = subparsers.add_parser(
        "flush-spool",
        help="upload chunks and close markers that earlier runs left in the spool",
        description="Upload spooled sessions in order (header, chunks, close marker last); skips sessions "
                    "still being recorded. Exit code 0 when nothing is left.",
    )
    flush.add_argument("--spool-dir", type=Path, help="spool directory (default as for record)")
    flush.add_argument("--timeout", type=_positive_float, default=60.0, help="give up after this many seconds")
    flush.set_defaults(func=run_flush)


def _spool_dir(arg: Path | None, env_dir: str | None) -> Path:
    return arg or (Path(env_dir) if env_dir else default_spool_dir())


def run_record(args: argparse.Namespace) -> int:
    """The ``record`` subcommand."""
    from oneoff_audit.aws import client_no_retry
    from oneoff_audit.capture.agent import RecordOptions, record
    from oneoff_audit.capture.relay import tune_interpreter
    from oneoff_audit.config import CaptureConfig
    from oneoff_audit.ids import validate_app

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError("no command given: oneoff-audit record [OPTIONS] -- CMD [ARG...]")
    if args.source_ip is not None:
        try:
            ipaddress.ip_address(args.source_ip)
        except ValueError as err:
            raise UsageError(f"--source-ip: {err}") from err
    if not 1 <= args.chunk_bytes <= MAX_CHUNK_BYTES:
        # JSON escaping can make data up to 6x longer; readers refuse chunks over 64 MiB decompressed.
        raise UsageError(f"--chunk-bytes must be between 1 and {MAX_CHUNK_BYTES}")
    if args.upload_workers < 1:
        raise UsageError("--upload-workers must be at least 1")
    target: dict[str, str] = {}
    for key, value in args.target:
        if key in target:
            raise UsageError(f"--target {key} given twice")
        target[key] = value
    config = CaptureConfig.from_env()
    opts = RecordOptions(
        app=validate_app(args.app),
        actor_id=args.actor_id,
        command=command,
        bucket=config.bucket,
        staging_prefix=config.staging_prefix,
        actor_name=args.actor_name,
        actor_type=args.actor_type,
        source_ip=args.source_ip,
        target=target,
        tty=args.tty,
        session_id=args.session_id,
        spool_dir=_spool_dir(args.spool_dir, config.spool_dir),
        spool_max_bytes=args.spool_max_bytes,
        chunk_bytes=args.chunk_bytes,
        chunk_seconds=args.chunk_seconds,
        queue_bytes=args.queue_bytes if args.queue_bytes is not None else max(4 << 20, 2 * args.chunk_bytes),
        upload_workers=args.upload_workers,
        record_hidden_input=args.record_hidden_input,
        on_capture_failure=args.on_capture_failure,
        flush_timeout=args.flush_timeout,
        retry_max_delay=args.retry_max_delay,
        flush_spool_on_start=args.flush_spool_on_start,
        log_file=args.log_file,
    )
    s3 = client_no_retry("s3")
    tune_interpreter()
    return record(opts, s3)


def run_flush(args: argparse.Namespace) -> int:
    """The ``flush-spool`` subcommand."""
    import os

    from oneoff_audit.aws import client_no_retry
    from oneoff_audit.capture.agent import run_flush_spool
    from oneoff_audit.capture.spool import Spool

    spool = Spool(_spool_dir(args.spool_dir, os.environ.get("ONEOFF_AUDIT_SPOOL_DIR") or None))

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    return run_flush_spool(spool, client_no_retry("s3"), args.timeout, log)
