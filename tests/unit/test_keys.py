"""Every S3 key: exact layout, build/parse round trips, URL-encoded event keys, hostile shapes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import quote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oneoff_audit import aws, keys
from oneoff_audit.errors import InvalidIdError
from oneoff_audit.keys import StagingKey, parse_staging_key

pytestmark = pytest.mark.unit

APP = "billing-api"
SID = "01JDQ8ZK3V4Y2S6T7W8X9A0B1C"
STAGING_SHAPE = "not <app>/<session>/{opened.json,closed.json,chunks/NNNNNNNN.gz}"


def test_exact_layout_of_every_key():
    started = datetime(2026, 11, 25, 14, 46, 0, 123456, tzinfo=UTC)
    assert keys.session_prefix(APP, SID) == f"staging/{APP}/{SID}/"
    assert keys.opened_key(APP, SID) == f"staging/{APP}/{SID}/opened.json"
    assert keys.closed_key(APP, SID) == f"staging/{APP}/{SID}/closed.json"
    assert keys.chunk_key(APP, SID, 0) == f"staging/{APP}/{SID}/chunks/00000000.gz"
    assert keys.chunk_key(APP, SID, 99_999_999) == f"staging/{APP}/{SID}/chunks/99999999.gz"
    assert keys.log_key(APP, SID) == f"logs/{APP}/{SID}.jsonl.enc"
    assert keys.index_prefix(APP) == f"index/{APP}/"
    assert keys.index_key(APP, SID, started) == f"index/{APP}/20261125T144600.123456Z_{SID}.json"
    assert keys.manifest_key(APP, SID) == f"manifests/{APP}/{SID}.json"
    assert keys.digest_key(APP, started) == f"digests/{APP}/2026/11/25/14.json"
    assert keys.access_prefix(APP, SID) == f"access/{APP}/{SID}/"
    assert keys.opened_key(APP, SID, "audit/staging/") == f"audit/staging/{APP}/{SID}/opened.json"


def test_times_in_keys_are_utc():
    local = datetime(2026, 11, 25, 16, 46, 0, 5, tzinfo=timezone(timedelta(hours=2)))
    assert keys.compact_time(local) == "20261125T144600.000005Z"
    assert keys.index_key(APP, SID, local) == f"index/{APP}/20261125T144600.000005Z_{SID}.json"
    assert keys.digest_key(APP, local) == f"digests/{APP}/2026/11/25/14.json"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2999, 12, 31),
                             timezones=st.just(UTC)), min_size=2, max_size=5))
def test_index_keys_sort_like_start_times(times):
    ordered = sorted(times)
    assert sorted(keys.index_key(APP, SID, t) for t in times) == [keys.index_key(APP, SID, t) for t in ordered]


_APPS = st.from_regex(r"\A[a-z0-9](?:[a-z0-9_-]{0,6}[a-z0-9])?\Z")
_SIDS = st.from_regex(r"\A[A-Za-z0-9](?:[A-Za-z0-9_-]{0,30}[A-Za-z0-9])?\Z")
_SEQS = st.integers(min_value=0, max_value=keys.MAX_SEQ)
_PREFIXES = st.sampled_from(["staging/", "audit/staging/", "x/"])


@settings(max_examples=80, deadline=None)
@given(_APPS, _SIDS, _SEQS, _PREFIXES, st.booleans())
def test_build_parse_round_trip_for_every_kind(app, sid, seq, prefix, encoded):
    def parse(key):
        # S3 event notifications carry the key URL-encoded (space as '+').
        return parse_staging_key(quote_plus(key, safe="/") if encoded else key, prefix, url_encoded=encoded)

    assert parse(keys.opened_key(app, sid, prefix)) == StagingKey(app, sid, "opened")
    assert parse(keys.closed_key(app, sid, prefix)) == StagingKey(app, sid, "closed")
    assert parse(keys.chunk_key(app, sid, seq, prefix)) == StagingKey(app, sid, "chunk", seq)


def test_url_encoded_event_keys_are_decoded_before_validation():
    # An encoded '.' is legal and decodes to a valid app id.
    assert parse_staging_key("staging/web%2Eprod/S1/closed.json", url_encoded=True) == StagingKey(
        "web.prod", "S1", "closed")
    # Without url_encoded the same text is taken literally, and '%' is not an id character.
    with pytest.raises(InvalidIdError) as info:
        parse_staging_key("staging/web%2Eprod/S1/closed.json")
    assert str(info.value) == ("invalid app id 'web%2Eprod': allowed characters are a-z 0-9 . _ -, "
                               "starting and ending alphanumeric")


HOSTILE_KEYS = [
    # (key as received, url_encoded, exact message)
    ("logs/app/S1/closed.json", False,
     "invalid staging key 'logs/app/S1/closed.json': does not start with 'staging/'"),
    ("staging/app/S1/other.json", False,
     f"invalid staging key 'staging/app/S1/other.json': {STAGING_SHAPE}"),
    ("staging/app/S1/closed.json/", False,
     f"invalid staging key 'staging/app/S1/closed.json/': {STAGING_SHAPE}"),
    ("staging/app/S1/x/closed.json", False,
     f"invalid staging key 'staging/app/S1/x/closed.json': {STAGING_SHAPE}"),
    ("staging/app/closed.json", False,
     f"invalid staging key 'staging/app/closed.json': {STAGING_SHAPE}"),
    ("staging/app/S1/chunks/1.gz", False,
     "invalid staging key 'staging/app/S1/chunks/1.gz': chunk name must be <seq:08d>.gz"),
    ("staging/app/S1/chunks/000000001.gz", False,
     "invalid staging key 'staging/app/S1/chunks/000000001.gz': chunk name must be <seq:08d>.gz"),
    ("staging/app/S1/chunks/0000000a.gz", False,
     "invalid staging key 'staging/app/S1/chunks/0000000a.gz': chunk name must be <seq:08d>.gz"),
    ("staging/app/S1/chunks/00000001.gz.tmp", False,
     "invalid staging key 'staging/app/S1/chunks/00000001.gz.tmp': chunk name must be <seq:08d>.gz"),
    # Fullwidth digits are \d in Python's re and int() accepts them: they must not alias chunk 1.
    ("staging/app/S1/chunks/\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff11.gz", False,
     "invalid staging key 'staging/app/S1/chunks/\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff11.gz': "
     "chunk name must be <seq:08d>.gz"),
    ("staging/../S1/closed.json", False, "invalid app id '..': must not contain '..'"),
    ("staging/app/../closed.json", False, "invalid session id '..': must not contain '..'"),
    ("staging//S1/closed.json", False, "invalid app id '': must not be empty"),
    ("staging/app//closed.json", False, "invalid session id '': must not be empty"),
    ("staging/App/S1/closed.json", False,
     "invalid app id 'App': allowed characters are a-z 0-9 . _ -, starting and ending alphanumeric"),
    ("staging/app/S.1/opened.json", False,
     "invalid session id 'S.1': allowed characters are A-Z a-z 0-9 _ -, starting and ending alphanumeric"),
    (f"staging/{'a' * 200}/S1/closed.json", False, f"invalid app id {'a' * 200!r}: longer than 100 characters"),
    # URL-encoded event keys: decoding must not smuggle a '/' or '..' into an id.
    ("staging/app/a%2F..%2Fb/closed.json", True,
     f"invalid staging key 'staging/app/a%2F..%2Fb/closed.json': {STAGING_SHAPE}"),
    ("staging/%2E%2E/S1/closed.json", True, "invalid app id '..': must not contain '..'"),
    ("staging/app/S%2F1/closed.json", True,
     f"invalid staging key 'staging/app/S%2F1/closed.json': {STAGING_SHAPE}"),
    ("staging/app/S%252F1/closed.json", True,  # double-encoded: one decoding leaves '%2F', not an id char
     "invalid session id 'S%2F1': allowed characters are A-Z a-z 0-9 _ -, starting and ending alphanumeric"),
    ("staging/%EF%BD%81pp/S1/closed.json", True,  # fullwidth 'a'
     "invalid app id '\uff41pp': allowed characters are a-z 0-9 . _ -, starting and ending alphanumeric"),
    ("staging/my+app/S1/closed.json", True,  # '+' is a space in event keys
     "invalid app id 'my app': allowed characters are a-z 0-9 . _ -, starting and ending alphanumeric"),
    ("staging/app/S1/closed.json%00", True,
     f"invalid staging key 'staging/app/S1/closed.json%00': {STAGING_SHAPE}"),
]


@pytest.mark.parametrize(("key", "encoded", "message"), HOSTILE_KEYS)
def test_hostile_staging_keys_rejected_with_exact_error(key, encoded, message):
    with pytest.raises(InvalidIdError) as info:
        parse_staging_key(key, url_encoded=encoded)
    assert str(info.value) == message


def test_encoded_chunk_slash_parses_like_the_plain_key():
    # An S3 event never encodes '/', but if it did, the decoded key is the same valid key.
    assert parse_staging_key("staging/app/S1/chunks%2F00000001.gz", url_encoded=True) == StagingKey(
        "app", "S1", "chunk", 1)


HOSTILE_IDS = ["../x", "a/b", "%2F", "\uff41\uff50\uff50", "", "a" * 200, "a\nb", None]


@pytest.mark.parametrize("bad", HOSTILE_IDS)
def test_every_builder_rejects_hostile_ids_before_any_s3_call(bad, monkeypatch):
    def no_s3(*args, **kwargs):
        raise AssertionError("an S3 client was requested")

    monkeypatch.setattr(aws, "client", no_s3)
    when = datetime(2026, 11, 25, tzinfo=UTC)
    builders_app = [
        lambda a: keys.session_prefix(a, SID), lambda a: keys.opened_key(a, SID), lambda a: keys.closed_key(a, SID),
        lambda a: keys.chunk_key(a, SID, 0), lambda a: keys.log_key(a, SID), lambda a: keys.index_prefix(a),
        lambda a: keys.index_key(a, SID, when), lambda a: keys.manifest_key(a, SID),
        lambda a: keys.digest_key(a, when), lambda a: keys.access_prefix(a, SID),
    ]
    builders_sid = [
        lambda s: keys.session_prefix(APP, s), lambda s: keys.opened_key(APP, s), lambda s: keys.closed_key(APP, s),
        lambda s: keys.chunk_key(APP, s, 0), lambda s: keys.log_key(APP, s), lambda s: keys.index_key(APP, s, when),
        lambda s: keys.manifest_key(APP, s), lambda s: keys.access_prefix(APP, s),
    ]
    for build in builders_app:
        with pytest.raises(InvalidIdError) as info:
            build(bad)
        assert info.value.kind == "app id" and info.value.value == bad
    for build in builders_sid:
        with pytest.raises(InvalidIdError) as info:
            build(bad)
        assert info.value.kind == "session id" and info.value.value == bad


@pytest.mark.parametrize("seq", [-1, keys.MAX_SEQ + 1, True, "1", 1.0, None])
def test_chunk_seq_out_of_range(seq):
    with pytest.raises(InvalidIdError) as info:
        keys.chunk_key(APP, SID, seq)
    assert str(info.value) == f"invalid chunk seq {seq!r}: must be an integer 0..99999999"


@pytest.mark.parametrize("prefix", ["", "staging", "/staging/", "a/../", "../"])
def test_bad_staging_prefix(prefix):
    message = f"invalid key prefix {prefix!r}: must be non-empty, relative and end with '/'"
    with pytest.raises(InvalidIdError) as info:
        keys.opened_key(APP, SID, prefix)
    assert str(info.value) == message
    with pytest.raises(InvalidIdError) as info:
        parse_staging_key(f"staging/{APP}/{SID}/opened.json", prefix)
    assert str(info.value) == message
    with pytest.raises(InvalidIdError):
        keys.validate_prefix(prefix)
    assert keys.validate_prefix("staging/") == "staging/"


def test_parse_with_another_prefix_does_not_accept_the_default_one():
    with pytest.raises(InvalidIdError) as info:
        parse_staging_key(f"staging/{APP}/{SID}/opened.json", "audit/")
    assert str(info.value) == f"invalid staging key 'staging/{APP}/{SID}/opened.json': does not start with 'audit/'"
