"""What the relay needs of a spool, whichever holds the events: ``SqliteSpool`` (one relay,
a file in its data directory) or ``JetStreamSpool`` (replicas sharing a NATS JetStream
stream). ``make_spool`` picks one from ``spool.type``.

The forwarder runtime (``forwarders._worker``) uses four things, and nothing else differs
between the backends for it:

- ``append`` (ingestion): the awaitable completes once the events are durable;
- ``read(after, limit, forwarder=)``: the events after a forwarder's cursor position;
- ``advance`` / ``record_failure`` / ``dead_letter``: acknowledge a batch (delivered,
  failing, or dead-lettered);
- ``depth``: how many events a forwarder has not had acknowledged yet.

The rest is for operators and metrics (dead letters, maintenance, key rotation), where
a backend may do nothing (JetStream's limits prune the stream by themselves).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tagrelay.spool.dead_letters import DeadLetterRow, Selection
from tagrelay.spool.encryption import PayloadCipher
from tagrelay.spool.sqlite import CursorState, HeadWatch, SpooledEvent

if TYPE_CHECKING:
    from tagrelay.config.models import Config

__all__ = ["Spool", "make_spool"]


class Spool(Protocol):
    spans: bool
    """Whether forwarders that read the SQLite file themselves may get spans of it."""
    expires_dead_letters: bool
    """Whether the backend drops dead letters past their retention by itself."""
    cipher: PayloadCipher
    commits: int
    on_commit: Callable[[float], None] | None
    on_reencrypted: Callable[[str, int], None] | None

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def leave_loop(self) -> None: ...
    def writable(self, within_secs: float = 5.0) -> bool: ...

    def append(
        self, events: Sequence[tuple[int, bytes]], message_ids: Sequence[str] | None = None
    ) -> Awaitable[int]: ...

    def subscribe(self, forwarder: str | None = None) -> HeadWatch: ...
    def unsubscribe(self, watch: HeadWatch) -> None: ...
    async def register(self, forwarder: str, start: str = "head") -> CursorState: ...
    def head_of(self, forwarder: str) -> int: ...
    async def read(
        self, after: int, limit: int, *, forwarder: str | None = None
    ) -> list[SpooledEvent]: ...
    async def advance(self, forwarder: str, position: int) -> None: ...
    async def record_failure(self, forwarder: str, state: CursorState) -> None: ...
    async def dead_letter(
        self,
        forwarder: str,
        events: Sequence[SpooledEvent],
        reason: str,
        detail: str,
        attempts: int,
        advance_to: int | CursorState | None = None,
    ) -> None: ...
    def depth(self, forwarder: str) -> int: ...
    def positions(self) -> dict[str, int]: ...
    async def first_received_ms(self, after: int) -> int | None: ...

    async def prune(self) -> int: ...
    async def prune_message_ids(self, now_ms: int | None = None, chunk: int = 5000) -> int: ...
    async def checkpoint(self) -> None: ...
    async def retire_cursors_except(self, keep: set[str]) -> list[str]: ...
    async def forget_retired_cursors(self, retired_before_ms: int) -> list[str]: ...
    def encryption_backlog(self) -> Any: ...
    async def count_encryption_backlog(self) -> Any: ...
    def rotate_keys(self) -> asyncio.Future[Any]: ...

    async def dead_letters(
        self,
        forwarder: str | None = None,
        limit: int = 100,
        *,
        selection: Selection | None = None,
        after_id: int = 0,
        newest_first: bool = False,
    ) -> list[DeadLetterRow]: ...
    async def dead_letter_by_id(self, dead_letter_id: int) -> DeadLetterRow | None: ...
    def dead_letter_counts(self) -> dict[str, int]: ...
    async def last_dead_letter_id(self) -> int: ...
    async def forget_dead_letters(self, ids: Sequence[int]) -> int: ...
    async def purge_dead_letters(self, selection: Selection) -> int: ...
    async def dead_letters_died_again(
        self, ids: Sequence[int], reason: str, detail: str
    ) -> int: ...


def spool_path(data_dir: Path) -> Path:
    return data_dir / "spool.sqlite3"


def make_spool(config: Config, data_dir: Path, cipher: PayloadCipher) -> Spool:
    """The spool ``config.spool.type`` names."""
    settings = config.spool
    if settings.type == "jetstream":
        from tagrelay.spool.jetstream import JetStreamSpool

        return JetStreamSpool(jetstream_settings(config), cipher=cipher)
    from tagrelay.spool.sqlite import SqliteSpool

    return SqliteSpool(
        spool_path(data_dir),
        synchronous=settings.synchronous,
        max_size_mb=settings.max_size_mb,
        dedup_window_secs=settings.dedup_window_secs,
        dedup_capacity=settings.dedup_max_ids,
        cipher=cipher,
    )


def jetstream_settings(config: Config) -> Any:
    """``spool`` and ``dead_letters`` as ``JetStreamSettings``."""
    from tagrelay.spool.jetstream import JetStreamSettings

    s = config.spool
    return JetStreamSettings(
        servers=tuple(s.servers),
        stream=s.stream,
        replicas=s.replicas,
        max_age_secs=s.max_age_secs,
        max_bytes=s.max_bytes,
        duplicate_window_secs=s.duplicate_window_secs,
        ack_wait_secs=s.ack_wait_secs,
        dead_letter_max_age_secs=config.dead_letters.retention_days * 86_400,
    )
