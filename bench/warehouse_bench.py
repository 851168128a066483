"""Warehouse load throughput: realistic events into a DuckDB file (or a PostgreSQL schema),
in batches, the way the warehouse process loads them.

Run:
    .venv/bin/python bench/warehouse_bench.py          # 200k events, batches of 1000 and 5000
    .venv/bin/python bench/warehouse_bench.py --events 50000 --batch 500 --threads 2
    .venv/bin/python bench/warehouse_bench.py --input dicts   # skip the JSON parsing
    .venv/bin/python bench/warehouse_bench.py --batch 1000 --memory-limit 64MB
    .venv/bin/python bench/warehouse_bench.py --dialect postgres \
        --dsn postgresql://postgres@127.0.0.1/test     # a schema of its own, dropped after

With PostgreSQL the server's work is not this process's CPU time: compare the wall figures.

Each event flattens to ~35 columns (page context, campaign, library, user agent, client
ids, properties). By default each batch starts as the JSON lines the spool holds, parsed
with orjson as the warehouse process parses them (``--input dicts``: from Python dicts, as
earlier versions of this bench did). Prints, per batch size: events/s, wall and CPU
microseconds per row, and how that splits between parsing, planning (``shapes.plan``,
Python), building the Arrow columns, and the database (the INSERT, dedup on the primary
key); then the same batches planned row by row (``schema.plan_rows``, the planner every
batch went through before planning by shape). A last pass re-sends the first batches to
time the dedup path, and the seed query is timed on the loaded table.
"""

from __future__ import annotations

import argparse
import gc
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

import tagrelay.warehouse
from tagrelay.forwarders.warehouse import CHECKPOINT_THRESHOLD, WAREHOUSE_MEMORY_LIMIT_MB
from tagrelay.warehouse import Warehouse
from tagrelay.warehouse.process import collector_paused
from tagrelay.warehouse.schema import plan_rows

PATHS = ["/", "/signup", "/pricing", "/blog/launch", "/docs/start", "/checkout", "/account"]
SOURCES = ["google", "newsletter", "facebook", "linkedin", None]
EVENTS = ["Signed Up", "Order Completed", "Product Viewed", "Button Clicked"]


def make_event(i: int, now: datetime, rng: random.Random) -> dict[str, Any]:
    at = now - timedelta(seconds=rng.randrange(0, 3 * 86_400))
    path = rng.choice(PATHS)
    is_track = i % 3 == 0
    source = rng.choice(SOURCES)
    event: dict[str, Any] = {
        "type": "track" if is_track else "page",
        "messageId": f"msg-{i:09d}-{rng.getrandbits(32):08x}",
        "anonymousId": f"anon-{rng.randrange(50_000):06d}",
        "userId": f"user-{rng.randrange(5_000)}" if rng.random() < 0.3 else None,
        "timestamp": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "sentAt": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "receivedAt": (at + timedelta(milliseconds=40)).isoformat(timespec="milliseconds"),
        "context": {
            "page": {
                "path": path,
                "url": f"https://www.example.com{path}?ref=bench",
                "title": f"Example - {path.strip('/') or 'home'}",
                "referrer": "https://www.google.com/",
                "search": "?ref=bench",
            },
            "campaign": {"source": source, "medium": "cpc", "name": "spring_sale"}
            if source
            else {},
            "library": {"name": "tagrelay.js", "version": "1.4.2"},
            "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15",
            "locale": "en-US",
            "ip": f"203.0.113.{rng.randrange(256)}",
            "screen": {"width": 1440, "height": 900, "density": 2},
            "clientIds": {"ga": f"GA1.1.{rng.getrandbits(31)}.{rng.getrandbits(31)}"},
            "consent": {"analytics": True, "ads": rng.random() < 0.6},
            "source": "segment",
            "writeKeyId": "wk_1",
        },
        "properties": {
            "path": path,
            "title": "Example",
        },
    }
    if is_track:
        event["event"] = rng.choice(EVENTS)
        event["properties"].update(
            {
                "revenue": round(rng.uniform(5, 500), 2),
                "currency": "EUR",
                "quantity": rng.randrange(1, 5),
                "products": [{"sku": "SKU-1", "price": 19.9}],
                "coupon": None,
            }
        )
    else:
        event["name"] = path
    return event


def rss_mb() -> float:
    """This process's resident memory now (Linux), in MB; 0 where /proc is missing."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0.0
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def open_warehouse(args: argparse.Namespace, batch: int, directory: Path) -> Warehouse:
    if args.dialect == "postgres":
        return Warehouse.open("postgres", args.dsn, settings={"schema": f"bench_{batch}"})
    path = directory / f"bench_{batch}.duckdb"
    return Warehouse.open(
        "duckdb",
        str(path),
        settings={
            "threads": args.threads,
            "memory_limit": args.memory_limit,
            "checkpoint_threshold": CHECKPOINT_THRESHOLD,  # as the relay's
        },
    )


def drop_schema(args: argparse.Namespace, batch: int) -> None:
    if args.dialect == "postgres":
        import psycopg

        with psycopg.connect(args.dsn, autocommit=True) as con:
            con.execute(f"DROP SCHEMA IF EXISTS bench_{batch} CASCADE")


class Phases:
    """CPU seconds spent in named steps of ``Warehouse.insert``, by wrapping the module
    attributes it calls (the planner, and the dialect's Arrow conversion)."""

    def __init__(self) -> None:
        self.secs: dict[str, float] = {}

    @contextmanager
    def timing(self, module: Any, attribute: str, label: str) -> Iterator[None]:
        original: Callable[..., Any] = getattr(module, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.secs[label] = self.secs.get(label, 0.0) + time.process_time() - t0

        setattr(module, attribute, timed)
        try:
            yield
        finally:
            setattr(module, attribute, original)


def run(
    events: list[dict[str, Any]], batch: int, args: argparse.Namespace, directory: Path
) -> None:
    drop_schema(args, batch)
    lines = [[orjson.dumps(e) for e in events[s : s + batch]] for s in range(0, len(events), batch)]
    rss_before = rss_mb()
    warehouse = open_warehouse(args, batch, directory)
    phases = Phases()
    parse_secs = 0.0
    inserted = 0
    with phases.timing(tagrelay.warehouse, "plan", "plan"), arrow_timing(args, phases):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for index, start in enumerate(range(0, len(events), batch)):
            with collector_paused():  # as the warehouse process loads a batch
                if args.input == "json":
                    t0 = time.process_time()
                    chunk = [orjson.loads(line) for line in lines[index]]
                    parse_secs += time.process_time() - t0
                else:
                    chunk = events[start : start + batch]
                inserted += warehouse.insert(chunk).inserted
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    n = len(events)
    plan_secs, arrow_secs = phases.secs.get("plan", 0.0), phases.secs.get("arrow", 0.0)
    db_secs = cpu - parse_secs - plan_secs - arrow_secs
    split = f"parse {parse_secs / n * 1e6:4.1f} + " if args.input == "json" else ""
    if args.dialect == "duckdb":
        split += f"plan {plan_secs / n * 1e6:4.1f} + Arrow {arrow_secs / n * 1e6:4.1f}"
    else:
        split += f"plan {plan_secs / n * 1e6:4.1f}"
    print(
        f"batch {batch:>5}: {n / wall:>8,.0f} events/s   {wall / n * 1e6:5.1f} us/row wall   "
        f"{cpu / n * 1e6:5.1f} us/row CPU = {split} + database {db_secs / n * 1e6:4.1f}   "
        f"{len(warehouse.columns)} columns, {inserted:,} rows"
    )
    print(
        f"             memory held by the database after the load: {rss_mb() - rss_before:,.0f} MB"
    )

    t0 = time.process_time()
    for start in range(0, n, batch):
        plan_rows(events[start : start + batch], warehouse.columns, warehouse.max_columns)
    row_by_row = (time.process_time() - t0) / n * 1e6
    print(
        f"             planned row by row instead (schema.plan_rows): {row_by_row:5.1f} us/row "
        f"(by shape: {plan_secs / n * 1e6:.1f})"
    )

    resend = events[: min(n, 20 * batch)]
    t0 = time.perf_counter()
    dupes = sum(
        warehouse.insert(resend[s : s + batch]).duplicates for s in range(0, len(resend), batch)
    )
    dt = time.perf_counter() - t0
    print(
        f"             resend of {len(resend):,} events: {dt / len(resend) * 1e6:6.1f} us/row, "
        f"{dupes:,} duplicates skipped"
    )

    fresh = [make_event(n + i, datetime.now(UTC), random.Random(i)) for i in range(batch)]
    for e in fresh:
        e["properties"]["bench_new_key"] = 1
    t0 = time.perf_counter()
    added = warehouse.insert(fresh).new_columns
    dt = time.perf_counter() - t0
    print(
        f"             a batch adding {len(added)} column to {n:,} rows: {dt * 1e3:.0f} ms "
        f"(a plain batch: {batch * wall / n * 1e3:.0f} ms)"
    )

    t0 = time.perf_counter()
    result = warehouse.query(
        "select * from events where context_page_path = '/signup' "
        "and timestamp > now() - interval '1 day'",
        max_rows=1_000_000,
    )
    print(
        f"             seed query: {len(result.rows):,} rows in "
        f"{(time.perf_counter() - t0) * 1e3:.0f} ms"
    )
    warehouse.close()
    drop_schema(args, batch)


@contextmanager
def arrow_timing(args: argparse.Namespace, phases: Phases) -> Iterator[None]:
    if args.dialect != "duckdb":
        yield
        return
    from tagrelay.warehouse.dialects import duckdb as duckdb_dialect

    with phases.timing(duckdb_dialect, "_arrow_batch", "arrow"):
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument(
        "--batch", type=int, action="append", help="repeatable; default 1000 and 5000"
    )
    parser.add_argument(
        "--input",
        choices=["json", "dicts"],
        default="json",
        help="json: each batch parsed from the spool's JSON lines (default); dicts: from "
        "Python dicts made beforehand",
    )
    parser.add_argument("--threads", type=int, default=1, help="DuckDB threads (default 1)")
    parser.add_argument(
        "--memory-limit",
        default=f"{WAREHOUSE_MEMORY_LIMIT_MB}MB",
        help=f"DuckDB memory_limit (default {WAREHOUSE_MEMORY_LIMIT_MB}MB, the relay's default "
        "memory_limit_mb)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--dialect", choices=["duckdb", "postgres"], default="duckdb")
    parser.add_argument(
        "--dsn",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="PostgreSQL connection string for --dialect postgres",
    )
    args = parser.parse_args()

    rng = random.Random(args.seed)
    now = datetime.now(UTC)
    events = [make_event(i, now, rng) for i in range(args.events)]
    # The events made above live as long as the run; the warehouse process holds one
    # batch at a time. Out of the collector's way, as its own start-up objects are.
    gc.freeze()
    if args.dialect == "postgres":
        print(f"{args.events:,} events, PostgreSQL")
    else:
        print(
            f"{args.events:,} events, DuckDB threads={args.threads}, "
            f"memory_limit={args.memory_limit}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch or [1000, 5000]:
            run(events, batch, args, Path(tmp))


if __name__ == "__main__":
    main()
