"""The relay on a JetStream spool (create_app, a real NATS server): a request is answered
once the stream holds its events, the forwarder runtime delivers and dead-letters over it as
over SQLite, and the spool's metrics (depth, lag, dead letters) come from the stream."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from tagrelay.app import create_app
from tagrelay.appkeys import SPOOL
from tagrelay.spool.jetstream import JetStreamSpool
from tests.nats_server import fresh_stream, nats_url
from tests.support import SERVER_KEY, basic, fake_server, make_config, metric_value


async def until(check: Any, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_delivery_dead_letters_and_metrics_over_jetstream(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    url = await nats_url()
    got: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        batch = (await request.json())["batch"]
        if any(e.get("event") == "refused" for e in batch):
            return web.json_response({"error": "bad event"}, status=400)
        got.extend(e["messageId"] for e in batch)
        return web.json_response({"ok": True})

    async with fresh_stream(url) as stream, fake_server("hook", {"/hook": hook}) as server:
        config = make_config(
            tmp_path,
            spool={"type": "jetstream", "servers": [url], "stream": stream},
            forwarders=[
                {
                    "id": "hook",
                    "type": "webhook",
                    "endpoint": str(server.make_url("/hook")),
                    "batch": {"max_events": 1, "max_wait_secs": 0.01},
                }
            ],
        )
        app = create_app(config, admin_socket=False)
        client = await aiohttp_client(app)
        spool = app[SPOOL]
        assert isinstance(spool, JetStreamSpool)
        batch = [
            {"type": "track", "event": "ok", "messageId": "e1", "anonymousId": "a"},
            {"type": "track", "event": "refused", "messageId": "e2", "anonymousId": "a"},
            {"type": "track", "event": "ok", "messageId": "e3", "anonymousId": "a"},
        ]
        resp = await client.post("/v1/batch", json={"batch": batch}, headers=basic(SERVER_KEY))
        assert resp.status == 200
        # acknowledged means in the stream
        assert spool.commits == 1
        # a resend is acknowledged and not stored again
        resp = await client.post("/v1/batch", json={"batch": batch[:1]}, headers=basic(SERVER_KEY))
        assert resp.status == 200 and spool.duplicates == 1
        await until(lambda: sorted(got) == ["e1", "e3"])
        await until(lambda: spool.dead_letter_counts().get("hook") == 1)
        (dead,) = await spool.dead_letters("hook")
        assert orjson.loads(dead.payload)["messageId"] == "e2" and dead.reason == "status_4xx"
        await spool.refresh()
        await until(lambda: spool.depth("hook") == 0)
        assert metric_value(app, "tagrelay_dead_letters_stored", {"forwarder": "hook"}) == 1
        assert (
            metric_value(
                app, "tagrelay_dead_letters_total", {"forwarder": "hook", "reason": "status_4xx"}
            )
            == 1
        )
        assert metric_value(app, "tagrelay_spool_depth", {"forwarder": "hook"}) == 0
        assert metric_value(app, "tagrelay_spool_commits_total") == 2
        assert (
            metric_value(
                app,
                "tagrelay_forwarder_events_total",
                {"forwarder": "hook", "outcome": "delivered"},
            )
            == 2
        )


async def test_erasure_and_access_are_refused_whole_on_the_jetstream_spool(
    tmp_path: Path, aiohttp_client: Any, capsys: Any
) -> None:
    """Erasure does not reach the stream yet: the relay and the CLI say so and erase
    nothing, rather than report a person erased whose events still wait there."""
    from tagrelay.cli.main import main
    from tagrelay.web.admin import build_admin_app

    url = await nats_url()
    async with fresh_stream(url) as stream:
        config = make_config(
            tmp_path, spool={"type": "jetstream", "servers": [url], "stream": stream}
        )
        app = create_app(config, admin_socket=False)
        await aiohttp_client(app)
        admin = await aiohttp_client(build_admin_app(app))
        for route in ("/privacy/forget", "/privacy/export"):
            resp = await admin.post(route, json={"user_id": "u1"})
            assert resp.status == 409, await resp.text()
            assert (await resp.json())["error"] == "not_supported"

        cfg = tmp_path / "jetstream.yaml"
        cfg.write_text(
            f"""
data_dir: {tmp_path / "offline"}
keys: [{{id: backend, kind: server, key: {SERVER_KEY}}}]
spool: {{type: jetstream, servers: ["{url}"], stream: {stream}}}
"""
        )
        code = await asyncio.to_thread(main, ["forget", "--config", str(cfg), "--user-id", "u1"])
        assert code == 1
        assert "not_supported" in capsys.readouterr().err
