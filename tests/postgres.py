"""A real PostgreSQL for the tests that need one: the server this machine runs (``.ci/run``
starts it when it is down), at ``TAGRELAY_TEST_POSTGRES_DSN`` or the local default. Each
test gets a schema of its own, dropped afterwards. Without a server the tests skip, unless
``TAGRELAY_REQUIRE_POSTGRES=1`` (CI), where that is a failure."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def postgres_dsn() -> str:
    """The DSN of a reachable server, or skip (fail when required)."""
    import psycopg

    dsn = os.environ.get("TAGRELAY_TEST_POSTGRES_DSN", DEFAULT_DSN)
    try:
        with psycopg.connect(dsn, connect_timeout=3) as con:
            con.execute("SELECT 1")
    except psycopg.Error as e:
        message = f"no PostgreSQL at {dsn}: {' '.join(str(e).split())}"
        if os.environ.get("TAGRELAY_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{message} (required: TAGRELAY_REQUIRE_POSTGRES=1)", pytrace=False)
        pytest.skip(message)
    return dsn


@contextmanager
def fresh_schema(dsn: str) -> Iterator[str]:
    """A schema name no other test uses; the schema (if created) is dropped at the end."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:16]}"
    try:
        yield name
    finally:
        with psycopg.connect(dsn, autocommit=True) as con:
            con.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
