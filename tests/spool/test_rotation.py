"""Key rotation (``tagrelay keys rotate``): every spooled event and dead letter not under the
first key ends up under it, through the running relay while it ingests (nothing lost on the
way, at a fake destination and in the warehouse) or with no relay running."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tagrelay import crypto
from tagrelay.app import create_app
from tagrelay.appkeys import METRICS, SPOOL, warehouse_of
from tagrelay.cli.main import main
from tagrelay.crypto import Keyring, generate_key
from tagrelay.errors import EncryptionKeyError
from tagrelay.spool.encryption import PLAINTEXT, PayloadCipher
from tagrelay.spool.sqlite import SqliteSpool
from tests.support import SERVER_KEY, basic, fake_server, make_config, metric_value, wait_idle

EMAIL = "rotating.person@example.com"


def event(n: int, prefix: str = "old") -> bytes:
    return orjson.dumps(
        {
            "type": "identify",
            "messageId": f"{prefix}-{n}",
            "userId": f"u{n}",
            "traits": {"email": EMAIL},
            "receivedAt": "2026-12-05T10:00:00.000Z",
        }
    )


def cipher_of(*keys: str) -> PayloadCipher:
    return PayloadCipher(Keyring.from_texts(list(keys)))


async def fill(
    path: Path, cipher: PayloadCipher, first: int, segments: int, per: int = 1
) -> list[bytes]:
    """Append ``segments`` commits of ``per`` events each under ``cipher``; a ``hook``
    cursor (registered before) keeps them in the spool. Returns the events."""
    spool = SqliteSpool(path, cipher=cipher)
    await spool.open()
    await spool.register("hook")
    events = []
    for s in range(segments):
        rows = [event(first + s * per + i) for i in range(per)]
        await spool.append([(1, row) for row in rows])
        events.extend(rows)
    await spool.close()
    return events


def key_ids(path: Path, table: str) -> list[bytes | None]:
    with sqlite3.connect(path) as conn:
        return [
            None if r[0] is None else bytes(r[0])
            for r in conn.execute(f"SELECT key_id FROM {table} ORDER BY rowid")
        ]


async def test_rotation_reencrypts_plaintext_and_old_key_rows(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    old, new = generate_key(), generate_key()
    events: list[bytes] = []
    for cipher, first, count in ((PLAINTEXT, 0, 3), (cipher_of(old), 3, 2)):
        events += await fill(path, cipher, first, count)
        spool = SqliteSpool(path, cipher=cipher)
        await spool.open()
        dying = await spool.read(first, 1)
        await spool.dead_letter("hook", dying, "status_4xx", f"no {first}", 1)
        await spool.close()

    spool = SqliteSpool(path, cipher=cipher_of(new, old))
    await spool.open()
    assert spool.encryption_backlog() == {
        ("spool", "plaintext"): 3,
        ("spool", "old_key"): 2,
        ("dead_letters", "plaintext"): 1,
        ("dead_letters", "old_key"): 1,
    }
    counted: list[tuple[str, int]] = []
    spool.on_reencrypted = lambda store, n: counted.append((store, n))
    report = await spool.rotate_keys()
    assert report.reencrypted == {"spool": 5, "dead_letters": 2}
    assert report.left == {} and spool.encryption_backlog() == {}
    assert sum(n for store, n in counted if store == "spool") == 5
    assert [e.payload for e in await spool.read(0, 10)] == events
    assert [(d.payload, d.detail) for d in await spool.dead_letters("hook")] == [
        (events[0], "no 0"),
        (events[3], "no 3"),
    ]
    await spool.close()
    new_id = crypto.key_id(crypto.decode_key(new))
    assert set(key_ids(path, "segments")) == set(key_ids(path, "dead_letters")) == {new_id}

    alone = SqliteSpool(path, cipher=cipher_of(new))  # the old key can go
    await alone.open()
    assert [e.payload for e in await alone.read(0, 10)] == events
    await alone.close()


async def test_rotation_needs_keys(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "spool.sqlite3")
    await spool.open()
    with pytest.raises(EncryptionKeyError):
        spool.rotate_keys()
    await spool.close()


def write_config(tmp_path: Path, *keys: str) -> Path:
    path = tmp_path / "tagrelay.yaml"
    path.write_text(
        f"data_dir: {tmp_path}\n"
        "keys: [{id: backend, kind: server, key: k-123456}]\n"
        f"encryption: {{keys: {list(keys)}}}\n"
    )
    return path


async def test_keys_rotate_with_no_relay_running_rotates_the_file_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = generate_key(), generate_key()
    events = await fill(tmp_path / "spool.sqlite3", cipher_of(old), 0, 4, per=3)
    config = write_config(tmp_path, new, old)
    assert await asyncio.to_thread(main, ["keys", "rotate", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "this command, no relay running" in out and "12 spooled events" in out
    assert old not in out and new not in out
    spool = SqliteSpool(tmp_path / "spool.sqlite3", cipher=cipher_of(new))
    await spool.open()
    assert [e.payload for e in await spool.read(0, 20)] == events
    await spool.close()

    # A wrong key: refused with the key id, and nothing rewritten.
    wrong = write_config(tmp_path, generate_key())
    assert await asyncio.to_thread(main, ["keys", "rotate", "--config", str(wrong)]) == 1
    assert "does not hold" in capsys.readouterr().err
    # No keys: nothing to rotate to.
    assert (
        await asyncio.to_thread(main, ["keys", "rotate", "--config", str(write_config(tmp_path))])
        == 1
    )
    assert "no_keys" in capsys.readouterr().err


async def test_rotation_under_load_loses_nothing(
    tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    """A backlog under the old key (held in the spool by a destination that has not answered
    yet), rotated by the running relay while clients send more: every event reaches the
    destination (through the delivery process, which reads the spool with the keys) and the
    warehouse (its own process, likewise), and nothing is left under the old key."""
    old, new = generate_key(), generate_key()
    path = tmp_path / "spool.sqlite3"
    backlog = await fill(path, cipher_of(old), 0, 150, per=4)
    gate = asyncio.Event()
    received: list[str] = []

    async def destination(request: web.Request) -> web.Response:
        body = await request.json()
        await gate.wait()  # the backlog waits in the spool while rotation runs
        received.extend(e["messageId"] for e in body["batch"])
        return web.json_response({"ok": True})

    async with fake_server("destination", {"/hook": destination}) as server:
        config = make_config(
            tmp_path,
            encryption={"keys": [new, old]},
            forwarders=[
                {
                    "id": "hook",
                    "type": "webhook",
                    "endpoint": str(server.make_url("/hook")),
                    "batch": {"max_events": 100, "max_wait_secs": 0.05},
                },
                {
                    "id": "warehouse",
                    "type": "warehouse",
                    "start": "earliest",
                    "batch": {"max_events": 200, "max_wait_secs": 0.05},
                },
            ],
        )
        app = create_app(config, admin_socket=False)
        client = await aiohttp_client(app)
        spool = app[SPOOL]
        assert spool.encryption_backlog() == {("spool", "old_key"): 600}

        async def send(worker: int) -> list[str]:
            sent = []
            for i in range(40):
                message_id = f"live-{worker}-{i}"
                resp = await client.post(
                    "/v1/identify",
                    json={"userId": "u", "messageId": message_id, "traits": {"email": EMAIL}},
                    headers=basic(SERVER_KEY),
                )
                assert resp.status == 200, await resp.text()
                sent.append(message_id)
            return sent

        senders = [asyncio.create_task(send(w)) for w in range(6)]
        report = await spool.rotate_keys()
        live = [mid for done in await asyncio.gather(*senders) for mid in done]
        assert report.reencrypted["spool"] == 600 and report.left == {}
        gate.set()
        await wait_idle(app, timeout=60)

        expected = {orjson.loads(e)["messageId"] for e in backlog} | set(live)
        assert len(expected) == 600 + 240
        assert set(received) == expected
        warehouse = warehouse_of(app)
        assert warehouse is not None
        result = await asyncio.to_thread(warehouse.query, "select message_id from events", 10_000)
        assert {row[0] for row in result.rows} == expected
        assert (
            metric_value(app, "tagrelay_encryption_reencrypted_events_total", {"store": "spool"})
            == 600
        )
        assert (
            app[METRICS].registry.get_sample_value(
                "tagrelay_encryption_backlog_events", {"store": "spool", "state": "old_key"}
            )
            == 0
        )
    new_id = crypto.key_id(crypto.decode_key(new))
    assert set(key_ids(path, "segments")) <= {new_id}
    assert EMAIL.encode() not in b"".join(
        p.read_bytes() for p in tmp_path.glob("spool.sqlite3*") if p.is_file()
    )
