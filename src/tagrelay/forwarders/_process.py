"""The delivery process: the forwarders that call HTTP APIs, in a process of their own.

Turning an event into a platform's request is Python work: finding, normalizing and hashing
user data, reading commerce fields, laying out the payload, tens of microseconds per event
and per forwarder. On a thread of the relay's process that work holds the interpreter
against the event loop that answers clients: with GA4 and three ad platforms, ingest fell
to about a third of its rate with the warehouse alone (bench/README.md, "Fan-out"). So, as
the warehouse has its process, the HTTP forwarders share one: ``python -m
tagrelay.forwarders._process`` (``delivery.process``, on by default), started by the relay
with one end of a socket pair.

What stays in the relay: each forwarder's worker (``_worker.ForwarderWorker``: its cursor,
batching, retries and backoff, dead letters, the runtime's metrics), with a
``RemoteForwarder`` in place of the forwarder. The worker hands it batches as spans of the
spool (``after < seq <= last``); the delivery process reads those events from the spool
file itself, applies the forwarder's filter and consent rule, runs the real forwarder and
answers with a ``SpanResult``: the outcome, which events of the span the forwarder was
given (its indexes refer to them), how many were filtered out or had no consent, when
they arrived, and the counts the forwarders made on their own metrics (counters only),
which the relay adds to its registry. Log records of the delivery process are sent over
too and logged by the relay, with its handlers and format.

Frames, both ways: a 4-byte big-endian length, then a pickle (two processes of the same
program; nothing from outside is ever unpickled):

relay -> child: ``("start", StartSpec)`` once, then ``("deliver", id, forwarder_id, path,
after, last)`` and ``("deliver_events", id, forwarder_id, [stored JSON, ...])`` (events
from elsewhere than the spool, e.g. dead letters replayed), answered in any order,
``("configure", id, [forwarder config, ...], log_level)`` (a reload: the forwarders to run
from now on; those removed or changed are closed once their deliveries in flight are
answered, the new and changed ones started), and ``("capture_rate", rate)`` whenever the
debug view's capture rate changes (a view connects or the last one leaves;
``tagrelay.capture``), and after a start when it is not 0;
child -> relay: ``("started", {forwarder_id: error text or None})``, ``("result", id,
SpanResult)``, ``("configured", id, {forwarder_id started: error text or None})``, ``("log",
record fields)``, and, only while the rate is not 0, ``("capture", kind, record)``: a
request a forwarder sent and its answer, already redacted with the forwarder's secrets.

The child ends when its socket closes (the relay stops it, exits or dies): it closes the
forwarders and exits. A child that dies fails the deliveries in flight, which the workers
retry (``Retry("delivery_process")``), and is started again on the next delivery; a batch
that was partly sent is sent again, and the platforms deduplicate by event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
from prometheus_client import Counter

from tagrelay.capture import DeliveryCapture, sampled
from tagrelay.config.common import ForwarderConfigBase
from tagrelay.forwarders._base import Forwarder, ForwarderContext, SpanDelivery, SpoolSpan
from tagrelay.metrics import Metrics
from tagrelay.model import Delivered, Event, Outcome, Retry

if TYPE_CHECKING:
    from tagrelay.identity_store import StoreSettings

log = logging.getLogger(__name__)

FRAME = struct.Struct("!I")

START_TIMEOUT_SECS = 60.0
"""How long the delivery process may take to import the forwarders and start them (token
providers read key files; nothing is fetched before the first delivery)."""

EXIT_TIMEOUT_SECS = 10.0
"""How long ``close`` waits for the child to close its forwarders and exit."""

PROCESS_RETRY_REASON = "delivery_process"
"""The retry reason of a batch whose delivery the delivery process could not finish (it
died, or could not be started)."""


class DeliveryProcessError(RuntimeError):
    """The delivery process is not there to deliver (it died, or did not start)."""


@dataclass(frozen=True)
class StartSpec:
    """What the child needs to start the forwarders (picklable)."""

    data_dir: Path
    forwarders: Sequence[ForwarderConfigBase]
    niceness: int
    log_level: int
    encryption_keys: tuple[str, ...] = field(default=(), repr=False)
    """``encryption.keys``: the child opens the spool's sealed segments with them. They
    reach it in this frame, over the socket pair: never on its command line."""
    identity: StoreSettings | None = None
    """How to open the identity store (``ForwarderContext.identity``)."""


@dataclass(frozen=True, slots=True)
class SpanResult:
    """What the delivery process did with one span (see the module docstring)."""

    outcome: Outcome
    kept: Sequence[int] | None = None
    """Indexes in the span of the events the forwarder was given, when some were filtered
    out or had no consent; None: all of them. The outcome's indexes refer to these."""
    filtered: int = 0
    denied: int = 0
    arrivals: Sequence[tuple[int, int]] = ()
    """``(count, received_ms)`` runs of the events given to the forwarder, in order."""
    counts: Sequence[tuple[str, Mapping[str, str], float]] = field(default_factory=tuple)
    """``(Metrics attribute, labels, increment)`` for the counters the forwarders
    increased in the child since its previous answer."""
    captured: Sequence[tuple[int, object, str | None]] | None = None
    """While the debug view captures: ``SpanDelivery.captured``."""


def frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = FRAME.unpack(await reader.readexactly(FRAME.size))
    return pickle.loads(await reader.readexactly(size))  # noqa: S301 - our own child


# -- counting: the child's counters, added to the relay's -----------------------------------


class CounterDeltas:
    """The increments of every counter of a ``Metrics`` since the previous ``take``."""

    def __init__(self, metrics: Metrics) -> None:
        self._counters = [(name, c) for name, c in vars(metrics).items() if isinstance(c, Counter)]
        self._seen: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def take(self) -> list[tuple[str, dict[str, str], float]]:
        out: list[tuple[str, dict[str, str], float]] = []
        for name, counter in self._counters:
            for family in counter.collect():
                for sample in family.samples:
                    if not sample.name.endswith("_total"):
                        continue
                    key = (name, tuple(sorted(sample.labels.items())))
                    delta = sample.value - self._seen.get(key, 0.0)
                    if delta:
                        self._seen[key] = sample.value
                        out.append((name, dict(sample.labels), delta))
        return out


def add_counts(metrics: Metrics, counts: Iterable[tuple[str, Mapping[str, str], float]]) -> None:
    for name, labels, delta in counts:
        counter = getattr(metrics, name, None)
        if isinstance(counter, Counter):
            if labels:
                counter.labels(**labels).inc(delta)
            else:
                counter.inc(delta)


# -- logging: the child's records, logged by the relay ---------------------------------------

_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """A log record as plain fields: its message formatted, its traceback as text, and the
    ``extra=`` fields a forwarder passed (as text when they do not pickle)."""
    fields: dict[str, Any] = {
        "name": record.name,
        "levelno": record.levelno,
        "levelname": record.levelname,
        "msg": record.getMessage(),
        "created": record.created,
        "pathname": record.pathname,
        "lineno": record.lineno,
        "funcName": record.funcName,
        "process": record.process,
        "processName": "delivery",
    }
    if record.exc_info:
        fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
    elif record.exc_text:
        fields["exc_text"] = record.exc_text
    for key, value in vars(record).items():
        if key not in _RECORD_FIELDS:
            fields[key] = value if isinstance(value, str | int | float | bool) else str(value)
    return fields


def log_record(fields: Mapping[str, Any]) -> None:
    """Log, in the relay, a record the delivery process sent."""
    logger = logging.getLogger(str(fields.get("name", __name__)))
    levelno = int(fields.get("levelno", logging.INFO))
    if logger.isEnabledFor(levelno):
        logger.handle(logging.makeLogRecord(dict(fields)))


# -- the relay's side ------------------------------------------------------------------------


class DeliveryProcess:
    """The relay's handle on the delivery process. Used from one event loop (the delivery
    loop's thread): ``start``, ``deliver`` from any number of workers at once, ``close``."""

    def __init__(
        self,
        forwarders: Sequence[ForwarderConfigBase],
        data_dir: Path,
        metrics: Metrics,
        *,
        niceness: int = 0,
        encryption_keys: tuple[str, ...] = (),
        identity: StoreSettings | None = None,
    ) -> None:
        self.spec = StartSpec(
            data_dir=data_dir,
            forwarders=tuple(forwarders),
            niceness=niceness,
            log_level=logging.getLogger().getEffectiveLevel(),
            encryption_keys=encryption_keys,
            identity=identity,
        )
        self.metrics = metrics
        self.start_errors: dict[str, str | None] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._lock: asyncio.Lock | None = None
        self.starts = 0
        """How many times a child was started (a restart after a crash counts)."""
        self.capture_rate = 0.0
        """The debug view's capture rate, as last told to the child (``set_capture_rate``)."""
        self.on_capture: Callable[[str, dict[str, Any]], None] | None = None
        """Given each record the child captured (``tagrelay.capture``)."""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return (
            self._writer is not None
            and self._proc is not None
            and self._proc.poll() is None
            and self._reader_task is not None
            and not self._reader_task.done()
        )

    async def start(self) -> None:
        """Start the child (if it is not running) and its forwarders."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if not self.running:
                await self._discard()
                await self._spawn()

    async def _spawn(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        # The command is fixed: this interpreter and this module, no outside input.
        proc = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-m", "tagrelay.forwarders._process", str(fd)],
            pass_fds=[fd],
            stdin=subprocess.DEVNULL,
        )
        child_sock.close()
        self._proc = proc
        self.starts += 1
        if self.starts > 1:
            self.metrics.delivery_process_restarts.inc()
        reader, writer = await asyncio.open_connection(sock=parent_sock)
        self._writer = writer
        try:
            writer.write(frame(("start", self.spec)))
            await writer.drain()
            errors = await asyncio.wait_for(self._started(reader), START_TIMEOUT_SECS)
        except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError) as exc:
            await self._discard()
            what = "did not start in time" if isinstance(exc, TimeoutError) else "died"
            raise DeliveryProcessError(f"the delivery process {what} while starting") from exc
        self.start_errors = errors
        self._reader_task = asyncio.create_task(self._read(reader), name="delivery-process")
        if self.capture_rate:
            writer.write(frame(("capture_rate", self.capture_rate)))

    async def _started(self, reader: asyncio.StreamReader) -> dict[str, str | None]:
        while True:
            message = await read_frame(reader)
            if message[0] == "log":
                log_record(message[1])
            elif message[0] == "started":
                errors: dict[str, str | None] = message[1]
                return errors

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await read_frame(reader)
                kind = message[0]
                if kind in ("result", "configured"):
                    _, request_id, result = message
                    future = self._pending.pop(request_id, None)
                    if future is not None and not future.done():
                        future.set_result(result)
                elif kind == "log":
                    log_record(message[1])
                elif kind == "capture" and self.on_capture is not None:
                    self.on_capture(message[1], message[2])
        except (asyncio.IncompleteReadError, OSError, EOFError):
            pass
        except Exception:
            log.exception("unreadable frame from the delivery process")
        finally:
            pending, self._pending = self._pending, {}
            for future in pending.values():
                if not future.done():
                    future.set_exception(
                        DeliveryProcessError("the delivery process exited during the delivery")
                    )

    async def set_capture_rate(self, rate: float) -> None:
        """Tell the child the debug view's capture rate (0: capture nothing); a child
        started later is told at its start."""
        self.capture_rate = rate
        writer = self._writer
        if writer is None or not self.running:
            return
        with contextlib.suppress(OSError, RuntimeError):  # gone: told when started again
            writer.write(frame(("capture_rate", rate)))
            await writer.drain()

    async def deliver(self, forwarder_id: str, span: SpoolSpan) -> SpanResult:
        """Have the forwarder ``forwarder_id`` deliver ``span`` in the child (started again
        first if it is not running). Raises ``DeliveryProcessError`` when it cannot."""
        return await self._ask(("deliver", forwarder_id, str(span.path), span.after, span.last))

    async def deliver_events(self, forwarder_id: str, payloads: Sequence[bytes]) -> SpanResult:
        """Have the forwarder ``forwarder_id`` deliver the events given as their stored JSON
        (dead letters replayed, say), as they are: no filter or consent rule is applied."""
        return await self._ask(("deliver_events", forwarder_id, list(payloads)))

    async def configure(self, forwarders: Sequence[ForwarderConfigBase]) -> None:
        """Run ``forwarders`` from now on (a reload): the child closes those removed or
        changed once their deliveries in flight are answered, and starts the new and
        changed ones (``start_errors`` then has their errors). Stop the workers of those
        removed or changed first. A child not running now is started with them (a restart
        after a crash too)."""
        self.spec = replace(
            self.spec,
            forwarders=tuple(forwarders),
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # not while it starts (with the new spec, then)
            running = self.running
        if not running:
            return
        try:
            errors: dict[str, str | None] = await self._request(
                ("configure", list(forwarders), self.spec.log_level)
            )
        except DeliveryProcessError:
            return  # it died: started again with the new spec on the next delivery
        ids = {f.id for f in forwarders}
        self.start_errors = {
            **{k: v for k, v in self.start_errors.items() if k in ids},
            **errors,
        }

    async def _ask(self, request: tuple[Any, ...]) -> SpanResult:
        if not self.running:
            log.warning("starting the delivery process again")
            await self.start()
        result: SpanResult = await self._request(request)
        add_counts(self.metrics, result.counts)
        return result

    async def _request(self, request: tuple[Any, ...]) -> Any:
        writer = self._writer
        if writer is None:
            raise DeliveryProcessError("the delivery process is not running")
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            writer.write(frame((request[0], request_id, *request[1:])))
            await writer.drain()
        except (OSError, RuntimeError) as exc:
            self._pending.pop(request_id, None)
            raise DeliveryProcessError(f"the delivery process is gone: {exc}") from exc
        return await future

    async def close(self) -> None:
        """Close the socket (the child closes its forwarders and exits) and wait for it."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            await self._discard(graceful=True)

    async def _discard(self, graceful: bool = False) -> None:
        writer, proc, task = self._writer, self._proc, self._reader_task
        self._writer = self._proc = self._reader_task = None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        if proc is not None:
            try:
                await asyncio.to_thread(proc.wait, EXIT_TIMEOUT_SECS if graceful else 1.0)
            except subprocess.TimeoutExpired:
                log.warning("the delivery process did not exit; killing it")
                proc.kill()
                await asyncio.to_thread(proc.wait, 5.0)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class RemoteForwarder(Forwarder[ForwarderConfigBase]):
    """In the relay, the stand-in of a forwarder that runs in the delivery process. Its
    worker hands it spans; it has them delivered there. Made per forwarder class by
    ``remote_class`` (the worker reads the class's ``max_event_age_secs``)."""

    reads_spool = True
    filters_spans = True
    real: ClassVar[type[Forwarder]]  # type: ignore[type-arg]

    def __init__(
        self, config: ForwarderConfigBase, context: ForwarderContext, process: DeliveryProcess
    ) -> None:
        super().__init__(config, context)
        self.process = process

    async def start(self) -> None:
        await self.process.start()
        error = self.process.start_errors.get(self.id)
        if error is not None:
            raise RuntimeError(f"forwarder {self.id} did not start: {error}")

    async def deliver(self, events: list[Event]) -> Outcome:
        """Deliver ``events`` as they are (the runtime gives this forwarder spans; this is
        for events from elsewhere, such as dead letters replayed). On the delivery loop only
        (``appkeys.DELIVERY_LOOP``), like everything of the delivery process."""
        return await self.deliver_payloads([orjson.dumps(event) for event in events])

    async def deliver_payloads(self, payloads: list[bytes]) -> Outcome:
        try:
            result = await self.process.deliver_events(self.id, payloads)
        except DeliveryProcessError as exc:
            return Retry(reason=PROCESS_RETRY_REASON, detail=str(exc))
        return result.outcome

    async def deliver_span(self, span: SpoolSpan) -> SpanDelivery:
        try:
            result = await self.process.deliver(self.id, span)
        except DeliveryProcessError as exc:
            return SpanDelivery(Retry(reason=PROCESS_RETRY_REASON, detail=str(exc)))
        return SpanDelivery(
            result.outcome,
            result.arrivals,
            kept=result.kept,
            filtered=result.filtered,
            denied=result.denied,
            captured=result.captured,
        )


_REMOTE_CLASSES: dict[type[Forwarder], type[RemoteForwarder]] = {}  # type: ignore[type-arg]


def remote_class(real: type[Forwarder]) -> type[RemoteForwarder]:  # type: ignore[type-arg]
    """The ``RemoteForwarder`` class standing in for ``real`` (same config model and age
    window)."""
    cls = _REMOTE_CLASSES.get(real)
    if cls is None:
        cls = type(
            f"Remote{real.__name__}",
            (RemoteForwarder,),
            {
                "real": real,
                "config_model": real.config_model,
                "max_event_age_secs": real.max_event_age_secs,
            },
        )
        _REMOTE_CLASSES[real] = cls
    return cls


# -- the child's side ------------------------------------------------------------------------


class _SocketLogHandler(logging.Handler):
    """Sends the child's log records to the relay (from any thread of the child)."""

    def __init__(self, child: _Child) -> None:
        super().__init__()
        self.child = child

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = frame(("log", record_fields(record)))
        except Exception:
            self.handleError(record)
            return
        self.child.send_threadsafe(data)


class _ChildCapture(DeliveryCapture):
    """The debug view's capture as the child's forwarders see it: the rate the relay last
    sent, and records shipped to the relay as ``capture`` frames."""

    def __init__(self, child: _Child) -> None:
        self.child = child

    def set_rate(self, rate: float) -> None:
        self._rate = rate

    def exchange(self, record: dict[str, Any]) -> None:
        self.child.send_threadsafe(frame(("capture", "exchange", record)))

    def outcome(self, record: dict[str, Any]) -> None:
        self.child.send_threadsafe(frame(("capture", "outcome", record)))


def _runs(received: Sequence[int]) -> list[tuple[int, int]]:
    """``(count, received_ms)`` runs of consecutive equal arrival times."""
    runs: list[tuple[int, int]] = []
    for ms in received:
        if runs and runs[-1][1] == ms:
            runs[-1] = (runs[-1][0] + 1, ms)
        else:
            runs.append((1, ms))
    return runs


class _Child:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        self.forwarders: dict[str, Forwarder] = {}  # type: ignore[type-arg]
        self.metrics = Metrics()
        self.deltas = CounterDeltas(self.metrics)
        self.tasks: set[asyncio.Task[None]] = set()
        self.busy: dict[str, set[asyncio.Task[None]]] = {}
        """Each forwarder's deliveries in flight (a reconfiguration waits for them)."""
        self.context: ForwarderContext | None = None
        self._spools: dict[str, Any] = {}
        self._open_segment: Callable[[int, bytes], bytes] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-reader")
        self.cache = SpanCache(self._read_span)
        self.capture = _ChildCapture(self)

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    def send_threadsafe(self, data: bytes) -> None:
        if threading.get_ident() == self.thread:
            self.send(data)
        else:
            self.loop.call_soon_threadsafe(self.send, data)

    async def run(self) -> None:
        message = await read_frame(self.reader)
        spec: StartSpec = message[1]
        logging.getLogger().setLevel(spec.log_level)
        if spec.niceness:
            os.nice(spec.niceness)
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=300),
            headers={"User-Agent": "tagrelay"},
        )
        self.context = ForwarderContext(
            data_dir=spec.data_dir,
            http=session,
            metrics=self.metrics,
            capture=self.capture,
            encryption_keys=spec.encryption_keys,
            identity=spec.identity,
        )
        self._open_segment = self.context.spool_cipher().open_segment
        self.send(frame(("started", await self._start(spec.forwarders))))
        try:
            while True:
                try:
                    request = await read_frame(self.reader)
                except (asyncio.IncompleteReadError, OSError):
                    return  # the relay closed the socket, or is gone
                if request[0] == "deliver":
                    task = asyncio.create_task(
                        self._answer(request[1], self._deliver(*request[2:]))
                    )
                elif request[0] == "deliver_events":
                    task = asyncio.create_task(self._answer(request[1], self._given(*request[2:])))
                elif request[0] == "configure":
                    task = asyncio.create_task(self._configure(*request[1:]))
                elif request[0] == "capture_rate":
                    self.capture.set_rate(float(request[1]))
                    continue
                else:
                    log.error("unknown request from the relay: %r", request[0])
                    continue
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                if request[0] in ("deliver", "deliver_events"):
                    busy = self.busy.setdefault(request[2], set())
                    busy.add(task)
                    task.add_done_callback(busy.discard)
        finally:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for forwarder in self.forwarders.values():
                with contextlib.suppress(Exception):
                    await forwarder.close()
            await session.close()
            self._close_spools()
            self._executor.shutdown(wait=False)

    async def _start(self, configs: Iterable[ForwarderConfigBase]) -> dict[str, str | None]:
        """Start a forwarder for each of ``configs``: their errors (None: started)."""
        from tagrelay.forwarders import forwarder_class

        assert self.context is not None
        errors: dict[str, str | None] = {}
        for config in configs:
            kind: str = config.type  # type: ignore[attr-defined]  # every member has one
            forwarder = forwarder_class(kind)(config, self.context)
            try:
                await forwarder.start()
            except Exception as exc:
                errors[config.id] = f"{type(exc).__name__}: {exc}"
                continue
            errors[config.id] = None
            self.forwarders[config.id] = forwarder
        return errors

    async def _configure(
        self, request_id: int, configs: Sequence[ForwarderConfigBase], log_level: int
    ) -> None:
        """Run ``configs`` from now on: close the forwarders removed or changed once their
        deliveries in flight are answered, start the new and changed ones."""
        logging.getLogger().setLevel(log_level)
        wanted = {config.id: config for config in configs}
        going = [
            fid for fid, forwarder in self.forwarders.items() if wanted.get(fid) != forwarder.config
        ]
        for fid in going:
            await asyncio.gather(*self.busy.get(fid, ()), return_exceptions=True)
            forwarder = self.forwarders.pop(fid)
            with contextlib.suppress(Exception):
                await forwarder.close()
        errors = await self._start(c for fid, c in wanted.items() if fid not in self.forwarders)
        self.send(frame(("configured", request_id, errors)))

    async def _answer(self, request_id: int, work: Coroutine[Any, Any, SpanResult]) -> None:
        try:
            result = await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("delivery failed in the delivery process")
            failed = Retry(reason="internal_error", detail=f"{type(exc).__name__}: {exc}")
            result = SpanResult(failed)
        result = dataclasses.replace(result, counts=self.deltas.take())
        self.send(frame(("result", request_id, result)))

    async def _given(self, forwarder_id: str, payloads: list[bytes]) -> SpanResult:
        forwarder = self.forwarders.get(forwarder_id)
        if forwarder is None:
            return SpanResult(
                Retry(reason="internal_error", detail=f"no forwarder {forwarder_id} here")
            )
        return SpanResult(await _delivered(forwarder.deliver_payloads(payloads)))

    def _read(self, path: str, after: int, last: int) -> tuple[list[bytes], list[tuple[int, int]]]:
        from tagrelay.spool.segments import open_read_only, read_span

        conn = self._spools.get(path)
        if conn is None:
            conn = self._spools[path] = open_read_only(path)
        assert self._open_segment is not None, "started"
        try:
            return read_span(conn, after, last, self._open_segment)
        except Exception:
            self._close_spools()  # the next request opens the file again
            raise

    async def _read_span(
        self, path: str, after: int, last: int
    ) -> tuple[list[bytes], list[tuple[int, int]]]:
        return await self.loop.run_in_executor(self._executor, self._read, path, after, last)

    def _close_spools(self) -> None:
        spools, self._spools = self._spools, {}
        for conn in spools.values():
            with contextlib.suppress(Exception):
                conn.close()

    async def _deliver(self, forwarder_id: str, path: str, after: int, last: int) -> SpanResult:
        from tagrelay.forwarders._worker import accepts, consented

        forwarder = self.forwarders.get(forwarder_id)
        if forwarder is None:
            return SpanResult(
                Retry(reason="internal_error", detail=f"no forwarder {forwarder_id} here")
            )
        try:
            entries = await self.cache.span(path, after, last)
        except Exception as exc:
            return SpanResult(
                Retry(
                    reason="spool_read",
                    detail=f"cannot read events {after + 1}-{last} of the spool: {exc}",
                )
            )
        config = forwarder.config
        f = config.filter
        filters = bool(f.include_types or f.exclude_types or f.include_events or f.exclude_events)
        required = tuple(config.requires_consent)
        if not filters and not required:
            outcome = await _delivered(forwarder.deliver([e.event() for e in entries]))
            arrivals = _runs([e.received_ms for e in entries])
            captured = self._captured(config, entries, None) if self.capture.rate else None
            return SpanResult(outcome, None, 0, 0, arrivals, captured=captured)
        kept: list[int] = []
        events: list[Event] = []
        filtered = denied = 0
        for index, entry in enumerate(entries):
            event = entry.event()
            if not accepts(config, event):
                filtered += 1
                continue
            if required and not consented(required, event):
                denied += 1
                continue
            kept.append(index)
            events.append(event)
        given: Outcome = Delivered()
        if events:
            given = await _delivered(forwarder.deliver(events))
        arrivals = _runs([entries[i].received_ms for i in kept])
        captured = self._captured(config, entries, kept) if self.capture.rate else None
        return SpanResult(given, kept, filtered, denied, arrivals, captured=captured)

    def _captured(
        self, config: ForwarderConfigBase, entries: Sequence[CachedEvent], kept: list[int] | None
    ) -> list[tuple[int, object, str | None]]:
        """The debug view's sample of a span: ``SpanDelivery.captured``."""
        from tagrelay.forwarders._worker import accepts

        rate = self.capture.rate
        given = None if kept is None else set(kept)
        captured: list[tuple[int, object, str | None]] = []
        for index, entry in enumerate(entries):
            event = entry.event()
            message_id = event.get("messageId")
            if not sampled(message_id, rate):
                continue
            reason = None
            if given is not None and index not in given:
                reason = "filtered" if not accepts(config, event) else "consent_denied"
            captured.append((index, message_id, reason))
        return captured


CACHE_EVENTS = 4096
"""How many recently read events the delivery process keeps decoded (``SpanCache``)."""


class CachedEvent:
    """One event of the spool as the delivery process read it: its stored JSON, when it
    arrived, and the event decoded on first use."""

    __slots__ = ("_event", "line", "received_ms")

    def __init__(self, line: bytes, received_ms: int) -> None:
        self.line = line
        self.received_ms = received_ms
        self._event: Event | None = None

    def event(self) -> Event:
        if self._event is None:
            self._event = orjson.loads(self.line)
        return self._event


class SpanCache:
    """The events the delivery process read last, by sequence number, shared by its
    forwarders: they all read the same events, a little apart (each has its cursor and its
    batch size), and near the head of the spool. A span found here is neither read from
    SQLite nor decoded again, and every forwarder is given the same event objects, so what a
    forwarder works out once per event (the user data) can be kept for the next one. The
    events are shared: a forwarder must never change one (tests/forwarders/
    test_forwarder_contract.py checks it of every forwarder type).

    Holds at most ``capacity`` events (the oldest read go first); a span longer than that
    is read and not kept."""

    def __init__(
        self,
        read: Callable[[str, int, int], Awaitable[tuple[list[bytes], list[tuple[int, int]]]]],
        capacity: int = CACHE_EVENTS,
    ) -> None:
        self._read = read
        self.capacity = capacity
        self._entries: OrderedDict[int, CachedEvent] = OrderedDict()
        self._path: str | None = None
        self.hits = 0
        self.misses = 0

    async def span(self, path: str, after: int, last: int) -> list[CachedEvent]:
        """The events ``after < seq <= last`` of the spool file ``path``."""
        if path != self._path:
            self._entries.clear()
            self._path = path
        entries = self._entries
        found: list[CachedEvent] = []
        seq = after + 1
        while seq <= last:
            entry = entries.get(seq)
            if entry is None:
                break
            found.append(entry)
            seq += 1
        self.hits += len(found)
        if seq > last:
            return found
        lines, arrivals = await self._read(path, seq - 1, last)
        self.misses += len(lines)
        read = [
            CachedEvent(line, received_ms)
            for line, received_ms in zip(
                lines, (ms for count, ms in arrivals for _ in range(count)), strict=True
            )
        ]
        if len(read) <= self.capacity:
            for offset, entry in enumerate(read):
                entries[seq + offset] = entry
                entries.move_to_end(seq + offset)
            while len(entries) > self.capacity:
                entries.popitem(last=False)
        return found + read


async def _delivered(delivery: Any) -> Outcome:
    try:
        outcome: Outcome = await delivery
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("forwarder raised")
        return Retry(reason="internal_error", detail=f"{type(exc).__name__}: {exc}")
    return outcome


async def _child_main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    child = _Child(reader, writer)
    root = logging.getLogger()
    root.handlers[:] = [_SocketLogHandler(child)]
    try:
        await child.run()
    finally:
        root.handlers[:] = []
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def main(argv: Sequence[str]) -> None:
    # Ctrl-C and a process-group SIGTERM are the relay's to handle: it lets the batches in
    # flight finish, then closes the socket, which is what ends this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(_child_main(int(argv[0])))


if __name__ == "__main__":
    # Run from the module's own name, not ``__main__``: what the child pickles (SpanResult)
    # must unpickle in the relay as tagrelay.forwarders._process's.
    from tagrelay.forwarders import _process

    _process.main(sys.argv[1:])
