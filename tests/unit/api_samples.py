"""Plaintext audit logs built line by line for the API, export and verify unit tests."""

from __future__ import annotations

from typing import Any

import format_samples

from oneoff_audit.codec import decode_data
from oneoff_audit.formats import dumps_line, log_header_from_session

APP = "billing-api"
SID = "01JDQ8ZK3V4Y2S6T7W8X9A0B1C"
T0 = "2026-11-25T14:46:00.123456Z"
T1 = "2026-11-25T14:47:30.654321Z"


_DEFAULT_SIZE = {"cols": 120, "rows": 40}


def session(app: str = APP, sid: str = SID, term_size: Any = _DEFAULT_SIZE) -> dict[str, Any]:
    """An opened.json document."""
    return {
        "format": "oneoff-audit.session", "version": 1, "session_id": sid, "app": app,
        "actor": {"id": "u-123", "name": "Ann", "type": "user", "source_ip": "203.0.113.7"},
        "command": {"argv": ["rails", "console", {"b64": "/w=="}], "tty": True,
                    "term_size": term_size,
                    "env_keys": ["HOME", "PATH"]},
        "target": {"org": "acme", "space": "prod"},
        "started_at": T0,
        "agent": {"version": "0.1.0", "hostname": "runner-7", "pid": 4242},
        "options": {"record_hidden_input": False, "chunk_max_bytes": 1 << 20, "chunk_max_seconds": 5.0},
    }


def trailer_for(events: list[list[Any]], app: str = APP, sid: str = SID, **overrides: Any) -> dict[str, Any]:
    """A trailer whose counts are exactly those of ``events``."""
    counts = dict.fromkeys("ioerm", 0)
    sizes = dict.fromkeys("ioe", 0)
    withheld = lost = 0
    missing: list[int] = []
    for _, stream, data in events:
        counts[stream] += 1
        if stream in sizes:
            sizes[stream] += len(decode_data(data))
        elif stream == "m" and data["kind"] == "input-withheld":
            withheld += data["bytes"]
        elif stream == "m" and data["kind"] == "capture-gap":
            lost += data["bytes"]
        elif stream == "m" and data["kind"] == "gap":
            missing.append(data["seq"])
    trailer = {
        "type": "trailer", "session_id": sid, "app": app, "ended_at": T1, "exit": {"code": 0, "signal": None},
        "status": "succeeded", "reason": None, "duration": 90.530865, "bytes": sizes, "events": counts,
        "event_count": len(events), "chunk_count": 3 - len(missing), "expected_chunk_count": 3,
        "chain_sha256": "c" * 64, "complete": not missing, "gaps": {"missing": missing, "corrupt": []},
        "withheld_input_bytes": withheld, "lost_bytes": lost, "filed_at": "2026-11-25T14:48:00.000001Z",
    }
    trailer.update(overrides)
    return trailer


def make_log(events: list[list[Any]], app: str = APP, sid: str = SID, term_size: Any = _DEFAULT_SIZE,
             **trailer_overrides: Any) -> bytes:
    """The plaintext audit log: header, events, trailer."""
    lines = [dumps_line(log_header_from_session(session(app, sid, term_size)))]
    lines += [dumps_line(e) for e in events]
    lines.append(dumps_line(trailer_for(events, app, sid, **trailer_overrides)))
    return b"".join(lines)


EVENTS = format_samples.events()  # one event of every stream and data form
