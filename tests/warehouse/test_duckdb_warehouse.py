"""What only DuckDB files have: read-only opening, the lock one writing process holds, and
which statements ``query`` lets through (DuckDB's own kinds, PRAGMAs, no file access).
Everything both engines do is in ``test_dialects``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tagrelay.errors import QueryRejected, WarehouseError
from tagrelay.warehouse import Warehouse
from tests.warehouse.test_dialects import NOW, SEED_QUERY, page, rows


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "warehouse.duckdb"


@pytest.fixture
def warehouse(db_path: Path) -> Iterator[Warehouse]:
    wh = Warehouse.open("duckdb", str(db_path))
    yield wh
    wh.close()


# -- reading only, and locking --------------------------------------------------------------


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
