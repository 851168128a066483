"""The conversions layer and the ad forwarders' plans: events turned into each platform's
requests per second, without a network (the pure part of delivery).

Run:
    PYTHONPATH=src .venv/bin/python bench/conversions_bench.py                 # meta, 20k events
    PYTHONPATH=src .venv/bin/python bench/conversions_bench.py --forwarder tiktok
    PYTHONPATH=src .venv/bin/python bench/conversions_bench.py --forwarder all --visitors 0
    PYTHONPATH=src .venv/bin/python bench/conversions_bench.py --events 100000

Two mixes, planned in batches of ``--batch`` events: purchases carrying every kind of user
data (email, phone, names, address, userId, IP, user agent, locale, the fbclid and ttclid
click ids on the landing URL, a gclid in ``context.clickIds``, the fbp and _ttp browser
ids; each platform takes what it uses) and products, and page views carrying only IP, user
agent and the browser ids (the common case).

The events come from a pool of ``--visitors`` visitors (each event's visitor drawn at
random, seeded): a visitor keeps its email, phone, name, address, userId, IP, user agent,
click and browser ids from one event to the next, as a returning buyer does; order ids,
message ids and products are new in every event. ``--visitors 0`` gives every event a
person of its own (every value new: the worst case for any cache). Each forwarder plans
its own copy of each batch, decoded from JSON just before (untimed), as the relay's
delivery workers each decode the stored events; with ``--shared``, every forwarder plans
the same decoded batch (a delivery that would decode each batch once for all).

``--forwarder all`` plans every batch with meta, tiktok, google_ads and ga4 in turn (the
fan-out: one event, four platforms) and prints each one's time and the sum. Prints, for
each mix and forwarder, events/s and microseconds per event of CPU time (the process's:
other jobs on the machine do not count), the body bytes per event, and the hit rate of
``forwarders._user_data``'s caches over the mix (every cache is emptied before each mix).
``google_ads_bench.py`` also times Google's answers.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from tagrelay.forwarders import _user_data
from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._batched import BatchedHttpForwarder
from tagrelay.forwarders.ga4 import GA4Config, GA4Forwarder
from tagrelay.forwarders.google_ads import GoogleAdsConfig, GoogleAdsForwarder
from tagrelay.forwarders.meta_capi import MetaConfig, MetaForwarder
from tagrelay.forwarders.tiktok_events import TikTokConfig, TikTokForwarder
from tagrelay.metrics import Metrics

GRANTED = {
    "analytics": "granted",
    "ads": "granted",
    "ad_user_data": "granted",
    "ad_personalization": "granted",
}
UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 Chrome/124.0.{}"
FIRST = ["Jane", "Valéry", "Raphaël", "Mary Ann", "Jean-Luc", "Ana", "Wei", "Olu"]
LAST = ["Doe", "O'Neil", "Müller", "Smith", "García", "Nguyen", "Okafor"]
CITIES = ["Menlo Park", "San José", "New York", "Austin", "Portland", "Chicago"]
STATES = ["CA", "California", "NY", "TX", "OR", "IL"]
ACTION = "customers/1234567890/conversionActions/111"
FORWARDERS = ("meta", "tiktok", "google_ads", "ga4")

Visitor = dict[str, Any]
Forwarder = BatchedHttpForwarder[Any]


def _letters(n: int) -> str:
    """``n`` written in the letters a-z (names must differ after digits are removed)."""
    text = ""
    while True:
        n, r = divmod(n, 26)
        text = chr(97 + r) + text
        if n == 0:
            return text


def visitor(v: int) -> Visitor:
    """Visitor ``v``'s own data: the same whenever ``v`` comes back, new for a new ``v``
    (every string differs from every other visitor's, names and city after normalization
    too, so that a new visitor never hits a cache)."""
    return {
        "email": f"buyer.{v}@example.com",
        # valid US numbers: exchange 200-999, line 0000-9999
        "phone": f"(650) {200 + (v // 10_000) % 800}-{v % 10_000:04d}",
        "firstName": FIRST[v % len(FIRST)] + " " + _letters(v).capitalize(),
        "lastName": LAST[v % len(LAST)],
        "city": CITIES[v % len(CITIES)] + " " + _letters(v),
        "state": STATES[v % len(STATES)],
        "postalCode": f"{v % 100_000:05d}",
        "userId": f"user-{v}",
        "ip": f"203.{v // 65_536 % 256}.{v // 256 % 256}.{v % 256}",
        "userAgent": UA.format(v),
        "fbclid": f"IwAR{v}",
        "ttclid": f"E.C.P.{v}",
        "gclid": f"Cj0KCQiA-{v}",
        "fbp": f"fb.1.1596403881668.{v}",
        "_ttp": f"2F7h37YkS1j57AYSKTI7IH{v}",
    }


def visitors(n: int, events: int) -> list[int]:
    """Which visitor each event is from: drawn from a pool of ``n`` (seeded); ``n == 0``:
    a new visitor for every event."""
    if n == 0:
        return list(range(events))
    rng = random.Random(7)
    return [rng.randrange(n) for _ in range(events)]


def purchase(i: int, when: str, person: Visitor) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "messageId": f"m-{i}",
        "userId": person["userId"],
        "timestamp": when,
        "properties": {
            "order_id": f"o-{i}",
            "revenue": 10 + i % 90,
            "currency": "USD",
            "products": [
                {"product_id": f"p-{i % 50}", "price": 5, "quantity": 1 + i % 3, "name": "Mug"},
                {"product_id": f"p-{i % 70}", "price": 7.5, "quantity": 1},
            ],
        },
        "context": {
            "consent": GRANTED,
            "ip": person["ip"],
            "userAgent": person["userAgent"],
            "locale": "en-US",
            "page": {
                "url": "https://www.shop.test/thanks?fbclid={fbclid}&ttclid={ttclid}".format(
                    **person
                )
            },
            "clickIds": {"gclid": person["gclid"]},
            "clientIds": {"fbp": person["fbp"], "_ttp": person["_ttp"]},
            "traits": {
                "email": person["email"],
                "phone": person["phone"],
                "firstName": person["firstName"],
                "lastName": person["lastName"],
                "address": {
                    "city": person["city"],
                    "state": person["state"],
                    "postalCode": person["postalCode"],
                },
            },
        },
    }


def page_view(i: int, when: str, person: Visitor) -> dict[str, Any]:
    return {
        "type": "page",
        "messageId": f"p-{i}",
        "anonymousId": f"a-{person['userId']}",
        "timestamp": when,
        "context": {
            "consent": GRANTED,
            "ip": person["ip"],
            "userAgent": person["userAgent"],
            "page": {"url": "https://www.shop.test/"},
            "clientIds": {"fbp": person["fbp"], "_ttp": person["_ttp"]},
        },
    }


def mix(
    make: Callable[[int, str, Visitor], dict[str, Any]], events: int, pool: int
) -> list[dict[str, Any]]:
    when = datetime.now(UTC).isoformat()
    people: dict[int, Visitor] = {}
    made = []
    for i, v in enumerate(visitors(pool, events)):
        person = people.get(v) or people.setdefault(v, visitor(v))
        made.append(make(i, when, person))
    return made


def stored(events: list[dict[str, Any]], batch: int) -> list[bytes]:
    """The events in batches of ``batch``, as JSON (what the spool holds)."""
    return [orjson.dumps(events[start : start + batch]) for start in range(0, len(events), batch)]


def caches() -> list[Any]:
    """``forwarders._user_data``'s own caches (functools' ``cache_info`` protocol)."""
    return [
        f
        for f in vars(_user_data).values()
        if callable(getattr(f, "cache_info", None)) and f.__module__ == _user_data.__name__
    ]


def clear_caches() -> None:
    for cache in caches():
        cache.cache_clear()


def hit_rate() -> str:
    hits = misses = 0
    for cache in caches():
        info = cache.cache_info()
        hits, misses = hits + info.hits, misses + info.misses
    looked_up = hits + misses
    return f"{hits / looked_up:.0%} of {looked_up:,}" if looked_up else "-"


def run(
    name: str, batches: list[bytes], forwarders: dict[str, Forwarder], shared: bool = False
) -> None:
    """Plan every batch with each forwarder in turn, each on its own decoded copy (as the
    relay's delivery workers each decode a batch), or all on one (``shared``); time only
    the plans."""
    clear_caches()
    now = datetime.now(UTC)
    secs = dict.fromkeys(forwarders, 0.0)
    size = dict.fromkeys(forwarders, 0)
    n = 0
    clock = time.process_time  # CPU time: other jobs share the machine
    for encoded in batches:
        chunk = orjson.loads(encoded)
        for fid, fwd in forwarders.items():
            if not shared:
                chunk = orjson.loads(encoded)
            started = clock()
            plan = fwd.plan(chunk, now)
            secs[fid] += clock() - started
            size[fid] += sum(len(p.request.body) for p in plan.requests)
        n += len(chunk)
    for fid in forwarders:
        print(
            f"{name:<10} {fid:<10} {n / secs[fid]:>8,.0f} events/s  "
            f"{secs[fid] / n * 1e6:>6.1f} us/event  {size[fid] / n:>5.0f} body bytes/event"
        )
    if len(forwarders) > 1:
        total = sum(secs.values())
        together = f"{n / total:>8,.0f} events/s  {total / n * 1e6:>6.1f} us/event"
        print(f"{name:<10} {'together':<10} {together}")
    print(f"{name:<10} cache hits {hit_rate()}")


def forwarder(name: str) -> Forwarder:
    context = ForwarderContext(Path("."), None, Metrics())  # type: ignore[arg-type]
    common = {"id": name, "type": name, "default_phone_country": "US"}
    if name == "tiktok":
        tiktok = TikTokConfig.model_validate(
            {**common, "access_token": "token", "pixel_code": "CQ1A2B3C4D5E6F7G8H9J"}
        )
        return TikTokForwarder(tiktok, context)
    if name == "google_ads":
        ads = GoogleAdsConfig.model_validate(
            {
                **common,
                "customer_id": "123-456-7890",
                "developer_token": "token",
                "oauth": {"client_id": "c", "client_secret": "s", "refresh_token": "r"},
                "conversions": [{"event": "Order Completed", "conversion_action": ACTION}],
            }
        )
        return GoogleAdsForwarder(ads, context)
    if name == "ga4":
        ga4 = GA4Config.model_validate(
            {
                **common,
                "measurement_id": "G-BENCH12345",
                "api_secret": "secret",
                "send_user_data": True,
            }
        )
        return GA4Forwarder(ga4, context)
    meta = MetaConfig.model_validate(
        {**common, "access_token": "token", "pixel_id": "123456789012345"}
    )
    return MetaForwarder(meta, context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forwarder", choices=[*FORWARDERS, "all"], default="meta")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument(
        "--visitors", type=int, default=1000, help="pool of visitors; 0: a new one per event"
    )
    parser.add_argument(
        "--shared", action="store_true", help="every forwarder plans the same decoded batch"
    )
    args = parser.parse_args()
    names = FORWARDERS if args.forwarder == "all" else (args.forwarder,)
    forwarders = {name: forwarder(name) for name in names}
    pool = f"{args.visitors:,} visitors" if args.visitors else "a new visitor per event"
    copies = "one decoded copy for all" if args.shared else "a decoded copy each"
    print(
        f"{args.forwarder}: {args.events:,} events per mix from {pool}, batches of "
        f"{args.batch}, {copies}"
    )
    for name, make in (("purchases", purchase), ("pageviews", page_view)):
        batches = stored(mix(make, args.events, args.visitors), args.batch)
        run(name, batches, forwarders, args.shared)


if __name__ == "__main__":
    main()
