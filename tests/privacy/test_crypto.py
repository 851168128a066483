"""The at-rest encryption format: round trips, rotation, tampering, key handling."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import ValidationError

from tagrelay import crypto
from tagrelay.config.models import EncryptionConfig
from tagrelay.crypto import CryptoError, Keyring


def _key() -> bytes:
    return os.urandom(32)


def test_round_trip_and_the_blob_layout() -> None:
    key = _key()
    ring = Keyring([key])
    blob = ring.encrypt(b'{"email":"a@example.com"}', aad=b"spool:1")
    assert crypto.is_encrypted(blob)
    assert blob[:2] == b"\x00\x01"
    assert crypto.blob_key_id(blob) == crypto.key_id(key) == ring.primary_id
    assert len(blob) == len(b'{"email":"a@example.com"}') + crypto.OVERHEAD_BYTES
    assert b"example.com" not in blob
    assert ring.decrypt(blob, aad=b"spool:1") == b'{"email":"a@example.com"}'


def test_the_blob_is_plain_aes_256_gcm_under_an_hkdf_subkey() -> None:
    """Anyone holding the key can read a blob with nothing but the documented layout."""
    key = _key()
    blob = Keyring([key]).encrypt(b"payload", aad=b"row")
    salt, nonce = blob[6:22], blob[22:34]
    subkey = crypto._derive(key, salt)
    assert AESGCM(subkey).decrypt(nonce, blob[34:], blob[:34] + b"row") == b"payload"


def test_nonces_never_repeat_and_two_keyrings_use_different_salts() -> None:
    key = _key()
    ring = Keyring([key])
    headers = {ring.encrypt(b"x")[:34] for _ in range(1000)}
    assert len(headers) == 1000
    other = Keyring([key]).encrypt(b"x")
    assert other[6:22] != ring.encrypt(b"x")[6:22]


def test_the_same_plaintext_encrypts_differently() -> None:
    ring = Keyring([_key()])
    assert ring.encrypt(b"same") != ring.encrypt(b"same")


@pytest.mark.parametrize("mutate", ["flip_ciphertext", "flip_header", "truncate", "other_aad"])
def test_tampering_is_refused(mutate: str) -> None:
    ring = Keyring([_key()])
    blob = bytearray(ring.encrypt(b"secret data", aad=b"a"))
    aad = b"a"
    if mutate == "flip_ciphertext":
        blob[-20] ^= 1
    elif mutate == "flip_header":
        blob[25] ^= 1
    elif mutate == "truncate":
        del blob[-1]
    else:
        aad = b"b"
    with pytest.raises(CryptoError) as info:
        ring.decrypt(bytes(blob), aad=aad)
    assert "secret" not in str(info.value)


def test_rotation_new_key_first_old_blobs_still_read() -> None:
    old, new = _key(), _key()
    old_blob = Keyring([old]).encrypt(b"before")
    ring = Keyring([new, old])
    assert ring.decrypt(old_blob) == b"before"
    assert ring.needs_rotation(old_blob)
    new_blob = ring.encrypt(b"after")
    assert not ring.needs_rotation(new_blob)
    assert ring.needs_rotation(b'{"plain": true}')
    assert ring.knows(old_blob) and ring.knows(new_blob)


def test_a_wrong_key_is_an_error_naming_the_key_id_not_the_data() -> None:
    blob = Keyring([_key()]).encrypt(b"personal")
    other = Keyring([_key()])
    assert not other.knows(blob)
    with pytest.raises(CryptoError, match=r"not in encryption\.keys"):
        other.decrypt(blob)


def test_plaintext_is_told_apart_from_blobs() -> None:
    assert not crypto.is_encrypted(b'{"type":"track"}')
    assert not crypto.is_encrypted(b"")
    with pytest.raises(CryptoError):
        Keyring([_key()]).decrypt(b'{"type":"track"}')


def test_subkeys_are_replaced_before_the_counter_runs_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crypto, "_MESSAGES_PER_SUBKEY", 3)
    ring = Keyring([_key()])
    blobs = [ring.encrypt(str(i).encode()) for i in range(7)]
    salts = [b[6:22] for b in blobs]
    assert salts[0] == salts[1] == salts[2] != salts[3]
    assert salts[3] == salts[4] == salts[5] != salts[6]
    assert [ring.decrypt(b) for b in blobs] == [str(i).encode() for i in range(7)]


@pytest.mark.parametrize(
    "text",
    ["not base64!!", base64.b64encode(b"short").decode(), base64.b64encode(b"x" * 33).decode()],
)
def test_bad_keys_are_refused(text: str) -> None:
    with pytest.raises(CryptoError):
        crypto.decode_key(text)
    with pytest.raises(ValidationError, match="encryption key"):
        EncryptionConfig(keys=[text])  # type: ignore[list-item]


def test_config_keys_url_safe_base64_duplicates_and_empty() -> None:
    raw = b"\xfb" * 32
    url_safe = base64.urlsafe_b64encode(raw).decode()
    assert "-" in url_safe or "_" in url_safe
    ring = EncryptionConfig(keys=[url_safe]).keyring()  # type: ignore[list-item]
    assert ring is not None and ring.primary_id == crypto.key_id(raw)
    with pytest.raises(ValidationError, match="twice"):
        EncryptionConfig(keys=[url_safe, base64.b64encode(raw).decode()])  # type: ignore[list-item]
    # An unset environment variable (``${TAGRELAY_KEY:-}``) means no encryption.
    assert EncryptionConfig(keys=[""]).keyring() is None  # type: ignore[list-item]
    assert EncryptionConfig().keyring() is None


def test_generated_keys_are_valid_and_distinct() -> None:
    a, b = crypto.generate_key(), crypto.generate_key()
    assert a != b
    assert len(crypto.decode_key(a)) == 32
