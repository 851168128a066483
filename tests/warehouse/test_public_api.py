"""``tagrelay.warehouse`` exports exactly its documented names."""

from __future__ import annotations

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
    ]
    for name in warehouse.__all__:
        assert getattr(warehouse, name) is not None


def test_duckdb_is_a_registered_dialect() -> None:
    assert list(warehouse.DIALECTS) == ["duckdb"]


def test_an_unknown_dialect_or_table_name_is_refused() -> None:
    with pytest.raises(WarehouseError, match="unknown warehouse dialect 'oracle'"):
        warehouse.Warehouse.open("oracle", "x")
    with pytest.raises(WarehouseError, match="invalid table name"):
        warehouse.Warehouse.open("duckdb", ":memory:", table="Events; drop")
