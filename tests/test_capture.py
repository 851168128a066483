"""The debug view's capture (``tagrelay.capture``): the bounded rings, the sampling every
process agrees on, and the hub: off unless a view is connected or a sample rate is set,
every record scrubbed of the configuration's secrets, views that fall behind told so."""

from __future__ import annotations

import asyncio
import threading

import orjson
import pytest

from tagrelay.capture import NO_CAPTURE, Captured, DebugHub, RingBuffer, Subscription, sampled


def item(seq: int, weight: int = 1, size: int = 10) -> Captured:
    return Captured(seq, "request", b"x" * size, weight)


def test_a_ring_keeps_the_last_records_up_to_its_capacity() -> None:
    ring = RingBuffer(capacity=3)
    for seq in range(1, 6):
        ring.append(item(seq))
    assert [c.seq for c in ring] == [3, 4, 5]
    assert (len(ring), ring.weight, ring.evicted) == (3, 3, 2)


def test_a_ring_counts_a_request_by_its_events() -> None:
    ring = RingBuffer(capacity=10)
    ring.append(item(1, weight=4))
    ring.append(item(2, weight=4))
    ring.append(item(3, weight=4))  # 12 events: the oldest request goes
    assert [c.seq for c in ring] == [2, 3]
    assert ring.weight == 8


def test_a_ring_is_bounded_in_bytes_too_and_keeps_the_newest_record_alone() -> None:
    ring = RingBuffer(capacity=100, max_bytes=25)
    ring.append(item(1, size=10))
    ring.append(item(2, size=10))
    ring.append(item(3, size=10))
    assert [c.seq for c in ring] == [2, 3]
    assert ring.size == 20
    ring.append(item(4, size=1000))  # over the bound on its own: kept, alone
    assert [c.seq for c in ring] == [4]
    ring.clear()
    assert (len(ring), ring.weight, ring.size) == (0, 0, 0)


def test_a_ring_needs_room_for_one() -> None:
    with pytest.raises(ValueError):
        RingBuffer(capacity=0)


def test_sampling_is_decided_by_the_message_id() -> None:
    ids = [f"m-{i}" for i in range(20_000)]
    assert all(sampled(i, 1.0) for i in ids[:100])
    assert not any(sampled(i, 0.0) for i in ids[:100])
    taken = [i for i in ids if sampled(i, 0.1)]
    assert 1_600 < len(taken) < 2_400
    # The same ids every time (the relay and the delivery process agree), and a lower rate
    # samples a subset of a higher one.
    assert taken == [i for i in ids if sampled(i, 0.1)]
    assert set(i for i in ids if sampled(i, 0.05)) <= set(taken)


def test_the_null_capture_is_off() -> None:
    assert NO_CAPTURE.rate == 0
    NO_CAPTURE.exchange({"x": 1})
    NO_CAPTURE.outcome({"x": 1})


async def test_capture_is_off_until_a_view_connects_and_the_delivery_process_is_told() -> None:
    hub = DebugHub()
    told: list[float] = []

    async def listener(rate: float) -> None:
        told.append(rate)

    hub.rate_listeners.append(listener)
    assert hub.rate == 0 and hub.delivery.rate == 0
    assert hub.sample_request(["a", "b"]) == []
    first = await hub.attach()
    second = await hub.attach()
    assert hub.rate == 1 and hub.delivery.rate == 1 and hub.viewers == 2
    assert hub.sample_request(["a", "b"]) == [0, 1]
    await hub.detach(first)
    assert hub.rate == 1
    await hub.detach(second)
    await hub.detach(second)  # twice: no harm
    assert hub.rate == 0 and hub.viewers == 0
    assert told == [1.0, 0.0]  # told of changes only


async def test_a_sample_rate_captures_without_a_view() -> None:
    hub = DebugHub(sample_rate=0.5)
    told: list[float] = []

    async def listener(rate: float) -> None:
        told.append(rate)

    hub.rate_listeners.append(listener)
    assert hub.rate == 0.5
    ids = [f"m-{i}" for i in range(1000)]
    chosen = hub.sample_request(ids)
    assert chosen == [i for i, mid in enumerate(ids) if sampled(mid, 0.5)]
    view = await hub.attach()
    assert hub.rate == 1
    await hub.detach(view)
    assert hub.rate == 0.5
    assert told == [1.0, 0.5]


async def test_a_failing_listener_does_not_stop_a_view() -> None:
    hub = DebugHub()

    async def broken(rate: float) -> None:
        raise RuntimeError("the delivery process is gone")

    hub.rate_listeners.append(broken)
    view = await hub.attach()
    assert hub.rate == 1
    await hub.detach(view)


async def test_records_reach_every_view_and_the_rings_scrubbed_of_secrets() -> None:
    secret = "whsec_0123456789"
    hub = DebugHub(buffer_events=10, scrub=lambda text: text.replace(secret, "***"))
    view = await hub.attach()
    hub.record("request", {"events": [{"messageId": "m-1"}], "note": f"key {secret}"}, weight=1)
    hub.record("exchange", {"message_ids": ["m-1"], "headers": {"X-Token": secret}})
    hub.record("outcome", {"message_ids": ["m-1"], "status": "sent"})
    got = await view.next(0.1)
    assert [c.kind for c in got] == ["request", "exchange", "outcome"]
    assert [c.seq for c in got] == [1, 2, 3]
    for captured in got:
        assert secret.encode() not in captured.data
    assert orjson.loads(got[0].data)["note"] == "key ***"
    assert [c.seq for c in hub.backlog()] == [1, 2, 3]
    assert len(hub.requests) == 1 and len(hub.deliveries) == 2
    await hub.detach(view)
    assert view.closed
    assert await view.next(0.1) == []


async def test_a_record_that_cannot_be_serialized_is_skipped() -> None:
    hub = DebugHub()
    assert hub.record("outcome", {"bad": {("a", "b"): 1}}) is None
    assert hub.record("outcome", {"good": 1}) is not None
    assert [c.seq for c in hub.backlog()] == [1]


async def test_records_posted_from_another_thread_are_kept_on_the_hubs_loop() -> None:
    hub = DebugHub()
    hub.bind(asyncio.get_running_loop())
    view = await hub.attach()
    on_loop: list[bool] = []
    original = hub.record

    def record(kind: str, record: dict[str, object], weight: int = 1) -> Captured | None:
        on_loop.append(threading.current_thread() is threading.main_thread())
        return original(kind, record, weight)

    hub.record = record  # type: ignore[method-assign]
    thread = threading.Thread(target=hub.delivery.outcome, args=({"status": "sent"},))
    thread.start()
    thread.join()
    got = await view.next(1.0)
    assert [c.kind for c in got] == ["outcome"]
    assert on_loop == [True]


async def test_a_view_that_falls_behind_is_told_how_much_it_missed() -> None:
    view = Subscription(limit=3)
    for seq in range(1, 6):
        view.push(item(seq))
    got = await view.next(0.1)
    assert [c.seq for c in got] == [3, 4, 5]
    assert view.missed == 2
    assert await view.next(0.01) == []
