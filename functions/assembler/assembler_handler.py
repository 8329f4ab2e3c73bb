"""Assembler function: SQS batch of closed.json events and sweeper messages → filed logs (wiring only).

Each record is processed on its own; a failing record is reported back as a batch item failure, so
it alone becomes visible again (and, after the queue's maxReceiveCount, moves to the dead-letter
queue) while the rest of the batch is deleted.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from oneoff_audit.assemble import describe_failure, process_message
from oneoff_audit.config import AssemblerConfig
from oneoff_audit.errors import RetryLaterError

logger = Logger()
tracer = Tracer()
metrics = Metrics()
# Report every failed record (even when all failed) instead of failing the invocation: the response
# is then the same whatever the mix, and each message is retried on its own.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


def record_handler(record: SQSRecord, config: AssemblerConfig) -> None:
    """One SQS message → :func:`oneoff_audit.assemble.process_message`; logs why it failed, then re-raises."""
    receive_count = int(record.attributes.approximate_receive_count or 1)
    try:
        process_message(config, json.loads(record.body), receive_count)
    except Exception as err:
        level = logger.warning if isinstance(err, RetryLaterError) else logger.error
        level("message not processed; it will be retried, then dead-lettered", extra={
            "message_id": record.message_id, "receive_count": receive_count, "reason": describe_failure(err)})
        raise


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """SQS event → partial batch response (``batchItemFailures``)."""
    config = AssemblerConfig.from_env()
    return process_partial_response(event=event, record_handler=functools.partial(record_handler, config=config),
                                    processor=processor, context=context)
