"""Warehouse load throughput: realistic events into a DuckDB file (or a PostgreSQL schema),
in batches.

Run:
    .venv/bin/python bench/warehouse_bench.py          # 200k events, batches of 100 and 1000
    .venv/bin/python bench/warehouse_bench.py --events 50000 --batch 500 --threads 2
    .venv/bin/python bench/warehouse_bench.py --batch 1000 --memory-limit 64MB
    .venv/bin/python bench/warehouse_bench.py --dialect postgres \
        --dsn postgresql://postgres@127.0.0.1/test     # a schema of its own, dropped after

With PostgreSQL the server's work is not this process's CPU time: compare the wall figures.

Each event flattens to ~35 columns (page context, campaign, library, user agent, client
ids, properties). Prints, per batch size: events/s, wall and CPU microseconds per row, and
how that splits between planning (pure Python: flatten, type, convert) and the database
(JSON encoding + one INSERT per batch, dedup on the primary key). A last pass re-sends the
first batches to time the dedup path, and the seed query is timed on the loaded table.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tagrelay.warehouse import Warehouse
from tagrelay.warehouse.shapes import plan

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
        "duckdb", str(path), settings={"threads": args.threads, "memory_limit": args.memory_limit}
    )


def drop_schema(args: argparse.Namespace, batch: int) -> None:
    if args.dialect == "postgres":
        import psycopg

        with psycopg.connect(args.dsn, autocommit=True) as con:
            con.execute(f"DROP SCHEMA IF EXISTS bench_{batch} CASCADE")


def run(
    events: list[dict[str, Any]], batch: int, args: argparse.Namespace, directory: Path
) -> None:
    drop_schema(args, batch)
    rss_before = rss_mb()
    warehouse = open_warehouse(args, batch, directory)
    plan_secs = 0.0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    inserted = 0
    for start in range(0, len(events), batch):
        chunk = events[start : start + batch]
        t0 = time.perf_counter()
        plan(chunk, warehouse.columns, warehouse.max_columns)
        plan_secs += time.perf_counter() - t0
        inserted += warehouse.insert(chunk).inserted
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    n = len(events)
    # insert() plans again internally: the database's share is the rest.
    db_secs = wall - 2 * plan_secs
    print(
        f"batch {batch:>5}: {n / (wall - plan_secs):>8,.0f} events/s   "
        f"{(wall - plan_secs) / n * 1e6:6.1f} us/row wall  "
        f"(plan {plan_secs / n * 1e6:5.1f} + database {db_secs / n * 1e6:5.1f})   "
        f"{(cpu - plan_secs) / n * 1e6:6.1f} us/row CPU   "
        f"{len(warehouse.columns)} columns, {inserted:,} rows"
    )
    print(
        f"             memory held by the database after the load: {rss_mb() - rss_before:,.0f} MB"
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
        f"(a plain batch: {batch * (wall - plan_secs) / n * 1e3:.0f} ms)"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument(
        "--batch", type=int, action="append", help="repeatable; default 100 and 1000"
    )
    parser.add_argument("--threads", type=int, default=1, help="DuckDB threads (default 1)")
    parser.add_argument(
        "--memory-limit",
        default="256MB",
        help="DuckDB memory_limit (default 256MB, the relay's default memory_limit_mb)",
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
    if args.dialect == "postgres":
        print(f"{args.events:,} events, PostgreSQL")
    else:
        print(
            f"{args.events:,} events, DuckDB threads={args.threads}, "
            f"memory_limit={args.memory_limit}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch or [100, 1000]:
            run(events, batch, args, Path(tmp))


if __name__ == "__main__":
    main()
