"""The embedded spool: a durable queue of events in SQLite (WAL mode).

Ingestion appends; every forwarder reads with its own cursor; events are pruned once every
cursor is past them. The rules this module keeps:

- ``append`` returns only after the events are committed (fsynced with ``synchronous=full``).
  Requests arriving while a commit is in flight wait for the next one and share it (group
  commit): one transaction per round, not per request.
- All SQLite work runs off the event loop. Group commits and the deletes of pruning run in
  a child process of their own (``spool.writer``: a thread would compete with the event
  loop for the GIL); the other writes (cursors, dead letters) on a writer thread, and reads
  on a reader thread, each with its own connection (WAL lets them run together). A
  forwarder process may read the file too (``spool.segments``), without blocking any of
  them.
- Each group commit is stored as one *segment*: a single row holding its events as JSON
  lines, written by a single statement. Events still have their own sequence numbers
  (``seq``, contiguous across segments), which is what cursors, dead letters and depths
  count; segments only make the write cheap (one SQLite step per commit instead of one per
  event).
- A failed commit raises ``SpoolUnavailable`` to every waiter of that round, so nothing that
  was not stored is acknowledged. ``max_size_mb`` turns into ``PRAGMA max_page_count``: a
  full spool fails commits the same way a full disk does.
- Control writes (cursor moves, dead letters, pruning) commit in their own transactions, so
  a full spool can still be drained.
- Deduplication: an event appended with a ``messageId`` stored recently (within the dedup
  window and capacity, see ``spool.dedup``) is not stored again: SDKs resend events whose
  answer they did not see. The stored ids are logged in ``message_log`` in the same
  transaction as their segment, so an event and its id are committed together or not at
  all, and the memory of recent ids is rebuilt from the log at start-up.
- Encryption at rest (``encryption.keys``): each segment is sealed as a whole before it is
  sent to the commit process, each dead letter's event and detail before they are written,
  and both are opened where they are read (``spool.encryption``). A spool holding rows
  sealed under a key not configured (or sealed rows and no key) does not open.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import orjson

from tagrelay.datadir import open_private, private_dir, private_file, tighten
from tagrelay.errors import EncryptionKeyError, SpoolUnavailable
from tagrelay.logthrottle import LogThrottle
from tagrelay.model.subject import Subject
from tagrelay.spool import dead_letters, erasure, rotation
from tagrelay.spool.dead_letters import DeadLetterRow, Selection
from tagrelay.spool.dedup import RecentIds
from tagrelay.spool.encryption import PLAINTEXT, PayloadCipher, check_keys, stored_key_ids
from tagrelay.spool.segments import SELECT_FIRST_RECEIVED, segments_after
from tagrelay.spool.writer import WriterProcess

log = logging.getLogger(__name__)

T = TypeVar("T")

Pending = tuple[Sequence[tuple[int, bytes]], Sequence[str] | None, asyncio.Future[int]]
"""An append waiting for its round: its rows, their message ids, the future it awaits."""

LOCK_WAIT_SECS = 5.0
"""How long ``open`` waits for the spool's lock: a relay that was just killed may leave its
commit process finishing a statement for a moment."""

PRUNE_CHUNK_SEGMENTS = 200
"""Segments deleted per pruning transaction (each costs the commits waiting behind it)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS segments (
    last_seq INTEGER PRIMARY KEY,     -- seq of the segment's last event
    count INTEGER NOT NULL,           -- its events are last_seq - count + 1 .. last_seq
    received_ms INTEGER NOT NULL,     -- when the oldest of them arrived
    payload BLOB NOT NULL,            -- the events: compact JSON, one per line (or sealed)
    key_id BLOB                       -- the key the payload is sealed under; NULL: plaintext
);
CREATE TABLE IF NOT EXISTS cursors (
    forwarder TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    first_failure_ms INTEGER,
    batch_last INTEGER,               -- last seq of the batch the attempts were spent on
    retired_ms INTEGER                -- when its forwarder was removed; NULL while it runs
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    forwarder TEXT NOT NULL,
    seq INTEGER NOT NULL,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    dead_at_ms INTEGER NOT NULL,
    key_id BLOB                       -- the key payload and detail are sealed under, or NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_forwarder ON dead_letters (forwarder, id);
CREATE INDEX IF NOT EXISTS dead_letters_by_time ON dead_letters (dead_at_ms);
CREATE TABLE IF NOT EXISTS message_log (
    id INTEGER PRIMARY KEY,           -- append order, which is commit order
    message_id TEXT NOT NULL,         -- the messageId of a stored event
    received_ms INTEGER NOT NULL
);
"""

LOG_BOUNDS = "SELECT (SELECT MIN(id) FROM message_log), (SELECT MAX(id) FROM message_log)"
"""The first and last logged id. Two subqueries: SQLite answers a lone MIN or MAX from the
ends of the primary key, but scans the whole table for both in one SELECT, which took
~30 ms at 250,000 ids, every second."""


class HeadWatch:
    """Wakes a waiter (on any event loop) once the spool's head reaches a level.

    ``arm(level)`` clears the wake-up and sets the level, then the waiter checks
    ``spool.head`` itself and waits only if it is still below. The appender updates the head
    before it looks at the level: one side or the other always sees the other's write, so
    no commit goes unnoticed.

    A forwarder waiting for a batch to fill asks to be woken at ``position + max_events``,
    not at every commit. Each wake-up of a worker on the delivery thread takes the GIL from
    the event loop while it is busy with requests: woken at each of ~150 commits a second,
    the delivery thread spent 5% of a core (2% now)."""

    __slots__ = ("event", "level", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()
        self.level = 1

    def arm(self, level: int) -> None:
        """Wake up when the head is at least ``level`` (from the waiter's loop)."""
        self.event.clear()
        self.level = level

    def set(self) -> None:
        """Wake up now (from the waiter's loop)."""
        self.event.set()

    async def wait(self) -> None:
        await self.event.wait()

    def notify(self, head: int, loop: asyncio.AbstractEventLoop) -> None:
        """After a commit, from the appenders' ``loop``: wake the waiter if ``head`` has
        reached its level. While its event is still set (the waiter has not re-armed yet),
        setting it again would change nothing but cost a wake-up of the waiter's thread."""
        if head < self.level or self.event.is_set():
            return
        if self.loop is loop:
            self.event.set()
        else:
            self.loop.call_soon_threadsafe(self.event.set)


@dataclass(frozen=True, slots=True)
class SpooledEvent:
    seq: int
    received_ms: int
    payload: bytes


@dataclass(slots=True)
class CursorState:
    """Where a forwarder is, and how its current batch has been failing: ``attempts`` were
    spent on the events up to ``batch_last`` (a retry sends those again, and no event
    committed after them), the first of them at ``first_failure_ms``."""

    position: int
    attempts: int = 0
    first_failure_ms: int | None = None
    batch_last: int | None = None


def lock_path(spool: Path) -> Path:
    """The file a relay holds locked (``flock``) while it has the spool at ``spool`` open."""
    return spool.with_name(spool.name + ".lock")


def _now_ms() -> int:
    return int(time.time() * 1000)


class SqliteSpool:
    """A durable event queue in ``<data_dir>/spool.sqlite3``."""

    spans = True
    """Forwarders that read the file themselves (``reads_spool``) may get spans of it."""
    expires_dead_letters = False
    """The relay's maintenance deletes dead letters past their retention."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "full",
        max_size_mb: int = 0,
        dedup_window_secs: float = 0,
        dedup_capacity: int = 250_000,
        cipher: PayloadCipher = PLAINTEXT,
    ) -> None:
        self.path = path
        self.cipher = cipher
        """Seals what is written and opens what is read (``encryption.keys``)."""
        self.dedup_window_ms = int(dedup_window_secs * 1000)
        self.dedup_capacity = dedup_capacity
        self._recent = RecentIds(dedup_capacity, self.dedup_window_ms)
        self._synchronous = synchronous.upper()
        self._max_size_mb = max_size_mb
        self._max_page_count = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="spool-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="spool-reader")
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="spool-checkpoint")
        self._cconn: sqlite3.Connection | None = None
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._pending: list[Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._watches: list[HeadWatch] = []
        self._head = 0
        self._positions: dict[str, int] = {}
        self._dead_counts: dict[str, int] = {}
        self._closed = False
        self._last_failure: float | None = None
        self._errors = LogThrottle(log)
        self._lock_handle: IO[str] | None = None
        self._commits: WriterProcess | None = None
        self.lock_wait_secs = LOCK_WAIT_SECS
        self.commits = 0
        """Number of append transactions committed (group commit makes it < requests)."""
        self.on_commit: Callable[[float], None] | None = None
        """Called with the seconds each successful group commit took (for metrics)."""
        self.on_reencrypted: Callable[[str, int], None] | None = None
        """Called with a store and a number of events each time key rotation re-encrypts
        some (for metrics)."""
        self._encryption_backlog: rotation.Backlog = {}
        self._rotating: asyncio.Task[rotation.RotationReport] | None = None
        self._erasing: asyncio.Lock | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        private_dir(self.path.parent)
        await self._take_lock()
        # Before SQLite creates it: SQLite gives its -wal and -shm the database's mode.
        private_file(self.path)
        for suffix in ("-wal", "-shm", "-journal"):
            tighten(self.path.with_name(self.path.name + suffix))
        loop = asyncio.get_running_loop()
        try:
            await self._on_writer(self._open_writer)
            await self._start_commits()
            await loop.run_in_executor(self._reader, self._open_reader)
            await loop.run_in_executor(self._checkpointer, self._open_checkpointer)
        except BaseException:
            await self._release()
            raise
        log.info("spool opened", extra={"path": str(self.path), "head": self._head})

    async def _take_lock(self) -> None:
        """One relay per spool: a second one would hand out the same sequence numbers. The
        commit process inherits the lock, so it is free only once that process has exited
        too."""
        handle = os.fdopen(open_private(lock_path(self.path), os.O_RDWR | os.O_APPEND), "a+")
        deadline = time.monotonic() + self.lock_wait_secs
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    handle.close()
                    raise SpoolUnavailable(
                        f"another tagrelay process is using {self.path.parent}; stop it, or "
                        "give this one its own --data-dir"
                    ) from None
                await asyncio.sleep(0.05)
        self._lock_handle = handle

    async def _start_commits(self) -> None:
        assert self._lock_handle is not None
        commits = WriterProcess(
            self.path, self._synchronous, self._max_page_count, self._lock_handle.fileno()
        )
        await commits.start()
        self._commits = commits

    async def _restart_commits(self) -> None:
        """After the commit process failed: whether its last commit reached the disk is
        unknown, so the head and the recent ids are read back from the database before a
        new process takes the next commit."""
        if self._commits is not None:
            await self._commits.close()
            self._commits = None
        self._head = await self._on_writer(self._read_head, self._conn())
        self._recent = RecentIds(self.dedup_capacity, self.dedup_window_ms)
        await self._on_writer(self._load_recent_ids, self._conn())
        await self._start_commits()
        log.warning("restarted the spool's commit process", extra={"head": self._head})

    async def _release(self) -> None:
        if self._commits is not None:
            await self._commits.close()
            self._commits = None
        if self._lock_handle is not None:
            self._lock_handle.close()  # releases the lock
            self._lock_handle = None

    def _open_writer(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        # Checkpoints run on their own connection and thread (``checkpoint``), where they
        # do not hold up group commits.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.executescript(SCHEMA)
        self._migrate(conn)
        check_keys(stored_key_ids(conn), self.cipher, str(self.path))
        if self.cipher.enabled:
            self._encryption_backlog = rotation.backlog(conn, self.cipher.primary_id)
        if self._max_size_mb:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            self._max_page_count = self._max_size_mb * 1024 * 1024 // page_size
            conn.execute(f"PRAGMA max_page_count={self._max_page_count}")
        self._head = self._read_head(conn)
        self._load_recent_ids(conn)
        self._dead_counts = dead_letters.counts(conn)
        self._wconn = conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        """Bring a spool written by an older version up to ``SCHEMA``."""
        columns = {row[1] for row in conn.execute("PRAGMA table_info(cursors)")}
        if "batch_last" not in columns:
            conn.execute("ALTER TABLE cursors ADD COLUMN batch_last INTEGER")
        if "retired_ms" not in columns:
            conn.execute("ALTER TABLE cursors ADD COLUMN retired_ms INTEGER")
        for table in ("segments", "dead_letters"):
            columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if "key_id" not in columns:  # written before encryption at rest: plaintext
                conn.execute(f"ALTER TABLE {table} ADD COLUMN key_id BLOB")
            # Questions about keys read this index, never the rows: ``key_id`` comes after
            # the payload in a row, and reading it there means reading the whole payload.
            conn.execute(f"CREATE INDEX IF NOT EXISTS {table}_by_key ON {table} (key_id)")

    @staticmethod
    def _read_head(conn: sqlite3.Connection) -> int:
        # Pruning always keeps the newest segment, so the head survives a restart; the
        # cursors are a second witness.
        row = conn.execute(
            "SELECT MAX(COALESCE((SELECT MAX(last_seq) FROM segments), 0), "
            "COALESCE((SELECT MAX(position) FROM cursors), 0))"
        ).fetchone()
        return int(row[0])

    def _open_checkpointer(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        self._cconn = conn

    async def checkpoint(self) -> None:
        """Copy committed WAL frames into the database file, so that the WAL stays small.

        The bulk of the copy runs on the checkpoint thread (a PASSIVE checkpoint never
        blocks commits). Then the commit process finishes the few frames committed
        meanwhile: only a checkpoint that reaches the end of the WAL lets the next commit
        start the WAL over, and under steady load only the committer itself can reach that
        end."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._checkpointer, self._checkpoint, self._cconn)
        if self._commits is not None and not self._commits.broken:
            await self._commits.checkpoint()

    @staticmethod
    def _checkpoint(conn: sqlite3.Connection | None) -> None:
        assert conn is not None
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _open_reader(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        self._rconn = conn

    async def close(self) -> None:
        """Finish pending commits, then close the connections."""
        if self._closed:
            return
        self._closed = True
        if self._rotating is not None and not self._rotating.done():
            self._rotating.cancel()  # each row is its own transaction: the rest waits
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._rotating
        while self._flusher is not None and not self._flusher.done():
            await self._flusher
        if self._pending:
            await self._flush()
        if self._commits is not None:
            await self._commits.close()
            self._commits = None
        loop = asyncio.get_running_loop()
        if self._wconn is not None:
            await loop.run_in_executor(self._writer, self._wconn.close)
        if self._rconn is not None:
            await loop.run_in_executor(self._reader, self._rconn.close)
        if self._cconn is not None:
            await loop.run_in_executor(self._checkpointer, self._cconn.close)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        self._checkpointer.shutdown(wait=True)
        await self._release()

    def writable(self, within_secs: float = 5.0) -> bool:
        """Open, and no commit failed in the last ``within_secs`` (for ``/readyz``)."""
        if self._wconn is None or self._closed:
            return False
        return self._last_failure is None or time.monotonic() - self._last_failure > within_secs

    # -- append (group commit) ---------------------------------------------------------

    @property
    def head(self) -> int:
        """The highest committed sequence number."""
        return self._head

    def append(
        self, events: Sequence[tuple[int, bytes]], message_ids: Sequence[str] | None = None
    ) -> Awaitable[int]:
        """Commit ``(received_ms, payload)`` rows; the awaitable returned completes once
        they are durable, with the number stored. (A future, not a coroutine: every
        request awaits it, and a coroutine would be one frame more to create and resume.)

        A payload is one event as compact JSON, which never contains a newline byte. With
        ``message_ids`` (one per row) and a dedup window, a row whose id was already stored
        within the window, or earlier in the same call, is left out (and not counted).
        Awaiting raises ``SpoolUnavailable`` when the commit fails; then none of them is
        stored.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        if self._closed:
            fut.set_exception(SpoolUnavailable("the spool is closed (shutting down)"))
            return fut
        if not events:
            fut.set_result(0)
            return fut
        if not self.dedup_window_ms:
            message_ids = None
        self._pending.append((events, message_ids, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_loop(), name="spool-group-commit")
        return fut

    async def _flush_loop(self) -> None:
        while self._pending:
            await self._flush()

    async def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if self._commits is None or self._commits.broken:
            # Before the dedup check: a restart reads back the ids really stored.
            try:
                await self._restart_commits()
            except SpoolUnavailable as exc:
                self._fail_round(pending, exc)
                return
        received_ms = min(rows[0][0] for rows, _, _ in pending)
        logged: list[str] = []
        if any(ids is not None for _, ids, _ in pending):
            payloads, stored, logged = self._new_events(pending)
        else:
            payloads = [payload for rows, _, _ in pending for _, payload in rows]
            stored = [len(rows) for rows, _, _ in pending]
        try:
            if not payloads:
                head = self._head  # every event was a resend: nothing to write
            else:
                head = await self._commit(
                    received_ms,
                    len(payloads),
                    b"\n".join(payloads),
                    orjson.dumps(logged).decode() if logged else None,
                )
        except SpoolUnavailable as exc:
            self._fail_round(pending, exc)
            return
        if logged:
            self._recent.add_all(logged, received_ms)
        if payloads:
            self._head = head
            self.commits += 1
        for (_, _, fut), count in zip(pending, stored, strict=True):
            if not fut.done():
                fut.set_result(count)
        loop = asyncio.get_running_loop()
        for watch in self._watches:
            watch.notify(head, loop)

    def _fail_round(
        self,
        pending: list[Pending],
        exc: SpoolUnavailable,
    ) -> None:
        # A full disk fails every round until space is freed: one line per interval.
        self._errors.log(logging.ERROR, "commit", "spool commit failed", {"error": str(exc)})
        self._last_failure = time.monotonic()
        for _, _, fut in pending:
            if not fut.done():
                fut.set_exception(exc)

    def _new_events(
        self,
        pending: list[Pending],
    ) -> tuple[list[bytes], list[int], list[str]]:
        """The payloads of one round that are not resends, how many of each request's
        those are, and their ids. The first copy of an id within the round wins. Rounds
        run one after another, so no other round can store an id meanwhile."""
        recent = self._recent
        this_round: set[int] = set()  # hashes, as in RecentIds
        payloads: list[bytes] = []
        stored: list[int] = []
        logged: list[str] = []
        for rows, ids, _ in pending:
            before = len(payloads)
            if ids is None:
                payloads.extend(payload for _, payload in rows)
            elif len(ids) == 1:  # a single event, most requests: no sets to build
                h = hash(ids[0])
                if h not in this_round and ids[0] not in recent:
                    this_round.add(h)
                    payloads.append(rows[0][1])
                    logged.append(ids[0])
            else:
                hashes = set(map(hash, ids))
                if (
                    len(hashes) == len(ids)
                    and recent.new_in(hashes)
                    and this_round.isdisjoint(hashes)
                ):
                    # The common case, no resend: set operations instead of a loop.
                    this_round |= hashes
                    payloads.extend(payload for _, payload in rows)
                    logged.extend(ids)
                    stored.append(len(rows))
                    continue
                for (_, payload), message_id in zip(rows, ids, strict=True):
                    h = hash(message_id)
                    if h in this_round or message_id in recent:
                        continue
                    this_round.add(h)
                    payloads.append(payload)
                    logged.append(message_id)
            stored.append(len(payloads) - before)
        return payloads, stored, logged

    async def _commit(
        self, received_ms: int, count: int, payload: bytes, ids_json: str | None
    ) -> int:
        """Write one segment (and log its ids) in the commit process; the new head."""
        assert self._commits is not None
        started = time.perf_counter()
        last_seq = self._head + count
        payload = self.cipher.seal_segment(last_seq, payload)
        head = await self._commits.insert(last_seq, count, received_ms, payload, ids_json)
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started)
        return head

    # -- cursors -----------------------------------------------------------------------

    def subscribe(self, forwarder: str | None = None) -> HeadWatch:
        """A wake-up for commits (see ``HeadWatch``), first armed for any commit. Call it
        from the loop that will wait on it; it may differ from the appenders'. (Every
        forwarder reads the same sequence here: ``forwarder`` is not needed.)"""
        watch = HeadWatch(asyncio.get_running_loop())
        self._watches = [*self._watches, watch]
        return watch

    def unsubscribe(self, watch: HeadWatch) -> None:
        """Stop waking ``watch`` (a worker that stopped)."""
        self._watches = [w for w in self._watches if w is not watch]

    async def register(self, forwarder: str, start: str = "head") -> CursorState:
        """The cursor of ``forwarder`` (a retired one is taken back as it was). A forwarder
        without one starts at ``start``: ``head``, the current head; ``earliest``, before
        the oldest event the spool still holds."""
        state = await self._on_writer(self._register, forwarder, start)
        self._positions[forwarder] = state.position
        return state

    def _register(self, forwarder: str, start: str) -> CursorState:
        conn = self._conn()
        # One write transaction: pruning (another connection) cannot delete the events an
        # ``earliest`` cursor is placed before between the look and the insert.
        conn.execute("BEGIN IMMEDIATE")
        try:
            position = self._head
            if start == "earliest":
                row = conn.execute(
                    "SELECT last_seq - count FROM segments ORDER BY last_seq LIMIT 1"
                ).fetchone()
                if row is not None:
                    position = min(position, int(row[0]))
            conn.execute(
                "INSERT OR IGNORE INTO cursors (forwarder, position) VALUES (?, ?)",
                (forwarder, position),
            )
            conn.execute("UPDATE cursors SET retired_ms = NULL WHERE forwarder = ?", (forwarder,))
            row = conn.execute(
                "SELECT position, attempts, first_failure_ms, batch_last FROM cursors "
                "WHERE forwarder = ?",
                (forwarder,),
            ).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return CursorState(int(row[0]), int(row[1]), row[2], row[3])

    async def retire_cursors_except(self, keep: set[str]) -> list[str]:
        """Mark the cursors of forwarders not in ``keep`` (no longer configured) as retired
        now, unless they already are: they still hold their events, until
        ``forget_retired_cursors`` forgets them, or ``register`` takes one back. Returns
        the names newly retired."""
        retired = await self._on_writer(self._retire_cursors, keep, _now_ms())
        for name in retired:
            self._positions.pop(name, None)
        return retired

    def _retire_cursors(self, keep: set[str], now_ms: int) -> list[str]:
        conn = self._conn()
        names = [
            r[0] for r in conn.execute("SELECT forwarder FROM cursors WHERE retired_ms IS NULL")
        ]
        retired = [n for n in names if n not in keep]
        for name in retired:
            conn.execute("UPDATE cursors SET retired_ms = ? WHERE forwarder = ?", (now_ms, name))
        return retired

    async def forget_retired_cursors(self, retired_before_ms: int) -> list[str]:
        """Delete the cursors retired before ``retired_before_ms``, so that they stop
        holding events. Returns their names."""
        return await self._on_writer(self._forget_retired, retired_before_ms)

    def _forget_retired(self, retired_before_ms: int) -> list[str]:
        conn = self._conn()
        names = [
            r[0]
            for r in conn.execute(
                "SELECT forwarder FROM cursors WHERE retired_ms IS NOT NULL AND retired_ms < ?",
                (retired_before_ms,),
            )
        ]
        for name in names:
            conn.execute("DELETE FROM cursors WHERE forwarder = ?", (name,))
        return names

    async def drop_cursors_except(self, keep: set[str]) -> list[str]:
        """Forget cursors of forwarders no longer configured, so they stop holding events."""
        dropped = await self._on_writer(self._drop_cursors, keep)
        for name in dropped:
            self._positions.pop(name, None)
        return dropped

    def _drop_cursors(self, keep: set[str]) -> list[str]:
        conn = self._conn()
        names = [r[0] for r in conn.execute("SELECT forwarder FROM cursors")]
        dropped = [n for n in names if n not in keep]
        for name in dropped:
            conn.execute("DELETE FROM cursors WHERE forwarder = ?", (name,))
        return dropped

    def depth(self, forwarder: str) -> int:
        """Events committed but not yet past ``forwarder``'s cursor."""
        position = self._positions.get(forwarder)
        return 0 if position is None else max(0, self._head - position)

    def positions(self) -> dict[str, int]:
        return dict(self._positions)

    def head_of(self, forwarder: str) -> int:
        """The last sequence number ``forwarder`` may read: the head, the same for all."""
        return self._head

    async def leave_loop(self) -> None:
        """Nothing is bound to the delivery loop here (see ``JetStreamSpool``)."""

    async def read(
        self, after: int, limit: int, *, forwarder: str | None = None
    ) -> list[SpooledEvent]:
        """Up to ``limit`` events with ``seq > after``, in order (for any forwarder)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._reader, self._read, after, limit
        )

    def _read(self, after: int, limit: int) -> list[SpooledEvent]:
        assert self._rconn is not None
        out: list[SpooledEvent] = []
        with closing(segments_after(self._rconn, after, self.cipher.open_segment)) as segments:
            for first, received_ms, lines in segments:
                for offset, line in enumerate(lines[: limit - len(out)]):
                    out.append(SpooledEvent(first + offset, received_ms, line))
                if len(out) >= limit:
                    break
        return out

    async def first_received_ms(self, after: int) -> int | None:
        """When the oldest event with ``seq > after`` arrived; None when there is none.
        One row, without the events themselves (for a forwarder that reads the spool file
        itself and only needs to know how long its partial batch has waited)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._reader, self._first_received_ms, after
        )

    def _first_received_ms(self, after: int) -> int | None:
        assert self._rconn is not None
        row = self._rconn.execute(SELECT_FIRST_RECEIVED, (after,)).fetchone()
        return None if row is None else int(row[0])

    async def advance(self, forwarder: str, position: int) -> None:
        """Move the cursor past ``position`` and clear its failure state."""
        await self._on_writer(self._save_cursor, forwarder, CursorState(position))
        self._positions[forwarder] = position

    async def record_failure(self, forwarder: str, state: CursorState) -> None:
        """Persist the retry state of the batch at the cursor (survives restarts)."""
        await self._on_writer(self._save_cursor, forwarder, state)
        self._positions[forwarder] = state.position

    def _save_cursor(self, forwarder: str, state: CursorState) -> None:
        self._conn().execute(
            "UPDATE cursors SET position = ?, attempts = ?, first_failure_ms = ?, "
            "batch_last = ? WHERE forwarder = ?",
            (state.position, state.attempts, state.first_failure_ms, state.batch_last, forwarder),
        )

    # -- dead letters ------------------------------------------------------------------

    async def dead_letter(
        self,
        forwarder: str,
        events: Sequence[SpooledEvent],
        reason: str,
        detail: str,
        attempts: int,
        advance_to: int | CursorState | None = None,
    ) -> None:
        """Store ``events`` as dead letters of ``forwarder`` and, in the same transaction,
        move its cursor to ``advance_to`` when given: a position (a new batch starts
        there), or a state (the rest of a failing batch keeps its retry state)."""
        state = CursorState(advance_to) if isinstance(advance_to, int) else advance_to
        await self._on_writer(self._dead_letter, forwarder, events, reason, detail, attempts, state)
        if state is not None:
            self._positions[forwarder] = state.position

    def _dead_letter(
        self,
        forwarder: str,
        events: Sequence[SpooledEvent],
        reason: str,
        detail: str,
        attempts: int,
        state: CursorState | None,
    ) -> None:
        conn = self._conn()
        now = _now_ms()
        rows = [
            dead_letters.sealed_row(self.cipher, forwarder, e.seq, e.payload, detail)
            for e in events
        ]
        try:
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO dead_letters (forwarder, seq, payload, reason, detail, attempts, "
                "dead_at_ms, key_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (forwarder, e.seq, payload, reason, sealed, attempts, now, kid)
                    for e, (payload, sealed, kid) in zip(events, rows, strict=True)
                ],
            )
            if state is not None:
                self._save_cursor(forwarder, state)  # same transaction
            conn.execute("COMMIT")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        counts = dict(self._dead_counts)  # a new dict: a scrape may be reading the old one
        counts[forwarder] = counts.get(forwarder, 0) + len(events)
        self._dead_counts = counts

    async def dead_letters(
        self,
        forwarder: str | None = None,
        limit: int = 100,
        *,
        selection: Selection | None = None,
        after_id: int = 0,
        newest_first: bool = False,
    ) -> list[DeadLetterRow]:
        """Up to ``limit`` dead letters, by id (``newest_first``: the last ones, newest
        first): of ``forwarder``, or of ``selection``."""
        chosen = selection if selection is not None else Selection(forwarder=forwarder)
        return await self._on_reader(
            lambda conn: dead_letters.select(
                conn,
                chosen,
                after_id=after_id,
                limit=limit,
                newest_first=newest_first,
                cipher=self.cipher,
            )
        )

    async def last_dead_letter_id(self) -> int:
        """The highest dead letter id now (a replay visits none above it)."""
        return await self._on_reader(
            lambda conn: int(
                conn.execute("SELECT COALESCE(MAX(id), 0) FROM dead_letters").fetchone()[0]
            )
        )

    async def dead_letter_by_id(self, dead_letter_id: int) -> DeadLetterRow | None:
        return await self._on_reader(
            lambda conn: dead_letters.get(conn, dead_letter_id, cipher=self.cipher)
        )

    def dead_letter_counts(self) -> dict[str, int]:
        """Dead letters stored now, by forwarder (kept up to date as they are written and
        deleted: read at every scrape, without a query)."""
        return dict(self._dead_counts)

    async def forget_dead_letters(self, ids: Sequence[int]) -> int:
        """Delete the dead letters ``ids`` (replayed and delivered); how many there were."""
        return await self._on_writer(self._dead_letters_deleted, dead_letters.delete_ids, ids)

    async def purge_dead_letters(self, selection: Selection) -> int:
        """Delete every dead letter of ``selection`` (``before_ms``: older than); how many."""
        return await self._on_writer(self._dead_letters_deleted, dead_letters.purge, selection)

    def _dead_letters_deleted(
        self, delete: Callable[[sqlite3.Connection, Any], int], what: Any
    ) -> int:
        conn = self._conn()
        deleted = delete(conn, what)
        if deleted:
            self._dead_counts = dead_letters.counts(conn)
        return deleted

    async def dead_letters_died_again(self, ids: Sequence[int], reason: str, detail: str) -> int:
        """A replay of the dead letters ``ids`` failed: they stay, with ``reason`` and
        ``detail``, one attempt more and now as the time they died."""
        return await self._on_writer(
            lambda: dead_letters.died_again(
                self._conn(), ids, reason, detail, _now_ms(), cipher=self.cipher
            )
        )

    # -- key rotation ------------------------------------------------------------------

    def encryption_backlog(self) -> rotation.Backlog:
        """Events not yet under the first key, by store and state, as last counted (at
        start-up, by rotation, by ``count_encryption_backlog``); empty without keys."""
        return dict(self._encryption_backlog)

    async def count_encryption_backlog(self) -> rotation.Backlog:
        """Count again what ``encryption_backlog`` tells (pruning and purges shrink it).
        Free once it is empty: the relay writes every new row under the first key."""
        if self.cipher.enabled and self._encryption_backlog:
            self._encryption_backlog = await self._on_reader(
                lambda conn: rotation.backlog(conn, self.cipher.primary_id)
            )
        return dict(self._encryption_backlog)

    def rotate_keys(self) -> asyncio.Future[rotation.RotationReport]:
        """Re-encrypt every row not under the first key, in the background (see
        ``spool.rotation``); the future completes with the report. A rotation asked for
        while one runs joins it. Raises ``EncryptionKeyError`` without keys."""
        if not self.cipher.enabled:
            raise EncryptionKeyError(
                "encryption.keys is empty: there is no key to re-encrypt the spool under"
            )
        if self._rotating is None or self._rotating.done():
            self._rotating = asyncio.get_running_loop().create_task(
                self._rotate(), name="spool-key-rotation"
            )
        return asyncio.shield(self._rotating)

    async def _rotate(self) -> rotation.RotationReport:
        primary = self.cipher.primary_id
        assert primary is not None
        report = rotation.RotationReport()
        cipher = self.cipher
        for kid in await self._on_reader(
            lambda conn: rotation.old_key_ids(conn, "segments", primary)
        ):
            after = 0
            while True:
                found = await self._on_reader(
                    functools.partial(rotation.next_segment, cipher=cipher, kid=kid, after=after)
                )
                if found is None:
                    break
                last_seq, count, payload = found
                if await self._commit_process().rewrite(last_seq, payload, kid):
                    report.reencrypted["spool"] += count
                    self._reencrypted("spool", count)
                after = last_seq
        for kid in await self._on_reader(
            lambda conn: rotation.old_key_ids(conn, "dead_letters", primary)
        ):
            after_id = 0
            while True:
                last_id, done = await self._on_writer(
                    rotation.rotate_dead_letters, self._conn(), cipher, kid, after_id
                )
                if last_id == after_id:
                    break
                report.reencrypted["dead_letters"] += done
                self._reencrypted("dead_letters", done)
                after_id = last_id
        report.left = self._encryption_backlog = await self._on_reader(
            lambda conn: rotation.backlog(conn, primary)
        )
        log.info(
            "re-encrypted the spool under the first key",
            extra={
                "events": report.reencrypted["spool"],
                "dead_letters": report.reencrypted["dead_letters"],
            },
        )
        return report

    def _reencrypted(self, store: str, events: int) -> None:
        if events and self.on_reencrypted is not None:
            self.on_reencrypted(store, events)

    # -- erasure and access (``spool.erasure``) -----------------------------------------

    async def erase(self, subject: Subject) -> dict[str, int]:
        """Erase the events of ``subject`` from the segments (one at a time, each rewritten
        by the commit process between two group commits) and its dead letters, then empty
        the WAL: ``{"events": n, "dead_letters": m}``. One erasure at a time."""
        if self._erasing is None:
            self._erasing = asyncio.Lock()
        async with self._erasing:
            events = 0
            after = 0
            while True:
                found = await self._on_reader(
                    functools.partial(
                        erasure.next_to_erase, cipher=self.cipher, subject=subject, after=after
                    )
                )
                if found is None:
                    break
                last_seq, kid, payload, erased = found
                if await self._commit_process().erase(last_seq, payload, kid):
                    events += erased
                    after = last_seq
                # else: rotated meanwhile (read it again), or pruned (not found again)
            letters = await self._on_writer(
                self._dead_letters_deleted,
                lambda conn, who: erasure.erase_dead_letters(conn, self.cipher, who),
                subject,
            )
            await self.checkpoint()
            await self._commit_process().truncate_wal()
        return {"events": events, "dead_letters": letters}

    async def export_subject(self, subject: Subject) -> dict[str, Any]:
        """What the spool holds of ``subject`` (``spool.erasure.export``)."""
        return await self._on_reader(lambda conn: erasure.export(conn, self.cipher, subject))

    # -- pruning -----------------------------------------------------------------------

    async def prune(self, chunk: int = PRUNE_CHUNK_SEGMENTS) -> int:
        """Delete segments every cursor is past, ``chunk`` at a time so that group commits
        interleave with the deletes instead of waiting behind one long transaction.
        Returns how many were deleted."""
        total = 0
        while True:
            deleted = await self._commit_process().prune_segments(self._head, chunk)
            total += deleted
            if deleted < chunk:
                return total

    async def prune_message_ids(self, now_ms: int | None = None, chunk: int = 5000) -> int:
        """Forget logged ids older than the dedup window or beyond its capacity, ``chunk``
        at a time."""
        if not self.dedup_window_ms:
            return 0
        cutoff = (now_ms if now_ms is not None else _now_ms()) - self.dedup_window_ms
        total = 0
        while True:
            upto = await self._on_writer(self._prunable_ids, cutoff, chunk)
            if upto is None:
                return total
            deleted = await self._commit_process().prune_ids(upto)
            total += deleted
            if deleted < chunk:
                return total

    def _commit_process(self) -> WriterProcess:
        """The commit process, for maintenance; when it failed, maintenance waits for the
        next commit to replace it."""
        if self._commits is None or self._commits.broken:
            raise SpoolUnavailable("the spool's commit process is not running")
        return self._commits

    def _prunable_ids(self, cutoff_ms: int, chunk: int) -> int | None:
        """The last logged id to forget in one delete of at most ``chunk``: older than
        the window or beyond the capacity. None when there is none. Reads only: the
        delete runs in the commit process."""
        conn = self._conn()
        first, last = conn.execute(LOG_BOUNDS).fetchone()
        if first is None:
            return None
        # Ids grow with commits, so received_ms grows with them (up to clock steps): find
        # the last row older than the cutoff by bisection on the primary key.
        upto = last - self.dedup_capacity
        lo, hi = max(first, upto + 1), last
        while lo <= hi:
            mid = (lo + hi) // 2
            row = conn.execute(
                "SELECT id, received_ms FROM message_log WHERE id >= ? ORDER BY id LIMIT 1",
                (mid,),
            ).fetchone()
            if row is None or row[1] >= cutoff_ms:
                hi = mid - 1
            else:
                upto = row[0]
                lo = row[0] + 1
        if upto < first:
            return None
        return int(min(upto, first + chunk - 1))

    def _load_recent_ids(self, conn: sqlite3.Connection) -> None:
        if not self.dedup_window_ms:
            return
        cutoff = _now_ms() - self.dedup_window_ms
        last = conn.execute("SELECT MAX(id) FROM message_log").fetchone()[0]
        if last is None:
            return
        rows = conn.execute(
            "SELECT message_id, received_ms FROM message_log WHERE id > ? AND received_ms >= ? "
            "ORDER BY id",
            (last - self.dedup_capacity, cutoff),
        )
        for message_id, received_ms in rows:
            self._recent.add_all((message_id,), received_ms)

    # -- plumbing ----------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        assert self._wconn is not None, "spool is not open"
        return self._wconn

    async def _on_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def read() -> T:
            assert self._rconn is not None, "spool is not open"
            return fn(self._rconn)

        return await asyncio.get_running_loop().run_in_executor(self._reader, read)

    async def _on_writer(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)
        except sqlite3.Error as exc:
            self._errors.log(logging.ERROR, "write", "spool write failed", {"error": str(exc)})
            raise SpoolUnavailable(f"the spool could not commit: {exc}") from exc
