"""The live debug view through real HTTP: a relay from ``create_app`` with its admin
listener on a free port, its delivery process and local fake destinations; the stream read
as a browser's EventSource reads it.

What a viewer sees: each request (accepted, partly, or refused with the reason) with its
events (source, key id, type, name, ids, consent, the normalized form), each request a
forwarder sent with the destination's answer, each event's outcome (sent, left out,
retrying with the attempt and the next try, dead-lettered), the forwarder panel. What it
never sees: a secret. What it costs when nobody looks: nothing is captured."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp.test_utils import TestClient

from tagrelay.app import create_app
from tagrelay.appkeys import CAPTURE, FLEET
from tagrelay.config.loader import load_config
from tagrelay.reload import RELOADER
from tagrelay.web.admin_listener import ADMIN_LISTENER
from tests.support import (
    BROWSER_KEY,
    SERVER_KEY,
    Recorder,
    basic,
    make_config,
    recording_server,
    wait_idle,
)

TOKEN = "admin-token-debugview-5d1f0a"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
HOOK_TOKEN = "hook-token-a97c3e11"
GA4_SECRET = "ga4-api-secret-0b6d2f"
MP_SECRET = "mp-inbound-secret-91c4d7"
MEASUREMENT_ID = "G-DEBUG1234"
GRANTED = {"ads": "granted", "ad_user_data": "granted", "ad_personalization": "granted"}


@pytest.fixture
async def hook() -> AsyncIterator[Recorder]:
    async with recording_server("a webhook", ["/hook"], "/hook") as rec:
        yield rec


@pytest.fixture
async def start(tmp_path: Path, aiohttp_client: Callable[..., Any]) -> Callable[..., Any]:
    """``await start(**config_overrides)`` -> (the public TestClient, the admin URL)."""

    async def started(**overrides: Any) -> tuple[TestClient, str]:
        admin = {"listen": "127.0.0.1:0", "token": TOKEN, **overrides.pop("admin", {})}
        config = make_config(tmp_path, admin=admin, **overrides)
        app = create_app(config, admin_socket=False, admin_listener=True)
        client: TestClient = await aiohttp_client(app)
        return client, app[ADMIN_LISTENER].url

    return started


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def hook_forwarder(url: str, **overrides: Any) -> dict[str, Any]:
    return {
        "id": "hook",
        "type": "webhook",
        "endpoint": url,
        "headers": {"Authorization": f"Bearer {HOOK_TOKEN}"},
        "batch": {"max_events": 10, "max_wait_secs": 0.02},
        "retry": {"initial_backoff_secs": 5, "max_backoff_secs": 5},
        **overrides,
    }


class Stream:
    """``GET /debug/stream`` read event by event: ``(event, data)`` pairs."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.raw = b""
        self.events: list[tuple[str, Any]] = []

    async def _read_one(self) -> None:
        name, data = "message", b""
        while True:
            line = await self.response.content.readline()
            if not line:
                raise AssertionError("the stream ended")
            self.raw += line
            line = line.rstrip(b"\n")
            if not line:
                if data:
                    self.events.append((name, orjson.loads(data)))
                    return
                continue
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]

    async def until(
        self, check: Callable[[list[tuple[str, Any]]], bool], timeout: float = 10.0
    ) -> list[tuple[str, Any]]:
        async def read() -> None:
            while not check(self.events):
                await self._read_one()

        await asyncio.wait_for(read(), timeout)
        return self.events

    def of(self, kind: str) -> list[Any]:
        return [data for name, data in self.events if name == kind]


async def open_stream(http: aiohttp.ClientSession, admin: str) -> Stream:
    response = await http.get(admin + "/debug/stream", headers=BEARER)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    stream = Stream(response)
    await stream.until(lambda events: any(name == "forwarders" for name, _ in events))
    return stream


async def test_the_page_and_its_stream_need_the_admin_token(
    start: Any, http: aiohttp.ClientSession, hook: Recorder
) -> None:
    _, admin = await start(forwarders=[hook_forwarder(hook.url)])
    for path in ("/debug", "/debug/stream", "/debug/forwarders", "/debug/dead-letters"):
        async with http.get(admin + path, allow_redirects=False) as resp:
            assert resp.status == 401, path
    async with http.get(
        admin + "/debug", headers={"Accept": "text/html"}, allow_redirects=False
    ) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/login?next=/debug"

    async with http.get(admin + "/debug", headers=BEARER) as resp:
        assert resp.status == 200
        page = await resp.text()
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["Cache-Control"] == "no-store"
    assert '<script src="/debug/debug.js"></script>' in page
    assert "<td>hook</td>" in page
    async with http.get(admin + "/debug/debug.js", headers=BEARER) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/javascript"
        assert "EventSource" in await resp.text()
    # The admin index lists the page, not its stream or script.
    async with http.get(admin + "/", headers=BEARER) as resp:
        index = await resp.text()
    assert 'href="/debug"' in index
    assert "/debug/stream" not in index and "/debug/debug.js" not in index


@pytest.mark.parametrize("process", [True, False], ids=["delivery process", "in the relay"])
async def test_requests_events_and_deliveries_arrive_live(
    start: Any, http: aiohttp.ClientSession, hook: Recorder, process: bool
) -> None:
    hook.script = [(400, {"Content-Type": "application/json"}, b'{"error":"unknown field x"}')]
    async with recording_server("an ads webhook", ["/ads"], "/ads") as ads:
        client, admin = await start(
            delivery={"process": process},
            forwarders=[
                hook_forwarder(hook.url),
                {
                    "id": "ads-only",
                    "type": "webhook",
                    "endpoint": ads.url,
                    "requires_consent": ["ads"],
                    "batch": {"max_events": 10, "max_wait_secs": 0.02},
                },
            ],
        )
        await see_requests_events_and_deliveries(client, admin, http, hook)


async def see_requests_events_and_deliveries(
    client: TestClient, admin: str, http: aiohttp.ClientSession, hook: Recorder
) -> None:
    stream = await open_stream(http, admin)
    batch = {
        "batch": [
            {
                "type": "track",
                "event": "Order Completed",
                "userId": "user-1",
                "messageId": "m-1",
                "properties": {"revenue": 9.5},
                "context": {"consent": GRANTED, "traits": {"email": "jane@example.com"}},
            },
            {
                "type": "page",
                "anonymousId": "anon-2",
                "messageId": "m-2",
                "context": {"consent": {**GRANTED, "ads": "denied"}},
            },
            {"type": "no-such-type", "messageId": "m-3"},
        ]
    }
    resp = await client.post("/v1/batch", json=batch, headers=basic(SERVER_KEY))
    assert resp.status == 200
    refused = await client.post("/v1/track", json={"event": "x"}, headers=basic("wrong-key"))
    assert refused.status == 401

    def seen(events: list[tuple[str, Any]]) -> bool:
        outcomes = [d for n, d in events if n == "outcome"]
        return (
            sum(1 for n, _ in events if n == "request") >= 2
            and any(d["forwarder"] == "hook" and d["status"] == "dead_letter" for d in outcomes)
            and any(d["forwarder"] == "ads-only" and d["status"] == "left_out" for d in outcomes)
            and any(d["forwarder"] == "ads-only" and d["status"] == "sent" for d in outcomes)
        )

    await stream.until(seen)
    accepted, refused_request = stream.of("request")[:2]
    assert accepted["source"] == "segment" and accepted["key"] == "backend"
    assert (accepted["method"], accepted["path"], accepted["status"]) == ("POST", "/v1/batch", 200)
    assert accepted["outcome"] == "partial"
    first, second = accepted["events"]
    assert (first["messageId"], first["type"], first["event"], first["userId"]) == (
        "m-1",
        "track",
        "Order Completed",
        "user-1",
    )
    assert first["consent"]["ads"] == "granted"
    assert first["normalized"]["properties"] == {"revenue": 9.5}
    assert first["normalized"]["context"]["traits"]["email"] == "jane@example.com"  # PII: here
    assert (second["type"], second["anonymousId"], second["consent"]["ads"]) == (
        "page",
        "anon-2",
        "denied",
    )
    [rejected] = accepted["rejected"]
    assert rejected["index"] == 2 and rejected["error"]
    assert refused_request["outcome"] == "refused"
    assert (refused_request["status"], refused_request["error"]) == (401, "unknown_key")
    assert refused_request["key"] is None

    outcomes = stream.of("outcome")
    [dead] = [o for o in outcomes if o["forwarder"] == "hook"]
    assert dead["message_ids"] == ["m-1", "m-2"]
    assert (dead["reason"], dead["attempt"]) == ("status_4xx", 1)
    assert "unknown field x" in dead["detail"]
    [left_out] = [o for o in outcomes if o["status"] == "left_out"]
    assert (left_out["message_ids"], left_out["reason"]) == (["m-2"], "consent_denied")
    [sent] = [o for o in outcomes if o["forwarder"] == "ads-only" and o["status"] == "sent"]
    assert sent["message_ids"] == ["m-1"]

    await stream.until(lambda events: len([1 for n, _ in events if n == "exchange"]) >= 2)
    [exchange] = [x for x in stream.of("exchange") if x["forwarder"] == "hook"]
    assert exchange["message_ids"] == ["m-1", "m-2"]
    assert exchange["request"]["method"] == "POST"
    assert exchange["request"]["url"] == hook.url
    assert exchange["request"]["headers"]["Authorization"] == "***"
    sent_body = orjson.loads(exchange["request"]["body"])
    assert [e["messageId"] for e in sent_body["batch"]] == ["m-1", "m-2"]
    assert exchange["response"]["status"] == 400
    assert exchange["response"]["body"] == '{"error":"unknown field x"}'
    stream.response.close()


async def test_a_failing_destination_shows_the_attempt_the_next_try_and_its_answer(
    start: Any, http: aiohttp.ClientSession, hook: Recorder
) -> None:
    # Retry-After: the next try is in exactly 30 s (no jitter), after the test.
    hook.script = [(503, {"Retry-After": "30"}, b"upstream overloaded")]
    client, admin = await start(forwarders=[hook_forwarder(hook.url)])
    stream = await open_stream(http, admin)
    event = {"type": "track", "event": "Signed Up", "userId": "u-9", "messageId": "m-9"}
    await client.post("/v1/track", json=event, headers=basic(SERVER_KEY))
    await stream.until(lambda events: any(n == "outcome" for n, _ in events))
    [retrying] = stream.of("outcome")
    assert (retrying["status"], retrying["reason"], retrying["attempt"]) == (
        "retrying",
        "status_5xx",
        1,
    )
    assert retrying["message_ids"] == ["m-9"]
    assert 29_000 <= retrying["next_try_ms"] - retrying["at_ms"] <= 31_000
    assert "HTTP 503: upstream overloaded" in retrying["detail"]

    def panel_failing(events: list[tuple[str, Any]]) -> bool:
        panels = [d for n, d in events if n == "forwarders"]
        return bool(panels) and panels[-1]["forwarders"][0]["state"] == "retrying"

    await stream.until(panel_failing)
    [hook_panel] = stream.of("forwarders")[-1]["forwarders"]
    assert hook_panel["id"] == "hook" and hook_panel["type"] == "webhook"
    assert hook_panel["attempts"] == 1 and hook_panel["behind"] == 1
    assert hook_panel["lag_secs"] > 0
    assert hook_panel["last_error"]["reason"] == "status_5xx"
    assert hook_panel["last_error"]["detail"] == "HTTP 503: upstream overloaded"
    async with http.get(admin + "/debug/forwarders", headers=BEARER) as resp:
        [panel] = (await resp.json())["forwarders"]
    assert panel["state"] == "retrying" and panel["last_success_ms"] is None
    stream.response.close()


async def test_nothing_is_captured_while_nobody_watches(
    start: Any, http: aiohttp.ClientSession, hook: Recorder
) -> None:
    client, admin = await start(forwarders=[hook_forwarder(hook.url)])
    hub = client.app[CAPTURE]
    assert hub.rate == 0
    event = {"type": "track", "event": "Before", "userId": "u-1"}
    await client.post("/v1/track", json=event, headers=basic(SERVER_KEY))
    await wait_idle(client.app)
    assert hub.backlog() == []

    stream = await open_stream(http, admin)
    assert hub.rate == 1 and hub.viewers == 1
    assert stream.of("request") == [] and stream.of("exchange") == []
    assert stream.of("hello") == [{"rate": 1.0, "buffer_events": 500}]
    # The view goes away: capture stops.
    stream.response.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while hub.viewers and loop.time() < deadline:
        await asyncio.sleep(0.05)
    assert hub.viewers == 0 and hub.rate == 0
    await client.post("/v1/track", json=event, headers=basic(SERVER_KEY))
    await wait_idle(client.app)
    await asyncio.sleep(0.2)
    assert len([c for c in hub.backlog() if c.kind == "request"]) == 0


async def test_a_sample_rate_keeps_examples_for_the_next_view(
    start: Any, http: aiohttp.ClientSession, hook: Recorder
) -> None:
    client, admin = await start(
        forwarders=[hook_forwarder(hook.url)], debug={"sample_rate": 1.0, "buffer_events": 10}
    )
    for i in range(15):
        event = {"type": "track", "event": "Sampled", "messageId": f"m-{i}", "userId": "u"}
        await client.post("/v1/track", json=event, headers=basic(SERVER_KEY))
    await wait_idle(client.app)
    stream = await open_stream(http, admin)
    requests = stream.of("request")
    # The ring keeps the last 10 events.
    assert [r["events"][0]["messageId"] for r in requests] == [f"m-{i}" for i in range(5, 15)]
    assert len(stream.of("outcome")) >= 1
    stream.response.close()


async def test_no_secret_reaches_the_view(
    start: Any, http: aiohttp.ClientSession, hook: Recorder
) -> None:
    # The destinations echo the request's credentials in their answers.
    hook.script = [(401, {}, f"bad token {HOOK_TOKEN}".encode())] * 5
    async with recording_server("GA4", ["/mp/collect"], "/mp/collect") as ga4:
        ga4.script = [(403, {}, f"bad api_secret={GA4_SECRET}".encode())] * 5
        client, admin = await start(
            forwarders=[
                hook_forwarder(hook.url + f"?token={HOOK_TOKEN}"),
                {
                    "id": "ga4",
                    "type": "ga4",
                    "measurement_id": MEASUREMENT_ID,
                    "api_secret": GA4_SECRET,
                    "mp_url": ga4.url,
                    "batch": {"max_events": 10, "max_wait_secs": 0.02},
                },
            ],
            google={
                "measurement_protocol": [
                    {"measurement_id": MEASUREMENT_ID, "api_secret": MP_SECRET}
                ]
            },
        )
        await see_no_secret(client, admin, http)


async def see_no_secret(client: TestClient, admin: str, http: aiohttp.ClientSession) -> None:
    stream = await open_stream(http, admin)
    secrets = (TOKEN, HOOK_TOKEN, GA4_SECRET, MP_SECRET, SERVER_KEY, BROWSER_KEY)
    event = {"type": "track", "event": "Order Completed", "userId": "u-1"}
    # Write keys as a header, in the body, in a beacon's query; an API secret in the query.
    await client.post("/v1/track", json=event, headers=basic(SERVER_KEY))
    await client.post("/v1/track", json={**event, "writeKey": SERVER_KEY})
    await client.post(
        f"/beacon/v1/batch?writeKey={BROWSER_KEY}",
        data=orjson.dumps({"batch": [event]}),
        headers={"Content-Type": "text/plain"},
    )
    await client.post("/v1/track", json=event, headers=basic(BROWSER_KEY + "-wrong"))
    mp = {"client_id": "1.2", "events": [{"name": "purchase", "params": {"value": 1}}]}
    await client.post(
        f"/mp/collect?measurement_id={MEASUREMENT_ID}&api_secret={MP_SECRET}", json=mp
    )
    key = base64.b64encode(f"{SERVER_KEY}:".encode()).decode()
    await client.post("/v1/track", json=event, headers={"Authorization": f"Basic {key}x"})

    def done(events: list[tuple[str, Any]]) -> bool:
        panels = [d for n, d in events if n == "forwarders"]
        return (
            sum(1 for n, _ in events if n == "request") >= 6
            and {d["forwarder"] for n, d in events if n == "exchange"} == {"hook", "ga4"}
            and bool(panels)
            and all(f["last_error"] for f in panels[-1]["forwarders"])
        )

    await stream.until(done)
    paths = [(r["path"], r["query"]) for r in stream.of("request")]
    assert ("/beacon/v1/batch", "writeKey=***") in paths
    assert ("/mp/collect", f"measurement_id={MEASUREMENT_ID}&api_secret=***") in paths
    async with http.get(admin + "/debug/forwarders", headers=BEARER) as resp:
        panel = await resp.read()
    async with http.get(admin + "/debug/dead-letters", headers=BEARER) as resp:
        dead_letters = await resp.read()
    async with http.get(admin + "/debug", headers=BEARER) as resp:
        page = await resp.read()
    for text in (stream.raw, panel, dead_letters, page):
        for secret in secrets:
            assert secret.encode() not in text
    answers = {x["forwarder"]: x["response"]["body"] for x in stream.of("exchange")}
    assert answers == {"hook": "bad token ***", "ga4": "bad api_secret=***"}
    stream.response.close()


async def test_the_dead_letters_come_newest_first(
    start: Any, http: aiohttp.ClientSession, hook: Recorder
) -> None:
    hook.script = [(400, {}, b"no")] * 3
    client, admin = await start(forwarders=[hook_forwarder(hook.url)])
    for i in range(3):
        event = {"type": "track", "event": "E", "userId": "u", "messageId": f"m-{i}"}
        await client.post("/v1/track", json=event, headers=basic(SERVER_KEY))
        await wait_idle(client.app)
    async with http.get(admin + "/debug/dead-letters?limit=2", headers=BEARER) as resp:
        body = await resp.json()
    assert [d["message_id"] for d in body["dead_letters"]] == ["m-2", "m-1"]
    assert body["stored"] == {"hook": 3}
    async with http.get(admin + "/debug/dead-letters?limit=0", headers=BEARER) as resp:
        assert resp.status == 400


async def test_a_reload_changes_the_sample_rate_and_the_secrets_scrubbed(
    tmp_path: Path, aiohttp_client: Callable[..., Any], hook: Recorder
) -> None:
    new_key = "write-key-added-by-a-reload-4f1e"
    raw: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "keys": [{"id": "backend", "kind": "server", "key": SERVER_KEY}],
        "forwarders": [hook_forwarder(hook.url)],
    }
    file = tmp_path / "tagrelay.yaml"
    file.write_text(yaml.safe_dump(raw))
    app = create_app(load_config(file), admin_socket=False)
    app[RELOADER].config_file = file
    client: TestClient = await aiohttp_client(app)
    hub = app[CAPTURE]
    process = app[FLEET].process
    assert process is not None
    assert hub.rate == 0 and process.capture_rate == 0
    assert hub.scrub(f"a {new_key} b") == f"a {new_key} b"

    raw["keys"].append({"id": "added", "kind": "server", "key": new_key})
    raw["debug"] = {"sample_rate": 1.0, "buffer_events": 20}
    file.write_text(yaml.safe_dump(raw))
    report = await app[RELOADER].reload("test")
    assert report.outcome == "applied"
    assert hub.rate == 1 and process.capture_rate == 1
    assert hub.requests.capacity == 20
    assert hub.scrub(f"a {new_key} b") == "a *** b"

    event = {"type": "track", "event": "After", "userId": "u", "messageId": "m-after"}
    assert (await client.post("/v1/track", json=event, headers=basic(new_key))).status == 200
    await wait_idle(app)

    def captured() -> set[str]:
        return {c.kind for c in hub.backlog()}

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while captured() != {"request", "exchange", "outcome"} and loop.time() < deadline:
        await asyncio.sleep(0.02)
    assert captured() == {"request", "exchange", "outcome"}
    assert all(new_key.encode() not in c.data for c in hub.backlog())
