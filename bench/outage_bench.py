"""Delivery through a destination outage: how long recovery takes, and what is lost.

Run:
    .venv/bin/python bench/outage_bench.py                       # 750 events/s, 60 s down
    .venv/bin/python bench/outage_bench.py --outage-secs 20 --down refused --max-attempts 3

One relay (``create_app``, in this process, on 127.0.0.1) with a ``webhook`` forwarder to a
fake destination, also on 127.0.0.1. Events arrive at ``--rate`` per second (batches of 25
on ``/v1/batch``) for ``--before`` seconds, through the outage (``--outage-secs``: the
destination answers 503, or refuses connections) and ``--after`` seconds more. Prints:

- recovery wait: from the destination coming back up to the first batch it takes (the
  worker finishing the backoff it was in; at most ``retry.max_backoff_secs``);
- drain: from that first batch to the backlog being delivered (the spool depth back under
  one batch);
- dead letters, duplicates and losses (every accepted event must reach the destination
  exactly once, or be a dead letter).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import tempfile
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from tagrelay.app import create_app
from tagrelay.appkeys import SPOOL
from tagrelay.config.models import Config

KEY = "bench-server-key"
BATCH = 25


class Destination:
    def __init__(self) -> None:
        self.taken: list[str] = []
        self.first_taken_at: dict[int, float] = {}
        self.state = "up"
        self.port = 0
        self.up_at = 0.0
        self.first_after_up = 0.0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        if self.state != "up":
            return web.Response(status=503, text="down")
        batch = orjson.loads(await request.read())["batch"]
        if self.up_at and not self.first_after_up:
            self.first_after_up = time.monotonic()
        self.taken.extend(e["messageId"] for e in batch)
        return web.json_response({"ok": True})

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = self.port or self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def down(self, how: str) -> None:
        self.state = how
        if how == "refused":
            await self.stop()

    async def up(self) -> None:
        if self._runner is None:
            await self.start()
        self.state = "up"
        self.up_at = time.monotonic()


async def load(url: str, rate: float, secs: float, sent: list[str]) -> None:
    auth = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}
    interval = BATCH / rate
    start = time.monotonic()
    async with aiohttp.ClientSession() as http:
        n = 0
        while time.monotonic() - start < secs:
            batch = [
                {"type": "track", "event": "E", "anonymousId": "a", "messageId": f"m-{n + i}"}
                for i in range(BATCH)
            ]
            async with http.post(url, json={"batch": batch}, headers=auth) as resp:
                if resp.status == 200:
                    sent.extend(e["messageId"] for e in batch)
            n += BATCH
            await asyncio.sleep(max(0.0, start + (n / BATCH) * interval - time.monotonic()))


async def main(args: argparse.Namespace) -> None:
    dest = Destination()
    await dest.start()
    with tempfile.TemporaryDirectory() as tmp:
        retry: dict[str, Any] = {"max_attempts": args.max_attempts}
        config = Config.model_validate(
            {
                "data_dir": tmp,
                "keys": [{"id": "backend", "kind": "server", "key": KEY}],
                "forwarders": [
                    {
                        "id": "hook",
                        "type": "webhook",
                        "endpoint": f"http://127.0.0.1:{dest.port}/hook",
                        "batch": {"max_events": args.batch, "max_wait_secs": 1.0},
                        "retry": retry,
                    }
                ],
            }
        )
        app = create_app(config, admin_socket=False)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        sent: list[str] = []
        total = args.before + args.outage_secs + args.after
        loader = asyncio.create_task(
            load(f"http://127.0.0.1:{port}/v1/batch", args.rate, total, sent)
        )
        await asyncio.sleep(args.before)
        await dest.down(args.down)
        print(f"destination down ({args.down}) for {args.outage_secs:g}s ...", flush=True)
        await asyncio.sleep(args.outage_secs)
        await dest.up()
        backlog = app[SPOOL].depth("hook")
        drained_at = 0.0
        while True:
            depth = app[SPOOL].depth("hook")
            if dest.first_after_up and depth < args.batch and not drained_at:
                drained_at = time.monotonic()
            if loader.done() and depth == 0:
                break
            await asyncio.sleep(0.05)
        await loader
        dead = await app[SPOOL].dead_letters("hook", limit=10**9)
        await runner.cleanup()
    await dest.stop()
    taken = dest.taken
    dead_ids = {orjson.loads(d.payload)["messageId"] for d in dead}
    lost = set(sent) - set(taken) - dead_ids
    print(f"events accepted:        {len(sent)}")
    print(f"backlog at recovery:    {backlog}")
    print(f"recovery wait:          {dest.first_after_up - dest.up_at:.1f} s")
    print(f"drain after recovery:   {drained_at - dest.first_after_up:.1f} s")
    print(f"dead letters:           {len(dead)}")
    print(f"duplicates delivered:   {len(taken) - len(set(taken))}")
    print(f"lost:                   {len(lost)}")
    order = [int(message_id[2:]) for message_id in taken]
    print(f"in order:               {order == sorted(order)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=750.0, help="events per second")
    parser.add_argument("--outage-secs", type=float, default=60.0)
    parser.add_argument("--down", choices=["503", "refused"], default="503")
    parser.add_argument("--before", type=float, default=5.0, help="seconds up before")
    parser.add_argument("--after", type=float, default=5.0, help="seconds of load after")
    parser.add_argument("--batch", type=int, default=100, help="batch.max_events")
    parser.add_argument("--max-attempts", type=int, default=3, help="retry.max_attempts")
    args = parser.parse_args()
    asyncio.run(main(args))
