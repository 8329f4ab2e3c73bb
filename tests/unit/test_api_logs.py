"""Inline answers spliced from a log's lines equal the parsed log; header/trailer checks; presign TTL."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
from api_samples import APP, EVENTS, SID, make_log
from hypothesis import given, settings
from hypothesis import strategies as st

from oneoff_audit import formats
from oneoff_audit.api import logs
from oneoff_audit.codec import encode_bytes
from oneoff_audit.config import ApiConfig
from oneoff_audit.errors import IntegrityError

pytestmark = pytest.mark.unit


def _parsed(log: bytes) -> dict:
    parts = list(formats.iter_log_lines(io.BytesIO(log)))
    return {"header": parts[0][1], "events": [v for _, v in parts[1:-1]], "trailer": parts[-1][1]}


_event = st.tuples(st.floats(0, 1e6, allow_nan=False), st.sampled_from("ioe"), st.binary(min_size=1, max_size=30))


@settings(max_examples=60, deadline=None)
@given(st.lists(_event, max_size=30))
def test_inline_json_equals_the_parsed_log(raw_events):
    events = [[round(t, 6), s, v] for t, s, b in sorted(raw_events) for v in encode_bytes(b)]
    log = make_log(events)
    assert json.loads(logs.inline_json(log, APP, SID)) == _parsed(log)


def test_inline_json_keeps_text_readable_and_key_order():
    body = logs.inline_json(make_log(EVENTS), APP, SID)
    assert body.startswith('{"header":{"type":"header",') and '"events":[[0.0,"r","120x40"],' in body
    assert "€ 😀" in body and body.endswith("}}")
    assert json.loads(logs.inline_json(make_log([]), APP, SID))["events"] == []


@pytest.mark.parametrize(("mangle", "message"), [
    (lambda b: b.replace(b'"app":"billing-api"', b'"app":"other-app"', 1),
     "the log's header names other-app/" + SID),
    (lambda b: b[: b.rindex(b'{"type":"trailer"')],  # the trailer line lost: the last event is no trailer
     "the decrypted log is malformed: log trailer: (root): [2, 'm', {'kind': 'input-withheld', 'bytes': 12}] "
     "is not of type 'object'"),
    (lambda b: b.rstrip(b"\n"), "the decrypted log has no header and trailer lines"),
    (lambda b: b"", "the decrypted log has no header and trailer lines"),
])
def test_inline_json_refuses_a_log_for_another_session_or_a_broken_one(mangle, message):
    with pytest.raises(IntegrityError) as err:
        logs.inline_json(mangle(make_log(EVENTS)), APP, SID)
    assert str(err.value).startswith(message)


def test_presign_ttl_never_exceeds_900_or_the_credentials(monkeypatch):
    cfg = ApiConfig(bucket="b", kms_key_id="k", presign_ttl=300)
    monkeypatch.setattr(logs, "credentials_remaining", lambda: None)
    assert logs.presign_ttl(cfg) == 300
    assert logs.presign_ttl(replace(cfg, presign_ttl=5000)) == 900
    monkeypatch.setattr(logs, "credentials_remaining", lambda: 42.9)
    assert logs.presign_ttl(cfg) == 42
    monkeypatch.setattr(logs, "credentials_remaining", lambda: 0.5)
    with pytest.raises(Exception, match="credentials are about to expire"):
        logs.presign_ttl(cfg)
