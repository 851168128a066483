"""The planner by shape (``shapes.plan``) against the row-by-row reference
(``schema.plan_rows``): the same plan for every batch, generated ones included, and the fast
path really taken where it should be."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from tagrelay.warehouse import shapes
from tagrelay.warehouse.schema import BASE_COLUMNS, WIDENINGS, Plan, plan_rows
from tagrelay.warehouse.shapes import plan
from tests.warehouse.test_schema import BO, TS, B, D, J, V

TABLE: dict[str, str] = {
    **BASE_COLUMNS,
    "properties_revenue": D,
    "properties_quantity": B,
    "properties_flag": BO,
    "properties_when": TS,
    "properties_tags": J,
    "properties_label": V,
    "properties_legacy": "INTEGER",  # a type the planner does not manage: accepts nothing
    "context_page_width": B,
}
DUCKDB_WIDENINGS = frozenset({(B, D)})


def typed(row: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """A row with each value's type beside it: 1 and 1.0 must not compare equal here."""
    return {name: (type(value).__name__, value) for name, value in row.items()}


def assert_same(fast: Plan, reference: Plan) -> None:
    assert list(fast.new_columns.items()) == list(reference.new_columns.items())
    assert fast.widened_columns == reference.widened_columns
    assert list(fast.insert_columns.items()) == list(reference.insert_columns.items())
    assert fast.row_count == reference.row_count
    assert [typed(row) for row in fast.rows] == [typed(row) for row in reference.rows]
    assert (fast.duplicates, fast.misfits, fast.collisions, fast.over_limit) == (
        reference.duplicates,
        reference.misfits,
        reference.collisions,
        reference.over_limit,
    )
    assert fast.generated_ids == reference.generated_ids
    assert fast.misfit_columns == reference.misfit_columns
    assert all(len(values) == fast.row_count for values in fast.columns.values())


def both(
    events: Sequence[dict[str, Any]],
    columns: Mapping[str, str] = TABLE,
    max_columns: int = 1000,
    **options: Any,
) -> Plan:
    fast = plan(events, columns, max_columns, **options)
    assert_same(fast, plan_rows(events, columns, max_columns, **options))
    return fast


@pytest.fixture
def slow_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many events each call of ``plan_rows`` from ``shapes.plan`` was given."""
    calls: list[int] = []

    def counting(events: Sequence[Any], *args: Any, **kwargs: Any) -> Plan:
        calls.append(len(events))
        return plan_rows(events, *args, **kwargs)

    monkeypatch.setattr(shapes, "plan_rows", counting)
    return calls


def page(i: int, **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "messageId": f"m{i}",
        "anonymousId": f"a{i % 7}",
        "userId": f"u{i}" if i % 3 else None,
        "timestamp": f"2024-05-{1 + i % 28:02d}T10:00:00.{i % 1000:03d}Z",
        "context": {
            "page": {"path": f"/p{i % 5}", "width": 1000 + i},
            "campaign": {"source": "news"} if i % 2 else {},
        },
        "properties": properties,
    }


# -- the fast path is taken, and gives the reference's plan -------------------------------


def test_events_of_known_shapes_never_reach_the_row_by_row_planner(
    slow_calls: list[int],
) -> None:
    events = [page(i, revenue=i + 0.5, quantity=i, flag=i % 2 == 0, tags=[i]) for i in range(50)]
    result = both(events)
    assert slow_calls == [] and result.row_count == 50
    assert result.columns["properties_quantity"][3] == 3
    assert list(result.columns["context_campaign_source"][:2]) == [None, "news"]


def test_only_the_shapes_that_need_it_go_row_by_row_and_batch_order_is_kept(
    slow_calls: list[int],
) -> None:
    events = [page(i, quantity=i) for i in range(30)]
    events[7]["properties"]["brand_new"] = "x"  # a new column
    events[19]["properties"]["quantity"] = "many"  # a misfit
    result = both(events)
    assert slow_calls == [2]
    assert result.new_columns == {"properties_brand_new": V}
    assert list(result.columns["message_id"]) == [f"m{i}" for i in range(30)]


@pytest.mark.parametrize(
    ("column", "values"),
    [
        ("revenue", [1, 2.5, None, 3]),  # ints into DOUBLE, converted
        ("revenue", [2**53, -(2**53)]),
        ("revenue", [2**53 + 1]),  # not exact as a double: a misfit
        ("revenue", [math.nan, 1.0, math.inf]),  # non-finite: NULL
        ("quantity", [2**63 - 1, -(2**63)]),
        ("quantity", [2**63]),  # beyond BIGINT
        ("quantity", [1, 2.5]),  # a fraction into the table's BIGINT: widened
        ("quantity", [True, 1]),  # a boolean is no number
        ("flag", [True, None, False]),
        ("flag", [1]),
        ("label", [1, 2.5, True, "x", None]),  # scalars into VARCHAR, as text
        ("label", [[1]]),  # an array into VARCHAR: a misfit
        ("tags", [[1], "x", 3, {"a": 1}, None, math.nan]),  # anything into JSON
        ("when", ["2024-05-01T10:00:00Z", "2024-05-01T12:00:00.123456789+02:00"]),
        ("when", ["2024-02-29T00:00:00Z", "2023-02-28T23:59:59Z"]),  # leap day, real
        ("when", ["2023-02-29T00:00:00Z"]),  # no such day
        ("when", ["2024-04-31T00:00:00Z", "2024-06-30T00:00:00Z"]),
        ("when", ["0001-01-01T00:00:00Z", "9999-01-01T00:00:00Z", "0002-01-01T00:00:00Z"]),
        ("when", ["\u0662\u0660\u0662\u0664-05-01T10:00:00Z"]),  # digits, but not ASCII
        ("when", ["2024-05-01T10:00:00Z\n2024-05-01T10:00:00Z", "2024-05-01T10:00:00Z"]),
        ("when", ["2024-05-01 10:00:00Z", "2024-05-01T10:00:00"]),
        ("legacy", [1]),  # a column type the planner does not manage
    ],
)
def test_values_checked_by_column_match_the_reference(column: str, values: list[Any]) -> None:
    events = [page(i, **{column: value}) for i, value in enumerate(values)]
    events += [page(100 + i, **{column: values[0]}) for i in range(3)]
    both(events, widenings=DUCKDB_WIDENINGS)
    both(events, widenings=DUCKDB_WIDENINGS, fixed_columns={f"properties_{column}"})
    both(events)


def test_an_object_where_the_shape_had_a_value_and_the_reverse(slow_calls: list[int]) -> None:
    events = [page(i, label="x") for i in range(6)]
    events[2]["context"]["page"] = "/flat"  # an object became a string
    events[4]["properties"]["label"] = {"nested": "y"}  # a value became an object
    both(events)
    assert sum(slow_calls) >= 2


def test_ids_duplicates_and_generated_ids_match_the_reference() -> None:
    events = [page(i) for i in range(12)]
    events[3]["messageId"] = "m1"  # a duplicate of an earlier event
    events[4]["messageId"] = ""  # generated
    events[5]["messageId"] = None  # generated
    events[6]["messageId"] = 42  # kept as text
    events[7]["messageId"] = ["x"]  # a misfit: generated, and kept in _unmapped_data
    events[8]["messageId"] = 1.5
    events[9]["messageId"] = math.nan
    del events[10]["messageId"]
    events.append(dict(events[10]))  # the same content again: the same generated id
    events[11]["message_id"] = "again"  # two keys for one column: a collision
    result = both(events)
    assert result.duplicates == 2


def test_collisions_long_names_and_the_unmapped_column_match_the_reference() -> None:
    events = [page(i, label="x") for i in range(4)]
    events[0]["properties"]["Label"] = "y"  # the same column name twice
    events[1]["properties"]["x" * 70] = 1  # a name longer than the limit
    events[2]["_unmapped_data"] = {"sneaky": 1}
    events[3]["message"] = {"id": "nested"}  # flattens to message_id
    both(events)
    both(events, max_columns=len(TABLE))  # no room for a new column


def test_keys_always_null_make_no_column_while_they_stay_null(slow_calls: list[int]) -> None:
    events = [page(i, coupon=None) for i in range(5)]
    assert "properties_coupon" not in both(events).insert_columns
    assert slow_calls == []
    events[3]["properties"]["coupon"] = "SPRING"
    assert both(events).new_columns == {"properties_coupon": V}


def test_a_widening_plans_the_whole_batch_row_by_row(slow_calls: list[int]) -> None:
    events = [page(i, quantity=i) for i in range(5)] + [page(9, quantity=2.5)]
    result = both(events, widenings=DUCKDB_WIDENINGS)
    assert result.widened_columns == {"properties_quantity": D}
    assert slow_calls == [1, 6]


def test_plans_follow_the_columns_of_the_table_between_batches() -> None:
    events = [page(i, brand_new=i) for i in range(4)]
    first = both(events, BASE_COLUMNS)
    grown = {**BASE_COLUMNS, **first.new_columns}
    both(events, grown)  # the same shape, now with its columns
    both([page(i + 10, brand_new=0.5) for i in range(2)], grown, widenings=DUCKDB_WIDENINGS)
    narrowed = dict(grown, properties_brand_new=V)
    both(events, narrowed)


# -- generated batches ------------------------------------------------------------------

SCALARS: list[Any] = [
    None,
    "",
    "text",
    "2024-05-01T10:00:00Z",
    "2024-02-29T10:00:00+01:00",
    "2023-02-29T10:00:00Z",
    0,
    7,
    -3,
    2**53 + 1,
    2**63,
    1.25,
    math.inf,
    True,
    False,
    [1, "a"],
    [],
    {},
    {"deep": 1},
]
KEYS = ["revenue", "quantity", "flag", "when", "tags", "label", "legacy", "extra", "Extra"]


def generated_event(rng: random.Random, i: int) -> dict[str, Any]:
    """A page() event with a few properties, sometimes of the usual type for their column,
    sometimes anything; now and then an odd id or structure."""
    usual: dict[str, Callable[[], Any]] = {
        "revenue": lambda: rng.choice([rng.random() * 100, rng.randrange(100)]),
        "quantity": lambda: rng.randrange(-5, 5),
        "flag": lambda: rng.random() < 0.5,
        "when": lambda: f"2024-0{rng.randrange(1, 10)}-{rng.randrange(1, 32):02d}T01:02:03Z",
        "tags": lambda: [rng.randrange(3)],
        "label": lambda: f"l{rng.randrange(3)}",
        "legacy": lambda: None,
        "extra": lambda: rng.choice(["e", None]),
        "Extra": lambda: None,
    }
    chosen = rng.sample(KEYS, rng.randrange(0, 4))
    properties = {
        key: rng.choice(SCALARS) if rng.random() < 0.1 else usual[key]() for key in chosen
    }
    event = page(rng.randrange(i + 1) if rng.random() < 0.1 else i, **properties)
    roll = rng.random()
    if roll < 0.03:
        event["messageId"] = rng.choice(SCALARS)
    elif roll < 0.05:
        event["context"]["page"] = rng.choice(SCALARS)
    elif roll < 0.07:
        event["context"]["page"]["width"] = rng.choice(SCALARS)
    return event


@pytest.mark.parametrize("seed", range(40))
def test_generated_batches_get_the_reference_plan(seed: int) -> None:
    rng = random.Random(seed)
    columns: dict[str, str] = dict(TABLE) if seed % 2 else dict(BASE_COLUMNS)
    widenings = DUCKDB_WIDENINGS if seed % 3 else frozenset()
    for batch in range(4):
        events = [generated_event(rng, batch * 100 + i) for i in range(rng.randrange(1, 60))]
        result = both(events, columns, 60, widenings=widenings)
        columns.update(result.new_columns)
        columns.update(result.widened_columns)
    assert WIDENINGS  # the rules the generated batches exercise
