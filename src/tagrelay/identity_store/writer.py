"""The identity store's writer: an internal forwarder whose destination is the store.

The fleet runs it when ``identity_store.enabled``, under the id ``identity_store`` (its
spool cursor and metric label), next to the configured forwarders and where they run (the
delivery process): it reads every event after the spool acknowledged it, so writing the
store never slows ingest nor risks an acknowledgement, and a restart resumes at its
cursor. Each batch is one transaction; a failure (a locked or full disk) is retried like
any forwarder's (events still failing after ``retry.max_age_secs``, a day, become its dead
letters; the other forwarders are not held up but for ``enrich_wait_secs``). Every
``PURGE_INTERVAL_SECS``, traffic or not, it deletes the persons not seen for ``ttl_days``;
after a key rotation (a new key first in ``encryption.keys``) it re-encrypts the records
under the old key, ``ROTATE_PER_BATCH`` with each batch, until none is left (logged once).

It is not in ``forwarders.FORWARDERS`` (no configuration file names it): the fleet makes
its configuration from ``identity_store`` and ``encryption`` (:func:`writer_config`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from typing import Final, Literal

from pydantic import Field, SecretStr

from tagrelay.config.common import BatchConfig, ForwarderConfigBase
from tagrelay.forwarders._base import Forwarder, ForwarderContext
from tagrelay.identity_store import (
    IDENTITY_WRITER_ID,
    IdentityStore,
    IdentityStoreConfig,
    IdentityStoreError,
    StoreSettings,
    now_ms,
)
from tagrelay.identity_store.record import Observation, observe
from tagrelay.logthrottle import LogThrottle
from tagrelay.model import Delivered, Event, Outcome, Retry

__all__ = ["IdentityWriter", "IdentityWriterConfig", "writer_config"]

log = logging.getLogger(__name__)

PURGE_INTERVAL_SECS: Final = 600.0

ROTATE_PER_BATCH: Final = 500
"""Records re-encrypted under the first key per batch while older ones remain (a key
rotation): a few milliseconds each time, so the store rotates in the background."""

WRITER_BATCH: Final = BatchConfig(max_events=500, max_wait_secs=0.05)
"""Large batches (one transaction each) that do not wait to fill: the enriching forwarders
wait for the writer, so it should not wait for more events itself."""


class IdentityWriterConfig(ForwarderConfigBase):
    """The writer's settings, made by the fleet (never read from a file)."""

    type: Literal["identity_store"] = Field(
        description="The internal identity store writer.", examples=["identity_store"]
    )
    store: IdentityStoreConfig = Field(description="identity_store.", examples=[{"enabled": True}])
    keys: list[SecretStr] = Field(
        default_factory=list, description="encryption.keys.", examples=[["${TAGRELAY_KEY}"]]
    )

    @property
    def settings(self) -> StoreSettings:
        return StoreSettings(self.store, tuple(self.keys))


def writer_config(store: IdentityStoreConfig, keys: list[SecretStr]) -> IdentityWriterConfig:
    """The writer's configuration for ``identity_store`` and ``encryption.keys``."""
    return IdentityWriterConfig(
        id=IDENTITY_WRITER_ID,
        type="identity_store",
        store=store,
        keys=keys,
        start="earliest",
        batch=WRITER_BATCH,
    )


class IdentityWriter(Forwarder[IdentityWriterConfig]):
    config_model = IdentityWriterConfig

    def __init__(self, config: IdentityWriterConfig, context: ForwarderContext) -> None:
        super().__init__(config, context)
        self._store: IdentityStore | None = None
        self._purger: asyncio.Task[None] | None = None
        self._rotating = bool(config.keys)
        """Records may remain under a key other than the first (``encryption.keys`` put a
        new one first): each batch re-encrypts ``ROTATE_PER_BATCH`` of them until none is
        left, so that the old key can go."""

    async def start(self) -> None:
        self._store = await self.config.settings.open(self.context.data_dir, writer=True)
        self._purger = asyncio.create_task(self._purge_every(PURGE_INTERVAL_SECS))

    async def _purge_every(self, secs: float) -> None:
        """Delete the persons past ``ttl_days`` every ``secs``, traffic or not."""
        failures = LogThrottle(log)
        while True:
            await asyncio.sleep(secs)
            store = self._store
            if store is None:
                return
            try:
                expired = await store.purge()
            except (IdentityStoreError, sqlite3.Error) as exc:
                failures.log(
                    logging.WARNING,
                    "purge",
                    "the identity store could not delete expired persons; will try again",
                    {"forwarder": self.id, "error": f"{type(exc).__name__}: {exc}"},
                )
                continue
            if expired:
                self.context.metrics.identity_store_expired.inc(expired)

    async def close(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
            self._purger = None
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def deliver(self, events: list[Event]) -> Outcome:
        store = self._store
        if store is None:
            return Retry("identity_store", "the identity store is not open")
        now = now_ms()
        observations: list[Observation] = []
        for event in events:
            seen = observe(event, now)
            if seen is not None:
                observations.append(seen)
        counter = self.context.metrics.identity_store_events
        try:
            if observations:
                await store.record(observations, now)
            if self._rotating:
                rotated = await store.reencrypt(ROTATE_PER_BATCH)
                if rotated < ROTATE_PER_BATCH:
                    self._rotating = False
                    log.info(
                        "every identity store record is under the first encryption key",
                        extra={"forwarder": self.id},
                    )
        except (IdentityStoreError, sqlite3.Error) as exc:
            return Retry("identity_store", f"{type(exc).__name__}: {exc}")
        if observations:
            counter.labels("recorded").inc(len(observations))
        if len(events) > len(observations):
            counter.labels("ignored").inc(len(events) - len(observations))
        return Delivered()
