"""Identity from each authorizer shape, the apps claim grammar, 401/403 decisions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oneoff_audit.api.auth import Identity, identity_from_event, parse_apps, require_admin, require_app
from oneoff_audit.errors import AccessDeniedError, UnauthorizedError

pytestmark = pytest.mark.unit


def _event(authorizer):
    return {"requestContext": {"authorizer": authorizer}}


def test_cognito_claims():
    ident = identity_from_event(_event({"claims": {
        "sub": "u-1", "email": "ann@example.com", "custom:audit_apps": "app1, app2 app3", "custom:audit_admin": "true",
    }}))
    assert ident == Identity("u-1", frozenset({"app1", "app2", "app3"}), False, True, "ann@example.com", "cognito")


def test_http_api_jwt_claims_with_flattened_array():
    ident = identity_from_event(_event({"jwt": {"claims": {"sub": "u-2", "custom:audit_apps": "[app1 app2]"}}}))
    assert ident == Identity("u-2", frozenset({"app1", "app2"}), False, False, None, "jwt")


def test_lambda_authorizer_context():
    authorizer = {"principalId": "svc-9", "custom:audit_apps": "*", "custom:audit_admin": "false"}
    ident = identity_from_event(_event(authorizer))
    assert ident == Identity("svc-9", frozenset(), True, False, None, "lambda-authorizer")
    assert ident.may_read("anything")


@pytest.mark.parametrize("event", [
    {},
    {"requestContext": {}},
    {"requestContext": {"authorizer": None}},
    {"requestContext": {"authorizer": {}}},
    {"requestContext": {"authorizer": {"claims": {"custom:audit_apps": "*"}}}},
    {"requestContext": {"authorizer": {"claims": {"sub": "   "}}}},
    {"requestContext": {"authorizer": {"jwt": {"claims": {"sub": 5}}}}},
    {"requestContext": {"authorizer": {"principalId": ""}}},
])
def test_no_identity_is_unauthorized(event):
    with pytest.raises(UnauthorizedError, match="no caller identity"):
        identity_from_event(event)


@pytest.mark.parametrize(("claim", "apps", "all_apps"), [
    (None, set(), False),
    ("", set(), False),
    ("app1", {"app1"}, False),
    ("app1,,app2", {"app1", "app2"}, False),
    ("App1 ../x app-2 a/b", {"app-2"}, False),
    (["app1", 7, "*"], set(), True),
    ("app1 *", set(), True),
    (42, set(), False),
])
def test_parse_apps(claim, apps, all_apps):
    assert parse_apps(claim) == (frozenset(apps), all_apps)


@given(st.text(max_size=60))
def test_parse_apps_never_grants_an_invalid_id(text):
    apps, all_apps = parse_apps(text)
    assert all_apps == ("*" in text.strip().removeprefix("[").removesuffix("]").replace(",", " ").split()
                        if text.strip().startswith("[") and text.strip().endswith("]")
                        else "*" in text.replace(",", " ").split())
    for app in apps:
        assert "/" not in app and ".." not in app and app == app.lower()


def test_require_app_message_does_not_depend_on_existence():
    ident = Identity("u", frozenset({"app1"}))
    require_app(ident, "app1")
    with pytest.raises(AccessDeniedError) as err:
        require_app(ident, "app2")
    assert str(err.value) == "not allowed to read app 'app2'"


def test_require_admin():
    require_admin(Identity("u", admin=True))
    with pytest.raises(AccessDeniedError, match="custom:audit_admin"):
        require_admin(Identity("u", frozenset({"app1"})))
