"""Every S3 key of the bucket is built and parsed here, and nowhere else.

Layout (see docs/FORMAT.md)::

    staging/<app>/<session>/opened.json
    staging/<app>/<session>/chunks/<seq:08d>.gz
    staging/<app>/<session>/closed.json
    logs/<app>/<session>.jsonl.enc
    index/<app>/<started_at compact>_<session>.json
    manifests/<app>/<session>.json (+ .sig)
    digests/<app>/YYYY/MM/DD/HH.json (+ .sig)
    access/<app>/<session>/<time>_<request id>.json
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import unquote_plus

from oneoff_audit.errors import InvalidIdError
from oneoff_audit.ids import validate_app, validate_session_id

DEFAULT_STAGING_PREFIX = "staging/"
LOGS_PREFIX = "logs/"
INDEX_PREFIX = "index/"
MANIFESTS_PREFIX = "manifests/"
DIGESTS_PREFIX = "digests/"
ACCESS_PREFIX = "access/"

OPENED = "opened.json"
CLOSED = "closed.json"
CHUNKS_DIR = "chunks/"
MAX_SEQ = 99_999_999

_CHUNK_NAME = re.compile(r"([0-9]{8})\.gz")  # not \d: that also matches fullwidth and other digits


def _prefix(prefix: str) -> str:
    if not prefix or not prefix.endswith("/") or prefix.startswith("/") or ".." in prefix:
        raise InvalidIdError("key prefix", prefix, "must be non-empty, relative and end with '/'")
    return prefix


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if usable as the staging prefix (relative, ends with '/', no '..'), else raise."""
    return _prefix(prefix)


def session_prefix(app: str, session_id: str, staging_prefix: str = DEFAULT_STAGING_PREFIX) -> str:
    """The staging folder of one session."""
    return f"{_prefix(staging_prefix)}{validate_app(app)}/{validate_session_id(session_id)}/"


def opened_key(app: str, session_id: str, staging_prefix: str = DEFAULT_STAGING_PREFIX) -> str:
    """Key of the session header written once when recording starts."""
    return session_prefix(app, session_id, staging_prefix) + OPENED


def closed_key(app: str, session_id: str, staging_prefix: str = DEFAULT_STAGING_PREFIX) -> str:
    """Key of the close marker written after every chunk is durable."""
    return session_prefix(app, session_id, staging_prefix) + CLOSED


def chunk_key(app: str, session_id: str, seq: int, staging_prefix: str = DEFAULT_STAGING_PREFIX) -> str:
    """Key of chunk ``seq`` (zero-padded so keys sort in sequence order)."""
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
        raise InvalidIdError("chunk seq", seq, f"must be an integer 0..{MAX_SEQ}")
    return f"{session_prefix(app, session_id, staging_prefix)}{CHUNKS_DIR}{seq:08d}.gz"


def log_key(app: str, session_id: str) -> str:
    """Key of the filed, encrypted audit log."""
    return f"{LOGS_PREFIX}{validate_app(app)}/{validate_session_id(session_id)}.jsonl.enc"


def log_gaps_key(app: str, session_id: str, plaintext_sha256: str) -> str:
    """Key of the gap list of a log whose gaps do not fit in object metadata (tied to its plaintext)."""
    if re.fullmatch(r"[0-9a-f]{64}", plaintext_sha256) is None:
        raise InvalidIdError("plaintext sha256", plaintext_sha256, "must be 64 lowercase hex digits")
    return f"{LOGS_PREFIX}{validate_app(app)}/{validate_session_id(session_id)}.gaps/{plaintext_sha256}.json"


def compact_time(ts: datetime) -> str:
    """``20261125T144600.123456Z``: a UTC time that sorts lexically and is safe in a key."""
    return ts.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def index_prefix(app: str) -> str:
    """Folder of an app's timeline entries."""
    return f"{INDEX_PREFIX}{validate_app(app)}/"


def index_key(app: str, session_id: str, started_at: datetime) -> str:
    """Key of a timeline entry; keys sort by start time."""
    return f"{index_prefix(app)}{compact_time(started_at)}_{validate_session_id(session_id)}.json"


def manifest_key(app: str, session_id: str) -> str:
    """Key of a filed log's evidence manifest (its signature is at ``+ '.sig'``)."""
    return f"{MANIFESTS_PREFIX}{validate_app(app)}/{validate_session_id(session_id)}.json"


def digest_key(app: str, hour: datetime) -> str:
    """Key of an app's hourly digest."""
    return f"{DIGESTS_PREFIX}{validate_app(app)}/{hour.astimezone(UTC):%Y/%m/%d/%H}.json"


def access_prefix(app: str, session_id: str) -> str:
    """Folder of the access records of one log."""
    return f"{ACCESS_PREFIX}{validate_app(app)}/{validate_session_id(session_id)}/"


_REQUEST_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
ACCESS_NAME = re.compile(r"([0-9]{8}T[0-9]{6}\.[0-9]{6}Z)_([A-Za-z0-9-]{1,64})\.json")


def access_key(app: str, session_id: str, at: datetime, request_id: str) -> str:
    """Key of one access record: sorts by time; the request id keeps simultaneous views apart."""
    if not isinstance(request_id, str) or _REQUEST_ID.fullmatch(request_id) is None:
        raise InvalidIdError("request id", request_id, "allowed characters are A-Z a-z 0-9 -, at most 64")
    return f"{access_prefix(app, session_id)}{compact_time(at)}_{request_id}.json"


@dataclass(frozen=True)
class StagingKey:
    """A parsed staging key: which session, and which object of it."""

    app: str
    session_id: str
    kind: str  # "opened" | "closed" | "chunk"
    seq: int | None = None


def parse_staging_key(
    key: str, staging_prefix: str = DEFAULT_STAGING_PREFIX, *, url_encoded: bool = False
) -> StagingKey:
    """Parse a staging key (S3 event keys arrive URL-encoded: pass ``url_encoded=True``).

    Raises InvalidIdError for anything that is not exactly one of the three staging shapes.
    """
    raw = unquote_plus(key) if url_encoded else key
    prefix = _prefix(staging_prefix)
    if not raw.startswith(prefix):
        raise InvalidIdError("staging key", key, f"does not start with {prefix!r}")
    parts = raw[len(prefix):].split("/")
    if len(parts) == 3 and parts[2] in (OPENED, CLOSED):
        app, session_id = validate_app(parts[0]), validate_session_id(parts[1])
        return StagingKey(app, session_id, "opened" if parts[2] == OPENED else "closed")
    if len(parts) == 4 and parts[2] + "/" == CHUNKS_DIR:
        match = _CHUNK_NAME.fullmatch(parts[3])
        if match is None:
            raise InvalidIdError("staging key", key, "chunk name must be <seq:08d>.gz")
        return StagingKey(validate_app(parts[0]), validate_session_id(parts[1]), "chunk", int(match.group(1)))
    raise InvalidIdError("staging key", key, "not <app>/<session>/{opened.json,closed.json,chunks/NNNNNNNN.gz}")
