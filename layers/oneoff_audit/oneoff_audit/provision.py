"""Create the AWS resources the system needs on an S3/KMS/SQS endpoint (the embedded moto server).

In AWS the SAM template creates these; locally and in tests this function does, with the same
shape: a versioned bucket with Object Lock, a symmetric KMS key for logs, an asymmetric ECC key
for signing evidence, an assembly queue with a dead-letter queue, and the bucket notification
that sends every ``closed.json`` to the queue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from oneoff_audit.aws import client
from oneoff_audit.keys import DEFAULT_STAGING_PREFIX


@dataclass(frozen=True)
class Resources:
    """Names and ids of a provisioned set of resources."""

    bucket: str
    kms_key_id: str
    signing_key_id: str
    queue_url: str
    dlq_url: str
    staging_prefix: str = DEFAULT_STAGING_PREFIX

    def env(self) -> dict[str, str]:
        """The environment variables the agent, functions and CLI read for these resources."""
        return {
            "AUDIT_BUCKET": self.bucket,
            "AUDIT_KMS_KEY_ID": self.kms_key_id,
            "AUDIT_SIGNING_KEY_ID": self.signing_key_id,
            "AUDIT_STAGING_PREFIX": self.staging_prefix,
            "ASSEMBLY_QUEUE_URL": self.queue_url,
        }


def provision(bucket: str, queue_name: str = "oneoff-audit-assembly", max_receive_count: int = 5) -> Resources:
    """Create (idempotently where the API allows) every resource; return their identifiers."""
    s3: Any = client("s3")
    kms: Any = client("kms")
    sqs: Any = client("sqs")
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_public_access_block(
        Bucket=bucket,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True, "RestrictPublicBuckets": True,
        },
    )
    key_id = kms.create_key(Description="oneoff-audit logs", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["Arn"]
    signing = kms.create_key(Description="oneoff-audit evidence signing", KeyUsage="SIGN_VERIFY",
                             KeySpec="ECC_NIST_P256")["KeyMetadata"]["Arn"]
    dlq_url = sqs.create_queue(QueueName=f"{queue_name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs.create_queue(
        QueueName=queue_name,
        Attributes={
            "VisibilityTimeout": "30",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}),
        },
    )["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [{
                "QueueArn": queue_arn,
                "Events": ["s3:ObjectCreated:*"],
                "Filter": {"Key": {"FilterRules": [
                    {"Name": "prefix", "Value": DEFAULT_STAGING_PREFIX},
                    {"Name": "suffix", "Value": "closed.json"},
                ]}},
            }],
        },
    )
    return Resources(bucket=bucket, kms_key_id=key_id, signing_key_id=signing, queue_url=queue_url, dlq_url=dlq_url)
