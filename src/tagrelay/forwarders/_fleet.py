"""The running forwarders: a worker for each enabled forwarder, started with the relay,
changed by a reload (``tagrelay.reload``), stopped with the relay.

Everything here runs on the delivery loop (``appkeys.DELIVERY_LOOP``): the workers, the
forwarders, the shared HTTP session and the handle on the delivery process (the HTTP
forwarders run there, ``_process``; their workers here hold ``RemoteForwarder`` stand-ins).

A reload hands ``apply`` the forwarders the new configuration enables, and the fleet moves
from the ones that run to those, without losing an event:

- removed (or disabled): its worker stops after its batch in flight; the events after its
  cursor wait on disk, and its cursor is kept, retired, for
  ``spool.forget_cursor_after_secs``: a forwarder that comes back within that time resumes
  where it stopped;
- changed (any of its settings): its worker stops the same way and a new one starts on the
  same cursor, with the new settings;
- new: its worker starts at the head of the spool, or at the oldest event the spool holds
  (``start: earliest``).

The delivery process is told the forwarders it runs from now on (``DeliveryProcess.
configure``) between the stops and the starts. A forwarder that does not start (its
credentials file is missing, say) is reported; a changed one then runs again with its
previous settings, a new one does not run (its cursor is retired as a removed one's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tagrelay.capture import NO_CAPTURE, DebugHub
from tagrelay.config.common import ForwarderConfigBase
from tagrelay.forwarders import Forwarder, ForwarderContext, forwarder_class
from tagrelay.forwarders._process import DeliveryProcess, remote_class
from tagrelay.forwarders._worker import ForwarderWorker
from tagrelay.identity_store import IDENTITY_WRITER_ID, StoreSettings
from tagrelay.identity_store.writer import writer_config
from tagrelay.logthrottle import LogThrottle
from tagrelay.metrics import Metrics
from tagrelay.spool.backend import Spool

__all__ = ["Fleet", "FleetChange", "WriterGate"]

log = logging.getLogger(__name__)


@dataclass
class FleetChange:
    """What ``Fleet.apply`` did."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """Forwarders that did not start, and why (a changed one runs its previous settings)."""
    workers: dict[str, ForwarderWorker] = field(default_factory=dict)
    """The workers running now, by forwarder id."""
    configs: list[ForwarderConfigBase] = field(default_factory=list)
    """The settings of the forwarders running now."""


class WriterGate:
    """Where the identity store's writer is in the spool, for the forwarders that read the
    store (``enrich: true``): each awaits ``passed(last)`` before delivering a batch that
    ends at ``last``, so that its events see what every event before them told the store.
    A writer more than ``wait_secs`` behind (failing, or stopped) does not hold them up
    longer: the batch goes with what the store holds, counted. On the delivery loop only."""

    def __init__(self, wait_secs: float, metrics: Metrics) -> None:
        self.wait_secs = wait_secs
        self.metrics = metrics
        self.position = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._throttle = LogThrottle(log)

    def moved(self, position: int) -> None:
        """The writer's cursor is at ``position``: wake those waiting for it."""
        self.position = max(self.position, position)
        still = []
        for seq, waiter in self._waiters:
            if seq <= self.position:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                still.append((seq, waiter))
        self._waiters = still

    def for_forwarder(self, forwarder_id: str) -> Callable[[int], Awaitable[None]]:
        async def passed(last: int) -> None:
            await self.passed(forwarder_id, last)

        return passed

    async def passed(self, forwarder_id: str, last: int) -> None:
        """Return once the writer has taken every event up to ``last`` (at once if it has),
        or after ``wait_secs``."""
        if self.position >= last:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((last, waiter))
        try:
            await asyncio.wait_for(waiter, self.wait_secs)
        except TimeoutError:
            self.metrics.identity_store_waits.labels(forwarder_id, "timeout").inc()
            self._throttle.log(
                logging.WARNING,
                forwarder_id,
                "the identity store's writer is behind; a batch goes without waiting longer",
                {"forwarder": forwarder_id, "wait_secs": self.wait_secs},
            )
            return
        finally:
            self._waiters = [(s, w) for s, w in self._waiters if w is not waiter]
        self.metrics.identity_store_waits.labels(forwarder_id, "caught_up").inc()


class Fleet:
    """The workers of the enabled forwarders (see the module docstring). On the delivery
    loop only: ``start`` once, ``apply`` any number of times (one at a time), ``close``."""

    def __init__(
        self,
        spool: Spool,
        metrics: Metrics,
        data_dir: Path,
        *,
        delivery_process: bool = True,
        niceness: int = 0,
        stop_timeout_secs: float = 10.0,
        capture: DebugHub | None = None,
        encryption_keys: tuple[str, ...] = (),
        identity: StoreSettings | None = None,
    ) -> None:
        self.spool = spool
        self.encryption_keys = encryption_keys
        """``encryption.keys``, for the processes that read the spool file themselves (the
        delivery processes, the warehouse's), which open its sealed segments with them."""
        self.identity = identity
        """The identity store, when ``identity_store.enabled``: the fleet runs its writer
        (``identity_store.writer``) and gates the forwarders that read it."""
        self.gate = (
            WriterGate(identity.config.enrich_wait_secs, metrics) if identity is not None else None
        )
        self.capture = capture
        """The debug view's capture, which the forwarders, their workers and the delivery
        process report to (``tagrelay.capture``)."""
        self.metrics = metrics
        self.data_dir = data_dir
        self.delivery_process = delivery_process
        self.niceness = niceness
        self.stop_timeout_secs = stop_timeout_secs
        self.workers: dict[str, ForwarderWorker] = {}
        self.processes: dict[str, DeliveryProcess] = {}
        """The delivery processes, by ``Forwarder.delivery_group``."""
        self._context: ForwarderContext | None = None

    @property
    def process(self) -> DeliveryProcess | None:
        """The delivery process of the forwarders of the default group, if any runs."""
        return self.processes.get(Forwarder.delivery_group)

    @staticmethod
    def group(config: ForwarderConfigBase) -> str:
        """Which delivery process ``config``'s forwarder runs in (``delivery_group``)."""
        kind: str = config.type  # type: ignore[attr-defined]  # every member has one
        return forwarder_class(kind).delivery_group

    def _remote_by_group(
        self, extra: Sequence[ForwarderConfigBase] = ()
    ) -> dict[str, list[ForwarderConfigBase]]:
        """The remote forwarders' configs by group: those with a worker, then ``extra``;
        every group with a process is listed, if only to be told it runs nothing now."""
        groups: dict[str, list[ForwarderConfigBase]] = {g: [] for g in self.processes}
        for config in [w.config for w in self.workers.values()] + list(extra):
            if self.remote(config):
                groups.setdefault(self.group(config), []).append(config)
        return groups

    def remote(self, config: ForwarderConfigBase) -> bool:
        """Whether ``config``'s forwarder runs in the delivery process."""
        kind: str = config.type  # type: ignore[attr-defined]  # every member has one
        return self.delivery_process and forwarder_class(kind).in_delivery_process

    def _with_internal(self, configs: Sequence[ForwarderConfigBase]) -> list[ForwarderConfigBase]:
        """``configs`` and the internal forwarders: the identity store's writer first (its
        worker must exist before those that wait for it)."""
        if self.identity is None:
            return list(configs)
        writer = writer_config(self.identity.config, list(self.identity.keys))
        return [writer, *configs]

    async def start(self, configs: Sequence[ForwarderConfigBase]) -> dict[str, ForwarderWorker]:
        """Open the shared HTTP session and start a worker for each of ``configs`` (the
        enabled forwarders). Raises what a forwarder's start raises (the relay does not
        start then; ``close`` stops those that did)."""
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=300),
            headers={"User-Agent": "tagrelay"},
        )
        self._context = ForwarderContext(
            data_dir=self.data_dir,
            http=session,
            metrics=self.metrics,
            capture=self.capture.delivery if self.capture is not None else NO_CAPTURE,
            encryption_keys=self.encryption_keys,
            identity=self.identity,
        )
        configs = self._with_internal(configs)
        for group, remote in self._remote_by_group(configs).items():
            self.processes[group] = self._new_process(remote)
        for config in configs:
            worker = self._worker(config)
            await worker.start()
            self._started(worker)
            self.workers[config.id] = worker
        return dict(self.workers)

    async def apply(self, configs: Sequence[ForwarderConfigBase]) -> FleetChange:
        """Run ``configs`` (the forwarders enabled now) from now on; see the module
        docstring. Returns what changed and what runs now."""
        running = {fid: worker.config for fid, worker in self.workers.items()}
        wanted = {config.id: config for config in self._with_internal(configs)}
        change = FleetChange(
            added=[fid for fid in wanted if fid not in running],
            removed=[fid for fid in running if fid not in wanted],
            changed=[fid for fid in wanted if fid in running and wanted[fid] != running[fid]],
        )
        going = change.removed + change.changed
        coming = [wanted[fid] for fid in change.added + change.changed]
        stopped = await asyncio.gather(
            *(self.workers[fid].stop(self.stop_timeout_secs, flush=False) for fid in going),
            return_exceptions=True,
        )
        for fid, outcome in zip(going, stopped, strict=True):
            if isinstance(outcome, Exception):
                log.error(
                    "forwarder did not close cleanly",
                    extra={"forwarder": fid, "error": f"{type(outcome).__name__}: {outcome}"},
                )
        for fid in going:
            del self.workers[fid]
        for fid in change.removed:
            self._forget_metrics(fid)
        if change.removed:
            retired = await self.spool.retire_cursors_except(set(wanted))
            log.info(
                "forwarders removed; their cursors are kept",
                extra={"forwarders": ", ".join(sorted(retired))},
            )
        change.failed = await self._start_workers(
            coming, remote_going=any(self.remote(running[fid]) for fid in going)
        )
        fallback = [running[fid] for fid in change.changed if fid in change.failed]
        for fid, error in (await self._start_workers(fallback, remote_going=False)).items():
            log.error(
                "a changed forwarder did not start, nor did it with its previous settings; "
                "it is not running",
                extra={"forwarder": fid, "error": error},
            )
        if change.failed:  # what did not start holds no events
            await self.spool.retire_cursors_except(set(self.workers))
        change.workers = dict(self.workers)
        change.configs = [worker.config for worker in self.workers.values()]
        return change

    async def _start_workers(
        self, configs: Sequence[ForwarderConfigBase], *, remote_going: bool
    ) -> dict[str, str]:
        """Start a worker for each of ``configs``, having told the delivery process first
        when forwarders of its leave (``remote_going``) or come. Returns those that did not
        start, and why."""
        remote_coming = [c for c in configs if self.remote(c)]
        if remote_going or remote_coming:
            for group, remote in self._remote_by_group(remote_coming).items():
                process = self.processes.get(group)
                if process is None:
                    self.processes[group] = self._new_process(remote)
                else:
                    await process.configure(remote)
        failed: dict[str, str] = {}
        for config in configs:
            worker = self._worker(config)
            try:
                await worker.start()
            except Exception as exc:
                failed[config.id] = f"{type(exc).__name__}: {exc}"
                log.error(
                    "forwarder did not start",
                    extra={"forwarder": config.id, "error": failed[config.id]},
                )
                with contextlib.suppress(Exception):
                    await worker.stop(0, flush=False)
                continue
            self._started(worker)
            self.workers[config.id] = worker
        if failed and remote_coming:
            # A delivery process runs only what has a worker.
            await self.refresh_process()
        return failed

    async def refresh_process(self) -> None:
        """Tell each delivery process again what it runs, which also passes it the relay's
        log level now (a reload changed it)."""
        for group, remote in self._remote_by_group().items():
            await self.processes[group].configure(remote)

    async def close(self) -> None:
        """Stop every worker (each flushes what was committed, within the stop timeout),
        then the delivery process and the HTTP session."""
        await asyncio.gather(
            *(w.stop(self.stop_timeout_secs) for w in self.workers.values()),
            return_exceptions=True,
        )
        for process in self.processes.values():
            await process.close()
        if self._context is not None:
            await self._context.http.close()
        await self.spool.leave_loop()

    async def set_capture_rate(self, rate: float) -> None:
        """Tell the delivery process the debug view's capture rate (a view connected, or
        the last one left)."""
        for process in self.processes.values():
            await process.set_capture_rate(rate)

    async def forget_cached_events(self) -> None:
        """Have the delivery processes drop the events they keep decoded: an erasure
        (``tagrelay forget``) rewrote events of the spool."""
        for process in self.processes.values():
            await process.forget_cache()

    def _new_process(self, configs: Sequence[ForwarderConfigBase]) -> DeliveryProcess:
        process = DeliveryProcess(
            configs,
            self.data_dir,
            self.metrics,
            niceness=self.niceness,
            encryption_keys=self.encryption_keys,
            identity=self.identity,
        )
        if self.capture is not None:
            process.capture_rate = self.capture.rate
            process.on_capture = self.capture.post
        return process

    def _worker(self, config: ForwarderConfigBase) -> ForwarderWorker:
        assert self._context is not None, "start the fleet first"
        kind: str = config.type  # type: ignore[attr-defined]  # every member has one
        cls = forwarder_class(kind)
        forwarder: Forwarder  # type: ignore[type-arg]
        if self.remote(config):
            process = self.processes[self.group(config)]
            forwarder = remote_class(cls)(config, self._context, process)
        else:
            forwarder = cls(config, self._context)
        worker = ForwarderWorker(forwarder, self.spool, self.metrics)
        if self.gate is not None:
            if config.id == IDENTITY_WRITER_ID:
                worker.on_moved = self.gate.moved
            elif getattr(config, "enrich", False):
                worker.gate = self.gate.for_forwarder(config.id)
        return worker

    def _started(self, worker: ForwarderWorker) -> None:
        """The writer starts where its cursor is: the events before it are passed."""
        if self.gate is not None and worker.id == IDENTITY_WRITER_ID:
            self.gate.moved(int(worker.status()["position"]))

    def _forget_metrics(self, forwarder_id: str) -> None:
        """Drop a removed forwarder's gauges (its counters stay: they only ever grow)."""
        with contextlib.suppress(KeyError):
            self.metrics.forwarder_last_success.remove(forwarder_id)
