"""The spool's maintenance loop keeps going when a round fails, and logs a lasting failure
(a full disk) once per interval, not once a second."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from tagrelay.app import _prune_loop
from tests.support import make_config


class FailingSpool:
    def __init__(self) -> None:
        self.rounds = 0

    async def forget_retired_cursors(self, retired_before_ms: int) -> list[str]:
        return []

    async def prune(self) -> int:
        self.rounds += 1
        raise OSError(28, "No space left on device")

    async def prune_message_ids(self) -> None: ...

    async def checkpoint(self) -> None: ...


async def test_a_lasting_maintenance_failure_is_logged_once(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO, "tagrelay.app")
    spool: Any = FailingSpool()
    config = make_config(tmp_path, spool={"prune_interval_secs": 0.001})
    loop = asyncio.create_task(_prune_loop(spool, lambda: config))
    async with asyncio.timeout(30):
        while spool.rounds < 20:
            await asyncio.sleep(0.005)
    loop.cancel()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["spool maintenance failed; will try again"]
    assert warnings[0].exc_info is not None, "the first line says why"
