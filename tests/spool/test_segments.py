"""Reading a span of the spool from outside the relay (``tagrelay.spool.segments``): what
the warehouse process does with the spool file while the relay runs."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tagrelay.spool.segments import SpanMissing, open_read_only, read_span
from tagrelay.spool.sqlite import SqliteSpool


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[SqliteSpool]:
    spool = SqliteSpool(tmp_path / "spool.sqlite3")
    await spool.open()
    # three segments: events 1-3 (received at 5 ms), 4 (at 9 ms), 5-6 (at 12 ms)
    await spool.append([(5, b'{"n":1}'), (6, b'{"n":2}'), (7, b'{"n":3}')])
    await spool.append([(9, b'{"n":4}')])
    await spool.append([(12, b'{"n":5}'), (13, b'{"n":6}')])
    yield spool
    await spool.close()


@pytest.fixture
def conn(spool: SqliteSpool) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the spool, as the warehouse process opens it (closed
    before the spool)."""
    connection = open_read_only(spool.path)
    yield connection
    connection.close()


@pytest.mark.parametrize(
    ("after", "last", "numbers", "arrivals"),
    [
        (0, 6, [1, 2, 3, 4, 5, 6], [(3, 5), (1, 9), (2, 12)]),
        (1, 2, [2], [(1, 5)]),  # inside one segment
        (2, 5, [3, 4, 5], [(1, 5), (1, 9), (1, 12)]),  # starts and ends mid-segment
        (3, 4, [4], [(1, 9)]),  # exactly one segment
        (4, 4, [], []),  # empty
    ],
)
def test_a_span_is_exactly_its_events_with_their_arrival_times(
    conn: sqlite3.Connection,
    after: int,
    last: int,
    numbers: list[int],
    arrivals: list[tuple[int, int]],
) -> None:
    lines, runs = read_span(conn, after, last)
    assert lines == [f'{{"n":{n}}}'.encode() for n in numbers]
    assert runs == arrivals


async def test_a_span_the_spool_does_not_hold_is_an_error(
    spool: SqliteSpool, conn: sqlite3.Connection
) -> None:
    with pytest.raises(SpanMissing, match="holds 2 of the 3 events after 4"):
        read_span(conn, 4, 7)  # event 7 is not committed yet
    await spool.prune()  # no cursors: every segment but the newest may go
    with pytest.raises(SpanMissing, match="holds 0 of the 2 events after 0"):
        read_span(conn, 0, 2)
    assert read_span(conn, 4, 6)[0] == [b'{"n":5}', b'{"n":6}']


async def test_commits_made_after_the_connection_opened_are_read(
    spool: SqliteSpool, conn: sqlite3.Connection
) -> None:
    assert read_span(conn, 5, 6)[0] == [b'{"n":6}']
    await spool.append([(20, b'{"n":7}')])
    assert read_span(conn, 6, 7) == ([b'{"n":7}'], [(1, 20)])


def test_the_connection_cannot_write(conn: sqlite3.Connection) -> None:
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("DELETE FROM segments")
