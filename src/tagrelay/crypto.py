"""Encryption at rest: AES-256-GCM for the personal data the relay keeps on disk.

The configuration's ``encryption.keys`` is a list of base64-encoded 32-byte keys; the first
encrypts, every one decrypts, so a new key goes first and the old ones stay until nothing
is encrypted under them any more (``Keyring.needs_rotation`` tells which blobs those are).

A blob is self-describing::

    0x00 | version (1) | key id (4) | salt (16) | nonce (12) | ciphertext | tag (16)

The leading NUL byte never starts a JSON document, so a store can hold plaintext rows from
before encryption was switched on next to encrypted ones and tell them apart
(``is_encrypted``). The key id is the first four bytes of a SHA-256 over the key; it names
the key without revealing it.

AES-GCM must never see the same nonce twice under one key, and random 96-bit nonces are
only safe for about 2**32 messages per key, which a busy relay writes in days. So each
``Keyring`` derives a fresh subkey (HKDF-SHA256 over the configured key and a random 16-byte
salt carried in the blob) and counts nonces under it; a subkey is replaced long before its
counter could wrap. Decryption derives each salt's subkey once and caches it.

The ``cryptography`` package (some megabytes of native code) is imported by the first
``Keyring``: a relay without ``encryption.keys`` never loads it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
_MAGIC = 0x00
_VERSION = 0x01
_KEY_ID_BYTES = 4
_SALT_BYTES = 16
_NONCE_BYTES = 12
_TAG_BYTES = 16
HEADER_BYTES = 2 + _KEY_ID_BYTES + _SALT_BYTES + _NONCE_BYTES
OVERHEAD_BYTES = HEADER_BYTES + _TAG_BYTES
# A subkey is retired after this many messages: far below 2**64 (the counter's width),
# and it bounds what one subkey ever protects.
_MESSAGES_PER_SUBKEY = 1 << 32
_HKDF_INFO = b"tagrelay at-rest v1"
_SUBKEY_CACHE = 256


class CryptoError(Exception):
    """A key that is not valid, or a blob that cannot be decrypted (unknown key, tampered
    or truncated data, wrong associated data). The message never contains plaintext."""


def decode_key(text: str) -> bytes:
    """One configured key: standard or URL-safe base64 of exactly 32 bytes."""
    cleaned = text.strip()
    try:
        raw = base64.b64decode(cleaned.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise CryptoError("an encryption key must be base64 (32 random bytes)") from None
    if len(raw) != KEY_BYTES:
        raise CryptoError(f"an encryption key must decode to {KEY_BYTES} bytes, not {len(raw)}")
    return raw


def generate_key() -> str:
    """A new random key, base64-encoded, for ``encryption.keys``."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def key_id(key: bytes) -> bytes:
    """The four bytes that name ``key`` in every blob encrypted under it."""
    return hashlib.sha256(b"tagrelay key id\x00" + key).digest()[:_KEY_ID_BYTES]


def is_encrypted(blob: bytes) -> bool:
    """Whether ``blob`` is in this module's format (else it is a plaintext row)."""
    return len(blob) >= OVERHEAD_BYTES and blob[0] == _MAGIC and blob[1] == _VERSION


def blob_key_id(blob: bytes) -> bytes:
    """The key id an encrypted blob names."""
    return bytes(blob[2 : 2 + _KEY_ID_BYTES])


class Keyring:
    """The configured keys. ``encrypt`` uses the first; ``decrypt`` any of them.

    Safe to share between threads: the nonce counter and the caches are guarded.
    """

    def __init__(self, keys: Sequence[bytes]) -> None:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead_of = AESGCM
        self._invalid_tag = InvalidTag
        if not keys:
            raise CryptoError("a keyring needs at least one key")
        for key in keys:
            if len(key) != KEY_BYTES:
                raise CryptoError(f"an encryption key must be {KEY_BYTES} bytes")
        self._keys: dict[bytes, bytes] = {}
        for key in keys:
            kid = key_id(key)
            if kid in self._keys:
                raise CryptoError("the same encryption key is configured twice")
            self._keys[kid] = key
        self._primary_key = keys[0]
        self._primary_id = key_id(keys[0])
        self._lock = threading.Lock()
        self._subkeys: OrderedDict[tuple[bytes, bytes], AESGCM] = OrderedDict()
        self._new_subkey()

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> Keyring:
        """A keyring from the configuration's base64 strings."""
        return cls([decode_key(text) for text in texts])

    @property
    def primary_id(self) -> bytes:
        """The key id new blobs are encrypted under."""
        return self._primary_id

    @property
    def key_ids(self) -> frozenset[bytes]:
        """Every key id this keyring can decrypt."""
        return frozenset(self._keys)

    def knows(self, blob: bytes) -> bool:
        """Whether ``blob`` is encrypted under one of the configured keys."""
        return is_encrypted(blob) and blob_key_id(blob) in self._keys

    def needs_rotation(self, blob: bytes) -> bool:
        """Whether ``blob`` is plaintext or encrypted under a key other than the first."""
        return not is_encrypted(blob) or blob_key_id(blob) != self._primary_id

    def encrypt(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        """Encrypt under the first key. ``aad`` (associated data, e.g. a row's table and
        id) is authenticated but not stored: decrypting needs the same value."""
        with self._lock:
            count = next(self._counter)
            if count >= _MESSAGES_PER_SUBKEY:
                self._new_subkey()
                count = next(self._counter)
            salt, aead = self._salt, self._aead
        nonce = count.to_bytes(_NONCE_BYTES, "big")
        header = bytes((_MAGIC, _VERSION)) + self._primary_id + salt + nonce
        return header + aead.encrypt(nonce, plaintext, header + aad)

    def decrypt(self, blob: bytes, aad: bytes = b"") -> bytes:
        """The plaintext of ``blob``; ``CryptoError`` if it is not one of ours, names an
        unknown key, or fails authentication (tampered, truncated, other ``aad``)."""
        if not is_encrypted(blob):
            raise CryptoError("not an encrypted blob")
        kid = blob_key_id(blob)
        if kid not in self._keys:
            raise CryptoError(
                f"encrypted under key id {kid.hex()}, which is not in encryption.keys"
            )
        salt = bytes(blob[2 + _KEY_ID_BYTES : 2 + _KEY_ID_BYTES + _SALT_BYTES])
        nonce = bytes(blob[2 + _KEY_ID_BYTES + _SALT_BYTES : HEADER_BYTES])
        aead = self._subkey(kid, salt)
        try:
            return aead.decrypt(nonce, bytes(blob[HEADER_BYTES:]), bytes(blob[:HEADER_BYTES]) + aad)
        except self._invalid_tag:
            raise CryptoError(
                "an encrypted blob failed authentication (tampered, truncated or moved)"
            ) from None

    def _new_subkey(self) -> None:
        self._salt = os.urandom(_SALT_BYTES)
        self._aead = self._aead_of(_derive(self._primary_key, self._salt))
        self._counter = itertools.count()
        self._remember(self._primary_id, self._salt, self._aead)

    def _subkey(self, kid: bytes, salt: bytes) -> AESGCM:
        with self._lock:
            aead = self._subkeys.get((kid, salt))
            if aead is not None:
                self._subkeys.move_to_end((kid, salt))
                return aead
        aead = self._aead_of(_derive(self._keys[kid], salt))
        with self._lock:
            self._remember(kid, salt, aead)
        return aead

    def _remember(self, kid: bytes, salt: bytes, aead: AESGCM) -> None:
        self._subkeys[(kid, salt)] = aead
        self._subkeys.move_to_end((kid, salt))
        while len(self._subkeys) > _SUBKEY_CACHE:
            self._subkeys.popitem(last=False)


def _derive(key: bytes, salt: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=_HKDF_INFO).derive(key)
