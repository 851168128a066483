"""``hash_pii``: emails and phone numbers stored in the warehouse as keyed hashes.

The warehouse is plaintext by design: analysts query it. With the warehouse forwarder's
``hash_pii: true``, the values of the well-known personal keys are replaced, before the batch
is planned, by ``HMAC-SHA256(hash_pii_salt, normalized value)`` in hex. The same person's
email then hashes to the same value in every row, so analysts still count and join on it,
but the file holds no address or number that can be read (and, keyed, none that a
dictionary of SHA-256 hashes of known emails can match).

==============================  ================================  ==========================
key (where ``_user_data`` also  column                            normalized before hashing
reads them)
==============================  ================================  ==========================
``traits.email``                ``traits_email``                  trimmed, lower case
``context.traits.email``        ``context_traits_email``          trimmed, lower case
``properties.email``            ``properties_email``              trimmed, lower case
``traits.phone``                ``traits_phone``                  its digits only
``context.traits.phone``        ``context_traits_phone``          its digits only
``properties.phone``            ``properties_phone``              its digits only
==============================  ================================  ==========================

A phone number keeps its digits only (``+1 (650) 555-1212`` and ``16505551212`` hash alike;
a number written with and without its country code does not). A value that is not text
(a number, a list) is hashed as its JSON. The salt is ``hash_pii_salt`` from the
configuration, not derived from ``encryption.keys``: rotating those must not change the
hashes analysts join on. Rows stored before ``hash_pii`` was switched on keep their
plaintext; emails and phones under other keys are stored as they come.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import orjson

from tagrelay.model import Event

__all__ = ["HASHED_KEYS", "PiiHasher"]

_NOT_DIGIT: Final = re.compile(r"\D")


def _email(value: str) -> str:
    return value.strip().lower()


def _phone(value: str) -> str:
    return _NOT_DIGIT.sub("", value)


HASHED_KEYS: Final[Mapping[tuple[str, ...], Callable[[str], str]]] = {
    ("traits", "email"): _email,
    ("context", "traits", "email"): _email,
    ("properties", "email"): _email,
    ("traits", "phone"): _phone,
    ("context", "traits", "phone"): _phone,
    ("properties", "phone"): _phone,
}
"""Key path -> how its value is normalized before it is hashed."""


class PiiHasher:
    """Replaces the values of ``HASHED_KEYS`` in events by their keyed hashes."""

    def __init__(self, salt: bytes) -> None:
        if len(salt) < 16:
            raise ValueError("hash_pii_salt must be at least 16 bytes")
        self._salt = salt

    def digest(self, path: tuple[str, ...], value: Any) -> str:
        """The stored value of ``value`` at ``path`` (one of ``HASHED_KEYS``)."""
        text = value if isinstance(value, str) else orjson.dumps(value).decode()
        normalized = HASHED_KEYS[path](text)
        return hmac.new(self._salt, normalized.encode(), hashlib.sha256).hexdigest()

    def events(self, events: Sequence[Event]) -> list[Event]:
        """``events`` with the personal values hashed: an event that has one is copied
        along the path to it (the caller's events are never changed)."""
        return [self._event(event) for event in events]

    def _event(self, event: Event) -> Event:
        copied: dict[tuple[str, ...], dict[str, Any]] = {}
        for path, _ in HASHED_KEYS.items():
            parent: Any = event
            for key in path[:-1]:
                parent = parent.get(key) if isinstance(parent, dict) else None
            if not isinstance(parent, dict) or parent.get(path[-1]) is None:
                continue
            target = self._writable(event, path[:-1], copied)
            target[path[-1]] = self.digest(path, parent[path[-1]])
        return copied.get((), event)

    @staticmethod
    def _writable(
        event: Event, parents: tuple[str, ...], copied: dict[tuple[str, ...], dict[str, Any]]
    ) -> dict[str, Any]:
        """The copy of the object at ``parents`` in the event's copy, made on first use."""
        if () not in copied:
            copied[()] = dict(event)
        node = copied[()]
        for depth in range(1, len(parents) + 1):
            here = parents[:depth]
            if here not in copied:
                copied[here] = dict(node[parents[depth - 1]])
                node[parents[depth - 1]] = copied[here]
            node = copied[here]
        return node
