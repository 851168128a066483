"""Every Prometheus metric of tagrelay, declared once.

Labels are bounded: ``source`` (an inbound protocol; ``rudderstack`` for RudderStack's SDKs
on Segment's routes, see ``sources.SOURCE_LABELS``), ``forwarder`` (a configured id),
``reason`` (a code from a fixed vocabulary), ``outcome``, ``route`` (the route template,
never the raw path), ``status_class``, ``key`` (a configured write key's id, or ``none``; on
``tagrelay_forwarder_match_keys``, a match key of ``_user_data.MATCH_KEYS`` or ``none``),
``version`` (``tagrelay_build_info``: the running version).
Never a URL, an origin, an id from a request, a key's value or raw error text.

Each application owns a ``Metrics`` on its own registry, so that tests (and several apps
in one process) count independently. ``Metrics.scrape`` renders it for ``/metrics``
(``tagrelay.web.health``), measuring first what a collector cannot read without waiting
(the forwarders' lag, from the spool).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tagrelay import __version__

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

HTTP_REJECT_REASONS = (
    "bad_request_line",
    "bad_header",
    "header_too_large",
    "bad_chunking",
    "other",
)
"""Reasons of ``tagrelay_http_rejected``: why a request was not valid HTTP."""
CONNECTION_CLOSE_REASONS = ("header_timeout", "body_timeout", "idle_timeout", "over_capacity")
"""Reasons of ``tagrelay_connections_closed``."""
GATEWAY_STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "refused", "error", "timeout")
"""``status_class`` of ``tagrelay_gateway_requests``: the class of Google's answer passed
back, or why none was: refused (the relay answered 4xx itself: a body too large),
error (Google could not be reached: 502), timeout (Google did not answer in time: 504)."""
GATEWAY_COPY_OUTCOMES = ("stored", "not_stored", "invalid", "skipped")
"""Outcomes of ``tagrelay_gateway_copies``: stored (every event of the hit is in the spool,
or was already), not_stored (the spool refused or failed; the hit still passed), invalid
(the hit could not be decoded into events, or all of them were rejected), skipped (an Ads
hit without an event name or a click id: counted only)."""
GATEWAY_UPSTREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
CONFIG_RELOAD_OUTCOMES = ("applied", "unchanged", "invalid", "failed")
"""Outcomes of ``tagrelay_config_reload``: applied (what changed runs now), unchanged (nothing
that a reload applies had changed), invalid (the file was refused: the relay runs on as it
was), failed (valid, but part of it could not be applied, e.g. a forwarder did not start)."""


class _SpoolCollector(Collector):
    """Reads the spool's figures at scrape time (no bookkeeping on the hot path)."""

    def __init__(
        self,
        depths: Callable[[], dict[str, int]],
        commits: Callable[[], int],
        size_bytes: Callable[[], int] | None = None,
    ) -> None:
        self._depths = depths
        self._commits = commits
        self._size_bytes = size_bytes

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "tagrelay_spool_depth",
            "Events committed to the spool and not yet past the forwarder's cursor.",
            labels=["forwarder"],
        )
        for forwarder, value in sorted(self._depths().items()):
            depth.add_metric([forwarder], value)
        yield depth
        yield CounterMetricFamily(
            "tagrelay_spool_commits",
            "Spool transactions that stored events (group commit: fewer than requests).",
            value=self._commits(),
        )
        if self._size_bytes is not None:
            yield GaugeMetricFamily(
                "tagrelay_spool_size_bytes",
                "The spool's files on disk (the database, its write-ahead log and shared "
                "memory; dead letters included), in bytes.",
                value=self._size_bytes(),
            )


class _LagCollector(Collector):
    """The forwarders' lag as last measured (``Metrics.scrape`` measures it first)."""

    def __init__(self, lags: Callable[[], Mapping[str, float]]) -> None:
        self._lags = lags

    def collect(self) -> Iterable[Metric]:
        lag = GaugeMetricFamily(
            "tagrelay_forwarder_lag_seconds",
            "Age of the oldest event the forwarder has not delivered yet (from the relay "
            "receiving it); 0 when it has caught up with the spool. Events behind: "
            "tagrelay_spool_depth.",
            labels=["forwarder"],
        )
        for forwarder, value in sorted(self._lags().items()):
            lag.add_metric([forwarder], value)
        yield lag


class _DiskCollector(Collector):
    """The data directory's filesystem, read at scrape time (one ``statvfs``): the spool,
    the dead letters and the warehouse all grow there."""

    def __init__(self, data_dir: Path, spool_max_bytes: int) -> None:
        self._data_dir = data_dir
        self._spool_max_bytes = spool_max_bytes

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "tagrelay_spool_max_size_bytes",
            "The spool's cap (spool.max_size_mb) in bytes; 0 when it has none.",
            value=self._spool_max_bytes,
        )
        try:
            fs = os.statvfs(self._data_dir)
        except OSError:
            return  # not created yet, or gone: no figure rather than a wrong one
        yield GaugeMetricFamily(
            "tagrelay_data_dir_free_bytes",
            "Bytes the relay may still write on the data directory's filesystem.",
            value=fs.f_bavail * fs.f_frsize,
        )
        yield GaugeMetricFamily(
            "tagrelay_data_dir_size_bytes",
            "Size of the data directory's filesystem in bytes.",
            value=fs.f_blocks * fs.f_frsize,
        )


class _DeadLetterCollector(Collector):
    """Dead letters stored now, by forwarder, read at scrape time from the spool's counts."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        stored = GaugeMetricFamily(
            "tagrelay_dead_letters_stored",
            "Dead letters stored now (tagrelay dlq list), by forwarder: written by "
            "tagrelay_dead_letters_total, removed by replays, purges and retention.",
            labels=["forwarder"],
        )
        for forwarder, value in sorted(self._counts().items()):
            stored.add_metric([forwarder], value)
        yield stored


ENCRYPTION_STORES = ("spool", "dead_letters")
"""``store`` of the encryption metrics: the spool's events, the dead letters."""
ENCRYPTION_STATES = ("old_key", "plaintext")
"""``state`` of ``tagrelay_encryption_backlog_events``."""


class _EncryptionCollector(Collector):
    """Events not yet under the first key, read at scrape time from the spool's count."""

    def __init__(self, backlog: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        self._backlog = backlog

    def collect(self) -> Iterable[Metric]:
        found = self._backlog()
        gauge = GaugeMetricFamily(
            "tagrelay_encryption_backlog_events",
            "Events in the spool and the dead letters that are not encrypted under the first "
            "of encryption.keys: under an older key (old_key) or from before encryption was "
            "on (plaintext). tagrelay keys rotate brings them to 0; then the older keys can "
            "go.",
            labels=["store", "state"],
        )
        for store in ENCRYPTION_STORES:
            for state in ENCRYPTION_STATES:
                gauge.add_metric([store, state], found.get((store, state), 0))
        yield gauge


DEAD_LETTER_REPLAY_OUTCOMES = ("delivered", "dropped", "failed", "skipped")
"""Outcomes of ``tagrelay_dead_letters_replayed``."""


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
        self.events_duplicate = Counter(
            "tagrelay_events_duplicate",
            "Events acknowledged but not stored again: their messageId was already stored "
            "within spool.dedup_window_secs (an SDK's resend).",
            ["source"],
            registry=r,
        )
        self.events_suppressed = Counter(
            "tagrelay_events_suppressed",
            "Events dropped at ingest, and answered as accepted, because their userId, "
            "anonymousId or email was forgotten with tagrelay forget --suppress.",
            ["source"],
            registry=r,
        )
        self.sdk_metrics = Counter(
            "tagrelay_sdk_metrics",
            "Usage metrics SDKs report about themselves (analytics-next's /v1/m series), "
            "counted and not stored, by outcome: accepted, invalid.",
            ["sdk", "outcome"],
            registry=r,
        )
        self.google_scripts = Counter(
            "tagrelay_google_scripts",
            "Requests for gtag.js / gtm.js (kind) by outcome: hit, miss, refreshed, "
            "stale_served, unavailable, not_allowed; and failed upstream fetches: "
            "upstream_error, too_large.",
            ["kind", "outcome"],
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
            "Events leaving a forwarder's queue, by outcome: delivered, dead_letter, "
            "filtered (by the forwarder's filter), dropped (see tagrelay_forwarder_dropped).",
            ["forwarder", "outcome"],
            registry=r,
        )
        self.forwarder_dropped = Counter(
            "tagrelay_forwarder_dropped",
            "Events a forwarder did not send, by reason: consent_denied (the event does not "
            "grant a category in requires_consent), and the destination's own (ga4: too_old, "
            "unsupported_type, reserved_name, ...; ad forwarders: not_a_conversion, "
            "unmapped_event, too_old, ad_user_data_denied, ...).",
            ["forwarder", "reason"],
            registry=r,
        )
        self.forwarder_field_drops = Counter(
            "tagrelay_forwarder_field_drops",
            "Parts of sent events a forwarder cut or left out to meet the destination's "
            "limits, by reason (ga4: value_truncated, too_many_params, pii_removed, ...).",
            ["forwarder", "reason"],
            registry=r,
        )
        self.forwarder_match_keys = Counter(
            "tagrelay_forwarder_match_keys",
            "Events an ad forwarder delivered, by the match key they carried (one count per "
            "key per event): email, phone, name, address, external_id, ip, user_agent, "
            "click_id, browser_id; none for an event that carried none of them. Divide by "
            "tagrelay_forwarder_events_total with outcome delivered for each key's coverage.",
            ["forwarder", "key"],
            registry=r,
        )
        self.forwarder_enriched = Counter(
            "tagrelay_forwarder_enriched",
            "Events an ad forwarder with enrich: true sent with a match key filled in from "
            "the identity store (one count per key per event the platform took): email, "
            "phone, name, address, external_id, click_id, browser_id.",
            ["forwarder", "key"],
            registry=r,
        )
        self.identity_store_events = Counter(
            "tagrelay_identity_store_events",
            "Events the identity store's writer read, by outcome: recorded (it told the "
            "store an id, user data, a click or browser id), ignored (nothing to keep: no "
            "ads consent, no id, or one id and no data).",
            ["outcome"],
            registry=r,
        )
        self.identity_store_expired = Counter(
            "tagrelay_identity_store_expired",
            "Persons deleted from the identity store, not seen for identity_store.ttl_days.",
            registry=r,
        )
        self.identity_store_waits = Counter(
            "tagrelay_identity_store_waits",
            "Batches of a forwarder with enrich: true that waited for the identity store's "
            "writer to take their events, by outcome: caught_up, timeout (sent after "
            "identity_store.enrich_wait_secs with what the store held).",
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
        self.dead_letters_replayed = Counter(
            "tagrelay_dead_letters_replayed",
            "Dead letters replayed (tagrelay dlq replay), by outcome: delivered (deleted from "
            "the dead letters), dropped (the forwarder chose not to send them, as it would "
            "have at first: deleted too), failed (dead letters again, with the new reason), "
            "skipped (not sent: the forwarder is not running, or its filter or consent rule "
            "leaves them out now).",
            ["forwarder", "outcome"],
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
        self.spool_commit_duration = Histogram(
            "tagrelay_spool_commit_duration_seconds",
            "Time of a group commit in the spool's commit process (the write and its fsync), "
            "which every acknowledgement of its round waits for.",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.spool_errors = Counter(
            "tagrelay_spool_errors",
            "Spool commits that failed; their requests were answered 503.",
            registry=r,
        )
        self.warehouse_unmapped = Counter(
            "tagrelay_warehouse_unmapped",
            "Values stored in the row's _unmapped_data instead of their column, by table and "
            "reason: type_mismatch (the value does not fit the column's type, even widened: "
            "a string in a DOUBLE column), name_collision (another key of the event has the "
            "column name), over_limit (name too long, or the table has max_columns).",
            ["forwarder", "table", "reason"],
            registry=r,
        )
        self.warehouse_duplicates = Counter(
            "tagrelay_warehouse_duplicates",
            "Events not loaded because a row with their message_id exists (resends, retries).",
            ["forwarder"],
            registry=r,
        )
        self.cors_refused = Counter(
            "tagrelay_cors_refused",
            "Browser requests refused for their origin (CORS preflights included), by key: "
            "the key's id, or none when the request names no key (a preflight).",
            ["key"],
            registry=r,
        )
        self.http_rejected = Counter(
            "tagrelay_http_rejected",
            "Requests that are not valid HTTP, refused before any route with a 400 and the "
            "connection closed, by reason: " + ", ".join(HTTP_REJECT_REASONS) + ".",
            ["reason"],
            registry=r,
        )
        self.connections_closed = Counter(
            "tagrelay_connections_closed",
            "Client connections the relay closed on its own, by reason: header_timeout (the "
            "request head took longer than server.header_timeout_secs), body_timeout, "
            "idle_timeout (a kept-alive connection unused for server.keepalive_timeout_secs), "
            "over_capacity (refused with a 503: server.max_connections were open).",
            ["reason"],
            registry=r,
        )
        self.connections_open = Gauge(
            "tagrelay_connections_open",
            "Client connections open on the relay's HTTP listener.",
            registry=r,
        )
        for reason in HTTP_REJECT_REASONS:
            self.http_rejected.labels(reason)
        for reason in CONNECTION_CLOSE_REASONS:
            self.connections_closed.labels(reason)
        self.gateway_requests = Counter(
            "tagrelay_gateway_requests",
            "Requests through a Google tag gateway route (route: its configured path), by "
            "kind (script, ga4_hit, ads_hit, health, other) and status_class: "
            + ", ".join(GATEWAY_STATUS_CLASSES)
            + ".",
            ["route", "kind", "status_class"],
            registry=r,
        )
        self.gateway_upstream_duration = Histogram(
            "tagrelay_gateway_upstream_duration_seconds",
            "From sending a gateway request to Google to its answer's headers, by route and kind.",
            ["route", "kind"],
            buckets=GATEWAY_UPSTREAM_BUCKETS,
            registry=r,
        )
        self.gateway_copies = Counter(
            "tagrelay_gateway_copies",
            "Hits through a gateway route copied to the spool, by route, kind (ga4_hit, "
            "ads_hit) and outcome: " + ", ".join(GATEWAY_COPY_OUTCOMES) + ".",
            ["route", "kind", "outcome"],
            registry=r,
        )
        self.gateway_geo = Counter(
            "tagrelay_gateway_geo",
            "Gateway requests by where the geolocation sent to Google came from: header "
            "(a trusted proxy's CDN header), database (google.gateway.geo.database), none.",
            ["source"],
            registry=r,
        )
        self.gateway_upstream_healthy = Gauge(
            "tagrelay_gateway_upstream_healthy",
            "1 when the route's <path>/healthy answered ok upstream at start-up, 0 when it "
            "did not; absent until the check is done (or when google.gateway.health_check "
            "is off).",
            ["route"],
            registry=r,
        )
        self.delivery_process_restarts = Counter(
            "tagrelay_delivery_process_restarts",
            "Times a delivery process (the HTTP forwarders, delivery.process) died and was "
            "started again (its deliveries in flight were retried).",
            registry=r,
        )
        self.config_reloads = Counter(
            "tagrelay_config_reload",
            "Reloads of the configuration (SIGHUP, tagrelay reload), by outcome: "
            + ", ".join(CONFIG_RELOAD_OUTCOMES)
            + ".",
            ["outcome"],
            registry=r,
        )
        for outcome in CONFIG_RELOAD_OUTCOMES:
            self.config_reloads.labels(outcome)
        self.encryption_reencrypted = Counter(
            "tagrelay_encryption_reencrypted_events",
            "Events re-encrypted under the first of encryption.keys by tagrelay keys rotate, "
            "by store (spool, dead_letters).",
            ["store"],
            registry=r,
        )
        self.dead_letters_expired = Counter(
            "tagrelay_dead_letters_expired",
            "Dead letters deleted because they were older than dead_letters.retention_days "
            "(on the SQLite spool; the JetStream spool's dead-letter stream drops them itself).",
            registry=r,
        )
        self.warehouse_expired = Counter(
            "tagrelay_warehouse_expired_rows",
            "Warehouse rows deleted because they were older than the forwarder's retention_days.",
            ["forwarder"],
            registry=r,
        )
        self.up = Gauge("tagrelay_up", "1 while the relay is serving.", registry=r)
        self.forwarder_last_success = Gauge(
            "tagrelay_forwarder_last_success_timestamp_seconds",
            "When the forwarder last delivered events (Unix time); absent until its first "
            "delivery since the relay started.",
            ["forwarder"],
            registry=r,
        )
        Info("tagrelay_build", "The running tagrelay's version.", registry=r).info(
            {"version": __version__}
        )
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        # of the relay's own process (Linux: read from /proc; elsewhere absent).
        ProcessCollector(registry=r)
        self._lags: dict[str, float] = {}
        self._measure_lags: Callable[[], Awaitable[Mapping[str, float]]] | None = None
        r.register(_LagCollector(lambda: self._lags))
        self._http_children: dict[tuple[str, str, str], Histogram] = {}
        self._sources: dict[str, SourceMetrics] = {}

    def http_observer(self, route: str, method: str, status_class: str) -> Histogram:
        """The labelled child of ``http_duration``, cached (labels() costs a lock and a
        lookup on every request otherwise)."""
        key = (route, method, status_class)
        child = self._http_children.get(key)
        if child is None:
            child = self._http_children[key] = self.http_duration.labels(*key)
        return child

    def source(self, source: str) -> SourceMetrics:
        """The ingest counters of one source, labelled once."""
        found = self._sources.get(source)
        if found is None:
            found = self._sources[source] = SourceMetrics(self, source)
        return found

    def watch_spool(
        self,
        depths: Callable[[], dict[str, int]],
        commits: Callable[[], int],
        size_bytes: Callable[[], int] | None = None,
    ) -> None:
        self.registry.register(_SpoolCollector(depths, commits, size_bytes))

    def watch_lag(self, measure: Callable[[], Awaitable[Mapping[str, float]]]) -> None:
        """``measure()`` gives each forwarder's lag in seconds; it reads the spool, so it is
        awaited by ``scrape`` before the registry is collected (a collector cannot wait)."""
        self._measure_lags = measure

    async def scrape(self) -> bytes:
        """The exposition of every metric, the forwarders' lag measured just before. A lag
        that cannot be measured (the spool closing) keeps its last value."""
        await self.measure_lags()
        return generate_latest(self.registry)

    async def measure_lags(self) -> dict[str, float]:
        """Measure the forwarders' lag now (``watch_lag``) and return it; the last values
        when it cannot be measured (the spool closing)."""
        if self._measure_lags is not None:
            try:
                self._lags = dict(await self._measure_lags())
            except Exception:
                # Answer with what there is (the spool may be closing).
                log.debug("could not measure the forwarders' lag", exc_info=True)
        return dict(self._lags)

    def watch_disk(self, data_dir: Path, spool_max_bytes: int) -> None:
        self.registry.register(_DiskCollector(data_dir, spool_max_bytes))

    def watch_dead_letters(self, counts: Callable[[], dict[str, int]]) -> None:
        """``tagrelay_dead_letters_stored{forwarder}`` from ``counts()`` at each scrape."""
        self.registry.register(_DeadLetterCollector(counts))

    def watch_encryption(self, backlog: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """``tagrelay_encryption_backlog_events{store,state}`` from ``backlog()`` at each
        scrape (with encryption on), and its re-encryption counter labelled."""
        self.registry.register(_EncryptionCollector(backlog))
        for store in ENCRYPTION_STORES:
            self.encryption_reencrypted.labels(store)


class SourceMetrics:
    """The ingest counters of one source, with their labels bound once."""

    def __init__(self, metrics: Metrics, source: str) -> None:
        self.received = metrics.events_received.labels(source)
        self.accepted = metrics.events_accepted.labels(source)
        self.duplicates = metrics.events_duplicate.labels(source)
        self._rejected = metrics.events_rejected
        self._source = source
        self._by_reason: dict[str, Counter] = {}

    def rejected(self, reason: str, n: int = 1) -> None:
        child = self._by_reason.get(reason)
        if child is None:
            child = self._by_reason[reason] = self._rejected.labels(self._source, reason)
        child.inc(n)
