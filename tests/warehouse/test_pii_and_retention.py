"""The warehouse forwarder's ``hash_pii`` (emails and phones stored as keyed hashes that
still join) and ``retention_days`` (older rows deleted by the warehouse process, counted),
on a real DuckDB file through the warehouse process."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders.warehouse import WarehouseConfig, WarehouseForwarder, database_path
from tagrelay.metrics import Metrics
from tagrelay.model import Delivered
from tagrelay.warehouse.pii import HASHED_KEYS, PiiHasher

SALT = "a-salt-of-at-least-16-chars"
EMAIL = "Jane.Doe@Example.com"
PHONE = "+1 (650) 555-1212"


def keyed(value: str) -> str:
    return hmac.new(SALT.encode(), value.encode(), hashlib.sha256).hexdigest()


def person(message_id: str, email: str, phone: str, received_at: str) -> dict[str, Any]:
    return {
        "type": "identify",
        "messageId": message_id,
        "userId": "u1",
        "receivedAt": received_at,
        "traits": {"email": email, "phone": phone, "plan": "pro"},
        "context": {"traits": {"email": email}, "page": {"path": "/account"}},
        "properties": {"email": email, "phone": 16505551212},
    }


@pytest.fixture
async def context(tmp_path: Path) -> AsyncIterator[ForwarderContext]:
    async with aiohttp.ClientSession() as http:
        yield ForwarderContext(data_dir=tmp_path, http=http, metrics=Metrics())


async def started(context: ForwarderContext, **options: Any) -> WarehouseForwarder:
    config = WarehouseConfig.model_validate({"id": "warehouse", "type": "warehouse", **options})
    forwarder = WarehouseForwarder(config, context)
    await forwarder.start()
    return forwarder


async def rows(forwarder: WarehouseForwarder, sql: str) -> list[tuple[Any, ...]]:
    import asyncio

    assert forwarder.warehouse is not None
    result = await asyncio.to_thread(forwarder.warehouse.query, sql, 1000)
    return result.rows


def raw_database(forwarder: WarehouseForwarder, tmp_path: Path) -> bytes:
    path = database_path(forwarder.config, tmp_path)
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*") if p.is_file())


async def test_hash_pii_stores_keyed_hashes_that_join(
    context: ForwarderContext, tmp_path: Path
) -> None:
    forwarder = await started(context, hash_pii=True, hash_pii_salt=SALT)
    outcome = await forwarder.deliver(
        [
            person("a", EMAIL, PHONE, "2026-12-01T10:00:00Z"),
            # the same person typed differently: the same hashes
            person("b", "  jane.doe@example.COM ", "16505551212", "2026-12-01T11:00:00Z"),
        ]
    )
    assert outcome == Delivered()
    found = await rows(
        forwarder,
        "select traits_email, context_traits_email, properties_email, traits_phone, "
        "properties_phone, traits_plan from events order by message_id",
    )
    email, phone = keyed("jane.doe@example.com"), keyed("16505551212")
    assert found == [(email, email, email, phone, phone, "pro")] * 2
    joined = await rows(
        forwarder,
        "select count(*) from events a join events b on a.traits_email = b.traits_email "
        "where a.message_id < b.message_id",
    )
    assert joined == [(1,)]
    await forwarder.close()
    raw = raw_database(forwarder, tmp_path)
    assert b"Jane.Doe" not in raw and b"jane.doe" not in raw and b"555-1212" not in raw


async def test_without_hash_pii_the_warehouse_keeps_them_readable(
    context: ForwarderContext, tmp_path: Path
) -> None:
    forwarder = await started(context)
    await forwarder.deliver([person("a", EMAIL, PHONE, "2026-12-01T10:00:00Z")])
    assert await rows(forwarder, "select traits_email, traits_phone from events") == [
        (EMAIL, PHONE)
    ]
    await forwarder.close()
    assert EMAIL.encode() in raw_database(forwarder, tmp_path)


def test_the_hasher_copies_events_and_hashes_every_well_known_key() -> None:
    hasher = PiiHasher(SALT.encode())
    event: dict[str, Any] = {"traits": {"email": EMAIL}, "context": {"ip": "1.2.3.4"}}
    [hashed] = hasher.events([event])
    assert event == {"traits": {"email": EMAIL}, "context": {"ip": "1.2.3.4"}}
    assert hashed["traits"]["email"] == keyed("jane.doe@example.com")
    assert hashed["context"] is event["context"]  # untouched parts are shared
    untouched: dict[str, Any] = {"type": "page", "traits": {"email": None}}
    assert hasher.events([untouched])[0] is untouched
    assert {".".join(path) for path in HASHED_KEYS} == {
        "traits.email",
        "context.traits.email",
        "properties.email",
        "traits.phone",
        "context.traits.phone",
        "properties.phone",
    }


@pytest.mark.parametrize("salt", [None, "short"])
def test_hash_pii_needs_a_salt_of_16_characters(salt: str | None) -> None:
    with pytest.raises(ValidationError, match="hash_pii needs hash_pii_salt"):
        WarehouseConfig.model_validate(
            {"id": "w", "type": "warehouse", "hash_pii": True, "hash_pii_salt": salt}
        )


async def test_retention_deletes_older_rows_and_counts_them(context: ForwarderContext) -> None:
    import datetime as dt

    forwarder = await started(context, retention_days=30)
    now = dt.datetime(2026, 12, 5, tzinfo=dt.UTC).timestamp()
    old = {
        "type": "track",
        "event": "Old",
        "messageId": "old",
        "receivedAt": "2026-10-01T00:00:00Z",
    }
    untimed = {"type": "track", "event": "X", "messageId": "x", "timestamp": "2026-10-02T00:00:00Z"}
    recent = {
        "type": "track",
        "event": "New",
        "messageId": "new",
        "receivedAt": "2026-11-20T00:00:00Z",
    }
    assert await forwarder.deliver([old, untimed, recent]) == Delivered()
    assert await forwarder.expire(now) == 2
    assert await rows(forwarder, "select message_id from events") == [("new",)]
    assert await forwarder.expire(now) == 0
    value = context.metrics.registry.get_sample_value(
        "tagrelay_warehouse_expired_rows_total", {"forwarder": "warehouse"}
    )
    assert value == 2
    await forwarder.close()


async def test_without_retention_nothing_is_deleted(context: ForwarderContext) -> None:
    forwarder = await started(context)
    old = {
        "type": "track",
        "event": "Old",
        "messageId": "old",
        "receivedAt": "2020-01-01T00:00:00Z",
    }
    await forwarder.deliver([old])
    assert await forwarder.expire() == 0
    assert await rows(forwarder, "select count(*) from events") == [(1,)]
    await forwarder.close()
