"""Fresh databases for the cross-dialect warehouse tests: one per test, for every entry of
``tagrelay.warehouse.DIALECTS``, and the few things the tests say differently per engine
(the native type names, a statement that runs for a long time, a raw connection)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tagrelay.warehouse import Warehouse
from tests.postgres import fresh_schema, postgres_dsn


@dataclass
class Target:
    """One fresh database of one dialect."""

    dialect: str
    target: str
    settings: dict[str, str | int | bool] = field(default_factory=dict)
    opened: list[Warehouse] = field(default_factory=list)

    def open(self, **kwargs: Any) -> Warehouse:
        settings = {**self.settings, **kwargs.pop("settings", {})}
        warehouse = Warehouse.open(self.dialect, self.target, settings=settings, **kwargs)
        self.opened.append(warehouse)
        return warehouse

    def native_types(self, warehouse: Warehouse, table: str = "events") -> dict[str, str]:
        """Column -> the engine's own type name, as its catalog says."""
        if self.dialect == "duckdb":
            return {r[0]: r[1] for r in warehouse.query(f"describe {table}").rows}
        return {
            r[0]: r[1]
            for r in warehouse.query(
                "select column_name, data_type from information_schema.columns "
                f"where table_schema = '{self.settings['schema']}' and table_name = '{table}' "
                "order by ordinal_position"
            ).rows
        }

    def slow_query(self) -> str:
        """A read that runs for minutes."""
        if self.dialect == "duckdb":
            return "select count(*) from range(1000000000) a, range(1000000) b"
        return "select count(*) from generate_series(1, 1000000000) a, generate_series(1, 1000) b"

    def execute(self, sql: str) -> None:
        """Run ``sql`` on a connection of the test's own (to make a table the relay did
        not, say). For duckdb, no warehouse may have the file open."""
        if self.dialect == "duckdb":
            import duckdb

            with duckdb.connect(self.target) as con:
                con.execute(sql)
            return
        import psycopg

        with psycopg.connect(self.target, autocommit=True) as con:
            con.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.settings["schema"]}"')
            con.execute(f'SET search_path TO "{self.settings["schema"]}"')
            con.execute(sql.encode())


def _duckdb(tmp_path: Path, stack: ExitStack) -> Target:
    return Target("duckdb", str(tmp_path / "warehouse.duckdb"))


def _postgres(tmp_path: Path, stack: ExitStack) -> Target:
    dsn = postgres_dsn()
    schema = stack.enter_context(fresh_schema(dsn))
    return Target("postgres", dsn, {"schema": schema})


TARGETS: Mapping[str, Callable[[Path, ExitStack], Target]] = {
    "duckdb": _duckdb,
    "postgres": _postgres,
}
"""Dialect -> a fresh database for one test (``test_every_dialect_is_tested`` checks that
every dialect has one)."""


def make_target(dialect: str, tmp_path: Path) -> Iterator[Target]:
    """Fixture body: the fresh database, and afterwards every warehouse closed and the
    database dropped."""
    with ExitStack() as stack:
        target = TARGETS[dialect](tmp_path, stack)
        try:
            yield target
        finally:
            for warehouse in target.opened:
                warehouse.close()


def skip_unless(target: Target, *dialects: str) -> None:
    if target.dialect not in dialects:
        pytest.skip(f"{target.dialect}: not applicable")
