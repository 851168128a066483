"""The tiktok forwarder's plan: events turned into Events API requests per second, without a
network (the pure part of delivery, the same measure as ``conversions_bench`` for meta).

Run:
    PYTHONPATH=src .venv/bin/python bench/tiktok_events_bench.py                 # 20k events
    PYTHONPATH=src .venv/bin/python bench/tiktok_events_bench.py --events 100000

Two mixes, planned in batches of ``--batch`` events: purchases carrying every kind of user
data TikTok takes (email, phone, names, zip, userId, IP, user agent, locale, ttclid, _ttp)
and products, and page views carrying only IP, user agent and _ttp (the common case).
Prints events/s and microseconds per event for each mix, and the body bytes per event.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders.tiktok_events import TikTokConfig, TikTokForwarder
from tagrelay.metrics import Metrics

GRANTED = {"ads": "granted", "ad_user_data": "granted", "ad_personalization": "granted"}
UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) Chrome/124.0"


def purchase(i: int, when: str) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "messageId": f"m-{i}",
        "userId": f"user-{i}",
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
            "ip": f"203.0.113.{i % 250}",
            "userAgent": UA,
            "locale": "en-US",
            "page": {"url": f"https://www.shop.test/thanks?ttclid=E.C.P.{i}"},
            "clientIds": {"_ttp": f"2F7h37YkS1j57AYSKTI7IH{i}"},
            "traits": {
                "email": f"buyer.{i}@example.com",
                "phone": f"(650) 555-{1000 + i % 9000}",
                "firstName": "Jane",
                "lastName": "Doe",
                "address": {"postalCode": "94025"},
            },
        },
    }


def page_view(i: int, when: str) -> dict[str, Any]:
    return {
        "type": "page",
        "messageId": f"p-{i}",
        "anonymousId": f"a-{i}",
        "timestamp": when,
        "context": {
            "consent": GRANTED,
            "ip": f"203.0.113.{i % 250}",
            "userAgent": UA,
            "page": {"url": "https://www.shop.test/"},
            "clientIds": {"_ttp": f"2F7h37YkS1j57AYSKTI7IH{i}"},
        },
    }


def run(name: str, events: list[dict[str, Any]], batch: int, fwd: TikTokForwarder) -> None:
    now = datetime.now(UTC)
    started = time.perf_counter()
    size = 0
    for start in range(0, len(events), batch):
        plan = fwd.plan(events[start : start + batch], now)
        size += sum(len(p.request.body) for p in plan.requests)
    secs = time.perf_counter() - started
    n = len(events)
    print(
        f"{name:<10} {n / secs:>10,.0f} events/s  {secs / n * 1e6:>7.1f} us/event  "
        f"{size / n:>6.0f} body bytes/event"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    config = TikTokConfig.model_validate(
        {
            "id": "tiktok",
            "type": "tiktok",
            "pixel_code": "CQ1A2B3C4D5E6F7G8H9J",
            "access_token": "token",
            "default_phone_country": "US",
        }
    )
    http: Any = None
    fwd = TikTokForwarder(config, ForwarderContext(Path("."), http, Metrics()))
    when = datetime.now(UTC).isoformat()
    run("purchases", [purchase(i, when) for i in range(args.events)], args.batch, fwd)
    run("pageviews", [page_view(i, when) for i in range(args.events)], args.batch, fwd)


if __name__ == "__main__":
    main()
