"""Shared fixtures: fake AWS credentials, one moto server on loopback, fresh resources per test."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# Fake credentials and region before anything builds a client; nothing here may reach AWS.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_SESSION_TOKEN="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_REGION="us-east-1",
    POWERTOOLS_SERVICE_NAME="oneoff-audit",
    POWERTOOLS_METRICS_NAMESPACE="OneoffAudit",
    POWERTOOLS_TRACE_DISABLED="true",
    POWERTOOLS_DEV="false",
)
os.environ.pop("AWS_PROFILE", None)
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the moto server's request log is noise in test output
os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto server on 127.0.0.1 (real HTTP), shared by the session; sets AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    from oneoff_audit.aws import reset_clients

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    reset_clients()
    try:
        yield endpoint
    finally:
        server.stop()
        os.environ.pop("AWS_ENDPOINT_URL", None)
        reset_clients()


@dataclass(frozen=True)
class Stack:
    """Fresh resources on the moto server for one test."""

    endpoint: str
    bucket: str
    kms_key_id: str
    signing_key_id: str
    queue_url: str
    dlq_url: str

    def env(self) -> dict[str, str]:
        """Environment for a subprocess (agent, CLI) talking to this stack."""
        return {
            **os.environ,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AUDIT_BUCKET": self.bucket,
            "AUDIT_KMS_KEY_ID": self.kms_key_id,
            "AUDIT_SIGNING_KEY_ID": self.signing_key_id,
            "ASSEMBLY_QUEUE_URL": self.queue_url,
        }


@pytest.fixture
def stack(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """A new bucket, KMS keys and queues (via oneoff_audit.provision) and their env vars set."""
    from oneoff_audit.provision import provision

    suffix = uuid.uuid4().hex[:12]
    res = provision(bucket=f"audit-{suffix}", queue_name=f"assembly-{suffix}")
    for name, value in res.env().items():
        monkeypatch.setenv(name, value)
    return Stack(moto_endpoint, res.bucket, res.kms_key_id, res.signing_key_id, res.queue_url, res.dlq_url)


@dataclass
class FakeLambdaContext:
    """The attributes Powertools reads from a Lambda context."""

    function_name: str = "oneoff-audit-test"
    memory_limit_in_mb: int = 1024
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:oneoff-audit-test"
    aws_request_id: str = "52fdfc07-2182-154f-163f-5f0f9a621d72"

    def get_remaining_time_in_millis(self) -> int:
        return 300_000


@pytest.fixture
def lambda_context() -> FakeLambdaContext:
    """A fake LambdaContext for invoking handlers."""
    return FakeLambdaContext()


@pytest.fixture(autouse=True)
def reset_powertools_metrics() -> Iterator[None]:
    """Powertools keeps metrics in shared class state: every test starts (and ends) with none."""
    from aws_lambda_powertools.metrics import Metrics

    Metrics().clear_metrics()
    yield
    Metrics().clear_metrics()
