"""Log a repeated condition once per interval, with how often it happened.

A full disk refuses every request; a misconfigured origin is refused on every page view; a
column receives strings on every row. One log line per occurrence buries everything else
(and costs the event loop); none at all hides the problem. ``LogThrottle`` logs the first
occurrence of a key at once, then at most one line per ``interval_secs`` for that key,
carrying ``repeated``: the occurrences since the previous line (itself included). Counting
each occurrence is the metrics' job; this only keeps the log readable.

Keys must be bounded (a reason code, a forwarder id, a column name): each one seen is
remembered for as long as the throttle lives, up to ``max_keys`` (then the oldest is
forgotten and may log again at once).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

__all__ = ["LogThrottle"]


class LogThrottle:
    def __init__(
        self,
        logger: logging.Logger,
        interval_secs: float = 60.0,
        *,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval_secs
        self._max_keys = max_keys
        self._clock = clock
        # key -> (time of its last line, occurrences since then not yet logged)
        self._seen: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()

    def log(
        self,
        level: int,
        key: Hashable,
        message: str,
        extra: Mapping[str, Any] | None = None,
        *,
        exc_info: bool = False,
    ) -> bool:
        """Record one occurrence of ``key``; log ``message`` if its interval has passed (or
        it is new). Returns whether a line was written."""
        now = self._clock()
        last = self._seen.get(key)
        if last is not None:
            logged_at, pending = last
            if now - logged_at < self._interval:
                self._seen[key] = (logged_at, pending + 1)
                return False
            repeated = pending + 1
        else:
            repeated = 1
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        while len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)
        if self._logger.isEnabledFor(level):
            self._logger.log(
                level, message, extra={**(extra or {}), "repeated": repeated}, exc_info=exc_info
            )
        return True
