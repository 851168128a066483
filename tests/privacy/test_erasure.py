"""``tagrelay forget`` and ``tagrelay export`` across every store: the identity store, the
warehouse, the events still in the spool (pending for a forwarder whose destination fails)
and the dead letters (of one that refuses them). The person goes from each, checked by
``export`` and by raw greps of the files (the spool with its WAL, the warehouse, the
identity store), while another person's data stays; with encryption at rest on and off,
through the running relay and on the files when none runs."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tagrelay.app import create_app
from tagrelay.appkeys import SPOOL, WORKERS
from tagrelay.cli.main import main
from tagrelay.config.loader import load_config
from tests.support import SERVER_KEY, basic, fake_server, metric_value

GRANTED = {"analytics": "granted", "ads": "granted", "ad_user_data": "granted"}
ALICE = ("user-alice-7f3", "anon-alice-91c", "alice.erasure@example.com")
BOB = ("user-bob-2d8", "anon-bob-44e", "bob.keeps@example.com")


@pytest.fixture(autouse=True)
def root_logging() -> Iterator[None]:
    """The commands set up logging for themselves (handlers on the stderr of the moment):
    put pytest's back after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@dataclass
class Destination:
    """The pending forwarder's destination: down (503) until ``up``, then it records."""

    up: bool = False
    received: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def pending() -> Destination:
    return Destination()


@pytest.fixture
async def destinations(pending: Destination) -> AsyncIterator[TestServer]:
    """A webhook destination that is down (503: its events stay in the spool, retried
    every few milliseconds) and one that refuses every event (400: they become dead
    letters)."""

    async def down(request: web.Request) -> web.Response:
        if not pending.up:
            return web.Response(status=503, text="down for maintenance")
        pending.received.extend((await request.json())["batch"])
        return web.Response(status=200)

    async def refuses(request: web.Request) -> web.Response:
        return web.Response(status=400, text="bad event")

    async with fake_server("destinations", {"/down": down, "/refuses": refuses}) as server:
        yield server


def write_config(tmp_path: Path, server: TestServer, *, encrypted: bool) -> Path:
    key = base64.b64encode(os.urandom(32)).decode()
    encryption = f"encryption: {{keys: [{key}]}}" if encrypted else ""
    cfg = tmp_path / "tagrelay.yaml"
    cfg.write_text(
        f"""
data_dir: {tmp_path / "data"}
server: {{shutdown_timeout_secs: 1}}
keys:
  - {{id: backend, kind: server, key: {SERVER_KEY}}}
identity_store: {{enabled: true}}
{encryption}
forwarders:
  - id: warehouse
    type: warehouse
    batch: {{max_events: 1000, max_wait_secs: 0.05}}
  - id: pending
    type: webhook
    endpoint: {server.make_url("/down")}
    retry: {{initial_backoff_secs: 0.01, max_backoff_secs: 0.05}}
  - id: refused
    type: webhook
    endpoint: {server.make_url("/refuses")}
"""
    )
    return cfg


def events_of(user_id: str, anonymous_id: str, email: str) -> list[dict[str, Any]]:
    """A visit before login (the anonymous id only), the login (identify with the email),
    and a purchase a backend reported with the user id only."""
    context = {"consent": GRANTED}
    return [
        {"type": "page", "anonymousId": anonymous_id, "name": "Landing", "context": context},
        {
            "type": "identify",
            "userId": user_id,
            "anonymousId": anonymous_id,
            "traits": {"email": email},
            "context": context,
        },
        {"type": "track", "event": "Order Completed", "userId": user_id, "context": context},
    ]


async def settle(app: web.Application) -> None:
    """Wait until the warehouse and the identity store have every event, and the refused
    forwarder has dead-lettered them, while the pending one is still stuck."""
    spool = app[SPOOL]
    for _ in range(1000):
        if all(spool.depth(f) == 0 for f in app[WORKERS] if f != "pending") and sum(
            spool.dead_letter_counts().values()
        ) == len(ALICE + BOB):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not settled: {spool.positions()}, {spool.dead_letter_counts()}")


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code = await asyncio.to_thread(main, list(argv))
    out = capsys.readouterr()
    assert code == 0, out.err
    answer = orjson.loads(out.out)
    answer["stderr"] = out.err
    return answer


def raw_files(data_dir: Path) -> bytes:
    """Every byte of the spool (with its WAL), the warehouse and the identity store."""
    return b"".join(
        p.read_bytes()
        for p in sorted(data_dir.rglob("*"))
        if p.is_file() and p.name.startswith(("spool.sqlite3", "warehouse", "identity.db"))
    )


def sizes(stores: dict[str, Any]) -> dict[str, int]:
    return {
        "identity_store": len(stores["identity_store"]["persons"]),
        "warehouse": len(stores["warehouse"]["rows"]),
        "spool": len(stores["spool"]["events"]),
        "dead_letters": len(stores["dead_letters"]["events"]),
    }


@pytest.mark.parametrize("encrypted", [False, True], ids=["plaintext", "encrypted"])
@pytest.mark.parametrize("running", [True, False], ids=["through_relay", "on_files"])
async def test_forget_removes_the_person_from_every_store(
    tmp_path: Path,
    aiohttp_client: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    destinations: TestServer,
    encrypted: bool,
    running: bool,
) -> None:
    cfg = write_config(tmp_path, destinations, encrypted=encrypted)
    data_dir = tmp_path / "data"
    client = await aiohttp_client(create_app(load_config(cfg)))
    batch = events_of(*ALICE) + events_of(*BOB)
    resp = await client.post("/v1/batch", json={"batch": batch}, headers=basic(SERVER_KEY))
    assert resp.status == 200, await resp.text()
    await settle(client.app)
    if not running:
        await client.close()
    config = ("--config", str(cfg))

    found = (await cli(capsys, "export", *config, "--user-id", ALICE[0]))["stores"]
    # The page view before login is found through the anonymous id the identify linked.
    assert sizes(found) == {"identity_store": 1, "warehouse": 3, "spool": 3, "dead_letters": 3}
    assert {e["event"]["type"] for e in found["spool"]["events"]} == {"page", "identify", "track"}
    assert {row["user_id"] for row in found["warehouse"]["rows"] if "user_id" in row} == {ALICE[0]}
    assert {d["forwarder"] for d in found["dead_letters"]["events"]} == {"refused"}
    if not encrypted:
        assert ALICE[2].encode() in raw_files(data_dir)

    with caplog.at_level(logging.INFO, logger="tagrelay.audit"):
        forgotten = await cli(capsys, "forget", *config, "--email", ALICE[2].upper())
    assert forgotten["stores"] == {
        "identity_store": {"persons": 1, "ids": 3},
        "warehouse": {"rows": 3},
        "spool": {"events": 3},
        "dead_letters": {"events": 3},
    }
    if running:  # the relay writes the audit line
        (line,) = [r for r in caplog.records if r.getMessage() == "erasure request"]
        fields = vars(line)
    else:  # the command does, on stderr (the relay's log format: JSON lines)
        (text,) = [t for t in forgotten["stderr"].splitlines() if "erasure request" in t]
        fields = orjson.loads(text)
    assert fields["by"] == "email" and fields["warehouse"] == {"rows": 3}
    assert fields["requested_by"]["uid"] == os.getuid()
    assert len(fields["subject_ref"]) == 16
    logged = str(fields)
    assert not any(part in logged for part in (*ALICE, ALICE[2].upper()))

    for ids in (("--user-id", ALICE[0]), ("--anonymous-id", ALICE[1]), ("--email", ALICE[2])):
        gone = (await cli(capsys, "export", *config, *ids))["stores"]
        assert sizes(gone) == dict.fromkeys(gone, 0), ids
    kept = (await cli(capsys, "export", *config, "--user-id", BOB[0]))["stores"]
    assert sizes(kept) == {"identity_store": 1, "warehouse": 3, "spool": 3, "dead_letters": 3}

    if running:
        await client.close()
    raw = raw_files(data_dir)
    for part in ALICE:
        assert part.encode() not in raw, part
    if not encrypted:
        assert BOB[2].encode() in raw and BOB[0].encode() in raw


async def test_the_forwarders_skip_erased_events_and_deliver_the_others(
    tmp_path: Path,
    aiohttp_client: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
    destinations: TestServer,
    pending: Destination,
) -> None:
    """The pending forwarder's destination comes back after the erasure: it receives the
    other person's events, never the erased ones (which its delivery process had read and
    kept decoded while it retried), and its cursor reaches the head."""
    cfg = write_config(tmp_path, destinations, encrypted=True)
    client = await aiohttp_client(create_app(load_config(cfg)))
    batch = events_of(*ALICE) + events_of(*BOB)
    resp = await client.post("/v1/batch", json={"batch": batch}, headers=basic(SERVER_KEY))
    assert resp.status == 200
    await settle(client.app)
    await cli(capsys, "forget", "--config", str(cfg), "--user-id", ALICE[0])
    spool = client.app[SPOOL]
    assert spool.depth("pending") == 6  # the erased events count until the cursor passes
    pending.up = True
    for _ in range(1000):
        if spool.depth("pending") == 0:
            break
        await asyncio.sleep(0.01)
    assert spool.depth("pending") == 0
    assert sorted(e["type"] for e in pending.received) == ["identify", "page", "track"]
    assert {e.get("anonymousId") for e in pending.received} == {BOB[1], None}
    assert not any(ALICE[0] in str(e) or ALICE[1] in str(e) for e in pending.received)
    dead = {"forwarder": "pending", "outcome": "dead_letter"}
    assert metric_value(client.app, "tagrelay_forwarder_events_total", dead) == 0


async def test_suppress_drops_the_persons_future_events_and_only_with_suppress(
    tmp_path: Path,
    aiohttp_client: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
    destinations: TestServer,
) -> None:
    cfg = write_config(tmp_path, destinations, encrypted=False)
    client = await aiohttp_client(create_app(load_config(cfg)))
    config = ("--config", str(cfg))
    await cli(capsys, "forget", *config, "--user-id", "user-plain")
    await cli(capsys, "forget", *config, "--email", "Quiet@Example.com", "--suppress")

    def later(**fields: Any) -> dict[str, Any]:
        return {"type": "track", "event": "Came Back", "context": {"consent": GRANTED}, **fields}

    batch = [
        later(userId="user-plain"),  # forgotten without --suppress: stored
        later(userId="user-quiet", traits={"email": " quiet@example.COM "}),
        later(anonymousId="a-1", properties={"email": "QUIET@example.com"}),
        later(userId="someone-else"),
    ]
    resp = await client.post("/v1/batch", json={"batch": batch}, headers=basic(SERVER_KEY))
    assert resp.status == 200, await resp.text()
    assert client.app[SPOOL].head == 2
    assert metric_value(client.app, "tagrelay_events_suppressed_total", {"source": "segment"}) == 2
    # A single event of a suppressed person is answered as stored, and not stored.
    resp = await client.post(
        "/v1/track",
        json=later(userId="x", context={"traits": {"email": "quiet@example.com"}}),
        headers=basic(SERVER_KEY),
    )
    assert resp.status == 200 and client.app[SPOOL].head == 2
    listed = (tmp_path / "data" / "suppressed.json").read_bytes()
    assert b"quiet" not in listed.lower() and len(orjson.loads(listed)["hashes"]) == 1


async def test_suppress_without_a_relay_reaches_the_next_relay(
    tmp_path: Path,
    aiohttp_client: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
    destinations: TestServer,
) -> None:
    cfg = write_config(tmp_path, destinations, encrypted=True)
    answer = await cli(
        capsys, "forget", "--config", str(cfg), "--anonymous-id", "anon-9", "--suppress"
    )
    assert answer["stores"]["suppression"] == {"added": 1}
    client = await aiohttp_client(create_app(load_config(cfg)))
    batch = [
        {"type": "page", "anonymousId": "anon-9", "context": {"consent": GRANTED}},
        {"type": "page", "anonymousId": "anon-10", "context": {"consent": GRANTED}},
    ]
    resp = await client.post("/v1/batch", json={"batch": batch}, headers=basic(SERVER_KEY))
    assert resp.status == 200
    assert client.app[SPOOL].head == 1
    assert metric_value(client.app, "tagrelay_events_suppressed_total", {"source": "segment"}) == 1


def test_the_spools_shortcut_never_skips_an_event_of_the_person() -> None:
    """Only lines holding an id or email of the person are decoded: the shortcut must find
    them whatever the case of an email, an id stored as a number, or a non-ASCII id."""
    from tagrelay.model.subject import Subject
    from tagrelay.spool.erasure import _may_hold, _theirs, needles

    cases = [
        (Subject.of({"email": "Ada@Example.com"}), {"traits": {"email": " ADA@example.COM"}}),
        (Subject.of({"user_id": "42"}), {"userId": 42}),
        (Subject.of({"user_id": 'a"b\\c'}), {"userId": 'a"b\\c'}),
        (Subject.of({"email": "émile@exemple.fr"}), {"properties": {"email": "ÉMILE@exemple.fr"}}),
    ]
    for subject, event in cases:
        line = orjson.dumps(event)
        assert _theirs(line, subject), event
        assert _may_hold(line, needles(subject)), event
    other = orjson.dumps({"userId": "someone", "traits": {"email": "x@example.com"}})
    assert not _may_hold(other, needles(Subject.of({"user_id": "42"})))
