"""Validation and generation of app ids and session ids.

Ids become parts of S3 keys, so anything outside a small safe alphabet is rejected before any
S3 call is made: no ``/``, no ``..``, no percent-escapes, no unicode look-alikes, bounded length.
"""

from __future__ import annotations

import os
import re
import time

from oneoff_audit.errors import InvalidIdError

APP_ID_MAX = 100
SESSION_ID_MAX = 128

_APP_RE = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?")
_SESSION_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _check(kind: str, value: object, pattern: re.Pattern[str], max_len: int, charset: str) -> str:
    if not isinstance(value, str):
        raise InvalidIdError(kind, value, "must be a string")
    if not value:
        raise InvalidIdError(kind, value, "must not be empty")
    if len(value) > max_len:
        raise InvalidIdError(kind, value, f"longer than {max_len} characters")
    if ".." in value:
        raise InvalidIdError(kind, value, "must not contain '..'")
    if pattern.fullmatch(value) is None:
        raise InvalidIdError(kind, value, f"allowed characters are {charset}, starting and ending alphanumeric")
    return value


def validate_app(app: object) -> str:
    """Return ``app`` if it is a valid app id (lowercase DNS-like name), else raise InvalidIdError."""
    return _check("app id", app, _APP_RE, APP_ID_MAX, "a-z 0-9 . _ -")


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if valid (ULID or similar token), else raise InvalidIdError."""
    return _check("session id", session_id, _SESSION_RE, SESSION_ID_MAX, "A-Z a-z 0-9 _ -")


def new_session_id(now: float | None = None) -> str:
    """A new ULID: 48-bit millisecond timestamp + 80 random bits, Crockford base32, sortable by time."""
    millis = int((time.time() if now is None else now) * 1000)
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))
