"""What a pure function of an event made of it, kept for the next forwarder given the same
event object.

The delivery process hands every forwarder the same decoded events (``_process.SpanCache``,
and forwarders never change an event: tests/forwarders/test_forwarder_contract.py), so the
ad forwarders' shared layer works each event's user data and commerce fields out once and
looks them up for the other platforms. An entry is found by the object's identity only
while the memo holds the object itself, so an id reused by a later object never matches;
holding them keeps at most ``size`` events alive a little longer (the span cache holds more).
Where each forwarder decodes its own copy (delivery without its process), nothing is ever
found again and each event costs one insertion.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["ObjectMemo"]

V = TypeVar("V")


class ObjectMemo(Generic[V]):
    """The values last computed for objects (and a hashable detail of the call), by identity;
    at most ``size``, the oldest forgotten first."""

    __slots__ = ("_entries", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[int, tuple[object, Hashable, V]] = OrderedDict()

    def get(self, obj: object, detail: Hashable = None) -> V | None:
        """The value kept for ``obj`` (this very object) and ``detail``, or None."""
        entry = self._entries.get(id(obj))
        if entry is not None and entry[0] is obj and entry[1] == detail:
            return entry[2]
        return None

    def put(self, obj: object, value: V, detail: Hashable = None) -> V:
        """Keep ``value`` for ``obj`` and ``detail`` (replacing what was kept for ``obj``);
        returns ``value``."""
        entries = self._entries
        entries[id(obj)] = (obj, detail, value)
        if len(entries) > self.size:
            entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()
