"""Deduplication on messageId in the spool, and over HTTP."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tagrelay.appkeys import SPOOL
from tagrelay.errors import SpoolUnavailable
from tagrelay.spool import writer_child
from tagrelay.spool.dedup import RecentIds
from tagrelay.spool.sqlite import LOG_BOUNDS, SqliteSpool
from tests.support import SERVER_KEY, basic, metric_value

DAY = 86_400


async def open_spool(path: Path, window: float = DAY) -> SqliteSpool:
    spool = SqliteSpool(path / "spool.sqlite3", dedup_window_secs=window)
    await spool.open()
    return spool


async def payloads(spool: SqliteSpool) -> list[bytes]:
    return [e.payload for e in await spool.read(0, 1000)]


async def test_a_resent_id_is_not_stored_again(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    assert await spool.append([(1, b"a"), (1, b"b")], ["id-a", "id-b"]) == 2
    assert await spool.append([(2, b"a2"), (2, b"c")], ["id-a", "id-c"]) == 1
    assert await spool.append([(3, b"b2")], ["id-b"]) == 0  # a single event too
    assert await spool.append([(3, b"d")], ["id-d"]) == 1
    assert await payloads(spool) == [b"a", b"b", b"c", b"d"]
    assert spool.head == 4  # sequence numbers stay contiguous
    await spool.close()


async def test_copies_within_one_call_and_one_group_commit(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    assert await spool.append([(1, b"x1"), (1, b"x2")], ["x", "x"]) == 1
    # concurrent requests share a commit: the first copy wins, the others count as resends
    counts = await asyncio.gather(*(spool.append([(1, f"y{i}".encode())], ["y"]) for i in range(5)))
    assert sorted(counts) == [0, 0, 0, 0, 1]
    assert len(await payloads(spool)) == 2
    await spool.close()


async def test_ids_survive_a_restart(tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    spool = await open_spool(tmp_path)
    await spool.append([(now, b"a")], ["id-a"])
    await spool.close()
    again = await open_spool(tmp_path)
    assert await again.append([(now, b"a")], ["id-a"]) == 0
    assert await again.append([(now, b"b")], ["id-b"]) == 1
    await again.close()


async def test_without_a_window_nothing_is_deduplicated(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path, window=0)
    assert await spool.append([(1, b"a")], ["id-a"]) == 1
    assert await spool.append([(1, b"a")], ["id-a"]) == 1
    assert len(await payloads(spool)) == 2
    await spool.close()
    with sqlite3.connect(tmp_path / "spool.sqlite3") as conn:
        assert conn.execute("SELECT COUNT(*) FROM message_log").fetchone()[0] == 0


async def append_refused(
    spool: SqliteSpool, table: str, action: str, rows: list[tuple[int, bytes]], ids: list[str]
) -> None:
    """Append while a trigger makes every insert into ``table`` fail with ``action``; the
    append must fail as a whole. The trigger is gone afterwards."""
    with sqlite3.connect(spool.path) as conn:
        conn.execute(
            f"CREATE TRIGGER refuse BEFORE INSERT ON {table} "
            f"BEGIN SELECT RAISE({action}, 'disk full'); END"
        )
    with pytest.raises(SpoolUnavailable, match="disk full"):
        await spool.append(rows, ids)
    with sqlite3.connect(spool.path) as conn:
        conn.execute("DROP TRIGGER refuse")


async def test_a_failed_commit_records_no_id(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    await spool.append([(1, b"a")], ["id-a"])
    # Writing the segment fails: nothing of the commit is stored, no id is remembered.
    await append_refused(spool, "segments", "FAIL", [(1, b"b")], ["id-b"])
    assert await spool.append([(1, b"b")], ["id-b"]) == 1  # not a duplicate: never stored
    await spool.close()


async def test_a_failed_id_log_leaves_no_segment(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    # The segment is written, then logging its ids fails. ABORT is how SQLite answers a
    # failed statement (a full disk or max_page_count included): the statement undoes both.
    await append_refused(spool, "message_log", "ABORT", [(1, b"a")], ["id-a"])
    assert await spool.read(0, 10) == []
    with sqlite3.connect(spool.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM segments").fetchone() == (0,)
    assert await spool.append([(1, b"a")], ["id-a"]) == 1
    assert [e.payload for e in await spool.read(0, 10)] == [b"a"]
    await spool.close()


async def test_a_group_commit_is_one_frame_and_one_statement(tmp_path: Path) -> None:
    # Concurrent appends share one frame to the commit process, and there the segment and
    # its ids go in one statement (its own transaction, atomic).
    spool = await open_spool(tmp_path)
    commits = spool._commits
    assert commits is not None
    frames: list[tuple[Any, ...]] = []
    real_insert = commits.insert

    async def counting_insert(*args: Any) -> int:
        frames.append(args)
        return await real_insert(*args)

    commits.insert = counting_insert  # type: ignore[method-assign]
    await asyncio.gather(
        spool.append([(1, b"a"), (1, b"b")], ["id-a", "id-b"]),
        spool.append([(1, b"c")], ["id-c"]),
    )
    assert len(frames) == 1, frames
    with sqlite3.connect(tmp_path / "spool.sqlite3") as conn:
        logged = [r[0] for r in conn.execute("SELECT message_id FROM message_log ORDER BY id")]
    assert logged == ["id-a", "id-b", "id-c"]
    await spool.close()

    statements: list[str] = []

    class Counting:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            statements.append(sql)
            return self.conn.execute(sql, *args)

    conn = writer_child.open_connection(str(tmp_path / "spool.sqlite3"), "full", 0)
    writer_child.insert(Counting(conn), 4, 1, 1, b"d", '["id-d"]')  # type: ignore[arg-type]
    assert len(statements) == 1, statements
    assert conn.execute("SELECT COUNT(*) FROM message_log").fetchone() == (4,)
    conn.close()


async def test_the_log_is_pruned_by_window_and_by_capacity(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path, window=10)
    for i in range(30):
        await spool.append([(1_000 + i * 1_000, b"e")], [f"id-{i}"])
    # At t=30 s the window (10 s) keeps the ids received from t=20 s on.
    assert await spool.prune_message_ids(now_ms=30_000, chunk=7) == 19
    assert await spool.prune_message_ids(now_ms=30_000) == 0
    await spool.close()
    with sqlite3.connect(tmp_path / "spool.sqlite3") as conn:
        kept = [r[0] for r in conn.execute("SELECT message_id FROM message_log ORDER BY id")]
    assert kept == [f"id-{i}" for i in range(19, 30)]

    small = SqliteSpool(tmp_path / "other.sqlite3", dedup_window_secs=DAY, dedup_capacity=4)
    await small.open()
    now = int(time.time() * 1000)
    await small.append([(now, b"e")] * 10, [f"id-{i}" for i in range(10)])
    assert await small.prune_message_ids() == 6
    await small.close()


async def test_pruning_the_id_log_reads_only_its_ends(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "spool.sqlite3", dedup_window_secs=DAY)
    await spool.open()
    await spool.close()
    with sqlite3.connect(tmp_path / "spool.sqlite3") as conn:
        plan = [row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {LOG_BOUNDS}")]
    # "SEARCH message_log" twice (a B-tree descent to each end); never a full "SCAN".
    assert [p for p in plan if "message_log" in p] == ["SEARCH message_log"] * 2, plan


def test_recent_ids_rotate_by_capacity_and_by_time() -> None:
    recent = RecentIds(capacity=4, window_ms=1_000)
    recent.add_all(["a", "b"], now_ms=0)
    assert "a" in recent and "b" in recent and "c" not in recent
    recent.add_all(["c", "d"], now_ms=10)  # "c" finds the current generation full
    assert all(x in recent for x in "abcd")
    recent.add_all(["e"], now_ms=20)  # the generation of a, b is forgotten
    assert "a" not in recent and "b" not in recent and "c" in recent and "e" in recent
    assert len(recent) <= 4

    timed = RecentIds(capacity=1_000, window_ms=1_000)
    timed.add_all(["x"], now_ms=0)
    timed.add_all(["y"], now_ms=600)  # half the window passed: x moves to the previous one
    assert "x" in timed
    timed.add_all(["z"], now_ms=1_200)
    assert "x" not in timed and "y" in timed and "z" in timed


def test_recent_ids_are_not_walked_by_the_garbage_collector() -> None:
    # A full collection walks every element of a tracked container: with a window of
    # 250,000 ids, a set took ~15 ms per collection, a pause for every request in flight.
    recent = RecentIds(capacity=1_000, window_ms=1_000)
    recent.add_all([f"id-{i}" for i in range(300)], now_ms=0)
    recent.add_all([f"id-{i}" for i in range(300, 700)], now_ms=10)  # rotates one by one
    recent.add_all(["late"], now_ms=900)  # rotates by time
    generations = [recent._current, recent._previous]
    assert all(len(g) > 0 for g in generations)
    assert not any(gc.is_tracked(g) for g in generations)
    assert "id-650" in recent and "late" in recent
    assert recent.new_in({hash("other")}) and not recent.new_in({hash("late"), hash("x")})


async def test_an_sdk_resend_over_http_is_acknowledged_and_stored_once(relay: Any) -> None:
    client = await relay()
    event = {"event": "Order Completed", "userId": "u1", "messageId": "ajs-next-123"}
    for _ in range(2):
        resp = await client.post("/v1/track", json=event, headers=basic(SERVER_KEY))
        assert resp.status == 200
        assert await resp.json() == {"success": True}
    batch = {"batch": [{**event, "type": "track"}, {**event, "type": "track", "messageId": "n"}]}
    resp = await client.post("/v1/batch", json=batch, headers=basic(SERVER_KEY))
    assert (await resp.json())["accepted"] == 2
    rows = await client.app[SPOOL].read(0, 100)
    assert [orjson.loads(r.payload)["messageId"] for r in rows] == ["ajs-next-123", "n"]
    labels = {"source": "segment"}
    assert metric_value(client.app, "tagrelay_events_accepted_total", labels) == 2
    assert metric_value(client.app, "tagrelay_events_duplicate_total", labels) == 2
