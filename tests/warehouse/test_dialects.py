"""The warehouse on every dialect (DuckDB files and PostgreSQL schemas, see
``tests.warehouse.targets``): the base columns and the seed query, schema evolution,
misfits kept in ``_unmapped_data``, deduplication, limits, reopening, tables the relay did
not make, row caps, timeouts, closing, and a query running in another thread while batches
load. What only one engine has (file locks, DuckDB's statement kinds, PostgreSQL's
replicas) is in ``test_duckdb_warehouse`` and ``test_postgres_warehouse``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from tagrelay.errors import QueryTimeout, WarehouseError
from tagrelay.warehouse import DIALECTS, Warehouse
from tagrelay.warehouse.schema import BASE_COLUMNS
from tests.warehouse.targets import Target, make_target

SEED_QUERY = (
    "select * from events where context_page_path = '/signup' "
    "and timestamp > now() - interval '1 day'"
)
NOW = datetime.now(UTC)

NATIVE = {
    "duckdb": {
        "VARCHAR": "VARCHAR",
        "BIGINT": "BIGINT",
        "DOUBLE": "DOUBLE",
        "BOOLEAN": "BOOLEAN",
        "TIMESTAMPTZ": "TIMESTAMP WITH TIME ZONE",
        "JSON": "JSON",
    },
    "postgres": {
        "VARCHAR": "text",
        "BIGINT": "bigint",
        "DOUBLE": "double precision",
        "BOOLEAN": "boolean",
        "TIMESTAMPTZ": "timestamp with time zone",
        "JSON": "jsonb",
    },
}
"""Logical type -> the engine's catalog name."""


def test_every_dialect_is_tested_with_its_native_type_names() -> None:
    assert sorted(NATIVE) == sorted(DIALECTS)


@pytest.fixture(params=sorted(DIALECTS))
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    yield from make_target(request.param, tmp_path)


@pytest.fixture
def warehouse(target: Target) -> Warehouse:
    return target.open()


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


def rows(wh: Warehouse, sql: str) -> list[tuple[Any, ...]]:
    return wh.query(sql).rows


def json_of(text: str | None) -> Any:
    """A JSON column's value as it comes back (text; spacing differs by engine)."""
    return None if text is None else orjson.loads(text)


# -- the table and the seed query --------------------------------------------------------


def test_a_new_table_has_the_base_columns(target: Target, warehouse: Warehouse) -> None:
    assert dict(warehouse.columns) == dict(BASE_COLUMNS)
    native = target.native_types(warehouse)
    names = NATIVE[target.dialect]
    assert list(native)[:3] == ["message_id", "type", "event"]
    assert native == {name: names[kind] for name, kind in BASE_COLUMNS.items()}


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


# -- loading -----------------------------------------------------------------------------


def test_a_new_key_adds_a_column_and_older_rows_read_null(
    target: Target, warehouse: Warehouse
) -> None:
    warehouse.insert([page("m1", "/a", NOW)])
    result = warehouse.insert([page("m2", "/b", NOW, plan="pro", seats=3)])

    assert result.new_columns == {"properties_plan": "VARCHAR", "properties_seats": "BIGINT"}
    assert rows(
        warehouse, "select message_id, properties_plan, properties_seats from events order by 1"
    ) == [("m1", None, None), ("m2", "pro", 3)]
    native = target.native_types(warehouse)
    assert native["properties_plan"] == NATIVE[target.dialect]["VARCHAR"]
    assert native["properties_seats"] == NATIVE[target.dialect]["BIGINT"]


def test_every_inferred_type_round_trips(target: Target, warehouse: Warehouse) -> None:
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
    ((flag, count, huge, price, label, at, tags),) = rows(
        warehouse,
        "select properties_flag, properties_count, properties_huge, properties_price, "
        "properties_label, properties_at, properties_tags from events",
    )
    assert (flag, count, huge, price, label) == (True, 2**62, float(2**64), 19.99, "x")
    assert at == datetime(2024, 5, 1, 10, 0, 0, 250_000, tzinfo=UTC)
    assert isinstance(tags, str) and json_of(tags) == ["a", {"b": 1}]
    native = target.native_types(warehouse)
    names = NATIVE[target.dialect]
    assert [
        native[f"properties_{k}"] for k in ("flag", "count", "huge", "price", "at", "tags")
    ] == [names[kind] for kind in ("BOOLEAN", "BIGINT", "DOUBLE", "DOUBLE", "TIMESTAMPTZ", "JSON")]


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
    got = rows(
        warehouse,
        "select message_id, properties_price, properties_label, properties_payload, "
        "_unmapped_data from events order by 1",
    )
    assert [(m, p, lbl, json_of(pl), json_of(u)) for m, p, lbl, pl, u in got] == [
        ("m1", 1.5, "text", [1], None),
        ("m2", 3.0, "true", "scalar", None),
        ("m3", None, "2.5", None, {"properties_price": 9007199254740993}),
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


def test_columns_past_max_columns_and_long_names_go_to_unmapped_data(target: Target) -> None:
    limit = len(BASE_COLUMNS) + 2
    long_key = "k" * 60
    wh = target.open(max_columns=limit)
    result = wh.insert([page("m1", "/a", NOW, a=1, b=2, c=3, **{long_key: 4})])
    assert len(wh.columns) == limit
    assert list(result.new_columns) == ["properties_a", "properties_b"]
    assert result.unmapped_values == 2
    (unmapped,) = rows(wh, "select _unmapped_data from events")[0]
    assert json_of(unmapped) == {"properties_c": 3, f"properties_{long_key}": 4}
    assert len(target.native_types(wh)) == limit


def test_events_that_are_not_plain_json_still_load(warehouse: Warehouse) -> None:
    """Lone surrogates and over-long integers cannot go through the fast JSON encoder."""
    result = warehouse.insert([page("m1", "/a\ud800", NOW, big=[2**70], nested={"x": 1})])
    assert result.inserted == 1
    ((path, big),) = rows(warehouse, "select context_page_path, properties_big from events")
    assert (path, json_of(big)) == ("/a\ufffd", [str(2**70)])


def test_text_with_backslashes_quotes_tabs_and_newlines_is_kept_exactly(
    warehouse: Warehouse,
) -> None:
    tricky = 'C:\\path\\to "quoted"\ttab\nnew line \\u0000 not a NUL \\\\ end'
    warehouse.insert([page("m1", "/a", NOW, text=tricky, emoji="caf\u00e9 \U0001f600")])
    assert rows(warehouse, "select properties_text, properties_emoji from events") == [
        (tricky, "caf\u00e9 \U0001f600")
    ]


# -- reopening and tables the relay did not make ----------------------------------------


def test_reopening_keeps_the_schema_and_its_types(target: Target) -> None:
    wh = target.open()
    wh.insert([page("m1", "/a", NOW, count=1, at="2024-05-01T10:00:00Z", tags=[1])])
    before = dict(wh.columns)
    wh.close()

    wh = target.open()
    assert dict(wh.columns) == before
    assert before["properties_count"] == "BIGINT"
    assert before["properties_at"] == "TIMESTAMPTZ"
    assert before["properties_tags"] == "JSON"
    result = wh.insert([page("m2", "/a", NOW, count="many"), page("m1", "/a", NOW)])
    assert (result.inserted, result.duplicates, result.new_columns) == (1, 1, {})
    assert rows(
        wh, "select message_id, _unmapped_data->>'properties_count' from events order by 1"
    ) == [("m1", None), ("m2", "many")]


def test_a_foreign_table_of_the_same_name_is_refused(target: Target) -> None:
    target.execute("create table events (id integer)")
    with pytest.raises(WarehouseError, match="not created by tagrelay"):
        target.open()


def test_a_table_missing_base_columns_gets_them_at_open(target: Target) -> None:
    """A table made by an earlier version, with fewer base columns, still runs the seed
    query once reopened, and keeps its rows."""
    json_type = NATIVE[target.dialect]["JSON"]
    target.execute(
        'create table events (message_id varchar primary key, "timestamp" timestamptz, '
        f"_unmapped_data {json_type}, properties_plan varchar)"
    )
    target.execute("insert into events (message_id, properties_plan) values ('m0', 'pro')")
    wh = target.open()
    assert set(BASE_COLUMNS) <= set(wh.columns)
    assert list(wh.columns)[:4] == ["message_id", "timestamp", "_unmapped_data", "properties_plan"]
    assert wh.query(SEED_QUERY).rows == []
    assert rows(wh, "select message_id, properties_plan, type from events") == [("m0", "pro", None)]


# -- queries -----------------------------------------------------------------------------


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


def test_a_query_past_its_timeout_is_stopped(target: Target, warehouse: Warehouse) -> None:
    with pytest.raises(QueryTimeout, match=r"ran longer than 0\.2 s and was stopped"):
        warehouse.query(target.slow_query(), timeout_secs=0.2)
    assert warehouse.query("select 42").rows == [(42,)]


def test_close_interrupts_the_queries_still_running(target: Target) -> None:
    warehouse = target.open()
    failures: list[BaseException] = []

    def endless() -> None:
        try:
            warehouse.query(target.slow_query(), timeout_secs=None)
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
    target: Target, warehouse: Warehouse
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
    assert len(warehouse.columns) == len(target.native_types(warehouse))


# -- retention and hashed personal data (the warehouse forwarder's retention_days, hash_pii)


def test_expire_deletes_rows_received_before_the_cutoff(warehouse: Warehouse) -> None:
    old = page("old", "/a", NOW - timedelta(days=40))
    untimed = {
        "type": "track",
        "event": "X",
        "messageId": "untimed",
        "timestamp": iso(NOW - timedelta(days=41)),
    }
    recent = page("recent", "/b", NOW - timedelta(days=2))
    warehouse.insert([old, untimed, recent])
    assert warehouse.expire(iso(NOW - timedelta(days=30))) == 2
    assert rows(warehouse, "select message_id from events") == [("recent",)]
    assert warehouse.expire(iso(NOW - timedelta(days=30))) == 0


def test_hashed_emails_and_phones_join(target: Target) -> None:
    import hashlib
    import hmac

    warehouse = target.open(hash_pii_salt=b"sixteen-or-more-bytes")
    person = {"traits": {"email": "Ann@Example.com", "phone": "+44 20 7946 0000"}}
    warehouse.insert(
        [
            {"type": "identify", "messageId": "1", **person},
            {
                "type": "track",
                "event": "Buy",
                "messageId": "2",
                "properties": {"email": " ann@example.com"},
            },
        ]
    )
    expected = hmac.new(b"sixteen-or-more-bytes", b"ann@example.com", hashlib.sha256).hexdigest()
    assert rows(
        warehouse,
        "select a.traits_email, a.traits_phone from events a join events b "
        "on a.traits_email = b.properties_email",
    ) == [
        (expected, hmac.new(b"sixteen-or-more-bytes", b"442079460000", hashlib.sha256).hexdigest())
    ]
