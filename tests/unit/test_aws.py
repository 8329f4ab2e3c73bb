"""Cached clients follow the environment they were built from (no network: building a client sends nothing)."""

from __future__ import annotations

import pytest

from oneoff_audit import aws

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _fresh_cache():
    aws.reset_clients()
    yield
    aws.reset_clients()


def _access_key(s3) -> str:
    return s3._request_signer._credentials.get_frozen_credentials().access_key


def test_same_environment_reuses_the_client(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert aws.client("s3") is aws.client("s3")
    assert aws.client_no_retry("s3") is aws.client_no_retry("s3")
    assert aws.botocore_session() is aws.botocore_session()
    assert aws.client("s3") is not aws.client_no_retry("s3")


def test_a_client_never_outlives_the_credentials_it_was_built_with(monkeypatch):
    """A client cached while a row swapped in other credentials is not served once they are restored
    (CI once failed 79 tests this way: a client built from a stopped container-credentials endpoint stayed cached)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    before = aws.client("s3")
    assert _access_key(before) == "testing"
    with monkeypatch.context() as scoped:
        scoped.setenv("AWS_ACCESS_KEY_ID", "other-key")
        during = aws.client("s3")
        assert during is not before and _access_key(during) == "other-key"
        assert aws.botocore_session().get_credentials().access_key == "other-key"
    after = aws.client("s3")
    assert after is before and _access_key(after) == "testing"
    assert aws.botocore_session().get_credentials().access_key == "testing"


def test_a_new_endpoint_gets_a_new_client(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    first = aws.client("s3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    second = aws.client("s3")
    assert first.meta.endpoint_url == "http://127.0.0.1:1" and second.meta.endpoint_url == "http://127.0.0.1:2"


def test_reset_forgets_every_cached_client(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    built = (aws.client("kms"), aws.client_no_retry("s3"), aws.botocore_session())
    aws.reset_clients()
    rebuilt = (aws.client("kms"), aws.client_no_retry("s3"), aws.botocore_session())
    assert all(a is not b for a, b in zip(built, rebuilt, strict=True))
