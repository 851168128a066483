"""The identity store's backend interface: what the relay needs of a place that keeps
persons, so that PostgreSQL can follow SQLite (``identity_store.sqlite``).

Every method blocks; callers run them off the event loop (``IdentityStore``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tagrelay.errors import IdentityStoreError
from tagrelay.identity_store.record import Observation, Profile

__all__ = ["ForgetCounts", "IdentityBackend", "IdentityStoreError"]


@dataclass(frozen=True, slots=True)
class ForgetCounts:
    """What ``forget`` deleted: persons (their records) and the ids that led to them."""

    persons: int
    ids: int

    def as_dict(self) -> dict[str, int]:
        return {"persons": self.persons, "ids": self.ids}


class IdentityBackend(ABC):
    """Where persons are kept. ``now_ms`` is Unix time in milliseconds."""

    @abstractmethod
    def record(self, observations: Sequence[Observation], now_ms: int) -> int:
        """Fold ``observations`` (one batch, in order) into the persons they concern, linking
        the ids each carries, in one transaction; returns how many persons were written."""

    @abstractmethod
    def lookup(
        self, keys: Sequence[tuple[str | None, str | None]], now_ms: int
    ) -> list[Profile | None]:
        """For each ``(anonymousId, userId)``, the profile of the person (found by the user
        id first) at ``now_ms``, or None."""

    @abstractmethod
    def forget(
        self,
        *,
        user_id: str | None = None,
        anonymous_id: str | None = None,
        email: str | None = None,
    ) -> ForgetCounts:
        """Delete every person one of the given ids leads to, with all their ids."""

    @abstractmethod
    def export(
        self,
        *,
        user_id: str | None = None,
        anonymous_id: str | None = None,
        email: str | None = None,
    ) -> dict[str, Any]:
        """Everything held about the persons the given ids lead to, for an access request:
        ``{"persons": [...]}``, one dict each (their ids, data, click and browser ids with
        when each was seen); a user id leads to one person at most."""

    @abstractmethod
    def purge(self, now_ms: int) -> int:
        """Delete the persons not seen for ``ttl_days``; returns how many."""

    @abstractmethod
    def reencrypt(self, limit: int | None = None) -> int:
        """Encrypt under the first of ``encryption.keys`` up to ``limit`` records that are
        not (plaintext, or under an older key); returns how many (0: none is left)."""

    @abstractmethod
    def close(self) -> None:
        """Release the store."""
