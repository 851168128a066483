"""Slow and idle connections are closed, the connection cap holds, and a request that is not
valid HTTP is a counted 400, not an ERROR: a relay started as ``tagrelay serve`` starts it
(``start_relay`` on the loop ``server.event_loop`` picks, asyncio's and uvloop's), driven
over raw sockets.

Time limits are small here (a fraction of a second); a close is awaited for many times its
limit, so a loaded machine cannot make these tests fail, only take longer."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tagrelay.app import create_app
from tagrelay.cli.serve import new_event_loop, start_relay
from tagrelay.metrics import Metrics
from tagrelay.web.connections import (
    REFUSED_LINGERING_MAX,
    ConnectionGuard,
    GuardedRequestHandler,
    RefusedConnection,
)
from tests.support import SERVER_KEY, make_config, metric_value

LOOPS = ["asyncio", "uvloop"]
LIMIT = 0.4
"""header_timeout_secs, body_timeout_secs and keepalive_timeout_secs of these tests."""
PATIENCE = 30 * LIMIT
"""How long a test waits for a close it expects (generous: never a flake under load)."""

Scenario = Callable[[web.Application, int], Awaitable[None]]


def run_served(tmp_path: Path, loop_name: str, scenario: Scenario, **server: Any) -> None:
    limits = {
        "header_timeout_secs": LIMIT,
        "body_timeout_secs": LIMIT,
        "keepalive_timeout_secs": LIMIT,
    }
    config = make_config(tmp_path, server={**limits, **server})
    app = create_app(config, admin_socket=False)
    loop = new_event_loop(loop_name)

    async def main() -> None:
        runner, site = await start_relay(app, config, "127.0.0.1", 0)
        try:
            await scenario(app, site.port)
        finally:
            await runner.cleanup()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (within PATIENCE)."""
    received = b""
    async with asyncio.timeout(PATIENCE):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float = LIMIT / 8) -> None:
    """Send ``data`` a byte at a time until the server hangs up."""
    try:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(every)
    except ConnectionError:
        pass


async def healthz(port: int) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/healthz") as resp,
    ):
        return resp.status


def auth() -> bytes:
    return b"Authorization: Basic " + base64.b64encode(f"{SERVER_KEY}:".encode()) + b"\r\n"


async def wait_for_metric(
    app: web.Application, name: str, labels: dict[str, str], value: float
) -> None:
    async with asyncio.timeout(PATIENCE):
        while metric_value(app, name, labels) != value:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_slowloris_is_closed_after_the_header_timeout(tmp_path: Path, loop_name: str) -> None:
    async def scenario(app: web.Application, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = b"GET /healthz HTTP/1.1\r\nHost: relay.test\r\n" + b"X-Pad: a\r\n" * 1000
        sender = asyncio.create_task(trickle(writer, head))
        assert await healthz(port) == 200, "the relay serves others meanwhile"
        assert await closed_by_server(reader) == b""
        assert not sender.done(), "closed while the head was still arriving"
        sender.cancel()
        writer.close()
        labels = {"reason": "header_timeout"}
        assert metric_value(app, "tagrelay_connections_closed_total", labels) == 1

    run_served(tmp_path, loop_name, scenario)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    tmp_path: Path, loop_name: str
) -> None:
    async def scenario(app: web.Application, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_by_server(reader) == b""
        writer.close()
        labels = {"reason": "header_timeout"}
        assert metric_value(app, "tagrelay_connections_closed_total", labels) == 1

    # A keep-alive timeout far longer than the test: only the header timeout can close it.
    run_served(tmp_path, loop_name, scenario, keepalive_timeout_secs=3600)


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("path", ["/v1/track", "/v1/m"])
def test_a_slow_body_is_cut_off_after_the_body_timeout(
    tmp_path: Path, loop_name: str, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(app: web.Application, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = orjson.dumps({"type": "track", "event": "slow", "anonymousId": "a" * 2000})
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: relay.test\r\nContent-Type: application/json\r\n"
            % path.encode()
            + auth()
            + b"Content-Length: %d\r\n\r\n" % len(body)
        )
        sender = asyncio.create_task(trickle(writer, body))
        assert await healthz(port) == 200, "the relay serves others meanwhile"
        await closed_by_server(reader)
        assert not sender.done(), "closed while the body was still arriving"
        sender.cancel()
        writer.close()
        labels = {"reason": "body_timeout"}
        assert metric_value(app, "tagrelay_connections_closed_total", labels) == 1
        assert metric_value(app, "tagrelay_events_accepted_total", {"source": "segment"}) == 0

    # A header timeout far longer than the test: only the body timeout can close it.
    run_served(tmp_path, loop_name, scenario, header_timeout_secs=3600)
    # The route reading the body sees the connection go: the client's doing, not an error.
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [], [(r.name, r.getMessage()) for r in loud]


@pytest.mark.parametrize("loop_name", LOOPS)
def test_an_idle_keepalive_connection_is_closed_after_its_timeout(
    tmp_path: Path, loop_name: str
) -> None:
    async def scenario(app: web.Application, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):  # kept alive between requests
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay.test\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
        assert await closed_by_server(reader) == b""
        writer.close()
        labels = {"reason": "idle_timeout"}
        assert metric_value(app, "tagrelay_connections_closed_total", labels) == 1
        assert metric_value(app, "tagrelay_connections_open", {}) == 0

    run_served(tmp_path, loop_name, scenario, header_timeout_secs=3600)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_connections_beyond_the_cap_are_refused_with_a_503_and_counted(
    tmp_path: Path, loop_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(app: web.Application, port: int) -> None:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await wait_for_metric(app, "tagrelay_connections_open", {}, 3)

        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay.test\r\n\r\n")
            answer = await closed_by_server(reader)
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503")
            assert b"Retry-After: 1" in head
            assert orjson.loads(body)["error"] == "over_capacity"
        labels = {"reason": "over_capacity"}
        assert metric_value(app, "tagrelay_connections_closed_total", labels) == 2
        assert metric_value(app, "tagrelay_connections_open", {}) == 3

        # One held connection goes: a new one is served again.
        held[0][1].close()
        await wait_for_metric(app, "tagrelay_connections_open", {}, 2)
        assert await healthz(port) == 200
        for _, held_writer in held[1:]:
            held_writer.close()

    run_served(tmp_path, loop_name, scenario, max_connections=3, header_timeout_secs=3600)
    # The operator hears of it, once per interval rather than per refused connection.
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.getMessage() == "refusing connections: server.max_connections are open"


MALFORMED = [
    ("bad_request_line", b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("bad_request_line", b"GET / HTTP/9.9\r\nHost: a\r\n\r\n"),
    ("bad_request_line", b"GET \x01/ HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("bad_header", b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n"),
    ("bad_header", b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n"),
    ("bad_header", b"POST /v1/track HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n"),
    ("bad_header", b"POST /v1/track HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\na"),
    ("header_too_large", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("header_too_large", b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n"),
    (
        "header_too_large",
        b"GET / HTTP/1.1\r\n" + b"".join(b"X%d: a\r\n" % i for i in range(200)) + b"\r\n",
    ),
    (
        "bad_chunking",
        b"POST /v1/track HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ),
]


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_request_that_is_not_http_is_a_counted_400_and_no_error_log(
    tmp_path: Path, loop_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario(app: web.Application, port: int) -> None:
        for reason, raw in MALFORMED:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            answer = await closed_by_server(reader)
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split(b" ")[1] == b"400", raw
            assert b"Content-Type: application/json" in head
            assert orjson.loads(body)["error"] == reason, raw
            assert orjson.loads(body)["message"]
        for reason in {r for r, _ in MALFORMED}:
            expected = sum(1 for r, _ in MALFORMED if r == reason)
            labels = {"reason": reason}
            assert metric_value(app, "tagrelay_http_rejected_total", labels) == expected, reason
        assert await healthz(port) == 200

    run_served(tmp_path, loop_name, scenario)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [], [(r.name, r.getMessage()) for r in loud]
    assert SERVER_KEY not in caplog.text


BROKEN_BODIES = {
    # the head first, then a chunk size that is not hex
    "bad_chunking": b'Transfer-Encoding: chunked\r\n\r\n|5\r\n{"a":\r\nzz\r\n',
    # a body that is not what its Content-Encoding says
    "bad_gzip": b"Content-Encoding: gzip\r\nContent-Length: 5\r\n\r\n|hello",
}


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("broken", BROKEN_BODIES)
def test_a_body_that_breaks_midway_is_a_prompt_400_and_no_error_log(
    tmp_path: Path, loop_name: str, broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(app: web.Application, port: int) -> None:
        rest_of_head, body = BROKEN_BODIES[broken].split(b"|")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/track HTTP/1.1\r\nHost: relay.test\r\nContent-Type: application/json\r\n"
            + auth()
            + rest_of_head
        )
        await writer.drain()
        await asyncio.sleep(LIMIT / 4)  # the head is read before the body arrives
        writer.write(body)
        answer = await closed_by_server(reader)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), answer
        assert set(orjson.loads(body)) == {"error", "message"}

    # Only a prompt answer can come before the test gives up: the body timeout is an hour.
    run_served(tmp_path, loop_name, scenario, body_timeout_secs=3600)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [], [(r.name, r.getMessage()) for r in loud]


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def can_write_eof(self) -> bool:
        return False

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None: ...


async def test_a_flood_beyond_the_cap_is_reset_rather_than_answered(tmp_path: Path) -> None:
    guard = ConnectionGuard(make_config(tmp_path).server, Metrics())
    lingering = [RefusedConnection(guard) for _ in range(REFUSED_LINGERING_MAX)]
    transports = [FakeTransport() for _ in lingering]
    for protocol, transport in zip(lingering, transports, strict=True):
        protocol.connection_made(transport)  # type: ignore[arg-type]
    assert all(t.written.startswith(b"HTTP/1.1 503") for t in transports)
    assert guard.refusing == REFUSED_LINGERING_MAX

    one_more = FakeTransport()
    RefusedConnection(guard).connection_made(one_more)  # type: ignore[arg-type]
    assert (one_more.written, one_more.aborted) == (b"", True)

    for protocol in lingering:
        protocol.connection_lost(None)
    assert guard.refusing == 0


async def test_the_guarded_handlers_take_the_servers_handler_arguments(tmp_path: Path) -> None:
    """What AppRunner(**kwargs) or Application(handler_args=...) gives aiohttp's handlers
    (auto_decompress, max_line_size, ...) reaches the guarded ones too."""

    async def nothing(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = web.Server(nothing, max_line_size=1234, max_field_size=4321)
    guard = ConnectionGuard(make_config(tmp_path).server, Metrics())
    handler = guard.protocol_factory(server, asyncio.get_running_loop())()
    assert isinstance(handler, GuardedRequestHandler)
    assert (handler.max_line_size, handler.max_field_size) == (1234, 4321)
    assert handler.keepalive_timeout > guard.keepalive_timeout + guard.header_timeout


def test_the_listen_backlog_is_server_listen_backlog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp's 128 filled up while thousands of connections opened at once (a client then
    waits for its SYN retry, a second or more): the socket listens with the configured
    backlog."""
    backlogs: list[int] = []
    create_server = asyncio.BaseEventLoop.create_server

    async def recording(self: asyncio.BaseEventLoop, *args: Any, **kwargs: Any) -> Any:
        backlogs.append(kwargs["backlog"])
        return await create_server(self, *args, **kwargs)

    monkeypatch.setattr(asyncio.BaseEventLoop, "create_server", recording)

    async def scenario(app: web.Application, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert (await closed_by_server(reader)).startswith(b"HTTP/1.1 200")
        writer.close()

    run_served(tmp_path, "asyncio", scenario, listen_backlog=777)
    assert backlogs == [777]
