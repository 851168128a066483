"""Three ``tagrelay serve`` replicas on one JetStream stream and one PostgreSQL database:
numbered events sent round-robin, some resent with the same messageId to another replica,
one replica SIGKILLed in the middle of the load and started again. Every acknowledged event
must be in PostgreSQL exactly once, and the webhook must have had each at least once (the
raw count of redeliveries, deduplicated by the fake as a destination would, is printed)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from aiohttp import web

from tests.cli.test_serve_e2e import Relay, relays  # noqa: F401 (a fixture)
from tests.nats_server import delete_streams, nats_url_sync, stream_name
from tests.postgres import fresh_schema, postgres_dsn
from tests.rig import free_port, serve_in_thread

pytestmark = pytest.mark.slow

EVENTS = 900
BATCH = 10


class Webhook:
    """A destination that records every messageId it is sent (raw, before dedup)."""

    def __init__(self) -> None:
        self.received: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.port = free_port()
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.stop = serve_in_thread(app, self.port)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self.lock:
            self.received.update(event["messageId"] for event in body["batch"])
        # a destination's latency: the replicas hold batches while they wait for it, and
        # the one killed dies holding some (received here, never acknowledged to JetStream)
        await asyncio.sleep(0.2)
        return web.json_response({"ok": True})


def write_config(path: Path, data_dir: Path, url: str, stream: str, schema: str, hook: int) -> Path:
    path.write_text(
        f"""
data_dir: {data_dir}
keys:
  - {{id: backend, kind: server, key: e2e-server-key}}
logging: {{level: info, format: json}}
admin: {{listen: "127.0.0.1:0"}}
spool:
  type: jetstream
  servers: ["{url}"]
  stream: {stream}
  ack_wait_secs: 2
forwarders:
  - id: hook
    type: webhook
    endpoint: http://127.0.0.1:{hook}/hook
    batch: {{max_events: 50, max_wait_secs: 0.05}}
  - id: warehouse
    type: warehouse
    dialect: postgres
    dsn: "${{TEST_DATABASE_URL}}"
    schema: {schema}
    batch: {{max_events: 100, max_wait_secs: 0.05}}
"""
    )
    return path


def test_three_replicas_lose_and_double_nothing(
    tmp_path: Path,
    relays: list[Relay],  # noqa: F811 (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = nats_url_sync()
    dsn = postgres_dsn()
    monkeypatch.setenv("TEST_DATABASE_URL", dsn)
    stream = stream_name()
    hook = Webhook()
    try:
        with fresh_schema(dsn) as schema:
            configs = [
                write_config(
                    tmp_path / f"r{i}.yaml", tmp_path / f"data{i}", url, stream, schema, hook.port
                )
                for i in range(3)
            ]
            replicas: list[Relay] = []
            for config in configs:  # each killed at the end, even if a later one fails
                replicas.append(Relay(config, tmp_path))
                relays.append(replicas[-1])
            acked: set[str] = set()
            resends = 0
            killed_at = EVENTS // 3
            restarted_at = 2 * EVENTS // 3
            for turn, start in enumerate(range(0, EVENTS, BATCH)):
                if start == killed_at:
                    replicas[1].stop(signal.SIGKILL)  # holding batches of both consumers
                if start == restarted_at:
                    replicas[1] = Relay(configs[1], tmp_path)
                    relays.append(replicas[1])
                batch = [
                    {"type": "track", "event": "n", "messageId": f"n-{n}", "anonymousId": "a"}
                    for n in range(start, start + BATCH)
                ]
                alive = [r for r in replicas if r.proc.poll() is None]
                target = alive[turn % len(alive)]
                status, _ = target.post("/v1/batch", {"batch": batch})
                if status == 200:
                    acked.update(e["messageId"] for e in batch)
                if (start // BATCH) % 7 == 0:  # the client did not see the answer: again,
                    other = alive[(turn + 1) % len(alive)]  # to another replica
                    status, body = other.post("/v1/batch", {"batch": batch})
                    assert status == 200, body
                    acked.update(e["messageId"] for e in batch)
                    resends += 1
            assert len(acked) == EVENTS

            def loaded() -> tuple[int, int]:
                with psycopg.connect(dsn) as con:
                    row = con.execute(
                        f'select count(*), count(distinct message_id) from "{schema}".events'
                    ).fetchone()
                assert row is not None
                return int(row[0]), int(row[1])

            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with hook.lock:
                    hooked = set(hook.received)
                if loaded()[1] >= EVENTS and acked <= hooked:
                    break
                time.sleep(0.1)
            rows, distinct = loaded()
            assert rows == distinct == EVENTS  # every acknowledged event once
            with psycopg.connect(dsn) as con:
                ids = {r[0] for r in con.execute(f'select message_id from "{schema}".events')}
            assert ids == acked
            with hook.lock:
                raw = sum(hook.received.values())
                hooked = set(hook.received)
            assert acked <= hooked  # each at least once
            redelivered = raw - len(hooked)
            print(
                f"\nthree replicas: {EVENTS} events acknowledged, {resends} batches resent to "
                f"another replica, webhook got {raw} deliveries ({redelivered} redeliveries, "
                f"deduplicated by message id)"
            )
            for relay in replicas:
                if relay.proc.poll() is None:
                    assert relay.stop() == 0
    finally:
        hook.stop()
        delete_streams_sync(url, stream)


def delete_streams_sync(url: str, stream: str) -> None:
    asyncio.run(delete_streams(url, stream))
