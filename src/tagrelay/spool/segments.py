"""Reading events out of the spool's segments by sequence number.

A segment is one group commit: a row of ``segments`` holding its events as JSON lines, with
the sequence number of its last event, their count and when the oldest arrived (see
``tagrelay.spool.sqlite``). The relay reads them on its reader thread with
``segments_after``. A forwarder process that reads the spool file itself (the warehouse
process, ``Forwarder.reads_spool``) opens it with ``open_read_only`` and takes a batch with
``read_span``, so that the batch's events never pass through the relay process.

This module needs nothing but the standard library.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Generator
from contextlib import closing
from pathlib import Path
from urllib.parse import quote

SELECT_AFTER = (
    "SELECT last_seq, count, received_ms, payload FROM segments WHERE last_seq > ? "
    "ORDER BY last_seq"
)
"""The segments holding events past a position, oldest first."""

SELECT_FIRST_RECEIVED = (
    "SELECT received_ms FROM segments WHERE last_seq > ? ORDER BY last_seq LIMIT 1"
)
"""When the oldest event past a position arrived (its segment's ``received_ms``)."""


class SpanMissing(LookupError):
    """The spool no longer (or not yet) holds every event of the requested span."""


def open_read_only(path: Path | str) -> sqlite3.Connection:
    """A read-only connection to the spool at ``path``, for another process than the relay.
    The relay keeps the database in WAL mode, so reading never blocks its commits."""
    uri = f"file:{quote(str(path))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def segments_after(
    conn: sqlite3.Connection, after: int
) -> Generator[tuple[int, int, list[bytes]], None, None]:
    """For each segment holding events with ``seq > after``, oldest first: the sequence
    number of its first such event, when they arrived, and their stored JSON (one ``bytes``
    each; the segment's events at or before ``after`` left out). Close the iterator when
    done early (``contextlib.closing``): it holds a read transaction until then."""
    cursor = conn.execute(SELECT_AFTER, (after,))
    try:
        for last_seq, count, received_ms, payload in cursor:
            first = last_seq - count + 1
            lines = payload.split(b"\n")
            if first <= after:
                lines = lines[after + 1 - first :]
                first = after + 1
            yield first, received_ms, lines
    finally:
        cursor.close()


def read_span(
    conn: sqlite3.Connection, after: int, last: int
) -> tuple[list[bytes], list[tuple[int, int]]]:
    """The events with ``after < seq <= last``, in order: their stored JSON (one ``bytes``
    each), and ``(count, received_ms)`` for each segment they came from, which is when they
    arrived. Raises ``SpanMissing`` when the spool does not hold all of them, and
    ``sqlite3.Error`` when it cannot be read."""
    lines: list[bytes] = []
    arrivals: list[tuple[int, int]] = []
    if last <= after:
        return lines, arrivals
    with closing(segments_after(conn, after)) as segments:
        for first, received_ms, segment in segments:
            if first != after + len(lines) + 1:
                break  # a gap: what should come next was pruned
            taken = segment[: last - first + 1]
            lines.extend(taken)
            arrivals.append((len(taken), received_ms))
            if len(lines) >= last - after:
                break
    if len(lines) != last - after:
        raise SpanMissing(
            f"the spool holds {len(lines)} of the {last - after} events after {after}"
        )
    return lines, arrivals
