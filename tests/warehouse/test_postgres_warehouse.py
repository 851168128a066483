"""What only the PostgreSQL warehouse has: several replicas loading into one table at
once, a connection the server drops, the NUL character PostgreSQL refuses, which statements
``query`` lets through, connection strings kept out of messages, and the relay itself
(``tagrelay serve`` and ``tagrelay sql``) on a PostgreSQL warehouse."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tagrelay.errors import QueryRejected, WarehouseError
from tagrelay.warehouse import Warehouse
from tagrelay.warehouse.schema import BASE_COLUMNS
from tests.cli.test_serve_e2e import TAGRELAY, Relay, relays
from tests.postgres import fresh_schema, postgres_dsn
from tests.warehouse.targets import Target, make_target
from tests.warehouse.test_dialects import NOW, SEED_QUERY, page, rows

__all__ = ["relays"]  # the fixture, for the end-to-end test


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    yield from make_target("postgres", tmp_path)


@pytest.fixture
def warehouse(target: Target) -> Warehouse:
    return target.open()


def test_replicas_loading_at_once_make_each_row_once_and_agree_on_the_columns(
    target: Target,
) -> None:
    """Three writers (replicas) on one table, each adding the same new columns in the same
    moments and resending part of each other's events: every message id once, no failure
    that a retry would not mend, and one shape of the table for all."""
    writers = [target.open() for _ in range(3)]
    errors: list[BaseException] = []
    retries = [0]
    start = threading.Barrier(len(writers))

    def load(index: int, wh: Warehouse) -> None:
        start.wait()
        for b in range(20):
            # batch b adds column key_b on every replica; ids overlap across replicas
            batch = [
                page(f"b{b}-e{i}", "/signup", NOW, **{f"key_{b}": i, "replica": index})
                for i in range(index * 10, index * 10 + 30)
            ]
            for attempt in range(5):
                try:
                    wh.insert(batch)
                    break
                except WarehouseError:
                    retries[0] += 1  # the runtime retries a failed batch as a whole
                    if attempt == 4:
                        raise
            else:  # pragma: no cover
                raise AssertionError("unreachable")

    def run(index: int, wh: Warehouse) -> None:
        try:
            load(index, wh)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, wh)) for i, wh in enumerate(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert not errors, errors
    # ids b{b}-e0 .. b{b}-e49: 50 distinct per batch number
    assert rows(writers[0], "select count(*), count(distinct message_id) from events") == [
        (20 * 50, 20 * 50)
    ]
    fresh = target.open()
    assert {f"properties_key_{b}" for b in range(20)} <= set(fresh.columns)
    assert fresh.columns["properties_key_3"] == "BIGINT"
    assert rows(fresh, "select count(*) from events where properties_key_7 is not null") == [(50,)]


def test_a_connection_the_server_dropped_fails_one_batch_and_the_retry_loads(
    target: Target, warehouse: Warehouse
) -> None:
    warehouse.insert([page("m1", "/a", NOW)])
    with psycopg.connect(target.target, autocommit=True) as admin:
        admin.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity "
            "where application_name = 'tagrelay' and pid <> pg_backend_pid()"
        )
    batch = [page("m2", "/a", NOW), page("m3", "/a", NOW, fresh=1)]
    for _ in range(2):  # the first attempt may find the connection gone
        try:
            result = warehouse.insert(batch)
            break
        except WarehouseError as e:
            assert "m2" not in str(e)
    assert result.inserted == 2
    assert rows(warehouse, "select count(*) from events") == [(3,)]


def test_the_nul_character_becomes_the_replacement_character(warehouse: Warehouse) -> None:
    result = warehouse.insert([page("m1", "/a\x00b", NOW, note="x\x00y", tags=["\x00"])])
    assert result.inserted == 1
    ((path, note, tags),) = rows(
        warehouse, "select context_page_path, properties_note, properties_tags from events"
    )
    assert (path, note, tags) == ("/a\ufffdb", "x\ufffdy", '["\ufffd"]')


@pytest.mark.parametrize(
    "sql",
    [
        "select count(*) from events",
        "SELECT 1",
        "with x as (select 1 as n) select n from x",
        "values (1), (2)",
        "table events",
        "(select 1)",
        "explain select * from events",
        "explain analyze select * from events",
        "show server_version",
        "-- a comment first\nselect 1",
        "/* a comment */ select 1",
        "select 1;",
        "select * from events where message_id like '%1%'",
    ],
)
def test_read_only_statements_run(warehouse: Warehouse, sql: str) -> None:
    warehouse.insert([page("m1", "/a", NOW)])
    assert warehouse.query(sql).columns


@pytest.mark.parametrize(
    "sql",
    [
        "delete from events",
        "insert into events (message_id) values ('x')",
        "update events set type = 'x'",
        "drop table events",
        "create table t as select * from events",
        "select * into t2 from events",
        "alter table events add column x int",
        "truncate events",
        "copy events to '/tmp/out.csv'",
        "copy (select 1) to program 'touch /tmp/tagrelay-pwned'",
        "set statement_timeout = 0",
        "vacuum",
        "begin",
        "grant all on events to public",
        "with x as (delete from events returning 1) select * from x",
        "explain analyze delete from events",
        "select 1; delete from events",
        "select 1; select 2",
        "prepare p as delete from events",
        "do $$ begin delete from events; end $$",
        "select nextval('no_such_sequence')",
        "lock table events",
    ],
)
def test_statements_that_could_write_are_rejected(
    target: Target, warehouse: Warehouse, sql: str
) -> None:
    warehouse.insert([page("m1", "/a", NOW)])
    with pytest.raises(WarehouseError):
        warehouse.query(sql)
    assert rows(warehouse, "select count(*), min(type) from events") == [(1, "page")]
    assert rows(
        warehouse,
        "select count(*) from information_schema.tables "
        f"where table_schema = '{target.settings['schema']}'",
    ) == [(1,)]
    assert not Path("/tmp/tagrelay-pwned").exists()


def test_a_rejection_says_what_is_allowed(warehouse: Warehouse) -> None:
    with pytest.raises(QueryRejected, match=r"read-only queries.*SELECT.*got a DELETE"):
        warehouse.query("delete from events")
    with pytest.raises(QueryRejected, match="exactly one statement"):
        warehouse.query("select 1; drop table events")
    with pytest.raises(QueryRejected, match="read-only"):
        warehouse.query("with x as (delete from events returning 1) select * from x")


def test_queries_find_the_table_in_its_schema(warehouse: Warehouse) -> None:
    """Analysts write ``from events`` whatever the configured schema."""
    warehouse.insert([page("m1", "/signup", NOW)])
    assert [r[0] for r in warehouse.query(SEED_QUERY).rows] == ["m1"]


def test_the_password_of_the_dsn_never_appears_in_an_error() -> None:
    dsn = postgres_dsn()
    wrong = "postgresql://no_such_user:s3cret-pw@127.0.0.1:5432/no_such_db"
    with pytest.raises(WarehouseError) as caught:
        Warehouse.open("postgres", wrong)
    assert "s3cret-pw" not in str(caught.value)
    assert "cannot connect" in str(caught.value)
    with fresh_schema(dsn) as schema:
        wh = Warehouse.open("postgres", dsn, settings={"schema": schema})
        assert "s3cret" not in repr(wh.dialect)
        wh.close()


def test_a_read_only_warehouse_answers_and_creates_nothing(target: Target) -> None:
    early = target.open(read_only=True)
    assert dict(early.columns) == {}
    with pytest.raises(WarehouseError, match="does not exist"):
        early.query("select * from events")
    with psycopg.connect(target.target) as con:
        schemas = con.execute(
            "select count(*) from information_schema.schemata where schema_name = %s",
            [target.settings["schema"]],
        ).fetchone()
    assert schemas == (0,)  # opening read-only created no schema and no table
    wh = target.open()
    wh.insert([page("m1", "/signup", NOW)])
    ro = target.open(read_only=True)
    assert set(ro.columns) == set(BASE_COLUMNS)
    assert [r[0] for r in ro.query(SEED_QUERY).rows] == ["m1"]
    with pytest.raises(WarehouseError, match="read-only"):
        ro.insert([page("m2", "/a", NOW)])


def test_serve_loads_into_postgres_and_sql_reads_it_through_the_relay_and_without(
    tmp_path: Path, relays: list[Relay]
) -> None:
    dsn = postgres_dsn()
    with fresh_schema(dsn) as schema:
        config = tmp_path / "tagrelay.yaml"
        config.write_text(
            f"""
data_dir: {tmp_path / "data"}
keys:
  - {{id: backend, kind: server, key: e2e-server-key}}
logging: {{level: info, format: json}}
admin: {{listen: "127.0.0.1:0"}}
forwarders:
  - id: warehouse
    type: warehouse
    dialect: postgres
    dsn: "${{TEST_DATABASE_URL}}"
    schema: {schema}
    batch: {{max_events: 100, max_wait_secs: 0.05}}
"""
        )
        # the relay reads the connection string from its environment, as a user's would
        os.environ["TEST_DATABASE_URL"] = dsn
        try:
            relay = Relay(config, tmp_path)
            relays.append(relay)
            batch = [
                {
                    "type": "page",
                    "messageId": f"e2e-{i}",
                    "anonymousId": "a1",
                    "context": {"page": {"path": "/signup" if i % 2 else "/pricing"}},
                }
                for i in range(40)
            ]
            status, body = relay.post("/v1/batch", {"batch": batch})
            assert (status, body) == (200, {"success": True, "accepted": 40})

            def count() -> int:
                with psycopg.connect(dsn) as con:
                    found = con.execute(f'select count(*) from "{schema}".events').fetchone()
                return int(found[0]) if found else 0

            deadline = time.monotonic() + 20
            while count() < 40 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert count() == 40

            def sql(query: str) -> str:
                out = subprocess.run(
                    [*TAGRELAY, "sql", "--config", str(config), "--format", "csv", query],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert out.returncode == 0, out.stderr
                return out.stdout

            assert sql(SEED_QUERY.replace("*", "count(*) as n")) == "n\n20\n"
            logs = Path(relay.log.name).read_text()
            assert dsn not in logs and f"PostgreSQL schema {schema}" in logs
            assert relay.stop() == 0
            # no relay: tagrelay sql connects by itself
            assert sql("select count(*) as n from events") == "n\n40\n"
        finally:
            os.environ.pop("TEST_DATABASE_URL", None)


def test_batches_load_through_the_typed_staging_table_as_the_table_changes(
    target: Target, warehouse: Warehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual path copies typed columns; the JSON-document path is only for values
    PostgreSQL's text cannot hold. New and widened columns must not need it."""
    from tagrelay.warehouse.dialects.postgres import PostgresDialect

    def no_documents(*args: object, **kwargs: object) -> int:
        raise AssertionError("the batch fell back to JSON documents")

    monkeypatch.setattr(PostgresDialect, "_insert_documents", no_documents)
    warehouse.insert([page("m1", "/a", NOW, revenue=20, tags=["x"])])
    warehouse.insert([page("m2", "/a", NOW, revenue=19.99, plan="pro")])  # widened, added
    warehouse.insert([page("m3", "/a", NOW, revenue=1, at="2024-05-01T10:00:00Z")])
    assert rows(
        warehouse,
        "select message_id, properties_revenue, properties_plan, properties_tags "
        "from events order by 1",
    ) == [("m1", 20.0, None, '["x"]'), ("m2", 19.99, "pro", None), ("m3", 1.0, None, None)]
    monkeypatch.undo()
    # NUL takes the other path, and still loads
    assert warehouse.insert([page("m4", "/a\x00", NOW)]).inserted == 1
