"""The relay application's typed state: the ``web.AppKey``s under which ``create_app``
(``tagrelay.app``) keeps the parts it wires, and ``warehouse_of`` to find the running
warehouse among them.

They live apart from ``tagrelay.app`` so that what reads them (the admin socket, the demo
page, the CLI, tests) need not import the module that builds the application, which imports
those readers in turn.
"""

from __future__ import annotations

from aiohttp import web

from tagrelay.capture import DebugHub
from tagrelay.config.models import Config
from tagrelay.forwarders._fleet import Fleet
from tagrelay.forwarders._loop import DeliveryLoop
from tagrelay.forwarders._worker import ForwarderWorker
from tagrelay.forwarders.warehouse import WarehouseForwarder
from tagrelay.metrics import Metrics
from tagrelay.pipeline.suppression import Suppression
from tagrelay.spool.backend import Spool
from tagrelay.warehouse.process import WarehouseProcess
from tagrelay.web.ingest import IngestService

__all__ = [
    "CAPTURE",
    "CONFIG",
    "DELIVERY_LOOP",
    "FLEET",
    "INGEST",
    "METRICS",
    "READY",
    "SPOOL",
    "SUPPRESSION",
    "WORKERS",
    "warehouse_of",
    "warehouses_of",
]

CONFIG = web.AppKey("config", Config)
"""The configuration the relay started with; after a reload, the one in effect is
``app[tagrelay.reload.RELOADER].config``."""
METRICS = web.AppKey("metrics", Metrics)
SPOOL = web.AppKey("spool", Spool)
WORKERS = web.AppKey("workers", dict[str, ForwarderWorker])
"""The running forwarders' workers by forwarder id; filled as the delivery loop starts,
changed by a reload (on the relay's loop, where everything that reads it runs)."""
DELIVERY_LOOP = web.AppKey("delivery_loop", DeliveryLoop)
"""The loop the workers and their forwarders run on, while they run: call a forwarder (or
anything of the delivery process) only there, with ``DeliveryLoop.call``."""
FLEET = web.AppKey("fleet", Fleet)
"""What starts, changes (a reload) and stops the workers, on the delivery loop."""
CAPTURE = web.AppKey("capture", DebugHub)
"""The debug view's capture (``tagrelay.capture``): ingest, the forwarders and the
delivery process report to it while a view is open or ``debug.sample_rate`` asks."""
INGEST = web.AppKey("ingest", IngestService)
SUPPRESSION = web.AppKey("suppression", Suppression)
"""The ids forgotten with ``--suppress``, whose events ingest drops (``pipeline.suppression``)."""
READY = web.AppKey("ready", dict[str, bool])
"""What ``/readyz`` checks: each part's name and whether it is up."""


def warehouse_of(app: web.Application) -> WarehouseProcess | None:
    """The first warehouse forwarder's ``WarehouseProcess`` (its ``query`` blocks: call it
    from a thread), for the admin socket and the demo page; None when no warehouse runs."""
    for worker in app[WORKERS].values():
        forwarder = worker.forwarder
        if isinstance(forwarder, WarehouseForwarder) and forwarder.warehouse is not None:
            return forwarder.warehouse
    return None


def warehouses_of(app: web.Application) -> list[WarehouseProcess]:
    """Every running warehouse forwarder's ``WarehouseProcess`` (erasure and access
    requests reach them all)."""
    return [
        worker.forwarder.warehouse
        for worker in app[WORKERS].values()
        if isinstance(worker.forwarder, WarehouseForwarder)
        and worker.forwarder.warehouse is not None
    ]
