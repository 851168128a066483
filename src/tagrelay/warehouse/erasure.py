"""Erasure and access in the warehouse: the SQL condition that finds one person's rows
(``model.subject.Subject``), for ``Warehouse.link``, ``Warehouse.erase`` and
``Warehouse.rows_of``.

A row is the person's when its ``user_id`` (or ``previous_id``) is one of their user ids,
when ``traits_email``, ``context_traits_email`` or ``properties_email`` holds one of their
emails (trimmed, lower case) or, with ``hash_pii``, its keyed hash (rows stored before
``hash_pii`` was on hold the address itself: both are looked for), or when its
``anonymous_id`` (or ``previous_id``) is one of their anonymous ids and it carries no other
user id. The same rule as ``Subject.matches`` for the events of the spool.

The values are parameters, never SQL text; ``mark`` is the dialect's placeholder (``?``
for DuckDB, ``%s`` for PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Collection

from tagrelay.model.subject import EMAIL_PATHS, Subject
from tagrelay.warehouse.dialects.base import quote_identifier
from tagrelay.warehouse.pii import PiiHasher

__all__ = ["EMAIL_COLUMNS", "person_condition"]

EMAIL_COLUMNS = tuple("_".join(path) for path in EMAIL_PATHS)
"""The columns an email is looked for in."""


def person_condition(
    subject: Subject, columns: Collection[str], pii: PiiHasher | None, mark: str
) -> tuple[str, list[str]] | None:
    """The WHERE condition of ``subject``'s rows in a table of ``columns``, and its
    parameters; None when nothing could match (no id, or none of the columns)."""
    terms: list[str] = []
    params: list[str] = []

    def among(values: Collection[str]) -> str:
        params.extend(sorted(values))
        return "(" + ", ".join([mark] * len(values)) + ")"

    users, anonymous = subject.user_ids, subject.anonymous_ids
    user_id, previous_id = quote_identifier("user_id"), quote_identifier("previous_id")
    if users and "user_id" in columns:
        terms.append(f"{user_id} IN {among(users)}")
    if users and "previous_id" in columns:
        terms.append(f"{previous_id} IN {among(users)}")
    if anonymous and "anonymous_id" in columns:
        ids = among(anonymous)  # before ``others``: the parameters go in the text's order
        others = f"{user_id} IS NULL" + (f" OR {user_id} IN {among(users)}" if users else "")
        terms.append(f"({quote_identifier('anonymous_id')} IN {ids} AND ({others}))")
    if anonymous and "previous_id" in columns:
        terms.append(f"{previous_id} IN {among(anonymous)}")
    if subject.emails:
        values = set(subject.emails)
        if pii is not None:
            values |= {pii.digest(("traits", "email"), e) for e in subject.emails}
        for column in EMAIL_COLUMNS:
            if column in columns:
                text = f"lower(trim(CAST({quote_identifier(column)} AS VARCHAR)))"
                terms.append(f"{text} IN {among(values)}")
    if not terms:
        return None
    return " OR ".join(terms), params
