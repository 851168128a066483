"""The identity store on SQLite: ``identity.db`` in the data directory (mode 0600, WAL).

Tables::

    meta     (name TEXT PRIMARY KEY, value BLOB)      version, salt
    persons  (person INTEGER PRIMARY KEY, updated_ms INTEGER, record BLOB)
    ids      (ref BLOB PRIMARY KEY, person INTEGER, seen_ms INTEGER)

A person's ``record`` is their :class:`~tagrelay.identity_store.record.Person` as JSON,
encrypted (``crypto.Keyring``, associated data ``identity_store person <id>``) when
``encryption.keys`` is set. ``ids`` finds a person by an id without holding it: ``ref`` is
an HMAC-SHA256 (the first 16 bytes) of ``kind NUL value`` under a random 32-byte salt kept in
``meta`` (encrypted too when encryption is on), kind ``a`` for an anonymousId, ``u`` for a
userId, ``e`` for an email (lowercased; for ``forget --email``). So with encryption on, the
file holds no identifier and no personal data in the clear, and the hashes cannot be
recomputed from a guessed email without the salt, which needs the key. The salt does not
depend on the key: rotating keys re-encrypts rows, it never re-indexes them.

Keys at start-up (:meth:`SqliteIdentityStore.open` with ``writer=True``, which the relay
runs before anything else touches the file):

- a store encrypted under a key no longer in ``encryption.keys`` (or opened with no keys)
  refuses to start: ``IdentityStoreError`` names the key id it needs;
- a store written without encryption and opened with keys is migrated: every row is
  encrypted under the first key, in one transaction, before the relay starts;
- rows under an older key that is still configured are read as they are and re-encrypted
  under the first key when next written (``reencrypt`` does them all at once).

Concurrency: one writer (the store's internal forwarder, ``identity_store.writer``) and any
number of readers (the ad forwarders with ``enrich: true``, in whichever process they
run); WAL lets readers read while the writer writes. Every method blocks: callers run them
on a thread (``IdentityStore``'s executor).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import orjson

from tagrelay.crypto import CryptoError, Keyring, blob_key_id, is_encrypted
from tagrelay.datadir import private_dir, private_file, tighten
from tagrelay.identity_store.backend import ForgetCounts, IdentityBackend, IdentityStoreError
from tagrelay.identity_store.record import Observation, Person, Profile

__all__ = ["FILE_NAME", "SqliteIdentityStore"]

FILE_NAME: Final = "identity.db"
SCHEMA_VERSION: Final = b"1"
_REF_BYTES: Final = 16
_SALT_AAD: Final = b"identity_store meta salt"

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS persons ("
    " person INTEGER PRIMARY KEY, updated_ms INTEGER NOT NULL, record BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS persons_updated ON persons (updated_ms)",
    "CREATE TABLE IF NOT EXISTS ids ("
    " ref BLOB PRIMARY KEY, person INTEGER NOT NULL, seen_ms INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS ids_person ON ids (person)",
)


def _person_aad(person: int) -> bytes:
    return b"identity_store person %d" % person


class SqliteIdentityStore(IdentityBackend):
    """The SQLite backend (see the module docstring). Not thread-safe: one thread at a
    time (its lock serializes callers that share it)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        keyring: Keyring | None,
        salt: bytes,
        *,
        ttl_secs: int,
        click_id_secs: Mapping[str, int],
    ) -> None:
        self._conn = conn
        self._keyring = keyring
        self._salt = salt
        self._ttl_ms = ttl_secs * 1000
        self._click_id_ms = {name: secs * 1000 for name, secs in click_id_secs.items()}
        self._lock = threading.Lock()

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        data_dir: Path,
        keyring: Keyring | None,
        *,
        ttl_secs: int,
        click_id_secs: Mapping[str, int],
        writer: bool = False,
    ) -> SqliteIdentityStore:
        """Open ``identity.db`` in ``data_dir``: a ``writer`` creates it (mode 0600) and its
        tables, checks the keys and migrates a plaintext store to encryption (see the module
        docstring); a reader needs the file to exist. ``IdentityStoreError`` when the keys
        do not fit or the file cannot be opened."""
        path = data_dir / FILE_NAME
        if writer:
            private_dir(data_dir)
            private_file(path)
            for suffix in ("-wal", "-shm"):
                tighten(path.with_name(path.name + suffix))
        elif not path.exists():
            raise IdentityStoreError(f"the identity store {path} does not exist yet")
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")
            if writer:
                conn.execute("PRAGMA journal_mode=WAL")
                # What forget deletes is overwritten, not left in free pages (many builds
                # have it on already; erasure must not depend on that).
                conn.execute("PRAGMA secure_delete=ON")
                conn.execute("PRAGMA synchronous=NORMAL")
                for statement in _SCHEMA:
                    conn.execute(statement)
            else:
                conn.execute("PRAGMA query_only=1")
            salt = _salt(conn, keyring, writer, path)
        except sqlite3.Error as exc:
            raise IdentityStoreError(f"cannot open the identity store {path}: {exc}") from exc
        store = cls(conn, keyring, salt, ttl_secs=ttl_secs, click_id_secs=click_id_secs)
        if writer and keyring is not None:
            store._encrypt_plaintext_rows()
        return store

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- ids -------------------------------------------------------------------------------

    def ref(self, kind: str, value: str) -> bytes:
        """The ``ids.ref`` of an id (``kind`` a, u or e)."""
        if kind == "e":
            value = value.strip().lower()
        message = kind.encode() + b"\0" + value.encode("utf-8", "surrogatepass")
        return hmac.new(self._salt, message, hashlib.sha256).digest()[:_REF_BYTES]

    def _persons_of(self, refs: Iterable[bytes]) -> dict[bytes, int]:
        wanted = list(dict.fromkeys(refs))
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        rows = self._conn.execute(f"SELECT ref, person FROM ids WHERE ref IN ({marks})", wanted)
        return {bytes(ref): person for ref, person in rows}

    # -- records ---------------------------------------------------------------------------

    def _load(self, person: int) -> Person | None:
        row = self._conn.execute(
            "SELECT record FROM persons WHERE person = ?", (person,)
        ).fetchone()
        if row is None:
            return None
        return Person.from_json(orjson.loads(self._open_blob(bytes(row[0]), person)))

    def _open_blob(self, blob: bytes, person: int) -> bytes:
        if not is_encrypted(blob):
            return blob
        if self._keyring is None:
            raise IdentityStoreError(
                "the identity store holds encrypted records and encryption.keys is empty"
            )
        try:
            return self._keyring.decrypt(blob, _person_aad(person))
        except CryptoError as exc:
            raise IdentityStoreError(f"identity store record {person}: {exc}") from None

    def _seal(self, person: int, record: Person) -> bytes:
        data = orjson.dumps(record.to_json())
        if self._keyring is None:
            return data
        return self._keyring.encrypt(data, _person_aad(person))

    def _save(self, person: int, record: Person) -> None:
        self._conn.execute(
            "INSERT INTO persons (person, updated_ms, record) VALUES (?, ?, ?) "
            "ON CONFLICT (person) DO UPDATE SET updated_ms = excluded.updated_ms, "
            "record = excluded.record",
            (person, record.last_seen_ms, self._seal(person, record)),
        )

    def _new_person(self, record: Person) -> int:
        cursor = self._conn.execute(
            "INSERT INTO persons (updated_ms, record) VALUES (?, x'')", (record.last_seen_ms,)
        )
        person = cursor.lastrowid
        assert person is not None
        self._save(person, record)
        return person

    def _delete(self, persons: Iterable[int]) -> tuple[int, int]:
        deleted = ids = 0
        for person in persons:
            ids += self._conn.execute("DELETE FROM ids WHERE person = ?", (person,)).rowcount
            deleted += self._conn.execute(
                "DELETE FROM persons WHERE person = ?", (person,)
            ).rowcount
        return deleted, ids

    # -- IdentityBackend -------------------------------------------------------------------

    def record(self, observations: Sequence[Observation], now_ms: int) -> int:
        with self._lock, _transaction(self._conn):
            records: dict[int, Person] = {}
            dirty: set[int] = set()
            for seen in observations:
                self._record_one(seen, now_ms, records, dirty)
            for person in dirty:
                self._save(person, records[person])
        return len(dirty)

    def _record_one(
        self, seen: Observation, now_ms: int, records: dict[int, Person], dirty: set[int]
    ) -> None:
        own: dict[bytes, None] = {}
        if seen.anonymous_id is not None:
            own[self.ref("a", seen.anonymous_id)] = None
        if seen.user_id is not None:
            own[self.ref("u", seen.user_id)] = None
        as_user = as_anonymous = b""
        if seen.previous_id is not None:
            as_user, as_anonymous = self.ref("u", seen.previous_id), self.ref("a", seen.previous_id)
        found = self._persons_of([*own, *(r for r in (as_user, as_anonymous) if r)])
        # A previousId is a user id if the store knows it as one, else an anonymous id.
        previous_is_user = bool(as_user) and as_user in found
        if seen.previous_id is not None:
            own[as_user if previous_is_user else as_anonymous] = None
        persons = sorted(set(found.values()))
        if not persons:
            record = Person()
            record.merge(seen, previous_is_user)
            person = self._new_person(record)
            records[person] = record
            dirty.add(person)
        else:
            person = persons[0]
            record = self._record(person, records)
            for other in persons[1:]:  # linked by this event: one person from now on
                record.absorb(self._record(other, records))
                self._conn.execute("UPDATE ids SET person = ? WHERE person = ?", (person, other))
                self._conn.execute("DELETE FROM persons WHERE person = ?", (other,))
                records.pop(other, None)
                dirty.discard(other)
                dirty.add(person)
            if record.merge(seen, previous_is_user):
                dirty.add(person)
            if record.expire(now_ms, self._ttl_ms, self._click_id_ms):
                dirty.add(person)
        # The index gains the ids it lacks (or that led to another person); an id it has
        # is not written again: whether it is still current is the record's to say.
        at = seen.at_ms
        rows = [(ref, person, at) for ref in own if found.get(ref) != person]
        email = seen.user.get("email")
        if email and person in dirty:
            rows.append((self.ref("e", email), person, at))
        if rows:
            self._conn.executemany(
                "INSERT INTO ids (ref, person, seen_ms) VALUES (?, ?, ?) ON CONFLICT (ref) "
                "DO UPDATE SET person = excluded.person, seen_ms = excluded.seen_ms",
                rows,
            )

    def _record(self, person: int, records: dict[int, Person]) -> Person:
        record = records.get(person)
        if record is None:
            record = self._load(person) or Person()
            records[person] = record
        return record

    def lookup(
        self, keys: Sequence[tuple[str | None, str | None]], now_ms: int
    ) -> list[Profile | None]:
        with self._lock:
            refs: list[list[bytes]] = []
            for anonymous_id, user_id in keys:
                mine = []
                if user_id is not None:
                    mine.append(self.ref("u", user_id))
                if anonymous_id is not None:
                    mine.append(self.ref("a", anonymous_id))
                refs.append(mine)
            found = self._persons_of(ref for mine in refs for ref in mine)
            records: dict[int, Person | None] = {}
            profiles: list[Profile | None] = []
            cutoff = now_ms - self._ttl_ms
            for (anonymous_id, user_id), mine in zip(keys, refs, strict=True):
                profile = None
                for ref in mine:
                    person = found.get(ref)
                    if person is None:
                        continue
                    if person not in records:
                        records[person] = self._load(person)
                    record = records[person]
                    if record is None:
                        continue
                    # The index keeps an id until its person goes; the record says whether
                    # it is still current.
                    held = (
                        record.user_ids.get(user_id or "")
                        if ref == mine[0] and user_id is not None
                        else record.anonymous_ids.get(anonymous_id or "")
                    )
                    if held is None or held < cutoff:
                        continue
                    profile = record.profile(now_ms, self._ttl_ms, self._click_id_ms)
                    break
                profiles.append(profile)
            return profiles

    def forget(
        self,
        *,
        user_id: str | None = None,
        anonymous_id: str | None = None,
        email: str | None = None,
    ) -> ForgetCounts:
        refs = []
        if user_id is not None:
            refs.append(self.ref("u", user_id))
        if anonymous_id is not None:
            refs.append(self.ref("a", anonymous_id))
        if email is not None:
            refs.append(self.ref("e", email))
        with self._lock:
            with _transaction(self._conn):
                persons = set(self._persons_of(refs).values())
                deleted, ids = self._delete(persons)
            if deleted:
                # The pages as they were before stay in the write-ahead log until a
                # checkpoint copies the new ones over them: do it now (best effort: a reader
                # in the middle of a read holds it back until the next one).
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return ForgetCounts(persons=deleted, ids=ids)

    def export(
        self,
        *,
        user_id: str | None = None,
        anonymous_id: str | None = None,
        email: str | None = None,
    ) -> dict[str, Any]:
        refs = []
        if user_id is not None:
            refs.append(self.ref("u", user_id))
        if anonymous_id is not None:
            refs.append(self.ref("a", anonymous_id))
        if email is not None:
            refs.append(self.ref("e", email))
        with self._lock:
            persons = sorted(set(self._persons_of(refs).values()))
            out = []
            for person in persons:
                record = self._load(person)
                if record is not None:
                    out.append(_exported(record))
            return {"persons": out}

    def purge(self, now_ms: int) -> int:
        cutoff = now_ms - self._ttl_ms
        with self._lock, _transaction(self._conn):
            persons = [
                p
                for (p,) in self._conn.execute(
                    "SELECT person FROM persons WHERE updated_ms < ?", (cutoff,)
                )
            ]
            deleted, _ = self._delete(persons)
        return deleted

    def reencrypt(self, limit: int | None = None) -> int:
        """Encrypt the salt and up to ``limit`` records (all by default) under the first key
        that are not already (plaintext rows, or rows under an older key), in one
        transaction; returns how many records changed (0: none is left)."""
        if self._keyring is None:
            return 0
        keyring = self._keyring
        with self._lock, _transaction(self._conn):
            row = self._conn.execute("SELECT value FROM meta WHERE name = 'salt'").fetchone()
            if row is not None and keyring.needs_rotation(bytes(row[0])):
                self._conn.execute(
                    "UPDATE meta SET value = ? WHERE name = 'salt'",
                    (keyring.encrypt(self._salt, _SALT_AAD),),
                )
            # A record under the first key starts 00 01 <its key id>: the others are found
            # without decrypting anything.
            stale = self._conn.execute(
                "SELECT person, record FROM persons WHERE substr(record, 1, 6) != ? LIMIT ?",
                (b"\x00\x01" + keyring.primary_id, -1 if limit is None else limit),
            ).fetchall()
            for person, blob in stale:
                plain = self._open_blob(bytes(blob), person)
                self._conn.execute(
                    "UPDATE persons SET record = ? WHERE person = ?",
                    (keyring.encrypt(plain, _person_aad(person)), person),
                )
        return len(stale)

    def _encrypt_plaintext_rows(self) -> None:
        """A store written before encryption was on: encrypt it (at start-up)."""
        with self._lock:
            plain = self._conn.execute(
                "SELECT 1 FROM persons WHERE substr(record, 1, 1) != x'00' LIMIT 1"
            ).fetchone()
        if plain is not None:
            self.reencrypt()

    def stats(self) -> dict[str, int]:
        """How many persons and ids the store holds."""
        with self._lock:
            (persons,) = self._conn.execute("SELECT count(*) FROM persons").fetchone()
            (ids,) = self._conn.execute("SELECT count(*) FROM ids").fetchone()
        return {"persons": int(persons), "ids": int(ids)}


def _exported(record: Person) -> dict[str, Any]:
    def when(ms: int) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))

    return {
        "anonymous_ids": {value: when(at) for value, at in record.anonymous_ids.items()},
        "user_ids": {value: when(at) for value, at in record.user_ids.items()},
        "user_data": {n: {"value": v, "seen": when(at)} for n, (v, at) in record.user.items()},
        "click_ids": {n: {"value": v, "seen": when(at)} for n, (v, at) in record.click_ids.items()},
        "browser_ids": {
            n: {"value": v, "seen": when(at)} for n, (v, at) in record.browser_ids.items()
        },
    }


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        self.conn.execute("COMMIT" if kind is None else "ROLLBACK")


def _salt(conn: sqlite3.Connection, keyring: Keyring | None, writer: bool, path: Path) -> bytes:
    """The store's HMAC salt: read (decrypted) or, for a new store, made and written."""
    row = conn.execute("SELECT value FROM meta WHERE name = 'salt'").fetchone()
    if row is None:
        if not writer:
            raise IdentityStoreError(f"the identity store {path} is not initialized")
        salt = os.urandom(32)
        stored = salt if keyring is None else keyring.encrypt(salt, _SALT_AAD)
        conn.execute("INSERT INTO meta (name, value) VALUES ('version', ?)", (SCHEMA_VERSION,))
        conn.execute("INSERT INTO meta (name, value) VALUES ('salt', ?)", (stored,))
        return salt
    blob = bytes(row[0])
    if not is_encrypted(blob):
        if keyring is not None and writer:
            conn.execute(
                "UPDATE meta SET value = ? WHERE name = 'salt'",
                (keyring.encrypt(blob, _SALT_AAD),),
            )
        return blob
    if keyring is None:
        raise IdentityStoreError(
            f"the identity store {path} is encrypted (key id {blob_key_id(blob).hex()}) and "
            "encryption.keys is empty: configure the key it was written with"
        )
    if not keyring.knows(blob):
        raise IdentityStoreError(
            f"the identity store {path} is encrypted under key id {blob_key_id(blob).hex()}, "
            "which is not in encryption.keys: add that key (after the first one, to "
            "rotate to a new key), or delete the file to start an empty store"
        )
    try:
        return keyring.decrypt(blob, _SALT_AAD)
    except CryptoError as exc:
        raise IdentityStoreError(f"the identity store {path}: {exc}") from None
