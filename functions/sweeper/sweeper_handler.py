"""Sweeper function: on a schedule, enqueue sessions abandoned without a close marker (wiring only)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.utilities.typing import LambdaContext

from oneoff_audit.config import SweeperConfig
from oneoff_audit.sweep import sweep

logger = Logger()
tracer = Tracer()
metrics = Metrics()


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """EventBridge schedule → :func:`oneoff_audit.sweep.sweep`."""
    enqueued = sweep(SweeperConfig.from_env())
    return {"enqueued": [{"app": app, "session_id": session_id} for app, session_id in enqueued]}
