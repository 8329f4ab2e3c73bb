"""Who is calling, and which apps they may read.

The identity comes from the API Gateway authorizer context, in this order:

1. ``requestContext.authorizer.claims`` (Cognito user-pool authorizer of a REST API),
2. ``requestContext.authorizer.jwt.claims`` (JWT authorizer of an HTTP API),
3. ``requestContext.authorizer`` itself (a Lambda authorizer's context, subject in ``principalId``).

Claims read:

* ``sub`` (or ``principalId``): the caller's subject, required; without it the request is 401.
* ``custom:audit_apps``: the app ids the caller may read, separated by commas and/or spaces
  (``"app1,app2"``, ``"app1 app2"``, or an HTTP API's ``"[app1 app2]"``), or ``"*"`` for every app.
  Entries that are not valid app ids are ignored. Missing claim: no app.
* ``custom:audit_admin``: ``"true"`` grants admin actions (legal hold).

An identity without the app gets :class:`AccessDeniedError` before anything is looked up, so a 403
says nothing about whether the app exists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from oneoff_audit.errors import AccessDeniedError, InvalidIdError, UnauthorizedError
from oneoff_audit.ids import validate_app

APPS_CLAIM = "custom:audit_apps"
ADMIN_CLAIM = "custom:audit_admin"
ALL_APPS = "*"
_NAME_CLAIMS = ("name", "email", "cognito:username", "username", "preferred_username")
_SPLIT = re.compile(r"[\s,]+")
_MAX_SUBJECT = 256


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: subject, readable apps, admin flag, and where it came from."""

    subject: str
    apps: frozenset[str] = frozenset()
    all_apps: bool = False
    admin: bool = False
    name: str | None = None
    source: str = "cognito"  # "cognito" | "jwt" | "lambda-authorizer"

    def may_read(self, app: str) -> bool:
        """True if this caller may read ``app``."""
        return self.all_apps or app in self.apps

    def to_dict(self) -> dict[str, Any]:
        """The identity as recorded in access records (no secrets: claims are not tokens)."""
        return {"subject": self.subject, "name": self.name, "source": self.source, "admin": self.admin}


def parse_apps(value: Any) -> tuple[frozenset[str], bool]:
    """Parse the apps claim into (apps, all_apps); accepts a string or a list of strings."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):  # an HTTP API JWT authorizer flattens arrays to "[a b]"
            text = text[1:-1]
        items: list[Any] = [part for part in _SPLIT.split(text) if part]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        return frozenset(), False
    apps: set[str] = set()
    for item in items:
        if item == ALL_APPS:
            return frozenset(), True
        try:
            apps.add(validate_app(item))
        except InvalidIdError:
            continue
    return frozenset(apps), False


def _is_true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _from_claims(claims: Mapping[str, Any], subject_keys: tuple[str, ...], source: str) -> Identity | None:
    subject = next((claims[k] for k in subject_keys if isinstance(claims.get(k), str) and claims[k].strip()), None)
    if subject is None:
        return None
    subject = subject.strip()[:_MAX_SUBJECT]
    apps, all_apps = parse_apps(claims.get(APPS_CLAIM))
    name = next((claims[k] for k in _NAME_CLAIMS if isinstance(claims.get(k), str) and claims[k]), None)
    return Identity(
        subject=subject,
        apps=apps,
        all_apps=all_apps,
        admin=_is_true(claims.get(ADMIN_CLAIM)),
        name=name[:_MAX_SUBJECT] if name else None,
        source=source,
    )


def identity_from_event(event: Any) -> Identity:
    """The caller of an API Gateway proxy event (dict or Powertools event); UnauthorizedError if none."""
    raw = getattr(event, "raw_event", event)
    context = raw.get("requestContext") if isinstance(raw, Mapping) else None
    authorizer = context.get("authorizer") if isinstance(context, Mapping) else None
    if not isinstance(authorizer, Mapping) or not authorizer:
        raise UnauthorizedError("no caller identity: the request did not pass an authorizer")
    identity: Identity | None = None
    claims = authorizer.get("claims")
    jwt = authorizer.get("jwt")
    if isinstance(claims, Mapping):
        identity = _from_claims(claims, ("sub",), "cognito")
    elif isinstance(jwt, Mapping) and isinstance(jwt.get("claims"), Mapping):
        identity = _from_claims(jwt["claims"], ("sub",), "jwt")
    else:
        identity = _from_claims(authorizer, ("principalId", "sub"), "lambda-authorizer")
    if identity is None:
        raise UnauthorizedError("no caller identity: the authorizer context has no subject")
    return identity


def require_app(identity: Identity, app: str) -> None:
    """Raise AccessDeniedError unless ``identity`` may read ``app`` (same error whether it exists or not)."""
    if not identity.may_read(app):
        raise AccessDeniedError(f"not allowed to read app {app!r}")


def require_admin(identity: Identity) -> None:
    """Raise AccessDeniedError unless ``identity`` carries the admin claim."""
    if not identity.admin:
        raise AccessDeniedError(f"this action requires the {ADMIN_CLAIM} claim")
