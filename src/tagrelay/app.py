"""``create_app(config)``: the one place that wires the parts of the relay together.

Start-up order (``cleanup_ctx``, torn down in reverse): the identity store's keys are
checked (``identity_store.enabled``: a key missing refuses the start); the spool opens (and
starts pruning and checkpointing every ``spool.prune_interval_secs``); the delivery loop
starts in its own thread, with the shared HTTP client session and one worker per enabled
forwarder on it (``forwarders._fleet``; the identity store's writer among them); the admin
socket (for ``tagrelay sql``) listens, then the admin listener (``admin.listen``:
/metrics, the admin API and the debug view, ``tagrelay.web.admin_listener``). The debug
view's capture (``tagrelay.capture.DebugHub``,
``app[CAPTURE]``) is handed to ingest, to the forwarders and their workers, and to the
delivery process. On shutdown aiohttp first stops accepting connections and lets in-flight
requests finish (their commits included), then the admin listener and socket close, the
workers finish their batches, and the spool closes.

A reload (``tagrelay.reload``: SIGHUP, ``tagrelay reload``) changes what it can of this
while the relay runs: the forwarders, the keys, the pipeline's settings, the configured
paths (served through one resource, ``web.paths.ConfiguredPaths``, since the router is
frozen once the app starts), the debug view's settings. The Google tag gateway's routes
(``web.gateway``) and their upstream client are made once: they take a restart.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import Histogram

from tagrelay.appkeys import (
    CAPTURE,
    CONFIG,
    DELIVERY_LOOP,
    FLEET,
    INGEST,
    METRICS,
    READY,
    SPOOL,
    SUPPRESSION,
    WORKERS,
)
from tagrelay.capture import DebugHub
from tagrelay.config.models import Config
from tagrelay.forwarders._fleet import Fleet
from tagrelay.forwarders._http import scrub_secrets
from tagrelay.forwarders._loop import DeliveryLoop
from tagrelay.forwarders._worker import ForwarderWorker
from tagrelay.identity_store import IDENTITY_WRITER_ID, StoreSettings
from tagrelay.logthrottle import LogThrottle
from tagrelay.metrics import Metrics
from tagrelay.pipeline.suppression import Suppression
from tagrelay.reload import RELOADER, Reloader
from tagrelay.spool.backend import Spool, make_spool
from tagrelay.spool.dead_letters import Selection
from tagrelay.spool.encryption import PayloadCipher
from tagrelay.spool.sqlite import SqliteSpool
from tagrelay.web.admin import admin_socket_ctx
from tagrelay.web.admin_listener import ADMIN_LISTENER, AdminListener, admin_listener_ctx
from tagrelay.web.bodies import SERVER_HANDLER_ARGS
from tagrelay.web.demo import add_demo_routes
from tagrelay.web.gateway import add_gateway_routes
from tagrelay.web.google import add_google_routes
from tagrelay.web.google_scripts import add_google_script_routes
from tagrelay.web.health import add_health_routes, add_metrics_route
from tagrelay.web.ingest import IngestService, json_response
from tagrelay.web.paths import ConfiguredPaths, configured_routes
from tagrelay.web.routes import ingest_routes
from tagrelay.web.sdks import add_sdk_routes

log = logging.getLogger(__name__)


def identity_settings(config: Config) -> StoreSettings | None:
    """How to open the identity store, or None when ``identity_store.enabled`` is off."""
    if not config.identity_store.enabled:
        return None
    return StoreSettings(config.identity_store, tuple(config.encryption.keys))


def admin_socket_path(data_dir: Path) -> Path:
    return data_dir / "admin.sock"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""HTTP methods that get their own metric label; any other is counted as ``other``."""


_HTTP_ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
}
_HTTP_ERROR_MESSAGES = {404: "no such endpoint"}
_HTTP_ERROR_KEPT_HEADERS = ("Allow", "Content-Range", "Retry-After")


def http_error_response(exc: web.HTTPException) -> web.Response:
    """aiohttp's own error (4xx, 5xx; raised by the router or while reading a request) as
    the relay's JSON ``{"error", "message"}``, instead of its plain text."""
    code = _HTTP_ERROR_CODES.get(exc.status) or exc.reason.lower().replace(" ", "_")
    message = _HTTP_ERROR_MESSAGES.get(exc.status) or exc.reason
    if exc.text and exc.text != f"{exc.status}: {exc.reason}":
        message = exc.text  # aiohttp's own words, e.g. the body size it refused
    headers = {name: exc.headers[name] for name in _HTTP_ERROR_KEPT_HEADERS if name in exc.headers}
    return json_response(exc.status, {"error": code, "message": message}, headers)


def observe_requests(metrics: Metrics) -> Middleware:
    """A middleware that times every request by route template, method and status class,
    and turns any unexpected exception into a JSON 500 (a bug, logged with its traceback)
    instead of a dropped connection. Every error aiohttp raises (unknown paths and methods,
    a body it refused) answers JSON too."""
    # (route, method, status) -> labelled histogram; all three are bounded.
    children: dict[tuple[object, str, int], Histogram] = {}

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            if status < 400:
                raise
            return http_error_response(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, ConnectionResetError) and _client_gone(request):
                # The client hung up (or was cut off for sending too slowly) while a route
                # read its body: nobody will read an answer, and it is not the relay's error.
                status = 400
                log.debug("client went away", extra={"path": request.path})
                return json_response(
                    400, {"error": "client_disconnected", "message": "the client went away"}
                )
            log.exception("unhandled error", extra={"path": request.path})
            return json_response(500, {"error": "internal_error", "message": "internal error"})
        finally:
            route = request.match_info.route
            method = request.method if request.method in KNOWN_METHODS else "other"
            key = (route, method, status)
            child = children.get(key)
            if child is None:
                resource = route.resource
                name = resource.canonical if resource is not None else "unmatched"
                child = children[key] = metrics.http_observer(name, method, f"{status // 100}xx")
            child.observe(time.perf_counter() - start)

    return observe


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def create_app(
    config: Config,
    *,
    data_dir: Path | None = None,
    admin_socket: bool = True,
    admin_listener: bool = False,
) -> web.Application:
    """Build the relay. ``data_dir`` overrides ``config.data_dir`` (the CLI's ``--data-dir``).
    ``admin_socket``: listen on the admin socket; ``admin_listener``: run the admin listener
    when ``admin.enabled`` (``tagrelay serve`` does; off by default, so that an app made in
    a test binds no fixed port: a test that wants it sets ``admin.listen`` to port 0)."""
    data_dir = data_dir or config.data_dir
    metrics = Metrics()
    app = web.Application(
        client_max_size=config.limits.max_request_bytes,
        middlewares=[observe_requests(metrics)],
        # Bodies arrive as sent and are decoded by web.bodies.read_body, within the limit;
        # on the application, so that every server made for it (tagrelay serve, tests) has it.
        handler_args=SERVER_HANDLER_ARGS,
    )
    encryption_keys = tuple(key.get_secret_value() for key in config.encryption.keys)
    spool = make_spool(config, data_dir, PayloadCipher(config.encryption.keyring()))
    app[CONFIG] = config
    app[METRICS] = metrics
    app[SPOOL] = spool
    app[WORKERS] = {}
    app[DELIVERY_LOOP] = DeliveryLoop()
    app[READY] = {"spool": False, "forwarders": False}
    capture = app[CAPTURE] = DebugHub(
        sample_rate=config.debug.sample_rate,
        buffer_events=config.debug.buffer_events,
        scrub=functools.partial(scrub_secrets, secrets=config.secrets()),
    )
    suppression = app[SUPPRESSION] = Suppression.load(data_dir)
    app[INGEST] = IngestService(config, spool, metrics, capture, suppression)
    metrics.watch_spool(
        depths=lambda: {fid: spool.depth(fid) for fid in app[WORKERS]},
        commits=lambda: spool.commits,
        size_bytes=lambda: spool_size_bytes(spool.path) if isinstance(spool, SqliteSpool) else 0,
    )
    metrics.watch_disk(data_dir, config.spool.max_size_mb * 1024 * 1024)
    spool.on_commit = metrics.spool_commit_duration.observe
    if spool.cipher.enabled:
        metrics.watch_encryption(spool.encryption_backlog)
        spool.on_reencrypted = lambda store, n: metrics.encryption_reencrypted.labels(store).inc(n)
    workers: dict[str, ForwarderWorker] = app[WORKERS]
    metrics.watch_dead_letters(lambda: {**dict.fromkeys(workers, 0), **spool.dead_letter_counts()})

    async def lags() -> dict[str, float]:
        return await forwarder_lags(spool, list(workers))

    metrics.watch_lag(lags)

    def current_config() -> Config:
        return app[RELOADER].config

    async def spool_ctx(app: web.Application) -> AsyncIterator[None]:
        await spool.open()
        app[READY]["spool"] = True
        pruner = asyncio.create_task(
            _prune_loop(spool, current_config, metrics.dead_letters_expired.inc)
        )
        yield
        pruner.cancel()
        app[READY]["spool"] = False
        await spool.close()

    identity = identity_settings(config)
    fleet = app[FLEET] = Fleet(
        spool,
        metrics,
        data_dir,
        delivery_process=config.delivery.process,
        niceness=config.delivery.niceness,
        stop_timeout_secs=config.server.shutdown_timeout_secs,
        capture=capture,
        encryption_keys=encryption_keys,
        identity=identity,
    )

    async def tell_process(rate: float) -> None:
        # A view connected or the last one left: the delivery process captures or not.
        await app[DELIVERY_LOOP].call(fleet.set_capture_rate(rate))

    async def forwarders_ctx(app: web.Application) -> AsyncIterator[None]:
        enabled = [f for f in config.forwarders if f.enabled]
        internal = {IDENTITY_WRITER_ID} if identity is not None else set()
        retired = await spool.retire_cursors_except({f.id for f in enabled} | internal)
        for name in retired:
            log.info(
                "kept the cursor of a forwarder no longer configured",
                extra={
                    "forwarder": name,
                    "forget_after_secs": config.spool.forget_cursor_after_secs,
                },
            )
        await _forget_cursors(spool, config.spool.forget_cursor_after_secs)
        delivery = app[DELIVERY_LOOP]
        capture.bind(asyncio.get_running_loop())
        delivery.start()
        try:
            app[WORKERS].update(await delivery.call(fleet.start(enabled)))
            capture.rate_listeners.append(tell_process)
            app[READY]["forwarders"] = True
            metrics.up.set(1)
            yield
        finally:
            metrics.up.set(0)
            app[READY]["forwarders"] = False
            capture.close()
            if tell_process in capture.rate_listeners:
                capture.rate_listeners.remove(tell_process)
            await delivery.call(fleet.close())
            await delivery.close()

    async def identity_store_ctx(app: web.Application) -> AsyncIterator[None]:
        # First of all: a key missing from encryption.keys stops the start here, with the
        # key id the store needs, before anything else is open; a plaintext store is
        # encrypted now. The writer and readers open it again where they run.
        if identity is not None:
            store = await identity.open(data_dir, writer=True)
            await store.close()
        yield

    app.cleanup_ctx.append(identity_store_ctx)
    app.cleanup_ctx.append(spool_ctx)
    app.cleanup_ctx.append(forwarders_ctx)
    if admin_socket:
        app.cleanup_ctx.append(admin_socket_ctx(admin_socket_path(data_dir)))
    if config.admin.enabled and admin_listener:
        listener = app[ADMIN_LISTENER] = AdminListener(config.admin.host)
        app.cleanup_ctx.append(admin_listener_ctx(listener))

    prefix = config.server.base_path
    add_health_routes(app.router, app, prefix)
    if config.metrics.public:
        add_metrics_route(app.router, app, prefix)
    sdks = add_sdk_routes(app.router, config, app[INGEST], metrics, prefix)
    google = add_google_routes(app.router, config, app[INGEST], prefix)
    if config.google.scripts.ids:
        add_google_script_routes(
            app,
            config.google.scripts,
            prefix,
            data_dir / "google-scripts",
            on_event=lambda kind, outcome: metrics.google_scripts.labels(kind, outcome).inc(),
        )
    if config.google.gateway.routes:
        add_gateway_routes(app, config, app[INGEST], metrics, prefix)
    ingest_routes(app.router, app[INGEST], prefix)
    # paths.script, .events and .identity: one resource dispatching on the current paths,
    # which a reload may change (the router is frozen once the app starts).
    paths = ConfiguredPaths(prefix)
    paths.set_routes(configured_routes(config, app[INGEST]))
    app.router.register_resource(paths)
    if config.demo.enabled:
        add_demo_routes(app, config, prefix)
    app[RELOADER] = Reloader(app, paths=paths, google=google, sdks=sdks)
    return app


def freeze_after_startup(app: web.Application) -> None:
    """Once the relay has started, move every object alive then (modules, config, routes,
    the Public Suffix List when cookies need it, the forwarders) out of the garbage
    collector's reach (``gc.freeze``). They live as long as the process, and a full
    collection walked all of them: about 40 ms per collection under load, a pause for every
    request in flight, and over a tenth of the event loop's time at batch rates. For the
    serving process only: objects frozen are never collected as cycles."""

    async def freeze(app: web.Application) -> None:
        identity = app[INGEST].identity
        if identity is not None:
            identity.load_suffix_list()  # ~47,000 objects: in before the freeze
        gc.collect()
        gc.freeze()

    app.on_startup.append(freeze)


SPOOL_FILE_SUFFIXES = ("", "-wal", "-shm")


def spool_size_bytes(path: Path) -> int:
    """The size on disk of the spool database at ``path`` with its WAL and shared memory."""
    total = 0
    for suffix in SPOOL_FILE_SUFFIXES:
        try:
            total += path.with_name(path.name + suffix).stat().st_size
        except OSError:
            continue  # not there (yet): nothing on disk
    return total


async def forwarder_lags(
    spool: Spool, forwarders: list[str], now: Callable[[], float] = time.time
) -> dict[str, float]:
    """Each forwarder's lag: the age in seconds of the oldest event past its cursor (when
    the relay received it), 0 when it has caught up. One indexed read per distinct cursor."""
    positions = spool.positions()
    oldest: dict[int, int | None] = {}
    lags: dict[str, float] = {}
    for forwarder in forwarders:
        position = positions.get(forwarder)
        if position is None or spool.depth(forwarder) <= 0:
            lags[forwarder] = 0.0
            continue
        if position not in oldest:
            oldest[position] = await spool.first_received_ms(position)
        received_ms = oldest[position]
        lags[forwarder] = 0.0 if received_ms is None else max(0.0, now() - received_ms / 1000)
    return lags


ENCRYPTION_RECOUNT_SECS = 60.0
"""How often maintenance counts again the events not under the first key (pruning and
purges shrink it), while there are some."""


async def _prune_loop(
    spool: Spool,
    current: Callable[[], Config],
    on_expired: Callable[[int], object] | None = None,
) -> None:
    """Every ``spool.prune_interval_secs``: forget the cursors of forwarders removed longer
    ago than ``spool.forget_cursor_after_secs``, delete delivered events, expired message
    ids and dead letters older than ``dead_letters.retention_days``, and checkpoint the WAL;
    every ``ENCRYPTION_RECOUNT_SECS``, count the events not yet under the first encryption
    key while there are some (``tagrelay_encryption_backlog_events``).
    The settings are read from ``current()`` each round (a reload may change them). A
    failure that lasts (a full disk) is logged once a minute."""
    failures = LogThrottle(log)
    recount_at = time.monotonic() + ENCRYPTION_RECOUNT_SECS
    while True:
        config = current()
        await asyncio.sleep(config.spool.prune_interval_secs)
        try:
            await _forget_cursors(spool, config.spool.forget_cursor_after_secs)
            await spool.prune()
            await spool.prune_message_ids()
            expired = await _expire_dead_letters(spool, config.dead_letters.retention_days * 86_400)
            if expired and on_expired is not None:
                on_expired(expired)
            await spool.checkpoint()
            if time.monotonic() >= recount_at:  # free once nothing is left
                await spool.count_encryption_backlog()
                recount_at = time.monotonic() + ENCRYPTION_RECOUNT_SECS
        except Exception:
            failures.log(
                logging.WARNING,
                "maintenance",
                "spool maintenance failed; will try again",
                exc_info=True,
            )


async def _forget_cursors(spool: Spool, after_secs: float) -> None:
    """Forget the cursors of forwarders removed (retired) ``after_secs`` ago or longer."""
    cutoff_ms = int((time.time() - after_secs) * 1000)
    for name in await spool.forget_retired_cursors(cutoff_ms):
        log.warning(
            "forgot the cursor of a forwarder no longer configured",
            extra={"forwarder": name, "forget_after_secs": after_secs},
        )


async def _expire_dead_letters(spool: Spool, retention_secs: float) -> int:
    """Delete the dead letters older than ``retention_secs`` (``dead_letters.retention_days``;
    an indexed lookup that finds nothing most of the time); how many."""
    if spool.expires_dead_letters:
        return 0
    cutoff_ms = int((time.time() - retention_secs) * 1000)
    deleted = await spool.purge_dead_letters(Selection(before_ms=cutoff_ms))
    if deleted:
        log.info(
            "deleted dead letters past their retention",
            extra={"dead_letters": deleted, "retention_days": round(retention_secs / 86_400, 3)},
        )
    return deleted
