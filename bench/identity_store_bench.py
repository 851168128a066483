"""The identity store's cost: its writer, its reads for enrichment, and a relay with it on.

Run:
    PYTHONPATH=src .venv/bin/python bench/identity_store_bench.py
    PYTHONPATH=src .venv/bin/python bench/identity_store_bench.py --visitors 20000 --skip-relay

The event stream is a shop's: each visitor lands on a page with click ids (fbclid, gclid)
and the Meta cookies, views three more pages, half of them log in (an identify with email,
phone and names, carrying both ids) and buy (a server-side purchase with the userId only).
Every event grants every consent category.

1. **writer**: what the identity store's writer does per batch of 500 events
   (``record.observe`` on each, then ``SqliteIdentityStore.record`` in one transaction),
   without and with encryption: events/s and microseconds per event, and the persons and
   size of the file at the end.
2. **reads**: what an enriching forwarder adds per batch of 100 events (one
   ``lookup`` for the batch), without and with encryption.
3. **relay** (unless ``--skip-relay``): a relay in this process (``create_app``, the
   delivery process on, a fake Meta answering at once) taking the same stream through
   /v1/batch from 8 concurrent clients, with the store off, then on (encrypted, Meta with
   ``enrich: true``): ingest events/s (acknowledged, so on disk), and the seconds from the
   last acknowledgement until Meta has every event. The writer runs in the delivery
   process, after the spool acknowledged the events, so ingest pays only for the CPU it
   shares with it.

Figures only; nothing here asserts a time. On a machine shared with other work they vary
from run to run: compare runs made together.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from tagrelay.app import create_app
from tagrelay.appkeys import SPOOL, WORKERS
from tagrelay.config.models import Config
from tagrelay.identity_store import FILE_NAME, IdentityStoreConfig, StoreSettings
from tagrelay.identity_store.record import observe

GRANTED = {"analytics": "granted", "ads": "granted", "ad_user_data": "granted"}
SERVER_KEY = "bench-server-key"
NOW_MS = int(time.time() * 1000)


def iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def journeys(visitors: int, seed: int = 7) -> Iterator[dict[str, Any]]:
    """The stream, visitors interleaved in groups of 50 (as traffic is)."""
    rng = random.Random(seed)
    group = 50
    for start in range(0, visitors, group):
        streams = [list(visitor(i, rng)) for i in range(start, min(visitors, start + group))]
        while any(streams):
            for stream in streams:
                if stream:
                    yield stream.pop(0)


def visitor(i: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    anon, user = f"anon-{i:08d}", f"user-{i:08d}"
    at = NOW_MS - rng.randrange(0, 3_600_000)
    browser = {
        "consent": GRANTED,
        "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) Version/17.5 Safari",
        "ip": f"198.51.100.{i % 250}",
        "clientIds": {"fbp": f"fb.1.{at}.{i}"},
    }
    landing = f"https://www.shop.test/?fbclid=IwAR{i:010d}&gclid=Cj0KCQ{i:010d}"
    yield {
        "type": "page",
        "messageId": f"{anon}-land",
        "anonymousId": anon,
        "receivedAt": iso(at),
        "context": {**browser, "page": {"url": landing}},
    }
    for n in range(3):
        yield {
            "type": "page",
            "messageId": f"{anon}-page-{n}",
            "anonymousId": anon,
            "receivedAt": iso(at + 1000 * (n + 1)),
            "context": {**browser, "page": {"url": f"https://www.shop.test/p/{n}"}},
        }
    if i % 2:
        return
    yield {
        "type": "identify",
        "messageId": f"{anon}-login",
        "anonymousId": anon,
        "userId": user,
        "receivedAt": iso(at + 5000),
        "traits": {
            "email": f"shopper.{i}@example.com",
            "phone": f"+1 650 555 {i % 10000:04d}",
            "firstName": "Ada",
            "lastName": "Lovelace",
        },
        "context": browser,
    }
    yield {
        "type": "track",
        "event": "Order Completed",
        "messageId": f"{user}-order",
        "userId": user,
        "receivedAt": iso(at + 9000),
        "properties": {"order_id": f"o-{i}", "revenue": 42.5, "currency": "EUR"},
        "context": {"consent": GRANTED},
    }


def settings(encrypted: bool) -> StoreSettings:
    keys = (SecretStr(base64.b64encode(os.urandom(32)).decode()),) if encrypted else ()
    return StoreSettings(IdentityStoreConfig(enabled=True), keys)


def file_size(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.iterdir() if p.name.startswith(FILE_NAME))


def bench_writer(events: list[dict[str, Any]], encrypted: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        store = settings(encrypted).open_backend(data_dir, writer=True)
        batch = 500
        observed = 0
        started = time.perf_counter()
        for start in range(0, len(events), batch):
            chunk = events[start : start + batch]
            seen = [o for e in chunk if (o := observe(e, NOW_MS)) is not None]
            observed += len(seen)
            store.record(seen, NOW_MS)
        elapsed = time.perf_counter() - started
        stats = store.stats()  # type: ignore[attr-defined]
        store.close()
        size = file_size(data_dir)
    label = "encrypted" if encrypted else "plaintext"
    print(
        f"  writer {label:9}  {len(events) / elapsed:9,.0f} events/s  "
        f"{elapsed / len(events) * 1e6:6.1f} us/event  ({observed:,} observed, "
        f"{stats['persons']:,} persons, {stats['ids']:,} ids, {size / 1e6:.1f} MB)"
    )


def bench_reads(events: list[dict[str, Any]], encrypted: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        config = settings(encrypted)
        writer = config.open_backend(data_dir, writer=True)
        for start in range(0, len(events), 500):
            chunk = events[start : start + 500]
            writer.record([o for e in chunk if (o := observe(e, NOW_MS)) is not None], NOW_MS)
        reader = config.open_backend(data_dir)
        conversions = [e for e in events if e["type"] in ("page", "track")]
        keys = [(e.get("anonymousId"), e.get("userId")) for e in conversions]
        batch = 100
        found = 0
        started = time.perf_counter()
        for start in range(0, len(keys), batch):
            found += sum(p is not None for p in reader.lookup(keys[start : start + batch], NOW_MS))
        elapsed = time.perf_counter() - started
        reader.close()
        writer.close()
    label = "encrypted" if encrypted else "plaintext"
    print(
        f"  reads  {label:9}  {len(keys) / elapsed:9,.0f} events/s  "
        f"{elapsed / len(keys) * 1e6:6.1f} us/event  ({found:,} of {len(keys):,} found)"
    )


async def fake_meta() -> tuple[TestServer, list[int]]:
    received = [0]

    async def events(request: web.Request) -> web.Response:
        body = await request.json()
        received[0] += len(body["data"])
        return web.json_response({"events_received": len(body["data"])})

    app = web.Application()
    app.router.add_post("/v25.0/1234567890/events", events)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server, received


async def bench_relay(events: list[dict[str, Any]], store_on: bool) -> tuple[float, float]:
    server, received = await fake_meta()
    with tempfile.TemporaryDirectory() as tmp:
        meta: dict[str, Any] = {
            "id": "meta",
            "type": "meta",
            "pixel_id": "1234567890",
            "access_token": "bench-token",
            "base_url": str(server.make_url("")).rstrip("/"),
            "batch": {"max_events": 500, "max_wait_secs": 0.2},
        }
        raw: dict[str, Any] = {
            "data_dir": tmp,
            "keys": [{"id": "backend", "kind": "server", "key": SERVER_KEY}],
            "forwarders": [meta],
        }
        if store_on:
            meta["enrich"] = True
            raw["identity_store"] = {"enabled": True}
            raw["encryption"] = {"keys": [base64.b64encode(os.urandom(32)).decode()]}
        app = create_app(Config.model_validate(raw), admin_socket=False)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        auth = {"Authorization": "Basic " + base64.b64encode(f"{SERVER_KEY}:".encode()).decode()}
        size = 20
        batches = [events[i : i + size] for i in range(0, len(events), size)]
        queue = iter(batches)

        async def sender() -> None:
            for batch in queue:
                response = await client.post("/v1/batch", json={"batch": batch}, headers=auth)
                assert response.status == 200, await response.text()

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(8)))
        acked = time.perf_counter()
        spool = app[SPOOL]
        while any(spool.depth(fid) for fid in app[WORKERS]):
            await asyncio.sleep(0.02)
        drained = time.perf_counter()
        await client.close()
    await server.close()
    label = "store on " if store_on else "store off"
    rate = len(events) / (acked - started)
    print(
        f"  relay  {label}  ingest {rate:9,.0f} events/s   delivered {drained - acked:5.2f} s "
        f"after the last ack   (Meta got {received[0]:,})"
    )
    return rate, drained - acked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--visitors", type=int, default=10_000)
    parser.add_argument("--relay-visitors", type=int, default=4_000)
    parser.add_argument("--repeat", type=int, default=3, help="relay runs per setting")
    parser.add_argument("--skip-relay", action="store_true")
    args = parser.parse_args()
    events = list(journeys(args.visitors))
    print(f"{len(events):,} events from {args.visitors:,} visitors")
    for encrypted in (False, True):
        bench_writer(events, encrypted)
    for encrypted in (False, True):
        bench_reads(events, encrypted)
    if args.skip_relay:
        return
    relay_events = list(journeys(args.relay_visitors, seed=11))
    print(f"relay: {len(relay_events):,} events, {args.repeat} runs each, alternating")
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeat):
        for store_on in (False, True):
            rate, _ = asyncio.run(bench_relay(relay_events, store_on))
            rates[store_on].append(rate)
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"  median ingest: off {off:,.0f}/s, on {on:,.0f}/s ({(on - off) / off:+.1%})")


if __name__ == "__main__":
    main()
