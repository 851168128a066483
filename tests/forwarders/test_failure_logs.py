"""What a failed delivery logs: the forwarder, the host it sends to (no path, no query that
may carry a token), the status the destination answered, the attempt and its answer's body,
cut short and without the forwarder's secrets."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from aiohttp import web

from tagrelay.forwarders.webhook import WebhookForwarder
from tests.support import SERVER_KEY, basic, fake_server, make_config

SECRET_HEADER = "hook-header-secret-5ad1"
QUERY_TOKEN = "query-token-93be"


def failures(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


async def until(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def webhook(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": "hook",
        "type": "webhook",
        "endpoint": url + f"?token={QUERY_TOKEN}",
        "headers": {"Authorization": f"Bearer {SECRET_HEADER}"},
        "batch": {"max_events": 10, "max_wait_secs": 0},
        **extra,
    }


async def test_a_retried_delivery_logs_host_status_attempt_and_a_short_body(
    relay: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tagrelay.forwarders._worker")
    body = "upstream overloaded; " + f"echo: Bearer {SECRET_HEADER} " + "x" * 5000

    async def down(request: web.Request) -> web.Response:
        return web.Response(status=503, text=body)

    async with fake_server("destination", {"/hook": down}) as server:
        port = server.port
        client = await relay(
            forwarders=[
                webhook(
                    str(server.make_url("/hook")),
                    retry={"initial_backoff_secs": 0.01, "max_backoff_secs": 0.02},
                )
            ]
        )
        event = {"type": "track", "event": "Signed Up", "anonymousId": "a"}
        resp = await client.post("/v1/track", json=event, headers=basic(SERVER_KEY))
        assert resp.status == 200
        await until(lambda: failures(caplog, "delivery failed; will retry"))
    [line] = failures(caplog, "delivery failed; will retry")
    fields = vars(line)
    assert fields["forwarder"] == "hook"
    assert fields["endpoint"] == f"127.0.0.1:{port}"
    assert fields["status"] == 503
    assert fields["attempt"] == 1
    assert fields["reason"] == "status_5xx"
    assert fields["detail"].startswith("HTTP 503: upstream overloaded; echo: *** xxx")
    assert len(fields["detail"]) <= 200
    text = line.getMessage() + repr(fields)
    assert SECRET_HEADER not in text
    assert QUERY_TOKEN not in text


async def test_a_dead_lettered_delivery_logs_the_same(
    relay: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="tagrelay.forwarders._worker")

    async def refuses(request: web.Request) -> web.Response:
        return web.json_response({"error": "unknown field 'evnt'"}, status=422)

    async with fake_server("destination", {"/hook": refuses}) as server:
        port = server.port
        client = await relay(forwarders=[webhook(str(server.make_url("/hook")))])
        event = {"type": "track", "event": "Signed Up", "anonymousId": "a"}
        resp = await client.post("/v1/track", json=event, headers=basic(SERVER_KEY))
        assert resp.status == 200
        await until(lambda: failures(caplog, "events dead-lettered"))
    [line] = failures(caplog, "events dead-lettered")
    fields = vars(line)
    assert (fields["forwarder"], fields["status"], fields["attempt"]) == ("hook", 422, 1)
    assert fields["endpoint"] == f"127.0.0.1:{port}"
    assert "unknown field 'evnt'" in fields["detail"]
    assert QUERY_TOKEN not in repr(fields)


async def test_a_failure_without_an_answer_logs_no_status(
    relay: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tagrelay.forwarders._worker")
    client = await relay(
        forwarders=[
            webhook(
                "http://127.0.0.1:9/hook",
                retry={"initial_backoff_secs": 0.01, "max_backoff_secs": 0.02},
            )
        ]
    )
    event = {"type": "track", "event": "Signed Up", "anonymousId": "a"}
    resp = await client.post("/v1/track", json=event, headers=basic(SERVER_KEY))
    assert resp.status == 200
    await until(lambda: failures(caplog, "delivery failed; will retry"))
    fields = vars(failures(caplog, "delivery failed; will retry")[0])
    assert (fields["endpoint"], fields["status"]) == ("127.0.0.1:9", None)
    assert fields["reason"] == "connection_error"


@pytest.mark.parametrize(
    ("endpoint", "host"),
    [
        ("https://user:pass@hooks.example.com/in?key=secret#x", "hooks.example.com"),
        ("http://[::1]:8443/in", "[::1]:8443"),
        ("https://HOOKS.example.com", "hooks.example.com"),
    ],
)
def test_endpoint_host_keeps_only_host_and_port(
    tmp_path: Any, context: Any, endpoint: str, host: str
) -> None:
    config = make_config(
        tmp_path, forwarders=[{"id": "h", "type": "webhook", "endpoint": endpoint}]
    )
    forwarder = WebhookForwarder(config.forwarders[0], context)
    assert forwarder.endpoint_host == host
