"""Valid sample objects of every format, shared by the format and schema tests."""

from __future__ import annotations

import copy
from typing import Any

from oneoff_audit.formats import log_header_from_session

APP = "billing-api"
SID = "01JDQ8ZK3V4Y2S6T7W8X9A0B1C"
SHA = "a" * 64
T0 = "2026-11-25T14:46:00.123456Z"
T1 = "2026-11-25T14:47:30.654321Z"


def session_header() -> dict[str, Any]:
    """opened.json."""
    return {
        "format": "oneoff-audit.session",
        "version": 1,
        "session_id": SID,
        "app": APP,
        "actor": {"id": "u-123", "name": "Ann Auditor", "type": "user", "source_ip": "203.0.113.7"},
        "command": {
            "argv": ["rails", "console", {"b64": "/w=="}],
            "tty": True,
            "term_size": {"cols": 120, "rows": 40},
            "env_keys": ["HOME", "PATH", "RAILS_ENV"],
        },
        "target": {"org": "acme", "space": "prod", "region": "eu-west-1"},
        "started_at": T0,
        "agent": {"version": "0.1.0", "hostname": "runner-7", "pid": 4242},
        "options": {"record_hidden_input": False, "chunk_max_bytes": 1 << 20, "chunk_max_seconds": 5.0},
    }


def chunk_header(seq: int = 0) -> dict[str, Any]:
    """Line 1 of a chunk."""
    return {
        "format": "oneoff-audit.chunk",
        "version": 1,
        "session_id": SID,
        "app": APP,
        "seq": seq,
        "first_event_index": 0 if seq == 0 else 7 * seq,
        "prev_chunk_sha256": None if seq == 0 else SHA,
    }


def events() -> list[list[Any]]:
    """One event of every stream and data form."""
    return [
        [0.0, "r", "120x40"],
        [0.012345, "o", "irb(main):001> "],
        [1.5, "i", "User.count\r"],
        [1.5, "i", {"b64": "/w=="}],
        [1.6, "o", "=> 42\r\n€ 😀\r\n"],
        [1.7, "e", "warning: \u001b[31mred\u001b[0m\n"],
        [2, "m", {"kind": "input-withheld", "bytes": 12}],
    ]


def close_marker() -> dict[str, Any]:
    """closed.json."""
    return {
        "format": "oneoff-audit.close",
        "version": 1,
        "session_id": SID,
        "app": APP,
        "ended_at": T1,
        "exit": {"code": 0, "signal": None},
        "status": "succeeded",
        "reason": None,
        "chunk_count": 2,
        "chunk_sha256": [SHA, "b" * 64],
        "event_count": 14,
        "bytes": {"i": 13, "o": 40, "e": 25},
        "withheld_input_bytes": 12,
        "lost_bytes": 0,
    }


def log_header() -> dict[str, Any]:
    """Line 1 of an audit log."""
    return log_header_from_session(session_header())


def log_trailer() -> dict[str, Any]:
    """Last line of an audit log."""
    return {
        "type": "trailer",
        "session_id": SID,
        "app": APP,
        "ended_at": T1,
        "exit": {"code": None, "signal": 9},
        "status": "killed",
        "reason": "SIGKILL",
        "duration": 90.530865,
        "bytes": {"i": 13, "o": 40, "e": 25},
        "events": {"i": 2, "o": 2, "e": 1, "r": 1, "m": 1},
        "event_count": 7,
        "chunk_count": 2,
        "expected_chunk_count": 3,
        "chain_sha256": SHA,
        "complete": False,
        "gaps": {"missing": [2], "corrupt": [{"seq": 1, "reason": "sha256 mismatch"}]},
        "withheld_input_bytes": 12,
        "lost_bytes": 0,
        "filed_at": "2026-11-25T14:48:00Z",
    }


def index_entry() -> dict[str, Any]:
    """index/<app>/<started>_<sid>.json."""
    session = session_header()
    return {
        "format": "oneoff-audit.index",
        "version": 1,
        "session_id": SID,
        "app": APP,
        "actor": session["actor"],
        "command": session["command"],
        "target": session["target"],
        "started_at": T0,
        "ended_at": T1,
        "duration": 90.530865,
        "exit": {"code": 0, "signal": None},
        "status": "succeeded",
        "complete": True,
        "size": 1234,
        "sha256": SHA,
        "ciphertext_size": 2345,
        "log_key": f"logs/{APP}/{SID}.jsonl.enc",
        "log_version_id": "3HL4kqtJlcpXroDTDmjVBH40Nrjfkd",
        "event_count": 7,
        "filed_at": "2026-11-25T14:48:00.000001Z",
    }


# schema name -> (builder, the name readers use for it in errors)
SAMPLES = {
    "session-header": session_header,
    "chunk-header": chunk_header,
    "close-marker": close_marker,
    "log-header": log_header,
    "log-trailer": log_trailer,
    "index-entry": index_entry,
}


def sample(name: str) -> dict[str, Any]:
    """A fresh deep copy of the sample for ``name``."""
    return copy.deepcopy(SAMPLES[name]())
