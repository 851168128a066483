"""``tagrelay dlq`` on a JetStream spool: the dead letters live in the stream
``<stream>_dead_letters``, and the commands reach them through the running relay (its
admin socket) or, when none runs, through a connection of their own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tagrelay.app import create_app
from tagrelay.appkeys import SPOOL
from tagrelay.cli.main import main
from tagrelay.config.loader import load_config
from tagrelay.spool.jetstream import JetStreamSettings, JetStreamSpool
from tests.nats_server import delete_streams, nats_url, stream_name


def write_config(tmp_path: Path, url: str, stream: str) -> Path:
    cfg = tmp_path / "tagrelay.yaml"
    cfg.write_text(
        f"""
data_dir: {tmp_path / "data"}
keys:
  - {{id: backend, kind: server, key: k-server}}
spool: {{type: jetstream, servers: ["{url}"], stream: {stream}}}
forwarders:
  - {{id: hook, type: webhook, endpoint: "http://127.0.0.1:9/hook"}}
"""
    )
    return cfg


async def dlq(capsys: pytest.CaptureFixture[str], cfg: Path, *args: str) -> tuple[int, str]:
    code = await asyncio.to_thread(main, ["dlq", args[0], "--config", str(cfg), *args[1:]])
    out = capsys.readouterr()
    assert code == 0, out.err
    return code, out.out


async def test_list_show_and_purge_without_a_relay_and_through_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = await nats_url()
    stream = stream_name()
    cfg = write_config(tmp_path, url, stream)
    spool = JetStreamSpool(JetStreamSettings(servers=(url,), stream=stream))
    await spool.open()
    try:
        await spool.register("hook", "earliest")
        await spool.append(
            [(1, orjson.dumps({"messageId": f"m{i}", "type": "track"})) for i in range(3)],
            ["m0", "m1", "m2"],
        )
        watch = spool.subscribe("hook")
        while len(held := await spool.read(0, 3, forwarder="hook")) < 3:
            watch.arm(3)
            await asyncio.wait_for(watch.wait(), 10)
        await spool.dead_letter("hook", held, "status_4xx", "HTTP 400: bad", 1, advance_to=3)
        # no relay: the command reads the stream itself
        _, out = await dlq(capsys, cfg, "list", "--format", "json")
        listed = orjson.loads(out)
        assert [d["message_id"] for d in listed] == ["m0", "m1", "m2"]
        assert {d["reason"] for d in listed} == {"status_4xx"}
        _, out = await dlq(capsys, cfg, "show", str(listed[1]["id"]), "--format", "json")
        assert orjson.loads(out)["payload"]["messageId"] == "m1"
        # through a running relay (its admin socket)
        app = create_app(load_config(cfg))
        async with TestClient(TestServer(app)) as client:
            assert isinstance(client.app[SPOOL], JetStreamSpool)
            _, out = await dlq(capsys, cfg, "list", "--format", "json", "--forwarder", "hook")
            assert len(orjson.loads(out)) == 3
            _, out = await dlq(capsys, cfg, "purge", "--older-than", "0s")
            assert out.strip() == "purged 3 dead letters"
        _, out = await dlq(capsys, cfg, "list", "--format", "json")
        assert orjson.loads(out) == []
    finally:
        await spool.close()
        await delete_streams(url, stream)
