"""Erasure and access requests across every store (``tagrelay forget``, ``tagrelay export``).

The path of a request:

1. the ids given (``--user-id``, ``--anonymous-id``, ``--email``) make a ``Subject``;
2. the identity store, when it is on, adds the ids and emails of the persons they lead to;
3. each warehouse adds the ids its rows link (``Warehouse.link``: the user ids an email
   was given under, the anonymous ids a user id was seen with);
4. each store then deletes (or exports) what is the subject's: the events still in the
   spool (``spool.erasure``: pending for some forwarder or not) and the dead letters first,
   so that no event of theirs is loaded again into the other stores after they are
   cleared, then the identity store's persons and the warehouse rows.

``Stores`` says how each store is reached: through the running relay (the admin socket's
``web.admin_identity``: its spool, its warehouse processes, its identity store) or on the
files when no relay runs (``cli.privacy``). The answer counts per store (``forget``) or holds
what each store has (``export``); ``audit_fields`` is what the audit line says of it:
kinds of id, counts, a salted reference to the ids, who asked, never an id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Protocol

from tagrelay.identity_store import IdentityStore
from tagrelay.model.subject import Subject
from tagrelay.warehouse import QueryResult

__all__ = ["SpoolAccess", "Stores", "WarehouseAccess", "audit_fields", "export", "forget"]


class WarehouseAccess(Protocol):
    """A warehouse as a request reaches it (``Warehouse`` or ``WarehouseProcess``):
    blocking calls, run on a thread here."""

    def link(self, subject: Subject) -> Subject: ...

    def erase(self, subject: Subject) -> int: ...

    def rows_of(self, subject: Subject) -> QueryResult: ...


class SpoolAccess(Protocol):
    """The spool as a request reaches it (``SqliteSpool``, or the CLI's ``OfflineSpool``)."""

    async def erase(self, subject: Subject) -> dict[str, int]: ...

    async def export_subject(self, subject: Subject) -> dict[str, Any]: ...


@dataclass
class Stores:
    """The stores one request reaches."""

    identity: IdentityStore | None = None
    warehouses: Sequence[WarehouseAccess] = ()
    spool: SpoolAccess | None = None
    after_spool_erasure: Callable[[], Awaitable[None]] | None = None
    """Called once the spool's events were erased (the running relay's delivery processes
    drop the events they keep decoded)."""


async def _subject(ids: Mapping[str, str], stores: Stores) -> Subject:
    subject = Subject.of(ids)
    if stores.identity is not None:
        exported = await stores.identity.export(**ids)
        for person in exported["persons"]:
            email = person["user_data"].get("email", {}).get("value")
            subject = subject.widened(
                user_ids=person["user_ids"],
                anonymous_ids=person["anonymous_ids"],
                emails=[email] if isinstance(email, str) else [],
            )
    for warehouse in stores.warehouses:
        subject = await asyncio.to_thread(warehouse.link, subject)
    return subject


async def forget(ids: Mapping[str, str], stores: Stores) -> tuple[Subject, dict[str, Any]]:
    """Erase the person of ``ids`` from every store: the subject (with its linked ids, for
    ``--suppress``) and the counts per store."""
    subject = await _subject(ids, stores)
    counts: dict[str, Any] = {}
    # The spool first: an event of theirs still waiting there would otherwise be loaded
    # into the warehouse, or recorded in the identity store, again after those erasures.
    if stores.spool is not None:
        erased = await stores.spool.erase(subject)
        counts["spool"] = {"events": erased["events"]}
        counts["dead_letters"] = {"events": erased["dead_letters"]}
        if stores.after_spool_erasure is not None:
            await stores.after_spool_erasure()
    if stores.identity is not None:
        persons = ids_deleted = 0
        # The ids asked for, and the user ids and emails linked to them (a user id the
        # warehouse linked may be a person of its own in the store).
        asked: list[dict[str, str]] = [dict(ids)]
        asked += [{"user_id": u} for u in sorted(subject.user_ids)]
        asked += [{"email": e} for e in sorted(subject.emails)]
        for one in asked:
            done = await stores.identity.forget(**one)
            persons += done.persons
            ids_deleted += done.ids
        counts["identity_store"] = {"persons": persons, "ids": ids_deleted}
    if stores.warehouses:
        rows = 0
        for warehouse in stores.warehouses:
            rows += await asyncio.to_thread(warehouse.erase, subject)
        counts["warehouse"] = {"rows": rows}
    return subject, counts


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


async def export(ids: Mapping[str, str], stores: Stores) -> dict[str, Any]:
    """Everything every store holds about the person of ``ids``, by store."""
    subject = await _subject(ids, stores)
    found: dict[str, Any] = {}
    if stores.identity is not None:
        found["identity_store"] = await stores.identity.export(**ids)
    if stores.warehouses:
        rows: list[dict[str, Any]] = []
        for warehouse in stores.warehouses:
            result = await asyncio.to_thread(warehouse.rows_of, subject)
            rows += [
                {c: _jsonable(v) for c, v in zip(result.columns, row, strict=True) if v is not None}
                for row in result.rows
            ]
        found["warehouse"] = {"rows": rows}
    if stores.spool is not None:
        held = await stores.spool.export_subject(subject)
        found["spool"] = {"events": held["events"]}
        found["dead_letters"] = {"events": held["dead_letters"]}
    return found


def count_of(store: str, result: Any) -> dict[str, int]:
    """An export's size per store, for the audit line (never its content)."""
    if store == "identity_store":
        return {"persons": len(result["persons"])}
    key = "rows" if store == "warehouse" else "events"
    return {key: len(result[key])}


def audit_fields(
    ids: Mapping[str, str], ref: str, by: Mapping[str, Any], stores: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``extra`` of an audit line: which kinds of id were given (``by``), the salted
    reference to them (``subject_ref``), who asked (``requested_by``: a uid and a pid, or
    a user name), and the counts per store. Never an id."""
    return {"by": ", ".join(sorted(ids)), "subject_ref": ref, "requested_by": dict(by), **stores}
