"""User data for ad platforms: extraction and per-platform normalization + hashing speed.

Run:
    .venv/bin/python bench/user_data_bench.py                  # 20k events
    .venv/bin/python bench/user_data_bench.py --events 100000

Each event is an identify-style track with email, phone (national, so the default country
is used), names, address, gender and birthday, a userId, IP, user agent and click ids: the
most work one event can ask of ``forwarders._user_data``. Prints events/s and microseconds
per event for :func:`extract_user_data`, for :func:`prepare` per platform (the phone
number is parsed by ``phonenumbers``, the rest hashed with SHA-256; the module's caches
emptied first, so every value is new), and for one event prepared for every platform in
turn (the fan-out: a value two platforms normalize alike is normalized once, then cached);
the same for an event without personal data (IP, user agent and a click id: the common
case).
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from tagrelay.forwarders import _user_data
from tagrelay.forwarders._user_data import PLATFORMS, extract_user_data, prepare

FIRST = ["Jane", "Valéry", "Raphaël", "정", "Mary Ann", "Jean-Luc"]
LAST = ["Doe", "O'Neil", "Müller", "Smith"]


def full_event(i: int, rng: random.Random) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "userId": f"user-{i}",
        "context": {
            "ip": f"203.0.113.{i % 250}",
            "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) Chrome/124.0",
            "clickIds": {"gclid": f"g-{i}", "fbclid": f"f-{i}"},
            "clientIds": {"fbp": f"fb.1.1596403881668.{i}"},
            "traits": {
                "email": f"Jane.Doe+{i}@GMail.com",
                "phone": f"(650) 555-{rng.randrange(1000, 9999)}",
                "firstName": rng.choice(FIRST),
                "lastName": rng.choice(LAST),
                "gender": "female",
                "birthday": "1990-01-31",
                "address": {
                    "street": "1600 Amphitheatre Pkwy.",
                    "city": "Mountain View",
                    "state": "California",
                    "postalCode": "94043-1351",
                    "country": "US",
                },
            },
        },
    }


def bare_event(i: int) -> dict[str, Any]:
    return {
        "type": "page",
        "anonymousId": f"anon-{i}",
        "context": {
            "ip": f"203.0.113.{i % 250}",
            "userAgent": "Mozilla/5.0",
            "page": {"url": f"https://shop.test/?gclid=g-{i}"},
        },
    }


def clear_caches() -> None:
    """Empty ``_user_data``'s own caches (functools' ``cache_clear``)."""
    for value in vars(_user_data).values():
        if (
            callable(getattr(value, "cache_clear", None))
            and value.__module__ == _user_data.__name__
        ):
            value.cache_clear()


def timed(label: str, n: int, run: Any) -> None:
    started = time.perf_counter()
    run()
    elapsed = time.perf_counter() - started
    print(f"{label:<28} {n / elapsed:>10,.0f} events/s {elapsed / n * 1e6:>8.1f} µs/event")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    rng = random.Random(7)
    for kind, events in (
        ("full user data", [full_event(i, rng) for i in range(args.events)]),
        ("no personal data", [bare_event(i) for i in range(args.events)]),
    ):
        print(f"-- {kind}, {len(events):,} events")
        data = [extract_user_data(e) for e in events]
        timed(
            "extract_user_data", len(events), lambda ev=events: [extract_user_data(e) for e in ev]
        )
        for platform in PLATFORMS:
            clear_caches()  # each platform alone: every value normalized afresh
            timed(
                f"prepare {platform}",
                len(data),
                lambda p=platform, ds=data: [prepare(d, p, default_phone_country="US") for d in ds],
            )
        clear_caches()
        timed(
            f"fan-out to all {len(PLATFORMS)} platforms",
            len(data),
            lambda ds=data: [
                prepare(d, p, default_phone_country="US") for d in ds for p in PLATFORMS
            ],
        )


if __name__ == "__main__":
    main()
