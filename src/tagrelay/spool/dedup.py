"""Which messageIds the spool has stored recently: the memory side of deduplication.

SDKs resend events whose answer they did not see (an unload, a timeout, a persisted retry
queue), with the same ``messageId``. The spool stores such an event once.

Membership is answered from memory, in two generations of hashed ids: lookups check both,
inserts go to the current one, and when the current one is full (half the capacity) or
older than half the window, it becomes the previous one and the old previous one is
forgotten. So an id is remembered for at least half the window and half the capacity, and
at most the whole of both; memory stays bounded (about 80 bytes per id).

The generations are dicts of hashes to None rather than sets: CPython's garbage collector
does not track a dict that holds only ints and None, while it walks every element of a set
in each full collection. With 250,000 ids that walk took about 15 ms, a pause every client
of the event loop waited out.

The durable side is an append-only table of the stored ids (``message_log`` in the spool,
written in the same transaction as the events), from which the generations are rebuilt
at start-up. A durable index on the ids themselves would make every insert dirty a random
page of a large B-tree: several kilobytes of WAL per event, which cost a third of the
spool's throughput when measured.
"""

from __future__ import annotations

from collections.abc import Iterable


class RecentIds:
    def __init__(self, capacity: int, window_ms: int) -> None:
        self.capacity = capacity
        self.window_ms = window_ms
        self._current: dict[int, None] = {}
        self._previous: dict[int, None] = {}
        self._current_since_ms: int | None = None

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def __contains__(self, message_id: str) -> bool:
        h = hash(message_id)
        return h in self._current or h in self._previous

    def new_in(self, hashes: set[int]) -> bool:
        """Whether none of ``hashes`` (of ids, by ``hash()``) is remembered: one set
        operation per generation, for the common case of a request with no resend."""
        return self._current.keys().isdisjoint(hashes) and self._previous.keys().isdisjoint(hashes)

    def add_all(self, message_ids: Iterable[str], now_ms: int) -> None:
        """Remember ids that were just stored (call after the commit succeeded)."""
        ids = list(message_ids)
        room = max(1, self.capacity // 2) - len(self._current)
        if len(ids) <= room and not self._due_by_time(now_ms):
            self._current.update(dict.fromkeys(map(hash, ids)))
            return
        for message_id in ids:
            self._rotate_if_due(now_ms)
            self._current[hash(message_id)] = None

    def _due_by_time(self, now_ms: int) -> bool:
        if self._current_since_ms is None:
            self._current_since_ms = now_ms
            return False
        return now_ms - self._current_since_ms >= self.window_ms // 2

    def _rotate_if_due(self, now_ms: int) -> None:
        if len(self._current) >= max(1, self.capacity // 2) or self._due_by_time(now_ms):
            self._previous = self._current
            self._current = {}
            self._current_since_ms = now_ms
