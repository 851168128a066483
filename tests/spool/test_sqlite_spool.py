"""The SQLite spool: group commit, cursors, pruning, restarts, and a full spool (the
durability cases with and without encryption at rest: the ``cipher`` fixture)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tagrelay.errors import SpoolUnavailable
from tagrelay.logthrottle import LogThrottle
from tagrelay.spool.encryption import PayloadCipher
from tagrelay.spool.sqlite import CursorState, HeadWatch, SqliteSpool
from tests.support import SERVER_KEY, basic, metric_value


async def open_spool(path: Path, **kwargs: Any) -> SqliteSpool:
    spool = SqliteSpool(path / "spool.sqlite3", **kwargs)
    await spool.open()
    return spool


async def test_reads_split_segments_at_any_event(tmp_path: Path, cipher: PayloadCipher) -> None:
    spool = await open_spool(tmp_path, cipher=cipher)
    await spool.append([(5, b'{"a":1}'), (6, b'{"a":2}'), (7, b'{"a":3}')])
    await spool.append([(9, b'{"a":4}')])
    assert [(r.seq, r.payload) for r in await spool.read(1, 2)] == [
        (2, b'{"a":2}'),
        (3, b'{"a":3}'),
    ]
    assert [r.seq for r in await spool.read(2, 10)] == [3, 4]
    assert [r.received_ms for r in await spool.read(0, 10)] == [5, 5, 5, 9]
    await spool.close()


async def test_concurrent_appends_share_commits(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    await asyncio.gather(*(spool.append([(1, f"e{i}".encode())]) for i in range(200)))
    assert spool.head == 200
    assert spool.commits < 200, "each request must not cost its own transaction"
    rows = await spool.read(0, 1000)
    assert sorted(r.payload for r in rows) == sorted(f"e{i}".encode() for i in range(200))
    await spool.close()


async def test_cursors_survive_a_restart_with_their_retry_state(
    tmp_path: Path, cipher: PayloadCipher
) -> None:
    spool = await open_spool(tmp_path, cipher=cipher)
    await spool.append([(1, b"a"), (1, b"b"), (1, b"c")])
    assert (await spool.register("w")).position == 3, "a new forwarder starts at the head"
    await spool.append([(1, b"d"), (1, b"e")])
    await spool.advance("w", 4)
    await spool.record_failure("w", CursorState(4, attempts=3, first_failure_ms=1234, batch_last=5))
    await spool.close()

    again = await open_spool(tmp_path, cipher=cipher)
    state = await again.register("w")
    assert state == CursorState(4, attempts=3, first_failure_ms=1234, batch_last=5)
    assert [r.payload for r in await again.read(state.position, 10)] == [b"e"]
    await again.close()


async def test_a_spool_of_an_older_version_gets_the_cursors_batch_column(tmp_path: Path) -> None:
    """Spools written before ``batch_last`` existed open with their cursors as they were."""
    path = tmp_path / "spool.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE cursors (forwarder TEXT PRIMARY KEY, position INTEGER NOT NULL, "
            "attempts INTEGER NOT NULL DEFAULT 0, first_failure_ms INTEGER)"
        )
        conn.execute("INSERT INTO cursors VALUES ('w', 0, 2, 99)")
    conn.close()
    spool = await open_spool(tmp_path)
    assert await spool.register("w") == CursorState(0, attempts=2, first_failure_ms=99)
    await spool.record_failure("w", CursorState(0, 3, 99, batch_last=7))
    assert await spool.register("w") == CursorState(0, 3, 99, batch_last=7)
    await spool.close()


async def test_prune_keeps_what_the_slowest_cursor_needs(
    tmp_path: Path, cipher: PayloadCipher
) -> None:
    spool = await open_spool(tmp_path, cipher=cipher)
    await spool.register("fast")
    await spool.register("slow")
    for payload in (b"1", b"2", b"3"):  # three commits: three segments
        await spool.append([(1, payload)])
    await spool.advance("fast", 3)
    await spool.advance("slow", 1)
    assert await spool.prune() == 1
    assert [r.seq for r in await spool.read(0, 10)] == [2, 3]
    assert await spool.drop_cursors_except({"fast"}) == ["slow"]
    # the newest segment stays (it remembers the head); nothing after the cursor is left
    assert await spool.prune() == 1
    assert [r.seq for r in await spool.read(0, 10)] == [3]
    assert await spool.read(3, 10) == []
    await spool.close()


async def test_a_retired_cursor_holds_its_events_until_it_is_forgotten_or_taken_back(
    tmp_path: Path,
) -> None:
    spool = await open_spool(tmp_path)
    await spool.register("kept")
    await spool.register("gone")
    await spool.register("back")
    for payload in (b"1", b"2", b"3"):
        await spool.append([(1, payload)])
    for name in ("kept", "gone", "back"):
        await spool.advance(name, 1)
    await spool.advance("kept", 3)

    assert sorted(await spool.retire_cursors_except({"kept"})) == ["back", "gone"]
    assert await spool.retire_cursors_except({"kept"}) == [], "retired once, at the first time"
    assert "gone" not in spool.positions()
    assert await spool.prune() == 1, "the retired cursors still hold events 2 and 3"
    assert [r.seq for r in await spool.read(0, 10)] == [2, 3]

    assert (await spool.register("back")).position == 1, "taken back where it was"
    assert await spool.forget_retired_cursors(retired_before_ms=0) == []
    assert await spool.forget_retired_cursors(retired_before_ms=2**62) == ["gone"]
    await spool.advance("back", 3)
    await spool.prune()
    assert [r.seq for r in await spool.read(0, 10)] == [3]
    await spool.close()


async def test_a_new_cursor_starts_at_the_head_or_before_the_earliest_event_held(
    tmp_path: Path,
) -> None:
    spool = await open_spool(tmp_path)
    assert (await spool.register("empty", "earliest")).position == 0
    await spool.advance("empty", 0)
    for payload in (b"1", b"2", b"3"):
        await spool.append([(1, payload)])
    await spool.advance("empty", 1)
    await spool.prune()  # event 1 is gone: 2 and 3 are held
    assert (await spool.register("head")).position == 3
    assert (await spool.register("earliest", "earliest")).position == 1
    assert [r.seq for r in await spool.read(1, 10)] == [2, 3]
    await spool.close()


async def test_sequence_stays_monotonic_after_pruning_everything_and_restarting(
    tmp_path: Path, cipher: PayloadCipher
) -> None:
    spool = await open_spool(tmp_path, cipher=cipher)
    await spool.register("w")
    await spool.append([(1, b"1"), (1, b"2")])
    await spool.advance("w", 2)
    await spool.prune()
    await spool.close()
    again = await open_spool(tmp_path, cipher=cipher)
    state = await again.register("w")
    await again.append([(1, b"3")])
    rows = await again.read(state.position, 10)
    assert [(r.seq, r.payload) for r in rows] == [(3, b"3")]
    await again.close()


async def test_a_full_spool_raises_and_stores_nothing(
    tmp_path: Path, cipher: PayloadCipher
) -> None:
    spool = await open_spool(tmp_path, max_size_mb=1, cipher=cipher)
    big = b"x" * 100_000
    with pytest.raises(SpoolUnavailable):
        for _ in range(50):
            await spool.append([(1, big)])
    stored = len(await spool.read(0, 1000))
    assert stored == spool.head < 50
    assert not spool.writable()
    await spool.close()


async def test_a_full_spool_logs_one_error_per_interval_with_the_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tagrelay.spool.sqlite")
    spool = await open_spool(tmp_path, max_size_mb=1)
    clock = [0.0]
    spool._errors = LogThrottle(logging.getLogger("tagrelay.spool.sqlite"), clock=lambda: clock[0])
    big = b"x" * 100_000
    refused = 0
    for _ in range(40):
        try:
            await spool.append([(1, big)])
        except SpoolUnavailable:
            refused += 1
    assert refused >= 20, "the spool filled up and refused the rest"
    [first] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert (first.levelname, first.getMessage(), first.repeated) == (
        "ERROR",
        "spool commit failed",
        1,
    )
    clock[0] += 61  # the interval has passed: the next refusal logs, with the count
    with pytest.raises(SpoolUnavailable):
        await spool.append([(1, big)])
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 2
    assert errors[1].repeated == refused  # type: ignore[attr-defined]
    await spool.close()


async def test_full_spool_answers_503_with_retry_after_and_counts_it(relay: Any) -> None:
    client = await relay(spool={"max_size_mb": 1})
    body = {
        "batch": [
            {"type": "track", "event": "x", "anonymousId": "a", "properties": {"pad": "y" * 30_000}}
            for _ in range(15)
        ]
    }
    statuses = []
    for _ in range(6):
        resp = await client.post("/v1/batch", json=body, headers=basic(SERVER_KEY))
        statuses.append(resp.status)
        if resp.status == 503:
            assert resp.headers["Retry-After"] == "5"
            assert (await resp.json())["error"] == "spool_unavailable"
    assert 503 in statuses
    accepted = statuses.count(200) * 15
    assert (
        metric_value(client.app, "tagrelay_events_accepted_total", {"source": "segment"})
        == accepted
    )
    assert metric_value(
        client.app,
        "tagrelay_events_rejected_total",
        {"source": "segment", "reason": "spool_unavailable"},
    ) == 15 * statuses.count(503)
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert "spool_not_writable" in (await ready.json())["problems"]


async def test_spool_commits_are_exported(relay: Any) -> None:
    client = await relay(metrics={"public": True})
    for i in range(3):
        resp = await client.post(
            "/v1/track", json={"event": "x", "anonymousId": f"a{i}"}, headers=basic(SERVER_KEY)
        )
        assert resp.status == 200
    text = await (await client.get("/metrics")).text()
    assert "tagrelay_spool_commits_total 3.0" in text


async def test_prune_works_in_chunks_until_done(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    await spool.register("w")
    for i in range(25):
        await spool.append([(1, str(i).encode())])
    await spool.advance("w", 25)
    assert await spool.prune(chunk=10) == 24  # 10 + 10 + 4; the newest segment stays
    assert [r.seq for r in await spool.read(0, 100)] == [25]
    await spool.close()


async def test_checkpoint_moves_the_wal_into_the_database(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    for i in range(50):
        await spool.append([(1, b"x" * 4000 + str(i).encode())])
    wal = tmp_path / "spool.sqlite3-wal"
    db = tmp_path / "spool.sqlite3"
    size_before = db.stat().st_size
    assert wal.stat().st_size > 200_000, "no automatic checkpoint on the commit path"
    await spool.checkpoint()
    assert db.stat().st_size > size_before + 150_000
    await spool.close()


async def test_a_watch_on_another_loop_is_woken_at_its_level_and_once_until_rearmed(
    tmp_path: Path,
) -> None:
    """A commit wakes a watch of another loop (the delivery thread's) through that loop, and
    only once the head has reached the watch's level; while its event is still set, further
    commits do not wake that thread again."""
    import threading

    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, daemon=True)
    thread.start()
    scheduled: list[object] = []

    class CountingLoop:
        """Stands for the other loop; counts the wake-ups it is asked for."""

        def call_soon_threadsafe(self, callback: Any, *args: Any) -> None:
            scheduled.append(callback)
            other.call_soon_threadsafe(callback, *args)

    def on_other(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, other).result()

    async def subscribe(spool: SqliteSpool) -> HeadWatch:
        return spool.subscribe()

    try:
        spool = await open_spool(tmp_path)
        watch = on_other(subscribe(spool))
        watch.loop = CountingLoop()

        async def is_set() -> bool:
            return watch.event.is_set()

        async def arm(level: int) -> None:
            watch.arm(level)

        await spool.append([(1, b"a")])
        assert on_other(is_set()) and len(scheduled) == 1, "armed for any commit at first"
        await spool.append([(1, b"b")])
        await spool.append([(1, b"c")])
        assert len(scheduled) == 1, "still set: no second wake-up"

        on_other(arm(spool.head + 3))  # a batch of 3 more
        await spool.append([(1, b"d")])
        await spool.append([(1, b"e")])
        assert not on_other(is_set()) and len(scheduled) == 1, "below the level: no wake-up"
        await spool.append([(1, b"f")])
        assert on_other(is_set()) and len(scheduled) == 2, "the level reached: woken"

        on_other(arm(spool.head + 1))
        await spool.append([(1, b"g"), (1, b"h")])
        assert on_other(is_set()) and len(scheduled) == 3, "re-armed: the next commit wakes it"
        await spool.close()
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join()
        other.close()
