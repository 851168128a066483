"""The relay's handle on the spool's commit process (see ``writer_child`` for why a process
and for the frames).

Calls are serialized: one frame on the socket at a time, from the event loop that started
the process. A child that dies, or a socket that breaks, fails the call in flight with
``SpoolUnavailable`` and marks the handle ``broken``: whether that last commit reached the
disk is unknown, so the spool starts a new child and reads its head back from the database
before the next commit (``SqliteSpool._restart_commits``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
from pathlib import Path

from tagrelay.errors import SpoolUnavailable
from tagrelay.spool import writer_child
from tagrelay.spool.writer_child import (
    OK,
    OP_CHECKPOINT,
    OP_ERASE,
    OP_INSERT,
    OP_PRUNE_IDS,
    OP_PRUNE_SEGMENTS,
    OP_REWRITE,
    OP_TRUNCATE,
    REPLY,
    REQUEST,
    SQLITE_ERROR,
)

log = logging.getLogger(__name__)

START_TIMEOUT_SECS = 30.0
"""How long the child may take to open the database (it waits up to 5 s for a lock)."""

EXIT_TIMEOUT_SECS = 10.0
"""How long ``close`` waits for the child to finish its last statement and exit."""

SEND_BUFFER_BYTES = 4 * 1024 * 1024
"""The commit socket's send buffer: room for a commit at batch rates in one send."""

_CHILD = Path(writer_child.__file__)


class SpoolError(SpoolUnavailable):
    """SQLite refused the statement (a full disk, ``max_page_count``): nothing was written.
    The child is fine and takes the next commit."""


class WriterProcess:
    def __init__(self, path: Path, synchronous: str, max_page_count: int, lock_fd: int) -> None:
        self.path = path
        self.synchronous = synchronous
        self.max_page_count = max_page_count
        self.lock_fd = lock_fd
        self.broken = False
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Start the child and wait until it has opened the database."""
        parent_sock, child_sock = socket.socketpair()
        # A commit at batch rates is ~0.5 MB. With the default buffer (~200 KB) the loop
        # sends it in pieces, copying the rest each time and waking for every piece (~4% of
        # its time at batch rates). The kernel caps the size at net.core.wmem_max (best
        # effort).
        parent_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        try:
            # The command is fixed: this interpreter and the child module, isolated from the
            # environment and site-packages (it needs the standard library only).
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-S",
                str(_CHILD),
                str(child_sock.fileno()),
                str(self.path),
                self.synchronous,
                str(self.max_page_count),
                pass_fds=[child_sock.fileno(), self.lock_fd],
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            parent_sock.close()
            raise SpoolUnavailable(f"could not start the spool's commit process: {exc}") from exc
        finally:
            child_sock.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=parent_sock)
        self.broken = False
        try:
            await asyncio.wait_for(self._answer(), START_TIMEOUT_SECS)
        except (SpoolUnavailable, TimeoutError) as exc:
            await self.close()
            raise SpoolUnavailable(f"the spool's commit process did not start: {exc}") from None

    async def insert(
        self, last_seq: int, count: int, received_ms: int, payload: bytes, ids_json: str | None
    ) -> int:
        ids = ids_json.encode() if ids_json is not None else b""
        return await self._call(
            REQUEST.pack(OP_INSERT, last_seq, count, received_ms, len(payload), len(ids)),
            payload,
            ids,
        )

    async def checkpoint(self) -> None:
        await self._call(REQUEST.pack(OP_CHECKPOINT, 0, 0, 0, 0, 0))

    async def prune_segments(self, head: int, chunk: int) -> int:
        return await self._call(REQUEST.pack(OP_PRUNE_SEGMENTS, head, chunk, 0, 0, 0))

    async def prune_ids(self, upto_id: int) -> int:
        return await self._call(REQUEST.pack(OP_PRUNE_IDS, upto_id, 0, 0, 0, 0))

    async def rewrite(self, last_seq: int, payload: bytes, old_key_id: bytes | None) -> int:
        """Replace a segment's payload (key rotation); see ``writer_child.rewrite``."""
        old = old_key_id or b""
        return await self._call(
            REQUEST.pack(OP_REWRITE, last_seq, 0, 0, len(payload), len(old)), payload, old
        )

    async def erase(self, last_seq: int, payload: bytes, old_key_id: bytes | None) -> int:
        """``rewrite`` for an erasure; see ``writer_child.erase``."""
        old = old_key_id or b""
        return await self._call(
            REQUEST.pack(OP_ERASE, last_seq, 0, 0, len(payload), len(old)), payload, old
        )

    async def truncate_wal(self) -> int:
        """Empty the WAL file (``writer_child.truncate``); 1 if it could."""
        return await self._call(REQUEST.pack(OP_TRUNCATE, 0, 0, 0, 0, 0))

    async def _call(self, *parts: bytes) -> int:
        async with self._lock:
            if self.broken or self._writer is None:
                raise SpoolUnavailable("the spool's commit process is not running")
            try:
                self._writer.writelines(parts)
                return await self._answer()
            except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
                self._fail(f"{type(exc).__name__}: {exc}")
                raise SpoolUnavailable("the spool's commit process died") from None
            except asyncio.CancelledError:
                # The answer of this frame would be read as the next one's.
                self._fail("a commit was cancelled while in flight")
                raise

    async def _answer(self) -> int:
        assert self._reader is not None
        try:
            status, value, length = REPLY.unpack(await self._reader.readexactly(REPLY.size))
            message = (await self._reader.readexactly(length)).decode() if length else ""
        except asyncio.IncompleteReadError:
            self._fail("the socket closed")
            raise SpoolUnavailable("the spool's commit process died") from None
        if status == OK:
            return int(value)
        if status == SQLITE_ERROR:
            raise SpoolError(f"the spool could not commit: {message}")
        raise SpoolUnavailable(f"the spool's commit process failed: {message}")

    def _fail(self, why: str) -> None:
        if not self.broken:
            log.error("the spool's commit process failed", extra={"error": why})
        self.broken = True
        if self._writer is not None:
            self._writer.close()

    async def close(self) -> None:
        """Close the socket (the child finishes its statement and exits) and wait for it."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()
        self._writer = self._reader = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            await asyncio.wait_for(proc.wait(), EXIT_TIMEOUT_SECS)
        except TimeoutError:
            log.warning("the spool's commit process did not exit; killing it")
            proc.kill()
            await proc.wait()
