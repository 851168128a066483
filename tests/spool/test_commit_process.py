"""The spool's commit process (``spool.writer``): it holds the spool's lock with the relay,
outlives a Ctrl-C to the process group until the relay closes it, and when it dies the round
in flight fails and a new process takes the next commit, from the head and the ids that are
really on disk."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tagrelay.errors import SpoolUnavailable
from tagrelay.spool.encryption import PLAINTEXT, PayloadCipher, sealed_key_id
from tagrelay.spool.sqlite import SqliteSpool

DAY = 86_400.0


async def open_spool(path: Path, cipher: PayloadCipher = PLAINTEXT) -> SqliteSpool:
    spool = SqliteSpool(path / "spool.sqlite3", dedup_window_secs=DAY, cipher=cipher)
    await spool.open()
    return spool


def now_ms() -> int:
    return int(time.time() * 1000)


async def kill_commit_process(spool: SqliteSpool) -> int:
    commits = spool._commits
    assert commits is not None and commits._proc is not None
    pid = commits._proc.pid
    os.kill(pid, signal.SIGKILL)
    await commits._proc.wait()
    return pid


async def test_a_dead_commit_process_fails_its_round_and_is_replaced(
    tmp_path: Path, cipher: PayloadCipher
) -> None:
    spool = await open_spool(tmp_path, cipher)
    assert await spool.append([(now_ms(), b"a")], ["id-a"]) == 1
    old_pid = await kill_commit_process(spool)

    with pytest.raises(SpoolUnavailable):
        await spool.append([(now_ms(), b"b")], ["id-b"])
    assert not spool.writable()

    # Whether a lost round reached the disk is unknown to the relay. Here it did:
    with sqlite3.connect(spool.path) as conn:
        conn.execute(
            "INSERT INTO segments (last_seq, count, received_ms, payload, key_id) "
            "VALUES (2, 1, 0, ?, ?)",
            (sealed := cipher.seal_segment(2, b"b"), sealed_key_id(sealed)),
        )
        conn.execute(
            "INSERT INTO message_log (message_id, received_ms) VALUES ('id-b', ?)", (now_ms(),)
        )

    # The client resends (it got a 503): the new process starts from what is on disk, so
    # the resend is a duplicate and the next event takes the next sequence number.
    assert await spool.append([(now_ms(), b"b")], ["id-b"]) == 0
    assert await spool.append([(now_ms(), b"c")], ["id-c"]) == 1
    assert spool._commits is not None and spool._commits.pid != old_pid
    assert [(e.seq, e.payload) for e in await spool.read(0, 10)] == [
        (1, b"a"),
        (2, b"b"),
        (3, b"c"),
    ]
    await spool.close()


async def test_a_lost_round_that_did_not_land_is_stored_on_the_resend(
    tmp_path: Path, cipher: PayloadCipher
) -> None:
    spool = await open_spool(tmp_path, cipher)
    await spool.append([(now_ms(), b"a")], ["id-a"])
    await kill_commit_process(spool)
    with pytest.raises(SpoolUnavailable):
        await spool.append([(now_ms(), b"b")], ["id-b"])
    assert await spool.append([(now_ms(), b"b")], ["id-b"]) == 1
    assert [e.payload for e in await spool.read(0, 10)] == [b"a", b"b"]
    await spool.close()


async def test_one_relay_per_spool_and_the_commit_process_holds_the_lock_too(
    tmp_path: Path,
) -> None:
    first = await open_spool(tmp_path)
    second = SqliteSpool(tmp_path / "spool.sqlite3")
    second.lock_wait_secs = 0.2
    with pytest.raises(SpoolUnavailable, match="another tagrelay process is using"):
        await second.open()

    # As if the relay had died: its own handle on the lock is gone, its commit process
    # (which may be finishing a statement) is not, and keeps the spool locked.
    assert first._lock_handle is not None
    first._lock_handle.close()
    first._lock_handle = None
    with pytest.raises(SpoolUnavailable, match="another tagrelay process is using"):
        await second.open()
    assert first._commits is not None
    await first._commits.close()  # the socket closes: the process exits
    await second.open()
    assert await second.append([(now_ms(), b"x")]) == 1
    await second.close()
    await first.close()


async def test_the_commit_process_ignores_a_ctrl_c_to_the_process_group(tmp_path: Path) -> None:
    # Ctrl-C in a terminal reaches every process of the group; the relay then finishes its
    # commits during its graceful shutdown, so the commit process must still be there.
    spool = await open_spool(tmp_path)
    assert spool._commits is not None and spool._commits._proc is not None
    proc = spool._commits._proc
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.2)
    assert proc.returncode is None
    assert await spool.append([(now_ms(), b"a")], ["id-a"]) == 1
    await spool.close()
    assert proc.returncode == 0


async def test_a_refused_statement_leaves_the_commit_process_running(
    tmp_path: Path, cipher: PayloadCipher
) -> None:
    spool = SqliteSpool(tmp_path / "spool.sqlite3", max_size_mb=1, cipher=cipher)
    await spool.open()
    assert spool._commits is not None
    pid = spool._commits.pid
    with pytest.raises(SpoolUnavailable, match="full"):
        await spool.append([(now_ms(), os.urandom(600_000).hex().encode())])
    assert await spool.append([(now_ms(), b"small")]) == 1
    assert spool._commits.pid == pid
    await spool.close()


async def test_pruning_deletes_run_in_the_commit_process_between_commits(
    tmp_path: Path,
) -> None:
    # One writer for commits and deletes: from the writer thread's connection the deletes
    # fought the commits for SQLite's write lock (commits of 10-40 ms every second).
    spool = await open_spool(tmp_path)
    spool.dedup_capacity = 2
    for i in range(5):
        await spool.append([(now_ms(), b"e%d" % i)], [f"id-{i}"])
    await spool.register("fwd")
    await spool.advance("fwd", 4)

    statements: list[str] = []
    real = spool._wconn
    assert real is not None

    class NoDeletes:
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            statements.append(sql)
            assert not sql.lstrip().upper().startswith("DELETE"), sql
            return real.execute(sql, *args)

    spool._wconn = NoDeletes()  # type: ignore[assignment]
    assert await spool.prune() == 4  # the newest segment stays
    assert await spool.prune_message_ids() == 3  # beyond the capacity of 2
    spool._wconn = real
    assert statements, "the id log's bounds are still read on the writer thread"
    assert [e.payload for e in await spool.read(4, 10)] == [b"e4"]
    with sqlite3.connect(spool.path) as conn:
        kept = [r[0] for r in conn.execute("SELECT message_id FROM message_log ORDER BY id")]
    assert kept == ["id-3", "id-4"]
    await spool.close()
