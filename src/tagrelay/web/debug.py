"""The live debug view, on the admin listener (``tagrelay.web.admin_listener``).

- ``GET /debug``: the page (``templates/debug.html``, with ``debug.js``): a live list of the
  requests that came in and their events, filterable and pausable; per event its
  normalized form and, per forwarder, what became of it with the exact requests sent and
  the destination's answers; a panel of the forwarders; the dead letters, each with a
  replay button (``POST /dead-letters/replay``, ``web.admin_dlq``).
- ``GET /debug/stream``: Server-Sent Events. On connecting, the view attaches to the
  capture (``tagrelay.capture.DebugHub``: everything is captured while a view is
  connected, and the delivery process is told), is sent what the rings hold, then each
  record as it comes (events ``request``, ``exchange``, ``outcome``, their ``data`` the
  record's JSON) and the forwarder panel every ``PANEL_INTERVAL_SECS`` (``forwarders``).
  ``missed`` says how many records a view that fell behind did not get. When the last view
  leaves, capture stops (unless ``debug.sample_rate`` is set).
- ``GET /debug/forwarders``: the panel as JSON; ``GET /debug/dead-letters``: the newest
  dead letters (``limit``, at most ``MAX_DEAD_LETTERS``); ``GET /debug/debug.js``.

What is shown holds personal data (it is for the relay's operators, behind the admin
listener's token) and no secret: the forwarders redact what they capture with their
secrets (``forwarders._http.captured_exchange``), and the hub scrubs every secret of the
configuration out of every record and of the panel (``Config.secrets``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

import aiohttp_jinja2
import orjson
from aiohttp import web

from tagrelay.appkeys import CAPTURE, METRICS, SPOOL, WORKERS
from tagrelay.capture import Captured, DebugHub
from tagrelay.forwarders._worker import ForwarderWorker
from tagrelay.metrics import Metrics
from tagrelay.spool.dead_letters import describe
from tagrelay.web.ingest import encoded_json_response
from tagrelay.web.templates import templates_dir

__all__ = ["PANEL_INTERVAL_SECS", "ForwarderPanel", "add_debug_routes"]

PANEL_INTERVAL_SECS = 2.0
"""How often a connected view gets the forwarder panel."""
RATE_WINDOW_SECS = 10.0
"""The panel's rates (delivered/s, errors/s) are over about this long."""
HEARTBEAT_SECS = 15.0
"""A comment line on an idle stream, so that proxies keep it open."""
WAKE_SECS = 1.0
"""How often a stream checks that its view is still there."""
MAX_DEAD_LETTERS = 500
WRITE_RECORDS = 200
"""Records sent in one write when a view connects (the rings' content)."""

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
"""The page runs its own script only: what events carry is shown as text, never markup."""

PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def _sse(event: str, data: bytes, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\n".encode() + b"data: " + data + b"\n\n"


def _samples(counter: Any) -> dict[tuple[str, str], float]:
    """``(forwarder, second label) -> value`` of a counter labelled by forwarder and one
    other label (outcome, reason), from its ``_total`` samples."""
    out: dict[tuple[str, str], float] = {}
    for family in counter.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            labels = dict(sample.labels)
            forwarder = labels.pop("forwarder", "")
            other = next(iter(labels.values()), "")
            out[(forwarder, other)] = out.get((forwarder, other), 0.0) + sample.value
    return out


class ForwarderPanel:
    """The forwarder panel of one view: each forwarder's state, delivered/s and errors/s
    (over ``RATE_WINDOW_SECS``, from the counters), lag, events behind, last success and
    last failure."""

    def __init__(self, main_app: web.Application) -> None:
        self.main_app = main_app
        self._history: deque[tuple[float, dict[str, tuple[float, float]]]] = deque()

    def _totals(self, metrics: Metrics) -> dict[str, tuple[float, float]]:
        """Per forwarder: events delivered, and failures (retries and dead letters)."""
        events = _samples(metrics.forwarder_events)
        retries = _samples(metrics.forwarder_retries)
        totals: dict[str, tuple[float, float]] = {}
        for forwarder in self.main_app[WORKERS]:
            delivered = events.get((forwarder, "delivered"), 0.0)
            failed = events.get((forwarder, "dead_letter"), 0.0) + sum(
                v for (f, _), v in retries.items() if f == forwarder
            )
            totals[forwarder] = (delivered, failed)
        return totals

    async def snapshot(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        app = self.main_app
        metrics = app[METRICS]
        spool = app[SPOOL]
        workers: dict[str, ForwarderWorker] = app[WORKERS]
        totals = self._totals(metrics)
        history = self._history
        history.append((now, totals))
        while len(history) > 2 and now - history[1][0] >= RATE_WINDOW_SECS:
            history.popleft()
        then, before = history[0]
        elapsed = now - then
        lags = await metrics.measure_lags()
        panel = []
        for forwarder, worker in workers.items():
            status = worker.status()
            delivered, failed = totals.get(forwarder, (0.0, 0.0))
            old_delivered, old_failed = before.get(forwarder, (delivered, failed))
            last_success = metrics.registry.get_sample_value(
                "tagrelay_forwarder_last_success_timestamp_seconds", {"forwarder": forwarder}
            )
            last_error = worker.last_error
            if not status["running"]:
                state = "stopped"
            elif status["attempts"]:
                state = "retrying"
            else:
                state = "running"
            panel.append(
                {
                    "id": forwarder,
                    "type": getattr(worker.config, "type", ""),
                    "endpoint": getattr(worker.forwarder, "endpoint_host", None),
                    "state": state,
                    "attempts": status["attempts"],
                    "failing_since_ms": status["failing_since_ms"],
                    "delivered_per_sec": (
                        round((delivered - old_delivered) / elapsed, 2) if elapsed > 0 else None
                    ),
                    "errors_per_sec": (
                        round((failed - old_failed) / elapsed, 2) if elapsed > 0 else None
                    ),
                    "delivered": delivered,
                    "lag_secs": round(lags.get(forwarder, 0.0), 3),
                    "behind": spool.depth(forwarder),
                    "last_success_ms": int(last_success * 1000) if last_success else None,
                    "last_error": None
                    if last_error is None
                    else {
                        "at_ms": int(last_error.at * 1000),
                        "reason": last_error.reason,
                        "detail": last_error.detail,
                    },
                }
            )
        return panel


def workers_of(main_app: web.Application) -> dict[str, ForwarderWorker]:
    workers: dict[str, ForwarderWorker] = main_app[WORKERS]
    return workers


def _json(hub: DebugHub, body: Any) -> web.Response:
    data = hub.scrub(orjson.dumps(body, default=str).decode()).encode()
    response = encoded_json_response(200, data)
    response.headers["Cache-Control"] = "no-store"
    return response


def add_debug_routes(admin: web.Application, main_app: web.Application) -> None:
    """The debug view's routes of ``main_app`` on its admin listener's application
    ``admin`` (which has aiohttp-jinja2 set up, and checks the token)."""
    script = (templates_dir() / "debug.js").read_bytes()

    async def page(request: web.Request) -> web.Response:
        hub = main_app[CAPTURE]
        response = aiohttp_jinja2.render_template(
            "debug.html",
            request,
            {
                "forwarders": sorted(workers_of(main_app)),
                "buffer_events": hub.requests.capacity,
                "sample_rate": hub.sample_rate,
            },
        )
        response.headers.update(PAGE_HEADERS)
        return response

    async def debug_js(request: web.Request) -> web.Response:
        return web.Response(
            body=script,
            content_type="application/javascript",
            charset="utf-8",
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    async def forwarders(request: web.Request) -> web.Response:
        hub = main_app[CAPTURE]
        return _json(hub, {"forwarders": await ForwarderPanel(main_app).snapshot()})

    async def dead_letters(request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            limit = 0
        if not 0 < limit <= MAX_DEAD_LETTERS:
            return web.json_response(
                {
                    "error": "bad_request",
                    "message": f"limit must be between 1 and {MAX_DEAD_LETTERS}",
                },
                status=400,
            )
        spool = main_app[SPOOL]
        rows = await spool.dead_letters(limit=limit, newest_first=True, forwarder=None)
        stored = spool.dead_letter_counts()
        return _json(
            main_app[CAPTURE],
            {"dead_letters": [describe(row) for row in rows], "stored": stored},
        )

    async def stream(request: web.Request) -> web.StreamResponse:
        hub = main_app[CAPTURE]
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
            }
        )
        await response.prepare(request)
        subscription = await hub.attach()
        panel = ForwarderPanel(main_app)
        try:
            hello = {"rate": hub.rate, "buffer_events": hub.requests.capacity}
            await response.write(_sse("hello", orjson.dumps(hello)))
            backlog = hub.backlog()
            last_seq = backlog[-1].seq if backlog else 0
            for start in range(0, len(backlog), WRITE_RECORDS):
                chunk = backlog[start : start + WRITE_RECORDS]
                await response.write(b"".join(_sse(c.kind, c.data, c.seq) for c in chunk))
            await _send_panel(response, hub, panel)
            next_panel = time.monotonic() + PANEL_INTERVAL_SECS
            quiet_since = time.monotonic()
            missed = 0
            while not subscription.closed:
                transport = request.transport
                if transport is None or transport.is_closing():
                    break  # the view went away
                items: list[Captured] = await subscription.next(WAKE_SECS)
                if subscription.missed != missed:
                    gap = subscription.missed - missed
                    missed = subscription.missed
                    await response.write(_sse("missed", orjson.dumps({"records": gap})))
                fresh = [item for item in items if item.seq > last_seq]
                if fresh:
                    # One write for what arrived together: a busy relay sends thousands of
                    # records a second.
                    await response.write(b"".join(_sse(c.kind, c.data, c.seq) for c in fresh))
                    last_seq = fresh[-1].seq
                now = time.monotonic()
                if now >= next_panel:
                    await _send_panel(response, hub, panel)
                    next_panel = now + PANEL_INTERVAL_SECS
                    quiet_since = now
                elif items:
                    quiet_since = now
                elif now - quiet_since >= HEARTBEAT_SECS:
                    await response.write(b": keep-alive\n\n")
                    quiet_since = now
        except ConnectionError:
            return response  # the view went away
        finally:
            await asyncio.shield(hub.detach(subscription))
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
        return response

    async def end_views(_: web.Application) -> None:
        # The listener is closing: the streams end now rather than at its timeout.
        main_app[CAPTURE].close()

    admin.on_shutdown.append(end_views)
    admin.router.add_get("/debug", page)
    admin.router.add_get("/debug/stream", stream)
    admin.router.add_get("/debug/forwarders", forwarders)
    admin.router.add_get("/debug/dead-letters", dead_letters)
    admin.router.add_get("/debug/debug.js", debug_js)


async def _send_panel(response: web.StreamResponse, hub: DebugHub, panel: ForwarderPanel) -> None:
    data = hub.scrub(orjson.dumps({"forwarders": await panel.snapshot()}).decode()).encode()
    await response.write(_sse("forwarders", data))
