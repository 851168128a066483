"""The JetStream spool against the SQLite spool and the bare app, on ``track`` and ``batch``:
``ingest_bench.py`` (relay and bare app in each run) with ``--spool sqlite`` and
``--spool jetstream`` (one replica, R1 file storage on the local NATS server), the two
alternating run after run (the machine may be shared: a burst of other work then hits both
alike), medians side by side, with the machine's load average (``uptime``) before and after.

    .venv/bin/python bench/jetstream_bench.py                  # track and batch, 3 runs a side
    .venv/bin/python bench/jetstream_bench.py --runs 5 -- --connections 32

Targets: JetStream ``track`` at >= 25% of the bare app's rate; ``batch`` >= 30,000 events/s,
each request answered only once JetStream acknowledged all its events. Options after ``--``
go to ``ingest_bench.py``. Exit status 0 when every run ran.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _alternating import Rows, alternate, ingest_rows, split_argv

SIDES = ("sqlite", "jetstream")
TARGET_TRACK_RATIO = 0.25
TARGET_BATCH_EVENTS = 30_000


def one_run(side: str, args: argparse.Namespace, extra: list[str]) -> Rows:
    """One ``ingest_bench.py`` run (bare app, then the relay on ``side``'s spool): rows by
    ``(server, scenario)``."""
    rows = ingest_rows(
        [
            "--no-sql",
            "--scenarios",
            args.scenarios,
            "--duration",
            str(args.duration),
            "--spool",
            side,
        ],
        extra,
    )
    return {f"{row['server']}/{row['scenario']}": row for row in rows}


def main(argv: list[str]) -> int:
    own, extra = split_argv(argv)
    p = argparse.ArgumentParser(
        prog="jetstream_bench.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=3, help="runs per side, alternating (default 3)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    p.add_argument("--scenarios", default="track,batch", help="(default track,batch)")
    args = p.parse_args(own)

    runs, before, after = alternate(
        SIDES, args.runs, lambda side: one_run(side, args, extra), "spool"
    )

    def median(side: str, key: str, get: Any) -> float:
        return statistics.median(get(run[key]) for run in runs[side] if key in run)

    print()
    print(f"load before: {before}")
    print(f"load after:  {after}")
    print()
    header = f"{'scenario':<9} {'figure':<10} {'bare':>10} {'sqlite':>10} {'jetstream':>10}"
    print(header)
    print("-" * len(header))
    figures: dict[tuple[str, str], float] = {}
    for scenario in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
        for figure, get, fmt in (
            ("req/s", lambda r: r["load"]["req_per_s"], "{:,.0f}"),
            ("events/s", lambda r: r["events_per_s"], "{:,.0f}"),
            ("p50 ms", lambda r: r["load"]["p50_ms"], "{:.2f}"),
            ("p99 ms", lambda r: r["load"]["p99_ms"], "{:.2f}"),
        ):
            bare = statistics.median(
                get(run[f"bare/{scenario}"]) for side in SIDES for run in runs[side]
            )
            relay = {side: median(side, f"relay/{scenario}", get) for side in SIDES}
            figures.update({(scenario + "/" + figure, side): v for side, v in relay.items()})
            figures[(scenario + "/" + figure, "bare")] = bare
            print(
                f"{scenario:<9} {figure:<10} {fmt.format(bare):>10} "
                f"{fmt.format(relay['sqlite']):>10} {fmt.format(relay['jetstream']):>10}"
            )
        each = {
            side: ", ".join(
                f"{run[f'relay/{scenario}']['events_per_s']:,.0f}" for run in runs[side]
            )
            for side in SIDES
        }
        print(
            f"{scenario:<9} events/s, each run: sqlite {each['sqlite']}; "
            f"jetstream {each['jetstream']}"
        )
    print()
    if ("track/req/s", "bare") in figures:
        ratio = figures[("track/req/s", "jetstream")] / figures[("track/req/s", "bare")]
        verdict = "met" if ratio >= TARGET_TRACK_RATIO else "NOT met"
        print(
            f"target: jetstream track >= {TARGET_TRACK_RATIO:.0%} of bare: {ratio:.0%}, {verdict}"
        )
    if ("batch/events/s", "jetstream") in figures:
        rate = figures[("batch/events/s", "jetstream")]
        verdict = "met" if rate >= TARGET_BATCH_EVENTS else "NOT met"
        print(
            f"target: jetstream batch >= {TARGET_BATCH_EVENTS:,} events/s: {rate:,.0f}, {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
