"""The ``oneoff-audit`` command line: one entry point, subcommands registered by their modules.

Each module in :data:`COMMAND_MODULES` provides ``register(subparsers)``, adding its subcommands
with ``set_defaults(func=...)``; ``func(args)`` returns the exit code. Errors raised on purpose
(:class:`OneoffAuditError`) become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from oneoff_audit import __version__
from oneoff_audit.errors import OneoffAuditError

COMMANDS = {
    "record": "oneoff_audit.capture.cli",
    "flush-spool": "oneoff_audit.capture.cli",
    "sessions": "oneoff_audit.auditor",
    "show": "oneoff_audit.auditor",
    "download": "oneoff_audit.auditor",
    "decrypt": "oneoff_audit.auditor",
    "verify": "oneoff_audit.auditor",
    "export": "oneoff_audit.auditor",
    "verify-chain": "oneoff_audit.evidence.cli",
    "bundle": "oneoff_audit.evidence.cli",
    "local": "oneoff_audit.local",
}
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser: every subcommand, or only ``command``'s module when it is known.

    Importing only the module of the command being run keeps ``record`` on the runner small and
    quick to start (it does not load the API, crypto or the local stack).
    """
    parser = argparse.ArgumentParser(prog="oneoff-audit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"oneoff-audit {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = (COMMANDS[command],) if command in COMMANDS else COMMAND_MODULES
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), if any."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_of(argv)).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except OneoffAuditError as err:
        print(f"oneoff-audit {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
