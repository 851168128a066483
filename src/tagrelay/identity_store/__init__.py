"""The identity store: what the relay remembers about a visitor and a user between events.

A purchase a backend reports often carries only a ``userId``; the email, the phone and the
click ids were seen earlier, at login or on the landing page. The store keeps them, per
visitor (``anonymousId``) and per user (``userId``), linked into one person by identify
and alias events and by any event carrying both ids, with the time each value was seen;
ad forwarders with ``enrich: true`` fill in what an event lacks from it
(``forwarders._conversions``).

Where it sits in the event path::

    spool --> identity_store writer (an internal forwarder, cursor "identity_store")
          \\-> ad forwarders with enrich: true: each batch waits (identity_store.
              enrich_wait_secs at most) until the writer has taken every event up to its
              last, then reads the persons of its events

The writer reads the spool like any forwarder, after the events were acknowledged, so the
store costs ingest nothing and never risks an acknowledgement; it runs where the HTTP
forwarders run (the delivery process, ``delivery.process``). Because an enriching
forwarder's batch waits for the writer to pass it, an event sees everything the events
committed before it told the store (an identify, then a purchase right after: the purchase
is enriched), unless the writer is more than ``enrich_wait_secs`` behind (counted in
``tagrelay_identity_store_waits_total{outcome="timeout"}``); events committed after it
are never used for it.

Modules: ``config`` (the settings and the click ids' windows), ``record`` (pure: what an
event tells, a person's record, enrichment), ``backend`` (the interface a store
implements), ``sqlite`` (the embedded store), ``writer`` (the internal forwarder).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from tagrelay.crypto import Keyring
from tagrelay.identity_store.backend import ForgetCounts, IdentityBackend, IdentityStoreError
from tagrelay.identity_store.config import IDENTITY_WRITER_ID, IdentityStoreConfig
from tagrelay.identity_store.record import Observation, Profile
from tagrelay.identity_store.sqlite import FILE_NAME, SqliteIdentityStore

__all__ = [
    "FILE_NAME",
    "IDENTITY_WRITER_ID",
    "ForgetCounts",
    "IdentityStore",
    "IdentityStoreConfig",
    "IdentityStoreError",
    "StoreSettings",
    "now_ms",
]


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class StoreSettings:
    """What opening the store needs (picklable: the delivery process gets it). ``keys``
    are ``encryption.keys``; never printed."""

    config: IdentityStoreConfig
    keys: tuple[SecretStr, ...] = field(default=(), repr=False)

    def keyring(self) -> Keyring | None:
        if not self.keys:
            return None
        return Keyring.from_texts([key.get_secret_value() for key in self.keys])

    def open_backend(self, data_dir: Path, *, writer: bool = False) -> IdentityBackend:
        """The store in ``data_dir`` (blocking; ``IdentityStoreError`` when it does not
        open with these keys)."""
        return SqliteIdentityStore.open(
            data_dir,
            self.keyring(),
            ttl_secs=self.config.ttl_days * 86_400,
            click_id_secs=self.config.click_id_secs(),
            writer=writer,
        )

    async def open(self, data_dir: Path, *, writer: bool = False) -> IdentityStore:
        """``open_backend`` off the event loop, behind an ``IdentityStore``."""
        return await IdentityStore.opened(lambda: self.open_backend(data_dir, writer=writer))


class IdentityStore:
    """A backend used from an event loop: every call runs on the store's own thread, one
    at a time."""

    def __init__(self, backend: IdentityBackend | None = None) -> None:
        self._backend = backend
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="identity-store")

    @classmethod
    async def opened(cls, open_backend: Callable[[], IdentityBackend]) -> IdentityStore:
        """A store whose backend ``open_backend`` opens, on the store's thread."""
        store = cls()
        try:
            store._backend = await store._run(open_backend)
        except BaseException:
            store._executor.shutdown(wait=False)
            raise
        return store

    @property
    def backend(self) -> IdentityBackend:
        if self._backend is None:
            raise IdentityStoreError("the identity store is not open")
        return self._backend

    async def _run(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: call(*args, **kwargs))

    async def record(self, observations: Sequence[Observation], now: int | None = None) -> int:
        result: int = await self._run(self.backend.record, observations, now or now_ms())
        return result

    async def lookup(
        self, keys: Sequence[tuple[str | None, str | None]], now: int | None = None
    ) -> list[Profile | None]:
        result: list[Profile | None] = await self._run(self.backend.lookup, keys, now or now_ms())
        return result

    async def forget(self, **ids: str | None) -> ForgetCounts:
        result: ForgetCounts = await self._run(self.backend.forget, **ids)
        return result

    async def export(self, **ids: str | None) -> dict[str, Any]:
        result: dict[str, Any] = await self._run(self.backend.export, **ids)
        return result

    async def purge(self, now: int | None = None) -> int:
        result: int = await self._run(self.backend.purge, now or now_ms())
        return result

    async def reencrypt(self, limit: int | None = None) -> int:
        result: int = await self._run(self.backend.reencrypt, limit)
        return result

    async def close(self) -> None:
        try:
            await self._run(self.backend.close)
        finally:
            self._executor.shutdown(wait=False)
