"""The API's decisions that come before any S3 call: 400, 401, 403, unknown routes, the error body."""

from __future__ import annotations

import json

import pytest

from oneoff_audit.api.app import app
from oneoff_audit.api.httpbridge import build_event

pytestmark = pytest.mark.unit

READER = {"sub": "u-1", "custom:audit_apps": "billing-api"}
TOKENS = {"reader": READER, "nobody": {"sub": "u-2"}}


@pytest.fixture(autouse=True)
def _no_aws(monkeypatch):
    """Settings that point nowhere: these requests must be answered before any AWS call."""
    monkeypatch.setenv("AUDIT_BUCKET", "no-such-bucket")
    monkeypatch.setenv("AUDIT_KMS_KEY_ID", "arn:aws:kms:us-east-1:123456789012:key/none")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: a call would fail


def call(path: str, token: str | None = "reader", method: str = "GET") -> tuple[int, dict, dict]:
    headers = [("Authorization", f"Bearer {token}")] if token else []
    resp = app.resolve(build_event(method, path, headers, b"", "127.0.0.1", TOKENS), None)
    return resp["statusCode"], json.loads(resp["body"]), resp.get("multiValueHeaders") or resp.get("headers")


@pytest.mark.parametrize("path", [
    "/apps/billing-api/sessions",
    "/apps/billing-api/sessions/S1",
    "/apps/billing-api/sessions/S1/log",
    "/apps/billing-api/sessions/S1/access",
])
def test_no_identity_is_401(path):
    for token in (None, "unknown-token"):
        assert call(path, token)[:2] == (401, {
            "error": "unauthorized", "message": "no caller identity: the request did not pass an authorizer"})


def test_403_body_is_the_same_whether_the_app_exists_or_not():
    # 'payments' may well exist; 'zz-never-created' surely does not: the caller cannot tell them apart
    for path in ("/apps/payments/sessions", "/apps/zz-never-created/sessions"):
        status, body, _ = call(path)
        app_id = path.split("/")[2]
        assert (status, body) == (403, {"error": "forbidden", "message": f"not allowed to read app {app_id!r}"})
    assert call("/apps/payments/sessions/S1/log", "nobody")[:2] == (
        403, {"error": "forbidden", "message": "not allowed to read app 'payments'"})


@pytest.mark.parametrize(("path", "message"), [
    ("/apps/Billing/sessions", "invalid app id 'Billing': allowed characters are a-z 0-9 . _ -, "
                               "starting and ending alphanumeric"),
    ("/apps/a..b/sessions", "invalid app id 'a..b': must not contain '..'"),
    ("/apps/billing-api/sessions/..", "invalid session id '..': must not contain '..'"),
    ("/apps/billing-api/sessions/S%201/log", "invalid session id 'S 1': allowed characters are A-Z a-z 0-9 _ -, "
                                            "starting and ending alphanumeric"),
    ("/apps/billing-api/sessions?limit=0", "query: limit: must be an integer from 1 to 200"),
    ("/apps/billing-api/sessions?cursor=abc", "query: cursor: malformed (not a cursor returned by this API)"),
    ("/apps/billing-api/sessions/S1/log?format=pdf", "query: format: must be 'json' or 'asciicast'"),
    ("/apps/billing-api/sessions/S1?x=1", "query: x: unknown parameter (this route takes none)"),
])
def test_malformed_requests_are_400_before_any_aws_call(path, message):
    assert call(path)[:2] == (400, {"error": "bad_request", "message": message})


def test_ids_are_checked_before_identity():
    assert call("/apps/Bad!/sessions", None)[0] == 400


def test_unknown_route_is_404_in_the_same_shape():
    assert call("/nothing/here")[:2] == (404, {"error": "not_found", "message": "no such route"})
    assert call("/apps/billing-api/sessions", method="DELETE")[:2] == (
        404, {"error": "not_found", "message": "no such route"})


def test_responses_are_not_cacheable():
    _, _, headers = call("/apps/payments/sessions")
    flat = {k: v[0] if isinstance(v, list) else v for k, v in headers.items()}
    assert flat["Cache-Control"] == "no-store"
    assert flat["Content-Type"] == "application/json"
