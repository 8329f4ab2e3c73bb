"""Offline evidence bundles: the README's own openssl and sha256sum commands pass, and fail on one flipped byte."""

from __future__ import annotations

import re
import shutil
import subprocess
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import test_evidence_support as support

from oneoff_audit.cli import main
from oneoff_audit.config import DigestConfig
from oneoff_audit.evidence import signing
from oneoff_audit.evidence.digest import write_digests

pytestmark = pytest.mark.integration

s3_clock = support.s3_clock
_kms_digest_messages = support.kms_digest_messages

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
FOLDER = "oneoff-audit-evidence-app1-S1"
DIGEST_09 = "digest-2026-11-25T09.json"
DIGEST_10 = "digest-2026-11-25T10.json"


def _commands(readme: str) -> list[str]:
    block = re.search(r"## Check\n\n```sh\n(.*?)\n```", readme, re.S)
    assert block is not None
    return block.group(1).splitlines()


def _run(folder: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=folder, capture_output=True, text=True, timeout=30)


def _bundle(stack, tmp_path: Path, sid: str = "S1") -> Path:
    out = tmp_path / "evidence.zip"
    assert main(["bundle", "app1", sid, "-o", str(out), "--bucket", stack.bucket,
                 "--key-id", stack.signing_key_id]) == 0
    with zipfile.ZipFile(out) as zf:
        zf.extractall(tmp_path / "x")
    return tmp_path / "x" / f"oneoff-audit-evidence-app1-{sid}"


@pytest.fixture
def bundle_dir(stack, s3_clock, tmp_path):
    s3_clock.set(T0 + timedelta(minutes=10))
    support.file_session(stack, "app1", "S1", T0 + timedelta(minutes=10), plaintext=b"whoami\nroot\n" * 500)
    s3_clock.set(T0 + timedelta(hours=2, minutes=5))
    write_digests(DigestConfig(bucket=stack.bucket, signing_key_id=stack.signing_key_id),
                  now=T0 + timedelta(hours=2, minutes=5))
    return _bundle(stack, tmp_path)


def test_bundle_verifies_with_its_own_readme_commands(stack, bundle_dir):
    names = sorted(p.name for p in bundle_dir.iterdir())
    assert names == sorted(["log.jsonl.enc", "manifest.json", "manifest.json.sig", DIGEST_09, DIGEST_09 + ".sig",
                            DIGEST_10, DIGEST_10 + ".sig", "public-key.pem", "SHA256SUMS", "README.md"])
    readme = (bundle_dir / "README.md").read_text()
    commands = _commands(readme)
    assert commands[:2] == ["sha256sum -c SHA256SUMS",
                            "openssl dgst -sha256 -verify public-key.pem -signature manifest.json.sig manifest.json"]
    outputs = []
    for command in commands:
        result = _run(bundle_dir, command)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        outputs.append(result.stdout)
    assert outputs[0].splitlines() == [f"{name}: OK" for name in (
        "log.jsonl.enc", "manifest.json", "manifest.json.sig", DIGEST_09, DIGEST_09 + ".sig", DIGEST_10,
        DIGEST_10 + ".sig", "public-key.pem", "README.md")]
    assert outputs[1:] == [
        "Verified OK\n",
        "log.jsonl.enc: hash recorded in manifest.json\n",
        "Verified OK\n",
        f"manifest.json: hash recorded in {DIGEST_09}\n",
        f"manifest.json.sig: hash recorded in {DIGEST_09}\n",
        "Verified OK\n",
        f"{DIGEST_09}: hash recorded in {DIGEST_10}\n",
    ]
    fingerprint = _run(bundle_dir, "openssl pkey -pubin -in public-key.pem -outform DER | sha256sum").stdout[:64]
    assert f"must print `{fingerprint}`" in readme
    assert (bundle_dir / "public-key.pem").read_bytes() == signing.public_key_pem(stack.signing_key_id)


# Which of the README's commands (by index) fail when one byte of a file is flipped.
FLIPS = {
    "log.jsonl.enc": [0, 2],
    "manifest.json": [0, 1, 4],
    "manifest.json.sig": [0, 1, 5],
    DIGEST_09: [0, 3, 4, 7],  # the middle byte is in the hex SHA-256 of manifest.json
    DIGEST_09 + ".sig": [0, 3],
    DIGEST_10: [0, 6],
}


def test_one_flipped_byte_fails_the_readme_commands(bundle_dir, tmp_path):
    commands = _commands((bundle_dir / "README.md").read_text())
    failed: dict[str, list[int]] = {}
    for name in FLIPS:
        copy = tmp_path / f"flip-{name}"
        shutil.copytree(bundle_dir, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / name).write_bytes(bytes(data))
        failed[name] = [i for i, command in enumerate(commands) if _run(copy, command).returncode != 0]
        assert f"{name}: FAILED" in _run(copy, commands[0]).stdout
    assert failed == FLIPS


def test_openssl_verifies_documents_signed_as_kms_digests(stack, tmp_path):
    """Documents over 4096 bytes are signed with MessageType=DIGEST; the same openssl command verifies them."""
    data = signing.canonical_bytes({"items": [f"entry {i:05d}" for i in range(600)]})
    assert len(data) > signing.KMS_RAW_MAX
    signature, _ = signing.sign(data, stack.signing_key_id)
    (tmp_path / "doc.json").write_bytes(data)
    (tmp_path / "doc.json.sig").write_bytes(signature)
    (tmp_path / "pub.pem").write_bytes(signing.public_key_pem(stack.signing_key_id))
    command = "openssl dgst -sha256 -verify pub.pem -signature doc.json.sig doc.json"
    assert _run(tmp_path, command).stdout == "Verified OK\n"
    (tmp_path / "doc.json").write_bytes(data[:-2] + b"]}"[::-1])
    assert _run(tmp_path, command).returncode == 1


def test_bundle_of_a_session_no_digest_covers_yet(stack, s3_clock, tmp_path, capsys):
    s3_clock.set(T0)
    support.file_session(stack, "app1", "S2", T0)
    folder = _bundle(stack, tmp_path, "S2")
    assert "no digest covers manifests/app1/S2.json yet" in capsys.readouterr().err
    readme = (folder / "README.md").read_text()
    assert "**No digest covers this manifest yet**" in readme
    assert [_run(folder, c).returncode for c in _commands(readme)] == [0, 0, 0]


def test_bundle_of_unknown_session_is_an_error(stack, tmp_path, capsys):
    code = main(["bundle", "app1", "NOPE", "-o", str(tmp_path / "b.zip"), "--bucket", stack.bucket,
                 "--key-id", stack.signing_key_id])
    assert code == 2
    assert capsys.readouterr().err == "oneoff-audit bundle: no manifest for app1/NOPE (manifests/app1/NOPE.json)\n"
    assert list(tmp_path.iterdir()) == []
