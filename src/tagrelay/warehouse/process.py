"""The warehouse in a process of its own.

Planning a batch (flattening, type checks, conversions) is Python work of tens of
microseconds per event. In the relay's process it would hold the GIL against the event loop:
ingestion would slow down and its tail latency grow with every warehouse batch. So the relay
runs the ``Warehouse`` in a child process (a fresh interpreter, ``python -m
tagrelay.warehouse.process``, with one end of a socket pair) and talks to it over that
socket, one request at a time (pickled frames between two processes of the same program):

``("insert", ndjson_bytes)``         -> ``("ok", InsertResult)``
``("insert_span", spool, after, last)`` -> ``("ok", (InsertResult, arrivals))``
``("query", sql, max_rows, secs)``   -> ``("ok", QueryResult)``
any failure                          -> ``("error", kind, message)``

``insert_span`` loads the events ``after < seq <= last`` of the spool file ``spool``, which
the child reads itself (``tagrelay.spool.segments``, a read-only connection kept open): a
batch then costs the relay one small message each way instead of its events, read, split,
joined and sent on in the relay's process, under its GIL. ``arrivals`` are the events'
``(count, received_ms)`` runs, for the latency metric.

The child holds DuckDB's file lock. It exits when the pipe closes, i.e. when the relay exits
or dies (a SIGKILL included), so a restarted relay finds the file free, after waiting for an
insert still in flight at most. A child that dies is started again on the next request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import orjson

from tagrelay.datadir import CHILD_UMASK
from tagrelay.errors import QueryRejected, WarehouseError
from tagrelay.spool.segments import SpanMissing, open_read_only, read_span
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


def _child_main(conn: Connection) -> None:
    """The child process: open the warehouse, then serve requests until the pipe closes."""
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
            ),
            START_TIMEOUT_SECS,
        )
    except WarehouseError as exc:
        conn.send(("error", "open", str(exc)))
        return
    conn.send(("ok", dict(warehouse.columns)))
    spools = SpoolReaders()
    try:
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                return  # the relay is gone
            conn.send(_serve(warehouse, spools, request))
    finally:
        spools.close()
        warehouse.close()


class SpoolReaders:
    """The child's read-only connections to spool files, opened on first use."""

    def __init__(self) -> None:
        self._connections: dict[str, sqlite3.Connection] = {}

    def read(self, path: str, after: int, last: int) -> tuple[list[bytes], list[tuple[int, int]]]:
        try:
            conn = self._connections.get(path)
            if conn is None:
                conn = self._connections[path] = open_read_only(path)
            return read_span(conn, after, last)
        except (sqlite3.Error, SpanMissing) as exc:
            self.close()  # the next request opens the file again
            raise WarehouseError(f"cannot read events {after + 1}-{last} of {path}: {exc}") from exc

    def close(self) -> None:
        connections, self._connections = self._connections, {}
        for conn in connections.values():
            conn.close()


def _serve(warehouse: Any, spools: SpoolReaders, request: tuple[Any, ...]) -> tuple[Any, ...]:
    try:
        if request[0] == "insert":
            events = [orjson.loads(line) for line in request[1].split(b"\n")]
            return ("ok", warehouse.insert(events))
        if request[0] == "insert_span":
            _, path, after, last = request
            lines, arrivals = spools.read(path, after, last)
            return ("ok", (warehouse.insert([orjson.loads(line) for line in lines]), arrivals))
        if request[0] == "query":
            _, sql, max_rows, timeout_secs = request
            return ("ok", warehouse.query(sql, max_rows, timeout_secs=timeout_secs))
        return ("error", "protocol", f"unknown request {request[0]!r}")
    except QueryRejected as exc:
        return ("error", "rejected", str(exc))
    except WarehouseError as exc:
        return ("error", "warehouse", str(exc))
    except Exception as exc:  # a bug in the child must not kill it silently
        return ("error", "internal", f"{type(exc).__name__}: {exc}")


class WarehouseProcess:
    """The relay's handle on the child. Every method blocks: call them from a thread.
    Calls are serialized (one request on the pipe at a time)."""

    def __init__(self, spec: WarehouseSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self.columns: dict[str, str] = {}

    def start(self) -> None:
        with self._lock:
            self._start()

    def _start(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        # The command is fixed: this interpreter and this module, no outside input.
        proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "tagrelay.warehouse.process", str(child_sock.fileno())],
            pass_fds=[child_sock.fileno()],
            stdin=subprocess.DEVNULL,
        )
        child_sock.close()
        parent = Connection(parent_sock.detach())
        try:
            parent.send(self.spec)
            if not parent.poll(START_TIMEOUT_SECS + 10):
                raise WarehouseError("the warehouse process did not start in time")
            status, *rest = parent.recv()
        except (EOFError, OSError) as exc:
            raise WarehouseError(f"the warehouse process died while starting: {exc}") from exc
        except WarehouseError:
            proc.kill()
            proc.wait()
            raise
        if status != "ok":
            proc.wait(5)
            raise WarehouseError(f"could not open the warehouse: {rest[-1]}")
        self.columns = rest[0]
        self._proc, self._conn = proc, parent

    def _call(self, request: tuple[Any, ...]) -> Any:
        with self._lock:
            if self._conn is None or self._proc is None or self._proc.poll() is not None:
                self._discard()
                self._start()
            assert self._conn is not None
            try:
                self._conn.send(request)
                status, *rest = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._discard()
                raise WarehouseError(f"the warehouse process died: {exc}") from exc
        if status == "ok":
            return rest[0]
        kind, message = rest
        if kind == "rejected":
            raise QueryRejected(message)
        raise WarehouseError(message)

    def insert_lines(self, payload: bytes) -> InsertResult:
        """Load events given as compact JSON, one per line."""
        result: InsertResult = self._call(("insert", payload))
        for name, kind in result.new_columns.items():
            self.columns[name] = kind
        return result

    def insert_span(
        self, spool: str, after: int, last: int
    ) -> tuple[InsertResult, list[tuple[int, int]]]:
        """Load the events ``after < seq <= last`` of the spool file ``spool``, which the
        child reads itself; also returns their ``(count, received_ms)`` runs."""
        result: InsertResult
        arrivals: list[tuple[int, int]]
        result, arrivals = self._call(("insert_span", spool, after, last))
        for name, kind in result.new_columns.items():
            self.columns[name] = kind
        return result, arrivals

    def query(
        self, sql: str, max_rows: int = 10_000, timeout_secs: float | None = 60.0
    ) -> QueryResult:
        result: QueryResult = self._call(("query", sql, max_rows, timeout_secs))
        return result

    def close(self) -> None:
        with self._lock:
            self._discard(graceful=True)

    def _discard(self, graceful: bool = False) -> None:
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
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


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    _child_main(Connection(int(sys.argv[1])))
