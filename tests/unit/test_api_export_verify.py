"""asciicast/text export and offline verification of plaintext logs (no AWS)."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import pytest
from api_samples import APP, EVENTS, SID, make_log, trailer_for
from hypothesis import given, settings
from hypothesis import strategies as st

from oneoff_audit import export
from oneoff_audit.codec import Utf8Splitter
from oneoff_audit.verify import verify_log

pytestmark = pytest.mark.unit


def _cast(log: bytes) -> list:
    return [json.loads(line) for line in export.asciicast_bytes(log).decode("utf-8").splitlines()]


def test_asciicast_header_and_events_exact():
    lines = _cast(make_log(EVENTS))
    assert lines[0] == {"version": 2, "width": 120, "height": 40, "timestamp": 1795617960,
                        "command": "rails console '\ufffd'", "title": f"{APP} {SID} (u-123)"}
    assert lines[1:] == [
        [0.0, "r", "120x40"],
        [0.012345, "o", "irb(main):001> "],
        [1.5, "i", "User.count\r"],
        [1.5, "i", "\ufffd"],
        [1.6, "o", "=> 42\r\n€ 😀\r\n"],
        [1.7, "o", "warning: \u001b[31mred\u001b[0m\n"],
        [2, "m", "input-withheld bytes=12"],
    ]


def test_asciicast_default_size_without_terminal():
    assert _cast(make_log(EVENTS[1:2], term_size=None))[0]["width"] == 80
    header = _cast(make_log(EVENTS[1:2], term_size={"cols": 0, "rows": 0}))[0]
    assert (header["width"], header["height"]) == (80, 24)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=12), max_size=12))
def test_asciicast_output_is_what_a_terminal_decodes(reads):
    """Whatever the reads, the 'o' text equals the output bytes decoded as asciinema's recorder does."""
    splitter = Utf8Splitter()
    events = []
    for n, read in enumerate(reads):
        events += [[n / 10, "o", value] for value in splitter.feed(read)]
    events += [[len(reads) / 10, "o", value] for value in splitter.flush()]
    text = "".join(e[2] for e in _cast(make_log(events))[1:] if e[1] == "o")
    assert text == b"".join(reads).decode("utf-8", "replace")


def test_asciicast_keeps_a_character_split_across_events_whole():
    euro = "€".encode()
    events = [[0.1, "o", "a"], [0.2, "o", {"b64": base64.b64encode(euro[:1]).decode()}],
              [0.3, "o", {"b64": base64.b64encode(euro[1:]).decode()}], [0.4, "o", "b"]]
    outs = [e for e in _cast(make_log(events))[1:] if e[1] == "o"]
    assert outs == [[0.1, "o", "a"], [0.3, "o", "€"], [0.4, "o", "b"]]


def test_text_export_exact_bytes_per_stream():
    log = make_log(EVENTS)
    out = io.BytesIO()
    assert export.write_text(io.BytesIO(log), out) == len(out.getvalue())
    assert out.getvalue() == "irb(main):001> => 42\r\n€ 😀\r\nwarning: \u001b[31mred\u001b[0m\n".encode()
    out = io.BytesIO()
    export.write_text(io.BytesIO(log), out, "i")
    assert out.getvalue() == b"User.count\r\xff"


def test_verify_clean_log():
    log = make_log(EVENTS)
    report = verify_log(io.BytesIO(log))
    assert report.ok, report.problems
    summary = report.summary()
    assert summary["sha256"] == hashlib.sha256(log).hexdigest()
    assert summary["size"] == len(log)
    assert summary["events"] == {"i": 2, "o": 2, "e": 1, "r": 1, "m": 1}
    assert summary["bytes"] == {"i": 12, "o": 32, "e": 22}
    assert (summary["app"], summary["session_id"], summary["complete"]) == (APP, SID, True)


def _problems(log: bytes, expected=None) -> list[str]:
    return verify_log(io.BytesIO(log), expected).problems


def test_verify_names_each_discrepancy():
    trailer = trailer_for(EVENTS)
    assert _problems(make_log(EVENTS, bytes={**trailer["bytes"], "o": 34})) == [
        "bytes per stream {'i': 12, 'o': 32, 'e': 22} differ from the trailer's {'i': 12, 'o': 34, 'e': 22}"]
    assert _problems(make_log(EVENTS, event_count=8)) == ["7 events, the trailer says 8"]
    assert _problems(make_log(EVENTS, withheld_input_bytes=0)) == [
        "input-withheld markers add up to 12 bytes, the trailer says 0"]
    head, _, last = make_log(EVENTS).rstrip(b"\n").rpartition(b"\n")
    other = head + b"\n" + last.replace(f'"app":"{APP}"'.encode(), b'"app":"other-app"') + b"\n"
    assert _problems(other) == [
        f"header names {APP}/{SID} but trailer names other-app/{SID}"]


def test_verify_dropped_event_is_detected():
    log = make_log(EVENTS)
    lines = log.split(b"\n")
    tampered = b"\n".join(lines[:3] + lines[4:])  # drop the 'i' event on line 4
    assert _problems(tampered) == [
        "events per stream {'i': 1, 'o': 2, 'e': 1, 'r': 1, 'm': 1} differ from the trailer's "
        "{'i': 2, 'o': 2, 'e': 1, 'r': 1, 'm': 1}",
        "6 events, the trailer says 7",
        "bytes per stream {'i': 1, 'o': 32, 'e': 22} differ from the trailer's {'i': 12, 'o': 32, 'e': 22}",
    ]


def test_verify_incomplete_and_lossy_sessions_fail_with_the_reason():
    events = [*EVENTS, [3.0, "m", {"kind": "gap", "seq": 1, "reason": "missing"}],
              [3.1, "m", {"kind": "capture-gap", "bytes": 7, "streams": {"o": 7}}]]
    assert _problems(make_log(events)) == [
        "the session is incomplete: missing chunks [1], 2 of 3 chunks",
        "capture lost 7 bytes (capture-gap markers)",
    ]


def test_verify_truncated_log():
    log = make_log(EVENTS)
    assert _problems(log[: log.rindex(b'{"type":"trailer"')]) == ["malformed log: log: no trailer (truncated log?)"]
    assert _problems(log[:-1])[0].startswith("malformed log: log line 9: not newline-terminated")


def test_verify_time_going_back():
    events = [[1.0, "o", "a"], [0.5, "o", "b"]]
    assert _problems(make_log(events)) == ["event 2: time goes back (0.5 < 1.0)"]


def test_verify_against_manifest():
    log = make_log(EVENTS)
    sha = hashlib.sha256(log).hexdigest()
    manifest = {"app": APP, "session_id": SID, "plaintext_sha256": sha, "plaintext_size": len(log),
                "chain_sha256": "c" * 64, "event_count": 7, "status": "succeeded", "complete": True}
    assert _problems(log, manifest) == []
    assert _problems(log, {**manifest, "chain_sha256": "d" * 64}) == [
        f"chain_sha256 {'c' * 64!r} differs from the manifest's {'d' * 64!r}"]
    assert _problems(log, {"plaintext_sha256": "0" * 64}) == [f"SHA-256 {sha} differs from the expected {'0' * 64}"]
