"""``tagrelay serve`` raises its open-files limit, and keeps server.max_connections within it."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tagrelay.cli.serve import RESERVED_FILES, connection_cap
from tests.support import make_config

RAISE_FROM_256 = """
import resource
from tagrelay.cli.serve import raise_open_files_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
print(raise_open_files_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    # In a child: the limit of the test process itself stays as it is.
    out = subprocess.run(
        [sys.executable, "-c", RAISE_FROM_256], capture_output=True, text=True, check=True
    )
    reported, soft, hard = (int(v) for v in out.stdout.split())
    assert soft == reported > 256
    assert soft == hard or hard == -1  # RLIM_INFINITY: raised to fs.nr_open


def test_the_connection_cap_stays_below_the_open_files_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path, server={"max_connections": 10_000})
    assert connection_cap(config, 1_048_576) == 10_000
    assert caplog.records == []
    assert connection_cap(config, 1024) == 1024 - RESERVED_FILES
    [warning] = caplog.records
    assert warning.levelno == logging.WARNING
    assert warning.lowered_to == 1024 - RESERVED_FILES  # type: ignore[attr-defined]
