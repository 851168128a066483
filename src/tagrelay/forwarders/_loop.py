"""The delivery loop: a thread with an event loop of its own, where every forwarder worker
runs.

Ingestion keeps the main event loop busy; a batch request runs for milliseconds before it
yields. If the workers shared that loop, each of their steps (read the spool, deliver,
move the cursor) would wait behind every ready request handler, and under load a
destination would be fed a fraction of what it can take. On their own loop they wait at
most for the interpreter's thread switch (a few milliseconds) instead.

Everything a worker touches is safe to use from this thread: the spool (its own executor
threads; commit notifications are posted to each listener's loop), Prometheus metrics, and
the HTTP session, which is created on this loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class DeliveryLoop:
    def __init__(self, name: str = "tagrelay-delivery") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    @property
    def running(self) -> bool:
        """Whether the loop's thread runs (started and not closed)."""
        return self._thread.is_alive()

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the delivery loop and wait for it from the caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def close(self) -> None:
        """Stop the loop (after the caller has stopped what runs on it) and join the thread."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join)
