"""Make the embedded moto server honour KMS ``Sign``/``Verify`` with ``MessageType=DIGEST``.

moto (5.x) ignores ``MessageType`` and hashes the 32-byte digest again, so a document larger
than 4096 bytes would get a signature that ``openssl dgst -sha256 -verify`` rejects, unlike real
KMS. :func:`honour_kms_digest_messages` patches the moto server running in this process (tests,
``oneoff-audit local``) to sign the given digest as a pre-hashed value, exactly as AWS documents.
"""

from __future__ import annotations

import base64
import json
from typing import Any

_PATCHED = False


def honour_kms_digest_messages() -> bool:
    """Patch moto's KMS responses (idempotent); returns False if moto is not installed."""
    global _PATCHED
    if _PATCHED:
        return True
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, utils
        from moto.kms.responses import KmsResponse
    except ImportError:
        return False

    hash_for = {"ECDSA_SHA_256": hashes.SHA256(), "ECDSA_SHA_384": hashes.SHA384(), "ECDSA_SHA_512": hashes.SHA512()}
    original_sign = KmsResponse.sign
    original_verify = KmsResponse.verify

    def _digest_call(self: Any) -> tuple[Any, Any, bytes, str] | None:
        algorithm = self._get_param("SigningAlgorithm")
        if self._get_param("MessageType") != "DIGEST" or algorithm not in hash_for:
            return None
        key = self.kms_backend.describe_key(self._get_param("KeyId"))
        private = getattr(getattr(key, "private_key", None), "private_key", None)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            return None
        message = self._get_param("Message")
        if isinstance(message, str):
            message = message.encode("utf-8")
        return key, private, message, algorithm

    def sign(self: Any) -> str:
        call = _digest_call(self)
        if call is None:
            return original_sign(self)
        key, private, digest, algorithm = call
        signature = private.sign(digest, ec.ECDSA(utils.Prehashed(hash_for[algorithm])))
        return json.dumps({"KeyId": key.arn, "Signature": base64.b64encode(signature).decode("ascii"),
                           "SigningAlgorithm": algorithm})

    def verify(self: Any) -> str:
        call = _digest_call(self)
        if call is None:
            return original_verify(self)
        key, private, digest, algorithm = call
        signature = self._get_param("Signature")
        if isinstance(signature, str):
            signature = base64.b64decode(signature.encode("utf-8"))
        try:
            private.public_key().verify(signature, digest, ec.ECDSA(utils.Prehashed(hash_for[algorithm])))
            valid = True
        except InvalidSignature:
            valid = False
        return json.dumps({"KeyId": key.arn, "SignatureValid": valid, "SigningAlgorithm": algorithm})

    KmsResponse.sign = sign
    KmsResponse.verify = verify
    _PATCHED = True
    return True
