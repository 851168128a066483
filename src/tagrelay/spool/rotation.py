"""Key rotation of the spool: re-encrypt under the first of ``encryption.keys`` every row
that is not sealed under it (plaintext rows from before encryption was switched on, rows
under an older key), so that the older key can then be removed.

``tagrelay keys rotate`` runs it. While the relay runs, the relay does it
(``SqliteSpool.rotate_keys``, through the admin socket); otherwise the command does it
itself, holding the spool's lock (``rotate_offline``). Either way it goes one row at a
time, each in a transaction of its own: a segment is rewritten by the commit process
between two group commits (a commit waits for at most one rewrite), dead letters
``DEAD_LETTER_CHUNK`` at a time. A segment pruned meanwhile is simply not there any more; a
row is rewritten only if it is still under the key it was read under.

``backlog`` counts what is left (``tagrelay_encryption_events``): it reads the ``key_id``
index, and the rows' first page for a segment's event count, never the events.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field

from tagrelay.spool import dead_letters
from tagrelay.spool.encryption import PayloadCipher
from tagrelay.spool.writer_child import rewrite

STORES = ("spool", "dead_letters")
"""The ``store`` label: the spool's events (segments), and the dead letters."""
STATES = ("old_key", "plaintext")
"""The ``state`` label: sealed under a key that is not the first, or not sealed at all."""

DEAD_LETTER_CHUNK = 100
"""Dead letters re-encrypted per transaction."""

Backlog = dict[tuple[str, str], int]
"""``(store, state) -> events`` still to re-encrypt."""


@dataclass
class RotationReport:
    """What a rotation did: events re-encrypted per store (a segment counts its events),
    and what is left (events written under an old key meanwhile cannot be: the relay
    writes under the first key; left means rows that could not be read)."""

    reencrypted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STORES, 0))
    left: Backlog = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        return {
            "reencrypted": dict(self.reencrypted),
            "left": {f"{store}.{state}": n for (store, state), n in sorted(self.left.items())},
        }


def backlog(conn: sqlite3.Connection, primary_id: bytes | None) -> Backlog:
    """Events not under ``primary_id`` by store and state (only those with some)."""
    found: Backlog = {}
    for store, table, amount in (
        ("spool", "segments", "SUM(count)"),
        ("dead_letters", "dead_letters", "COUNT(*)"),
    ):
        kids = [r[0] for r in conn.execute(f"SELECT DISTINCT key_id FROM {table}")]
        for kid in kids:
            if kid is not None and bytes(kid) == primary_id:
                continue
            (n,) = conn.execute(
                f"SELECT {amount} FROM {table} WHERE key_id IS ?", (kid,)
            ).fetchone()
            state = "plaintext" if kid is None else "old_key"
            if n:
                found[(store, state)] = found.get((store, state), 0) + int(n)
    return found


def old_key_ids(conn: sqlite3.Connection, table: str, primary_id: bytes) -> list[bytes | None]:
    """The key ids (None: plaintext) of ``table``'s rows that are not under ``primary_id``."""
    kids = [r[0] for r in conn.execute(f"SELECT DISTINCT key_id FROM {table}")]
    return [None if k is None else bytes(k) for k in kids if k is None or bytes(k) != primary_id]


def next_segment(
    conn: sqlite3.Connection, cipher: PayloadCipher, kid: bytes | None, after: int
) -> tuple[int, int, bytes] | None:
    """The first segment past ``after`` sealed under ``kid`` (None: plaintext), sealed again
    under the first key: ``(last_seq, its event count, the new payload)``; None when there
    is no more. Opening and sealing happen here, on the caller's thread."""
    row = conn.execute(
        "SELECT last_seq, count, payload FROM segments WHERE key_id IS ? AND last_seq > ? "
        "ORDER BY last_seq LIMIT 1",
        (kid, after),
    ).fetchone()
    if row is None:
        return None
    last_seq, count, stored = int(row[0]), int(row[1]), bytes(row[2])
    return last_seq, count, cipher.seal_segment(last_seq, cipher.open_segment(last_seq, stored))


def rotate_dead_letters(
    conn: sqlite3.Connection, cipher: PayloadCipher, kid: bytes | None, after_id: int
) -> tuple[int, int]:
    """Re-encrypt up to ``DEAD_LETTER_CHUNK`` dead letters under ``kid`` past ``after_id``,
    in one transaction: ``(the last id looked at, how many were rewritten)``; the last id
    is ``after_id`` when there were none."""
    rows = conn.execute(
        "SELECT id, forwarder, seq, payload, detail FROM dead_letters "
        "WHERE key_id IS ? AND id > ? ORDER BY id LIMIT ?",
        (kid, after_id, DEAD_LETTER_CHUNK),
    ).fetchall()
    if not rows:
        return after_id, 0
    done = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for dead_letter_id, forwarder, seq, stored, detail in rows:
            payload = cipher.open_dead_letter(forwarder, seq, "payload", bytes(stored))
            if isinstance(detail, bytes):
                detail = cipher.open_dead_letter(forwarder, seq, "detail", detail).decode()
            sealed, sealed_detail, new_kid = dead_letters.sealed_row(
                cipher, forwarder, seq, payload, detail
            )
            done += conn.execute(
                "UPDATE dead_letters SET payload = ?, detail = ?, key_id = ? "
                "WHERE id = ? AND key_id IS ?",
                (sealed, sealed_detail, new_kid, dead_letter_id, kid),
            ).rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(rows[-1][0]), done


def rotate_offline(
    conn: sqlite3.Connection,
    cipher: PayloadCipher,
    progress: Callable[[str, int], None] | None = None,
) -> RotationReport:
    """Re-encrypt every row of the spool at ``conn`` (a connection of its own, the spool's
    lock held: no relay runs) under ``cipher``'s first key. ``progress(store, events)``
    is told each step."""
    primary = cipher.primary_id
    assert primary is not None, "rotation needs keys"
    report = RotationReport()
    for kid in old_key_ids(conn, "segments", primary):
        after = 0
        while (found := next_segment(conn, cipher, kid, after)) is not None:
            last_seq, count, payload = found
            if rewrite(conn, last_seq, payload, kid):
                report.reencrypted["spool"] += count
                if progress is not None:
                    progress("spool", count)
            after = last_seq
    for kid in old_key_ids(conn, "dead_letters", primary):
        after_id = 0
        while True:
            last_id, done = rotate_dead_letters(conn, cipher, kid, after_id)
            if last_id == after_id:
                break
            report.reencrypted["dead_letters"] += done
            if progress is not None and done:
                progress("dead_letters", done)
            after_id = last_id
    report.left = backlog(conn, primary)
    return report
