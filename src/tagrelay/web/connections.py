"""The relay's HTTP connections: time limits, a connection cap, and malformed requests.

aiohttp reads each connection with a ``RequestHandler`` (its asyncio protocol). Out of the
box it closes a connection left idle after a response, but nothing bounds how long a client
may take to send a request head or a body: a client sending its headers a byte at a time
(slowloris), or a body that trickles, holds its connection for as long as it likes, and the
open-files limit is the only cap. And it logs every request that is not valid HTTP as an
ERROR with a traceback, answering it in plain text.

``GuardedRequestHandler`` gives each connection one deadline, for the phase it is in::

    open --> head --> [body] --> the route's handler --> response --> idle --> head ...
             header_timeout_secs from the connection opening (first request) or from the
                 first byte of the next request;
                      body_timeout_secs from the end of the head (when it announces a body);
                                 none while the route's handler runs;
                                                                   keepalive_timeout_secs.

and closes the connection when it passes, counted in ``tagrelay_connections_closed{reason}``.
``ConnectionGuard`` counts the open connections and answers those beyond
``server.max_connections`` with a 503 at once (reason ``over_capacity``): a load balancer
then tries another replica instead of queueing behind a saturated one. ``GuardedSite`` is
aiohttp's ``TCPSite`` with these protocols; ``tagrelay serve`` listens through it.

A request that is not valid HTTP (bad request line, bad header, a head too large, bad
chunking) is the client's error, not the relay's: it is answered 400 with the relay's JSON
error body, counted in ``tagrelay_http_rejected{reason}``, and logged at DEBUG only (without
the request's bytes, which may hold credentials).

This leans on two internals of aiohttp's ``RequestHandler``: ``_request_count`` (request
heads its parser has completed) and ``_messages`` (those not yet handled, with their
bodies), and reads the server's handler arguments (``Server._kwargs``) so that whatever
``AppRunner`` or ``Application(handler_args=...)`` sets reaches these handlers too.
tests/web/test_connections.py pins the behaviour on the installed aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.http_exceptions import (
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestPayloadError
from aiohttp.web_request import BaseRequest
from yarl import URL

from tagrelay.config.models import ServerConfig
from tagrelay.logthrottle import LogThrottle
from tagrelay.metrics import CONNECTION_CLOSE_REASONS, HTTP_REJECT_REASONS, Metrics

__all__ = [
    "ConnectionGuard",
    "GuardedRequestHandler",
    "GuardedSite",
    "rejection_reason",
]

log = logging.getLogger(__name__)

REJECTION_MESSAGES = {
    "bad_request_line": "the request line is not valid HTTP/1.1 (method, target, version)",
    "bad_header": "a request header is not valid HTTP/1.1",
    "header_too_large": "the request head is too large (a line over 8190 bytes, or too many "
    "headers)",
    "bad_chunking": "the chunked request body is malformed",
    "other": "the request is not valid HTTP/1.1",
}
assert set(REJECTION_MESSAGES) == set(HTTP_REJECT_REASONS)

OVER_CAPACITY_RETRY_AFTER_SECS = 1
_OVER_CAPACITY_BODY = orjson.dumps(
    {"error": "over_capacity", "message": "too many connections open; try again"}
)
OVER_CAPACITY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: %d\r\n"
    b"Retry-After: %d\r\n"
    b"Connection: close\r\n"
    b"\r\n%s" % (len(_OVER_CAPACITY_BODY), OVER_CAPACITY_RETRY_AFTER_SECS, _OVER_CAPACITY_BODY)
)
REFUSED_LINGER_SECS = 1.0
"""How long a refused connection stays open after its 503, for the client to read it (closing
a socket with the client's request still unread sends a reset, which may destroy the 503)."""
REFUSED_LINGERING_MAX = 64
"""Most refused connections lingering at once; beyond, a refusal is a bare reset (a flood of
connections must not use up the files that the cap keeps in reserve)."""


def rejection_reason(exc: HttpProcessingError) -> str:
    """The ``tagrelay_http_rejected`` reason of a parse error of aiohttp's HTTP parser (its C
    parser and its pure-Python one raise different classes for the same fault)."""
    if isinstance(exc, LineTooLong):
        return "header_too_large"
    if isinstance(exc, BadStatusLine | InvalidURLError):  # BadHttpMethod is a BadStatusLine
        return "bad_request_line"
    if isinstance(exc, TransferEncodingError):
        return "bad_chunking"
    text = exc.message.lower() if isinstance(exc.message, str) else ""
    if "too many headers" in text:
        return "header_too_large"
    if "chunk" in text:
        return "bad_chunking"
    if isinstance(exc, InvalidHeader) or any(
        word in text for word in ("header", "content-length", "transfer-encoding")
    ):
        return "bad_header"
    return "other"


class ConnectionGuard:
    """The time limits and the connection cap of one listener, and its counters."""

    def __init__(
        self, server: ServerConfig, metrics: Metrics, *, max_connections: int | None = None
    ) -> None:
        self.header_timeout = server.header_timeout_secs
        self.body_timeout = server.body_timeout_secs
        self.keepalive_timeout = server.keepalive_timeout_secs
        self.max_connections = max_connections or server.max_connections
        self.open = 0
        """Connections open now (refused ones not included)."""
        self.refusing = 0
        """Refused connections still open (for the client to read its 503)."""
        metrics.connections_open.set_function(lambda: self.open)
        self._closed = {r: metrics.connections_closed.labels(r) for r in CONNECTION_CLOSE_REASONS}
        self._rejected = {r: metrics.http_rejected.labels(r) for r in HTTP_REJECT_REASONS}
        self._throttle = LogThrottle(log)

    def protocol_factory(
        self, server: web.Server, loop: asyncio.AbstractEventLoop
    ) -> Callable[[], asyncio.Protocol]:
        """What ``loop.create_server`` calls for each accepted connection: a guarded aiohttp
        handler of ``server`` (the app's), or, beyond the cap, a refusal."""
        kwargs: dict[str, Any] = {
            **server._kwargs,
            # aiohttp's own idle timer stays as a backstop that never fires first.
            "keepalive_timeout": self.keepalive_timeout + self.header_timeout + 1,
        }

        def protocol() -> asyncio.Protocol:
            if self.open >= self.max_connections:
                self.closed("over_capacity")
                self._throttle.log(
                    logging.WARNING,
                    "over_capacity",
                    "refusing connections: server.max_connections are open",
                    extra={"max_connections": self.max_connections},
                )
                return RefusedConnection(self)
            return GuardedRequestHandler(server, guard=self, loop=loop, **kwargs)

        return protocol

    def closed(self, reason: str) -> None:
        self._closed[reason].inc()

    def rejected(self, reason: str) -> None:
        self._rejected[reason].inc()


class RefusedConnection(asyncio.Protocol):
    """A connection beyond the cap: a 503 with ``Retry-After``, then closed."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._timer: asyncio.TimerHandle | None = None
        self._lingering = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass it
        if self._guard.refusing >= REFUSED_LINGERING_MAX:
            transport.abort()
            return
        self._lingering = True
        self._guard.refusing += 1
        transport.write(OVER_CAPACITY_RESPONSE)
        if transport.can_write_eof():
            transport.write_eof()  # the client sees the end of the answer and closes
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_SECS, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # read and dropped, so that the close is not a reset

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lingering:
            self._lingering = False
            self._guard.refusing -= 1
        if self._timer is not None:
            self._timer.cancel()


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's protocol with a deadline per phase of the connection (see the module)."""

    __slots__ = (
        "_body",
        "_counted",
        "_deadline",
        "_deadline_reason",
        "_guard",
        "_head_open",
        "_timer",
        "_timer_at",
    )

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._deadline = 0.0
        self._deadline_reason: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._head_open = False
        self._body: StreamReader | None = None
        self._counted = False

    # -- the connection's phases

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._counted = True
        self._guard.open += 1
        self._head_open = True
        self._arm("header_timeout", self._guard.header_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._guard.open -= 1
        self._deadline_reason = None
        self._body = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self.transport is None:
            return
        if self._request_count != heads:
            # One head (or more, pipelined) is complete; the newest may announce a body.
            self._head_open = False
            newest = self._messages[-1] if self._messages else None
            if (
                self._body is not None
                and newest is not None
                and not isinstance(newest[0], RawRequestMessage)
            ):
                # Not a head but a parse error, in the body being read (bad chunking): the
                # route reading it fails now rather than waiting for the rest until
                # body_timeout_secs.
                self._body.set_exception(
                    RequestPayloadError("the request body is malformed (bad chunking)")
                )
            body = newest[1] if newest is not None else None
            if body is not None and not body.is_eof():
                self._body = body
                self._arm("body_timeout", self._guard.body_timeout)
            else:
                self._body = None
                self._deadline_reason = None  # the route's handler has it now
        elif self._body is not None:
            if self._body.is_eof():
                self._body = None
                self._deadline_reason = None
        elif data and not self._head_open:
            # The first bytes of the next request on a kept-alive connection.
            self._head_open = True
            self._arm("header_timeout", self._guard.header_timeout)

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        answered = await super().finish_response(request, resp, start_time)
        if not self._messages and not self._head_open and self._body is None:
            self._arm("idle_timeout", self._guard.keepalive_timeout)
        return answered

    def _arm(self, reason: str, secs: float) -> None:
        """Close the connection ``secs`` from now unless the phase changes before. One
        timer per connection: moved earlier by rescheduling, later lazily (it fires, sees
        the later deadline and waits again), so most requests create no timer at all."""
        loop = self._loop
        deadline = loop.time() + secs
        self._deadline = deadline
        self._deadline_reason = reason
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._on_deadline)
            self._timer_at = deadline

    def _on_deadline(self) -> None:
        self._timer = None
        reason = self._deadline_reason
        if reason is None or self.transport is None:
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_deadline)
            self._timer_at = self._deadline
            return
        self._deadline_reason = None
        self._guard.closed(reason)
        log.debug("closed a connection", extra={"reason": reason})
        # A route's handler still reading the body sees ConnectionResetError.
        self.force_close()

    # -- requests that are not valid HTTP

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """aiohttp logs an ERROR with a traceback when the rest of a request body it reads
        after the response (to keep the connection usable) turns out malformed: the
        client's fault, so a DEBUG line here."""
        exc = kwargs.get("exc_info")
        if isinstance(exc, RequestPayloadError | HttpProcessingError):
            log.debug("a request body was malformed", extra={"error": type(exc).__name__})
            return
        super().log_exception(*args, **kwargs)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status != 400 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        reason = rejection_reason(exc)
        self._guard.rejected(reason)
        log.debug(
            "refused a request that is not valid HTTP",
            extra={"reason": reason, "error": type(exc).__name__},
        )
        if request.writer.output_size > 0:
            raise ConnectionError("a response was sent already; the connection is broken")
        resp = web.Response(
            status=400,
            body=orjson.dumps({"error": reason, "message": REJECTION_MESSAGES[reason]}),
            content_type="application/json",
        )
        resp.force_close()
        return resp


class GuardedSite(web.BaseSite):
    """aiohttp's ``TCPSite`` with the guard's protocols."""

    __slots__ = ("_bound_port", "_guard", "_host", "_port", "_reuse_address", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        *,
        backlog: int = 128,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard
        self._reuse_address = reuse_address
        self._reuse_port = reuse_port
        self._bound_port: int | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one chosen by the system, once started with 0)."""
        return self._port if self._bound_port is None else self._bound_port

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self.port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(
            self._guard.protocol_factory(server, loop),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        self._server = listener
        if listener.sockets:
            self._bound_port = listener.sockets[0].getsockname()[1]
