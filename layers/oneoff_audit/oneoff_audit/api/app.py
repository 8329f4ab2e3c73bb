"""The API's routes on a Powertools ``APIGatewayRestResolver`` (REST API, Lambda proxy integration).

Routes::

    GET /apps/{app}/sessions                       timeline (newest first, filters, cursor)
    GET /apps/{app}/sessions/{session}             header, trailer, index entry, integrity, retention
    GET /apps/{app}/sessions/{session}/log         inline {header, events, trailer} or a presigned URL
                                                   (?format=asciicast: an asciicast v2 export, or the URL)
    GET /apps/{app}/sessions/{session}/access      the access audit of the session

Each route checks, in this order and before any S3 call: the ids (400), the caller's identity
(401), the caller's right to the app (403, identical whether the app exists or not). Errors become
responses in one place (:func:`error_response`): ``{"error": code, "message": text}``, never a
stack trace; a session still in staging is ``202 {"status": "recording"|"assembling"}``.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.event_handler.exceptions import NotFoundError as RouteNotFoundError
from botocore.exceptions import BotoCoreError, ClientError

from oneoff_audit.api import access, logs, timeline
from oneoff_audit.api.auth import Identity, identity_from_event, require_app
from oneoff_audit.config import ApiConfig, ConfigError
from oneoff_audit.errors import (
    AccessDeniedError,
    DecryptionError,
    FormatError,
    IntegrityError,
    InvalidIdError,
    NotFoundError,
    OneoffAuditError,
    RetryLaterError,
    SessionPendingError,
    UnauthorizedError,
)
from oneoff_audit.ids import validate_app, validate_session_id

logger = Logger(service="oneoff-audit-api")
app = APIGatewayRestResolver(serializer=logs.dumps)

ASCIICAST_TYPE = "application/x-asciicast"
SHA256_HEADER = "X-Oneoff-Audit-Sha256"  # SHA-256 of the filed plaintext, so a client can re-check what it saves
NO_STORE = {"Cache-Control": "no-store"}


def _config() -> ApiConfig:
    """Settings, read once per request (cheap) so a warm container follows its environment."""
    cfg = app.context.get("config")
    if cfg is None:
        cfg = ApiConfig.from_env()
        app.append_context(config=cfg)
    return cfg


def _request(app_id: str, session_id: str | None = None) -> tuple[ApiConfig, Identity]:
    """Validate ids (400), identify the caller (401), check the app right (403): before any S3 call."""
    validate_app(app_id)
    if session_id is not None:
        validate_session_id(session_id)
    identity = identity_from_event(app.current_event.raw_event)
    require_app(identity, app_id)
    return _config(), identity


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(status_code=status, content_type=content_types.APPLICATION_JSON, body=logs.dumps(body),
                    headers={**NO_STORE, **(headers or {})})


def _query() -> tuple[dict[str, str] | None, dict[str, list[str]] | None]:
    raw = app.current_event.raw_event
    return raw.get("queryStringParameters"), raw.get("multiValueQueryStringParameters")


@app.get("/apps/<app_id>/sessions")
def list_sessions(app_id: str) -> Response:
    """The app's timeline, newest first."""
    cfg, _ = _request(app_id)
    query = timeline.parse_query(app_id, *_query())
    return _json(200, timeline.list_sessions(cfg.bucket, app_id, query))


@app.get("/apps/<app_id>/sessions/<session_id>")
def get_session(app_id: str, session_id: str) -> Response:
    """Header, trailer and integrity summary of one filed session."""
    cfg, identity = _request(app_id, session_id)
    timeline.single_params(*_query(), ())
    filed = logs.locate(cfg, app_id, session_id)
    details = logs.session_details(cfg, filed)
    access.record_view(cfg.bucket, app_id, session_id, identity, "details",
                       access.RequestInfo.from_event(app.current_event.raw_event), log_version_id=filed.version_id)
    return _json(200, details)


@app.get("/apps/<app_id>/sessions/<session_id>/log")
def get_log(app_id: str, session_id: str) -> Response:
    """The log inline when its plaintext is at most INLINE_MAX_BYTES, else a presigned URL."""
    cfg, identity = _request(app_id, session_id)
    params = timeline.single_params(*_query(), ("format",))
    fmt = params.get("format", "json")
    if fmt not in ("json", "asciicast"):
        raise FormatError("query", "format", "must be 'json' or 'asciicast'")
    request = access.RequestInfo.from_event(app.current_event.raw_event)

    def record(how: str, **details: Any) -> None:
        access.record_view(cfg.bucket, app_id, session_id, identity, how, request, **details)

    delivery = logs.deliver(cfg, app_id, session_id, fmt, record)
    if delivery.link is not None:
        return _json(200, delivery.link)
    if delivery.how == "asciicast":
        return Response(status_code=200, content_type=ASCIICAST_TYPE, body=delivery.body, headers=NO_STORE)
    sha = delivery.filed.plaintext_sha256
    return Response(status_code=200, content_type=content_types.APPLICATION_JSON, body=delivery.body,
                    headers={**NO_STORE, **({SHA256_HEADER: sha} if sha else {})})


@app.get("/apps/<app_id>/sessions/<session_id>/access")
def get_access(app_id: str, session_id: str) -> Response:
    """Who viewed this session's log, when and how."""
    cfg, _ = _request(app_id, session_id)
    result = access.list_views(cfg.bucket, app_id, session_id, *_query())
    if not result["access"] and result["cursor"] is None:
        logs.locate(cfg, app_id, session_id)  # 404 / 202 for a session that does not exist (yet)
    return _json(200, result)


_STATUS: tuple[tuple[type[BaseException], int, str], ...] = (
    (InvalidIdError, 400, "bad_request"),
    (FormatError, 400, "bad_request"),
    (UnauthorizedError, 401, "unauthorized"),
    (AccessDeniedError, 403, "forbidden"),
    (NotFoundError, 404, "not_found"),
    (RouteNotFoundError, 404, "not_found"),
    (RetryLaterError, 503, "unavailable"),
    (IntegrityError, 502, "integrity"),
    (DecryptionError, 502, "integrity"),
    (ConfigError, 500, "misconfigured"),
)


@app.exception_handler(Exception)
def error_response(err: Exception) -> Response:
    """Every error as ``{"error", "message"}`` with its status; pending sessions as 202; never a traceback."""
    if isinstance(err, SessionPendingError):
        return _json(202, {"status": err.status}, {"Retry-After": "5"})
    for cls, status, code in _STATUS:
        if isinstance(err, cls):
            message = str(err) if not isinstance(err, RouteNotFoundError) else "no such route"
            if status >= 500:
                logger.error("request failed", extra={"error": code, "reason": message})
            headers = {"Retry-After": "5"} if status == 503 else None
            return _json(status, {"error": code, "message": message}, headers)
    if isinstance(err, ClientError | BotoCoreError):
        logger.exception("AWS call failed")
        return _json(503, {"error": "unavailable", "message": "storage or key service unavailable, retry later"},
                     {"Retry-After": "5"})
    if isinstance(err, OneoffAuditError):
        logger.error("request failed", extra={"reason": str(err)})
        return _json(500, {"error": "internal", "message": str(err)})
    logger.exception("unexpected error")
    return _json(500, {"error": "internal", "message": "internal error"})


try:  # routes of the evidence component (integrity check, legal hold), when it is there
    from oneoff_audit.evidence.routes import router as _evidence_router
except ImportError as _err:
    if _err.name not in ("oneoff_audit.evidence.routes", "oneoff_audit.evidence"):
        raise
else:
    app.include_router(_evidence_router)


def handle(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Resolve one API Gateway proxy event (what the Lambda handler calls)."""
    return app.resolve(event, context)


