"""The google_ads forwarder's pure parts: events planned into uploadClickConversions requests
per second, and the classification of Google's answers (a partial failure read as JSON,
and one cut at the shared 64 KiB limit and scanned), without a network.

Run:
    PYTHONPATH=src .venv/bin/python bench/google_ads_bench.py                 # 20k events
    PYTHONPATH=src .venv/bin/python bench/google_ads_bench.py --events 100000 --visitors 0

The events are ``conversions_bench``'s purchases (every kind of user data, of which Google
takes the hashed email and phone, and a gclid) from a pool of ``--visitors`` visitors (0: a
new one per event), planned in batches of ``--batch``. Prints events/s, microseconds per
event, body bytes per event and the hit rate of ``forwarders._user_data``'s caches; then
the time to classify a 2,000-row answer with 100 and with 300 row errors, whole and cut
(how many of the failed rows the cut answer still names).
"""

from __future__ import annotations

import argparse
import json
import time

from conversions_bench import ACTION, forwarder, mix, purchase, run, stored

from tagrelay.forwarders._http import HttpResponse
from tagrelay.forwarders.google_ads import classify_google_ads_response

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
    parser.add_argument(
        "--visitors", type=int, default=1000, help="pool of visitors; 0: a new one per event"
    )
    args = parser.parse_args()
    pool = f"{args.visitors:,} visitors" if args.visitors else "a new visitor per event"
    print(f"google_ads: {args.events:,} purchases from {pool}, batches of {args.batch}")
    batches = stored(mix(purchase, args.events, args.visitors), args.batch)
    run("purchases", batches, {"google_ads": forwarder("google_ads")})
    for failed in (100, 300):
        body = answer(2000, failed)
        time_classify("answer, whole JSON", body, 2000, failed)
        time_classify("answer, cut at 64 KiB", body[:CUT], 2000, failed)


if __name__ == "__main__":
    main()
