"""Evidence logic without AWS: canonical bytes, signatures, schemas, key layout, time bounds, config, CLI."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from hypothesis import given
from hypothesis import strategies as st

from oneoff_audit import formats, keys
from oneoff_audit.cli import build_parser, main
from oneoff_audit.config import ConfigError, DigestConfig
from oneoff_audit.errors import FormatError, IntegrityError
from oneoff_audit.evidence import signing
from oneoff_audit.evidence.bundle import _readme, digest_name
from oneoff_audit.evidence.digest import (
    DigestRef,
    build_digest,
    hour_floor,
    parse_digest_key,
    session_of_manifest,
)
from oneoff_audit.evidence.manifest import build_manifest, signature_key
from oneoff_audit.evidence.verify import KINDS, Finding, parse_when
from oneoff_audit.models import FiledLog

pytestmark = pytest.mark.unit

KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"
H9 = datetime(2026, 11, 25, 9, tzinfo=UTC)


def filed(**overrides) -> FiledLog:
    values = dict(
        app="app1", session_id="S1", log_key="logs/app1/S1.jsonl.enc", log_version_id="v1",
        ciphertext_sha256="c" * 64, ciphertext_size=1234, plaintext_sha256="d" * 64, plaintext_size=999,
        chain_sha256="e" * 64, event_count=7, bytes={"i": 1, "o": 2, "e": 3},
        started_at="2026-11-25T09:01:00.000000Z", ended_at="2026-11-25T09:02:00.000000Z",
        filed_at="2026-11-25T09:02:05.000000Z", status="succeeded", complete=True,
    )
    values.update(overrides)
    return FiledLog(**values)


# ---------------------------------------------------------------- canonical bytes and signatures

def test_canonical_bytes_are_sorted_compact_utf8():
    assert signing.canonical_bytes({"b": [1, {"z": None, "a": "é€"}], "a": True}) == (
        '{"a":true,"b":[1,{"a":"é€","z":null}]}'.encode())
    with pytest.raises(ValueError):
        signing.canonical_bytes({"x": float("nan")})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_canonical_bytes_are_a_fixed_point(doc):
    data = signing.canonical_bytes(doc)
    assert signing.canonical_bytes(json.loads(data)) == data


def test_a_digest_signature_verifies_as_a_signature_over_the_document():
    """KMS MessageType=DIGEST of SHA-256(doc) and RAW doc give interchangeable ECDSA_SHA_256 signatures."""
    private = ec.generate_private_key(ec.SECP256R1())
    doc = b"x" * 5000
    over_digest = private.sign(hashlib.sha256(doc).digest(), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    over_raw = private.sign(doc, ec.ECDSA(hashes.SHA256()))
    for signature in (over_digest, over_raw):
        assert signing.verify(doc, signature, private.public_key())
        assert not signing.verify(doc + b"y", signature, private.public_key())
    assert not signing.verify(doc, b"\x30\x02garbage", private.public_key())
    assert not signing.verify(doc, over_raw, ec.generate_private_key(ec.SECP256R1()).public_key())


# ---------------------------------------------------------------- documents

def test_manifest_is_the_filed_log_plus_format_and_key():
    doc = build_manifest(filed(), KEY_ARN)
    assert doc == {"format": "oneoff-audit.manifest", "version": 1, **filed().to_dict(),
                   "signing_key_id": KEY_ARN, "signing_algorithm": "ECDSA_SHA_256"}
    assert signature_key(keys.manifest_key("app1", "S1")) == "manifests/app1/S1.json.sig"


@pytest.mark.parametrize(("override", "field"), [
    ({"ciphertext_sha256": "C" * 64}, "ciphertext_sha256"),
    ({"status": "exploded"}, "status"),
    ({"filed_at": "yesterday"}, "filed_at"),
    ({"log_key": "elsewhere/x"}, "log_key"),
])
def test_manifest_schema_names_the_bad_field(override, field):
    with pytest.raises(FormatError) as err:
        build_manifest(filed(**override), KEY_ARN)
    assert err.value.field == field


def test_digest_document_exact():
    entry = {"key": "manifests/app1/S1.json", "session_id": "S1", "version_id": "mv1", "sha256": "a" * 64,
             "size": 700, "signature_sha256": "b" * 64, "last_modified": "2026-11-25T10:02:05.000000Z"}
    previous = DigestRef("digests/app1/2026/11/25/09.json", H9, "1" * 64, "2" * 64)
    doc = build_digest("app1", H9 + timedelta(hours=1), [entry], previous, H9 + timedelta(hours=2, minutes=5),
                       KEY_ARN)
    assert doc == {
        "format": "oneoff-audit.digest", "version": 1, "app": "app1", "key": "digests/app1/2026/11/25/10.json",
        "hour_start": "2026-11-25T10:00:00.000000Z", "hour_end": "2026-11-25T11:00:00.000000Z",
        "created_at": "2026-11-25T11:05:00.000000Z", "manifests": [entry],
        "previous": {"key": "digests/app1/2026/11/25/09.json", "hour_start": "2026-11-25T09:00:00.000000Z",
                     "sha256": "1" * 64, "signature_sha256": "2" * 64},
        "signing_key_id": KEY_ARN, "signing_algorithm": "ECDSA_SHA_256",
    }
    first = build_digest("app1", H9, [], None, H9 + timedelta(hours=1), KEY_ARN)
    assert first["previous"] is None and first["manifests"] == []
    with pytest.raises(FormatError):
        build_digest("app1", H9, [{**entry, "sha256": "nope"}], None, H9, KEY_ARN)


# ---------------------------------------------------------------- key layout and time

@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2999, 12, 31),
                    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)),
                                               timezone(timedelta(hours=-8))])))
def test_digest_keys_round_trip_to_their_utc_hour(when):
    assert parse_digest_key("app1", keys.digest_key("app1", when)) == hour_floor(when)
    assert hour_floor(when).tzinfo == UTC and hour_floor(when) <= when < hour_floor(when) + timedelta(hours=1)


@pytest.mark.parametrize("key", [
    "digests/app1/2026/11/25/09.json.sig", "digests/app2/2026/11/25/09.json", "digests/app1/2026/13/25/09.json",
    "digests/app1/2026/11/25/9.json", "digests/app1/2026/11/25/24.json", "digests/app1/x/2026/11/25/09.json",
])
def test_other_keys_are_not_digests(key):
    assert parse_digest_key("app1", key) is None


@pytest.mark.parametrize(("key", "session"), [
    ("manifests/app1/S1.json", "S1"), ("manifests/app1/S1.json.sig", None), ("manifests/app1/x/S1.json", None),
    ("manifests/app2/S1.json", None), ("logs/app1/S1.json", None),
])
def test_session_of_manifest(key, session):
    assert session_of_manifest("app1", key) == session


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-25T10:00:00Z", datetime(2026, 11, 25, 10, tzinfo=UTC)),
    ("2026-11-25T12:30:00+02:00", datetime(2026, 11, 25, 10, 30, tzinfo=UTC)),
    ("2026-11-25T10:00", datetime(2026, 11, 25, 10, tzinfo=UTC)),
    ("2026-11-25", datetime(2026, 11, 25, tzinfo=UTC)),
    (None, None),
])
def test_parse_when(text, expected):
    assert parse_when(text, "--from") == expected


def test_parse_when_rejects_nonsense():
    with pytest.raises(FormatError, match=r"--to: not an ISO 8601 time: 'soon'"):
        parse_when("soon", "--to")


def test_finding_line_and_dict():
    finding = Finding("log-missing", "logs/a/S.jsonl.enc", "deleted", session_id="S")
    assert finding.line() == "log-missing logs/a/S.jsonl.enc: deleted"
    assert finding.to_dict() == {"kind": "log-missing", "key": "logs/a/S.jsonl.enc", "detail": "deleted",
                                 "session_id": "S"}
    assert len(set(KINDS)) == len(KINDS) == 10


# ---------------------------------------------------------------- config and CLI

def test_digest_config_from_env():
    cfg = DigestConfig.from_env({"AUDIT_BUCKET": "b", "AUDIT_SIGNING_KEY_ID": KEY_ARN})
    assert cfg == DigestConfig(bucket="b", signing_key_id=KEY_ARN, settle_seconds=120, max_hours_per_run=720)
    assert DigestConfig.from_env({"AUDIT_BUCKET": "b", "AUDIT_SIGNING_KEY_ID": "k", "DIGEST_SETTLE_SECONDS": "0",
                                  "DIGEST_MAX_HOURS": "24"}).max_hours_per_run == 24
    assert DigestConfig.ENV == ("AUDIT_BUCKET", "AUDIT_SIGNING_KEY_ID", "DIGEST_SETTLE_SECONDS", "DIGEST_MAX_HOURS",
                                "LOG_LOCK_MODE", "LOG_RETENTION_DAYS")
    with pytest.raises(ConfigError, match="AUDIT_SIGNING_KEY_ID is required"):
        DigestConfig.from_env({"AUDIT_BUCKET": "b"})
    with pytest.raises(ConfigError, match="DIGEST_SETTLE_SECONDS must be between 0 and 3000"):
        DigestConfig.from_env({"AUDIT_BUCKET": "b", "AUDIT_SIGNING_KEY_ID": "k", "DIGEST_SETTLE_SECONDS": "4000"})


def test_cli_registers_verify_chain_and_bundle():
    parser = build_parser()
    args = parser.parse_args(["verify-chain", "--app", "a", "--from", "2026-11-25T00:00Z", "--deep", "--json"])
    assert (args.app, args.start, args.end, args.deep, args.json, args.grace_minutes) == (
        "a", "2026-11-25T00:00Z", None, True, True, 75)
    args = parser.parse_args(["bundle", "a", "S1", "-o", "x.zip"])
    assert (args.app, args.session, args.output) == ("a", "S1", "x.zip")


def test_cli_without_bucket_or_key_fails_before_any_call(monkeypatch, capsys):
    monkeypatch.delenv("AUDIT_BUCKET", raising=False)
    monkeypatch.delenv("AUDIT_SIGNING_KEY_ID", raising=False)
    assert main(["verify-chain", "--app", "a"]) == 2
    assert capsys.readouterr().err == "oneoff-audit verify-chain: no bucket: pass --bucket or set AUDIT_BUCKET\n"
    assert main(["verify-chain", "--app", "a", "--bucket", "b"]) == 2
    assert "no signing key: pass --key-id, --public-key or set AUDIT_SIGNING_KEY_ID" in capsys.readouterr().err


def test_readme_commands_name_the_bundled_files():
    readme = _readme("app1", "S1", build_manifest(filed(), KEY_ARN), KEY_ARN, "f" * 64, digest_name(H9),
                     digest_name(H9 + timedelta(hours=1)), ["log.jsonl.enc"])
    block = readme.split("## Check\n\n```sh\n", 1)[1].split("\n```", 1)[0].splitlines()
    assert block[:2] == ["sha256sum -c SHA256SUMS",
                         "openssl dgst -sha256 -verify public-key.pem -signature manifest.json.sig manifest.json"]
    assert ("openssl dgst -sha256 -verify public-key.pem -signature digest-2026-11-25T09.json.sig "
            "digest-2026-11-25T09.json") in block
    assert len(block) == 8
    uncovered = _readme("app1", "S1", build_manifest(filed(), KEY_ARN), KEY_ARN, "f" * 64, None, None, [])
    assert "**No digest covers this manifest yet**" in uncovered
    assert len(uncovered.split("```sh\n", 1)[1].split("\n```", 1)[0].splitlines()) == 3
    assert formats.validate(build_manifest(filed(), KEY_ARN), "manifest", "m")


def test_every_finding_kind_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "EVIDENCE.md").read_text()
    assert [kind for kind in KINDS if f"| `{kind}` |" not in doc] == []


def test_a_kms_signature_that_does_not_verify_is_never_returned(monkeypatch):
    """E.g. a KMS emulator that hashes a DIGEST message again: refuse instead of storing an unverifiable .sig."""
    private = ec.generate_private_key(ec.SECP256R1())
    calls = []

    class FakeKms:
        def sign(self, KeyId, Message, MessageType, SigningAlgorithm):
            calls.append((MessageType, len(Message)))
            return {"Signature": private.sign(Message, ec.ECDSA(hashes.SHA256())), "KeyId": KEY_ARN}

    monkeypatch.setattr(signing, "client", lambda service: FakeKms())
    monkeypatch.setattr(signing, "public_key", lambda key_id: private.public_key())
    small = b"a" * signing.KMS_RAW_MAX
    signature, arn = signing.sign(small, "k")  # RAW: the fake signs what it is given, like KMS
    assert arn == KEY_ARN and signing.verify(small, signature, private.public_key())
    with pytest.raises(IntegrityError, match=r"returned a signature that does not verify over the document "
                                        r"\(4097 bytes, MessageType DIGEST\)"):
        signing.sign(b"a" * (signing.KMS_RAW_MAX + 1), "k")
    assert calls[-1] == ("DIGEST", 32) and calls[0] == ("RAW", 4096)


def test_same_as_ours_ignores_only_created_at():
    from oneoff_audit.evidence.digest import _same_as_ours

    ours = build_digest("app1", H9, [], None, H9 + timedelta(hours=1), KEY_ARN)
    assert _same_as_ours(signing.canonical_bytes({**ours, "created_at": "2026-11-25T10:07:00.000000Z"}), ours)
    assert not _same_as_ours(signing.canonical_bytes({**ours, "manifests": [{"key": "x"}]}), ours)
    assert not _same_as_ours(json.dumps(ours).encode(), ours)  # same content, not canonical bytes
    assert not _same_as_ours(b"[1, 2]", ours)
    assert not _same_as_ours(b"\xff", ours)
