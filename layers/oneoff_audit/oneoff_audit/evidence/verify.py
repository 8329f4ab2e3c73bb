"""``verify-chain``: walk an app's digests and manifests and name exactly what is wrong.

Trust comes from the signing key the verifier is given (configuration or a PEM file), never
from what the bucket says about itself. For every hour in the range the verifier checks that a
digest exists, that its signature verifies over its exact bytes, that it is chained to the
previous digest (key, SHA-256 of the bytes and of the signature), and, for every manifest it
lists, that the manifest and its signature are the ones recorded and verify, and that the log the
manifest names is still the filed version. Manifests and logs that no digest covers are reported
too. Each problem is one :class:`Finding` with a kind from :data:`KINDS`.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from oneoff_audit import formats, keys
from oneoff_audit.errors import FormatError
from oneoff_audit.evidence import signing, store
from oneoff_audit.evidence.digest import (
    HOUR,
    MAX_DIGEST_BYTES,
    digest_keys,
    digests_prefix,
    hour_floor,
    manifests_prefix,
    parse_digest_key,
    session_of_manifest,
)
from oneoff_audit.evidence.manifest import MAX_MANIFEST_BYTES, parse_manifest, signature_key
from oneoff_audit.ids import validate_app

KINDS = (
    "log-missing",          # the log a manifest names is gone (deleted, or hidden by a delete marker)
    "log-replaced",         # the log's current version is not the filed one (other version, size or SHA-256)
    "log-without-manifest",  # a filed log has no manifest
    "manifest-missing",     # a manifest a digest lists is gone
    "manifest-edited",      # a manifest's bytes or signature differ from what its digest recorded, or do not verify
    "manifest-unlisted",    # a manifest written in a digested hour that the digest does not list
    "digest-missing",       # a digest a later digest names as its previous is gone
    "digest-edited",        # a digest's bytes or signature differ from what the next digest recorded, or do not verify
    "chain-broken",         # a digest's previous link does not name the digest before it
    "hour-without-digest",  # a full hour (past the grace period) that has no digest and no later digest names
)
DEFAULT_GRACE = timedelta(minutes=75)  # hourly schedule + settle time: when an hour's digest must exist
WORKERS = 8


@dataclass(frozen=True)
class Finding:
    """One precise problem: what kind, which object, and what exactly was seen."""

    kind: str
    key: str
    detail: str
    session_id: str | None = None
    hour: str | None = None

    def line(self) -> str:
        """The one-line form printed by ``verify-chain``."""
        return f"{self.kind} {self.key}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _gone(bucket: str, key: str) -> str:
    """Why an object is not there: a delete marker over a version, versions left, or never written."""
    past = store.history(bucket, key)
    if past["delete_markers"]:
        marker = past["delete_markers"][0]
        when = formats.format_time(marker["LastModified"])
        if past["versions"]:
            return f"deleted at {when} (a delete marker hides version {past['versions'][0]['VersionId']})"
        return f"deleted at {when} (delete marker; no version left)"
    if past["versions"]:
        return "not readable although versions exist"
    return "not found and no version was ever stored (permanently deleted or never written)"


def parse_when(value: str | None, name: str) -> datetime | None:
    """A ``--from``/``--to`` bound: RFC 3339 / ISO 8601 (``Z`` or offset; naive means UTC)."""
    if value in (None, ""):
        return None
    assert value is not None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        ts = datetime.fromisoformat(text)
    except ValueError as err:
        raise FormatError(name, "", f"not an ISO 8601 time: {value!r}") from err
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


class _Verifier:
    def __init__(self, bucket: str, app: str, key: ec.EllipticCurvePublicKey, deep: bool) -> None:
        self.bucket = bucket
        self.app = validate_app(app)
        self.key = key
        self.deep = deep
        self.findings: dict[tuple[str, str], Finding] = {}
        self.logs_checked = 0
        self._lock = threading.Lock()

    def add(self, kind: str, key: str, detail: str, **extra: Any) -> None:
        """Record a finding; a second finding of the same kind for the same key extends the detail."""
        assert kind in KINDS, kind
        with self._lock:
            found = self.findings.get((kind, key))
            if found is None:
                self.findings[(kind, key)] = Finding(kind, key, detail, **extra)
            elif detail not in found.detail:
                self.findings[(kind, key)] = replace(found, detail=f"{found.detail}; {detail}")

    # ------------------------------------------------------------------ digests
    def load_digest(self, key: str, hour: datetime) -> dict[str, Any] | None:
        """Read, verify and parse one digest; None if missing. Findings for anything wrong."""
        obj = store.get(self.bucket, key, max_bytes=MAX_DIGEST_BYTES)
        if obj is None:
            return None
        hour_s = formats.format_time(hour)
        info: dict[str, Any] = {"key": key, "hour": hour, "sha256": signing.sha256_hex(obj.body), "doc": None,
                                "signature_sha256": None, "valid": False}
        sig = store.get(self.bucket, signature_key(key), max_bytes=1024)
        if sig is None:
            self.add("digest-edited", key, f"signature {signature_key(key)} is missing "
                     f"({_gone(self.bucket, signature_key(key))})", hour=hour_s)
        else:
            info["signature_sha256"] = signing.sha256_hex(sig.body)
            if signing.verify(obj.body, sig.body, self.key):
                info["valid"] = True
            else:
                self.add("digest-edited", key, f"signature does not verify over the stored bytes "
                         f"(sha256 {info['sha256']})", hour=hour_s)
        try:
            doc = formats.validate(formats.parse_json(obj.body, key, MAX_DIGEST_BYTES), "digest", key)
        except FormatError as err:
            self.add("digest-edited", key, f"not a valid digest: {err}", hour=hour_s)
            return info
        if doc["app"] != self.app or doc["key"] != key or doc["hour_start"] != hour_s:
            self.add("digest-edited", key, f"describes {doc['key']} ({doc['app']}, {doc['hour_start']}), "
                     "not this key", hour=hour_s)
        info["doc"] = doc
        return info

    def check_link(self, info: dict[str, Any], by_hour: dict[datetime, dict[str, Any]],
                   earlier_exists: bool) -> None:
        """Check that ``info``'s previous link names the digest before it, with matching hashes."""
        doc = info["doc"]
        key = info["key"]
        hour_s = formats.format_time(info["hour"])
        prev = doc["previous"]
        if prev is None:
            if earlier_exists:
                self.add("chain-broken", key, "starts a new chain (previous is null) although earlier digests "
                         "exist", hour=hour_s)
            return
        prev_hour = parse_digest_key(self.app, prev["key"])
        if prev_hour is None or prev_hour >= info["hour"] or formats.parse_time(prev["hour_start"]) != prev_hour:
            self.add("chain-broken", key, f"previous link names {prev['key']!r} ({prev['hour_start']}), "
                     "not an earlier digest of this app", hour=hour_s)
            return
        skipped = [h for h in by_hour if prev_hour < h < info["hour"]]
        if skipped:
            self.add("chain-broken", key, f"previous link names {prev['key']} and skips "
                     f"{keys.digest_key(self.app, min(skipped))}", hour=hour_s)
        target = by_hour.get(prev_hour)
        if target is None:
            target = self.load_digest(prev["key"], prev_hour)
            if target is not None:
                by_hour[prev_hour] = target
        if target is None:
            self.add("digest-missing", prev["key"], f"{_gone(self.bucket, prev['key'])}; named as previous by "
                     f"{key}", hour=prev["hour_start"])
            return
        if target["sha256"] != prev["sha256"]:
            self.add("digest-edited", prev["key"], f"sha256 is {target['sha256']}, {key} recorded "
                     f"{prev['sha256']}", hour=prev["hour_start"])
        elif target["signature_sha256"] is not None and target["signature_sha256"] != prev["signature_sha256"]:
            self.add("digest-edited", prev["key"], f"signature was replaced: its sha256 is "
                     f"{target['signature_sha256']}, {key} recorded {prev['signature_sha256']}",
                     hour=prev["hour_start"])

    # ------------------------------------------------------------------ manifests and logs
    def check_manifest(self, mkey: str, listings: list[tuple[str, dict[str, Any]]]) -> None:
        """Check one manifest against every digest entry that lists it, then its log."""
        session_id = session_of_manifest(self.app, mkey)
        obj = store.get(self.bucket, mkey, max_bytes=MAX_MANIFEST_BYTES)
        if obj is None:
            self.add("manifest-missing", mkey, f"{_gone(self.bucket, mkey)}; listed in {listings[0][0]}",
                     session_id=session_id)
            return
        sha = signing.sha256_hex(obj.body)
        problems = []
        for digest_key, entry in listings:
            if entry["sha256"] != sha:
                problems.append(f"sha256 is {sha}, {digest_key} recorded {entry['sha256']}")
                break
        sig = store.get(self.bucket, signature_key(mkey), max_bytes=1024)
        recorded = listings[0][1]["signature_sha256"]
        if sig is not None and recorded is not None and signing.sha256_hex(sig.body) != recorded:
            problems.append(f"signature was replaced (its sha256 is {signing.sha256_hex(sig.body)}, "
                            f"{listings[0][0]} recorded {recorded})")
        problems += self.manifest_problems(mkey, obj.body, sig.body if sig is not None else None)
        if problems:
            self.add("manifest-edited", mkey, "; ".join(problems), session_id=session_id)
        else:
            self.check_log(mkey, parse_manifest(obj.body, mkey), session_id)

    def manifest_problems(self, mkey: str, body: bytes, signature: bytes | None) -> list[str]:
        """What is wrong with a manifest's signature and content on their own (empty list: intact)."""
        session_id = session_of_manifest(self.app, mkey)
        if signature is None:
            return [f"signature {signature_key(mkey)} is missing ({_gone(self.bucket, signature_key(mkey))})"]
        if not signing.verify(body, signature, self.key):
            return [f"signature does not verify over the stored bytes (sha256 {signing.sha256_hex(body)})"]
        try:
            doc = parse_manifest(body, mkey)
        except FormatError as err:
            return [f"not a valid manifest: {err}"]
        if doc["app"] != self.app or doc["session_id"] != session_id:
            return [f"signed for {doc['app']}/{doc['session_id']}, not this key"]
        return []

    def check_unlisted(self, mkey: str) -> None:
        """Check a manifest no digest lists: its own signature and its log."""
        obj = store.get(self.bucket, mkey, max_bytes=MAX_MANIFEST_BYTES)
        if obj is None:
            return
        session_id = session_of_manifest(self.app, mkey)
        sig = store.get(self.bucket, signature_key(mkey), max_bytes=1024)
        problems = self.manifest_problems(mkey, obj.body, sig.body if sig is not None else None)
        if problems:
            self.add("manifest-edited", mkey, "; ".join(problems), session_id=session_id)
        else:
            self.check_log(mkey, parse_manifest(obj.body, mkey), session_id)

    def check_log(self, mkey: str, manifest: dict[str, Any], session_id: str | None) -> None:
        """Compare the log's current version with the one the (intact) manifest records."""
        with self._lock:
            self.logs_checked += 1
        log_key = manifest["log_key"]
        filed_version = manifest["log_version_id"]
        current = store.head(self.bucket, log_key)
        if current is None:
            self.add("log-missing", log_key, f"{_gone(self.bucket, log_key)}; filed as version "
                     f"{filed_version} (manifest {mkey})", session_id=session_id)
            return
        version = current.get("VersionId")
        if filed_version is not None and version != filed_version:
            still = store.head(self.bucket, log_key, filed_version) is not None
            self.add("log-replaced", log_key, f"current version is {version}, the manifest records version "
                     f"{filed_version} ({'still stored' if still else 'no longer stored'})", session_id=session_id)
            return
        if current.get("ContentLength") != manifest["ciphertext_size"]:
            self.add("log-replaced", log_key, f"size is {current.get('ContentLength')} bytes, the manifest "
                     f"records {manifest['ciphertext_size']}", session_id=session_id)
            return
        if self.deep or filed_version is None:
            sha = store.sha256_of_object(self.bucket, log_key, version)
            if sha != manifest["ciphertext_sha256"]:
                self.add("log-replaced", log_key, f"sha256 is {sha}, the manifest records "
                         f"{manifest['ciphertext_sha256']}", session_id=session_id)


def verify_chain(bucket: str, app: str, signing_key: str | ec.EllipticCurvePublicKey, start: datetime | None = None,
                 end: datetime | None = None, now: datetime | None = None, grace: timedelta = DEFAULT_GRACE,
                 deep: bool = False) -> dict[str, Any]:
    """Verify ``app``'s evidence for the hours in ``[start, end)``; returns the report (``ok``, ``findings``).

    ``signing_key`` is the trusted KMS key id/ARN (its public key is fetched) or the public key itself.
    Without ``start`` the walk begins at the app's first digest (or first manifest); ``end`` defaults
    to ``now``. Hours that end less than ``grace`` before ``now`` are *pending*, not findings.
    ``deep`` also hashes every log's current bytes (otherwise version id and size are compared).
    """
    now = (now or formats.utc_now()).astimezone(UTC)
    end = min(end or now, now)
    key = signing_key if isinstance(signing_key, ec.EllipticCurvePublicKey) else signing.public_key(signing_key)
    v = _Verifier(bucket, app, key, deep)
    first_hour = hour_floor(start) if start is not None else None
    all_digests = digest_keys(bucket, v.app)
    in_range = [(h, k) for h, k in all_digests if (first_hour is None or h >= first_hour) and h < end]

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        loaded = list(pool.map(lambda hk: v.load_digest(hk[1], hk[0]), in_range))
    by_hour = {info["hour"]: info for info in loaded if info is not None}
    earliest = all_digests[0][0] if all_digests else None
    for info in sorted(by_hour.values(), key=lambda i: i["hour"]):
        if info["doc"] is not None:
            v.check_link(info, by_hour, earlier_exists=earliest is not None and earliest < info["hour"])

    # Which hours must have a digest: from the chain's verified start (or the first manifest, or --from).
    named_previous = {parse_digest_key(v.app, i["doc"]["previous"]["key"]) for i in by_hour.values()
                      if i["doc"] is not None and i["doc"]["previous"] is not None}
    chain_start = min((i["hour"] for i in by_hour.values() if i["doc"] is not None and i["doc"]["previous"] is None
                       and i["valid"]), default=None)
    manifests = [o for o in store.list_objects(bucket, manifests_prefix(v.app))
                 if session_of_manifest(v.app, o["Key"]) is not None]
    first_manifest = min((hour_floor(o["LastModified"]) for o in manifests), default=None)
    candidates = [h for h in (chain_start, first_manifest, earliest) if h is not None]
    if first_hour is not None and chain_start is None:
        expected_from = first_hour
    elif candidates:
        expected_from = max(min(candidates), first_hour) if first_hour is not None else min(candidates)
    else:
        expected_from = None
    pending_hours: list[str] = []
    hours_checked = 0
    hour = expected_from
    while hour is not None and hour < end and hour + HOUR <= now:
        hours_checked += 1
        key_h = keys.digest_key(v.app, hour)
        if hour not in by_hour and hour not in named_previous:
            if hour + HOUR + grace <= now:
                v.add("hour-without-digest", key_h, f"no digest for {formats.format_time(hour)}.."
                      f"{formats.format_time(hour + HOUR)}: {_gone(bucket, key_h)}", hour=formats.format_time(hour))
            else:
                pending_hours.append(formats.format_time(hour))
        hour += HOUR

    # Manifests listed by the digests in range, then manifests no digest lists.
    listings: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for info in sorted(by_hour.values(), key=lambda i: i["hour"]):
        if info["doc"] is not None and (first_hour is None or info["hour"] >= first_hour):
            for entry in info["doc"]["manifests"]:
                listings.setdefault(entry["key"], []).append((info["key"], entry))
    last_digested = max(by_hour, default=None)
    pending_manifests: list[str] = []
    unlisted: list[str] = []
    for obj in manifests:
        written = obj["LastModified"].astimezone(UTC)
        if obj["Key"] in listings or written >= end or (first_hour is not None and written < first_hour):
            continue
        covering = by_hour.get(hour_floor(written))
        if covering is not None and not (covering["valid"] and covering["doc"] is not None):
            pass  # that hour's digest is already reported as edited: its listing proves nothing either way
        elif covering is not None or (last_digested is not None and hour_floor(written) < last_digested):
            v.add("manifest-unlisted", obj["Key"], f"written at {formats.format_time(written)} but not listed in "
                  f"{keys.digest_key(v.app, hour_floor(written))}", session_id=session_of_manifest(v.app, obj["Key"]))
        elif written + HOUR + grace <= now and hour_floor(written) not in by_hour:
            v.add("manifest-unlisted", obj["Key"], f"written at {formats.format_time(written)}; no digest covers "
                  "its hour", session_id=session_of_manifest(v.app, obj["Key"]))
        else:
            pending_manifests.append(obj["Key"])
        unlisted.append(obj["Key"])

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        list(pool.map(lambda mkey: v.check_manifest(mkey, listings[mkey]), sorted(listings)))
        list(pool.map(v.check_unlisted, unlisted))

    # Filed logs without a manifest, and logs or manifests deleted before any digest listed them (a delete
    # marker in the versioned bucket). Older than the grace period only: the assembler may be mid-way.
    current_manifests = {session_of_manifest(v.app, o["Key"]) for o in manifests}
    missing_manifests = {f.session_id for f in v.findings.values() if f.kind == "manifest-missing"}

    def window(written: datetime | None) -> bool:
        return (written is not None and (first_hour is None or written >= first_hour) and written < end
                and written + grace <= now)

    for state in store.key_states(bucket, manifests_prefix(v.app)):
        sid = session_of_manifest(v.app, state.key)
        if sid is not None and state.deleted and state.key not in listings and window(state.written_at):
            v.add("manifest-missing", state.key, f"deleted at {formats.format_time(state.deleted_at)} (a delete "
                  f"marker hides version {state.version_id}) before any digest listed it", session_id=sid)
            missing_manifests.add(sid)
    log_prefix = f"{keys.LOGS_PREFIX}{v.app}/"
    for state in store.key_states(bucket, log_prefix):
        name = state.key[len(log_prefix):]
        sid = name[:-len(".jsonl.enc")] if name.endswith(".jsonl.enc") else None
        if sid in current_manifests or not window(state.written_at):
            continue  # a log with a manifest was checked against it
        if state.deleted:
            why = "its manifest is missing too" if sid in missing_manifests else "no manifest records it"
            v.add("log-missing", state.key, f"deleted at {formats.format_time(state.deleted_at)} (a delete marker "
                  f"hides version {state.version_id}); {why}", session_id=sid)
        elif sid not in missing_manifests:
            v.add("log-without-manifest", state.key, f"written at {formats.format_time(state.written_at)}; "
                  f"{keys.manifest_key(v.app, sid) if sid else 'its manifest'} does not exist", session_id=sid)

    findings = sorted(v.findings.values(), key=lambda f: (f.key, f.kind))
    return {
        "app": v.app,
        "from": formats.format_time(first_hour or expected_from) if (first_hour or expected_from) else None,
        "to": formats.format_time(end),
        "now": formats.format_time(now),
        "ok": not findings,
        "checked": {"hours": hours_checked, "digests": sum(1 for info in loaded if info is not None),
                    "manifests": len(listings) + len(unlisted), "logs": v.logs_checked},
        "findings": [f.to_dict() for f in findings],
        "pending": {"hours": pending_hours, "manifests": sorted(pending_manifests)},
        "digests_prefix": digests_prefix(v.app),
    }
