"""The access audit: every view of a log is itself recorded, durably, before the log is released.

One JSON object per view under ``access/<app>/<session>/<time>_<request id>.json`` (see
:func:`keys.access_key`), written with ``If-None-Match: *`` so a record is never overwritten. If
the record cannot be written the view fails (503) and nothing is released: an unrecorded view
never happens.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from oneoff_audit import formats, keys
from oneoff_audit.api.auth import Identity
from oneoff_audit.api.timeline import decode_cursor, encode_cursor, parse_limit, single_params
from oneoff_audit.aws import client, is_precondition_failed
from oneoff_audit.errors import FormatError, InvalidIdError, RetryLaterError

FORMAT = "oneoff-audit.access"
HOWS = ("inline", "url", "asciicast", "asciicast-url", "details")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_RECORD_BYTES = 64 << 10
_MAX_TEXT = 512


@dataclass(frozen=True)
class RequestInfo:
    """Where a request came from, as API Gateway tells it."""

    request_id: str
    source_ip: str | None = None
    user_agent: str | None = None

    @classmethod
    def from_event(cls, raw: Mapping[str, Any]) -> RequestInfo:
        """Request id, source IP and user agent of a proxy event (a fresh id if it has none usable)."""
        context = raw.get("requestContext") or {}
        identity = context.get("identity") or {}
        request_id = context.get("requestId")
        if not isinstance(request_id, str):
            request_id = ""
        try:
            keys.access_key("a", "s", formats.utc_now(), request_id)
        except InvalidIdError:
            request_id = str(uuid.uuid4())

        def text(value: Any) -> str | None:
            return value[:_MAX_TEXT] if isinstance(value, str) and value else None

        return cls(request_id, text(identity.get("sourceIp")), text(identity.get("userAgent")))


def record_view(bucket: str, app: str, session_id: str, identity: Identity, how: str, request: RequestInfo,
                **details: Any) -> dict[str, Any]:
    """Write one access record (who, when, which session, how) and return it; RetryLaterError if S3 fails."""
    if how not in HOWS:
        raise ValueError(f"unknown access kind {how!r}")
    now = formats.utc_now()
    record = {
        "format": FORMAT,
        "version": 1,
        "app": app,
        "session_id": session_id,
        "at": formats.format_time(now),
        "how": how,
        "who": identity.to_dict(),
        "request_id": request.request_id,
        "source_ip": request.source_ip,
        "user_agent": request.user_agent,
        **details,
    }
    body = json.dumps(record, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")
    key = keys.access_key(app, session_id, now, request.request_id)
    try:
        try:
            client("s3").put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json",
                                    IfNoneMatch="*")
        except ClientError as err:
            if not is_precondition_failed(err):
                raise
            # the same request retried within the same microsecond: keep both records
            key = keys.access_key(app, session_id, now, str(uuid.uuid4()))
            client("s3").put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json",
                                    IfNoneMatch="*")
    except (ClientError, BotoCoreError) as err:
        raise RetryLaterError(f"the access audit could not record this view, so it is refused: {err}") from err
    return record


def list_views(bucket: str, app: str, session_id: str, single: Mapping[str, str] | None,
               multi: Mapping[str, list[str]] | None) -> dict[str, Any]:
    """Access records of one session, oldest first: ``{"app", "session_id", "access", "cursor"}``."""
    params = single_params(single, multi, ("limit", "cursor"))
    limit = parse_limit(params.get("limit"), DEFAULT_LIMIT, MAX_LIMIT)
    prefix = keys.access_prefix(app, session_id)
    after = decode_cursor(app, params["cursor"], "after", keys.ACCESS_NAME) if "cursor" in params else None
    s3 = client("s3")
    resp = s3.list_objects_v2(Bucket=bucket, Prefix=prefix, StartAfter=prefix + (after or ""), MaxKeys=limit)
    names = [obj["Key"] for obj in resp.get("Contents", [])]

    def fetch(key: str) -> dict[str, Any]:
        name = key[len(prefix):]
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read(MAX_RECORD_BYTES + 1)
        try:
            value = formats.parse_json(body, f"access record {name}", MAX_RECORD_BYTES)
            if not isinstance(value, dict) or value.get("format") != FORMAT:
                raise FormatError(f"access record {name}", "format", f"is not {FORMAT!r}")
        except FormatError as err:  # shown, not hidden: an auditor should see a damaged record
            return {"record": name, "invalid": str(err)}
        return value

    with ThreadPoolExecutor(max_workers=16) as pool:
        records = list(pool.map(fetch, names))
    cursor = encode_cursor(app, names[-1][len(prefix):], "after") if resp.get("IsTruncated") and names else None
    return {"app": app, "session_id": session_id, "access": records, "cursor": cursor}
