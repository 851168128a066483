"""The person an erasure or access request is about (``tagrelay forget``, ``tagrelay export``),
as the ids that lead to their data in every store.

A request names a user id, an anonymous id or an email (``Subject.of``); the identity store
and the warehouse then link more ids to it (``Subject.widened``: the anonymous ids a user was
seen with, the user ids an email was given under), and each store looks for the events of
the subject so widened (``Subject.matches`` for the events the spool and the dead letters
hold, SQL conditions for the warehouse: ``tagrelay.warehouse.erasure``).

An event is the subject's when its ``userId`` (or ``previousId``) is one of the user ids,
when one of the emails is in ``traits.email``, ``context.traits.email`` or
``properties.email`` (compared trimmed and in lower case), or when its ``anonymousId`` (or
``previousId``) is one of the anonymous ids and it carries no other user id: an anonymous
id shared by two people (one browser, two logins) leads to the rows of that browser, never
to the other person's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["EMAIL_PATHS", "ID_KINDS", "Subject", "normalized_email"]

ID_KINDS = ("user_id", "anonymous_id", "email")
"""The kinds of id a request may name (the CLI's ``--user-id``, ``--anonymous-id``,
``--email``)."""

EMAIL_PATHS: tuple[tuple[str, ...], ...] = (
    ("traits", "email"),
    ("context", "traits", "email"),
    ("properties", "email"),
)
"""Where an event carries an email (the warehouse's ``traits_email``,
``context_traits_email`` and ``properties_email`` columns)."""


def normalized_email(value: str) -> str:
    """An email as compared: trimmed, lower case (as ``hash_pii`` hashes it)."""
    return value.strip().lower()


def _email_of(event: Mapping[str, Any], path: tuple[str, ...]) -> str | None:
    node: Any = event
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return normalized_email(node) if isinstance(node, str) else None


@dataclass(frozen=True, slots=True)
class Subject:
    """The ids of one person (picklable: the warehouse process gets it as it is)."""

    user_ids: frozenset[str] = frozenset()
    anonymous_ids: frozenset[str] = frozenset()
    emails: frozenset[str] = frozenset()
    """Normalized (``normalized_email``)."""

    @classmethod
    def of(cls, ids: Mapping[str, str]) -> Subject:
        """The subject of a request's ids (keys from ``ID_KINDS``)."""
        email = ids.get("email")
        return cls(
            frozenset([ids["user_id"]] if ids.get("user_id") else []),
            frozenset([ids["anonymous_id"]] if ids.get("anonymous_id") else []),
            frozenset([normalized_email(email)] if email else []),
        )

    def widened(
        self,
        user_ids: Iterable[str] = (),
        anonymous_ids: Iterable[str] = (),
        emails: Iterable[str] = (),
    ) -> Subject:
        """This subject with more linked ids."""
        return Subject(
            self.user_ids | frozenset(user_ids),
            self.anonymous_ids | frozenset(anonymous_ids),
            self.emails | frozenset(normalized_email(e) for e in emails),
        )

    def __bool__(self) -> bool:
        return bool(self.user_ids or self.anonymous_ids or self.emails)

    def matches(self, event: Mapping[str, Any]) -> bool:
        """Whether ``event`` is this person's (see the module docstring)."""
        user_id = event.get("userId")
        if user_id is not None and str(user_id) in self.user_ids:
            return True
        previous = event.get("previousId")
        if previous is not None and (
            str(previous) in self.user_ids or str(previous) in self.anonymous_ids
        ):
            return True
        if self.emails:
            for path in EMAIL_PATHS:
                email = _email_of(event, path)
                if email is not None and email in self.emails:
                    return True
        anonymous_id = event.get("anonymousId")
        return (
            anonymous_id is not None
            and str(anonymous_id) in self.anonymous_ids
            and (user_id is None or str(user_id) in self.user_ids)
        )

    def as_json(self) -> dict[str, list[str]]:
        return {
            "user_ids": sorted(self.user_ids),
            "anonymous_ids": sorted(self.anonymous_ids),
            "emails": sorted(self.emails),
        }
