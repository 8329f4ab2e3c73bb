"""App ids and session ids: the safe alphabet, exact rejections, ULID generation."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oneoff_audit.errors import InvalidIdError
from oneoff_audit.ids import APP_ID_MAX, SESSION_ID_MAX, new_session_id, validate_app, validate_session_id

pytestmark = pytest.mark.unit

APP_CHARSET = "allowed characters are a-z 0-9 . _ -, starting and ending alphanumeric"
SID_CHARSET = "allowed characters are A-Z a-z 0-9 _ -, starting and ending alphanumeric"


@pytest.mark.parametrize("app", ["a", "0", "billing-api", "web.prod", "a_b", "a" * APP_ID_MAX, "x1.y2-z3_q"])
def test_valid_app_ids(app):
    assert validate_app(app) == app


@pytest.mark.parametrize("sid", ["A", "01JDQ8ZK3V4Y2S6T7W8X9A0B1C", "run-42_b", "S" * SESSION_ID_MAX])
def test_valid_session_ids(sid):
    assert validate_session_id(sid) == sid


HOSTILE_APPS = [
    ("../x", "must not contain '..'"),
    ("a..b", "must not contain '..'"),
    ("..", "must not contain '..'"),
    ("a/b", APP_CHARSET),
    ("%2F", APP_CHARSET),
    ("a%2Fb", APP_CHARSET),
    ("\uff41\uff50\uff50", APP_CHARSET),  # fullwidth look-alike of "app"
    ("", "must not be empty"),
    ("a" * 200, f"longer than {APP_ID_MAX} characters"),
    ("a" * (APP_ID_MAX + 1), f"longer than {APP_ID_MAX} characters"),
    ("App", APP_CHARSET),
    ("app\n", APP_CHARSET),
    ("app ", APP_CHARSET),
    ("-app", APP_CHARSET),
    ("app.", APP_CHARSET),
    (".", APP_CHARSET),
    ("a\x00b", APP_CHARSET),
    ("a\\b", APP_CHARSET),
    ("é", APP_CHARSET),
]


@pytest.mark.parametrize(("app", "reason"), HOSTILE_APPS)
def test_hostile_app_ids_rejected_with_exact_error(app, reason):
    with pytest.raises(InvalidIdError) as info:
        validate_app(app)
    assert str(info.value) == f"invalid app id {app!r}: {reason}"
    assert (info.value.kind, info.value.value, info.value.reason) == ("app id", app, reason)


HOSTILE_SIDS = [
    ("../x", "must not contain '..'"),
    ("a/b", SID_CHARSET),
    ("%2F", SID_CHARSET),
    ("\uff21\uff22\uff23", SID_CHARSET),  # fullwidth "ABC"
    ("", "must not be empty"),
    ("S" * 200, f"longer than {SESSION_ID_MAX} characters"),
    ("a.b", SID_CHARSET),
    ("abc\n", SID_CHARSET),
    ("_abc", SID_CHARSET),
    ("abc-", SID_CHARSET),
    ("a b", SID_CHARSET),
    ("٣", SID_CHARSET),  # an Arabic-Indic digit is not 0-9
]


@pytest.mark.parametrize(("sid", "reason"), HOSTILE_SIDS)
def test_hostile_session_ids_rejected_with_exact_error(sid, reason):
    with pytest.raises(InvalidIdError) as info:
        validate_session_id(sid)
    assert str(info.value) == f"invalid session id {sid!r}: {reason}"


@pytest.mark.parametrize("value", [None, 5, b"app", ["app"]])
def test_non_strings_rejected(value):
    with pytest.raises(InvalidIdError, match=re.escape(f"invalid app id {value!r}: must be a string")):
        validate_app(value)
    with pytest.raises(InvalidIdError, match=re.escape(f"invalid session id {value!r}: must be a string")):
        validate_session_id(value)


def test_invalid_id_error_is_a_value_error():
    assert issubclass(InvalidIdError, ValueError)


_APP_MODEL = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?", re.ASCII)
_SID_MODEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?", re.ASCII)
_ID_TEXT = st.one_of(
    st.text(alphabet="abcAZ09._-/%\n \uff41\u0663", max_size=12),
    st.text(max_size=12),
    st.text(alphabet="ab.", min_size=95, max_size=135),
)


def _accepts(fn, value) -> bool:
    try:
        fn(value)
    except InvalidIdError:
        return False
    return True


@settings(max_examples=200, deadline=None)
@given(_ID_TEXT)
def test_validators_match_their_model(value):
    app_ok = bool(_APP_MODEL.fullmatch(value)) and ".." not in value and len(value) <= APP_ID_MAX
    sid_ok = bool(_SID_MODEL.fullmatch(value)) and len(value) <= SESSION_ID_MAX
    assert _accepts(validate_app, value) is app_ok
    assert _accepts(validate_session_id, value) is sid_ok


def test_new_session_id_is_a_ulid():
    sid = new_session_id(now=1_795_618_760.123)
    assert len(sid) == 26
    assert re.fullmatch(r"[0-9ABCDEFGHJKMNPQRSTVWXYZ]{26}", sid)
    assert validate_session_id(sid) == sid
    # The first 10 characters are the millisecond timestamp, Crockford base32.
    millis = 0
    for char in sid[:10]:
        millis = millis * 32 + "0123456789ABCDEFGHJKMNPQRSTVWXYZ".index(char)
    assert millis == 1_795_618_760_123


def test_new_session_ids_sort_by_time_and_are_unique():
    earlier = [new_session_id(now=1_000_000.000) for _ in range(50)]
    later = [new_session_id(now=1_000_000.001) for _ in range(50)]
    assert len(set(earlier + later)) == 100
    assert max(earlier) < min(later)
    assert new_session_id() != new_session_id()
