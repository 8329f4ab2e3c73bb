"""boto3 clients built lazily (never at import time), with adaptive retries.

The endpoint comes from the standard ``AWS_ENDPOINT_URL`` variable, so the same code talks to AWS
or to the embedded moto server. A cached client is reused only while the environment it was built
from (endpoint, region, credential source) is unchanged, so a client can never outlive the
credentials it was built with; :func:`reset_clients` drops every cached client.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import ClientError

RETRY_CONFIG = Config(
    retries={"mode": "adaptive", "max_attempts": 8},
    signature_version="s3v4",
    connect_timeout=5,
    read_timeout=60,
)


# The variables botocore reads to choose the endpoint, the region and the credentials.
CLIENT_ENVIRONMENT = (
    "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_CREDENTIAL_EXPIRATION",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


def client_environment() -> tuple[str | None, ...]:
    """The values of :data:`CLIENT_ENVIRONMENT` now: the cache key that ties a client to its environment."""
    return tuple(os.environ.get(name) for name in CLIENT_ENVIRONMENT)


def client(service: str) -> Any:
    """A cached boto3 client for ``service`` (``s3``, ``kms``, ``sqs``)."""
    return _client(service, client_environment())


@cache
def _client(service: str, environment: tuple[str | None, ...]) -> Any:
    return boto3.session.Session().client(service, config=RETRY_CONFIG)


# For callers that pace their own retries (the capture agent): one attempt per call, short connect
# timeout, so an S3 outage is noticed in seconds and backoff/spooling stay under the caller's control.
NO_RETRY_CONFIG = Config(
    retries={"mode": "standard", "max_attempts": 1},
    signature_version="s3v4",
    connect_timeout=3,
    read_timeout=30,
)


def client_no_retry(service: str) -> Any:
    """A cached boto3 client for ``service`` that makes exactly one attempt per call."""
    return _client_no_retry(service, client_environment())


@cache
def _client_no_retry(service: str, environment: tuple[str | None, ...]) -> Any:
    return boto3.session.Session().client(service, config=NO_RETRY_CONFIG)


def botocore_session() -> botocore.session.Session:
    """A cached botocore session for the AWS Encryption SDK's KMS master key provider."""
    return _botocore_session(client_environment())


@cache
def _botocore_session(environment: tuple[str | None, ...]) -> botocore.session.Session:
    return botocore.session.Session()


def reset_clients() -> None:
    """Forget every cached client so the next call builds a new one."""
    _client.cache_clear()
    _client_no_retry.cache_clear()
    _botocore_session.cache_clear()


NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchVersion"})


def error_code(err: ClientError) -> str:
    """The service's error code of a ClientError (``NoSuchKey``, ``PreconditionFailed``, ``404``, ...)."""
    return str(err.response.get("Error", {}).get("Code", ""))


def is_not_found(err: ClientError) -> bool:
    """True if ``err`` says the object (or version) does not exist."""
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return error_code(err) in NOT_FOUND_CODES or status == 404


def is_precondition_failed(err: ClientError) -> bool:
    """True if a conditional write (``If-None-Match: *``) found the key already there."""
    return error_code(err) in ("PreconditionFailed", "412")


def is_write_conflict(err: ClientError) -> bool:
    """True if S3 refused a conditional write because another one to the same key is in flight."""
    return error_code(err) in ("ConditionalRequestConflict", "409")
