"""Schema evolution against a real database, written once for every dialect (each entry
of ``DIALECTS`` needs a way to open a fresh database in ``tests.warehouse.targets``): a
column widens from BIGINT to DOUBLE in place when a fraction arrives and keeps its rows;
what still does not fit goes to ``_unmapped_data``, reported by column; a widening that
would change a stored value is refused."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tagrelay.warehouse import DIALECTS, Warehouse
from tagrelay.warehouse.schema import UNMAPPED_COLUMN
from tests.warehouse.targets import TARGETS, Target, make_target


def test_every_dialect_runs_these_tests() -> None:
    assert sorted(TARGETS) == sorted(DIALECTS)


@pytest.fixture(params=sorted(DIALECTS))
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    yield from make_target(request.param, tmp_path)


@pytest.fixture
def open_warehouse(target: Target) -> Callable[[], Warehouse]:
    return target.open


@pytest.fixture
def warehouse(open_warehouse: Callable[[], Warehouse]) -> Warehouse:
    return open_warehouse()


def track(message_id: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "messageId": message_id,
        "properties": properties,
    }


def one(warehouse: Warehouse, sql: str) -> Any:
    return warehouse.query(sql).rows[0][0]


def unmapped(warehouse: Warehouse) -> dict[str, Any]:
    rows = warehouse.query(f"select message_id, {UNMAPPED_COLUMN} from events order by 1").rows
    return {message_id: orjson.loads(data) for message_id, data in rows if data is not None}


def test_a_fraction_after_an_integer_widens_the_column_in_place(warehouse: Warehouse) -> None:
    first = warehouse.insert([track("m1", revenue=20)])
    assert first.new_columns == {"properties_revenue": "BIGINT"}

    second = warehouse.insert([track("m2", revenue=19.99)])
    third = warehouse.insert([track("m3", revenue=5)])

    assert second.widened_columns == {"properties_revenue": "DOUBLE"}
    assert third.widened_columns == {}
    assert warehouse.columns["properties_revenue"] == "DOUBLE"
    assert round(one(warehouse, "select sum(properties_revenue) from events"), 6) == 44.99
    assert one(warehouse, "select properties_revenue from events where message_id = 'm1'") == 20
    assert unmapped(warehouse) == {}
    assert second.unmapped_values == third.unmapped_values == 0


def test_the_widened_type_is_what_the_table_has_once_reopened(
    open_warehouse: Callable[[], Warehouse],
) -> None:
    warehouse = open_warehouse()
    warehouse.insert([track("m1", revenue=20)])
    warehouse.insert([track("m2", revenue=0.5)])
    warehouse.close()

    again = open_warehouse()

    assert again.columns["properties_revenue"] == "DOUBLE"
    assert again.insert([track("m3", revenue=1.25)]).widened_columns == {}
    assert one(again, "select sum(properties_revenue) from events") == 21.75


def test_a_batch_with_an_integer_then_a_fraction_creates_a_double_column(
    warehouse: Warehouse,
) -> None:
    result = warehouse.insert([track("m1", revenue=20), track("m2", revenue=19.99)])

    assert result.new_columns["properties_revenue"] == "DOUBLE"
    assert round(one(warehouse, "select sum(properties_revenue) from events"), 6) == 39.99
    assert unmapped(warehouse) == {}


def test_a_string_in_a_double_column_is_kept_in_unmapped_data_and_reported(
    warehouse: Warehouse,
) -> None:
    warehouse.insert([track("m1", revenue=19.99)])

    result = warehouse.insert([track(f"s{i}", revenue="abc") for i in range(3)])

    assert result.unmapped_values == 3
    assert result.unmapped_reasons == {"type_mismatch": 3}
    assert result.misfit_columns == {"properties_revenue": "string"}
    assert result.widened_columns == {}
    assert warehouse.columns["properties_revenue"] == "DOUBLE"
    assert unmapped(warehouse) == {f"s{i}": {"properties_revenue": "abc"} for i in range(3)}


def test_a_column_holding_an_int_a_double_cannot_hold_stays_bigint(
    warehouse: Warehouse,
) -> None:
    big = 2**53 + 1
    warehouse.insert([track("m1", n=big)])

    refused = warehouse.insert([track("m2", n=0.5)])
    again = warehouse.insert([track("m3", n=1.5)])

    assert refused.widened_columns == again.widened_columns == {}
    assert warehouse.columns["properties_n"] == "BIGINT"
    assert one(warehouse, "select properties_n from events where message_id = 'm1'") == big
    assert unmapped(warehouse) == {"m2": {"properties_n": 0.5}, "m3": {"properties_n": 1.5}}
    assert refused.misfit_columns == {"properties_n": "number"}


def test_a_boolean_column_never_becomes_a_number(warehouse: Warehouse) -> None:
    warehouse.insert([track("m1", paid=True)])

    result = warehouse.insert([track("m2", paid=1), track("m3", paid=0.5)])

    assert result.widened_columns == {}
    assert warehouse.columns["properties_paid"] == "BOOLEAN"
    assert unmapped(warehouse) == {"m2": {"properties_paid": 1}, "m3": {"properties_paid": 0.5}}
