"""Evidence routes, included by the API's resolver (errors become responses there, in one place).

    GET    /apps/{app}/integrity?from=&to=                  verify-chain as JSON (caller may read the app)
    PUT    /apps/{app}/sessions/{session}/legal-hold        legal hold on (admin claim required)
    DELETE /apps/{app}/sessions/{session}/legal-hold        legal hold off (admin claim required)

Ids are validated (400), then the caller identified (401), then the app right (403) and, for the
legal hold, the admin claim (403), before any S3 call.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler.api_gateway import Router

from oneoff_audit import formats
from oneoff_audit.api.auth import Identity, identity_from_event, require_admin, require_app
from oneoff_audit.config import ApiConfig, ConfigError
from oneoff_audit.errors import FormatError
from oneoff_audit.evidence.legalhold import set_legal_hold
from oneoff_audit.evidence.verify import parse_when, verify_chain
from oneoff_audit.ids import validate_app, validate_session_id

router = Router()
logger = Logger(service="oneoff-audit-api", child=True)

DEFAULT_WINDOW = timedelta(hours=24)
MAX_WINDOW = timedelta(days=31)


def _caller(app_id: str, session_id: str | None = None) -> Identity:
    validate_app(app_id)
    if session_id is not None:
        validate_session_id(session_id)
    identity = identity_from_event(router.current_event.raw_event)
    require_app(identity, app_id)
    return identity


def _signing_key(cfg: ApiConfig) -> str:
    if not cfg.signing_key_id:
        raise ConfigError("AUDIT_SIGNING_KEY_ID is not set: the integrity check has no trusted key")
    return cfg.signing_key_id


@router.get("/apps/<app_id>/integrity")
def integrity(app_id: str) -> dict[str, Any]:
    """The verify-chain report for ``[from, to)`` (default: the last 24 hours; at most 31 days)."""
    _caller(app_id)
    params = router.current_event.query_string_parameters or {}
    now = formats.utc_now()
    end = parse_when(params.get("to"), "to") or now
    start = parse_when(params.get("from"), "from") or end - DEFAULT_WINDOW
    if start >= end:
        raise FormatError("query", "from", "must be before 'to'")
    if end - start > MAX_WINDOW:
        raise FormatError("query", "from", f"the window may span at most {MAX_WINDOW.days} days")
    cfg = ApiConfig.from_env()
    return verify_chain(cfg.bucket, app_id, _signing_key(cfg), start=start, end=end, now=now)


def _legal_hold(app_id: str, session_id: str, on: bool) -> dict[str, Any]:
    identity = _caller(app_id, session_id)
    require_admin(identity)
    cfg = ApiConfig.from_env()
    status = set_legal_hold(cfg.bucket, app_id, session_id, on)
    logger.info("legal hold changed", extra={"app": app_id, "session_id": session_id, "legal_hold": on,
                                             "by": identity.to_dict()})
    return {"app": app_id, "session_id": session_id, **status,
            "changed_by": identity.to_dict(), "changed_at": formats.format_time(formats.utc_now())}


@router.put("/apps/<app_id>/sessions/<session_id>/legal-hold")
def put_legal_hold(app_id: str, session_id: str) -> dict[str, Any]:
    """Place a legal hold on the session's log, manifest and signature versions."""
    return _legal_hold(app_id, session_id, True)


@router.delete("/apps/<app_id>/sessions/<session_id>/legal-hold")
def delete_legal_hold(app_id: str, session_id: str) -> dict[str, Any]:
    """Release the legal hold (retention, if any, still applies)."""
    return _legal_hold(app_id, session_id, False)
