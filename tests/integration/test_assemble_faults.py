"""S3 and KMS errors: throttling and 500s are retried by botocore and the session is filed; persistent
errors leave staging untouched and the message ends in the dead-letter queue, with the reason logged.

Faults are injected with botocore ``before-send`` hooks: the hook answers instead of the server with
a real error response (status, code, body), and botocore's own retry logic handles it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import pytest
from botocore.awsrequest import AWSResponse
from helpers_staging import (
    build_chunks,
    capture_logs,
    expected_log,
    index_objects,
    output_events,
    read_log,
    session_header,
    stage,
    staged_keys,
)

from oneoff_audit import aws, keys
from oneoff_audit.assemble import assemble_session
from oneoff_audit.aws import botocore_session, client
from oneoff_audit.config import AssemblerConfig
from oneoff_audit.local import load_handler, sqs_batch_event

pytestmark = pytest.mark.integration

APP = "payments"


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: object) -> Iterator[bytes]:
        yield self.body


def error_response(service: str, status: int, code: str) -> AWSResponse:
    """What S3 (XML) or KMS (JSON) sends for an error."""
    if service == "s3":
        body = f"<Error><Code>{code}</Code><Message>injected {code}</Message></Error>".encode()
        headers = {"Content-Type": "application/xml"}
    else:
        body = json.dumps({"__type": code, "message": f"injected {code}"}).encode()
        headers = {"Content-Type": "application/x-amz-json-1.1"}
    return AWSResponse("https://injected.invalid/", status, headers, _Raw(body))


class Faults:
    """Answers the first ``n`` calls of an operation with an error, counting every call."""

    def __init__(self) -> None:
        self.plan: dict[str, list[tuple[int, str]]] = {}
        self.calls: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self._unhook: list = []

    def hook(self, emitter, service: str, operation: str, errors: list[tuple[int, str]] | None,
             always: tuple[int, str] | None = None) -> None:
        name = f"{service}.{operation}"
        self.plan[name] = list(errors or [])

        def before_send(request, **_):
            self.calls[name] += 1
            if always is not None:
                self.injected[name] += 1
                return error_response(service, *always)
            if self.plan[name]:
                self.injected[name] += 1
                return error_response(service, *self.plan[name].pop(0))
            return None

        unique = f"fault-{name}-{id(self)}"
        emitter.register(f"before-send.{service}.{operation}", before_send, unique_id=unique)
        self._unhook.append((emitter, f"before-send.{service}.{operation}", unique))

    def remove(self) -> None:
        for emitter, event, unique in self._unhook:
            emitter.unregister(event, unique_id=unique)


@pytest.fixture
def faults() -> Iterator[Faults]:
    injected = Faults()
    yield injected
    injected.remove()


def staged(stack, sid: str):
    batches = [output_events([f"charge {i} \u20ac\r\n" * 20], start=i) for i in range(3)]
    stage(stack.bucket, build_chunks(APP, sid, batches))
    return batches


def test_throttling_and_server_errors_are_retried_and_the_session_is_filed(stack, faults):
    config = AssemblerConfig(bucket=stack.bucket, kms_key_id=stack.kms_key_id, signing_key_id=stack.signing_key_id)
    sid = "RETRIED1"
    batches = staged(stack, sid)
    s3_events = client("s3").meta.events
    faults.hook(s3_events, "s3", "GetObject", [(503, "SlowDown")])
    faults.hook(s3_events, "s3", "UploadPart", [(500, "InternalError")])
    faults.hook(s3_events, "s3", "CompleteMultipartUpload", [(503, "SlowDown")])
    faults.hook(s3_events, "s3", "PutObject", [(500, "InternalError")])
    faults.hook(s3_events, "s3", "DeleteObjects", [(503, "ServiceUnavailable")])
    kms_events = botocore_session()  # the Encryption SDK builds its KMS clients from this session
    faults.hook(kms_events, "kms", "GenerateDataKey", [(400, "ThrottlingException"), (500, "KMSInternalException")])

    filed = assemble_session(config, APP, sid)

    assert dict(faults.injected) == {"s3.GetObject": 1, "s3.UploadPart": 1, "s3.CompleteMultipartUpload": 1,
                                     "s3.PutObject": 1, "s3.DeleteObjects": 1, "kms.GenerateDataKey": 2}
    for name, count in faults.injected.items():
        assert faults.calls[name] > count, name  # retried after the injected failures
    log = read_log(stack.bucket, APP, sid, stack.kms_key_id)
    assert log == expected_log(session_header(APP, sid), batches, json.loads(log.splitlines()[-1]))
    assert filed.complete is True and len(index_objects(stack.bucket, APP)) == 1
    assert staged_keys(stack.bucket, APP, sid) == []


@pytest.mark.parametrize(("service", "operation", "error"), [
    ("s3", "UploadPart", (500, "InternalError")),
    ("kms", "GenerateDataKey", (400, "ThrottlingException")),
])
def test_persistent_errors_end_in_the_dead_letter_queue_with_the_reason(stack, faults, monkeypatch, lambda_context,
                                                                        service, operation, error):
    # Fewer botocore attempts than in production, so that each delivery gives up quickly.
    monkeypatch.setattr(aws, "RETRY_CONFIG", aws.RETRY_CONFIG.merge(
        aws.Config(retries={"mode": "standard", "max_attempts": 2})))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    monkeypatch.setenv("ASSEMBLE_MAX_ATTEMPTS", "2")
    aws.reset_clients()
    sqs = client("sqs")
    dlq_url = sqs.create_queue(QueueName=f"dlq-{operation}")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs.create_queue(QueueName=f"q-{operation}", Attributes={
        "VisibilityTimeout": "30",
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"})})["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sid = f"DLQ-{operation}"
    staged(stack, sid)
    before = sorted(staged_keys(stack.bucket, APP, sid))
    body = json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": {
        "bucket": {"name": stack.bucket}, "object": {"key": keys.closed_key(APP, sid)}}}]})
    sqs.send_message(QueueUrl=queue_url, MessageBody=body)
    emitter = client("s3").meta.events if service == "s3" else botocore_session()
    faults.hook(emitter, service, operation, None, always=error)
    handler = load_handler("assembler")

    with capture_logs() as logs:
        for _ in range(4):  # Lambda's event source mapping, one delivery at a time
            messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=1, AttributeNames=["All"],
                                           VisibilityTimeout=30).get("Messages", [])
            if not messages:
                break
            response = handler(sqs_batch_event(messages, queue_arn), lambda_context)
            for message in messages:
                if {"itemIdentifier": message["MessageId"]} in response["batchItemFailures"]:
                    sqs.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"],
                                                  VisibilityTimeout=0)
                else:
                    sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])

    dead = sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10).get("Messages", [])
    assert [m["Body"] for m in dead] == [body]
    failures = logs.find("message not processed; it will be retried, then dead-lettered")
    assert [line["receive_count"] for line in failures] == [1, 2]
    code = error[1]
    root = f"{operation}: {code}: injected {code}"
    for line in failures:
        assert line["level"] == "ERROR" and line["message_id"] == dead[0]["MessageId"]
        if service == "kms":  # the Encryption SDK wraps the KMS error; the log line names both
            assert line["reason"].startswith("GenerateKeyError: Master Key ")
            assert line["reason"].endswith(f"unable to generate data key; caused by {root}")
        else:
            assert line["reason"] == root
    assert faults.injected[f"{service}.{operation}"] >= 4  # two deliveries, each retried by botocore
    assert sorted(staged_keys(stack.bucket, APP, sid)) == before  # nothing deleted
    assert client("s3").list_objects_v2(Bucket=stack.bucket, Prefix=f"logs/{APP}/").get("KeyCount") == 0
    assert index_objects(stack.bucket, APP) == []
    aws.reset_clients()
