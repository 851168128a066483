"""Every Prometheus metric of tagrelay, declared once.

Labels are bounded: ``source`` (an inbound protocol), ``forwarder`` (a configured id),
``reason`` (a code from a fixed vocabulary), ``outcome``, ``route`` (the route template,
never the raw path), ``status_class``. Never a URL, an id, a key or raw error text.

Each application owns a ``Metrics`` on its own registry, so that tests (and several apps
in one process) count independently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class _SpoolDepthCollector(Collector):
    """Reads spool depth per forwarder at scrape time (no bookkeeping on the hot path)."""

    def __init__(self, depths: Callable[[], dict[str, int]]) -> None:
        self._depths = depths

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tagrelay_spool_depth",
            "Events committed to the spool and not yet past the forwarder's cursor.",
            labels=["forwarder"],
        )
        for forwarder, depth in sorted(self._depths().items()):
            family.add_metric([forwarder], depth)
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_received = Counter(
            "tagrelay_events_received",
            "Events that arrived at an ingest endpoint, before validation.",
            ["source"],
            registry=r,
        )
        self.events_accepted = Counter(
            "tagrelay_events_accepted",
            "Events committed to the spool and acknowledged.",
            ["source"],
            registry=r,
        )
        self.events_rejected = Counter(
            "tagrelay_events_rejected",
            "Events or requests refused at ingestion, by reason (a request refused as a "
            "whole counts once).",
            ["source", "reason"],
            registry=r,
        )
        self.forwarder_events = Counter(
            "tagrelay_forwarder_events",
            "Events leaving a forwarder's queue, by outcome: delivered, dead_letter, filtered.",
            ["forwarder", "outcome"],
            registry=r,
        )
        self.forwarder_retries = Counter(
            "tagrelay_forwarder_retries",
            "Failed delivery attempts that will be retried, by reason.",
            ["forwarder", "reason"],
            registry=r,
        )
        self.dead_letters = Counter(
            "tagrelay_dead_letters",
            "Events stored as dead letters, by reason.",
            ["forwarder", "reason"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "tagrelay_delivery_latency_seconds",
            "From the relay receiving an event to its forwarder delivering it.",
            ["forwarder"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tagrelay_forwarder_batch_size",
            "Events per delivery attempt.",
            ["forwarder"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.http_duration = Histogram(
            "tagrelay_http_request_duration_seconds",
            "HTTP request handling time, by route template and status class.",
            ["route", "method", "status_class"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.spool_commits = Counter(
            "tagrelay_spool_commits",
            "Spool transactions that stored events (group commit: fewer than requests).",
            registry=r,
        )
        self.spool_errors = Counter(
            "tagrelay_spool_errors",
            "Spool commits that failed; their requests were answered 503.",
            registry=r,
        )
        self.warehouse_unmapped = Counter(
            "tagrelay_warehouse_unmapped_values",
            "Values that did not fit their column and went to _unmapped_data.",
            ["forwarder"],
            registry=r,
        )
        self.warehouse_duplicates = Counter(
            "tagrelay_warehouse_duplicates",
            "Events not loaded because a row with their message_id exists (resends, retries).",
            ["forwarder"],
            registry=r,
        )
        self.up = Gauge("tagrelay_up", "1 while the relay is serving.", registry=r)

    def watch_spool_depth(self, depths: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_SpoolDepthCollector(depths))
