"""The JetStream spool against a real NATS server (tests/nats_server.py): the stream made
and checked at start-up, acks before the append completes, duplicates dropped by message
id across replicas, a consumer shared by two replicas, acknowledgement, redelivery after a
replica goes away without acknowledging, dead letters in their own stream, sealed events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import nats
import orjson
import pytest

from tagrelay.crypto import Keyring, generate_key
from tagrelay.spool.dead_letters import Selection
from tagrelay.spool.encryption import PayloadCipher
from tagrelay.spool.jetstream import JetStreamSettings, JetStreamSpool
from tagrelay.spool.sqlite import CursorState
from tests.nats_server import delete_streams, nats_url, stream_name


@pytest.fixture
async def settings() -> AsyncIterator[JetStreamSettings]:
    url = await nats_url()
    name = stream_name()
    yield JetStreamSettings(servers=(url,), stream=name, ack_wait_secs=1.0)
    await delete_streams(url, name)


def rows(*ids: str) -> tuple[list[tuple[int, bytes]], list[str]]:
    return (
        [(1_700_000_000_000 + i, orjson.dumps({"messageId": m})) for i, m in enumerate(ids)],
        list(ids),
    )


async def read_until(spool: JetStreamSpool, forwarder: str, after: int, want: int, limit=100):
    """Poll the replica's held messages (the puller fills them) until ``want`` arrived."""
    watch = spool.subscribe(forwarder)
    while True:
        watch.arm(after + want)
        got = await spool.read(after, limit, forwarder=forwarder)
        if len(got) >= want:
            return got
        await asyncio.wait_for(watch.wait(), 10)


async def test_the_stream_is_created_with_file_storage_and_derived_subjects(settings):
    spool = JetStreamSpool(settings)
    await spool.open()
    try:
        client = await nats.connect(settings.servers[0])
        info = await client.jetstream().stream_info(settings.stream)
        await client.close()
        assert info.config.subjects == [f"{settings.stream}.events"]
        assert info.config.storage == "file"
        assert info.config.num_replicas == 1
        assert info.config.duplicate_window == settings.duplicate_window_secs
        assert spool.writable()
    finally:
        await spool.close()
    # a second start checks the stream that is there
    again = JetStreamSpool(settings)
    await again.open()
    await again.close()


async def test_append_counts_resends_across_replicas_once(settings):
    a, b = JetStreamSpool(settings), JetStreamSpool(settings)
    await a.open()
    await b.open()
    try:
        assert await a.append(*rows("m1", "m2")) == 2
        assert await b.append(*rows("m2", "m3")) == 1  # m2 reached the other replica first
        await a.register("hook", "earliest")
        got = await read_until(a, "hook", 0, 3)
        assert [orjson.loads(e.payload)["messageId"] for e in got] == ["m1", "m2", "m3"]
        assert [e.seq for e in got] == [1, 2, 3]
        # when the stream stored it: the relay's arrival time, to within the publish
        assert abs(got[0].received_ms - time.time() * 1000) < 60_000
    finally:
        await a.close()
        await b.close()


async def test_a_shared_consumer_gives_each_event_to_one_replica_and_acks_stick(settings):
    a, b = JetStreamSpool(settings), JetStreamSpool(settings)
    await a.open()
    await b.open()
    try:
        await a.register("hook", "earliest")
        await b.register("hook", "earliest")
        await a.append(*rows(*[f"m{i}" for i in range(10)]))
        seen: list[str] = []
        positions = {"a": 0, "b": 0}
        while len(seen) < 10:
            for name, spool in (("a", a), ("b", b)):
                got = await spool.read(positions[name], 4, forwarder="hook")
                if got:
                    seen += [orjson.loads(e.payload)["messageId"] for e in got]
                    positions[name] = got[-1].seq
                    await spool.advance("hook", got[-1].seq)
            await asyncio.sleep(0.01)
        assert sorted(seen) == sorted(f"m{i}" for i in range(10))  # each once
        await a.refresh()
        assert a.depth("hook") == 0
    finally:
        await a.close()
        await b.close()


async def test_a_batch_not_acknowledged_goes_to_another_replica(settings):
    a = JetStreamSpool(settings)
    await a.open()
    await a.register("hook", "earliest")
    await a.append(*rows("m1", "m2"))
    got = await read_until(a, "hook", 0, 2)
    assert len(got) == 2
    # the replica dies holding the batch: its connection gone, no ack, no "in progress"
    for consumer in a._consumers.values():
        consumer.keeper.cancel()
        consumer.puller.cancel()
    for client, _ in list(a._conns._by_loop.values()):
        await client.close()
    b = JetStreamSpool(settings)
    await b.open()
    try:
        await b.register("hook", "earliest")
        again = await read_until(b, "hook", 0, 2)  # after ack_wait (1 s)
        assert [orjson.loads(e.payload)["messageId"] for e in again] == ["m1", "m2"]
    finally:
        await b.close()


async def test_a_batch_held_longer_than_ack_wait_is_not_redelivered(settings):
    a, b = JetStreamSpool(settings), JetStreamSpool(settings)
    await a.open()
    await b.open()
    try:
        await a.register("hook", "earliest")
        await a.append(*rows("m1"))
        await read_until(a, "hook", 0, 1)
        await b.register("hook", "earliest")
        await asyncio.sleep(3 * settings.ack_wait_secs)  # a retries meanwhile
        assert await b.read(0, 10, forwarder="hook") == []
        await a.record_failure("hook", CursorState(0, 1, 1, 1))
        await a.advance("hook", 1)
    finally:
        await a.close()
        await b.close()


async def test_dead_letters_live_in_their_own_stream(settings):
    spool = JetStreamSpool(settings)
    await spool.open()
    try:
        await spool.register("hook", "earliest")
        await spool.append(*rows("m1", "m2", "m3"))
        got = await read_until(spool, "hook", 0, 3)
        await spool.dead_letter("hook", got[:2], "status_4xx", "HTTP 400: no", 1, advance_to=2)
        await spool.advance("hook", 3)
        assert spool.dead_letter_counts() == {"hook": 2}
        found = await spool.dead_letters("hook")
        assert [orjson.loads(r.payload)["messageId"] for r in found] == ["m1", "m2"]
        assert found[0].reason == "status_4xx" and found[0].detail == "HTTP 400: no"
        assert await spool.dead_letter_by_id(found[1].id) == found[1]
        assert await spool.last_dead_letter_id() == found[1].id
        newest = await spool.dead_letters(limit=1, newest_first=True)
        assert newest == [found[1]]
        assert await spool.dead_letters_died_again([found[0].id], "status_5xx", "HTTP 503") == 1
        rows_now = await spool.dead_letters("hook")
        assert [(r.reason, r.attempts) for r in rows_now] == [("status_4xx", 1), ("status_5xx", 2)]
        assert await spool.purge_dead_letters(Selection(forwarder="hook", reason="status_5xx")) == 1
        assert await spool.forget_dead_letters([rows_now[0].id]) == 1
        await spool.refresh()
        assert spool.dead_letter_counts() == {} and spool.depth("hook") == 0
    finally:
        await spool.close()


async def test_events_and_dead_letters_are_sealed_with_keys(settings):
    cipher = PayloadCipher(Keyring.from_texts([generate_key()]))
    spool = JetStreamSpool(settings, cipher=cipher)
    await spool.open()
    try:
        await spool.register("hook", "earliest")
        await spool.append(*rows("secret-visitor"))
        got = await read_until(spool, "hook", 0, 1)
        assert orjson.loads(got[0].payload)["messageId"] == "secret-visitor"
        await spool.dead_letter("hook", got, "status_4xx", "a@example.com", 1, advance_to=1)
        client = await nats.connect(settings.servers[0])
        js = client.jetstream()
        stored = await js.get_msg(settings.stream, 1)
        dead = await js.get_msg(settings.dead_letter_stream, 1)
        await client.close()
        assert b"secret-visitor" not in stored.data
        assert b"a@example.com" not in dead.data and b"secret-visitor" not in dead.data
        (row,) = await spool.dead_letters("hook")
        assert row.detail == "a@example.com"
    finally:
        await spool.close()


async def test_an_append_the_stream_refuses_raises_and_is_not_acknowledged(settings):
    from dataclasses import replace

    from tagrelay.errors import SpoolUnavailable

    small = replace(settings, max_bytes=4096)  # full after a few events: discard new
    spool = JetStreamSpool(small)
    await spool.open()
    try:
        big = [(1, orjson.dumps({"messageId": f"m{i}", "pad": "x" * 1000})) for i in range(10)]
        with pytest.raises(SpoolUnavailable):
            await spool.append(big, [f"m{i}" for i in range(10)])
        assert not spool.writable()
    finally:
        await spool.close()


async def test_a_stopped_worker_hands_its_batch_back_at_once(settings):
    slow = JetStreamSettings(servers=settings.servers, stream=settings.stream, ack_wait_secs=600)
    a, b = JetStreamSpool(slow), JetStreamSpool(slow)
    await a.open()
    await b.open()
    try:
        await a.register("hook", "earliest")
        await a.append(*rows("m1", "m2"))
        assert len(await read_until(a, "hook", 0, 2)) == 2
        await a.leave_loop()  # a relay stopping (or a reload) while it holds the batch
        await b.register("hook", "earliest")
        got = await read_until(b, "hook", 0, 2)  # long before ack_wait (600 s)
        assert [orjson.loads(e.payload)["messageId"] for e in got] == ["m1", "m2"]
        # a reload registers the forwarder again: the previous worker's batch comes back
        await b.register("hook", "earliest")
        assert len(await read_until(b, "hook", 0, 2)) == 2
    finally:
        await a.close()
        await b.close()


async def test_an_event_sealed_under_another_key_stays_in_the_stream(settings):
    key = generate_key()
    writer = JetStreamSpool(settings, cipher=PayloadCipher(Keyring.from_texts([key])))
    wrong = JetStreamSpool(settings, cipher=PayloadCipher(Keyring.from_texts([generate_key()])))
    await writer.open()
    await wrong.open()
    try:
        await wrong.register("hook", "earliest")
        await writer.append(*rows("sealed"))
        await wrong.read(0, 10, forwarder="hook")  # its puller pulls, cannot open it
        await asyncio.sleep(1.5)  # it tried, and handed the event back
        assert await wrong.read(0, 10, forwarder="hook") == []
        await wrong.leave_loop()
        await writer.register("hook", "earliest")
        got = await read_until(writer, "hook", 0, 1)  # the right key reads it
        assert orjson.loads(got[0].payload)["messageId"] == "sealed"
    finally:
        await writer.close()
        await wrong.close()


async def test_depth_and_lag_come_from_the_stream(settings):
    from tagrelay.app import forwarder_lags

    spool = JetStreamSpool(settings)
    await spool.open()
    try:
        await spool.register("hook", "earliest")
        await spool.append(*rows("m1", "m2"))
        await spool.refresh()
        assert spool.depth("hook") == 2
        lag = (await forwarder_lags(spool, ["hook"]))["hook"]
        assert 0 < lag < 60
        got = await read_until(spool, "hook", 0, 2)
        await spool.advance("hook", got[-1].seq)
        while spool.depth("hook"):  # the acks are on their way to the server
            await spool.refresh()
        assert await forwarder_lags(spool, ["hook"]) == {"hook": 0.0}
    finally:
        await spool.close()


async def test_events_without_message_ids_are_sealed_too(settings):
    cipher = PayloadCipher(Keyring.from_texts([generate_key()]))
    spool = JetStreamSpool(settings, cipher=cipher)
    await spool.open()
    try:
        await spool.register("hook", "earliest")
        events, _ = rows("no-id-visitor")
        await spool.append(events)  # no ids: nothing to deduplicate on, still sealed
        got = await read_until(spool, "hook", 0, 1)
        assert orjson.loads(got[0].payload)["messageId"] == "no-id-visitor"
        client = await nats.connect(settings.servers[0])
        stored = await client.jetstream().get_msg(settings.stream, 1)
        await client.close()
        assert b"no-id-visitor" not in stored.data
    finally:
        await spool.close()
