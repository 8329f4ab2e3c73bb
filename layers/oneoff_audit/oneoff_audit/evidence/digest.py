"""The hourly digest chain: per app and hour, a signed list of the manifests filed in that hour.

``digests/<app>/YYYY/MM/DD/HH.json`` (canonical JSON, ``digest.schema.json``) lists every manifest
whose object was written (S3 ``LastModified``) in ``[hour_start, hour_end)``, with the SHA-256 of
the manifest bytes and of its signature, and names the previous digest by key, SHA-256 and
signature SHA-256, like CloudTrail's digest files. A digest is written for every full hour, also
when no manifest was filed; the first digest of an app has ``previous: null``. Digests are
write-once (``If-None-Match: *``) and an hour whose key already has history (a deleted digest) is
never written again: the gap stays visible to ``verify-chain``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from oneoff_audit import formats, keys
from oneoff_audit.config import DigestConfig
from oneoff_audit.errors import FormatError, OneoffAuditError
from oneoff_audit.evidence import signing, store
from oneoff_audit.evidence.manifest import signature_key, write_signature
from oneoff_audit.ids import validate_app

FORMAT = "oneoff-audit.digest"
VERSION = 1
HOUR = timedelta(hours=1)
MAX_DIGEST_BYTES = 64 << 20
_DIGEST_NAME = re.compile(r"(\d{4})/(\d{2})/(\d{2})/(\d{2})\.json")

logger = logging.getLogger(__name__)


def hour_floor(ts: datetime) -> datetime:
    """The start of the UTC hour containing ``ts``."""
    return ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def digests_prefix(app: str) -> str:
    """Folder of an app's digests."""
    return f"{keys.DIGESTS_PREFIX}{validate_app(app)}/"


def manifests_prefix(app: str) -> str:
    """Folder of an app's manifests."""
    return f"{keys.MANIFESTS_PREFIX}{validate_app(app)}/"


def parse_digest_key(app: str, key: str) -> datetime | None:
    """The hour a digest key stands for, or None if ``key`` is not a digest document of ``app``."""
    prefix = digests_prefix(app)
    if not key.startswith(prefix):
        return None
    match = _DIGEST_NAME.fullmatch(key[len(prefix):])
    if match is None:
        return None
    try:
        return datetime(*(int(g) for g in match.groups()), tzinfo=UTC)  # type: ignore[misc]
    except ValueError:
        return None


def session_of_manifest(app: str, key: str) -> str | None:
    """The session id of a manifest document key, or None for anything else (signatures, strays)."""
    prefix = manifests_prefix(app)
    if not key.startswith(prefix) or not key.endswith(".json") or "/" in key[len(prefix):]:
        return None
    return key[len(prefix):-len(".json")]


def list_apps(bucket: str) -> list[str]:
    """Every app with a timeline or a manifest (the folders under ``index/`` and ``manifests/``)."""
    apps: set[str] = set()
    for prefix in (keys.INDEX_PREFIX, keys.MANIFESTS_PREFIX):
        for common in store.list_objects(bucket, prefix, delimiter="/"):
            name = common["Prefix"][len(prefix):].rstrip("/")
            try:
                apps.add(validate_app(name))
            except ValueError:
                logger.warning("ignoring folder %s%s/: not an app id", prefix, name)
    return sorted(apps)


@dataclass(frozen=True)
class DigestRef:
    """A stored digest as the next one records it."""

    key: str
    hour_start: datetime
    sha256: str
    signature_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "hour_start": formats.format_time(self.hour_start), "sha256": self.sha256,
                "signature_sha256": self.signature_sha256}


def digest_keys(bucket: str, app: str, start_after: str | None = None) -> list[tuple[datetime, str]]:
    """(hour, key) of every current digest document of ``app``, oldest first."""
    found = []
    for obj in store.list_objects(bucket, digests_prefix(app), start_after=start_after):
        hour = parse_digest_key(app, obj["Key"])
        if hour is not None:
            found.append((hour, obj["Key"]))
    return sorted(found)


def latest_digest(bucket: str, app: str, now: datetime) -> tuple[datetime, str] | None:
    """The newest current digest of ``app`` (looks at the last two days first, then everything)."""
    recent = digest_keys(bucket, app, start_after=keys.digest_key(app, now - timedelta(days=2)))
    found = recent or digest_keys(bucket, app)
    return found[-1] if found else None


def load_ref(bucket: str, key: str, hour: datetime) -> DigestRef | None:
    """The reference to a stored digest (hashes of its bytes and signature); None if either is missing."""
    doc = store.get(bucket, key, max_bytes=MAX_DIGEST_BYTES)
    sig = store.get(bucket, signature_key(key), max_bytes=1024)
    if doc is None or sig is None:
        return None
    return DigestRef(key, hour, signing.sha256_hex(doc.body), signing.sha256_hex(sig.body))


def manifest_entry(bucket: str, app: str, obj: dict[str, Any]) -> dict[str, Any] | None:
    """The digest entry of one listed manifest object (hashes of its current bytes and signature)."""
    session_id = session_of_manifest(app, obj["Key"])
    if session_id is None:
        return None
    doc = store.get(bucket, obj["Key"], max_bytes=MAX_DIGEST_BYTES)
    if doc is None:  # deleted between list and get: the verifier reports the missing manifest
        return None
    sig = store.get(bucket, signature_key(obj["Key"]), max_bytes=1024)
    return {
        "key": obj["Key"],
        "session_id": session_id,
        "version_id": doc.version_id,
        "sha256": signing.sha256_hex(doc.body),
        "size": len(doc.body),
        "signature_sha256": signing.sha256_hex(sig.body) if sig is not None else None,
        "last_modified": formats.format_time(doc.last_modified),
    }


def manifests_by_hour(bucket: str, app: str, since: datetime, until: datetime) -> dict[datetime, list[dict[str, Any]]]:
    """Listed manifest objects of ``app`` written in ``[since, until)``, grouped by hour."""
    grouped: dict[datetime, list[dict[str, Any]]] = {}
    for obj in store.list_objects(bucket, manifests_prefix(app)):
        written = obj["LastModified"].astimezone(UTC)
        if since <= written < until and session_of_manifest(app, obj["Key"]) is not None:
            grouped.setdefault(hour_floor(written), []).append(obj)
    return grouped


def build_digest(app: str, hour: datetime, entries: list[dict[str, Any]], previous: DigestRef | None,
                 created_at: datetime, signing_key_id: str) -> dict[str, Any]:
    """The digest document of one hour (validated against ``digest.schema.json``)."""
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "app": app,
        "key": keys.digest_key(app, hour),
        "hour_start": formats.format_time(hour),
        "hour_end": formats.format_time(hour + HOUR),
        "created_at": formats.format_time(created_at),
        "manifests": sorted(entries, key=lambda e: e["key"]),
        "previous": previous.to_dict() if previous is not None else None,
        "signing_key_id": signing_key_id,
        "signing_algorithm": signing.SIGNING_ALGORITHM,
    }
    return formats.validate(doc, "digest", f"digest {doc['key']}")


def _same_as_ours(stored: bytes, ours: dict[str, Any]) -> bool:
    """True if ``stored`` is exactly the digest this function would write, up to its ``created_at``."""
    try:
        created_at = formats.parse_json(stored, "stored digest", MAX_DIGEST_BYTES).get("created_at")
    except (FormatError, AttributeError):
        return False
    return isinstance(created_at, str) and stored == signing.canonical_bytes({**ours, "created_at": created_at})


def _resume(config: DigestConfig, app: str, hour: datetime, key: str) -> DigestRef | None:
    """Sign the latest digest if a run stopped between its two PUTs, but only if it is exactly ours.

    "Ours" is rebuilt from the bucket, not from the stored document: the previous link must name
    the signed digest before it (or be null when there is none) and the manifests must be the ones
    written in that hour.
    """
    stored = store.get(config.bucket, key, max_bytes=MAX_DIGEST_BYTES)
    if stored is None:
        return None
    earlier = [(h, k) for h, k in digest_keys(config.bucket, app) if h < hour]
    previous = None
    if earlier:
        previous = load_ref(config.bucket, earlier[-1][1], earlier[-1][0])
        if previous is None:
            return None
    grouped = manifests_by_hour(config.bucket, app, hour, hour + HOUR)
    entries = [e for e in (manifest_entry(config.bucket, app, obj) for obj in grouped.get(hour, [])) if e is not None]
    ours = build_digest(app, hour, entries, previous, hour, config.signing_key_id)
    if not _same_as_ours(stored.body, ours):
        return None
    sig = write_signature(config.bucket, key, stored.body, config.signing_key_id,
                          lock=config.retention.put_args())
    logger.warning("signed %s, which a previous run wrote without its signature", key)
    return DigestRef(key, hour, signing.sha256_hex(stored.body), sig["signature_sha256"])


def write_app_digests(config: DigestConfig, app: str, now: datetime) -> dict[str, Any]:
    """Write the digests of every full hour of ``app`` since its last digest; returns what was done.

    Never signs bytes it did not produce: an unsigned or pre-placed digest that differs from what
    this function would write stops the app's chain with an ``error`` (verify-chain reports it).
    """
    bucket = config.bucket
    cutoff = now - timedelta(seconds=config.settle_seconds)  # hours ending after this are not final yet
    last = latest_digest(bucket, app, now)
    previous: DigestRef | None = None
    written: list[str] = []
    skipped: list[str] = []
    if last is not None:
        previous = load_ref(bucket, last[1], last[0]) or _resume(config, app, last[0], last[1])
        if previous is None:
            logger.error("digest %s has no signature and is not one this function wrote; not extending the chain "
                         "of %s", last[1], app)
            return {"app": app, "written": written, "skipped": skipped, "behind": True,
                    "error": f"{last[1]}: unsigned and not ours"}
        first = last[0] + HOUR
        grouped = manifests_by_hour(bucket, app, first, hour_floor(cutoff))
    else:
        grouped = manifests_by_hour(bucket, app, datetime.min.replace(tzinfo=UTC), hour_floor(cutoff))
        first = min(grouped) if grouped else hour_floor(cutoff) - HOUR
    hour = first
    while hour + HOUR <= cutoff and len(written) + len(skipped) < config.max_hours_per_run:
        key = keys.digest_key(app, hour)
        past = store.history(bucket, key)
        if (past["versions"] or past["delete_markers"]) and store.head(bucket, key) is None:
            logger.error("digest %s was written before and deleted; leaving the hour without a digest", key)
            skipped.append(key)
            hour += HOUR
            continue
        entries = [e for e in (manifest_entry(bucket, app, obj) for obj in grouped.get(hour, [])) if e is not None]
        doc = build_digest(app, hour, entries, previous, now, config.signing_key_id)
        data = signing.canonical_bytes(doc)
        created, _ = store.put_if_absent(bucket, key, data, lock=config.retention.put_args())
        if not created:  # someone wrote this hour first: chain on only if it is exactly what we would write
            stored = store.get(bucket, key, max_bytes=MAX_DIGEST_BYTES)
            if stored is None or not _same_as_ours(stored.body, doc):
                logger.error("digest %s already exists with content this function did not write; not signing it",
                             key)
                return {"app": app, "written": written, "skipped": skipped, "behind": True,
                        "error": f"{key}: already exists and is not ours"}
            data = stored.body
        sig = write_signature(bucket, key, data, config.signing_key_id, lock=config.retention.put_args())
        previous = DigestRef(key, hour, signing.sha256_hex(data), sig["signature_sha256"])
        if created:
            written.append(key)
        hour += HOUR
    return {"app": app, "written": written, "skipped": skipped,
            "behind": hour + HOUR <= cutoff}


def write_digests(config: DigestConfig, now: datetime | None = None, apps: list[str] | None = None) -> dict[str, Any]:
    """The scheduled job: extend every app's digest chain up to the last full hour."""
    now = (now or formats.utc_now()).astimezone(UTC)
    results = []
    for app in apps if apps is not None else list_apps(config.bucket):
        try:
            results.append(write_app_digests(config, app, now))
        except OneoffAuditError as err:  # one app's chain needs attention; the others go on
            logger.error("digest chain of %s stopped: %s", app, err)
            results.append({"app": app, "written": [], "skipped": [], "behind": True, "error": str(err)})
    return {"now": formats.format_time(now), "apps": results,
            "written": sum(len(r["written"]) for r in results)}
