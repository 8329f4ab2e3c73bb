"""The provisioned stack works over real HTTP: notification on closed.json, KMS round trip."""

from __future__ import annotations

import json

import pytest

from oneoff_audit.aws import client
from oneoff_audit.crypto import ALGORITHM, decrypt_bytes, encryption_context, key_provider, sdk_client

pytestmark = pytest.mark.integration


def test_closed_marker_notifies_queue_and_chunks_do_not(stack):
    s3, sqs = client("s3"), client("sqs")
    s3.put_object(Bucket=stack.bucket, Key="staging/app1/S1/chunks/00000000.gz", Body=b"x")
    s3.put_object(Bucket=stack.bucket, Key="staging/app1/S1/closed.json", Body=b"{}")
    keys = []
    for _ in range(3):
        for msg in sqs.receive_message(QueueUrl=stack.queue_url, MaxNumberOfMessages=10).get("Messages", []):
            for record in json.loads(msg["Body"]).get("Records", []):
                keys.append(record["s3"]["object"]["key"])
    assert keys == ["staging%2Fapp1%2FS1%2Fclosed.json"]


def test_kms_round_trip_checks_context(stack):
    ciphertext, _ = sdk_client().encrypt(
        source=b"abc", key_provider=key_provider(stack.kms_key_id),
        encryption_context=encryption_context("app1", "S1"), algorithm=ALGORITHM,
    )
    assert decrypt_bytes(ciphertext, stack.kms_key_id, "app1", "S1") == b"abc"
    with pytest.raises(Exception, match="not 'app2'"):
        decrypt_bytes(ciphertext, stack.kms_key_id, "app2", "S1")
