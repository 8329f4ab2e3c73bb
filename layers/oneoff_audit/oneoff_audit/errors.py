"""The exceptions of oneoff-audit, one family per kind of failure.

Every error names what was wrong precisely (the object and the field), so that an operator or an
auditor can act on one line without a traceback.
"""

from __future__ import annotations


class OneoffAuditError(Exception):
    """Base class of every error raised on purpose by this package."""


class InvalidIdError(OneoffAuditError, ValueError):
    """An app id or session id failed validation (charset, length, traversal)."""

    def __init__(self, kind: str, value: object, reason: str) -> None:
        self.kind = kind
        self.value = value
        self.reason = reason
        shown = repr(value)
        if len(shown) > 256:  # a hostile id may be huge: the message stays one bounded line
            shown = shown[:253] + "..."
        super().__init__(f"invalid {kind} {shown}: {reason}")


class FormatError(OneoffAuditError, ValueError):
    """An object (chunk, marker, log line, ...) does not match its declared format."""

    def __init__(self, obj: str, field: str, reason: str) -> None:
        self.obj = obj
        self.field = field
        self.reason = reason
        where = f"{obj}: {field}" if field else obj
        super().__init__(f"{where}: {reason}")


class IntegrityError(OneoffAuditError):
    """A hash, a chain link, a count or an encryption context does not match what was recorded."""


class DecryptionError(OneoffAuditError):
    """A ciphertext could not be decrypted intact (tampered, truncated, wrong key or context)."""


class NotFoundError(OneoffAuditError):
    """The requested app, session or object does not exist."""


class AccessDeniedError(OneoffAuditError):
    """The caller is identified but may not read this app."""


class UnauthorizedError(OneoffAuditError):
    """The request carries no usable identity."""


class SessionPendingError(OneoffAuditError):
    """The session exists in staging but is not filed yet (recording or assembling)."""

    def __init__(self, status: str) -> None:
        self.status = status
        super().__init__(f"session is {status}")


class RetryLaterError(OneoffAuditError):
    """A transient condition (missing chunk, throttling) that a later attempt may resolve."""
