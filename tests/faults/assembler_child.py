"""Run the assembler handler on one SQS batch event in a process of its own.

``python assembler_child.py EVENT.json READY_FILE`` prints the handler's response as JSON. With
``FAULT_HANG_ON=Operation`` the process writes READY_FILE and hangs when it is about to send that
S3 operation, so the parent can kill it with SIGKILL as Lambda does when a function times out (no
``finally``, no abort, nothing). The parent may also bound its memory and time, so a row whose input
could make the assembler run away cannot take the test machine with it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from oneoff_audit.aws import client
from oneoff_audit.local import LocalContext, load_handler


def main() -> None:
    event = json.loads(Path(sys.argv[1]).read_text())
    ready = Path(sys.argv[2])
    operation = os.environ.get("FAULT_HANG_ON", "")

    def hang(request: Any, event_name: str = "", **_: Any) -> None:
        if operation and event_name.endswith("." + operation):
            ready.write_text(event_name)
            while True:
                time.sleep(60)

    client("s3").meta.events.register_first("before-send", hang)
    response = load_handler("assembler")(event, LocalContext("assembler"))
    print(json.dumps(response))


if __name__ == "__main__":
    main()
