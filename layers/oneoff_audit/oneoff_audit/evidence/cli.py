"""``oneoff-audit verify-chain`` and ``oneoff-audit bundle``: evidence checks from a terminal."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from oneoff_audit.config import ConfigError
from oneoff_audit.evidence.verify import DEFAULT_GRACE, parse_when


def _bucket(args: argparse.Namespace) -> str:
    bucket = args.bucket or os.environ.get("AUDIT_BUCKET")
    if not bucket:
        raise ConfigError("no bucket: pass --bucket or set AUDIT_BUCKET")
    return bucket


def _trusted_key(args: argparse.Namespace) -> str | ec.EllipticCurvePublicKey:
    if getattr(args, "public_key", None):
        with open(args.public_key, "rb") as fh:
            key = serialization.load_pem_public_key(fh.read())
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ConfigError(f"{args.public_key} is not an elliptic-curve public key")
        return key
    key_id = args.key_id or os.environ.get("AUDIT_SIGNING_KEY_ID")
    if not key_id:
        raise ConfigError("no signing key: pass --key-id, --public-key or set AUDIT_SIGNING_KEY_ID")
    return key_id


def run_verify_chain(args: argparse.Namespace) -> int:
    """Print one line per finding; exit 1 if there is any, 0 if the chain verifies clean."""
    from oneoff_audit.evidence.verify import verify_chain

    report = verify_chain(
        _bucket(args), args.app, _trusted_key(args),
        start=parse_when(args.start, "--from"), end=parse_when(args.end, "--to"), now=parse_when(args.now, "--now"),
        grace=timedelta(minutes=args.grace_minutes), deep=args.deep,
    )
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        for finding in report["findings"]:
            print(f"{finding['kind']} {finding['key']}: {finding['detail']}")
    checked = report["checked"]
    summary = (f"{report['app']}: {checked['hours']} hours, {checked['digests']} digests, {checked['manifests']} "
               f"manifests, {checked['logs']} logs checked from {report['from']} to {report['to']}")
    pending = report["pending"]
    if pending["hours"] or pending["manifests"]:
        summary += f" ({len(pending['hours'])} hours and {len(pending['manifests'])} manifests not yet digested)"
    if report["ok"]:
        print(f"OK {summary}", file=sys.stderr)
        return 0
    print(f"FAILED {len(report['findings'])} findings; {summary}", file=sys.stderr)
    return 1


def run_bundle(args: argparse.Namespace) -> int:
    """Write the offline evidence bundle of one session."""
    from oneoff_audit.evidence.bundle import build_bundle

    key_id = args.key_id or os.environ.get("AUDIT_SIGNING_KEY_ID")
    if not key_id:
        raise ConfigError("no signing key: pass --key-id or set AUDIT_SIGNING_KEY_ID")
    result = build_bundle(_bucket(args), args.app, args.session, key_id, args.output)
    print(f"wrote {args.output}: {', '.join(result['files'])}", file=sys.stderr)
    if not result["covered"]:
        print(f"warning: no digest covers {result['manifest_key']} yet; bundle again after the next digest",
              file=sys.stderr)
    return 0


def register(subparsers: Any) -> None:
    """Add ``verify-chain`` and ``bundle`` to the ``oneoff-audit`` command line."""
    verify = subparsers.add_parser(
        "verify-chain", help="verify an app's digest chain, manifests and logs; one line per finding",
        description="Walk the signed hourly digests and the manifests they list; name every missing or replaced "
                    "log, missing or edited manifest, missing or edited digest, broken link and hour without a "
                    "digest. Exit 0 if clean, 1 with findings, 2 on errors.")
    verify.add_argument("--app", required=True)
    verify.add_argument("--from", dest="start", metavar="T", help="first hour to check (ISO 8601, UTC if no offset)")
    verify.add_argument("--to", dest="end", metavar="T", help="check hours before T (default: now)")
    verify.add_argument("--now", metavar="T", help="verify as of T (default: the current time)")
    verify.add_argument("--bucket", help="audit bucket (default: $AUDIT_BUCKET)")
    verify.add_argument("--key-id", help="trusted KMS signing key (default: $AUDIT_SIGNING_KEY_ID)")
    verify.add_argument("--public-key", metavar="PEM", help="trusted public key file instead of asking KMS")
    verify.add_argument("--grace-minutes", type=int, default=int(DEFAULT_GRACE.total_seconds() // 60),
                        help="minutes after an hour ends before its digest must exist (default: %(default)s)")
    verify.add_argument("--deep", action="store_true", help="also hash every log's bytes (default: version + size)")
    verify.add_argument("--json", action="store_true", help="print the full report as JSON")
    verify.set_defaults(func=run_verify_chain)

    bundle = subparsers.add_parser(
        "bundle", help="write an offline evidence bundle (zip) for one session",
        description="The encrypted log, its signed manifest, the signed digests covering it, the public key and a "
                    "README with the openssl and sha256sum commands that check it offline.")
    bundle.add_argument("app")
    bundle.add_argument("session")
    bundle.add_argument("-o", "--output", required=True, metavar="FILE.zip")
    bundle.add_argument("--bucket", help="audit bucket (default: $AUDIT_BUCKET)")
    bundle.add_argument("--key-id", help="KMS signing key for the public key (default: $AUDIT_SIGNING_KEY_ID)")
    bundle.set_defaults(func=run_bundle)
