"""The sweeper: finds sessions whose runner died before writing ``closed.json`` and enqueues them.

A session is abandoned when its staging folder has no close marker and its newest object is older
than ``ABANDON_AFTER`` seconds. Each such session is sent to the assembly queue as
``{"oneoff_audit": "sweep", "app": ..., "session_id": ...}``; the assembler files it with status
``abandoned`` and whatever was staged (or, if a log was filed already, just finishes the cleanup).

The staging prefix is listed once, flat and in key order: a session's keys are contiguous, so
memory stays constant however many sessions and chunks are staged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

from oneoff_audit import formats, keys
from oneoff_audit.assemble import SWEEP_MESSAGE
from oneoff_audit.aws import client
from oneoff_audit.config import SweeperConfig
from oneoff_audit.errors import InvalidIdError
from oneoff_audit.ids import validate_app, validate_session_id

logger = Logger()
metrics = Metrics()


@dataclass
class StagedFolder:
    """What the sweeper needs to know about one session's staging folder."""

    app: str
    session_id: str
    newest: datetime
    objects: int = 0
    closed: bool = False


def _session_of(key: str, prefix: str) -> tuple[str, str, str] | None:
    parts = key[len(prefix):].split("/", 2)
    if len(parts) != 3:
        return None
    try:
        return validate_app(parts[0]), validate_session_id(parts[1]), parts[2]
    except InvalidIdError:
        return None


def staged_folders(bucket: str, staging_prefix: str) -> Iterator[StagedFolder]:
    """Every session folder under the staging prefix, in key order, one listing pass."""
    prefix = keys.validate_prefix(staging_prefix)
    current: StagedFolder | None = None
    paginator = client("s3").get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            parsed = _session_of(obj["Key"], prefix)
            if parsed is None:
                logger.warning("ignoring a staging key outside the layout", extra={"key": obj["Key"][:300]})
                continue
            app, session_id, rest = parsed
            if current is None or (current.app, current.session_id) != (app, session_id):
                if current is not None:
                    yield current
                current = StagedFolder(app, session_id, obj["LastModified"])
            current.objects += 1
            current.newest = max(current.newest, obj["LastModified"])
            current.closed = current.closed or rest == keys.CLOSED
    if current is not None:
        yield current


def sweep_message(app: str, session_id: str) -> str:
    """The assembly-queue message body for an abandoned session."""
    return json.dumps({"oneoff_audit": SWEEP_MESSAGE, "app": app, "session_id": session_id},
                      separators=(",", ":"))


def sweep(config: SweeperConfig, now: datetime | None = None) -> list[tuple[str, str]]:
    """Enqueue every abandoned session for assembly; returns their ``(app, session_id)``."""
    now = now or formats.utc_now()
    cutoff = now - timedelta(seconds=config.abandon_after)
    found: list[tuple[str, str]] = []
    batch: list[dict[str, Any]] = []
    sqs = client("sqs")

    def send() -> None:
        response = sqs.send_message_batch(QueueUrl=config.queue_url, Entries=batch)
        if response.get("Failed"):
            raise RuntimeError(f"could not enqueue abandoned sessions: {response['Failed'][:3]}")
        batch.clear()

    for folder in staged_folders(config.bucket, config.staging_prefix):
        if folder.closed or folder.newest > cutoff:
            continue
        logger.info("session abandoned: enqueued for assembly", extra={
            "app": folder.app, "session_id": folder.session_id, "newest": formats.format_time(folder.newest),
            "objects": folder.objects})
        found.append((folder.app, folder.session_id))
        batch.append({"Id": str(len(batch)), "MessageBody": sweep_message(folder.app, folder.session_id)})
        if len(batch) == 10:
            send()
    if batch:
        send()
    metrics.add_metric(name="AbandonedSessionsEnqueued", unit=MetricUnit.Count, value=len(found))
    return found
