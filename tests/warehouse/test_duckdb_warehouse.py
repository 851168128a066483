"""The warehouse on real DuckDB files: schema evolution, misfits kept in ``_unmapped_data``,
deduplication, limits, the seed query, read-only enforcement, reopening, locking, and a
query running in another thread while batches load."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from tagrelay.errors import QueryRejected, QueryTimeout, WarehouseError
from tagrelay.warehouse import Warehouse
from tagrelay.warehouse.schema import BASE_COLUMNS

SEED_QUERY = (
    "select * from events where context_page_path = '/signup' "
    "and timestamp > now() - interval '1 day'"
)


def iso(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def page(message_id: str, path: str, at: datetime, /, **properties: Any) -> dict[str, Any]:
    return {
        "type": "page",
        "messageId": message_id,
        "anonymousId": "anon-1",
        "timestamp": iso(at),
        "receivedAt": iso(at),
        "context": {
            "page": {"path": path, "url": f"https://example.com{path}"},
            "userAgent": "Mozilla/5.0",
            "campaign": {"source": "newsletter"},
        },
        "properties": properties,
    }


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "warehouse.duckdb"


@pytest.fixture
def warehouse(db_path: Path) -> Iterator[Warehouse]:
    wh = Warehouse.open("duckdb", str(db_path))
    yield wh
    wh.close()


def rows(wh: Warehouse, sql: str) -> list[tuple[Any, ...]]:
    return wh.query(sql).rows


NOW = datetime.now(UTC)


# -- loading ----------------------------------------------------------------------------


def test_a_new_table_has_the_base_columns(warehouse: Warehouse) -> None:
    assert dict(warehouse.columns) == dict(BASE_COLUMNS)
    described = rows(warehouse, "describe events")
    assert [(r[0], r[1]) for r in described][:3] == [
        ("message_id", "VARCHAR"),
        ("type", "VARCHAR"),
        ("event", "VARCHAR"),
    ]
    assert ("timestamp", "TIMESTAMP WITH TIME ZONE") in [(r[0], r[1]) for r in described]


def test_the_seed_query_runs_on_a_new_empty_table(warehouse: Warehouse) -> None:
    result = warehouse.query(SEED_QUERY)
    assert (result.rows, result.truncated) == ([], False)
    assert result.columns == tuple(BASE_COLUMNS)


def test_the_seed_query_returns_recent_signup_pages_only(warehouse: Warehouse) -> None:
    result = warehouse.insert(
        [
            page("recent-1", "/signup", NOW - timedelta(minutes=5)),
            page("recent-2", "/signup", NOW - timedelta(hours=23)),
            page("old", "/signup", NOW - timedelta(days=1, minutes=5)),
            page("other-path", "/pricing", NOW - timedelta(minutes=5)),
        ]
    )
    assert result.inserted == 4

    answer = warehouse.query(SEED_QUERY)

    by_column = [dict(zip(answer.columns, row, strict=True)) for row in answer.rows]
    assert sorted(r["message_id"] for r in by_column) == ["recent-1", "recent-2"]
    assert {r["context_page_path"] for r in by_column} == {"/signup"}
    assert all(isinstance(r["timestamp"], datetime) for r in by_column)
    assert answer.truncated is False


def test_a_new_key_adds_a_column_and_older_rows_read_null(warehouse: Warehouse) -> None:
    warehouse.insert([page("m1", "/a", NOW)])
    result = warehouse.insert([page("m2", "/b", NOW, plan="pro", seats=3)])

    assert result.new_columns == {"properties_plan": "VARCHAR", "properties_seats": "BIGINT"}
    assert rows(
        warehouse, "select message_id, properties_plan, properties_seats from events order by 1"
    ) == [("m1", None, None), ("m2", "pro", 3)]
    types = {r[0]: r[1] for r in rows(warehouse, "describe events")}
    assert types["properties_plan"] == "VARCHAR"
    assert types["properties_seats"] == "BIGINT"


def test_every_inferred_type_round_trips(warehouse: Warehouse) -> None:
    warehouse.insert(
        [
            page(
                "m1",
                "/a",
                NOW,
                flag=True,
                count=2**62,
                huge=2**64,
                price=19.99,
                label="x",
                at="2024-05-01T12:00:00.250+02:00",
                tags=["a", {"b": 1}],
            )
        ]
    )
    result = warehouse.query(
        "select properties_flag, properties_count, properties_huge, properties_price, "
        "properties_label, properties_at, properties_tags from events"
    )
    assert result.rows == [
        (
            True,
            2**62,
            float(2**64),
            19.99,
            "x",
            datetime(2024, 5, 1, 10, 0, 0, 250_000, tzinfo=UTC),
            '["a",{"b":1}]',
        )
    ]
    types = {r[0]: r[1] for r in rows(warehouse, "describe events")}
    assert [types[f"properties_{k}"] for k in ("flag", "count", "huge", "price", "at", "tags")] == [
        "BOOLEAN",
        "BIGINT",
        "DOUBLE",
        "DOUBLE",
        "TIMESTAMP WITH TIME ZONE",
        "JSON",
    ]


def test_a_type_conflict_lands_in_unmapped_data_and_the_row_is_kept(
    warehouse: Warehouse,
) -> None:
    warehouse.insert([page("m1", "/a", NOW, count=3)])
    result = warehouse.insert([page("m2", "/signup", NOW, count="three", other=1.5)])

    assert result.inserted == 1
    assert result.unmapped_values == 1
    assert rows(
        warehouse,
        "select message_id, context_page_path, properties_count, properties_other, "
        "_unmapped_data->>'properties_count' from events order by 1",
    ) == [("m1", "/a", 3, None, None), ("m2", "/signup", None, 1.5, "three")]


def test_lossless_values_are_stored_converted(warehouse: Warehouse) -> None:
    warehouse.insert([page("m1", "/a", NOW, price=1.5, label="text", payload=[1])])
    result = warehouse.insert(
        [
            page("m2", "/a", NOW, price=3, label=True, payload="scalar"),
            page("m3", "/a", NOW, price=2**53 + 1, label=2.5, payload={"not": "an array"}),
        ]
    )
    assert rows(
        warehouse,
        "select message_id, properties_price, properties_label, properties_payload, "
        "_unmapped_data from events order by 1",
    ) == [
        ("m1", 1.5, "text", "[1]", None),
        ("m2", 3.0, "true", '"scalar"', None),
        ("m3", None, "2.5", None, '{"properties_price":9007199254740993}'),
    ]
    # An object under a JSON column's key is flattened, as every object is.
    assert "properties_payload_not" in result.new_columns


def test_a_resent_batch_makes_no_second_row(warehouse: Warehouse) -> None:
    batch = [page(f"m{i}", "/a", NOW) for i in range(50)]
    assert warehouse.insert(batch).inserted == 50

    again = warehouse.insert([*batch[10:20], page("m-new", "/a", NOW)])

    assert (again.inserted, again.duplicates) == (1, 10)
    assert rows(warehouse, "select count(*), count(distinct message_id) from events") == [(51, 51)]


def test_a_resend_with_other_content_keeps_the_first_version(warehouse: Warehouse) -> None:
    warehouse.insert([page("m1", "/first", NOW)])
    warehouse.insert([page("m1", "/second", NOW)])
    assert rows(warehouse, "select context_page_path from events") == [("/first",)]


def test_duplicates_inside_one_batch_are_dropped(warehouse: Warehouse) -> None:
    result = warehouse.insert([page("m1", "/a", NOW), page("m2", "/b", NOW), page("m1", "/c", NOW)])
    assert (result.inserted, result.duplicates) == (2, 1)
    assert rows(warehouse, "select message_id, context_page_path from events order by 1") == [
        ("m1", "/a"),
        ("m2", "/b"),
    ]


def test_columns_past_max_columns_and_long_names_go_to_unmapped_data(db_path: Path) -> None:
    limit = len(BASE_COLUMNS) + 2
    long_key = "k" * 60
    with Warehouse.open("duckdb", str(db_path), max_columns=limit) as wh:
        result = wh.insert([page("m1", "/a", NOW, a=1, b=2, c=3, **{long_key: 4})])
        assert len(wh.columns) == limit
        assert list(result.new_columns) == ["properties_a", "properties_b"]
        assert result.unmapped_values == 2
        (unmapped,) = rows(wh, "select _unmapped_data from events")[0]
        assert orjson.loads(unmapped) == {"properties_c": 3, f"properties_{long_key}": 4}
        assert len(rows(wh, "describe events")) == limit


def test_events_that_are_not_plain_json_still_load(warehouse: Warehouse) -> None:
    """Lone surrogates and over-long integers cannot go through the fast JSON encoder."""
    result = warehouse.insert([page("m1", "/a\ud800", NOW, big=[2**70], nested={"x": 1})])
    assert result.inserted == 1
    assert rows(warehouse, "select context_page_path, properties_big from events") == [
        ("/a\ufffd", f'["{2**70}"]')
    ]


# -- reopening and locking --------------------------------------------------------------


def test_reopening_keeps_the_schema_and_its_types(db_path: Path) -> None:
    with Warehouse.open("duckdb", str(db_path)) as wh:
        wh.insert([page("m1", "/a", NOW, count=1, at="2024-05-01T10:00:00Z", tags=[1])])
        before = dict(wh.columns)

    with Warehouse.open("duckdb", str(db_path)) as wh:
        assert dict(wh.columns) == before
        assert before["properties_count"] == "BIGINT"
        assert before["properties_at"] == "TIMESTAMPTZ"
        assert before["properties_tags"] == "JSON"
        result = wh.insert([page("m2", "/a", NOW, count="many"), page("m1", "/a", NOW)])
        assert (result.inserted, result.duplicates, result.new_columns) == (1, 1, {})
        assert rows(
            wh, "select message_id, _unmapped_data->>'properties_count' from events order by 1"
        ) == [("m1", None), ("m2", "many")]


def test_a_foreign_table_of_the_same_name_is_refused(db_path: Path) -> None:
    import duckdb

    with duckdb.connect(str(db_path)) as con:
        con.execute("create table events (id integer)")
    with pytest.raises(WarehouseError, match="not created by tagrelay"):
        Warehouse.open("duckdb", str(db_path))


def test_a_read_only_warehouse_answers_queries_and_refuses_inserts(db_path: Path) -> None:
    with Warehouse.open("duckdb", str(db_path)) as wh:
        wh.insert([page("m1", "/signup", NOW)])
    with Warehouse.open("duckdb", str(db_path), read_only=True) as ro:
        assert [r[0] for r in ro.query(SEED_QUERY).rows] == ["m1"]
        with pytest.raises(WarehouseError, match="read-only"):
            ro.insert([page("m2", "/a", NOW)])


def test_opening_a_missing_file_read_only_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(WarehouseError, match="cannot open"):
        Warehouse.open("duckdb", str(tmp_path / "absent.duckdb"), read_only=True)


def test_another_process_cannot_open_the_file_while_it_is_open_for_writing(
    warehouse: Warehouse, db_path: Path
) -> None:
    code = (
        "import sys\n"
        "from tagrelay.errors import WarehouseError\n"
        "from tagrelay.warehouse import Warehouse\n"
        "try:\n"
        "    Warehouse.open('duckdb', sys.argv[1], read_only=True)\n"
        "except WarehouseError as e:\n"
        "    print(e)\n"
        "    sys.exit(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(db_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 3, done.stderr
    assert "another process has it open" in done.stdout


# -- queries ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "select count(*) from events",
        "SELECT 1",
        "with x as (select 1 as n) select n from x",
        "from events",
        "values (1), (2)",
        "describe events",
        "show tables",
        "summarize events",
        "explain select * from events",
        "explain analyze select * from events",
        "pragma table_info('events')",
        "pragma version",
        "-- a comment first\nselect 1",
        "select 1;",
    ],
)
def test_read_only_statements_run(warehouse: Warehouse, sql: str) -> None:
    warehouse.insert([page("m1", "/a", NOW)])
    result = warehouse.query(sql)
    assert result.columns


@pytest.mark.parametrize(
    "sql",
    [
        "delete from events",
        "insert into events (message_id) values ('x')",
        "update events set type = 'x'",
        "drop table events",
        "create table t as select * from events",
        "alter table events add column x int",
        "attach 'other.duckdb' as other",
        "detach other",
        "copy events to 'out.csv'",
        "export database 'out'",
        "install httpfs",
        "load json",
        "set threads = 4",
        "pragma threads = 4",
        "pragma enable_profiling",
        "call checkpoint()",
        "checkpoint",
        "vacuum",
        "begin transaction",
        "select 1; delete from events",
        "select 1; select 2",
        "explain analyze delete from events",
        "explain delete from events",
        "/* x */ explain analyze delete from events",
        "pivot events on type",
        "truncate events",
        "prepare p as delete from events",
    ],
)
def test_statements_that_could_write_are_rejected(warehouse: Warehouse, sql: str) -> None:
    warehouse.insert([page("m1", "/a", NOW)])
    with pytest.raises(QueryRejected):
        warehouse.query(sql)
    assert rows(warehouse, "select count(*), min(type) from events") == [(1, "page")]
    assert rows(warehouse, "select count(*) from information_schema.tables") == [(1,)]


def test_a_rejection_says_what_is_allowed(warehouse: Warehouse) -> None:
    with pytest.raises(QueryRejected, match=r"read-only queries.*SELECT.*got a DELETE"):
        warehouse.query("delete from events")
    with pytest.raises(QueryRejected, match="exactly one statement, got 2"):
        warehouse.query("select 1; drop table events")


def test_queries_cannot_read_other_files(warehouse: Warehouse, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    with pytest.raises(WarehouseError) as caught:
        warehouse.query(f"select * from read_text('{secret}')")
    assert not isinstance(caught.value, QueryRejected)
    assert "do not read" not in str(caught.value)


def test_a_syntax_error_is_a_warehouse_error(warehouse: Warehouse) -> None:
    with pytest.raises(WarehouseError, match="cannot parse"):
        warehouse.query("selec 1")
    with pytest.raises(WarehouseError, match="failed"):
        warehouse.query("select no_such_column from events")


def test_rows_are_capped_and_truncation_is_reported(warehouse: Warehouse) -> None:
    warehouse.insert([page(f"m{i:02d}", "/a", NOW) for i in range(25)])
    capped = warehouse.query("select message_id from events order by 1", max_rows=10)
    assert capped.truncated is True
    assert [r[0] for r in capped.rows] == [f"m{i:02d}" for i in range(10)]
    exact = warehouse.query("select message_id from events", max_rows=25)
    assert (len(exact.rows), exact.truncated) == (25, False)


def test_a_query_past_its_timeout_is_stopped(warehouse: Warehouse) -> None:
    with pytest.raises(QueryTimeout, match=r"ran longer than 0\.2 s and was stopped"):
        warehouse.query(
            "select count(*) from range(1000000000) a, range(1000000) b", timeout_secs=0.2
        )
    assert warehouse.query("select 42").rows == [(42,)]


def test_close_interrupts_the_queries_still_running(db_path: Path) -> None:
    warehouse = Warehouse.open("duckdb", str(db_path))
    failures: list[BaseException] = []

    def endless() -> None:
        try:
            warehouse.query("select count(*) from range(1000000000000)", timeout_secs=None)
        except WarehouseError as e:
            failures.append(e)

    reader = threading.Thread(target=endless)
    reader.start()
    dialect = warehouse.dialect
    for _ in range(500):  # until the query runs
        if getattr(dialect, "_running", None):
            break
        time.sleep(0.01)
    warehouse.close()
    reader.join(60)

    assert not reader.is_alive()
    assert len(failures) == 1 and "closing" in str(failures[0])
    assert not isinstance(failures[0], QueryTimeout)


def test_a_query_in_another_thread_sees_whole_batches_while_loading(
    warehouse: Warehouse,
) -> None:
    """Each batch adds 100 rows and a new column; a concurrent reader must only ever see
    whole batches, and neither side may fail."""
    batches, size = 30, 100
    errors: list[BaseException] = []
    seen: list[int] = []
    loading = threading.Event()
    loading.set()

    def read() -> None:
        while loading.is_set():
            try:
                (count,) = warehouse.query("select count(*) from events").rows[0]
                seen.append(count)
                warehouse.query("select * from events where context_page_path = '/signup'")
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)
                return

    warehouse.insert([page(f"b0-{i}", "/signup", NOW) for i in range(size)])
    reader = threading.Thread(target=read)
    reader.start()
    try:
        for b in range(1, batches):
            events = [page(f"b{b}-{i}", "/signup", NOW, **{f"key_{b}": i}) for i in range(size)]
            assert warehouse.insert(events).inserted == size
    finally:
        loading.clear()
        reader.join(timeout=60)

    assert not errors, errors
    assert len(seen) >= 2, "the reader hardly ran"
    assert all(count % size == 0 for count in seen), sorted(set(seen))
    assert seen == sorted(seen)
    assert rows(warehouse, "select count(*) from events") == [(batches * size,)]
    assert len(warehouse.columns) == len(rows(warehouse, "describe events"))


def test_a_table_missing_base_columns_gets_them_at_open(db_path: Path) -> None:
    """A table made by an earlier version, with fewer base columns, still runs the seed
    query once reopened, and keeps its rows."""
    import duckdb

    with duckdb.connect(str(db_path)) as con:
        con.execute(
            'create table events (message_id varchar primary key, "timestamp" timestamptz, '
            "_unmapped_data json, properties_plan varchar)"
        )
        con.execute("insert into events (message_id, properties_plan) values ('m0', 'pro')")
    with Warehouse.open("duckdb", str(db_path)) as wh:
        assert set(BASE_COLUMNS) <= set(wh.columns)
        assert list(wh.columns)[:4] == [
            "message_id",
            "timestamp",
            "_unmapped_data",
            "properties_plan",
        ]
        assert wh.query(SEED_QUERY).rows == []
        assert rows(wh, "select message_id, properties_plan, type from events") == [
            ("m0", "pro", None)
        ]
