"""``tagrelay.warehouse`` exports exactly its documented names."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tagrelay.warehouse as warehouse
from tagrelay.errors import WarehouseError


def test_the_package_exports_its_public_names() -> None:
    assert sorted(warehouse.__all__) == [
        "ColumnType",
        "DIALECTS",
        "InsertResult",
        "QueryResult",
        "Warehouse",
        "open_when_unlocked",
    ]
    for name in warehouse.__all__:
        assert getattr(warehouse, name) is not None


def test_duckdb_and_postgres_are_the_registered_dialects() -> None:
    assert list(warehouse.DIALECTS) == ["duckdb", "postgres"]


def test_importing_the_warehouse_loads_no_database_driver() -> None:
    """The relay's own process imports ``tagrelay.warehouse`` (its child loads the driver):
    neither DuckDB nor psycopg may come with it."""
    code = (
        "import sys, tagrelay.warehouse, tagrelay.forwarders.warehouse; "
        "print(sorted(m for m in ('duckdb', 'psycopg') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


def test_an_unknown_dialect_or_table_name_is_refused() -> None:
    with pytest.raises(WarehouseError, match="unknown warehouse dialect 'oracle'"):
        warehouse.Warehouse.open("oracle", "x")
    with pytest.raises(WarehouseError, match="invalid table name"):
        warehouse.Warehouse.open("duckdb", ":memory:", table="Events; drop")


def test_open_when_unlocked_waits_out_a_lock_but_not_other_errors() -> None:
    from tagrelay.errors import WarehouseLocked

    attempts: list[int] = []
    opened = object()

    def locked_twice() -> object:
        attempts.append(1)
        if len(attempts) < 3:
            raise WarehouseLocked("held by another process")
        return opened

    assert warehouse.open_when_unlocked(locked_twice, 5, poll_secs=0) is opened  # type: ignore[arg-type]
    assert len(attempts) == 3

    def broken() -> object:
        attempts.append(1)
        raise WarehouseError("disk on fire")

    attempts.clear()
    with pytest.raises(WarehouseError, match="disk on fire"):
        warehouse.open_when_unlocked(broken, 5, poll_secs=0)  # type: ignore[arg-type]
    assert len(attempts) == 1

    def always_locked() -> object:
        raise WarehouseLocked("held")

    with pytest.raises(WarehouseLocked):
        warehouse.open_when_unlocked(always_locked, 0, poll_secs=0)  # type: ignore[arg-type]


def test_a_second_writer_is_told_the_file_is_locked(tmp_path: object) -> None:
    import subprocess
    import sys

    from tagrelay.errors import WarehouseLocked

    path = f"{tmp_path}/w.duckdb"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, sys, time; c = duckdb.connect({path!r}); print('ok', flush=True); "
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        with pytest.raises(WarehouseLocked):
            warehouse.Warehouse.open("duckdb", path)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
