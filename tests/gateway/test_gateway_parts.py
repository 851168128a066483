"""The gateway's pure parts: which requests are hits, which headers pass each way, and
what an Ads hit decodes to."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from tagrelay.gateway.headers import google_cookies, response_headers, upstream_headers
from tagrelay.gateway.hits import classify
from tagrelay.sources.google_ads_tag import decode_ads_hit, parse_ads_hit


@pytest.mark.parametrize(
    ("rest", "query", "kind"),
    [
        ("/", "id=GTM-ABCD1234", "script"),
        ("/", "", "script"),
        ("/", "id=G-1&cx=c&gtm=4e61k2", "script"),
        ("/gtm.js", "id=GTM-1", "script"),
        ("/gtag/js", "id=G-1", "script"),
        ("/_/service_worker/6920/sw.js", "path=%2Fmetrics", "script"),
        ("/healthy", "", "health"),
        ("/", "validate_geo=healthy", "health"),
        ("/ga/g/c", "v=2", "ga4_hit"),
        ("/ag/g/c", "v=2", "ga4_hit"),
        ("/g/collect", "v=2", "ga4_hit"),
        ("/gs/ccm/collect", "tid=AW-1", "ads_hit"),
        ("/as/p/c/123456789/", "en=conversion", "ads_hit"),
        ("/as/d/ccm/conversion/123456789/", "", "ads_hit"),
        ("/d/ccm/form-data/123456789", "", "ads_hit"),
        ("/g/d/ccm/conversion/123456789", "", "ads_hit"),
        ("/a", "id=GTM-1&v=3", "other"),
        ("/td", "id=GTM-1", "other"),
        ("/C_mYUAFo", "", "other"),
        ("/g/collectx", "", "other"),
    ],
)
def test_kinds(rest: str, query: str, kind: str) -> None:
    assert classify(rest, query) == kind


def test_google_cookies_keep_their_order_and_values() -> None:
    assert google_cookies("a=1; _ga=GA1.1.2.3; _gcl_au=1.1.x; b=_ga") == (
        "_ga=GA1.1.2.3; _gcl_au=1.1.x"
    )
    assert google_cookies("_gab=1; _gcl=2; FP=3; fpid=4") is None


def test_upstream_headers_drop_hop_by_hop_credentials_and_claims() -> None:
    incoming = CIMultiDict(
        [
            ("Host", "www.shop.test"),
            ("Connection", "close, X-Custom-Hop"),
            ("X-Custom-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "12"),
            ("Content-Type", "text/plain"),
            ("Cookie", "sid=1; _ga=GA1.1.2.3"),
            ("Cookie", "_gid=GA1.1.4.5"),
            ("X-Forwarded-Host", "www.shop.test"),
            ("X-Forwarded-Proto", "https"),
            ("X-Real-IP", "1.2.3.4"),
            ("CF-IPCountry", "US"),
            ("Accept-Encoding", "gzip, br"),
            ("X-Api-Key", "k"),
        ]
    )
    out = upstream_headers(incoming, own=["CF-IPCountry"], added={"X-Forwarded-For": "203.0.113.7"})
    assert list(out.items()) == [
        ("Content-Type", "text/plain"),
        ("Accept-Encoding", "gzip, br"),
        ("Cookie", "_ga=GA1.1.2.3; _gid=GA1.1.4.5"),
        ("X-Forwarded-For", "203.0.113.7"),
    ]


def test_response_headers_keep_every_set_cookie() -> None:
    upstream = CIMultiDict(
        [
            ("Content-Type", "application/javascript"),
            ("Set-Cookie", "FPID=1; Path=/"),
            ("Set-Cookie", "FPLC=2; Path=/"),
            ("Transfer-Encoding", "chunked"),
            ("Alt-Svc", 'h3=":443"'),
            ("Date", "Sat, 05 Dec 2026 12:00:00 GMT"),
            ("Server", "Google Tag Manager"),
            ("Content-Encoding", "br"),
        ]
    )
    assert list(response_headers(upstream).items()) == [
        ("Content-Type", "application/javascript"),
        ("Set-Cookie", "FPID=1; Path=/"),
        ("Set-Cookie", "FPLC=2; Path=/"),
        ("Content-Encoding", "br"),
    ]


def test_an_ads_hit_needs_an_event_name_and_a_click_id() -> None:
    assert parse_ads_hit("/gs/ccm/collect", "tid=AW-1&gclid=x") is None
    assert parse_ads_hit("/gs/ccm/collect", "tid=AW-1&en=page_view") is None
    assert decode_ads_hit(b"", "/gs/ccm/collect?en=page_view").events == []
    [event] = decode_ads_hit(b"ignored", "/gs/ccm/collect?tid=AW-77&en=page_view&gbraid=0AA").events
    assert event["context"]["clickIds"] == {"gbraid": "0AA"}
    assert event["context"]["googleAds"]["accountId"] == "AW-77"


def test_an_ads_hits_ids_are_stable() -> None:
    query = "en=conversion&gclid=Cj0&random=1"
    first = parse_ads_hit("/as/p/c/123456789/", query)
    again = parse_ads_hit("/as/p/c/123456789/", query)
    other = parse_ads_hit("/as/p/c/123456789/", query.replace("random=1", "random=2"))
    assert first is not None and again is not None and other is not None
    assert first["messageId"] == again["messageId"] != other["messageId"]
    assert first["anonymousId"] == other["anonymousId"]  # the same click
    assert first["context"]["googleAds"]["accountId"] == "AW-123456789"
