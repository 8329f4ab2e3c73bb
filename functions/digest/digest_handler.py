"""Scheduled digest function: extend every app's signed hourly digest chain (wiring only)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from oneoff_audit.config import DigestConfig
from oneoff_audit.errors import IntegrityError
from oneoff_audit.evidence.digest import write_digests

logger = Logger()
tracer = Tracer()
metrics = Metrics()


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """EventBridge schedule → :func:`oneoff_audit.evidence.digest.write_digests`."""
    result = write_digests(DigestConfig.from_env())
    metrics.add_metric(name="DigestsWritten", unit=MetricUnit.Count, value=result["written"])
    skipped = sum(len(app["skipped"]) for app in result["apps"])
    if skipped:
        metrics.add_metric(name="DigestHoursSkipped", unit=MetricUnit.Count, value=skipped)
    for app in result["apps"]:
        if app["skipped"] or app.get("error") or app.get("behind"):
            logger.error("digest chain needs attention", extra=app)
    logger.info("digests written", extra={"written": result["written"], "apps": len(result["apps"])})
    stopped = [app["app"] for app in result["apps"] if app.get("error")]
    if stopped:  # fail the invocation so the Errors alarm fires; the other apps' digests are written
        raise IntegrityError(f"digest chain stopped for {', '.join(stopped)} (see the log)")
    return result
