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

COMMAND_MODULES = (
    "oneoff_audit.capture.cli",  # record, flush-spool
    "oneoff_audit.auditor",  # sessions, show, download, decrypt, verify, export
    "oneoff_audit.evidence.cli",  # verify-chain, bundle
    "oneoff_audit.local",  # local
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="oneoff-audit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"oneoff-audit {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a component not built yet: its commands are absent
            if err.name is not None and name.startswith(err.name):
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except OneoffAuditError as err:
        print(f"oneoff-audit {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
