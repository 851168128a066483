"""The spool's group commits and deletes, in a process of their own: the child's side.

Why a process: a commit is one SQLite statement and an fsync, and SQLite releases the GIL
while it works. But a thread of the relay's process needs the GIL before and after, while
the event loop holds it to serve requests; measured on two cores, handing a commit to a
thread and back cost the loop ~1 ms of its own CPU per commit, even for a commit that
did nothing (single-event ingest ran 30-40% slower than with the commit on the loop). A
process has its own interpreter: the loop only writes a frame to a socket and reads the
answer when it comes.

This module runs as ``python -I -S writer_child.py FD PATH SYNCHRONOUS MAX_PAGE_COUNT`` and
imports only the standard library, so that it starts in tens of milliseconds. The relay
(``tagrelay.spool.writer``) speaks to it over the socket ``FD`` with fixed-size frames:

request  ``REQUEST`` (op, a, b, c, len1, len2), then len1 + len2 bytes
         ``OP_INSERT``:         a = last_seq, b = count, c = received_ms, the payload, the
                                ids as a JSON array (len2 = 0: no id log)
         ``OP_CHECKPOINT``:     a passive WAL checkpoint
         ``OP_PRUNE_SEGMENTS``: delete up to b segments every cursor is past (a = the head,
                                for when there is no cursor); answers how many
         ``OP_PRUNE_IDS``:      delete the logged ids up to a; answers how many
         ``OP_REWRITE``:        replace the payload of the segment a (key rotation) with
                                the first bytes, if it is still sealed under the key id
                                given as the second (none: plaintext); answers 1, or 0
                                when it was pruned or rewritten meanwhile
         ``OP_ERASE``:          ``OP_REWRITE`` for an erasure (``spool.erasure``): the pages
                                the old payload leaves are overwritten (``secure_delete``)
         ``OP_TRUNCATE``:       a checkpoint that empties the WAL file (after an erasure:
                                the old payloads' frames go with it); answers 1 if it did
answer   ``REPLY`` (status, value, len), then len bytes of message; status ``OK``,
         ``SQLITE_ERROR`` (the statement failed and changed nothing) or ``FAILED``

Once the database is open the child answers one frame (``OK``, or an error and it exits).
It exits when the socket closes: when the relay closes the spool, exits or dies (a SIGKILL
included). A statement in flight then completes or not as a whole, as SQLite statements do.
It also inherits the spool's lock file, so a new relay cannot open the spool before this
child has finished.

The deletes of pruning run here too, between the commits: one writer, first come first
served. From another connection they fought the commits for SQLite's write lock, and a
commit that found it taken slept in SQLite's busy handler (1, 2, 5, 10 ms...) while the next
delete chunk took it again: commits of 10-40 ms, every second, under steady load.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import struct
import sys

REQUEST = struct.Struct("<BqqqII")
REPLY = struct.Struct("<BqI")

OP_INSERT = 1
OP_CHECKPOINT = 2
OP_PRUNE_SEGMENTS = 3
OP_PRUNE_IDS = 4
OP_REWRITE = 5
OP_ERASE = 6
OP_TRUNCATE = 7

OK = 0
SQLITE_ERROR = 1
FAILED = 2

PLAIN_INSERT = (
    "INSERT INTO segments (last_seq, count, received_ms, payload, key_id) VALUES (?, ?, ?, ?, ?)"
)

COMMIT_VIEW = """
CREATE TEMP VIEW IF NOT EXISTS logged_segments
    (last_seq, count, received_ms, payload, key_id, ids) AS
    SELECT last_seq, count, received_ms, payload, key_id, NULL FROM main.segments;
CREATE TEMP TRIGGER IF NOT EXISTS logged_segments_insert
INSTEAD OF INSERT ON logged_segments
BEGIN
    INSERT INTO segments (last_seq, count, received_ms, payload, key_id)
        VALUES (NEW.last_seq, NEW.count, NEW.received_ms, NEW.payload, NEW.key_id);
    INSERT INTO message_log (message_id, received_ms)
        SELECT value, NEW.received_ms FROM json_each(NEW.ids);
END;
"""
"""A group commit with deduplication writes a segment and logs its ids (appends to
``message_log``: no random B-tree pages). Through this view, which exists on the child's
connection only (TEMP), that is one statement in autocommit mode, atomic like any
statement, instead of BEGIN, two INSERTs and COMMIT."""

LOGGED_INSERT = (
    "INSERT INTO logged_segments (last_seq, count, received_ms, payload, key_id, ids) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)

SEALED_HEADER = b"\x00\x01"
"""How a payload sealed by ``tagrelay.crypto`` starts (a JSON line never does); the key id
follows in the next four bytes. Repeated here: this module runs on the standard library
alone (tests/spool check it against ``tagrelay.crypto``)."""
SEALED_MIN_BYTES = 50
"""``tagrelay.crypto.OVERHEAD_BYTES``: no sealed payload is shorter."""


def key_id_of(payload: bytes) -> bytes | None:
    """The key id a sealed payload names (the ``key_id`` column), None for plaintext."""
    if len(payload) >= SEALED_MIN_BYTES and payload[:2] == SEALED_HEADER:
        return payload[2:6]
    return None


def open_connection(path: str, synchronous: str, max_page_count: int) -> sqlite3.Connection:
    """The appending connection; the relay has created the schema already."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError(f"unknown synchronous mode {synchronous!r}")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    if max_page_count:
        conn.execute(f"PRAGMA max_page_count={int(max_page_count)}")
    conn.executescript(COMMIT_VIEW)
    return conn


def insert(
    conn: sqlite3.Connection,
    last_seq: int,
    count: int,
    received_ms: int,
    payload: bytes,
    ids_json: str | None,
) -> None:
    """One group commit: one statement in autocommit mode, its own transaction."""
    key_id = key_id_of(payload)
    if ids_json is None:
        conn.execute(PLAIN_INSERT, (last_seq, count, received_ms, payload, key_id))
    else:
        conn.execute(LOGGED_INSERT, (last_seq, count, received_ms, payload, key_id, ids_json))


def rewrite(
    conn: sqlite3.Connection, last_seq: int, payload: bytes, old_key_id: bytes | None
) -> int:
    """Replace the payload of segment ``last_seq`` if it is still sealed under
    ``old_key_id`` (None: plaintext): one statement, its own transaction. 1 if it was, 0
    if the segment is gone (pruned) or was rewritten meanwhile."""
    return conn.execute(
        "UPDATE segments SET payload = ?, key_id = ? WHERE last_seq = ? AND key_id IS ?",
        (payload, key_id_of(payload), last_seq, old_key_id),
    ).rowcount


def erase(conn: sqlite3.Connection, last_seq: int, payload: bytes, old_key_id: bytes | None) -> int:
    """``rewrite`` with ``secure_delete`` on: SQLite zeroes the pages (the overflow pages of
    a large payload) the old payload leaves, instead of leaving them free with the erased
    events in them."""
    conn.execute("PRAGMA secure_delete=ON")
    try:
        return rewrite(conn, last_seq, payload, old_key_id)
    finally:
        conn.execute("PRAGMA secure_delete=OFF")


def truncate(conn: sqlite3.Connection) -> int:
    """Copy the WAL into the database and empty it; 1 if it could (no reader held it back
    for the busy timeout), else 0 (the frames are overwritten as the WAL is reused)."""
    busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    return 0 if busy else 1


def checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")


PRUNE_SEGMENTS = (
    "DELETE FROM segments WHERE last_seq IN (SELECT last_seq FROM segments "
    "WHERE last_seq <= COALESCE((SELECT MIN(position) FROM cursors), ?) "
    "AND last_seq < (SELECT MAX(last_seq) FROM segments) ORDER BY last_seq LIMIT ?)"
)
"""The newest segment stays: it remembers the head across restarts."""


def prune_segments(conn: sqlite3.Connection, head: int, chunk: int) -> int:
    return conn.execute(PRUNE_SEGMENTS, (head, chunk)).rowcount


def prune_ids(conn: sqlite3.Connection, upto_id: int) -> int:
    return conn.execute("DELETE FROM message_log WHERE id <= ?", (upto_id,)).rowcount


def reply(sock: socket.socket, status: int, value: int = 0, message: str = "") -> None:
    data = message.encode("utf-8", "replace")
    sock.sendall(REPLY.pack(status, value, len(data)) + data)


def serve(sock: socket.socket, conn: sqlite3.Connection) -> None:
    """Answer frames until the socket closes."""
    stream = sock.makefile("rb")
    while True:
        head = stream.read(REQUEST.size)
        if len(head) < REQUEST.size:
            return  # the relay is gone, or closed the spool
        op, a, b, c, len1, len2 = REQUEST.unpack(head)
        first = stream.read(len1)
        second = stream.read(len2)
        if len(first) < len1 or len(second) < len2:
            return
        try:
            if op == OP_INSERT:
                insert(conn, a, b, c, first, second.decode() if len2 else None)
                reply(sock, OK, a)
            elif op == OP_CHECKPOINT:
                checkpoint(conn)
                reply(sock, OK)
            elif op == OP_PRUNE_SEGMENTS:
                reply(sock, OK, prune_segments(conn, a, b))
            elif op == OP_PRUNE_IDS:
                reply(sock, OK, prune_ids(conn, a))
            elif op == OP_REWRITE:
                reply(sock, OK, rewrite(conn, a, first, second or None))
            elif op == OP_ERASE:
                reply(sock, OK, erase(conn, a, first, second or None))
            elif op == OP_TRUNCATE:
                reply(sock, OK, truncate(conn))
            else:
                reply(sock, FAILED, 0, f"unknown operation {op}")
        except sqlite3.Error as exc:
            reply(sock, SQLITE_ERROR, 0, str(exc))
        except Exception as exc:  # a bug here must fail the commit, not hang the relay
            reply(sock, FAILED, 0, f"{type(exc).__name__}: {exc}")


def main(argv: list[str]) -> int:
    # Ctrl-C and a process-group SIGTERM are the relay's to handle: it finishes its last
    # commits here during its graceful shutdown, then closes the socket, which ends this.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # SQLite gives the files it adds the database's mode (0600); this keeps anything else
    # the child may create private too (``tagrelay.datadir``, which this module cannot
    # import: it runs on the standard library alone). Set before any thread exists.
    os.umask(0o077)
    fd, path, synchronous, max_page_count = int(argv[1]), argv[2], argv[3], int(argv[4])
    with socket.socket(fileno=fd) as sock:
        try:
            conn = open_connection(path, synchronous, max_page_count)
        except (sqlite3.Error, ValueError, OSError) as exc:
            reply(sock, SQLITE_ERROR, 0, f"could not open {path}: {exc}")
            return 1
        reply(sock, OK)
        try:
            serve(sock, conn)
        except OSError:
            pass  # the socket broke: the relay is gone
        finally:
            conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
