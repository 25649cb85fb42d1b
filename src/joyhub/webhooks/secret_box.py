"""Webhook signing secrets: made, encrypted at rest, and decrypted only to sign.

A secret is `whsec_` followed by the base64 of 32 random bytes (the Standard Webhooks format, so
any Standard Webhooks library takes it as is). It is shown once, at creation or rotation. The
hub must be able to sign with it later, so unlike API keys it cannot be stored as a hash: it is
stored encrypted with AES-256-GCM under a key derived (HKDF-SHA256) from the server secret
(`Settings.secret_key()`, JWT_SECRET_KEY). The endpoint's id is bound in as associated data, so
a ciphertext copied onto another endpoint's row does not decrypt there.

Changing JWT_SECRET_KEY makes the stored secrets undecryptable: deliveries to such endpoints
fail with a message saying to rotate the secret (which makes a new one under the new key).
"""

from __future__ import annotations

import base64
import secrets
import uuid
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_PREFIX = "whsec_"  # noqa: S105 (the format's prefix, not a secret)
SECRET_BYTES = 32
_NONCE_BYTES = 12
_FORMAT_V1 = b"\x01"
_HKDF_INFO = b"joyhub webhook signing secrets v1"


class SecretUnreadable(Exception):
    """A stored secret does not decrypt under the current server secret."""


def new_secret() -> tuple[str, bytes]:
    """A fresh secret: the `whsec_…` string shown to the user once, and its raw key bytes."""
    raw = secrets.token_bytes(SECRET_BYTES)
    return SECRET_PREFIX + base64.b64encode(raw).decode(), raw


class SecretBox:
    """Encrypts and decrypts signing keys under the key derived from the server secret."""

    def __init__(self, server_secret: str) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
            server_secret.encode()
        )
        self._aead = AESGCM(key)

    def seal(self, endpoint_id: uuid.UUID, raw: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return _FORMAT_V1 + nonce + self._aead.encrypt(nonce, raw, endpoint_id.bytes)

    def open(self, endpoint_id: uuid.UUID, sealed: bytes) -> bytes:
        if not sealed.startswith(_FORMAT_V1):
            raise SecretUnreadable("unknown secret format")
        nonce, body = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, body, endpoint_id.bytes)
        except InvalidTag:
            raise SecretUnreadable("the secret does not decrypt under the server secret") from None


@lru_cache(maxsize=4)
def secret_box(server_secret: str) -> SecretBox:
    """The box for a server secret (the key derivation runs once per secret per process)."""
    return SecretBox(server_secret)
