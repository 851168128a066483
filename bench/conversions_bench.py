"""The conversions layer and an ad forwarder's plan: events turned into the platform's
requests per second, without a network (the pure part of delivery).

Run:
    PYTHONPATH=src .venv/bin/python bench/conversions_bench.py                 # meta, 20k events
    PYTHONPATH=src .venv/bin/python bench/conversions_bench.py --forwarder tiktok
    PYTHONPATH=src .venv/bin/python bench/conversions_bench.py --events 100000

Two mixes, planned in batches of ``--batch`` events: purchases carrying every kind of user
data (email, phone, names, address, userId, IP, user agent, locale, the fbclid and ttclid
click ids, the fbp and _ttp browser ids; each platform takes what it uses) and products,
and page views carrying only IP, user agent and the browser ids (the common case). Prints
events/s and microseconds per event for each mix, and the body bytes per event.
``google_ads_bench.py`` does the same for Google Ads, with its answers' classification.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._conversions import ConversionsForwarder
from tagrelay.forwarders.meta_capi import MetaConfig, MetaForwarder
from tagrelay.forwarders.tiktok_events import TikTokConfig, TikTokForwarder
from tagrelay.metrics import Metrics

GRANTED = {"ads": "granted", "ad_user_data": "granted", "ad_personalization": "granted"}
UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) Chrome/124.0"


def browser_ids(i: int) -> dict[str, str]:
    return {"fbp": f"fb.1.1596403881668.{i}", "_ttp": f"2F7h37YkS1j57AYSKTI7IH{i}"}


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
            "page": {"url": f"https://www.shop.test/thanks?fbclid=Iw{i}&ttclid=E.C.P.{i}"},
            "clientIds": browser_ids(i),
            "traits": {
                "email": f"buyer.{i}@example.com",
                "phone": f"(650) 555-{1000 + i % 9000}",
                "firstName": "Jane",
                "lastName": "Doe",
                "address": {"city": "Menlo Park", "state": "CA", "postalCode": "94025"},
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
            "clientIds": browser_ids(i),
        },
    }


def run(
    name: str,
    events: list[dict[str, Any]],
    batch: int,
    fwd: ConversionsForwarder,  # type: ignore[type-arg]
) -> None:
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


def forwarder(name: str) -> ConversionsForwarder:  # type: ignore[type-arg]
    context = ForwarderContext(Path("."), None, Metrics())  # type: ignore[arg-type]
    common = {"id": name, "type": name, "access_token": "token", "default_phone_country": "US"}
    if name == "tiktok":
        tiktok = TikTokConfig.model_validate({**common, "pixel_code": "CQ1A2B3C4D5E6F7G8H9J"})
        return TikTokForwarder(tiktok, context)
    meta = MetaConfig.model_validate({**common, "pixel_id": "123456789012345"})
    return MetaForwarder(meta, context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forwarder", choices=["meta", "tiktok"], default="meta")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    fwd = forwarder(args.forwarder)
    when = datetime.now(UTC).isoformat()
    print(f"{args.forwarder}: {args.events:,} events per mix, batches of {args.batch}")
    run("purchases", [purchase(i, when) for i in range(args.events)], args.batch, fwd)
    run("pageviews", [page_view(i, when) for i in range(args.events)], args.batch, fwd)


if __name__ == "__main__":
    main()
