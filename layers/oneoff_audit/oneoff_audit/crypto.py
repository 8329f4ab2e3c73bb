"""Encryption of audit logs with the AWS Encryption SDK under a KMS key.

Suite ``AES_256_GCM_HKDF_SHA512_COMMIT_KEY`` (key commitment, no per-message signature: the
KMS-signed manifest gives non-repudiation), 1 MiB frames, and the encryption context
``{purpose: "oneoff-audit-log", app, session_id}``, which is checked on every decrypt.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from functools import cache
from typing import IO, Any

import aws_encryption_sdk
from aws_encryption_sdk.exceptions import AWSEncryptionSDKClientError, DecryptKeyError
from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy
from botocore.exceptions import BotoCoreError, ClientError
from cryptography.exceptions import InvalidTag

from oneoff_audit.aws import botocore_session, error_code
from oneoff_audit.errors import DecryptionError, IntegrityError, RetryLaterError
from oneoff_audit.files import replace_when_done

PURPOSE = "oneoff-audit-log"
ALGORITHM = Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
FRAME_LENGTH = 1 << 20
READ_SIZE = 1 << 20
# What a broken message raises: the SDK's own errors, and a frame's failed GCM tag, which the SDK's
# streaming decryptor lets through unwrapped (a flipped byte in a frame's content).
DECRYPT_ERRORS = (AWSEncryptionSDKClientError, InvalidTag, ClientError, BotoCoreError)


# KMS answers that mean "the key service is unavailable now", not "this message is bad".
KMS_UNAVAILABLE = frozenset({
    "KMSInternalException", "ThrottlingException", "DependencyTimeoutException", "ServiceUnavailableException",
    "InternalFailure", "InternalError", "LimitExceededException", "RequestLimitExceeded", "connection",
})
_kms_calls = threading.local()


class KeyServiceUnavailableError(RetryLaterError):
    """KMS could not be reached or failed transiently: retry later (not a sign of tampering)."""


def _note_kms_response(http_response: Any = None, parsed: Any = None, **_: Any) -> None:
    failed = http_response is not None and getattr(http_response, "status_code", 200) >= 300
    _kms_calls.last_error = (parsed or {}).get("Error", {}).get("Code", "unknown") if failed else None


def _note_kms_exception(exception: Any = None, **_: Any) -> None:
    if exception is not None:
        _kms_calls.last_error = "connection"


def last_kms_error() -> str | None:
    """The error code of this thread's last KMS call (None if it succeeded)."""
    return getattr(_kms_calls, "last_error", None)


def decryption_error(err: BaseException) -> DecryptionError | KeyServiceUnavailableError:
    """A one-line error for what the SDK, the AEAD or KMS raised.

    The SDK reports a KMS outage as "Unable to decrypt any data key", the same words as for a data key
    no key can open; the outcome of this thread's KMS call (recorded by a botocore hook) tells the two
    apart, so an outage is a retry, never reported as a bad ciphertext.
    """
    if isinstance(err, InvalidTag):
        return DecryptionError("cannot decrypt: a frame failed authentication (tampered or corrupted ciphertext)")
    kms_error = last_kms_error()
    if isinstance(err, DecryptKeyError) and kms_error in KMS_UNAVAILABLE:
        return KeyServiceUnavailableError(f"key service unavailable ({kms_error}); retry later")
    if isinstance(err, ClientError) and error_code(err) in KMS_UNAVAILABLE:
        return KeyServiceUnavailableError(f"key service unavailable ({error_code(err)}); retry later")
    return DecryptionError(f"cannot decrypt: {err or type(err).__name__}")


def encryption_context(app: str, session_id: str) -> dict[str, str]:
    """The encryption context bound to one session's log."""
    return {"purpose": PURPOSE, "app": app, "session_id": session_id}


@cache
def sdk_client() -> aws_encryption_sdk.EncryptionSDKClient:
    """The SDK client, requiring key commitment on encrypt and decrypt."""
    return aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)


def _observed_session() -> Any:
    """The botocore session the SDK's KMS clients come from, with the outcome of each KMS call recorded
    (registering again is a no-op: the handlers have unique ids)."""
    session = botocore_session()
    session.register("after-call.kms", _note_kms_response, unique_id="oneoff-audit-kms-outcome")
    session.register("after-call-error.kms", _note_kms_exception, unique_id="oneoff-audit-kms-exception")
    return session


def key_provider(key_id: str | None) -> Any:
    """A strict KMS master key provider for ``key_id``; discovery mode when no key is given.

    Providers are reused (building one builds KMS clients) for as long as the botocore session they
    use, which :func:`~oneoff_audit.aws.botocore_session` ties to the client environment.
    """
    return _key_provider(key_id, _observed_session())


@cache
def _key_provider(key_id: str | None, session: Any) -> Any:
    if key_id:
        return aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[key_id], botocore_session=session)
    return aws_encryption_sdk.DiscoveryAwsKmsMasterKeyProvider(botocore_session=session)


@contextlib.contextmanager
def encrypting_reader(source: IO[bytes], key_id: str, app: str, session_id: str) -> Iterator[Any]:
    """A file-like object yielding the ciphertext of ``source`` as it is read (streaming)."""
    with sdk_client().stream(
        mode="e",
        source=source,
        key_provider=key_provider(key_id),
        encryption_context=encryption_context(app, session_id),
        algorithm=ALGORITHM,
        frame_length=FRAME_LENGTH,
    ) as encryptor:
        yield encryptor


def check_context(context: dict[str, str], app: str | None, session_id: str | None) -> None:
    """Raise IntegrityError unless the message's encryption context names this app and session."""
    if context.get("purpose") != PURPOSE:
        raise IntegrityError(f"encryption context purpose is {context.get('purpose')!r}, not {PURPOSE!r}")
    if app is not None and context.get("app") != app:
        raise IntegrityError(f"log was encrypted for app {context.get('app')!r}, not {app!r}")
    if session_id is not None and context.get("session_id") != session_id:
        raise IntegrityError(f"log was encrypted for session {context.get('session_id')!r}, not {session_id!r}")


def decrypt_bytes(ciphertext: bytes, key_id: str | None, app: str | None, session_id: str | None) -> bytes:
    """Decrypt a whole (small) message and check its encryption context."""
    try:
        plaintext, header = sdk_client().decrypt(source=ciphertext, key_provider=key_provider(key_id))
    except DECRYPT_ERRORS as err:
        raise decryption_error(err) from err
    check_context(dict(header.encryption_context), app, session_id)
    return plaintext


def decrypt_to_file(source: IO[bytes], dest: str, key_id: str | None, app: str | None = None,
                    session_id: str | None = None) -> dict[str, str]:
    """Stream-decrypt ``source`` into ``dest``; ``dest`` appears only if the message ended intact.

    The SDK releases frames before it has authenticated the whole message, so plaintext goes to a
    temporary file beside ``dest`` that is renamed into place only after the last frame verified
    and the encryption context matched. Returns the encryption context.
    """
    with replace_when_done(dest) as out:
        try:
            with sdk_client().stream(mode="d", source=source, key_provider=key_provider(key_id)) as decryptor:
                context = dict(decryptor.header.encryption_context)
                check_context(context, app, session_id)
                for block in decryptor:
                    out.write(block)
        except DECRYPT_ERRORS as err:
            raise decryption_error(err) from err
    return context
