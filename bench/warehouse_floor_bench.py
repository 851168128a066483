"""Where the warehouse's floor is: what DuckDB itself costs per row, apart from tagrelay's
planning, for the bench's mixed events (the columns ``warehouse_bench.py`` loads).

Run:
    PYTHONPATH=src .venv/bin/python bench/warehouse_floor_bench.py
    PYTHONPATH=src .venv/bin/python bench/warehouse_floor_bench.py --events 50000 --batch 5000

Prints CPU microseconds per row (this process's CPU time: DuckDB runs on one thread here,
so other jobs on the machine do not count) for: DuckDB's ``json_transform`` of the planned
rows alone (parsing); the same rows inserted into an in-memory table with and without the
``message_id`` primary key; the planned columns as Arrow (the warehouse's own path: built,
and inserted with and without the key); the rows read by ``read_json`` from a
newline-delimited file; the same rows as one Python list per column; and, for comparison,
tagrelay's planning (by shape, ``shapes.plan``, and row by row, ``schema.plan_rows``) and
planning plus encoding the rows as JSON. Whatever the Python side does, a load cannot cost
less per row than DuckDB's insert.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from warehouse_bench import make_event

from tagrelay.warehouse.dialects.duckdb import _NATIVE_TYPES, _arrow_batch
from tagrelay.warehouse.schema import plan_rows
from tagrelay.warehouse.shapes import plan

_TRANSFORM_TYPES = {**_NATIVE_TYPES, "TIMESTAMPTZ": "VARCHAR"}
"""json_transform reads a time as text; the CAST in the INSERT parses it with its offset."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    now = datetime.now(UTC)
    events = [make_event(i, now, rng) for i in range(args.events)]
    columns = dict(plan(events, {}, 1000).insert_columns)
    batches = [events[s : s + args.batch] for s in range(0, len(events), args.batch)]
    rowsets = [
        [orjson.dumps(row).decode() for row in plan(batch, columns, 1000).rows] for batch in batches
    ]
    n = len(events)
    print(f"{n:,} events, {len(columns)} columns, batches of {args.batch}, DuckDB threads=1")

    def table(primary_key: bool) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(":memory:", config={"threads": 1})
        definitions = ", ".join(
            f'"{name}" {_NATIVE_TYPES[kind]}'
            + (" PRIMARY KEY" if primary_key and name == "message_id" else "")
            for name, kind in columns.items()
        )
        con.execute(f"create table t ({definitions})")
        return con

    spec = orjson.dumps({n: _TRANSFORM_TYPES[k] for n, k in columns.items()}).decode()
    spec = spec.replace("'", "''")
    values = ", ".join(
        f'CAST(r."{name}" AS TIMESTAMPTZ)' if kind == "TIMESTAMPTZ" else f'r."{name}"'
        for name, kind in columns.items()
    )
    names = ", ".join(f'"{name}"' for name in columns)
    insert = (
        f"insert into t ({names}) select {values} "
        f"from (select json_transform(unnest($1), '{spec}') as r)"
    )

    def timed(label: str, work: Callable[[], None]) -> None:
        start = time.process_time()
        work()
        print(f"  {label:48s} {(time.process_time() - start) / n * 1e6:6.2f} us/row")

    def each(con: duckdb.DuckDBPyConnection, sql: str) -> Callable[[], None]:
        return lambda: [con.execute(sql, [rows]).fetchall() for rows in rowsets] and None

    timed(
        "DuckDB json_transform alone (parse)",
        each(table(True), f"select count(*) from (select json_transform(unnest($1), '{spec}'))"),
    )
    timed("DuckDB insert via json_transform, no key", each(table(False), insert))
    timed("DuckDB insert via json_transform, primary key", each(table(True), insert))

    # The warehouse's own path: the planned columns as one Arrow struct array.
    plans = [plan(batch, columns, 1000) for batch in batches]
    arrow_values = ", ".join(
        f'CAST("{name}" AS {kind})' if kind in ("TIMESTAMPTZ", "JSON") else f'"{name}"'
        for name, kind in columns.items()
    )

    def arrow_insert(con: duckdb.DuckDBPyConnection) -> Callable[[], None]:
        def load() -> None:
            for planned in plans:
                con.register(
                    "b", _arrow_batch(planned.insert_columns, planned.columns, planned.row_count)
                )
                con.execute(f"insert into t ({names}) select {arrow_values} from b")
                con.unregister("b")

        return load

    timed(
        "Arrow columns built (nanoarrow), no insert",
        lambda: [_arrow_batch(p.insert_columns, p.columns, p.row_count) for p in plans] and None,
    )
    timed("DuckDB insert from Arrow columns, no key", arrow_insert(table(False)))
    timed("DuckDB insert from Arrow columns, primary key", arrow_insert(table(True)))

    con = table(True)
    types = "{" + ", ".join(f"'{n}': '{_NATIVE_TYPES[k]}'" for n, k in columns.items()) + "}"

    def read_json() -> None:
        with tempfile.TemporaryDirectory(
            dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        ) as d:
            for i, rows in enumerate(rowsets):
                path = Path(d) / f"b{i}.ndjson"
                path.write_text("\n".join(rows))
                con.execute(
                    f"insert into t ({names}) select {names} from read_json("
                    f"'{path}', format='newline_delimited', columns={types})"
                )

    timed("DuckDB insert via read_json (file), primary key", read_json)

    # The same rows handed over as one Python list per column.
    planned = [plan(b, columns, 1000).rows for b in batches]
    by_column = [[[row.get(name) for row in rows] for name in columns] for rows in planned]
    unnests = ", ".join(
        f"CAST(unnest(${i + 1}) AS TIMESTAMPTZ)" if kind == "TIMESTAMPTZ" else f"unnest(${i + 1})"
        for i, kind in enumerate(columns.values())
    )
    listed = table(True)
    timed(
        "DuckDB insert from a Python list per column",
        lambda: (
            [
                listed.execute(
                    f"insert into t ({names}) select {unnests}",
                    [
                        [orjson.dumps(v).decode() if v is not None else None for v in values]
                        if kind == "JSON"
                        else values
                        for values, kind in zip(lists, columns.values(), strict=True)
                    ],
                )
                for lists in by_column
            ]
            and None
        ),
    )
    timed(
        "tagrelay plan by shape (Python)",
        lambda: [plan(b, columns, 1000) for b in batches] and None,
    )
    timed(
        "tagrelay plan row by row (the reference)",
        lambda: [plan_rows(b, columns, 1000) for b in batches] and None,
    )
    timed(
        "tagrelay plan + JSON encoding of the rows",
        lambda: (
            [[orjson.dumps(row) for row in plan(b, columns, 1000).rows] for b in batches] and None
        ),
    )


if __name__ == "__main__":
    main()
