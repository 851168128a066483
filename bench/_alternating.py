"""What the A/B benchmarks share (``encryption_bench.py``, ``jetstream_bench.py``): run
``ingest_bench.py`` once per side, the sides alternating run after run so that a burst of
other work on a shared machine hits both alike, with the load average before and after."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent

Rows = dict[str, dict[str, Any]]


def uptime() -> str:
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return "(uptime not available)"


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """The script's own options, and those after ``--`` (for ``ingest_bench.py``)."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


def ingest_rows(options: Sequence[str], extra: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of one ``ingest_bench.py`` run with ``options`` then ``extra`` (its
    ``--json`` output); exits when the run failed."""
    import json

    with tempfile.TemporaryDirectory(prefix="tagrelay-abbench-") as tmp:
        out = Path(tmp) / "run.json"
        cmd = [
            sys.executable,
            str(BENCH_DIR / "ingest_bench.py"),
            *options,
            "--json",
            str(out),
            *extra,
        ]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, check=False)
        if done.returncode != 0 or not out.exists():
            raise SystemExit(f"ingest_bench.py failed (exit {done.returncode}): {' '.join(cmd)}")
        rows: list[dict[str, Any]] = json.loads(out.read_text())["rows"]
        return rows


def alternate(
    sides: Sequence[str], runs: int, one_run: Callable[[str], Rows], label: str
) -> tuple[dict[str, list[Rows]], str, str]:
    """``runs`` rounds of ``one_run(side)`` for every side in turn, each printed as it ends
    (``label`` names what the sides are); the results by side, and ``uptime`` before and
    after."""
    before = uptime()
    results: dict[str, list[Rows]] = {side: [] for side in sides}
    for i in range(runs):
        for side in sides:
            started = time.strftime("%H:%M:%S")
            result = one_run(side)
            results[side].append(result)
            summary = ", ".join(
                f"{key} {row['events_per_s']:,.0f} ev/s" for key, row in result.items()
            )
            print(f"[{started}] run {i + 1}/{runs} {label} {side}: {summary}", flush=True)
    return results, before, uptime()
