"""Offline evidence bundle: one zip an auditor checks with ``openssl`` and ``sha256sum`` alone.

Contents (under ``oneoff-audit-evidence-<app>-<session>/``): the encrypted log exactly as filed,
its manifest and signature, the signed digest of the hour the manifest was filed (and the next
digest, which chains it), the signing public key in PEM, ``SHA256SUMS`` and a README whose
commands check every link: signatures, the log's hash in the manifest, the manifest's hashes in the
digest and the digest's hash in the next one. Decrypting the log still needs KMS.
"""

from __future__ import annotations

import hashlib
import zipfile
from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization

from oneoff_audit import __version__, formats, keys
from oneoff_audit.aws import client, is_not_found
from oneoff_audit.errors import IntegrityError, NotFoundError
from oneoff_audit.evidence import signing, store
from oneoff_audit.evidence.digest import HOUR, MAX_DIGEST_BYTES, hour_floor
from oneoff_audit.evidence.manifest import MAX_MANIFEST_BYTES, parse_manifest, signature_key
from oneoff_audit.files import replace_when_done
from oneoff_audit.ids import validate_app, validate_session_id

LOG_NAME = "log.jsonl.enc"
MANIFEST_NAME = "manifest.json"
PUBLIC_KEY_NAME = "public-key.pem"
SUMS_NAME = "SHA256SUMS"
README_NAME = "README.md"
BLOCK = 1 << 20


def digest_name(hour: datetime) -> str:
    """File name of an hour's digest inside the bundle."""
    return f"digest-{hour:%Y-%m-%dT%H}.json"


def _stream_log(zf: zipfile.ZipFile, name: str, bucket: str, key: str, version_id: str | None) -> tuple[str, int]:
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if version_id:
        kwargs["VersionId"] = version_id
    try:
        body = client("s3").get_object(**kwargs)["Body"]
    except ClientError as err:
        if is_not_found(err):
            raise IntegrityError(f"{key} version {version_id} named by the manifest is not stored") from err
        raise
    digest = hashlib.sha256()
    size = 0
    try:
        with zf.open(name, "w", force_zip64=True) as out:
            for block in iter(lambda: body.read(BLOCK), b""):
                digest.update(block)
                size += len(block)
                out.write(block)
    finally:
        body.close()
    return digest.hexdigest(), size


def _lists(digest: bytes, manifest_key: str, sha: str) -> bool:
    doc = formats.parse_json(digest, "digest", MAX_DIGEST_BYTES)
    return any(e.get("key") == manifest_key and e.get("sha256") == sha for e in doc.get("manifests", []))


def _previous_sha(digest: bytes) -> str | None:
    previous = formats.parse_json(digest, "digest", MAX_DIGEST_BYTES).get("previous")
    return previous.get("sha256") if isinstance(previous, dict) else None


def _readme(app: str, sid: str, manifest: dict[str, Any], key_arn: str, fingerprint: str,
            covering: str | None, following: str | None, files: list[str]) -> str:
    check = [
        f"sha256sum -c {SUMS_NAME}",
        f"openssl dgst -sha256 -verify {PUBLIC_KEY_NAME} -signature {MANIFEST_NAME}.sig {MANIFEST_NAME}",
        f"grep -qF \"\\\"ciphertext_sha256\\\":\\\"$(sha256sum {LOG_NAME} | cut -c1-64)\\\"\" {MANIFEST_NAME}"
        f" && echo \"{LOG_NAME}: hash recorded in {MANIFEST_NAME}\"",
    ]
    if covering:
        check += [
            f"openssl dgst -sha256 -verify {PUBLIC_KEY_NAME} -signature {covering}.sig {covering}",
            f"grep -qF \"\\\"sha256\\\":\\\"$(sha256sum {MANIFEST_NAME} | cut -c1-64)\\\"\" {covering}"
            f" && echo \"{MANIFEST_NAME}: hash recorded in {covering}\"",
            f"grep -qF \"\\\"signature_sha256\\\":\\\"$(sha256sum {MANIFEST_NAME}.sig | cut -c1-64)\\\"\" {covering}"
            f" && echo \"{MANIFEST_NAME}.sig: hash recorded in {covering}\"",
        ]
    if covering and following:
        check += [
            f"openssl dgst -sha256 -verify {PUBLIC_KEY_NAME} -signature {following}.sig {following}",
            f"grep -qF \"\\\"sha256\\\":\\\"$(sha256sum {covering} | cut -c1-64)\\\"\" {following}"
            f" && echo \"{covering}: hash recorded in {following}\"",
        ]
    coverage = (
        f"`{covering}` is the signed digest of the hour the manifest was filed; it lists the manifest's and its "
        "signature's SHA-256." + (f" `{following}` is the next hour's digest; it records `{covering}`'s SHA-256, "
                                  "chaining it." if following else "")
        if covering else
        "**No digest covers this manifest yet** (it was filed in the current hour, or the digest is missing). "
        "Bundle the session again after the next hourly digest, and run `oneoff-audit verify-chain`."
    )
    lines = [
        f"# Evidence bundle: app `{app}`, session `{sid}`",
        "",
        f"Made by oneoff-audit {__version__} at {formats.format_time(formats.utc_now())}. Every check below runs "
        "offline with `openssl` and `sha256sum` (plus `grep` and `cut`); no access to the platform or to AWS KMS "
        "is needed. Run the commands in this folder.",
        "",
        "## Files",
        "",
        *[f"- `{name}`" for name in files],
        "",
        f"`{LOG_NAME}` is the encrypted audit log exactly as filed ({manifest['log_key']}, version "
        f"{manifest['log_version_id']}). `{MANIFEST_NAME}` is the platform's signed record of it (SHA-256 of "
        f"ciphertext and plaintext, sizes, counts, times, status). {coverage}",
        "",
        "## Check",
        "",
        "```sh",
        *check,
        "```",
        "",
        "Expected: `sha256sum` prints `OK` for every file, each `openssl` prints `Verified OK`, and each `grep` "
        "line prints its message. Any other output, or a non-zero exit status, means the bundle was altered.",
        "",
        "`sha256sum -c` alone only proves the files are the ones packed; the proof of origin is the signatures "
        "(openssl) and the hashes that the signed documents record (grep).",
        "",
        "## Trust the key",
        "",
        f"The signatures are ECDSA P-256 over SHA-256 by the KMS key `{key_arn}`. Check that `{PUBLIC_KEY_NAME}` "
        "is that key's public half, obtained independently of this bundle:",
        "",
        "```sh",
        f"openssl pkey -pubin -in {PUBLIC_KEY_NAME} -outform DER | sha256sum",
        "```",
        "",
        f"must print `{fingerprint}`, the same as `aws kms get-public-key --key-id {key_arn} --query PublicKey "
        "--output text | base64 -d | sha256sum` run by someone you trust.",
        "",
        "## Decrypt (needs KMS)",
        "",
        "```sh",
        f"oneoff-audit decrypt {LOG_NAME} --app {app} --session {sid} -o log.jsonl",
        f"oneoff-audit verify log.jsonl --manifest {MANIFEST_NAME}",
        "```",
        "",
        "or the AWS Encryption CLI with `--decrypt-unsigned --buffer` and the encryption context "
        f"`purpose=oneoff-audit-log app={app} session_id={sid}`. The plaintext's SHA-256 must be "
        f"`{manifest['plaintext_sha256']}`, as recorded in {MANIFEST_NAME}.",
        "",
    ]
    return "\n".join(lines)


def build_bundle(bucket: str, app: str, session_id: str, signing_key_id: str, out_path: str) -> dict[str, Any]:
    """Write the offline evidence bundle of one filed session to ``out_path`` (a zip).

    Raises NotFoundError if the session has no manifest, and IntegrityError if what would be
    bundled does not verify (bad signature, log not the filed one): a bundle never carries
    evidence that fails its own checks. Returns ``{path, files, covered, manifest_key}``.
    """
    app, session_id = validate_app(app), validate_session_id(session_id)
    mkey = keys.manifest_key(app, session_id)
    manifest_obj = store.get(bucket, mkey, max_bytes=MAX_MANIFEST_BYTES)
    if manifest_obj is None:
        raise NotFoundError(f"no manifest for {app}/{session_id} ({mkey})")
    sig_obj = store.get(bucket, signature_key(mkey), max_bytes=1024)
    if sig_obj is None:
        raise IntegrityError(f"{signature_key(mkey)} is missing")
    public = signing.public_key(signing_key_id)
    if not signing.verify(manifest_obj.body, sig_obj.body, public):
        raise IntegrityError(f"{mkey}: signature does not verify; run oneoff-audit verify-chain")
    manifest = parse_manifest(manifest_obj.body, mkey)
    manifest_sha = signing.sha256_hex(manifest_obj.body)

    digests: list[tuple[str, bytes, bytes]] = []
    hour = hour_floor(manifest_obj.last_modified)
    covering = store.get(bucket, keys.digest_key(app, hour), max_bytes=MAX_DIGEST_BYTES)
    covering_sig = store.get(bucket, signature_key(keys.digest_key(app, hour)), max_bytes=1024)
    if covering is not None and covering_sig is not None and _lists(covering.body, mkey, manifest_sha):
        if not signing.verify(covering.body, covering_sig.body, public):
            raise IntegrityError(f"{covering.key}: signature does not verify; run oneoff-audit verify-chain")
        digests.append((digest_name(hour), covering.body, covering_sig.body))
        following = store.get(bucket, keys.digest_key(app, hour + HOUR), max_bytes=MAX_DIGEST_BYTES)
        following_sig = store.get(bucket, signature_key(keys.digest_key(app, hour + HOUR)), max_bytes=1024)
        if (following is not None and following_sig is not None
                and _previous_sha(following.body) == signing.sha256_hex(covering.body)
                and signing.verify(following.body, following_sig.body, public)):
            digests.append((digest_name(hour + HOUR), following.body, following_sig.body))

    pem = signing.public_key_pem(signing_key_id)
    fingerprint = hashlib.sha256(public.public_bytes(serialization.Encoding.DER,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()
    folder = f"oneoff-audit-evidence-{app}-{session_id}/"
    sums: dict[str, str] = {}
    with replace_when_done(out_path, ".zip") as out, zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        sha, size = _stream_log(zf, folder + LOG_NAME, bucket, manifest["log_key"], manifest["log_version_id"])
        if (sha, size) != (manifest["ciphertext_sha256"], manifest["ciphertext_size"]):
            raise IntegrityError(f"{manifest['log_key']}: stored log (sha256 {sha}, {size} bytes) is not the one "
                                 f"the manifest records ({manifest['ciphertext_sha256']}, "
                                 f"{manifest['ciphertext_size']} bytes)")
        sums[LOG_NAME] = sha
        members: list[tuple[str, bytes]] = [(MANIFEST_NAME, manifest_obj.body),
                                            (MANIFEST_NAME + ".sig", sig_obj.body)]
        for name, body, sig in digests:
            members += [(name, body), (name + ".sig", sig)]
        members.append((PUBLIC_KEY_NAME, pem))
        files = [LOG_NAME, *(name for name, _ in members)]
        key_arn = sig_obj.metadata.get(signing.META_KEY_ID) or manifest["signing_key_id"]
        readme = _readme(app, session_id, manifest, key_arn, fingerprint,
                         digests[0][0] if digests else None, digests[1][0] if len(digests) > 1 else None,
                         [*files, SUMS_NAME, README_NAME])
        members.append((README_NAME, readme.encode("utf-8")))
        for name, body in members:
            zf.writestr(folder + name, body)
            sums[name] = signing.sha256_hex(body)
        zf.writestr(folder + SUMS_NAME, "".join(f"{sha}  {name}\n" for name, sha in sums.items()))
    return {"path": out_path, "files": [*files, SUMS_NAME, README_NAME], "covered": bool(digests),
            "manifest_key": mkey, "folder": folder}
