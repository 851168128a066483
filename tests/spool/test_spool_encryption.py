"""Encryption at rest of the spool (``encryption.keys``): segments and dead letters are
sealed on disk, WAL included, opened where they are read, and a spool the configured keys
cannot read does not open."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tagrelay import crypto
from tagrelay.crypto import CryptoError, Keyring, generate_key
from tagrelay.errors import EncryptionKeyError
from tagrelay.spool import writer_child
from tagrelay.spool.encryption import PLAINTEXT, PayloadCipher, segment_aad
from tagrelay.spool.segments import SealedSegment, open_read_only, read_span
from tagrelay.spool.sqlite import SqliteSpool

EMAIL = b"jane.doe@example.com"


def event(n: int) -> bytes:
    return b'{"type":"identify","n":%d,"traits":{"email":"%s"}}' % (n, EMAIL)


def cipher_of(*keys: str) -> PayloadCipher:
    return PayloadCipher(Keyring.from_texts(list(keys)))


async def open_spool(path: Path, cipher: PayloadCipher) -> SqliteSpool:
    spool = SqliteSpool(path / "spool.sqlite3", cipher=cipher)
    await spool.open()
    return spool


def raw_files(spool_path: Path) -> bytes:
    """Every byte the spool has on disk: the database, its WAL and shared memory."""
    data = b""
    for suffix in ("", "-wal", "-shm"):
        file = spool_path.with_name(spool_path.name + suffix)
        if file.exists():
            data += file.read_bytes()
    return data


async def test_events_and_dead_letters_are_sealed_on_disk_and_read_back(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path, cipher_of(generate_key()))
    await spool.append([(1, event(1)), (1, event(2))])
    await spool.append([(2, event(3))])
    events = await spool.read(0, 10)
    assert [e.payload for e in events] == [event(1), event(2), event(3)]
    await spool.register("hook")
    detail = "HTTP 400: " + EMAIL.decode() + " is not allowed"  # a destination's echo
    await spool.dead_letter("hook", events[:2], "status_4xx", detail, 1, advance_to=2)
    [first, second] = await spool.dead_letters("hook")
    assert (first.payload, first.detail, first.reason) == (event(1), detail, "status_4xx")
    assert second.payload == event(2)
    assert (await spool.dead_letter_by_id(first.id)) == first
    assert await spool.dead_letters_died_again([first.id], "status_4xx", detail + "!") == 1
    again = await spool.dead_letter_by_id(first.id)
    assert again is not None and (again.payload, again.detail) == (event(1), detail + "!")
    # On disk (the WAL holds everything until a checkpoint; after it, the database):
    assert EMAIL not in raw_files(spool.path)
    assert b"jane.doe" not in raw_files(spool.path)
    await spool.checkpoint()
    assert EMAIL not in raw_files(spool.path)
    await spool.close()
    assert EMAIL not in raw_files(spool.path)


async def test_without_keys_the_same_spool_holds_plaintext(tmp_path: Path) -> None:
    """The check above can fail: the same writes without keys leave the email on disk."""
    spool = await open_spool(tmp_path, PLAINTEXT)
    await spool.append([(1, event(1))])
    await spool.register("hook")
    await spool.dead_letter("hook", await spool.read(0, 1), "status_4xx", "no", 1)
    await spool.close()
    assert EMAIL in raw_files(spool.path)


async def test_a_blob_moved_to_another_row_fails_authentication(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path, cipher := cipher_of(generate_key()))
    await spool.append([(1, event(1))])
    await spool.append([(1, event(2))])
    await spool.close()
    with sqlite3.connect(spool.path) as conn:
        [(one,), (two,)] = conn.execute("SELECT payload FROM segments ORDER BY last_seq")
        conn.execute("UPDATE segments SET payload = ? WHERE last_seq = 1", (two,))
    reopened = await open_spool(tmp_path, cipher)
    with pytest.raises(CryptoError, match="authentication"):
        await reopened.read(0, 10)
    await reopened.close()
    assert cipher.open_segment(1, one) == event(1)


async def test_a_wrong_key_or_no_key_refuses_to_open_and_names_the_key_id(tmp_path: Path) -> None:
    key, other = generate_key(), generate_key()
    spool = await open_spool(tmp_path, cipher_of(key))
    await spool.append([(1, event(1))])
    await spool.close()
    kid = crypto.key_id(crypto.decode_key(key)).hex()

    for cipher in (cipher_of(other), PLAINTEXT):
        refused = SqliteSpool(spool.path, cipher=cipher)
        with pytest.raises(EncryptionKeyError, match=kid) as info:
            await refused.open()
        assert key not in str(info.value) and other not in str(info.value)
        # Nothing was started or kept: the right key opens it at once.
        assert refused._commits is None and refused._lock_handle is None

    # The old key after a new one (a rotation in progress) reads it, and new events are
    # sealed under the new one.
    rotated = await open_spool(tmp_path, both := cipher_of(other, key))
    await rotated.append([(2, event(2))])
    assert [e.payload for e in await rotated.read(0, 10)] == [event(1), event(2)]
    await rotated.close()
    with sqlite3.connect(spool.path) as conn:
        kids = [bytes(r[0]) for r in conn.execute("SELECT key_id FROM segments ORDER BY 1")]
    assert both.keyring is not None
    assert sorted(kids) == sorted([crypto.key_id(crypto.decode_key(key)), both.keyring.primary_id])


async def test_dead_letters_under_an_unknown_key_refuse_to_open_too(tmp_path: Path) -> None:
    key = generate_key()
    spool = await open_spool(tmp_path, cipher_of(key))
    await spool.append([(1, event(1))])
    await spool.register("hook")
    await spool.dead_letter("hook", await spool.read(0, 1), "status_4xx", "no", 1, advance_to=1)
    await spool.close()
    with sqlite3.connect(spool.path) as conn:
        conn.execute("DELETE FROM segments")
    with pytest.raises(EncryptionKeyError, match=r"encryption\.keys is empty"):
        await SqliteSpool(spool.path).open()


async def test_a_plaintext_spool_stays_readable_once_keys_are_configured(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path, PLAINTEXT)
    await spool.append([(1, event(1))])
    await spool.register("hook")
    await spool.dead_letter("hook", await spool.read(0, 1), "status_4xx", "plain", 1)
    await spool.close()

    keyed = await open_spool(tmp_path, cipher_of(generate_key()))
    await keyed.append([(2, event(2))])
    assert [e.payload for e in await keyed.read(0, 10)] == [event(1), event(2)]
    [old] = await keyed.dead_letters("hook")
    assert (old.payload, old.detail) == (event(1), "plain")
    await keyed.close()


async def test_an_older_spool_gets_the_key_id_columns(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE segments (last_seq INTEGER PRIMARY KEY, count INTEGER NOT NULL, "
            "received_ms INTEGER NOT NULL, payload BLOB NOT NULL)"
        )
        conn.execute("INSERT INTO segments VALUES (1, 1, 5, ?)", (event(1),))
        conn.execute(
            "CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, forwarder TEXT NOT NULL, "
            "seq INTEGER NOT NULL, payload BLOB NOT NULL, reason TEXT NOT NULL, "
            "detail TEXT NOT NULL, attempts INTEGER NOT NULL, dead_at_ms INTEGER NOT NULL)"
        )
    spool = await open_spool(tmp_path, cipher_of(generate_key()))
    assert [e.payload for e in await spool.read(0, 10)] == [event(1)]
    await spool.append([(6, event(2))])
    assert [e.payload for e in await spool.read(1, 10)] == [event(2)]
    await spool.close()


async def test_other_processes_read_spans_with_the_keys_and_not_without(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path, cipher := cipher_of(generate_key()))
    await spool.append([(1, event(1)), (1, event(2))])
    conn = open_read_only(spool.path)
    try:
        assert read_span(conn, 0, 2, cipher.open_segment) == ([event(1), event(2)], [(2, 1)])
        with pytest.raises(SealedSegment):
            read_span(conn, 0, 2)
    finally:
        conn.close()
        await spool.close()


def test_the_commit_process_reads_key_ids_as_the_keyring_writes_them() -> None:
    ring = Keyring.from_texts([generate_key()])
    blob = ring.encrypt(b"x", segment_aad(1))
    assert writer_child.key_id_of(blob) == crypto.blob_key_id(blob) == ring.primary_id
    assert writer_child.SEALED_MIN_BYTES == crypto.OVERHEAD_BYTES
    assert writer_child.key_id_of(b'{"type":"track"}') is None
    assert writer_child.key_id_of(b"") is None
