"""``python -m oneoff_audit.capture record|flush-spool ...``: the same as ``oneoff-audit record``.

``oneoff-audit`` loads only the module of the command it runs, so this entry point is the same
command line (same options and exit codes), kept for runners that invoke the module directly.
"""

from __future__ import annotations

import sys

from oneoff_audit.cli import main

if __name__ == "__main__":
    sys.exit(main())
