"""KMS signatures over exact document bytes, checkable offline with ``openssl dgst -sha256 -verify``.

KMS ``Sign`` accepts a RAW message of at most 4096 bytes. Larger documents are signed as
``MessageType=DIGEST`` of their SHA-256: with ``ECDSA_SHA_256`` both forms produce the same DER
signature over SHA-256(document), so one offline command verifies either. Verification here is
local (public key from ``GetPublicKey``, cached), never a KMS ``Verify`` call.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from oneoff_audit.aws import client
from oneoff_audit.errors import IntegrityError

SIGNING_ALGORITHM = "ECDSA_SHA_256"
KMS_RAW_MAX = 4096
SIG_SUFFIX = ".sig"
META_KEY_ID = "signing-key-id"
META_ALGORITHM = "signing-algorithm"


def canonical_bytes(doc: dict[str, Any]) -> bytes:
    """The exact bytes that are stored and signed: sorted keys, compact separators, UTF-8, no newline."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def sign(data: bytes, key_id: str) -> tuple[bytes, str]:
    """Sign ``data`` with the KMS key; returns (DER signature, key ARN that KMS reports).

    The signature is checked against the key's public half before it is returned, so a
    signature that ``openssl dgst -verify`` would reject is never stored.
    """
    if len(data) <= KMS_RAW_MAX:
        resp = client("kms").sign(KeyId=key_id, Message=data, MessageType="RAW", SigningAlgorithm=SIGNING_ALGORITHM)
    else:
        resp = client("kms").sign(KeyId=key_id, Message=hashlib.sha256(data).digest(), MessageType="DIGEST",
                                  SigningAlgorithm=SIGNING_ALGORITHM)
    signature = resp["Signature"]
    if not verify(data, signature, public_key(key_id)):
        raise IntegrityError(f"KMS key {key_id} returned a signature that does not verify over the document "
                             f"({len(data)} bytes, MessageType {'RAW' if len(data) <= KMS_RAW_MAX else 'DIGEST'})")
    return signature, resp["KeyId"]


@cache
def _public_key_der(key_id: str) -> tuple[bytes, str]:
    resp = client("kms").get_public_key(KeyId=key_id)
    return resp["PublicKey"], resp["KeyId"]


def public_key(key_id: str) -> ec.EllipticCurvePublicKey:
    """The public half of the signing key (fetched once per process)."""
    key = serialization.load_der_public_key(_public_key_der(key_id)[0])
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TypeError(f"signing key {key_id} is not an elliptic-curve key")
    return key


def public_key_arn(key_id: str) -> str:
    """The ARN KMS reports for ``key_id`` (an alias or id resolves to the key's ARN)."""
    return _public_key_der(key_id)[1]


def public_key_pem(key_id: str) -> bytes:
    """The public key as PEM (SubjectPublicKeyInfo), what ``openssl dgst -verify`` reads."""
    return public_key(key_id).public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def verify(data: bytes, signature: bytes, key: ec.EllipticCurvePublicKey) -> bool:
    """True if ``signature`` is a valid ECDSA-SHA256 DER signature of ``data`` under ``key``."""
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256."""
    return hashlib.sha256(data).hexdigest()


def reset_cache() -> None:
    """Forget cached public keys (tests use a fresh key per stack)."""
    _public_key_der.cache_clear()
