"""The pure schema planner: column names, flattening, type inference, lossless conversions,
misfits, collisions, limits and deduplication, with no database. Every test of ``plan``
runs twice: against the planner by shape (``shapes.plan``, what the warehouse uses) and the
row-by-row reference (``schema.plan_rows``)."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from tagrelay.warehouse.schema import (
    BASE_COLUMNS,
    MAX_IDENTIFIER_LENGTH,
    MISFIT,
    UNMAPPED_COLUMN,
    ColumnType,
    column_name,
    content_id,
    convert,
    flatten,
    infer_type,
    is_timestamp,
    plan_rows,
)
from tagrelay.warehouse.shapes import plan as plan_by_shape

plan = plan_by_shape


@pytest.fixture(autouse=True, params=["by_shape", "row_by_row"])
def _planner(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """``plan`` in this module is each planner in turn."""
    chosen = plan_by_shape if request.param == "by_shape" else plan_rows
    monkeypatch.setitem(globals(), "plan", chosen)


V, B, D, BO, TS, J = (
    ColumnType.VARCHAR,
    ColumnType.BIGINT,
    ColumnType.DOUBLE,
    ColumnType.BOOLEAN,
    ColumnType.TIMESTAMPTZ,
    ColumnType.JSON,
)


def names(event: dict[str, Any]) -> list[str]:
    return [name for name, _ in flatten(event)]


# -- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("anonymousId", "anonymous_id"),
        ("messageId", "message_id"),
        ("userAgent", "user_agent"),
        ("userID", "user_id"),
        ("HTTPReferrer", "http_referrer"),
        ("ABTest", "ab_test"),
        ("page2Path", "page2_path"),
        ("already_snake", "already_snake"),
        ("utm-source", "utm_source"),
        ("Order Completed", "order_completed"),
        ("$browser", "_browser"),
        ("a.b", "a_b"),
        ("ünïcode", "_n_code"),
        ("1st", "_1st"),
        ("2", "_2"),
        ("", "_"),
    ],
)
def test_a_top_level_key_becomes_a_snake_case_identifier(key: str, expected: str) -> None:
    assert column_name("", key) == expected


def test_a_nested_key_is_prefixed_and_keeps_a_leading_digit() -> None:
    assert column_name("properties", "1st") == "properties_1st"
    assert column_name("context_page", "path") == "context_page_path"


def test_nested_objects_flatten_with_underscores_in_key_order() -> None:
    event = {
        "messageId": "m1",
        "context": {
            "page": {"path": "/signup", "referrer": None},
            "clientIds": {"ga": "GA1.1.1.2", "fbp": "fb.1.2"},
            "userAgent": "UA",
        },
        "properties": {"tags": ["a", "b"], "empty": {}, "nested": {"deeper": {"x": 1}}},
    }
    assert flatten(event) == [
        ("message_id", "m1"),
        ("context_page_path", "/signup"),
        ("context_page_referrer", None),
        ("context_client_ids_ga", "GA1.1.1.2"),
        ("context_client_ids_fbp", "fb.1.2"),
        ("context_user_agent", "UA"),
        ("properties_tags", ["a", "b"]),
        ("properties_nested_deeper_x", 1),
    ]


def test_an_empty_object_produces_no_column() -> None:
    assert names({"properties": {}, "context": {"page": {}}}) == []


# -- types ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, BO),
        (False, BO),
        (0, B),
        (-(2**63), B),
        (2**63 - 1, B),
        (2**63, D),
        (-(2**63) - 1, D),
        (1.5, D),
        ("plain text", V),
        ("", V),
        ("2024-05-01T10:00:00Z", TS),
        ("2024-05-01T10:00:00.123Z", TS),
        ("2024-05-01T12:00:00.123456789+02:00", TS),
        ("2024-05-01T10:00:00-05:30", TS),
        ("2024-05-01T10:00:00", V),
        ("2024-05-01", V),
        ("2024-05-01 10:00:00Z", V),
        ("2024-05-01T10:00:00z", V),
        ("2024-02-30T00:00:00Z", V),
        ("2024-05-01T24:00:00Z", V),
        ("2024-05-01T10:00:60Z", V),
        ("2024-05-01T10:00:00+0200", V),
        ("0001-01-01T00:00:00Z", V),
        ("2024-05-01T10:00:00Z trailing", V),
        ([1, 2], J),
        ([], J),
        ([{"sku": "A"}], J),
        (10**400, V),
    ],
)
def test_a_new_column_takes_the_type_of_its_first_value(value: Any, expected: ColumnType) -> None:
    assert infer_type(value) == expected


@pytest.mark.parametrize("value", [None, math.nan, math.inf, -math.inf])
def test_null_and_non_finite_numbers_make_no_column(value: Any) -> None:
    assert infer_type(value) is None


def test_is_timestamp_accepts_leap_days_only_in_leap_years() -> None:
    assert is_timestamp("2024-02-29T00:00:00Z")
    assert not is_timestamp("2023-02-29T00:00:00Z")


@pytest.mark.parametrize(
    ("column_type", "value", "expected"),
    [
        (V, "text", "text"),
        (V, True, "true"),
        (V, False, "false"),
        (V, 42, "42"),
        (V, 1.5, "1.5"),
        (V, 2**70, str(2**70)),
        (V, [1], MISFIT),
        (B, 42, 42),
        (B, "abc", MISFIT),
        (B, "42", MISFIT),
        (B, 1.5, MISFIT),
        (B, 2.0, MISFIT),
        (B, True, MISFIT),
        (B, 2**63, MISFIT),
        (D, 1.25, 1.25),
        (D, 3, 3.0),
        (D, 2**53, float(2**53)),
        (D, -(2**53), -float(2**53)),
        (D, 2**53 + 1, MISFIT),
        (D, True, MISFIT),
        (D, "1.5", MISFIT),
        (BO, True, True),
        (BO, "true", MISFIT),
        (BO, 1, MISFIT),
        (TS, "2024-05-01T10:00:00Z", "2024-05-01T10:00:00Z"),
        (TS, "yesterday", MISFIT),
        (TS, 1_714_557_600, MISFIT),
        (J, "x", "x"),
        (J, 5, 5),
        (J, [1, {"a": 2}], [1, {"a": 2}]),
        ("INTEGER", 5, MISFIT),
        ("DATE", "2024-05-01", MISFIT),
    ],
)
def test_a_value_fits_an_existing_column_only_when_lossless(
    column_type: str, value: Any, expected: Any
) -> None:
    converted = convert(column_type, value)
    if expected is MISFIT:
        assert converted is MISFIT
    else:
        assert converted == expected
        assert type(converted) is type(expected)


# -- plan -------------------------------------------------------------------------------


def track(message_id: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Clicked",
        "messageId": message_id,
        "timestamp": "2024-05-01T10:00:00Z",
        "properties": properties,
    }


def test_new_keys_become_columns_in_order_of_first_appearance() -> None:
    result = plan(
        [track("m1", plan="pro"), track("m2", seats=3, plan="team", at="2024-05-01T10:00:00Z")],
        BASE_COLUMNS,
        1000,
    )
    assert list(result.new_columns.items()) == [
        ("properties_plan", V),
        ("properties_seats", B),
        ("properties_at", TS),
    ]
    assert [row["properties_plan"] for row in result.rows] == ["pro", "team"]
    assert "properties_seats" not in result.rows[0]


def test_existing_columns_are_not_added_again() -> None:
    existing = {**BASE_COLUMNS, "properties_plan": "VARCHAR"}
    result = plan([track("m1", plan="pro")], existing, 1000)
    assert result.new_columns == {}
    assert result.rows[0]["properties_plan"] == "pro"


def test_insert_columns_are_those_with_a_value_in_table_order() -> None:
    existing = {**BASE_COLUMNS, "properties_plan": "VARCHAR", "properties_unused": "BIGINT"}
    result = plan([track("m1", plan="pro", new=True)], existing, 1000)
    assert list(result.insert_columns) == [
        "message_id",
        "type",
        "event",
        "timestamp",
        "properties_plan",
        "properties_new",
    ]


def test_the_first_type_in_a_batch_wins_and_a_later_misfit_keeps_its_row() -> None:
    result = plan([track("m1", count=3), track("m2", count="three")], BASE_COLUMNS, 1000)
    assert result.new_columns["properties_count"] == B
    first, second = result.rows
    assert first["properties_count"] == 3
    assert "properties_count" not in second
    assert second[UNMAPPED_COLUMN] == {"properties_count": "three"}
    assert second["message_id"] == "m2"
    assert result.misfits == 1


def test_a_misfit_against_an_existing_column_goes_to_unmapped_data_by_column_name() -> None:
    existing = {**BASE_COLUMNS, "properties_count": "BIGINT", "properties_ok": "BOOLEAN"}
    result = plan([track("m1", count=1.5, ok="yes")], existing, 1000)
    assert result.rows[0][UNMAPPED_COLUMN] == {"properties_count": 1.5, "properties_ok": "yes"}
    assert result.misfits == 2
    assert result.new_columns == {}


# -- widening ---------------------------------------------------------------------------

CAN_WIDEN = frozenset({(B, D)})
"""What a dialect such as DuckDB declares it can change in place."""


def test_a_fraction_after_an_integer_in_one_batch_makes_the_new_column_double() -> None:
    result = plan(
        [track("m1", revenue=20), track("m2", revenue=19.99), track("m3", revenue=5)],
        BASE_COLUMNS,
        1000,
    )
    assert result.new_columns["properties_revenue"] == D
    assert result.widened_columns == {}
    values = [row["properties_revenue"] for row in result.rows]
    assert values == [20.0, 19.99, 5.0] and all(type(v) is float for v in values)
    assert result.misfits == 0 and all(UNMAPPED_COLUMN not in row for row in result.rows)


def test_a_fraction_widens_a_bigint_column_of_the_table_the_dialect_can_change() -> None:
    existing = {**BASE_COLUMNS, "properties_revenue": "BIGINT"}
    result = plan(
        [track("m1", revenue=7), track("m2", revenue=19.99)],
        existing,
        1000,
        widenings=CAN_WIDEN,
    )
    assert result.widened_columns == {"properties_revenue": D}
    assert result.insert_columns["properties_revenue"] == D
    assert [row["properties_revenue"] for row in result.rows] == [7.0, 19.99]
    assert result.misfits == 0


def test_without_the_dialects_widening_or_for_a_fixed_column_a_fraction_is_a_misfit() -> None:
    existing = {**BASE_COLUMNS, "properties_revenue": "BIGINT"}
    events = [track("m1", revenue=19.99)]
    for result in (
        plan(events, existing, 1000),
        plan(events, existing, 1000, widenings=CAN_WIDEN, fixed_columns={"properties_revenue"}),
    ):
        assert result.widened_columns == {}
        assert result.rows[0][UNMAPPED_COLUMN] == {"properties_revenue": 19.99}
        assert result.misfit_columns == {"properties_revenue": "number"}


def test_a_column_holding_an_int_beyond_2_53_does_not_widen() -> None:
    result = plan([track("m1", n=2**60), track("m2", n=1.5)], BASE_COLUMNS, 1000)
    assert result.new_columns["properties_n"] == B
    assert result.rows[0]["properties_n"] == 2**60
    assert result.rows[1][UNMAPPED_COLUMN] == {"properties_n": 1.5}


@pytest.mark.parametrize(
    ("column_type", "first", "then"),
    [
        (BO, True, 1),  # a boolean column never becomes a number
        (B, 1, True),  # nor a number column boolean
        (B, 1, "abc"),  # a number never becomes text
        (D, 1.5, "abc"),
        (D, 1.5, 2**53 + 1),  # an int DOUBLE cannot hold exactly
        (TS, "2024-05-01T10:00:00Z", "tomorrow"),
    ],
)
def test_no_other_change_is_made_and_the_value_is_a_misfit(
    column_type: ColumnType, first: Any, then: Any
) -> None:
    existing = {**BASE_COLUMNS, "properties_x": column_type.value}
    new = plan([track("m1", x=first), track("m2", x=then)], BASE_COLUMNS, 1000)
    old = plan([track("m2", x=then)], existing, 1000, widenings=CAN_WIDEN)
    assert new.new_columns["properties_x"] == column_type
    for result in (new, old):
        assert result.widened_columns == {}
        assert result.rows[-1][UNMAPPED_COLUMN] == {"properties_x": then}
        assert result.misfits == 1
        assert list(result.misfit_columns) == ["properties_x"]


def test_misfits_name_their_column_and_the_kind_of_the_first_value() -> None:
    existing = {**BASE_COLUMNS, "properties_revenue": "DOUBLE", "properties_ok": "BOOLEAN"}
    result = plan(
        [track("m1", revenue="abc", ok=[1]), track("m2", revenue=True)],
        existing,
        1000,
        widenings=CAN_WIDEN,
    )
    assert result.misfit_columns == {"properties_revenue": "string", "properties_ok": "array"}
    assert result.misfits == 3


def test_lossless_values_are_converted_for_their_column() -> None:
    existing = {**BASE_COLUMNS, "properties_price": "DOUBLE", "properties_label": "VARCHAR"}
    result = plan([track("m1", price=10, label=True)], existing, 1000)
    row = result.rows[0]
    assert row["properties_price"] == 10.0 and type(row["properties_price"]) is float
    assert row["properties_label"] == "true"
    assert UNMAPPED_COLUMN not in row


def test_a_well_known_time_that_is_not_iso_goes_to_unmapped_data() -> None:
    event = {"type": "page", "messageId": "m1", "timestamp": "yesterday", "sentAt": 1714557600}
    row = plan([event], BASE_COLUMNS, 1000).rows[0]
    assert "timestamp" not in row and "sent_at" not in row
    assert row[UNMAPPED_COLUMN] == {"timestamp": "yesterday", "sent_at": 1714557600}


def test_none_makes_no_column_and_no_value() -> None:
    result = plan([track("m1", coupon=None)], BASE_COLUMNS, 1000)
    assert "properties_coupon" not in result.new_columns
    assert "properties_coupon" not in result.rows[0]
    existing = {**BASE_COLUMNS, "properties_coupon": "VARCHAR"}
    assert "properties_coupon" not in plan([track("m1", coupon=None)], existing, 1000).rows[0]


def test_arrays_are_one_json_value() -> None:
    result = plan([track("m1", products=[{"sku": "A", "price": 1.5}])], BASE_COLUMNS, 1000)
    assert result.new_columns["properties_products"] == J
    assert result.rows[0]["properties_products"] == [{"sku": "A", "price": 1.5}]


def test_when_two_keys_map_to_one_name_the_first_wins_and_the_other_keeps_its_path() -> None:
    event = {
        "messageId": "m1",
        "context": {"page": {"path": "/signup"}, "page_path": "/other"},
        "context.page.path": "/third",
    }
    result = plan([event], BASE_COLUMNS, 1000)
    row = result.rows[0]
    assert row["context_page_path"] == "/signup"
    assert row[UNMAPPED_COLUMN] == {"context.page_path": "/other", "context.page.path": "/third"}
    assert result.collisions == 2


def test_a_key_named_like_the_unmapped_column_cannot_take_it_over() -> None:
    result = plan([{"messageId": "m1", "_unmapped_data": "mine"}], BASE_COLUMNS, 1000)
    assert result.rows[0][UNMAPPED_COLUMN] == {"_unmapped_data": "mine"}
    assert result.collisions == 1


def test_columns_past_max_columns_go_to_unmapped_data() -> None:
    limit = len(BASE_COLUMNS) + 2
    result = plan([track("m1", a=1, b=2, c=3), track("m2", c=4, a=5)], BASE_COLUMNS, limit)
    assert list(result.new_columns) == ["properties_a", "properties_b"]
    assert result.rows[0][UNMAPPED_COLUMN] == {"properties_c": 3}
    assert result.rows[1] == {
        "type": "track",
        "event": "Clicked",
        "message_id": "m2",
        "timestamp": "2024-05-01T10:00:00Z",
        "properties_a": 5,
        UNMAPPED_COLUMN: {"properties_c": 4},
    }
    assert result.over_limit == 2


def test_a_name_longer_than_the_identifier_limit_goes_to_unmapped_data() -> None:
    fits = "k" * (MAX_IDENTIFIER_LENGTH - len("properties_"))
    too_long = fits + "x"
    result = plan([track("m1", **{fits: 1, too_long: 2})], BASE_COLUMNS, 1000)
    assert list(result.new_columns) == [f"properties_{fits}"]
    assert result.rows[0][UNMAPPED_COLUMN] == {f"properties_{too_long}": 2}
    assert result.over_limit == 1


def test_a_batch_keeps_the_first_event_of_each_message_id() -> None:
    result = plan(
        [track("m1", v=1), track("m2", v=2), track("m1", v=3, extra="x")], BASE_COLUMNS, 1000
    )
    assert [(r["message_id"], r["properties_v"]) for r in result.rows] == [("m1", 1), ("m2", 2)]
    assert result.duplicates == 1
    assert "properties_extra" not in result.new_columns


def test_an_event_without_message_id_gets_a_stable_id_from_its_content() -> None:
    event = {"type": "track", "event": "Clicked", "properties": {"v": 1}}
    result = plan([event, copy.deepcopy(event), {**event, "event": "Other"}], BASE_COLUMNS, 1000)
    assert len(result.rows) == 2
    assert result.duplicates == 1
    assert result.generated_ids == 2
    assert result.rows[0]["message_id"] == content_id(event)
    assert result.rows[0]["message_id"].startswith("sha256:")


def test_a_numeric_message_id_is_kept_as_text() -> None:
    result = plan([{"messageId": 123, "type": "track"}], BASE_COLUMNS, 1000)
    assert result.rows[0]["message_id"] == "123"
    assert result.generated_ids == 0


def test_a_message_id_that_is_not_a_scalar_is_kept_in_unmapped_data() -> None:
    result = plan([{"messageId": ["a"], "type": "track"}], BASE_COLUMNS, 1000)
    row = result.rows[0]
    assert row["message_id"].startswith("sha256:")
    assert row[UNMAPPED_COLUMN] == {"message_id": ["a"]}


def test_non_finite_floats_are_nulls() -> None:
    existing = {**BASE_COLUMNS, "properties_x": "DOUBLE"}
    result = plan([track("m1", x=math.nan, y=math.inf)], existing, 1000)
    assert "properties_x" not in result.rows[0]
    assert "properties_y" not in result.new_columns
    assert result.misfits == 0


def test_unknown_existing_column_types_accept_nothing() -> None:
    existing = {**BASE_COLUMNS, "properties_n": "INTEGER"}
    result = plan([track("m1", n=5)], existing, 1000)
    assert result.rows[0][UNMAPPED_COLUMN] == {"properties_n": 5}
    assert "properties_n" not in result.insert_columns


def test_planning_is_deterministic_and_leaves_the_events_alone() -> None:
    events = [track("m1", a=1, b=[1]), track("m2", a="x"), {"type": "page"}]
    before = copy.deepcopy(events)
    assert plan(events, BASE_COLUMNS, 1000) == plan(events, BASE_COLUMNS, 1000)
    assert events == before
