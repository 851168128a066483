"""Encryption at rest of what the spool holds: the events of each segment, and each dead
letter's event and detail (``encryption.keys``; the format is ``tagrelay.crypto``'s).

A segment is sealed as a whole (one AES-GCM operation per group commit, not per event),
with its ``last_seq`` as associated data; a dead letter's event and detail with the
forwarder's id, the event's sequence number and the column's name. A blob moved to another
row (or a detail swapped for an event) then fails authentication instead of being read as
that row's data.

Each sealed row also carries its key id in a column of its own (``key_id``; NULL for a
plaintext row), which the commit process reads off the blob's header. Questions about keys
(which keys the spool needs at start-up, which rows rotation still has to re-encrypt, how
many) then read only that column, never the events.

``PayloadCipher(None)`` is the null object for a relay without keys: it stores plaintext,
reads plaintext, and refuses a sealed row (``EncryptionKeyError``), which start-up checks
never to meet (``check_keys``). Plaintext rows from before encryption was switched on stay
readable with keys configured; ``tagrelay keys rotate`` seals them
(``tagrelay.spool.rotation``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

from tagrelay.crypto import Keyring, blob_key_id, is_encrypted
from tagrelay.errors import EncryptionKeyError

__all__ = [
    "PLAINTEXT",
    "PayloadCipher",
    "check_keys",
    "cipher_for",
    "dead_letter_aad",
    "sealed_key_id",
    "segment_aad",
    "stored_key_ids",
]


def segment_aad(last_seq: int) -> bytes:
    """The associated data of the segment whose last event is ``last_seq``."""
    return b"tagrelay segment %d" % last_seq


def dead_letter_aad(forwarder: str, seq: int, column: str) -> bytes:
    """The associated data of a dead letter's ``column`` (``payload`` or ``detail``)."""
    return b"tagrelay dead letter %d %s\x00%s" % (seq, column.encode(), forwarder.encode())


class PayloadCipher:
    """Seals what the spool stores and opens what it reads; see the module docstring.
    Thread-safe (the keyring is)."""

    __slots__ = ("keyring",)

    def __init__(self, keyring: Keyring | None) -> None:
        self.keyring = keyring

    @property
    def enabled(self) -> bool:
        return self.keyring is not None

    @property
    def primary_id(self) -> bytes | None:
        """The key id new rows are sealed under; None without keys."""
        return None if self.keyring is None else self.keyring.primary_id

    def seal(self, data: bytes, aad: bytes) -> bytes:
        """``data`` sealed under the first key; as it is without keys."""
        return data if self.keyring is None else self.keyring.encrypt(data, aad)

    def open(self, stored: bytes, aad: bytes) -> bytes:
        """The plaintext of a stored value, sealed or not. Raises ``EncryptionKeyError``
        for a sealed value without keys, ``CryptoError`` for one that fails (unknown key,
        tampered, another row's)."""
        if not is_encrypted(stored):
            return stored
        if self.keyring is None:
            raise EncryptionKeyError(
                f"the spool holds data encrypted under key id {blob_key_id(stored).hex()}, "
                "and encryption.keys is empty"
            )
        return self.keyring.decrypt(stored, aad)

    def seal_segment(self, last_seq: int, payload: bytes) -> bytes:
        return self.seal(payload, segment_aad(last_seq))

    def open_segment(self, last_seq: int, stored: bytes) -> bytes:
        return self.open(stored, segment_aad(last_seq))

    def seal_dead_letter(self, forwarder: str, seq: int, column: str, value: bytes) -> bytes:
        return self.seal(value, dead_letter_aad(forwarder, seq, column))

    def open_dead_letter(self, forwarder: str, seq: int, column: str, stored: bytes) -> bytes:
        return self.open(stored, dead_letter_aad(forwarder, seq, column))


PLAINTEXT = PayloadCipher(None)
"""The cipher of a relay without keys."""


def cipher_for(keys: Sequence[str]) -> PayloadCipher:
    """The cipher of ``encryption.keys`` given as their base64 texts (how they reach the
    processes that read the spool file: the delivery processes, the warehouse's)."""
    return PayloadCipher(Keyring.from_texts(keys)) if keys else PLAINTEXT


def sealed_key_id(stored: bytes) -> bytes | None:
    """The key id a stored value names, None for plaintext (what ``key_id`` holds)."""
    return blob_key_id(stored) if is_encrypted(stored) else None


def stored_key_ids(conn: sqlite3.Connection) -> set[bytes]:
    """Every key id that rows of the spool at ``conn`` are sealed under (their ``key_id``
    columns: no event is read)."""
    found: set[bytes] = set()
    for table in ("segments", "dead_letters"):
        for (kid,) in conn.execute(f"SELECT DISTINCT key_id FROM {table} WHERE key_id IS NOT NULL"):
            found.add(bytes(kid))
    return found


def check_keys(key_ids: Iterable[bytes], cipher: PayloadCipher, where: str) -> None:
    """Raise ``EncryptionKeyError`` unless ``cipher`` can open rows sealed under every one
    of ``key_ids`` (what ``where``, e.g. the spool's path, holds). The message names key
    ids (four bytes of a hash of each key), never keys."""
    needed = set(key_ids)
    if not needed:
        return
    names = ", ".join(sorted(kid.hex() for kid in needed))
    if cipher.keyring is None:
        raise EncryptionKeyError(
            f"{where} holds events encrypted under key id(s) {names}, but encryption.keys is "
            "empty: configure the key(s) they were written with (the relay never writes "
            "plaintext next to encrypted data, nor starts unable to read what it holds)"
        )
    unknown = needed - cipher.keyring.key_ids
    if unknown:
        missing = ", ".join(sorted(kid.hex() for kid in unknown))
        raise EncryptionKeyError(
            f"{where} holds events encrypted under key id(s) {missing}, which encryption.keys "
            "does not hold (a wrong key, or an old key removed before `tagrelay keys rotate` "
            "re-encrypted everything under the new one): add the key(s) back to "
            "encryption.keys, after the first one"
        )
