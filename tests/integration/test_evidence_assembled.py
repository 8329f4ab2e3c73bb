"""Evidence for sessions filed by the real assembler: manifest written once, chain verified, CLI as a process."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import helpers_staging as staging
import pytest
import test_evidence_support as support

from oneoff_audit import keys
from oneoff_audit.assemble import assemble_session
from oneoff_audit.aws import client
from oneoff_audit.cli import main
from oneoff_audit.config import AssemblerConfig, DigestConfig
from oneoff_audit.errors import IntegrityError
from oneoff_audit.evidence import signing
from oneoff_audit.evidence.digest import write_digests

pytestmark = pytest.mark.integration

s3_clock = support.s3_clock
_kms_digest_messages = support.kms_digest_messages

APP = "shop"
T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
CLI = [sys.executable, "-m", "oneoff_audit.cli"]


def _assemble(stack, sid: str, texts: list[str]):
    chunks = staging.build_chunks(APP, sid, [staging.output_events([t]) for t in texts])
    staging.stage(stack.bucket, chunks)
    return assemble_session(AssemblerConfig.from_env(), APP, sid)


def test_assembled_sessions_carry_signed_manifests_and_verify_end_to_end(stack, s3_clock, tmp_path, capsys):
    s3_clock.set(T0 + timedelta(minutes=20))
    filed = _assemble(stack, "A1", ["hello\r\n", "wörld\r\n"])
    s3_clock.set(T0 + timedelta(hours=1, minutes=40))
    _assemble(stack, "A2", ["bye\r\n"])

    mkey = keys.manifest_key(APP, "A1")
    data = client("s3").get_object(Bucket=stack.bucket, Key=mkey)["Body"].read()
    assert json.loads(data) == {"format": "oneoff-audit.manifest", "version": 1, **filed.to_dict(),
                                "signing_key_id": stack.signing_key_id, "signing_algorithm": "ECDSA_SHA_256"}
    signature = client("s3").get_object(Bucket=stack.bucket, Key=mkey + ".sig")["Body"].read()
    assert signing.verify(data, signature, signing.public_key(stack.signing_key_id))

    assert assemble_session(AssemblerConfig.from_env(), APP, "A1") == filed  # a redelivered message: no new evidence
    versions = client("s3").list_object_versions(Bucket=stack.bucket, Prefix=mkey)["Versions"]
    assert len(versions) == 2  # the manifest and its signature, each written once

    s3_clock.set(T0 + timedelta(hours=2, minutes=5))
    result = write_digests(DigestConfig(bucket=stack.bucket, signing_key_id=stack.signing_key_id),
                           now=T0 + timedelta(hours=2, minutes=5))
    assert result["apps"] == [{"app": APP, "written": [f"digests/{APP}/2026/11/25/09.json",
                                                       f"digests/{APP}/2026/11/25/10.json"],
                               "skipped": [], "behind": False}]

    now = (T0 + timedelta(hours=2, minutes=30)).isoformat()
    argv = ["verify-chain", "--app", APP, "--now", now]
    assert main([*argv, "--deep"]) == 0
    out, err = capsys.readouterr()
    assert (out, err[:59]) == ("", "OK shop: 2 hours, 2 digests, 2 manifests, 2 logs checked fr")

    pem = tmp_path / "trusted.pem"
    pem.write_bytes(signing.public_key_pem(stack.signing_key_id))
    client("s3").delete_object(Bucket=stack.bucket, Key=keys.manifest_key(APP, "A2"))
    offline = {**stack.env(), "AUDIT_SIGNING_KEY_ID": ""}  # trust only the PEM: no KMS call to verify
    broken = subprocess.run([*CLI, *argv, "--public-key", str(pem)], env=offline, capture_output=True, text=True,
                            timeout=60)
    assert broken.returncode == 1
    lines = broken.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"manifest-missing manifests/{APP}/A2.json: deleted at ")
    assert lines[0].endswith(f"; listed in digests/{APP}/2026/11/25/10.json")
    assert broken.stderr.startswith("FAILED 1 findings; shop: 2 hours")


def test_digest_handler_runs_on_the_scheduled_event(stack, s3_clock, lambda_context, monkeypatch):
    import importlib.util

    s3_clock.set(T0)
    support.file_session(stack, APP, "H1", T0)
    path = Path(__file__).resolve().parents[2] / "functions" / "digest" / "digest_handler.py"
    spec = importlib.util.spec_from_file_location("digest_handler", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    event = json.loads((path.parents[2] / "events" / "digest_scheduled.json").read_text())
    result = module.lambda_handler(event, lambda_context)
    written = result["apps"][0]["written"]
    assert written[0] == f"digests/{APP}/2026/11/25/09.json" and result["written"] == len(written)
    assert json.loads(client("s3").get_object(Bucket=stack.bucket, Key=written[0])["Body"].read())["manifests"][0][
        "session_id"] == "H1"

    # An app whose latest digest is unsigned and not the function's own: the invocation fails (Errors alarm)
    # after the other apps' digests are written.
    support.file_session(stack, "other", "O1", T0)
    client("s3").put_object(Bucket=stack.bucket, Key="digests/other/2026/11/25/08.json", Body=b"{}")
    s3_clock.set(datetime.now(UTC))
    with pytest.raises(IntegrityError, match=r"digest chain stopped for other \(see the log\)"):
        module.lambda_handler(event, lambda_context)
