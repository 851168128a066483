"""Suppression, a step of the pipeline: the ids of people who asked to be forgotten and
not tracked again (``tagrelay forget --suppress``), kept as keyed hashes, and the check that
drops their future events at ingest (``pipeline.run``, counted in
``tagrelay_events_suppressed``).

Erasure alone is not a block list: a later event with the same ids is stored like any other.
With ``--suppress``, the request's ids and those linked to them (``model.subject``) are
kept as ``HMAC-SHA256(salt, kind + ":" + value)`` in ``suppressed.json`` in the data
directory; the salt is 32 random bytes in ``privacy.salt`` beside it (both 0600), made the
first time one is needed. Neither file holds an id, and a guessed id cannot be checked
against the list without the salt. An event is dropped when its ``userId``, its
``anonymousId`` (or ``previousId``), or an email it carries (``model.subject.EMAIL_PATHS``,
trimmed and in lower case) hashes to one of them. The same salt makes the audit line's
``subject_ref`` (``salted_ref``), so two requests about one person can be told apart
from two about two people without naming either.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from tagrelay.datadir import open_private, private_dir
from tagrelay.model.subject import EMAIL_PATHS, Subject, normalized_email

__all__ = ["LIST_FILE", "SALT_FILE", "Suppression", "privacy_salt", "salted_ref"]

SALT_FILE = "privacy.salt"
LIST_FILE = "suppressed.json"
SALT_BYTES = 32
SEEN_IDS = 10_000
"""Ids whose answer ``Suppression`` remembers (then it starts over)."""


def privacy_salt(data_dir: Path) -> bytes:
    """The data directory's privacy salt, made (random, mode 0600) if it is missing."""
    path = data_dir / SALT_FILE
    try:
        salt = path.read_bytes()
        if len(salt) == SALT_BYTES:
            return salt
    except FileNotFoundError:
        pass
    salt = os.urandom(SALT_BYTES)
    private_dir(data_dir)
    _write_private(path, salt)
    return salt


def salted_ref(salt: bytes, ids: Mapping[str, str]) -> str:
    """A reference to a request's ids for the audit line: 16 hex digits of a keyed hash,
    the same for the same ids, never the ids."""
    text = "\n".join(f"{kind}:{value}" for kind, value in sorted(ids.items()))
    return hmac.new(salt, text.encode(), hashlib.sha256).hexdigest()[:16]


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (0600) through a temporary file: whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class Suppression:
    """The suppressed ids of one data directory. ``suppressed`` is called for every event
    while the list is not empty (cheap otherwise: one attribute read per request)."""

    def __init__(self, data_dir: Path, salt: bytes | None, hashes: Iterable[str] = ()) -> None:
        self.data_dir = data_dir
        self._salt = salt
        self.hashes: frozenset[str] = frozenset(hashes)
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], bool] = {}

    @classmethod
    def empty(cls) -> Suppression:
        """The null object: nothing suppressed, nowhere to add to (a pipeline on its own)."""
        return cls(Path("/nonexistent"), None)

    @classmethod
    def load(cls, data_dir: Path) -> Suppression:
        """The list in ``data_dir`` (empty when there is none)."""
        try:
            stored: Any = orjson.loads((data_dir / LIST_FILE).read_bytes())
        except FileNotFoundError:
            return cls(data_dir, None)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{data_dir / LIST_FILE} is not valid JSON: {exc}") from exc
        hashes = stored.get("hashes", []) if isinstance(stored, dict) else []
        return cls(data_dir, privacy_salt(data_dir), [h for h in hashes if isinstance(h, str)])

    def _digest(self, kind: str, value: str) -> str:
        assert self._salt is not None
        return hmac.new(self._salt, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()

    def _listed(self, kind: str, value: str) -> bool:
        """Whether ``value`` is suppressed; remembered for the ids seen last (a visitor
        sends many events: one HMAC per id, not per event), in memory only."""
        key = (kind, value)
        found = self._seen.get(key)
        if found is None:
            if len(self._seen) >= SEEN_IDS:
                self._seen.clear()
            found = self._seen[key] = self._digest(kind, value) in self.hashes
        return found

    def add(self, subject: Subject) -> int:
        """Suppress every id of ``subject`` from now on, and write the list; how many
        hashes were new."""
        with self._lock:
            if self._salt is None:
                self._salt = privacy_salt(self.data_dir)
            new = {self._digest("user_id", u) for u in subject.user_ids}
            new |= {self._digest("anonymous_id", a) for a in subject.anonymous_ids}
            new |= {self._digest("email", e) for e in subject.emails}
            added = len(new - self.hashes)
            hashes = self.hashes | new
            _write_private(
                self.data_dir / LIST_FILE,
                orjson.dumps({"version": 1, "hashes": sorted(hashes)}),
            )
            self.hashes = frozenset(hashes)
            self._seen = {}  # answers given before the list grew
        return added

    def suppressed(self, event: Mapping[str, Any]) -> bool:
        """Whether ``event`` carries an id or an email of the list."""
        hashes = self.hashes
        if not hashes:
            return False
        for kind, key in (
            ("user_id", "userId"),
            ("anonymous_id", "anonymousId"),
            ("anonymous_id", "previousId"),
            ("user_id", "previousId"),
        ):
            value = event.get(key)
            if value is not None and self._listed(kind, str(value)):
                return True
        for path in EMAIL_PATHS:
            node: Any = event
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, str) and self._listed("email", normalized_email(node)):
                return True
        return False
