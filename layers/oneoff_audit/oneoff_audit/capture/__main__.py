"""``python -m oneoff_audit.capture record|flush-spool ...``: the capture commands alone.

Same commands, options and exit codes as ``oneoff-audit record`` / ``flush-spool``, without loading
the auditor, evidence and local-stack modules: a runner starts sessions faster and the agent stays
smaller.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from oneoff_audit import __version__
from oneoff_audit.capture.cli import register
from oneoff_audit.errors import OneoffAuditError


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``record`` or ``flush-spool``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m oneoff_audit.capture")
    parser.add_argument("--version", action="version", version=f"oneoff-audit {__version__}")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except OneoffAuditError as err:
        print(f"oneoff-audit {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
