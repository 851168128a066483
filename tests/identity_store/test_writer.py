"""The identity store's writer, the internal forwarder: what it records and ignores (by
consent), its counts, and the re-encryption of records under an older key, a batch at a
time, after a key rotation."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from typing import Any

from pydantic import SecretStr

from tagrelay.forwarders import ForwarderContext, forwarder_class
from tagrelay.identity_store import IdentityStoreConfig, StoreSettings
from tagrelay.identity_store.writer import IdentityWriter, writer_config
from tagrelay.model import Delivered

GRANTED = {"analytics": "granted", "ads": "granted", "ad_user_data": "granted"}


def event(n: int, consent: dict[str, str], **more: Any) -> dict[str, Any]:
    return {
        "type": "identify",
        "messageId": f"m-{n}",
        "anonymousId": f"anon-{n}",
        "userId": f"user-{n}",
        "traits": {"email": f"p{n}@example.com"},
        "context": {"consent": consent, "clickIds": {"gclid": f"g-{n}"}},
        **more,
    }


def now() -> int:
    return int(time.time() * 1000)


def count(context: ForwarderContext, outcome: str) -> float:
    labels = {"outcome": outcome}
    value = context.metrics.registry.get_sample_value(
        "tagrelay_identity_store_events_total", labels
    )
    return value or 0.0


def writer(context: ForwarderContext, keys: list[str]) -> IdentityWriter:
    config = writer_config(IdentityStoreConfig(enabled=True), [SecretStr(k) for k in keys])
    cls = forwarder_class(config.type)
    assert cls is IdentityWriter
    found = cls(config, context)
    assert isinstance(found, IdentityWriter)
    return found


async def test_it_records_what_consent_allows_and_counts(context: ForwarderContext) -> None:
    w = writer(context, [])
    await w.start()
    try:
        outcome = await w.deliver(
            [
                event(1, GRANTED),
                event(2, {**GRANTED, "ad_user_data": "denied"}),
                event(3, {**GRANTED, "ads": "denied"}),
                {"type": "page", "messageId": "no-ids", "context": {"consent": GRANTED}},
            ]
        )
    finally:
        await w.close()
    assert isinstance(outcome, Delivered)
    assert (count(context, "recorded"), count(context, "ignored")) == (2, 2)
    store = StoreSettings(IdentityStoreConfig(enabled=True)).open_backend(context.data_dir)
    one, two, three = store.lookup([(None, "user-1"), (None, "user-2"), (None, "user-3")], now())
    assert one is not None and one.user == {"email": "p1@example.com"}
    # ad_user_data denied: the click id (ads) is kept, the email is not.
    assert two is not None and two.user == {} and set(two.click_ids) == {"gclid"}
    assert three is None


async def test_after_a_rotation_it_reencrypts_the_old_records(context: ForwarderContext) -> None:
    old, new = (base64.b64encode(os.urandom(32)).decode() for _ in range(2))
    w = writer(context, [old])
    await w.start()
    await w.deliver([event(n, GRANTED) for n in range(1200)])
    await w.close()

    w = writer(context, [new, old])
    await w.start()
    try:
        for batch in range(4):  # 500 a batch: three batches rotate 1,200 records
            await w.deliver([event(10_000 + batch, GRANTED)])
    finally:
        await w.close()
    only_new = StoreSettings(IdentityStoreConfig(enabled=True), (SecretStr(new),))
    store = only_new.open_backend(context.data_dir, writer=True)  # the old key can go
    (found,) = store.lookup([(None, "user-7")], now())
    assert found is not None and found.user == {"email": "p7@example.com"}
    assert store.reencrypt() == 0  # none left under the old key


async def test_it_deletes_expired_persons_without_traffic(
    context: ForwarderContext, monkeypatch: Any
) -> None:
    from tagrelay.identity_store import writer as writer_module
    from tagrelay.identity_store.record import Observation

    settings = StoreSettings(IdentityStoreConfig(enabled=True, ttl_days=1))
    store = settings.open_backend(context.data_dir, writer=True)
    long_ago = now() - 3 * 86_400_000
    store.record([Observation("anon-old", None, None, long_ago, {"email": "o@example.com"})], now())
    store.record([Observation("anon-new", None, None, now(), {"email": "n@example.com"})], now())
    store.close()

    monkeypatch.setattr(writer_module, "PURGE_INTERVAL_SECS", 0.01)
    config = writer_config(IdentityStoreConfig(enabled=True, ttl_days=1), [])
    w = IdentityWriter(config, context)
    await w.start()
    try:
        deadline = time.monotonic() + 10
        while count_expired(context) < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await w.close()
    assert count_expired(context) == 1
    left = settings.open_backend(context.data_dir)
    assert left.export(anonymous_id="anon-old") == {"persons": []}
    assert len(left.export(anonymous_id="anon-new")["persons"]) == 1


def count_expired(context: ForwarderContext) -> float:
    value = context.metrics.registry.get_sample_value("tagrelay_identity_store_expired_total")
    return value or 0.0
