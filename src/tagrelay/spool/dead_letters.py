"""Dead letters: the events a forwarder gave up on, kept in the spool's ``dead_letters``
table for an operator to list, read, replay or purge (``tagrelay dlq``).

A forwarder's worker writes one row per event (``SqliteSpool.dead_letter``): the
forwarder's id, the event's sequence number and stored JSON (``payload``), a bounded
``reason`` (``status_4xx``, ``max_age``, ``rejected_by_destination``, ...), a ``detail`` for
humans (the destination's answer, scrubbed of secrets before it is stored), the attempts
spent on it and when it died (``dead_at_ms``). A replay that fails again keeps the row (its
id too), with the new reason and detail, one more attempt and the time it died again; one
that is delivered deletes it. Rows older than ``dead_letters.retention_days`` are deleted by
the relay's maintenance.

With ``encryption.keys``, a row's event and detail are sealed (``spool.encryption``: bound
to the forwarder, the event's sequence number and the column) and ``key_id`` names the key;
the functions that read or rewrite them take the ``cipher``. The reason stays in clear (a
code from a fixed vocabulary, never personal data), so that rows can be selected by it.

The functions here take a ``sqlite3`` connection in autocommit mode: the relay calls them
on the spool's threads (``SqliteSpool``), ``tagrelay dlq`` on a connection of its own when no
relay runs. Deletes go ``DELETE_CHUNK`` rows per transaction, so that the spool's group
commits, which wait for SQLite's write lock, are never held up by a long one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from tagrelay.spool.encryption import PLAINTEXT, PayloadCipher, sealed_key_id

DELETE_CHUNK = 500
"""Rows deleted (or updated) per statement and transaction."""

COLUMNS = "id, forwarder, seq, payload, reason, detail, attempts, dead_at_ms"


def sealed_row(
    cipher: PayloadCipher, forwarder: str, seq: int, payload: bytes, detail: str
) -> tuple[bytes, bytes | str, bytes | None]:
    """A dead letter's ``payload``, ``detail`` and ``key_id`` as stored: sealed by
    ``cipher``, or as they are without keys."""
    if not cipher.enabled:
        return payload, detail, None
    sealed = cipher.seal_dead_letter(forwarder, seq, "payload", payload)
    return (
        sealed,
        cipher.seal_dead_letter(forwarder, seq, "detail", detail.encode()),
        sealed_key_id(sealed),
    )


def _opened(row: tuple[Any, ...], cipher: PayloadCipher) -> DeadLetterRow:
    dead_letter_id, forwarder, seq, payload, reason, detail, attempts, dead_at_ms = row
    payload = cipher.open_dead_letter(forwarder, seq, "payload", bytes(payload))
    if isinstance(detail, bytes):
        detail = cipher.open_dead_letter(forwarder, seq, "detail", detail).decode()
    return DeadLetterRow(
        dead_letter_id, forwarder, seq, payload, reason, detail, attempts, dead_at_ms
    )


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    id: int
    forwarder: str
    seq: int
    payload: bytes
    reason: str
    detail: str
    attempts: int
    dead_at_ms: int


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters: every condition given must hold (None: any)."""

    forwarder: str | None = None
    reason: str | None = None
    since_ms: int | None = None
    """Dead at or after this time (ms since the epoch)."""
    before_ms: int | None = None
    """Dead before this time."""
    ids: tuple[int, ...] | None = None

    def where(self) -> tuple[str, list[Any]]:
        """The SQL condition (never empty) and its parameters."""
        terms = ["1"]
        params: list[Any] = []
        if self.forwarder is not None:
            terms.append("forwarder = ?")
            params.append(self.forwarder)
        if self.reason is not None:
            terms.append("reason = ?")
            params.append(self.reason)
        if self.since_ms is not None:
            terms.append("dead_at_ms >= ?")
            params.append(self.since_ms)
        if self.before_ms is not None:
            terms.append("dead_at_ms < ?")
            params.append(self.before_ms)
        if self.ids is not None:
            # A temporary table would do for huge lists; an operator names a few.
            terms.append(f"id IN ({','.join('?' * len(self.ids))})" if self.ids else "0")
            params.extend(self.ids)
        return " AND ".join(terms), params


def select(
    conn: sqlite3.Connection,
    selection: Selection,
    *,
    after_id: int = 0,
    limit: int = 1000,
    newest_first: bool = False,
    cipher: PayloadCipher = PLAINTEXT,
) -> list[DeadLetterRow]:
    """Up to ``limit`` dead letters of ``selection`` with ``id > after_id``, by id (the
    order they died in; ``newest_first``: the last ones, the newest first), opened with
    ``cipher``."""
    where, params = selection.where()
    order = "DESC" if newest_first else ""
    rows = conn.execute(
        f"SELECT {COLUMNS} FROM dead_letters WHERE id > ? AND {where} ORDER BY id {order} LIMIT ?",
        (after_id, *params, limit),
    ).fetchall()
    return [_opened(row, cipher) for row in rows]


def get(
    conn: sqlite3.Connection, dead_letter_id: int, cipher: PayloadCipher = PLAINTEXT
) -> DeadLetterRow | None:
    row = conn.execute(
        f"SELECT {COLUMNS} FROM dead_letters WHERE id = ?", (dead_letter_id,)
    ).fetchone()
    return None if row is None else _opened(row, cipher)


def _chunks(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    for start in range(0, len(ids), DELETE_CHUNK):
        yield ids[start : start + DELETE_CHUNK]


def delete_ids(conn: sqlite3.Connection, ids: Sequence[int]) -> int:
    """Delete the dead letters ``ids`` (those still there); how many were."""
    deleted = 0
    for chunk in _chunks(ids):
        cursor = conn.execute(
            f"DELETE FROM dead_letters WHERE id IN ({','.join('?' * len(chunk))})", chunk
        )
        deleted += cursor.rowcount
    return deleted


def died_again(
    conn: sqlite3.Connection,
    ids: Sequence[int],
    reason: str,
    detail: str,
    now_ms: int,
    cipher: PayloadCipher = PLAINTEXT,
) -> int:
    """A replay of ``ids`` failed: they stay, with this reason and detail, one attempt more
    and ``now_ms`` as the time they died."""
    if cipher.enabled:
        return _died_again_sealed(conn, ids, reason, detail, now_ms, cipher)
    updated = 0
    for chunk in _chunks(ids):
        cursor = conn.execute(
            "UPDATE dead_letters SET reason = ?, detail = ?, attempts = attempts + 1, "
            f"dead_at_ms = ? WHERE id IN ({','.join('?' * len(chunk))})",
            (reason, detail, now_ms, *chunk),
        )
        updated += cursor.rowcount
    return updated


def _died_again_sealed(
    conn: sqlite3.Connection,
    ids: Sequence[int],
    reason: str,
    detail: str,
    now_ms: int,
    cipher: PayloadCipher,
) -> int:
    """``died_again`` when details are sealed: each row's own (bound to the row), and its
    payload sealed again with it if it was not yet under the first key (a plaintext row
    from before encryption, or one under an old key: one ``key_id`` per row)."""
    updated = 0
    for chunk in _chunks(ids):
        rows = conn.execute(
            f"SELECT id, forwarder, seq, payload FROM dead_letters "
            f"WHERE id IN ({','.join('?' * len(chunk))})",
            chunk,
        ).fetchall()
        conn.execute("BEGIN")
        try:
            for dead_letter_id, forwarder, seq, stored in rows:
                plain = cipher.open_dead_letter(forwarder, seq, "payload", bytes(stored))
                payload, sealed, kid = sealed_row(cipher, forwarder, seq, plain, detail)
                updated += conn.execute(
                    "UPDATE dead_letters SET reason = ?, detail = ?, payload = ?, key_id = ?, "
                    "attempts = attempts + 1, dead_at_ms = ? WHERE id = ?",
                    (reason, sealed, payload, kid, now_ms, dead_letter_id),
                ).rowcount
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return updated


def purge(conn: sqlite3.Connection, selection: Selection) -> int:
    """Delete every dead letter of ``selection``, ``DELETE_CHUNK`` per transaction; how
    many were deleted."""
    where, params = selection.where()
    sql = (
        "DELETE FROM dead_letters WHERE id IN "
        f"(SELECT id FROM dead_letters WHERE {where} LIMIT {DELETE_CHUNK})"
    )
    total = 0
    while True:
        deleted = conn.execute(sql, params).rowcount
        total += deleted
        if deleted < DELETE_CHUNK:
            return total


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Dead letters stored, by forwarder (those with none are left out)."""
    rows = conn.execute("SELECT forwarder, COUNT(*) FROM dead_letters GROUP BY forwarder")
    return {forwarder: int(n) for forwarder, n in rows}


def iso_ms(ms: int) -> str:
    """``2026-12-05T10:37:14Z``: a time in ms since the epoch, to the second, in UTC."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe(row: DeadLetterRow, *, with_event: bool = False) -> dict[str, Any]:
    """A dead letter as JSON for the admin API and ``tagrelay dlq``: its columns, the
    event's type, name and ``messageId``, and with ``with_event`` the event itself."""
    try:
        event = orjson.loads(row.payload)
    except orjson.JSONDecodeError:
        event = None
    fields = event if isinstance(event, dict) else {}
    described: dict[str, Any] = {
        "id": row.id,
        "forwarder": row.forwarder,
        "seq": row.seq,
        "dead_at": iso_ms(row.dead_at_ms),
        "dead_at_ms": row.dead_at_ms,
        "reason": row.reason,
        "attempts": row.attempts,
        "type": fields.get("type"),
        "event": fields.get("event"),
        "message_id": fields.get("messageId"),
        "detail": row.detail,
    }
    if with_event:
        described["payload"] = event if event is not None else row.payload.decode(errors="replace")
    return described
