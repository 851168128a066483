"""The data directory's filesystem and the spool's cap, as metrics: what the
TagrelaySpoolDiskFilling / TagrelaySpoolNearItsCap alerts of deploy/prometheus read."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tagrelay.appkeys import METRICS
from tests.support import metric_value


async def test_the_data_dir_filesystem_and_the_spool_cap_are_exported(
    relay: Callable[..., Any], tmp_path: Path
) -> None:
    client = await relay(spool={"max_size_mb": 64})
    app = client.app

    filesystem = os.statvfs(tmp_path)
    size = metric_value(app, "tagrelay_data_dir_size_bytes")
    free = metric_value(app, "tagrelay_data_dir_free_bytes")
    assert size == filesystem.f_blocks * filesystem.f_frsize
    assert 0 < free <= size
    assert metric_value(app, "tagrelay_spool_max_size_bytes") == 64 * 1024 * 1024


async def test_a_spool_without_a_cap_reports_0(relay: Callable[..., Any]) -> None:
    client = await relay()
    registry = client.app[METRICS].registry
    assert registry.get_sample_value("tagrelay_spool_max_size_bytes") == 0
