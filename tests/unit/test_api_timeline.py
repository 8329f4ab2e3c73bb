"""Timeline paging logic without AWS: newest-first key windows, strict cursors, query validation."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oneoff_audit import keys
from oneoff_audit.api import timeline
from oneoff_audit.errors import FormatError

pytestmark = pytest.mark.unit

APP = "billing-api"
PREFIX = keys.index_prefix(APP)


class FakeS3:
    """list_objects_v2 over a sorted key list, with S3's StartAfter/MaxKeys/continuation semantics."""

    def __init__(self, names: list[str]) -> None:
        self.keys = sorted(names)
        self.calls = 0

    def list_objects_v2(self, Bucket, Prefix, StartAfter="", MaxKeys=1000, ContinuationToken=None):
        self.calls += 1
        start = ContinuationToken or StartAfter
        found = [k for k in self.keys if k.startswith(Prefix) and k > start]
        page = found[:MaxKeys]
        resp = {"Contents": [{"Key": k} for k in page], "IsTruncated": len(found) > MaxKeys, "KeyCount": len(page)}
        if resp["IsTruncated"]:
            resp["NextContinuationToken"] = page[-1]
        return resp


def _key(when: datetime, sid: str) -> str:
    return keys.index_key(APP, sid, when)


_times = st.datetimes(min_value=datetime(2001, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC))
_sids = st.text("0123456789ABCDEFGHJKMNPQRSTVWXYZ", min_size=4, max_size=6)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(_times, _sids), max_size=40), st.one_of(st.none(), _times), st.one_of(st.none(), _times))
def test_keys_newest_first_is_exactly_the_range_reversed(items, start, end):
    names = {_key(t, s) for t, s in items}
    s3 = FakeS3([*names, "index/other-app/20260101T000000.000000Z_X.json"])
    low = timeline._time_bound(PREFIX, start) if start else PREFIX
    high = timeline._time_bound(PREFIX, end) if end else PREFIX + "~"
    got = list(timeline.iter_keys_newest_first(s3, "b", PREFIX, low, high))
    assert got == sorted((k for k in names if low < k < high), reverse=True)


def test_windows_list_recent_sessions_without_reading_old_ones():
    now = datetime.now(UTC)
    recent = [_key(now - timedelta(minutes=m), f"R{m:03d}") for m in range(1, 6)]
    old = [_key(now - timedelta(days=400 + d), f"O{d:03d}") for d in range(2000)]
    s3 = FakeS3(recent + old)
    it = timeline.iter_keys_newest_first(s3, "b", PREFIX, PREFIX, PREFIX + "~")
    assert [next(it) for _ in range(5)] == sorted(recent, reverse=True)
    assert s3.calls == 2  # the oldest key, then the first window: none of the 2000 old keys is listed


def test_cursor_round_trip_and_binding():
    name = "20261125T144600.123456Z_01JDQ8ZK3V4Y2S6T7W8X9A0B1C.json"
    token = timeline.encode_cursor(APP, name)
    assert timeline.decode_cursor(APP, token) == name
    with pytest.raises(FormatError) as err:
        timeline.decode_cursor("other-app", token)
    assert str(err.value) == "query: cursor: belongs to another app"


def _b64(obj) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("token", [
    "",
    "not base64!",
    "A" * 600,
    _b64(b"\xff\xfe"),
    _b64(b"[1,2]"),
    _b64({"app": APP, "before": "x.json", "v": 1}),
    _b64({"app": APP, "before": "20261125T144600.123456Z_../../x.json", "v": 1}),
    _b64({"app": APP, "before": "20261125T144600.123456Z_S1.json", "v": 2}),
    _b64({"app": APP, "before": "20261125T144600.123456Z_S1.json", "v": 1, "extra": 1}),
    _b64({"app": APP, "before": ["20261125T144600.123456Z_S1.json"], "v": 1}),
    base64.urlsafe_b64encode(b'{"v":1,"app":"billing-api","before":"20261125T144600.123456Z_S1.json"}').decode(),
])
def test_malformed_cursors_are_400(token):
    with pytest.raises(FormatError) as err:
        timeline.decode_cursor(APP, token)
    assert str(err.value).startswith("query: cursor: malformed")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_any_string_is_a_valid_cursor_or_a_400(token):
    try:
        name = timeline.decode_cursor(APP, token)
    except FormatError as err:
        assert err.field == "cursor"
    else:
        assert timeline.encode_cursor(APP, name) == token


def test_parse_query_accepts_the_documented_parameters():
    cursor = timeline.encode_cursor(APP, "20261125T144600.123456Z_S1.json")
    q = timeline.parse_query(APP, {"from": "2026-11-01T00:00:00Z", "to": "2026-12-01T00:00:00.5Z", "actor": "u-1",
                                   "status": "failed,incomplete", "limit": "10", "cursor": cursor}, None)
    assert q == timeline.TimelineQuery(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, 0, 0, 0, 500000, UTC),
                                       "u-1", frozenset({"failed", "incomplete"}), 10,
                                       "20261125T144600.123456Z_S1.json")
    assert timeline.parse_query(APP, None, None) == timeline.TimelineQuery()


@pytest.mark.parametrize(("single", "multi", "message"), [
    ({"limit": "0"}, None, "query: limit: must be an integer from 1 to 200"),
    ({"limit": "201"}, None, "query: limit: must be an integer from 1 to 200"),
    ({"limit": "1e3"}, None, "query: limit: must be an integer from 1 to 200"),
    ({"limit": "٣"}, None, "query: limit: must be an integer from 1 to 200"),
    ({"from": "yesterday"}, None, "query: from: not an RFC 3339 UTC time: 'yesterday'"),
    ({"from": "2026-12-01T00:00:00Z", "to": "2026-11-01T00:00:00Z"}, None, "query: from: must be before 'to'"),
    ({"status": "running"}, None,
     "query: status: must be one or more of succeeded, failed, killed, abandoned, incomplete, comma-separated"),
    ({"sort": "asc"}, None, "query: sort: unknown parameter (allowed: from, to, actor, status, limit, cursor)"),
    ({"limit": "5"}, {"limit": ["5", "6"]}, "query: limit: given more than once"),
    ({"actor": "x" * 2000}, None, "query: actor: longer than 1024 characters"),
])
def test_parse_query_rejections(single, multi, message):
    with pytest.raises(FormatError) as err:
        timeline.parse_query(APP, single, multi)
    assert str(err.value) == message
