"""Erasure and access in the warehouse on every dialect (``Warehouse.link``, ``rows_of``,
``erase``): a person's rows found by user id, by email (plain, and hashed with
``hash_pii``, in any case), and through the anonymous ids their rows link, while another
person's rows stay, including a row of a shared browser that carries another user id; and
the DuckDB file no longer holds the erased values."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tagrelay.model.subject import Subject
from tagrelay.warehouse import DIALECTS, Warehouse
from tests.warehouse.targets import Target, make_target


@pytest.fixture(params=sorted(DIALECTS))
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    yield from make_target(request.param, tmp_path)


def event(message_id: str, **fields: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Viewed", "messageId": message_id, **fields}


ROWS = [
    event("m1", anonymousId="anon-a"),  # before login: linked by m2
    event("m2", userId="user-a", anonymousId="anon-a", traits={"email": "Alice@Example.com"}),
    event("m3", userId="user-a"),
    event("m4", anonymousId="anon-a2", properties={"email": "alice@example.com"}),
    event("m5", userId="user-b", anonymousId="anon-a"),  # someone else on Alice's browser
    event("m6", userId="user-b", anonymousId="anon-b", traits={"email": "bob@example.com"}),
]
ALICE = {"m1", "m2", "m3", "m4"}


def ids(warehouse: Warehouse, subject: Subject) -> set[str]:
    result = warehouse.rows_of(subject)
    column = result.columns.index("message_id")
    return {row[column] for row in result.rows}


@pytest.mark.parametrize("hashed", [False, True], ids=["plain", "hash_pii"])
@pytest.mark.parametrize(
    "asked",
    [Subject.of({"user_id": "user-a"}), Subject.of({"email": " ALICE@example.com"})],
    ids=["by_user_id", "by_email"],
)
def test_a_person_is_found_linked_and_erased(target: Target, hashed: bool, asked: Subject) -> None:
    warehouse = target.open(hash_pii_salt=b"sixteen-or-more-bytes" if hashed else None)
    warehouse.insert(ROWS)
    subject = warehouse.link(asked)
    assert subject.user_ids == {"user-a"}
    assert subject.anonymous_ids == {"anon-a", "anon-a2"}
    assert ids(warehouse, subject) == ALICE
    assert warehouse.erase(subject) == len(ALICE)
    assert ids(warehouse, subject) == set()
    left = warehouse.query("select message_id from events order by message_id").rows
    assert left == [("m5",), ("m6",)]
    bob = warehouse.link(Subject.of({"email": "bob@example.com"}))
    assert ids(warehouse, bob) == {"m5", "m6"}  # his, on Alice's browser too


def test_an_anonymous_id_alone_leads_to_its_rows_without_another_user(target: Target) -> None:
    warehouse = target.open()
    warehouse.insert(ROWS)
    subject = warehouse.link(Subject.of({"anonymous_id": "anon-a"}))
    assert subject == Subject.of({"anonymous_id": "anon-a"})
    assert ids(warehouse, subject) == {"m1"}


def test_nothing_to_look_for_finds_nothing(target: Target) -> None:
    warehouse = target.open()
    warehouse.insert(ROWS)
    assert warehouse.erase(Subject()) == 0
    assert ids(warehouse, Subject()) == set()
    assert warehouse.erase(Subject.of({"user_id": "nobody"})) == 0


def test_the_duckdb_file_keeps_no_erased_value(tmp_path: Path) -> None:
    path = tmp_path / "warehouse.duckdb"
    warehouse = Warehouse.open("duckdb", str(path))
    warehouse.insert(ROWS)
    warehouse.query("select 1")
    warehouse.dialect._connection().execute("CHECKPOINT")  # the rows are in the file now
    assert b"user-a" in path.read_bytes()
    warehouse.erase(warehouse.link(Subject.of({"user_id": "user-a"})))
    # Still open and loading after the file was rewritten, with its key.
    warehouse.insert([event("m7", userId="user-c"), event("m6", userId="dup")])
    assert warehouse.query("select count(*) from events").rows == [(3,)]
    warehouse.close()
    raw = path.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("warehouse*.wal"))
    assert b"user-a" not in raw and b"alice@example.com" not in raw.lower()
    assert b"user-b" in raw
