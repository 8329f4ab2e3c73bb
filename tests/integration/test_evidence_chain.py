"""The hourly digest chain and verify-chain: each kind of tampering is named precisely."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import test_evidence_support as support

from oneoff_audit import keys
from oneoff_audit.aws import client
from oneoff_audit.cli import main
from oneoff_audit.config import DigestConfig
from oneoff_audit.evidence import signing
from oneoff_audit.evidence.digest import write_digests
from oneoff_audit.evidence.verify import verify_chain

pytestmark = pytest.mark.integration

s3_clock = support.s3_clock  # fixtures shared by the evidence tests
_kms_digest_messages = support.kms_digest_messages
file_session, put_log = support.file_session, support.put_log

APP = "app1"
T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def at(hours: float, minutes: float = 0) -> datetime:
    return T0 + timedelta(hours=hours, minutes=minutes)


def dkey(hour: int) -> str:
    return f"digests/{APP}/2026/11/25/{hour:02d}.json"


def _config(stack) -> DigestConfig:
    return DigestConfig(bucket=stack.bucket, signing_key_id=stack.signing_key_id)


def _body(stack, key: str) -> bytes:
    return client("s3").get_object(Bucket=stack.bucket, Key=key)["Body"].read()


@pytest.fixture
def chain(stack, s3_clock):
    """S1 filed 09:10, S2 09:40, nothing in hour 10, S3 11:05; digests written at 12:05 for 09, 10, 11."""
    filed = {}
    for sid, when in (("S1", at(0, 10)), ("S2", at(0, 40)), ("S3", at(2, 5))):
        s3_clock.set(when)
        filed[sid] = file_session(stack, APP, sid, when)
    s3_clock.set(at(3, 5))
    result = write_digests(_config(stack), now=at(3, 5))
    assert result["apps"] == [{"app": APP, "written": [dkey(9), dkey(10), dkey(11)], "skipped": [], "behind": False}]
    return filed


def _verify(stack, now=None, **kw):
    return verify_chain(stack.bucket, APP, stack.signing_key_id, now=now or at(3, 30), **kw)


def _lines(report) -> list[str]:
    return [f"{f['kind']} {f['key']}: {f['detail']}" for f in report["findings"]]


def _cli(stack, capsys, *extra: str, now: datetime | None = None) -> tuple[int, list[str], str]:
    argv = ["verify-chain", "--app", APP, "--bucket", stack.bucket, "--key-id", stack.signing_key_id,
            "--now", (now or at(3, 30)).isoformat(), *extra]
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_digests_list_each_hour_chained_and_signed(stack, chain):
    docs = {h: _body(stack, dkey(h)) for h in (9, 10, 11)}
    key = signing.public_key(stack.signing_key_id)
    for h, data in docs.items():
        assert signing.verify(data, _body(stack, dkey(h) + ".sig"), key)
        assert data == signing.canonical_bytes(json.loads(data))
    d9, d10, d11 = (json.loads(docs[h]) for h in (9, 10, 11))
    m1 = _body(stack, "manifests/app1/S1.json")
    assert d9["previous"] is None
    assert [e["key"] for e in d9["manifests"]] == ["manifests/app1/S1.json", "manifests/app1/S2.json"]
    assert d9["manifests"][0] == {
        "key": "manifests/app1/S1.json", "session_id": "S1",
        "version_id": client("s3").head_object(Bucket=stack.bucket, Key="manifests/app1/S1.json")["VersionId"],
        "sha256": signing.sha256_hex(m1), "size": len(m1),
        "signature_sha256": signing.sha256_hex(_body(stack, "manifests/app1/S1.json.sig")),
        "last_modified": "2026-11-25T09:10:00.000000Z",
    }
    assert (d9["hour_start"], d9["hour_end"], d9["created_at"]) == (
        "2026-11-25T09:00:00.000000Z", "2026-11-25T10:00:00.000000Z", "2026-11-25T12:05:00.000000Z")
    assert d10["manifests"] == []  # written also for an empty hour
    assert d10["previous"] == {"key": dkey(9), "hour_start": "2026-11-25T09:00:00.000000Z",
                               "sha256": signing.sha256_hex(docs[9]),
                               "signature_sha256": signing.sha256_hex(_body(stack, dkey(9) + ".sig"))}
    assert d11["previous"]["key"] == dkey(10) and [e["session_id"] for e in d11["manifests"]] == ["S3"]


def test_second_run_is_idempotent_and_late_filing_goes_into_its_filing_hour(stack, chain, s3_clock):
    assert write_digests(_config(stack), now=at(3, 50))["written"] == 0
    s3_clock.set(at(3, 20))  # a session that started at 09:55 but was filed (late) at 12:20
    file_session(stack, APP, "LATE", at(0, 55))
    s3_clock.set(at(4, 5))
    assert write_digests(_config(stack), now=at(4, 5))["apps"][0]["written"] == [dkey(12)]
    assert [e["session_id"] for e in json.loads(_body(stack, dkey(12)))["manifests"]] == ["LATE"]
    assert _verify(stack, now=at(4, 30))["ok"] is True


def test_untouched_chain_verifies_clean(stack, chain, capsys):
    report = _verify(stack)
    assert report["findings"] == [] and report["ok"] is True
    assert report["checked"] == {"hours": 3, "digests": 3, "manifests": 3, "logs": 3}
    assert report["pending"] == {"hours": [], "manifests": []}
    code, lines, err = _cli(stack, capsys, "--deep")
    assert (code, lines) == (0, [])
    assert err.startswith("OK app1: 3 hours, 3 digests, 3 manifests, 3 logs checked from 2026-11-25T09:00:00")


def test_deleted_log(stack, chain, capsys, s3_clock):
    version = chain["S2"].log_version_id
    s3_clock.set(at(3, 10))
    client("s3").delete_object(Bucket=stack.bucket, Key="logs/app1/S2.jsonl.enc")
    code, lines, _ = _cli(stack, capsys)
    assert code == 1
    assert lines == [f"log-missing logs/app1/S2.jsonl.enc: deleted at 2026-11-25T12:10:00.000000Z (a delete marker "
                     f"hides version {version}); filed as version {version} (manifest manifests/app1/S2.json)"]


def test_replaced_log_with_another_valid_encrypted_log(stack, chain, capsys):
    original = chain["S1"]
    forged = put_log(stack, APP, "S1", b"a harmless session\n", at(3, 10))  # validly encrypted for app1/S1
    code, lines, _ = _cli(stack, capsys)
    assert code == 1
    assert lines == [f"log-replaced logs/app1/S1.jsonl.enc: current version is {forged.log_version_id}, the "
                     f"manifest records version {original.log_version_id} (still stored)"]


def test_replaced_log_whose_old_version_is_destroyed(stack, chain, capsys):
    original = chain["S1"]
    forged = put_log(stack, APP, "S1", b"x" * 10, at(3, 10))
    client("s3").delete_object(Bucket=stack.bucket, Key="logs/app1/S1.jsonl.enc", VersionId=original.log_version_id)
    code, lines, _ = _cli(stack, capsys)
    assert (code, lines) == (1, [f"log-replaced logs/app1/S1.jsonl.enc: current version is {forged.log_version_id}, "
                                 f"the manifest records version {original.log_version_id} (no longer stored)"])


def test_edited_manifest(stack, chain, capsys, s3_clock):
    key = "manifests/app1/S3.json"
    data = _body(stack, key)
    edited = data.replace(b'"event_count":3', b'"event_count":2')
    assert edited != data
    s3_clock.set(at(3, 10))
    client("s3").put_object(Bucket=stack.bucket, Key=key, Body=edited)
    code, lines, _ = _cli(stack, capsys)
    assert code == 1
    assert lines == [f"manifest-edited {key}: sha256 is {signing.sha256_hex(edited)}, {dkey(11)} recorded "
                     f"{signing.sha256_hex(data)}; signature does not verify over the stored bytes "
                     f"(sha256 {signing.sha256_hex(edited)})"]
    # The next digest lists the rewritten manifest again: the edit stays visible.
    s3_clock.set(at(4, 5))
    write_digests(_config(stack), now=at(4, 5))
    assert _lines(_verify(stack, now=at(4, 30))) == lines


def test_deleted_digest(stack, chain, capsys, s3_clock):
    s3_clock.set(at(3, 10))
    deleted = client("s3").head_object(Bucket=stack.bucket, Key=dkey(10))["VersionId"]
    client("s3").delete_object(Bucket=stack.bucket, Key=dkey(10))
    code, lines, _ = _cli(stack, capsys)
    assert code == 1
    assert lines == [f"digest-missing {dkey(10)}: deleted at 2026-11-25T12:10:00.000000Z (a delete marker hides "
                     f"version {deleted}); named as previous by {dkey(11)}"]


def test_edited_digest_hiding_a_session(stack, chain, capsys):
    original = _body(stack, dkey(9))
    doc = json.loads(original)
    doc["manifests"] = [e for e in doc["manifests"] if e["session_id"] != "S2"]  # hide S2
    edited = signing.canonical_bytes(doc)
    client("s3").put_object(Bucket=stack.bucket, Key=dkey(9), Body=edited)
    code, lines, _ = _cli(stack, capsys)
    assert code == 1
    assert lines == [f"digest-edited {dkey(9)}: signature does not verify over the stored bytes (sha256 "
                     f"{signing.sha256_hex(edited)}); sha256 is {signing.sha256_hex(edited)}, {dkey(10)} recorded "
                     f"{signing.sha256_hex(original)}"]


def test_hours_without_digest_when_the_digest_function_stops(stack, chain, capsys):
    code, lines, err = _cli(stack, capsys, now=at(6, 30))  # 15:30: hours 12 and 13 are overdue, 14 pending
    assert code == 1
    assert lines == [
        f"hour-without-digest {dkey(12)}: no digest for 2026-11-25T12:00:00.000000Z..2026-11-25T13:00:00.000000Z: "
        "not found and no version was ever stored (permanently deleted or never written)",
        f"hour-without-digest {dkey(13)}: no digest for 2026-11-25T13:00:00.000000Z..2026-11-25T14:00:00.000000Z: "
        "not found and no version was ever stored (permanently deleted or never written)",
    ]
    assert "(1 hours and 0 manifests not yet digested)" in err


def test_deleting_the_latest_digest_leaves_a_hole_the_writer_will_not_fill(stack, chain, capsys, s3_clock):
    s3_clock.set(at(3, 10))
    deleted = client("s3").head_object(Bucket=stack.bucket, Key=dkey(11))["VersionId"]
    client("s3").delete_object(Bucket=stack.bucket, Key=dkey(11))
    s3_clock.set(at(4, 5))
    result = write_digests(_config(stack), now=at(4, 5))
    assert result["apps"][0] | {"behind": None} == {"app": APP, "written": [dkey(12)], "skipped": [dkey(11)],
                                                    "behind": None}
    assert json.loads(_body(stack, dkey(12)))["previous"]["key"] == dkey(10)
    code, lines, _ = _cli(stack, capsys, now=at(4, 30))
    assert code == 1
    assert lines == [
        f"hour-without-digest {dkey(11)}: no digest for 2026-11-25T11:00:00.000000Z..2026-11-25T12:00:00.000000Z: "
        f"deleted at 2026-11-25T12:10:00.000000Z (a delete marker hides version {deleted})",
        "manifest-unlisted manifests/app1/S3.json: written at 2026-11-25T11:05:00.000000Z but not listed in "
        f"{dkey(11)}",
    ]


def test_range_and_json_report(stack, chain, capsys):
    report = _verify(stack, start=at(1), end=at(2))
    assert report["checked"] == {"hours": 1, "digests": 1, "manifests": 0, "logs": 0}
    assert (report["from"], report["to"]) == ("2026-11-25T10:00:00.000000Z", "2026-11-25T11:00:00.000000Z")
    code, lines, _ = _cli(stack, capsys, "--json")
    assert code == 0 and json.loads("\n".join(lines))["ok"] is True


def test_forged_manifest_inserted_after_the_fact(stack, chain, capsys, s3_clock):
    s3_clock.set(at(3, 10))
    key = keys.manifest_key(APP, "FORGED")
    client("s3").put_object(Bucket=stack.bucket, Key=key, Body=_body(stack, "manifests/app1/S1.json"))
    client("s3").put_object(Bucket=stack.bucket, Key=key + ".sig", Body=_body(stack, "manifests/app1/S1.json.sig"))
    s3_clock.set(at(4, 5))
    write_digests(_config(stack), now=at(4, 5))
    assert _lines(_verify(stack, now=at(4, 30))) == [
        f"manifest-edited {key}: signed for app1/S1, not this key"]


def test_session_deleted_before_its_digest_and_log_without_manifest(stack, s3_clock, capsys):
    s3_clock.set(at(0, 10))
    gone = file_session(stack, APP, "X1", at(0, 10))
    manifest_version = client("s3").head_object(Bucket=stack.bucket, Key="manifests/app1/X1.json")["VersionId"]
    s3_clock.set(at(0, 20))  # deleted within the hour it was filed: no digest ever lists it
    client("s3").delete_object(Bucket=stack.bucket, Key="logs/app1/X1.jsonl.enc")
    client("s3").delete_object(Bucket=stack.bucket, Key="manifests/app1/X1.json")
    s3_clock.set(at(0, 30))
    put_log(stack, APP, "X2", b"filed without evidence\n", at(0, 30))
    s3_clock.set(at(1, 5))
    write_digests(_config(stack), now=at(1, 5))
    code, lines, _ = _cli(stack, capsys, now=at(2, 30))
    assert code == 1
    assert lines == [
        f"log-missing logs/app1/X1.jsonl.enc: deleted at 2026-11-25T09:20:00.000000Z (a delete marker hides version "
        f"{gone.log_version_id}); its manifest is missing too",
        "log-without-manifest logs/app1/X2.jsonl.enc: written at 2026-11-25T09:30:00.000000Z; "
        "manifests/app1/X2.json does not exist",
        "manifest-missing manifests/app1/X1.json: deleted at 2026-11-25T09:20:00.000000Z (a delete marker hides "
        f"version {manifest_version}) before any digest listed it",
    ]


def test_oversized_signature_is_a_finding_not_a_crash(stack, chain, capsys):
    key = "manifests/app1/S1.json.sig"
    client("s3").put_object(Bucket=stack.bucket, Key=key, Body=b"\x30" * (1 << 20))
    code, lines, _ = _cli(stack, capsys)
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("manifest-edited manifests/app1/S1.json: signature was replaced (its sha256 is ")
    assert lines[0].endswith("; signature does not verify over the stored bytes "
                             f"(sha256 {signing.sha256_hex(_body(stack, 'manifests/app1/S1.json'))})")


def test_writer_never_signs_a_digest_it_did_not_write(stack, chain, capsys):
    forged = json.loads(_body(stack, dkey(11)))
    forged.update(key=dkey(12), hour_start="2026-11-25T12:00:00.000000Z", hour_end="2026-11-25T13:00:00.000000Z",
                  manifests=[], previous=None)  # pre-placed before the writer gets to hour 12
    client("s3").put_object(Bucket=stack.bucket, Key=dkey(12), Body=signing.canonical_bytes(forged))
    result = write_digests(_config(stack), now=at(4, 5))
    assert result["apps"] == [{"app": APP, "written": [], "skipped": [], "behind": True,
                               "error": f"{dkey(12)}: unsigned and not ours"}]
    assert support.store_keys(stack.bucket, dkey(12)) == [dkey(12)]  # no signature was made for it
    code, lines, _ = _cli(stack, capsys, now=at(4, 30))
    assert code == 1
    assert lines[0].startswith(f"chain-broken {dkey(12)}: starts a new chain (previous is null)")
    assert lines[1].startswith(f"digest-edited {dkey(12)}: signature {dkey(12)}.sig is missing (not found and")


def test_writer_completes_a_signature_its_previous_run_did_not_write(stack, chain, capsys):
    sig = client("s3").head_object(Bucket=stack.bucket, Key=dkey(11) + ".sig")["VersionId"]
    client("s3").delete_object(Bucket=stack.bucket, Key=dkey(11) + ".sig", VersionId=sig)  # as if it crashed
    result = write_digests(_config(stack), now=at(4, 5))
    assert result["apps"][0]["written"] == [dkey(12)] and "error" not in result["apps"][0]
    assert _cli(stack, capsys, now=at(4, 30))[:2] == (0, [])


def test_writer_refuses_to_sign_an_unsigned_edited_latest_digest(stack, chain):
    doc = json.loads(_body(stack, dkey(11)))
    doc["manifests"] = []
    client("s3").put_object(Bucket=stack.bucket, Key=dkey(11), Body=signing.canonical_bytes(doc))
    client("s3").delete_object(Bucket=stack.bucket, Key=dkey(11) + ".sig")
    result = write_digests(_config(stack), now=at(4, 5))
    assert result["apps"] == [{"app": APP, "written": [], "skipped": [], "behind": True,
                               "error": f"{dkey(11)}: unsigned and not ours"}]
