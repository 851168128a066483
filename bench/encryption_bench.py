"""The cost of encryption at rest on ingest: ``ingest_bench.py`` against the relay with the
spool in plaintext and encrypted (``--encryption off|on``), the two alternating run after run
(the machine may be shared: a burst of other work then hits both sides alike), medians side
by side, with the machine's load average (``uptime``) before and after.

    .venv/bin/python bench/encryption_bench.py                       # track, 3 runs a side
    .venv/bin/python bench/encryption_bench.py --runs 5 --scenarios track,batch

Target: encryption costs under 10% of ``track`` throughput. Besides req/s and latency, it
prints the relay's CPU per request (its event loop thread, and all its processes) and how
busy the rest of the machine was: on a shared machine those tell the cost apart from the
neighbours' load. Options after ``--`` go to
``ingest_bench.py`` (e.g. ``-- --connections 32``). Exit status 0 when every run ran.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _alternating import Rows, alternate, ingest_rows, split_argv

SIDES = ("off", "on")
TARGET_LOSS = 0.10


def one_run(side: str, args: argparse.Namespace, extra: list[str]) -> Rows:
    """One ``ingest_bench.py`` run against the relay: its rows by scenario."""
    rows = ingest_rows(
        [
            "--only",
            "relay",
            "--no-sql",
            "--scenarios",
            args.scenarios,
            "--duration",
            str(args.duration),
            "--encryption",
            side,
        ],
        extra,
    )
    return {row["scenario"]: row for row in rows}


def per_request(row: dict[str, Any], field: str) -> float:
    """CPU microseconds per request answered: the relay's event loop thread
    (``main_cpu_s``) or all its processes (``server_cpu_s``). Steadier than req/s on a shared
    machine: other work there slows the relay down without making it do more per request."""
    load = row["load"]
    return 1e6 * (load[field] or 0.0) / max(load["ok_requests"], 1)


def main(argv: list[str]) -> int:
    own, extra = split_argv(argv)
    p = argparse.ArgumentParser(
        prog="encryption_bench.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=3, help="runs per side, alternating (default 3)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per run (default 15)")
    p.add_argument("--scenarios", default="track", help="ingest_bench.py scenarios (default track)")
    args = p.parse_args(own)

    runs, before, after = alternate(
        SIDES, args.runs, lambda side: one_run(side, args, extra), "encryption"
    )

    print()
    print(f"load before: {before}")
    print(f"load after:  {after}")
    print()
    header = f"{'scenario':<9} {'figure':<17} {'plaintext':>12} {'encrypted':>12} {'change':>8}"
    print(header)
    print("-" * len(header))
    ok = True
    for scenario in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
        for figure, get, fmt in (
            ("events/s", lambda r: r["events_per_s"], "{:,.0f}"),
            ("p50 ms", lambda r: r["load"]["p50_ms"], "{:.2f}"),
            ("p99 ms", lambda r: r["load"]["p99_ms"], "{:.2f}"),
            ("loop CPU us/req", lambda r: per_request(r, "main_cpu_s"), "{:.1f}"),
            ("relay CPU us/req", lambda r: per_request(r, "server_cpu_s"), "{:.1f}"),
            ("other load %", lambda r: r["load"]["other_cpu_pct"] or 0.0, "{:.0f}"),
        ):
            medians = [
                statistics.median(get(run[scenario]) for run in runs[side]) for side in SIDES
            ]
            change = medians[1] / medians[0] - 1 if medians[0] else float("nan")
            print(
                f"{scenario:<9} {figure:<17} {fmt.format(medians[0]):>12} "
                f"{fmt.format(medians[1]):>12} {change:>+8.1%}"
            )
            if scenario == "track" and figure == "events/s":
                ok = -change < TARGET_LOSS
        each = {
            side: ", ".join(f"{run[scenario]['events_per_s']:,.0f}" for run in runs[side])
            for side in SIDES
        }
        print(f"{scenario:<9} {'events/s, each':<17} off {each['off']}; on {each['on']}")
    print()
    print(
        f"target: encryption costs under {TARGET_LOSS:.0%} of track throughput: "
        + ("met" if ok else "NOT met")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
