"""Typed configuration: one frozen dataclass per component, read from the environment once.

``ENV`` on each class lists exactly the variables that component reads; the template test checks
that each function is given exactly these (plus Powertools' own settings).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from oneoff_audit.errors import InvalidIdError, OneoffAuditError
from oneoff_audit.keys import DEFAULT_STAGING_PREFIX, validate_prefix


class ConfigError(OneoffAuditError):
    """A required setting is missing or malformed."""


def _get(env: Mapping[str, str], name: str, default: str | None = None) -> str:
    value = env.get(name) or default  # set-but-empty means "use the default", as for integers
    if not value:
        raise ConfigError(f"environment variable {name} is required")
    return value


def _staging_prefix(env: Mapping[str, str]) -> str:
    value = _get(env, "AUDIT_STAGING_PREFIX", DEFAULT_STAGING_PREFIX)
    try:
        return validate_prefix(value)
    except InvalidIdError as err:
        raise ConfigError(f"AUDIT_STAGING_PREFIX {err.reason}, got {value!r}") from err


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError as err:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from err
    if maximum is None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ConfigError(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")


@dataclass(frozen=True)
class Retention:
    """S3 Object Lock retention put on every filed object (logs, gap lists, manifests, index, digests).

    Explicit per object rather than a bucket default, so that staging chunks (deleted once filed)
    are never locked. ``days == 0`` or no mode: no retention is set (local stack, tests).
    """

    mode: str | None = None
    days: int = 0
    ENV = ("LOG_LOCK_MODE", "LOG_RETENTION_DAYS")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Retention:
        mode = env.get("LOG_LOCK_MODE") or None
        if mode is not None and mode not in LOCK_MODES:
            raise ConfigError(f"LOG_LOCK_MODE must be one of {', '.join(LOCK_MODES)}, got {mode!r}")
        return cls(mode=mode, days=_int(env, "LOG_RETENTION_DAYS", 0, minimum=0, maximum=36_500))

    def put_args(self, now: datetime | None = None) -> dict[str, Any]:
        """The PutObject / CreateMultipartUpload arguments that lock a new object version."""
        if self.mode is None or self.days == 0:
            return {}
        start = datetime.now(UTC) if now is None else now
        return {"ObjectLockMode": self.mode, "ObjectLockRetainUntilDate": start + timedelta(days=self.days)}


@dataclass(frozen=True)
class AssemblerConfig:
    """Settings of the assembler (files closed sessions)."""

    bucket: str
    kms_key_id: str
    staging_prefix: str = DEFAULT_STAGING_PREFIX
    signing_key_id: str | None = None
    max_attempts: int = 5
    retention: Retention = field(default_factory=Retention)
    ENV = ("AUDIT_BUCKET", "AUDIT_KMS_KEY_ID", "AUDIT_STAGING_PREFIX", "AUDIT_SIGNING_KEY_ID", "ASSEMBLE_MAX_ATTEMPTS",
           *Retention.ENV)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AssemblerConfig:
        env = os.environ if env is None else env
        return cls(
            bucket=_get(env, "AUDIT_BUCKET"),
            kms_key_id=_get(env, "AUDIT_KMS_KEY_ID"),
            staging_prefix=_staging_prefix(env),
            signing_key_id=env.get("AUDIT_SIGNING_KEY_ID") or None,
            max_attempts=_int(env, "ASSEMBLE_MAX_ATTEMPTS", 5, minimum=1, maximum=100),
            retention=Retention.from_env(env),
        )


@dataclass(frozen=True)
class SweeperConfig:
    """Settings of the sweeper (enqueues abandoned sessions for assembly)."""

    bucket: str
    queue_url: str
    staging_prefix: str = DEFAULT_STAGING_PREFIX
    abandon_after: int = 3600
    ENV = ("AUDIT_BUCKET", "ASSEMBLY_QUEUE_URL", "AUDIT_STAGING_PREFIX", "ABANDON_AFTER")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SweeperConfig:
        env = os.environ if env is None else env
        return cls(
            bucket=_get(env, "AUDIT_BUCKET"),
            queue_url=_get(env, "ASSEMBLY_QUEUE_URL"),
            staging_prefix=_staging_prefix(env),
            abandon_after=_int(env, "ABANDON_AFTER", 3600, minimum=60),
        )


@dataclass(frozen=True)
class ApiConfig:
    """Settings of the API (timeline, logs, access audit)."""

    bucket: str
    kms_key_id: str
    staging_prefix: str = DEFAULT_STAGING_PREFIX
    inline_max_bytes: int = 1 << 20
    presign_ttl: int = 300
    signing_key_id: str | None = None
    ENV = ("AUDIT_BUCKET", "AUDIT_KMS_KEY_ID", "AUDIT_STAGING_PREFIX", "INLINE_MAX_BYTES", "PRESIGN_TTL",
           "AUDIT_SIGNING_KEY_ID")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ApiConfig:
        env = os.environ if env is None else env
        return cls(
            bucket=_get(env, "AUDIT_BUCKET"),
            kms_key_id=_get(env, "AUDIT_KMS_KEY_ID"),
            staging_prefix=_staging_prefix(env),
            inline_max_bytes=_int(env, "INLINE_MAX_BYTES", 1 << 20, minimum=0, maximum=6 << 20),
            presign_ttl=min(_int(env, "PRESIGN_TTL", 300, minimum=1), 900),
            signing_key_id=env.get("AUDIT_SIGNING_KEY_ID") or None,
        )


@dataclass(frozen=True)
class DigestConfig:
    """Settings of the hourly digest function (signs the chain of manifests filed per hour)."""

    bucket: str
    signing_key_id: str
    settle_seconds: int = 120
    max_hours_per_run: int = 720
    retention: Retention = field(default_factory=Retention)
    ENV = ("AUDIT_BUCKET", "AUDIT_SIGNING_KEY_ID", "DIGEST_SETTLE_SECONDS", "DIGEST_MAX_HOURS", *Retention.ENV)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DigestConfig:
        env = os.environ if env is None else env
        return cls(
            bucket=_get(env, "AUDIT_BUCKET"),
            signing_key_id=_get(env, "AUDIT_SIGNING_KEY_ID"),
            settle_seconds=_int(env, "DIGEST_SETTLE_SECONDS", 120, minimum=0, maximum=3000),
            max_hours_per_run=_int(env, "DIGEST_MAX_HOURS", 720, minimum=1, maximum=100_000),
            retention=Retention.from_env(env),
        )


@dataclass(frozen=True)
class CaptureConfig:
    """Settings of the capture agent (``oneoff-audit record`` / ``flush-spool``) on the runner."""

    bucket: str
    staging_prefix: str = DEFAULT_STAGING_PREFIX
    spool_dir: str | None = None
    ENV = ("AUDIT_BUCKET", "AUDIT_STAGING_PREFIX", "ONEOFF_AUDIT_SPOOL_DIR")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CaptureConfig:
        env = os.environ if env is None else env
        return cls(
            bucket=_get(env, "AUDIT_BUCKET"),
            staging_prefix=_staging_prefix(env),
            spool_dir=env.get("ONEOFF_AUDIT_SPOOL_DIR") or None,
        )
