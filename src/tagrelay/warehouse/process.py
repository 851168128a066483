"""The warehouse in a process of its own.

Planning a batch (flattening, type checks, conversions) is Python work of tens of
microseconds per event. In the relay's process it would hold the GIL against the event loop:
ingestion would slow down and its tail latency grow with every warehouse batch. So the relay
runs the ``Warehouse`` in a child process (a fresh interpreter, ``python -m
tagrelay.warehouse.process``, with one end of each of two socket pairs) and talks to it over
them (pickled frames between two processes of the same program).

Loads, one request at a time, answered in order:

``("insert", ndjson_bytes)``         -> ``("ok", InsertResult)``
``("insert_span", spool, after, last)`` -> ``("ok", (InsertResult, arrivals))``
``("expire", before)``                 -> ``("ok", rows deleted)`` (``retention_days``)
``("link", subject)``                  -> ``("ok", subject with the ids its rows link)``
``("erase", subject)``                 -> ``("ok", rows deleted)`` (``tagrelay forget``)
``("rows_of", subject)``               -> ``("ok", QueryResult)`` (``tagrelay export``)
any failure                          -> ``("error", kind, message)``

Queries (``tagrelay sql``), on the second pair, so that a slow query never holds up a load:
``(id, sql, max_rows, secs)`` -> ``(id, ("ok", QueryResult))`` or ``(id, ("error", kind,
message))``. The child runs each query on a thread of its own, on a DuckDB cursor of its
own (up to ``MAX_CONCURRENT_QUERIES`` at once), and interrupts it past its time limit
(kind ``"timeout"``); answers come back in the order the queries finish, matched by id.

``insert_span`` loads the events ``after < seq <= last`` of the spool file ``spool``, which
the child reads itself (``tagrelay.spool.segments``, a read-only connection kept open): a
batch then costs the relay one small message each way instead of its events, read, split,
joined and sent on in the relay's process, under its GIL. ``arrivals`` are the events'
``(count, received_ms)`` runs, for the latency metric. A batch is parsed and loaded with
the cyclic garbage collector paused (``collector_paused``); ``IDLE_CHECKPOINT_SECS`` after
the last request the child checkpoints the database (``serve_loads``).

The child holds DuckDB's file lock. It exits when the load pipe closes, i.e. when the relay
exits or dies (a SIGKILL included), interrupting the queries still running, so a restarted
relay finds the file free, after waiting for an insert still in flight at most. A child that
dies is started again on the next request.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import orjson

from tagrelay.crypto import CryptoError
from tagrelay.datadir import CHILD_UMASK
from tagrelay.errors import QueryRejected, QueryTimeout, TagrelayError, WarehouseError
from tagrelay.model.subject import Subject
from tagrelay.spool.encryption import PLAINTEXT, PayloadCipher, cipher_for
from tagrelay.spool.erasure import is_erased
from tagrelay.spool.segments import SealedSegment, SpanMissing, open_read_only, read_span
from tagrelay.warehouse import InsertResult, QueryResult

log = logging.getLogger(__name__)

CHILD_NICENESS = 10
"""How much lower the warehouse process's CPU priority is than the relay's."""

START_TIMEOUT_SECS = 60.0
"""How long to wait for the child to open the database (a previous relay's child may still
be finishing its last insert and holding the file lock)."""


@dataclass(frozen=True)
class WarehouseSpec:
    """What the child needs to open the warehouse (picklable)."""

    dialect: str
    target: str
    table: str
    max_columns: int
    settings: Mapping[str, str | int | bool]
    encryption_keys: tuple[str, ...] = field(default=(), repr=False)
    """``encryption.keys``: the child opens the spool's sealed segments with them (sent
    in this frame over the socket pair, never on the command line)."""
    hash_pii_salt: str | None = field(default=None, repr=False)
    """``hash_pii_salt`` when ``hash_pii`` is on (``tagrelay.warehouse.pii``)."""


IOPRIO_CLASS_IDLE = 3
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_WHO_PROCESS = 1
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}
"""``ioprio_set`` by machine; Python has no wrapper for it."""


def _lower_io_priority() -> bool:
    """Put this process in the idle I/O class (Linux): its reads and writes are served
    when no other process of the machine waits for the disk. Best effort: False where the
    call is not available or refused (the warehouse then works at the normal priority).
    Only the BFQ disk scheduler acts on I/O classes; under ``none`` and ``mq-deadline``
    (common on virtual and NVMe disks) the call succeeds and changes nothing."""
    number = _SYS_IOPRIO_SET.get(os.uname().machine)
    if sys.platform != "linux" or number is None:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        done = libc.syscall(
            number, _IOPRIO_WHO_PROCESS, 0, IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT
        )
    except (OSError, AttributeError):
        return False
    return bool(done == 0)


def _child_main(conn: Connection, queries: Connection) -> None:
    """The child process: open the warehouse, then serve loads on ``conn`` until it closes,
    and queries on ``queries`` meanwhile."""
    # Ctrl-C and a process-group SIGTERM are the relay's to handle: it flushes its last batch
    # here, then closes the pipe, which is what ends this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # DuckDB creates its write-ahead log and spill files with the process's umask: private
    # (``tagrelay.datadir``). Safe here, unlike in the relay: no other thread exists yet.
    os.umask(CHILD_UMASK)
    # When the machine is busy, answering clients matters more than loading the warehouse,
    # whose backlog waits on disk in the spool: the kernel favours the relay's process.
    os.nice(CHILD_NICENESS)
    # The same for the disk: its checkpoints write megabytes, which would otherwise queue
    # ahead of the spool's fsync that every acknowledgement waits for.
    _lower_io_priority()
    # the child is the one that loads DuckDB
    from tagrelay.warehouse import Warehouse, open_when_unlocked

    try:
        spec: WarehouseSpec = conn.recv()
    except (EOFError, OSError):
        return
    try:
        warehouse = open_when_unlocked(
            lambda: Warehouse.open(
                spec.dialect,
                spec.target,
                table=spec.table,
                max_columns=spec.max_columns,
                settings=dict(spec.settings),
                hash_pii_salt=None if spec.hash_pii_salt is None else spec.hash_pii_salt.encode(),
            ),
            START_TIMEOUT_SECS,
        )
    except WarehouseError as exc:
        conn.send(("error", "open", str(exc)))
        return
    conn.send(("ok", dict(warehouse.columns)))
    QueryServer(warehouse, queries).start()
    spools = SpoolReaders(cipher_for(spec.encryption_keys))
    try:
        serve_loads(conn, warehouse, spools)
    finally:
        spools.close()
        warehouse.close()  # interrupts the queries still running


def serve_loads(
    conn: Connection, warehouse: Any, spools: SpoolReaders, idle_secs: float | None = None
) -> None:
    """Answer the requests on ``conn`` until it closes; once a request has been served and
    ``idle_secs`` (default ``IDLE_CHECKPOINT_SECS``) pass without another, checkpoint."""
    idle = IDLE_CHECKPOINT_SECS if idle_secs is None else idle_secs
    unsaved = False
    while True:
        try:
            if unsaved and not conn.poll(idle):
                _checkpoint(warehouse)
                unsaved = False
                continue
            request = conn.recv()
        except (EOFError, OSError):
            return  # the relay is gone
        conn.send(_serve(warehouse, spools, request))
        unsaved = True


IDLE_CHECKPOINT_SECS = 5.0
"""After a load, how long without a request before the child checkpoints the database."""


def _checkpoint(warehouse: Any) -> None:
    """Write what the database holds only in its log to its file, and free the memory it
    held there: with a large ``checkpoint_threshold`` (``forwarders.warehouse``) DuckDB
    would otherwise keep up to that much of the last loads in memory while the relay is
    quiet. Best effort: a failure is logged, and the next load or checkpoint tries again."""
    try:
        warehouse.checkpoint()
    except WarehouseError:
        log.warning("warehouse: checkpoint failed", exc_info=True)


class SpoolReaders:
    """The child's read-only connections to spool files, opened on first use."""

    def __init__(self, cipher: PayloadCipher = PLAINTEXT) -> None:
        self._connections: dict[str, sqlite3.Connection] = {}
        self._cipher = cipher

    def read(self, path: str, after: int, last: int) -> tuple[list[bytes], list[tuple[int, int]]]:
        try:
            conn = self._connections.get(path)
            if conn is None:
                conn = self._connections[path] = open_read_only(path)
            return read_span(conn, after, last, self._cipher.open_segment)
        except (sqlite3.Error, SpanMissing, SealedSegment, CryptoError, TagrelayError) as exc:
            self.close()  # the next request opens the file again
            raise WarehouseError(f"cannot read events {after + 1}-{last} of {path}: {exc}") from exc

    def close(self) -> None:
        connections, self._connections = self._connections, {}
        for conn in connections.values():
            conn.close()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Load a batch without the cyclic garbage collector. A batch is tens of thousands of
    fresh dicts and tuples, alive until it is stored: each collection triggered on the way
    walks all of them to find nothing (parsed JSON and the planner's values hold no
    cycles), which cost 15-20% of a 5,000-event load (``bench/warehouse_bench.py``). They
    are freed by their reference counts when the batch ends; the collector runs again
    between batches."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _serve(warehouse: Any, spools: SpoolReaders, request: tuple[Any, ...]) -> tuple[Any, ...]:
    try:
        if request[0] == "insert":
            with collector_paused():
                events = [orjson.loads(line) for line in request[1].split(b"\n")]
                return ("ok", warehouse.insert(events))
        if request[0] == "insert_span":
            _, path, after, last = request
            with collector_paused():
                lines, arrivals = spools.read(path, after, last)
                events = [orjson.loads(line) for line in lines if not is_erased(line)]
                return ("ok", (warehouse.insert(events), arrivals))
        if request[0] == "expire":
            return ("ok", warehouse.expire(request[1]))
        if request[0] == "link":
            return ("ok", warehouse.link(request[1]))
        if request[0] == "erase":
            return ("ok", warehouse.erase(request[1]))
        if request[0] == "rows_of":
            return ("ok", warehouse.rows_of(request[1]))
        return ("error", "protocol", f"unknown request {request[0]!r}")
    except WarehouseError as exc:
        return ("error", "warehouse", str(exc))
    except Exception as exc:  # a bug in the child must not kill it silently
        return ("error", "internal", f"{type(exc).__name__}: {exc}")


MAX_CONCURRENT_QUERIES = 4
"""Queries the child runs at once; more wait for a free slot (their time limit starts when
they run)."""


class QueryServer:
    """The child's side of the query channel: one thread receives, each query runs on a
    thread of its own (``Warehouse.query``: a cursor of its own, interrupted at its time
    limit), answers are sent as they finish. Daemon threads: the process exits when the
    load pipe closes, after ``Warehouse.close`` has interrupted what still runs."""

    def __init__(self, warehouse: Any, conn: Connection) -> None:
        self.warehouse = warehouse
        self.conn = conn
        self._send_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT_QUERIES)

    def start(self) -> None:
        threading.Thread(target=self._receive, name="queries", daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                query_id, sql, max_rows, timeout_secs = self.conn.recv()
            except (EOFError, OSError):
                return  # the relay is gone
            self._slots.acquire()
            threading.Thread(
                target=self._answer,
                args=(query_id, sql, max_rows, timeout_secs),
                name=f"query-{query_id}",
                daemon=True,
            ).start()

    def _answer(self, query_id: int, sql: str, max_rows: int, timeout_secs: float | None) -> None:
        try:
            reply = _run_query(self.warehouse, sql, max_rows, timeout_secs)
        finally:
            self._slots.release()
        with self._send_lock, contextlib.suppress(OSError):
            self.conn.send((query_id, reply))


def _run_query(
    warehouse: Any, sql: str, max_rows: int, timeout_secs: float | None
) -> tuple[Any, ...]:
    try:
        return ("ok", warehouse.query(sql, max_rows, timeout_secs=timeout_secs))
    except QueryRejected as exc:
        return ("error", "rejected", str(exc))
    except QueryTimeout as exc:
        return ("error", "timeout", str(exc))
    except WarehouseError as exc:
        return ("error", "warehouse", str(exc))
    except Exception as exc:  # a bug in the child must not kill it silently
        return ("error", "internal", f"{type(exc).__name__}: {exc}")


ANSWER_GRACE_SECS = 30.0
"""How long past a query's time limit the relay waits for the child's answer (an interrupt
is honoured within moments) before giving up on it."""


class QueryChannel:
    """The relay's side of the query channel of one child: any thread may ``ask``; one
    reader thread hands each answer to the thread waiting for it. When the child exits the
    reader sees the channel close and fails every query still waiting."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._pending: dict[int, Future[tuple[Any, ...]]] = {}
        self._ids = itertools.count(1)
        self.open = True
        self._reader = threading.Thread(
            target=self._read, name="tagrelay-warehouse-queries", daemon=True
        )
        self._reader.start()

    def ask(self, sql: str, max_rows: int, timeout_secs: float | None) -> Any:
        """Run the query in the child; its result, or the error it raised there."""
        answer: Future[tuple[Any, ...]] = Future()
        with self._lock:
            if not self.open:
                raise WarehouseError("the warehouse process has exited; ask again")
            query_id = next(self._ids)
            self._pending[query_id] = answer
            try:
                self._conn.send((query_id, sql, max_rows, timeout_secs))
            except OSError as exc:
                del self._pending[query_id]
                raise WarehouseError(f"the warehouse process died: {exc}") from exc
        wait = None if timeout_secs is None else timeout_secs + ANSWER_GRACE_SECS
        try:
            status, *rest = answer.result(wait)
        except TimeoutError:
            with self._lock:
                self._pending.pop(query_id, None)
            raise QueryTimeout(
                f"the warehouse process did not answer within {wait} s; the query may still "
                "be running there"
            ) from None
        if status == "ok":
            return rest[0]
        kind, message = rest
        if kind == "rejected":
            raise QueryRejected(message)
        if kind == "timeout":
            raise QueryTimeout(message)
        raise WarehouseError(message)

    def _read(self) -> None:
        while True:
            try:
                query_id, reply = self._conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                answer = self._pending.pop(query_id, None)
            if answer is not None:
                answer.set_result(reply)
        with self._lock:
            self.open = False
            pending, self._pending = self._pending, {}
        ended = ("error", "warehouse", "the warehouse process exited during the query")
        for answer in pending.values():
            answer.set_result(ended)
        self._conn.close()

    def join(self, timeout: float) -> None:
        """Wait for the reader to end (after the child has exited)."""
        self._reader.join(timeout)


class WarehouseProcess:
    """The relay's handle on the child. Every method blocks: call them from a thread.
    Loads are serialized (one request on the load pipe at a time); queries run alongside
    them and alongside each other."""

    def __init__(self, spec: WarehouseSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        """Held for a load, and to start or discard the child."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._queries: QueryChannel | None = None
        self.columns: dict[str, str] = {}

    def start(self) -> None:
        with self._lock:
            self._start()

    def _start(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        parent_queries, child_queries = socket.socketpair()
        fds = [child_sock.fileno(), child_queries.fileno()]
        # The command is fixed: this interpreter and this module, no outside input.
        proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "tagrelay.warehouse.process", *map(str, fds)],
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
        )
        child_sock.close()
        child_queries.close()
        parent = Connection(parent_sock.detach())
        queries = Connection(parent_queries.detach())
        try:
            parent.send(self.spec)
            if not parent.poll(START_TIMEOUT_SECS + 10):
                raise WarehouseError("the warehouse process did not start in time")
            status, *rest = parent.recv()
        except (EOFError, OSError) as exc:
            queries.close()
            raise WarehouseError(f"the warehouse process died while starting: {exc}") from exc
        except WarehouseError:
            queries.close()
            proc.kill()
            proc.wait()
            raise
        if status != "ok":
            queries.close()
            proc.wait(5)
            raise WarehouseError(f"could not open the warehouse: {rest[-1]}")
        self.columns = rest[0]
        self._proc, self._conn = proc, parent
        self._queries = QueryChannel(queries)

    def _running(self) -> None:
        """Start the child if it is not running (with ``_lock`` held)."""
        if self._conn is None or self._proc is None or self._proc.poll() is not None:
            self._discard()
            self._start()

    def _call(self, request: tuple[Any, ...]) -> Any:
        with self._lock:
            self._running()
            assert self._conn is not None
            try:
                self._conn.send(request)
                status, *rest = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._discard()
                raise WarehouseError(f"the warehouse process died: {exc}") from exc
        if status == "ok":
            return rest[0]
        raise WarehouseError(rest[1])

    def insert_lines(self, payload: bytes) -> InsertResult:
        """Load events given as compact JSON, one per line."""
        result: InsertResult = self._call(("insert", payload))
        self.columns.update(result.new_columns)
        self.columns.update(result.widened_columns)
        return result

    def insert_span(
        self, spool: str, after: int, last: int
    ) -> tuple[InsertResult, list[tuple[int, int]]]:
        """Load the events ``after < seq <= last`` of the spool file ``spool``, which the
        child reads itself; also returns their ``(count, received_ms)`` runs."""
        result: InsertResult
        arrivals: list[tuple[int, int]]
        result, arrivals = self._call(("insert_span", spool, after, last))
        self.columns.update(result.new_columns)
        self.columns.update(result.widened_columns)
        return result, arrivals

    def expire(self, before: str) -> int:
        """Delete the rows received before ``before`` (ISO-8601); how many were."""
        deleted: int = self._call(("expire", before))
        return deleted

    def link(self, subject: Subject) -> Subject:
        """``Warehouse.link`` in the child (after the load in flight)."""
        linked: Subject = self._call(("link", subject))
        return linked

    def erase(self, subject: Subject) -> int:
        """``Warehouse.erase`` in the child; how many rows were deleted."""
        deleted: int = self._call(("erase", subject))
        return deleted

    def rows_of(self, subject: Subject) -> QueryResult:
        """``Warehouse.rows_of`` in the child."""
        rows: QueryResult = self._call(("rows_of", subject))
        return rows

    def query(
        self, sql: str, max_rows: int = 10_000, timeout_secs: float | None = 60.0
    ) -> QueryResult:
        """``Warehouse.query`` in the child, alongside the loads: raises ``QueryRejected``,
        ``QueryTimeout`` (interrupted past ``timeout_secs``) or ``WarehouseError``."""
        queries, proc = self._queries, self._proc
        if queries is None or not queries.open or proc is None or proc.poll() is not None:
            with self._lock:  # the child is gone: start it again (after a load in flight)
                self._running()
                queries = self._queries
            assert queries is not None
        result: QueryResult = queries.ask(sql, max_rows, timeout_secs)
        return result

    def close(self) -> None:
        with self._lock:
            self._discard(graceful=True)

    def _discard(self, graceful: bool = False) -> None:
        conn, proc, queries = self._conn, self._proc, self._queries
        self._conn = self._proc = self._queries = None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()  # the child sees EOF, closes the database and exits
        if proc is not None:
            try:
                proc.wait(30 if graceful else 1)
            except subprocess.TimeoutExpired:
                log.warning("the warehouse process did not exit; killing it")
                proc.kill()
                proc.wait(5)
        if queries is not None:
            queries.join(5)  # the child's exit closed its end: the reader has ended


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    _child_main(Connection(int(sys.argv[1])), Connection(int(sys.argv[2])))
