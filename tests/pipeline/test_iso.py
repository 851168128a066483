"""``iso``: the one timestamp format, against the plain ``isoformat`` it replaces."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

from tagrelay.model import iso
from tagrelay.model.event import _MAX_SECOND_PREFIXES, _SECOND_PREFIXES


def reference(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def test_iso_matches_isoformat_with_milliseconds() -> None:
    rng = random.Random(11)
    zones = [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30))]
    base = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
    values = [
        datetime(1, 1, 2, 0, 0, 0, 0, tzinfo=UTC),
        datetime(999, 3, 4, 5, 6, 7, 999, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        base,
        base.replace(microsecond=999_999),
        base.replace(microsecond=1_000),
        base.replace(microsecond=999),
    ]
    for _ in range(5000):
        offset = timedelta(microseconds=rng.randint(-(10**15), 10**15))
        values.append((base + offset).astimezone(rng.choice(zones)))
    for dt in values:
        assert iso(dt) == reference(dt), dt
        assert iso(dt) == reference(dt), dt  # again, from the memo
    assert iso(base) == "2026-11-29T12:00:00.000Z"


def test_iso_memo_stays_bounded() -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for n in range(_MAX_SECOND_PREFIXES + 10):
        dt = base + timedelta(seconds=n, milliseconds=n % 1000)
        assert iso(dt) == reference(dt)
    assert len(_SECOND_PREFIXES) <= _MAX_SECOND_PREFIXES
