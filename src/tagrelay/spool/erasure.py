"""Erasure and access in the spool (``tagrelay forget``, ``tagrelay export``): the events of
one person (``model.subject.Subject``) in the segments not yet pruned, and in the dead
letters.

A segment's events are counted by sequence number (cursors, depths and dead letters refer
to them), so an erased event is not cut out of its segment: its line is replaced by
``ERASED``, a tombstone that every reader skips (the forwarders' workers, the delivery
processes, the warehouse process: ``is_erased``) while the cursors move past it as past
any event. The segment is opened, filtered and sealed again under the first key, the way
key rotation rewrites one (``spool.rotation``), and written by the spool's commit process
between two group commits (``writer_child.erase``: one statement, with ``secure_delete``
so that the pages the old payload leaves are zeroed); a segment rotated meanwhile is read
again, one pruned meanwhile is gone anyway. Once every segment is done the WAL is emptied
(``writer_child.truncate``), so the old payloads' frames do not stay in it.

An event is erased for every forwarder at once, delivered to some of them or not: there is
one copy of it, and it is the person's. Dead letters of the person are deleted, opened with
the spool's cipher to be matched. An event already in flight to a destination when the
request comes is sent.

Without a relay, ``erase_offline`` does the same on a connection of the CLI's own, holding
the spool's lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import orjson

from tagrelay.model.subject import Subject
from tagrelay.spool import dead_letters
from tagrelay.spool.dead_letters import DeadLetterRow, Selection
from tagrelay.spool.encryption import PayloadCipher, sealed_key_id
from tagrelay.spool.writer_child import erase as erase_segment
from tagrelay.spool.writer_child import truncate

__all__ = [
    "ERASED",
    "erase_dead_letters",
    "erase_offline",
    "export",
    "is_erased",
    "next_to_erase",
]

ERASED = b'{"erased":true}'
"""What an erased event's line becomes in its segment."""

SCAN_CHUNK = 500
"""Dead letters read per query while looking for a person's."""


def is_erased(line: bytes) -> bool:
    """Whether a stored event is the tombstone of an erased one."""
    return line == ERASED


def needles(subject: Subject) -> tuple[bytes, ...]:
    """What an event of ``subject`` must contain, in lower case: each id and email as JSON
    writes it inside a string. Only lines that hold one are decoded (most of a spool is
    other people's); empty: decode every line."""
    values = (*subject.user_ids, *subject.anonymous_ids, *subject.emails)
    if not all(value.isascii() for value in values):
        return ()  # bytes.lower() folds ASCII only: no shortcut, every line is decoded
    return tuple(orjson.dumps(value)[1:-1].lower() for value in values)


def _may_hold(data: bytes, looked_for: tuple[bytes, ...]) -> bool:
    if not looked_for:
        return True
    low = data.lower()
    return any(needle in low for needle in looked_for)


def _theirs(line: bytes, subject: Subject) -> bool:
    if line == ERASED:
        return False
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return isinstance(event, dict) and subject.matches(event)


def next_to_erase(
    conn: sqlite3.Connection, *, cipher: PayloadCipher, subject: Subject, after: int
) -> tuple[int, bytes | None, bytes, int] | None:
    """The first segment past ``after`` that holds an event of ``subject``, filtered:
    ``(last_seq, the key id it is stored under, its new payload sealed under the first key,
    how many events were erased)``; None when no segment holds any."""
    looked_for = needles(subject)
    cursor = conn.execute(
        "SELECT last_seq, payload FROM segments WHERE last_seq > ? ORDER BY last_seq", (after,)
    )
    try:
        for last_seq, stored in cursor:
            opened = cipher.open_segment(last_seq, bytes(stored))
            if not _may_hold(opened, looked_for):
                continue
            lines = opened.split(b"\n")
            erased = 0
            for index, line in enumerate(lines):
                if _may_hold(line, looked_for) and _theirs(line, subject):
                    lines[index] = ERASED
                    erased += 1
            if erased:
                payload = cipher.seal_segment(last_seq, b"\n".join(lines))
                return last_seq, sealed_key_id(bytes(stored)), payload, erased
    finally:
        cursor.close()
    return None


def _dead_letters_of(
    conn: sqlite3.Connection, cipher: PayloadCipher, subject: Subject
) -> Iterator[DeadLetterRow]:
    after_id = 0
    while True:
        rows = dead_letters.select(
            conn, Selection(), after_id=after_id, limit=SCAN_CHUNK, cipher=cipher
        )
        if not rows:
            return
        for row in rows:
            if _theirs(row.payload, subject):
                yield row
        after_id = rows[-1].id


def erase_dead_letters(conn: sqlite3.Connection, cipher: PayloadCipher, subject: Subject) -> int:
    """Delete the dead letters of ``subject`` (their pages zeroed); how many there were."""
    ids = [row.id for row in _dead_letters_of(conn, cipher, subject)]
    if not ids:
        return 0
    conn.execute("PRAGMA secure_delete=ON")
    try:
        return dead_letters.delete_ids(conn, ids)
    finally:
        conn.execute("PRAGMA secure_delete=OFF")


def export(conn: sqlite3.Connection, cipher: PayloadCipher, subject: Subject) -> dict[str, Any]:
    """Every event of ``subject`` the spool holds: ``{"events": [...], "dead_letters":
    [...]}``, each with its sequence number (and a dead letter's forwarder and reason)."""
    events: list[dict[str, Any]] = []
    looked_for = needles(subject)
    cursor = conn.execute("SELECT last_seq, count, received_ms, payload FROM segments")
    try:
        for last_seq, count, received_ms, stored in cursor:
            opened = cipher.open_segment(last_seq, bytes(stored))
            if not _may_hold(opened, looked_for):
                continue
            lines = opened.split(b"\n")
            first = last_seq - count + 1
            for offset, line in enumerate(lines):
                if _may_hold(line, looked_for) and _theirs(line, subject):
                    events.append(
                        {
                            "seq": first + offset,
                            "received": dead_letters.iso_ms(received_ms),
                            "event": orjson.loads(line),
                        }
                    )
    finally:
        cursor.close()
    letters = [
        dead_letters.describe(row, with_event=True)
        for row in _dead_letters_of(conn, cipher, subject)
    ]
    return {"events": events, "dead_letters": letters}


def erase_offline(
    conn: sqlite3.Connection, cipher: PayloadCipher, subject: Subject
) -> dict[str, int]:
    """Erase ``subject`` from the spool at ``conn`` (a connection of its own, the spool's
    lock held: no relay runs): ``{"events": n, "dead_letters": m}``."""
    events = 0
    after = 0
    while (found := next_to_erase(conn, cipher=cipher, subject=subject, after=after)) is not None:
        last_seq, kid, payload, erased = found
        events += erase_segment(conn, last_seq, payload, kid) and erased
        after = last_seq
    letters = erase_dead_letters(conn, cipher, subject)
    truncate(conn)
    return {"events": events, "dead_letters": letters}
