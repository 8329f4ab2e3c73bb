"""The API over real HTTP against the local stack: delivery at the threshold, presigned URLs, status codes,
the timeline, session details and the access audit."""

from __future__ import annotations

import hashlib
import io
import json
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime

import pytest
from api_support import access_records, api_world, file_session, stage_pending

from oneoff_audit import keys
from oneoff_audit.aws import client
from oneoff_audit.formats import iter_log_lines

pytestmark = pytest.mark.integration
__all__ = ["api_world"]

SMALL_TEXTS = ["caf\u00e9 \u20ac\r\n", b"raw \xff\xfe bytes\r\n", "done \U0001F600\r\n"]


@pytest.fixture(scope="module")
def world(api_world):
    file_session(api_world, "app1", "SMALL", SMALL_TEXTS, "2026-11-25T10:00:00.000001Z",
                 stream_in=[b"typed\r", b"\xc3\xa9\r"])
    file_session(api_world, "app1", "OLDER", ["older\r\n"], "2026-11-24T09:00:00Z", actor="u-7",
                 status="failed", code=3)
    file_session(api_world, "app1", "OLDEST", ["oldest\r\n"], "2025-01-02T03:04:05Z")
    file_session(api_world, "app2", "OTHER", ["other app\r\n"], "2026-11-25T11:00:00Z")
    stage_pending(api_world, "app1", "REC", closed=False)
    stage_pending(api_world, "app1", "ASM", closed=True)
    return api_world


def _lines(plaintext: bytes):
    parts = list(iter_log_lines(io.BytesIO(plaintext)))
    return parts[0][1], [v for k, v in parts[1:-1]], parts[-1][1]


def test_inline_vs_url_at_the_threshold(world, monkeypatch):
    plaintext = world.plaintext["app1/SMALL"]
    size = len(plaintext)
    assert world.filed["app1/SMALL"].plaintext_size == size
    header, events, trailer = _lines(plaintext)
    for limit, inline in ((size + 1, True), (size, True), (size - 1, False)):
        monkeypatch.setenv("INLINE_MAX_BYTES", str(limit))
        status, headers, body = world.get("/apps/app1/sessions/SMALL/log", "reader-token")
        assert status == 200
        value = json.loads(body)
        if inline:
            assert value == {"header": header, "events": events, "trailer": trailer}, limit
            assert headers["X-Oneoff-Audit-Sha256"] == hashlib.sha256(plaintext).hexdigest()
            assert any(isinstance(e[2], str) and "\u20ac" in e[2] for e in value["events"])  # text stays text
        else:
            stored = world.stored("app1", "SMALL")
            assert sorted(value) == ["download_url", "encryption", "expires_in", "sha256", "size"]
            assert (value["expires_in"], value["size"], value["sha256"], value["encryption"]) == (
                300, len(stored), hashlib.sha256(stored).hexdigest(), "aws-encryption-sdk")
            with urllib.request.urlopen(value["download_url"], timeout=30) as resp:  # plain HTTP, no credentials
                assert resp.read() == stored
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(value["download_url"]).query)
            assert query["X-Amz-Expires"] == ["300"]
            assert query["versionId"] == [world.filed["app1/SMALL"].log_version_id]
            assert urllib.parse.urlsplit(value["download_url"]).path.endswith("/logs/app1/SMALL.jsonl.enc")


def test_presign_ttl_is_capped_by_config_and_by_the_credentials(world, monkeypatch):
    monkeypatch.setenv("INLINE_MAX_BYTES", "0")
    monkeypatch.setenv("PRESIGN_TTL", "5000")
    assert world.get_json("/apps/app1/sessions/SMALL/log")[1]["expires_in"] == 900
    monkeypatch.setenv("PRESIGN_TTL", "30")
    assert world.get_json("/apps/app1/sessions/SMALL/log")[1]["expires_in"] == 30
    monkeypatch.setenv("PRESIGN_TTL", "600")
    expiry = time.time() + 200
    with monkeypatch.context() as scoped:  # clients are cached per environment: none built here outlives it
        scoped.setenv("AWS_CREDENTIAL_EXPIRATION", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expiry)))
        ttl = world.get_json("/apps/app1/sessions/SMALL/log")[1]["expires_in"]
    assert 190 <= ttl <= 200


def test_status_codes(world):
    assert world.get_json("/apps/app1/sessions", None) == (401, {
        "error": "unauthorized", "message": "no caller identity: the request did not pass an authorizer"})
    assert world.get_json("/apps/app1/sessions/SMALL/log", "forged-token")[0] == 401
    denied = [world.get("/apps/app2/sessions/OTHER/log", "reader-token"),  # exists
              world.get("/apps/app2/sessions/NOPE/log", "reader-token"),  # app exists, session does not
              world.get("/apps/app2/sessions", "reader-token")]
    assert {(s, b) for s, _, b in denied} == {
        (403, b'{"error":"forbidden","message":"not allowed to read app \'app2\'"}')}
    never = world.get("/apps/app9/sessions/OTHER/log", "reader-token")
    assert never[0] == 403 and never[2] == denied[0][2].replace(b"app2", b"app9")
    assert world.get_json("/apps/app1/sessions/NOPE/log") == (404, {
        "error": "not_found", "message": "no session 'NOPE' in app 'app1'"})
    assert world.get_json("/apps/app1/sessions/NOPE")[0] == 404
    assert world.get_json("/apps/app1/sessions/..%2F..%2Fapp2/log")[0] == 404  # not a route: '/' splits
    assert world.get_json("/apps/app1/sessions/a..b/log") == (400, {
        "error": "bad_request", "message": "invalid session id 'a..b': must not contain '..'"})
    assert world.get_json("/apps/app1/sessions?status=running&limit=5")[0] == 400
    status, headers, body = world.get("/apps/app1/sessions/REC/log")
    assert (status, json.loads(body), headers["Retry-After"]) == (202, {"status": "recording"}, "5")
    assert world.get_json("/apps/app1/sessions/ASM/log") == (202, {"status": "assembling"})
    assert world.get_json("/apps/app1/sessions/ASM") == (202, {"status": "assembling"})


def test_timeline_newest_first_filters_and_cursor(world):
    status, page = world.get_json("/apps/app1/sessions", "reader-token")
    assert status == 200
    assert [s["session_id"] for s in page["sessions"]] == ["SMALL", "OLDER", "OLDEST"]
    assert (page["cursor"], page["skipped"]) == (None, [])
    older = page["sessions"][1]
    assert older == {
        "session_id": "OLDER", "app": "app1",
        "actor": {"id": "u-7", "name": None, "type": "user", "source_ip": None},
        "command": {"argv": ["bash", "-c", "echo hi"], "tty": True, "term_size": {"cols": 80, "rows": 24},
                    "env_keys": ["HOME", "PATH"]},
        "target": {"org": "acme", "space": "prod"},
        "started_at": "2026-11-24T09:00:00Z", "ended_at": "2026-11-25T14:47:30.623456Z",
        "duration": older["duration"], "exit": {"code": 3, "signal": None}, "status": "failed", "complete": True,
        "size": world.filed["app1/OLDER"].plaintext_size, "sha256": world.filed["app1/OLDER"].plaintext_sha256,
        "ciphertext_size": world.filed["app1/OLDER"].ciphertext_size, "event_count": 1,
        "filed_at": world.filed["app1/OLDER"].filed_at,
    }
    seen, cursor = [], None
    while True:
        status, page = world.get_json("/apps/app1/sessions?limit=1" + (f"&cursor={cursor}" if cursor else ""))
        seen += [s["session_id"] for s in page["sessions"]]
        cursor = page["cursor"]
        if cursor is None:
            break
    assert seen == ["SMALL", "OLDER", "OLDEST"]

    def ids(query: str) -> list[str]:
        status, body = world.get_json(f"/apps/app1/sessions?{query}")
        assert status == 200, body
        return [s["session_id"] for s in body["sessions"]]

    assert ids("status=failed") == ["OLDER"]
    assert ids("actor=u-42") == ["SMALL", "OLDEST"]
    assert ids("from=2026-01-01T00:00:00Z") == ["SMALL", "OLDER"]
    assert ids("to=2026-11-25T10:00:00.000001Z") == ["OLDER", "OLDEST"]
    assert ids("from=2025-01-02T03:04:05Z&to=2025-01-02T03:04:05.000001Z") == ["OLDEST"]

    _, first = world.get_json("/apps/app1/sessions?limit=1")
    tampered = first["cursor"][:-2] + ("AA" if first["cursor"][-2:] != "AA" else "BB")
    assert world.get_json(f"/apps/app1/sessions?cursor={tampered}") == (400, {
        "error": "bad_request", "message": "query: cursor: malformed (not a cursor returned by this API)"})
    assert world.get_json(f"/apps/app2/sessions?cursor={first['cursor']}") == (400, {
        "error": "bad_request", "message": "query: cursor: belongs to another app"})


def test_a_damaged_index_entry_is_reported_not_hidden(world):
    key = keys.index_key("app1", "BROKEN", datetime(2026, 11, 25, 9, 30, tzinfo=UTC))
    client("s3").put_object(Bucket=world.bucket, Key=key, Body=b'{"format":"oneoff-audit.index"}')
    try:
        _, page = world.get_json("/apps/app1/sessions")
    finally:
        client("s3").delete_object(Bucket=world.bucket, Key=key)
    assert [s["session_id"] for s in page["sessions"]] == ["SMALL", "OLDER", "OLDEST"]
    assert page["skipped"] == [{"key": "20261125T093000.000000Z_BROKEN.json",
                                "reason": "index entry 20261125T093000.000000Z_BROKEN.json: version: "
                                          "'version' is a required property"}]


def test_session_details(world):
    status, details = world.get_json("/apps/app1/sessions/SMALL", "reader-token")
    assert status == 200
    header, _, trailer = _lines(world.plaintext["app1/SMALL"])
    filed = world.filed["app1/SMALL"]
    assert (details["header"], details["trailer"]) == (header, trailer)
    assert details["summary"]["session_id"] == "SMALL"
    assert details["integrity"] == {
        "complete": True, "gaps": {"missing": [], "corrupt": []}, "chain_sha256": filed.chain_sha256,
        "event_count": filed.event_count, "ciphertext_size": filed.ciphertext_size,
        "ciphertext_sha256": filed.ciphertext_sha256, "plaintext_size": filed.plaintext_size,
        "plaintext_sha256": filed.plaintext_sha256, "log_version_id": filed.log_version_id, "manifest": True,
        "verified": "decrypted and hashed", "problems": [],
    }
    assert details["retention"] == {"mode": None, "retain_until": None, "legal_hold": False}


def test_access_audit_records_every_view(world, monkeypatch):
    prefix_views = access_records(world, "app1", "OLDER")
    assert prefix_views == []
    monkeypatch.setenv("INLINE_MAX_BYTES", "1048576")
    assert world.get("/apps/app1/sessions/OLDER/log", "reader-token")[0] == 200
    assert world.get("/apps/app1/sessions/OLDER/log?format=asciicast", "admin-token")[0] == 200
    assert world.get("/apps/app1/sessions/OLDER", "reader-token")[0] == 200
    monkeypatch.setenv("INLINE_MAX_BYTES", "10")
    assert world.get("/apps/app1/sessions/OLDER/log", "admin-token")[0] == 200
    assert world.get("/apps/app1/sessions/OLDER/log", "other-token")[0] == 403  # refused: not a view
    stored = access_records(world, "app1", "OLDER")
    status, listed = world.get_json("/apps/app1/sessions/OLDER/access", "reader-token")
    assert status == 200 and listed["access"] == stored and listed["cursor"] is None
    version = world.filed["app1/OLDER"].log_version_id
    assert [(r["how"], r["who"]["subject"], r["log_version_id"]) for r in stored] == [
        ("inline", "u-reader", version), ("asciicast", "auditor-1", version), ("details", "u-reader", version),
        ("url", "auditor-1", version)]
    assert stored[3]["expires_in"] == 300
    assert {r["source_ip"] for r in stored} == {"127.0.0.1"}
    assert stored[0]["who"] == {"subject": "u-reader", "name": None, "source": "cognito", "admin": False}
    assert all(r["app"] == "app1" and r["session_id"] == "OLDER" for r in stored)
    _, page = world.get_json("/apps/app1/sessions/OLDER/access?limit=3")
    assert page["access"] == stored[:3] and page["cursor"]
    _, rest = world.get_json(f"/apps/app1/sessions/OLDER/access?limit=3&cursor={page['cursor']}")
    assert rest == {"app": "app1", "session_id": "OLDER", "access": stored[3:], "cursor": None}
    assert world.get_json("/apps/app1/sessions/NOPE/access")[0] == 404


def test_a_log_swapped_in_from_another_app_is_refused(world, monkeypatch):
    """Copy app2's log under app1 with metadata claiming app1: the encryption context gives it away."""
    monkeypatch.setenv("INLINE_MAX_BYTES", "1048576")
    s3 = client("s3")
    other = world.filed["app2/OTHER"]
    head = s3.head_object(Bucket=world.bucket, Key=other.log_key)
    meta = {**head["Metadata"], "app": "app1", "session-id": "SWAP"}
    s3.copy_object(Bucket=world.bucket, Key=keys.log_key("app1", "SWAP"), MetadataDirective="REPLACE",
                   Metadata=meta, CopySource={"Bucket": world.bucket, "Key": other.log_key})
    assert world.get_json("/apps/app1/sessions/SWAP/log") == (502, {
        "error": "integrity", "message": "log was encrypted for app 'app2', not 'app1'"})
    attempts = access_records(world, "app1", "SWAP")  # recorded before release, so the attempt is on file
    assert [(r["how"], r["who"]["subject"]) for r in attempts] == [("inline", "auditor-1")]


def test_a_later_version_of_the_log_does_not_change_what_is_served(world, monkeypatch):
    """Someone writes a new version over a filed log: the API serves the version the manifest names."""
    monkeypatch.setenv("INLINE_MAX_BYTES", "1048576")
    filed = world.filed["app1/OLDEST"]
    s3 = client("s3")
    s3.put_object(Bucket=world.bucket, Key=filed.log_key, Body=b"forged bytes")
    status, _, body = world.get("/apps/app1/sessions/OLDEST/log")
    assert status == 200
    header, events, trailer = _lines(world.plaintext["app1/OLDEST"])
    assert json.loads(body) == {"header": header, "events": events, "trailer": trailer}
    monkeypatch.setenv("INLINE_MAX_BYTES", "1")
    _, link = world.get_json("/apps/app1/sessions/OLDEST/log")
    with urllib.request.urlopen(link["download_url"], timeout=30) as resp:
        assert resp.read() == world.stored("app1", "OLDEST")


def test_details_show_legal_hold_and_read_only_the_first_frame_of_big_logs(world, monkeypatch):
    from oneoff_audit.api import logs

    filed = world.filed["app1/OLDER"]
    client("s3").put_object_legal_hold(Bucket=world.bucket, Key=filed.log_key, VersionId=filed.log_version_id,
                                       LegalHold={"Status": "ON"})
    try:
        monkeypatch.setattr(logs, "DETAIL_FULL_DECRYPT_MAX", 0)  # as if the log were too big to read whole
        status, details = world.get_json("/apps/app1/sessions/OLDER")
    finally:
        client("s3").put_object_legal_hold(Bucket=world.bucket, Key=filed.log_key, VersionId=filed.log_version_id,
                                           LegalHold={"Status": "OFF"})
    assert status == 200
    header, _, trailer = _lines(world.plaintext["app1/OLDER"])
    assert details["header"] == header and details["trailer"] is None
    assert details["retention"]["legal_hold"] is True
    integrity = details["integrity"]
    assert (integrity["verified"], integrity["complete"], integrity["gaps"], integrity["chain_sha256"]) == (
        "header frame only", True, {"missing": [], "corrupt": []}, trailer["chain_sha256"])


def test_a_log_filed_without_a_manifest_is_served_from_its_metadata(world, monkeypatch):
    monkeypatch.setenv("AUDIT_SIGNING_KEY_ID", "")  # evidence signing off: the assembler writes no manifest
    file_session(world, "app3", "NOMAN", ["no manifest\r\n"], "2026-11-20T08:00:00Z")
    assert client("s3").list_objects_v2(Bucket=world.bucket, Prefix="manifests/app3/").get("KeyCount") == 0
    monkeypatch.setenv("INLINE_MAX_BYTES", "1048576")
    header, events, trailer = _lines(world.plaintext["app3/NOMAN"])
    assert world.get_json("/apps/app3/sessions/NOMAN/log") == (200, {"header": header, "events": events,
                                                                    "trailer": trailer})
    monkeypatch.setenv("INLINE_MAX_BYTES", "1")
    _, link = world.get_json("/apps/app3/sessions/NOMAN/log")
    stored = world.stored("app3", "NOMAN")
    assert (link["size"], link["sha256"]) == (len(stored), hashlib.sha256(stored).hexdigest())
    _, details = world.get_json("/apps/app3/sessions/NOMAN")
    assert details["integrity"]["manifest"] is False
    assert details["integrity"]["problems"] == ["manifest missing: the log has no signed evidence"]
    assert details["trailer"] == trailer
