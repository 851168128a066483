"""The google_ads forwarder's pure parts: events planned into uploadClickConversions requests
per second, and the classification of Google's answers (a partial failure read as JSON,
and one cut at the shared 64 KiB limit and scanned), without a network.

Run:
    PYTHONPATH=src .venv/bin/python bench/google_ads_bench.py                 # 20k events
    PYTHONPATH=src .venv/bin/python bench/google_ads_bench.py --events 100000

The events are ``conversions_bench``'s purchases (every kind of user data, of which Google
takes the hashed email and phone) with a gclid, planned in batches of ``--batch``. Prints
events/s, microseconds per event and body bytes per event; then the time to classify a
2,000-row answer with 100 and with 300 row errors, whole and cut (how many of the
failed rows the cut answer still names).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conversions_bench import purchase

from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._http import HttpResponse
from tagrelay.forwarders.google_ads import (
    GoogleAdsConfig,
    GoogleAdsForwarder,
    classify_google_ads_response,
)
from tagrelay.metrics import Metrics

ACTION = "customers/1234567890/conversionActions/111"
CUT = 64 * 1024
"""What the shared HTTP layer keeps of an answer."""


def answer(rows: int, failed: int) -> bytes:
    """Google's answer, indented as it prints it: row errors first, then a result per row."""
    errors = [
        {
            "errorCode": {"conversionUploadError": "CLICK_NOT_FOUND"},
            "message": "The click associated with the given identifier can't be found.",
            "trigger": {"stringValue": f"gclid-{i}"},
            "location": {
                "fieldPathElements": [
                    {"fieldName": "conversions", "index": i},
                    {"fieldName": "gclid"},
                ]
            },
        }
        for i in range(failed)
    ]
    body = {
        "partialFailureError": {
            "code": 3,
            "message": "Multiple errors in 'details'. First error: ...",
            "details": [{"errors": errors, "requestId": "req"}],
        },
        "results": [
            {} if i < failed else {"gclid": f"gclid-{i}", "conversionAction": ACTION}
            for i in range(rows)
        ],
    }
    return json.dumps(body, indent=2).encode()


def time_classify(name: str, body: bytes, rows: int, failed: int, repeat: int = 50) -> None:
    response = HttpResponse(200, {}, body)
    started = time.perf_counter()
    for _ in range(repeat):
        outcome = classify_google_ads_response(response, rows)
    secs = (time.perf_counter() - started) / repeat
    rejected = len(getattr(outcome, "rejected", {}))
    print(
        f"{name:<22} {secs * 1e3:>7.2f} ms  {len(body):>8,} bytes  "
        f"{rejected} of {failed} failed rows rejected"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    config = GoogleAdsConfig.model_validate(
        {
            "id": "gads",
            "type": "google_ads",
            "customer_id": "123-456-7890",
            "developer_token": "token",
            "oauth": {"client_id": "c", "client_secret": "s", "refresh_token": "r"},
            "conversions": [{"event": "Order Completed", "conversion_action": ACTION}],
            "default_phone_country": "US",
        }
    )
    http: Any = None
    fwd = GoogleAdsForwarder(config, ForwarderContext(Path("."), http, Metrics()))
    when = datetime.now(UTC).isoformat()
    events = []
    for i in range(args.events):
        event = purchase(i, when)
        event["context"]["clickIds"] = {"gclid": f"Cj0KCQiA-{i}"}
        events.append(event)
    now = datetime.now(UTC)
    started = time.perf_counter()
    size = 0
    for start in range(0, len(events), args.batch):
        plan = fwd.plan(events[start : start + args.batch], now)
        size += sum(len(p.request.body) for p in plan.requests)
    secs = time.perf_counter() - started
    n = len(events)
    print(
        f"{'purchases':<10} {n / secs:>10,.0f} events/s  {secs / n * 1e6:>7.1f} us/event  "
        f"{size / n:>6.0f} body bytes/event"
    )
    for failed in (100, 300):
        body = answer(2000, failed)
        time_classify("answer, whole JSON", body, 2000, failed)
        time_classify("answer, cut at 64 KiB", body[:CUT], 2000, failed)


if __name__ == "__main__":
    main()
