"""An app's timeline: index entries newest first, filtered server-side, paginated with a cursor.

Index keys (``index/<app>/<compact started_at>_<session>.json``) sort oldest first, and S3 lists
only in ascending order, so the newest entries are found by listing time windows backwards from
the upper bound: a small window first, each next one four times wider, until the oldest key is
reached. A page never lists more than it needs plus one window, and never reads more than
:data:`MAX_SCAN` entries (with selective filters a page may then hold fewer than ``limit``
entries and still carry a cursor: continue while there is one).

The cursor is opaque to callers: base64url of canonical JSON ``{"app", "before", "v"}`` naming
the last index key returned. Without a server secret it cannot be signed, so it is validated
strictly instead (charset, length, canonical encoding, exact fields, same app, a well-formed key
name) and anything else is a 400. A cursor edited into another valid one only moves the caller
within the same app's timeline, which they may read anyway.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

from botocore.exceptions import ClientError

from oneoff_audit import formats, keys
from oneoff_audit.aws import client, is_not_found
from oneoff_audit.errors import FormatError, InvalidIdError
from oneoff_audit.ids import validate_session_id

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
MAX_SCAN = 1000
MAX_ENTRY_BYTES = 1 << 20
MAX_CURSOR_CHARS = 512
MAX_PARAM_CHARS = 1024
FETCH_WORKERS = 16
FIRST_WINDOW = timedelta(hours=1)
WINDOW_GROWTH = 4
STATUS_FILTERS = (*formats.STATUSES, "incomplete")
QUERY_PARAMS = ("from", "to", "actor", "status", "limit", "cursor")
HIDDEN_FIELDS = ("format", "version", "log_key", "log_version_id")

_NAME_RE = re.compile(r"([0-9]{8}T[0-9]{6}\.[0-9]{6}Z)_([A-Za-z0-9_-]{1,128})\.json\Z")
_B64URL = re.compile(r"[A-Za-z0-9_-]+\Z")
_END = "~"  # sorts after every digit: the open upper bound of a prefix


@dataclass(frozen=True)
class TimelineQuery:
    """A validated timeline request."""

    start: datetime | None = None
    end: datetime | None = None
    actor: str | None = None
    statuses: frozenset[str] | None = None
    limit: int = DEFAULT_LIMIT
    before: str | None = None  # index key name (without prefix) of the last entry already returned


def single_params(single: Mapping[str, str] | None, multi: Mapping[str, list[str]] | None,
                  allowed: tuple[str, ...]) -> dict[str, str]:
    """Query parameters as a plain dict; 400 (FormatError) for unknown, repeated or oversized ones."""
    values: dict[str, list[str]] = {k: list(v) for k, v in (multi or {}).items()}
    for key, value in (single or {}).items():
        values.setdefault(key, [value])
    out: dict[str, str] = {}
    for key, items in values.items():
        if key not in allowed:
            hint = f"allowed: {', '.join(allowed)}" if allowed else "this route takes none"
            raise FormatError("query", key, f"unknown parameter ({hint})")
        if len(items) != 1:
            raise FormatError("query", key, "given more than once")
        if len(items[0]) > MAX_PARAM_CHARS:
            raise FormatError("query", key, f"longer than {MAX_PARAM_CHARS} characters")
        out[key] = items[0]
    return out


def parse_limit(raw: str | None, default: int, maximum: int) -> int:
    """A page size 1..maximum from a query value."""
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= maximum:
        raise FormatError("query", "limit", f"must be an integer from 1 to {maximum}")
    return int(raw)


def parse_query(app: str, single: Mapping[str, str] | None, multi: Mapping[str, list[str]] | None) -> TimelineQuery:
    """Validate the timeline's query string; raises FormatError (400) naming the parameter."""
    params = single_params(single, multi, QUERY_PARAMS)
    start = formats.parse_time(params["from"], "query", "from") if "from" in params else None
    end = formats.parse_time(params["to"], "query", "to") if "to" in params else None
    if start is not None and end is not None and start >= end:
        raise FormatError("query", "from", "must be before 'to'")
    actor = params.get("actor")
    if actor is not None and not 1 <= len(actor) <= 256:
        raise FormatError("query", "actor", "must be 1 to 256 characters")
    statuses = None
    if "status" in params:
        statuses = frozenset(params["status"].split(","))
        unknown = sorted(statuses - set(STATUS_FILTERS))
        if unknown or not statuses:
            raise FormatError("query", "status", f"must be one or more of {', '.join(STATUS_FILTERS)}, comma-separated")
    before = decode_cursor(app, params["cursor"]) if "cursor" in params else None
    return TimelineQuery(start, end, actor, statuses, parse_limit(params.get("limit"), DEFAULT_LIMIT, MAX_LIMIT),
                         before)


def encode_cursor(app: str, name: str, field: str = "before") -> str:
    """The opaque cursor continuing after index (or access) key name ``name`` of ``app``."""
    raw = json.dumps({"app": app, field: name, "v": 1}, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(app: str, token: str, field: str = "before", name_re: re.Pattern[str] = _NAME_RE) -> str:
    """The key name inside a cursor made by :func:`encode_cursor`; FormatError (400) for anything else."""
    def bad(reason: str) -> FormatError:
        return FormatError("query", "cursor", reason)

    if not token or len(token) > MAX_CURSOR_CHARS or not _B64URL.match(token):
        raise bad("malformed (not a cursor returned by this API)")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        value = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError) as err:
        raise bad("malformed (not a cursor returned by this API)") from err
    if not isinstance(value, dict) or set(value) != {"app", field, "v"} or value["v"] != 1:
        raise bad("malformed (not a cursor returned by this API)")
    if value["app"] != app:
        raise bad("belongs to another app")
    name = value[field]
    if not isinstance(name, str) or not name_re.fullmatch(name):
        raise bad("malformed (not a cursor returned by this API)")
    if encode_cursor(app, name, field) != token:
        raise bad("malformed (not in canonical form)")
    return name


def parse_index_name(name: str) -> tuple[datetime, str]:
    """(started_at, session id) of an index key name ``<compact time>_<session>.json``."""
    match = _NAME_RE.match(name)
    if match is None:
        raise InvalidIdError("index key name", name, "not <YYYYMMDDTHHMMSS.ffffffZ>_<session>.json")
    try:
        started = datetime.strptime(match.group(1), "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
    except ValueError as err:
        raise InvalidIdError("index key name", name, "invalid time") from err
    return started, validate_session_id(match.group(2))


def _window_time(prefix: str, bound: str) -> datetime:
    try:
        return datetime.strptime(bound[len(prefix):len(prefix) + 23], "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
    except ValueError:  # the open end: the first window runs from now-window to the end (future keys too)
        return formats.utc_now()


def _time_bound(prefix: str, when: datetime) -> str:
    """A string that sorts after every key of a session started before ``when`` and before the others."""
    return prefix + keys.compact_time(max(when, datetime(1970, 1, 1, tzinfo=UTC)))


def _list_between(s3: Any, bucket: str, prefix: str, low: str, high: str) -> list[str]:
    """Keys k with low < k < high, ascending."""
    found: list[str] = []
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "StartAfter": low, "MaxKeys": 1000}
    while True:
        resp = s3.list_objects_v2(**kwargs)
        for obj in resp.get("Contents", []):
            if obj["Key"] >= high:
                return found
            found.append(obj["Key"])
        if not resp.get("IsTruncated"):
            return found
        kwargs["ContinuationToken"] = resp["NextContinuationToken"]


def iter_keys_newest_first(s3: Any, bucket: str, prefix: str, low: str, high: str) -> Iterator[str]:
    """Keys k under ``prefix`` with low < k < high, newest (greatest) first, listing backwards in windows."""
    first = s3.list_objects_v2(Bucket=bucket, Prefix=prefix, StartAfter=low, MaxKeys=1).get("Contents", [])
    if not first or first[0]["Key"] >= high:
        return
    oldest = first[0]["Key"]
    span = FIRST_WINDOW
    hi, hi_time = high, _window_time(prefix, high)
    while True:
        lo_time = hi_time - span
        lo = _time_bound(prefix, lo_time)
        final = lo <= oldest or lo <= low
        if final:
            lo = low
        yield from reversed(_list_between(s3, bucket, prefix, lo, hi))
        if final:
            return
        hi, hi_time = lo, lo_time
        span *= WINDOW_GROWTH


def _matches(entry: dict[str, Any], query: TimelineQuery) -> bool:
    if query.actor is not None and query.actor not in (entry["actor"]["id"], entry["actor"]["name"]):
        return False
    if query.statuses is not None:
        return entry["status"] in query.statuses or ("incomplete" in query.statuses and not entry["complete"])
    return True


def read_entry(s3: Any, bucket: str, app: str, key: str) -> dict[str, Any]:
    """One index entry, validated and checked against its own key; FormatError if it is not sound."""
    name = key[len(keys.index_prefix(app)):]
    started, session_id = parse_index_name(name)
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read(MAX_ENTRY_BYTES + 1)
    entry = formats.read_json_object(body, "index-entry", f"index entry {name}", MAX_ENTRY_BYTES)
    if entry["app"] != app or entry["session_id"] != session_id:
        raise FormatError(f"index entry {name}", "session_id", "does not match its key")
    if keys.compact_time(formats.parse_time(entry["started_at"])) != keys.compact_time(started):
        raise FormatError(f"index entry {name}", "started_at", "does not match its key")
    return entry


def public_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """An index entry as the API shows it (storage details left out)."""
    return {k: v for k, v in entry.items() if k not in HIDDEN_FIELDS}


def _fetch(s3: Any, bucket: str, app: str) -> Callable[[str], tuple[str, dict[str, Any] | None, str | None]]:
    def fetch(key: str) -> tuple[str, dict[str, Any] | None, str | None]:
        try:
            return key, read_entry(s3, bucket, app, key), None
        except (FormatError, InvalidIdError) as err:
            return key, None, str(err)
        except ClientError as err:
            if is_not_found(err):
                return key, None, "deleted while listing"
            raise
    return fetch


def list_sessions(bucket: str, app: str, query: TimelineQuery) -> dict[str, Any]:
    """One page of ``app``'s timeline: ``{"app", "sessions", "cursor", "skipped"}``."""
    s3 = client("s3")
    prefix = keys.index_prefix(app)
    low = _time_bound(prefix, query.start) if query.start else prefix
    high = prefix + _END
    if query.end is not None:
        high = min(high, _time_bound(prefix, query.end))
    if query.before is not None:
        high = min(high, prefix + query.before)
    keys_iter = iter_keys_newest_first(s3, bucket, prefix, low, high)
    sessions: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    scanned = 0
    last_key: str | None = None
    more = False
    with ThreadPoolExecutor(max_workers=FETCH_WORKERS) as pool:
        while scanned < MAX_SCAN:
            batch = list(islice(keys_iter, min(max(query.limit - len(sessions), 8), MAX_SCAN - scanned)))
            if not batch:
                break
            for index, (key, entry, problem) in enumerate(pool.map(_fetch(s3, bucket, app), batch)):
                scanned += 1
                last_key = key
                if entry is None:
                    skipped.append({"key": key[len(prefix):], "reason": problem or "unreadable"})
                elif _matches(entry, query):
                    sessions.append(public_entry(entry))
                if len(sessions) == query.limit:
                    more = index + 1 < len(batch)
                    break
            if len(sessions) == query.limit:
                break
    if not more and last_key is not None:
        more = next(keys_iter, None) is not None
    cursor = encode_cursor(app, last_key[len(prefix):]) if more and last_key else None
    return {"app": app, "sessions": sessions, "cursor": cursor, "skipped": skipped}
