"""gtag ``/g/collect`` hits into events (sources.ga4.parse_collect)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tagrelay.errors import IngestError
from tagrelay.sources.ga4 import (
    MAX_COLLECT_EVENTS,
    Hits,
    parse_collect,
    parse_consent_gcd,
    parse_consent_gcs,
)

TID = "G-8XK2MS9Q4T"
CID = "1938271044.1731420000"

# A page_view as Chrome on Windows sends it, everything in the query string (GET).
PAGE_VIEW_QUERY = (
    f"v=2&tid={TID}&gtm=45je4b20v9175741929za200&_p=1731425083917&gcs=G111&gcd=13r3r2r2r5l1"
    f"&npa=0&dma=0&cid={CID}&ul=en-us&sr=1920x1080&uaa=x86&uab=64"
    "&uafvl=Chromium%3B130.0.6723.117%7CGoogle%2520Chrome%3B130.0.6723.117"
    "%7CNot%253FA_Brand%3B99.0.0.0"
    "&uamb=0&uam=&uap=Windows&uapv=15.0.0&uaw=0&are=1&frm=0&pscdl=noapi&_s=1"
    "&sid=1731425080&sct=7&seg=1"
    "&dl=https%3A%2F%2Fshop.example.com%2Fproducts%2Ftee%3Futm_source%3Dnews%23top"
    "&dr=https%3A%2F%2Fwww.google.com%2F&dt=Stan%20and%20Friends%20Tee&en=page_view&_et=12"
    "&tfd=2113"
)

# A batched POST from an iPhone: shared params in the query, one event per body line.
BATCH_QUERY = (
    f"v=2&tid={TID}&gtm=45je4b20v9175741929za200&_p=1731425083917&gcs=G111&gcd=13r3r2r2r5l1"
    f"&npa=0&dma=0&cid={CID}&ul=en-gb&sr=390x844&uamb=1&uam=iPhone&uap=iOS&uapv=17.5.0"
    "&_s=4&sid=1731425080&sct=7&seg=1&uid=user-881"
    "&dl=https%3A%2F%2Fshop.example.com%2Fcheckout%2Fthanks%3Forder%3DT-1001"
    "&dr=https%3A%2F%2Fshop.example.com%2Fcheckout&dt=Thank%20you"
    "&up.plan=pro&upn.lifetime_orders=3&tfd=5702&richsstsse"
)
PAYMENT_LINE = "en=add_payment_info&ep.payment_type=card&_et=3012"
PURCHASE_LINE = (
    "en=purchase&_c=1&ep.transaction_id=T-1001&epn.value=42.5&epn.tax=4.25&epn.shipping=0"
    "&cu=EUR&ep.coupon=SUMMER"
    "&pr1=idSKU_1~nmStan%20and%20Friends%20Tee~brGoogle~caApparel~c2Adult~vagreen~pr10.01"
    "~qt3~lp0~k0color~v0green"
    "&pr2=idSKU_2~nmMug~pr12.47~qt1~k0material~v0ceramic~k1gift_wrap~v1yes"
    "&_et=1540"
)
SCROLL_LINE = "en=scroll&epn.percent_scrolled=90&_et=800"
BATCH_BODY = f"{PAYMENT_LINE}\n{PURCHASE_LINE}\n{SCROLL_LINE}"

GRANTED_ALL_CONSENT = {
    "ads": "granted",
    "analytics": "granted",
    "ad_user_data": "granted",
    "ad_personalization": "granted",
    "gcs": "G111",
    "gcd": "13r3r2r2r5l1",
    "dma": "0",
}


def ga4_flags(**overrides: Any) -> dict[str, Any]:
    flags: dict[str, Any] = {
        "measurementId": TID,
        "sessionEngaged": True,
        "firstVisit": False,
        "sessionStart": False,
        "newSessionId": False,
        "conversion": False,
        "debug": False,
    }
    flags.update(overrides)
    return flags


def one(query: str, body: str = "") -> dict[str, Any]:
    hits = parse_collect(query, body)
    assert hits.rejected == []
    assert len(hits.events) == 1
    event: dict[str, Any] = hits.events[0]
    return event


def minimal(extra: str = "", en: str = "click") -> str:
    return f"v=2&tid={TID}&cid={CID}&en={en}{extra}"


# -- golden hits -------------------------------------------------------------------------


def test_get_page_view_decodes_every_part() -> None:
    assert parse_collect(PAGE_VIEW_QUERY, "") == Hits(
        events=[
            {
                "type": "page",
                "event": "page_view",
                "name": "Stan and Friends Tee",
                "messageId": "07878c619e00bdb0dba63696312a7fb0",
                "anonymousId": CID,
                "properties": {},
                "context": {
                    "page": {
                        "url": "https://shop.example.com/products/tee?utm_source=news#top",
                        "path": "/products/tee",
                        "search": "?utm_source=news",
                        "referrer": "https://www.google.com/",
                        "title": "Stan and Friends Tee",
                        "host": "shop.example.com",
                    },
                    "locale": "en-us",
                    "screen": {"width": 1920, "height": 1080},
                    "userAgentData": {
                        "architecture": "x86",
                        "bitness": "64",
                        "model": "",
                        "platform": "Windows",
                        "platformVersion": "15.0.0",
                        "fullVersionList": [
                            {"brand": "Chromium", "version": "130.0.6723.117"},
                            {"brand": "Google Chrome", "version": "130.0.6723.117"},
                            {"brand": "Not?A_Brand", "version": "99.0.0.0"},
                        ],
                        "mobile": False,
                        "wow64": False,
                    },
                    "clientIds": {
                        "ga4": {
                            "clientId": CID,
                            "sessionIds": {TID: "1731425080"},
                            "sessionNumbers": {TID: 7},
                        }
                    },
                    "consent": GRANTED_ALL_CONSENT,
                    "ga4": {
                        **ga4_flags(engagementTimeMsec=12),
                        "request": PAGE_VIEW_QUERY,
                        "event": "",
                    },
                },
            }
        ],
        rejected=[],
    )


def batch_context(line: str, **flags: Any) -> dict[str, Any]:
    return {
        "page": {
            "url": "https://shop.example.com/checkout/thanks?order=T-1001",
            "path": "/checkout/thanks",
            "search": "?order=T-1001",
            "referrer": "https://shop.example.com/checkout",
            "title": "Thank you",
            "host": "shop.example.com",
        },
        "locale": "en-gb",
        "screen": {"width": 390, "height": 844},
        "userAgentData": {
            "model": "iPhone",
            "platform": "iOS",
            "platformVersion": "17.5.0",
            "mobile": True,
        },
        "traits": {"plan": "pro", "lifetime_orders": 3},
        "clientIds": {
            "ga4": {
                "clientId": CID,
                "sessionIds": {TID: "1731425080"},
                "sessionNumbers": {TID: 7},
            }
        },
        "consent": GRANTED_ALL_CONSENT,
        "ga4": {**ga4_flags(**flags), "request": BATCH_QUERY, "event": line},
    }


def test_batched_post_gives_one_event_per_line_with_items() -> None:
    hits = parse_collect(BATCH_QUERY, BATCH_BODY)
    assert hits.rejected == []
    assert [(e["type"], e["event"]) for e in hits.events] == [
        ("track", "add_payment_info"),
        ("track", "purchase"),
        ("track", "scroll"),
    ]
    payment, purchase, scroll = hits.events
    assert payment == {
        "type": "track",
        "event": "add_payment_info",
        "messageId": payment["messageId"],
        "anonymousId": CID,
        "userId": "user-881",
        "properties": {"payment_type": "card"},
        "context": batch_context(PAYMENT_LINE, engagementTimeMsec=3012),
    }
    assert purchase == {
        "type": "track",
        "event": "purchase",
        "messageId": purchase["messageId"],
        "anonymousId": CID,
        "userId": "user-881",
        "properties": {
            "transaction_id": "T-1001",
            "value": 42.5,
            "tax": 4.25,
            "shipping": 0,
            "coupon": "SUMMER",
            "currency": "EUR",
            "items": [
                {
                    "item_id": "SKU_1",
                    "item_name": "Stan and Friends Tee",
                    "item_brand": "Google",
                    "item_category": "Apparel",
                    "item_category2": "Adult",
                    "item_variant": "green",
                    "price": 10.01,
                    "quantity": 3,
                    "index": 0,
                    "color": "green",
                },
                {
                    "item_id": "SKU_2",
                    "item_name": "Mug",
                    "price": 12.47,
                    "quantity": 1,
                    "material": "ceramic",
                    "gift_wrap": "yes",
                },
            ],
        },
        "context": batch_context(PURCHASE_LINE, engagementTimeMsec=1540, conversion=True),
    }
    assert scroll["properties"] == {"percent_scrolled": 90}
    assert scroll["context"] == batch_context(SCROLL_LINE, engagementTimeMsec=800)
    ids = [e["messageId"] for e in hits.events]
    assert len(set(ids)) == 3
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_first_visit_session_start_hit() -> None:
    query = minimal("&_fv=1&_ss=1&_nsi=1&seg=0&sct=1&sid=1731425080", en="page_view")
    event = one(query)
    assert event["type"] == "page"
    assert event["event"] == "page_view"
    assert "name" not in event  # no dt
    assert event["context"]["ga4"] == {
        **ga4_flags(sessionEngaged=False, firstVisit=True, sessionStart=True, newSessionId=True),
        "request": query,
        "event": "",
    }
    assert event["context"]["clientIds"] == {
        "ga4": {"clientId": CID, "sessionIds": {TID: "1731425080"}, "sessionNumbers": {TID: 1}}
    }


def test_minimal_hit_has_only_what_is_present() -> None:
    query = f"v=2&tid={TID}&en=click"
    assert one(query) == {
        "type": "track",
        "event": "click",
        "messageId": one(query)["messageId"],
        "properties": {},
        "context": {
            "ga4": {**ga4_flags(sessionEngaged=False), "request": query, "event": ""},
        },
    }


# -- parameters --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("10", 10),
        ("-3", -3),
        ("10.5", 10.5),
        ("1.0", 1),
        ("1e3", 1000),
        (".5", 0.5),
        ("2.5E-1", 0.25),
        ("abc", "abc"),
        ("", ""),
        ("nan", "nan"),
        ("inf", "inf"),
        ("1e400", "1e400"),
        ("1_000", "1_000"),
        ("99999999999999999999", "99999999999999999999"),
        ("1e20", 1e20),
    ],
)
def test_numeric_event_parameters(raw: str, expected: object) -> None:
    props = one(minimal(f"&epn.amount={raw}"))["properties"]
    assert props == {"amount": expected}
    assert type(props["amount"]) is type(expected)


def test_string_and_numeric_params_user_properties_and_currency() -> None:
    event = one(
        minimal("&ep.method=Google&ep.count=7&epn.value=3&cu=USD&up.tier=gold&upn.age=41.5")
    )
    assert event["properties"] == {"method": "Google", "count": "7", "value": 3, "currency": "USD"}
    assert event["context"]["traits"] == {"tier": "gold", "age": 41.5}


def test_parameters_with_empty_names_are_ignored() -> None:
    event = one(minimal("&ep.=x&epn.=1&up.=y&upn.=2"))
    assert event["properties"] == {}
    assert "traits" not in event["context"]


def test_uid_empty_sets_no_user_id() -> None:
    event = one(minimal("&uid="))
    assert "userId" not in event
    assert event["anonymousId"] == CID


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # unknown two-letter keys are kept raw; location as "lo" (gtag) or "lc"
        ("idA~zzraw~loChIJ123", {"item_id": "A", "zz": "raw", "location_id": "ChIJ123"}),
        ("idA~lcStore-9", {"item_id": "A", "location_id": "Store-9"}),
        (
            "idA~afShop~cpSAVE~ds1.5~lnRelated~lirelated~c3Shirts~c4Crew~c5Short",
            {
                "item_id": "A",
                "affiliation": "Shop",
                "coupon": "SAVE",
                "discount": 1.5,
                "item_list_name": "Related",
                "item_list_id": "related",
                "item_category3": "Shirts",
                "item_category4": "Crew",
                "item_category5": "Short",
            },
        ),
        (
            "idA~pipromo1~pnSummer~cnBanner~csslot2",
            {
                "item_id": "A",
                "promotion_id": "promo1",
                "promotion_name": "Summer",
                "creative_name": "Banner",
                "creative_slot": "slot2",
            },
        ),
        # invalid numbers stay strings
        ("idA~prfree~qtsome", {"item_id": "A", "price": "free", "quantity": "some"}),
        # custom params: two-digit indexes, values starting with digits
        (
            "idA~k1size~v142~k10weight~v1012kg",
            {"item_id": "A", "size": "42", "weight": "12kg"},
        ),
        # k without v, v without k: kept under their raw keys
        ("idA~k3lonely~v7orphan", {"item_id": "A", "v7": "orphan", "k3": "lonely"}),
        # empty fields and an empty custom value
        ("idA~~k0note~v0", {"item_id": "A", "note": ""}),
    ],
)
def test_item_fields(value: str, expected: dict[str, Any]) -> None:
    event = one(minimal("&pr1=" + value.replace(" ", "%20"), en="view_item"))
    assert event["properties"] == {"items": [expected]}


def test_items_are_ordered_by_index_not_by_position() -> None:
    event = one(minimal("&pr10=idJ&pr2=idB&pr1=idA", en="view_cart"))
    assert event["properties"]["items"] == [{"item_id": "A"}, {"item_id": "B"}, {"item_id": "J"}]


def test_params_named_like_items_but_not_items_are_ignored() -> None:
    event = one(minimal("&prx=idA&pr=idB&pr%C2%B2=idC"))
    assert event["properties"] == {}


def test_page_derivation() -> None:
    bare = one(minimal("&dl=https%3A%2F%2Fexample.com"))["context"]["page"]
    assert bare == {"url": "https://example.com", "path": "/", "search": "", "host": "example.com"}
    with_dh = one(minimal("&dl=https%3A%2F%2Fexample.com%2Fa&dh=www.example.com"))
    assert with_dh["context"]["page"]["host"] == "www.example.com"
    broken = one(minimal("&dl=http%3A%2F%2F%5B%3A%3A1%2Fx"))["context"]["page"]
    assert broken == {"url": "http://[::1/x"}
    only_title = one(minimal("&dt=Home&dr="))["context"]["page"]
    assert only_title == {"title": "Home"}


def test_an_event_line_overrides_the_shared_params() -> None:
    query = f"v=2&tid={TID}&cid={CID}&dl=https%3A%2F%2Fa.test%2Fone&dt=One"
    line = "en=page_view&dl=https%3A%2F%2Fa.test%2Ftwo&dt=Two&tid=G-OTHER"
    event = one(query, line)
    assert event["name"] == "Two"
    assert event["context"]["page"]["path"] == "/two"
    # the measurement id is the request's
    assert event["context"]["ga4"]["measurementId"] == TID


@pytest.mark.parametrize(
    ("sr", "screen"),
    [("1920x1080", {"width": 1920, "height": 1080}), ("big", None), ("1920x", None)],
)
def test_screen(sr: str, screen: dict[str, int] | None) -> None:
    assert one(minimal(f"&sr={sr}"))["context"].get("screen") == screen


def test_client_hints_full_version_list_edge_cases() -> None:
    event = one(minimal("&uafvl=NoVersion%7C%7CBrand%3B1.2&uamb=1&uaw=1"))
    assert event["context"]["userAgentData"] == {
        "fullVersionList": [
            {"brand": "NoVersion", "version": ""},
            {"brand": "Brand", "version": "1.2"},
        ],
        "mobile": True,
        "wow64": True,
    }


def test_invalid_session_count_and_engagement_time_are_left_out() -> None:
    event = one(minimal("&sct=x&_et=1.5"))
    assert "clientIds" in event["context"]
    assert event["context"]["clientIds"] == {"ga4": {"clientId": CID}}
    assert "engagementTimeMsec" not in event["context"]["ga4"]


# -- debug and raw strings ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "debug"),
    [
        ("&_dbg=1", True),
        ("&ep.debug_mode=true", True),
        ("&ep.debug_mode=1", True),
        ("&ep.debug_mode=false", False),
        ("&ep.debug_mode=0", False),
        ("", False),
    ],
)
def test_debug_hits(extra: str, debug: bool) -> None:
    assert one(minimal(extra))["context"]["ga4"]["debug"] is debug


def test_unknown_params_are_kept_verbatim_in_the_raw_strings() -> None:
    query = (
        f"v=2&tid={TID}&gtm=45je4b20v9175741929za200&_p=1731425083917&cid={CID}"
        "&richsstsse&sst.tft=1731425083917&sst.gcd=13r3r2r2r5l1&sst.etld=google.co.uk"
        "&_z=ccd.v9B&x-new=a+b%20c%2Fd&tfd=2113&_s=3"
    )
    line = "en=custom&_ee=1&ep.label=a%2Bb+c&zz.future=%E2%9C%93&ir=1"
    event = one(query, line)
    assert event["context"]["ga4"]["request"] == query
    assert event["context"]["ga4"]["event"] == line
    assert event["properties"] == {"label": "a+b c"}


def test_crlf_and_blank_lines() -> None:
    hits = parse_collect(minimal(), "en=a\r\n\r\n   \nen=b\r\n")
    assert [e["event"] for e in hits.events] == ["a", "b"]
    assert [e["context"]["ga4"]["event"] for e in hits.events] == ["en=a", "en=b"]


def test_a_blank_body_makes_the_query_the_event() -> None:
    assert one(minimal(), "\n  \r\n")["event"] == "click"


def test_malformed_percent_encoding_is_tolerated() -> None:
    event = one(minimal("&ep.bad=100%zz&ep.half=%E2%9C&dt=a%"))
    assert event["properties"] == {"bad": "100%zz", "half": "\ufffd"}
    assert event["context"]["page"] == {"title": "a%"}


# -- consent -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gcs", "expected"),
    [
        ("G100", {"ads": "denied", "analytics": "denied"}),
        ("G110", {"ads": "granted", "analytics": "denied"}),
        ("G101", {"ads": "denied", "analytics": "granted"}),
        ("G111", {"ads": "granted", "analytics": "granted"}),
        ("G1--", {}),
        ("G2111", {}),
        ("", {}),
    ],
)
def test_gcs(gcs: str, expected: dict[str, str]) -> None:
    assert parse_consent_gcs(gcs) == expected
    consent = one(minimal(f"&gcs={gcs}"))["context"]["consent"]
    assert consent == {**expected, "gcs": gcs}


D, G = "denied", "granted"


@pytest.mark.parametrize(
    ("gcd", "expected"),
    [
        # every signal denied by default, no update (banner not answered yet)
        ("11p1p1p1p5", {"ads": D, "analytics": D, "ad_user_data": D, "ad_personalization": D}),
        # every signal granted by default
        ("11t1t1t1t5", {"ads": G, "analytics": G, "ad_user_data": G, "ad_personalization": G}),
        # denied by default, then all granted (accept all); newer tail "l1"
        ("13r3r2r2r5l1", {"ads": G, "analytics": G, "ad_user_data": G, "ad_personalization": G}),
        # denied by default and after the update (reject all)
        ("13q3q2q2q5l1", {"ads": D, "analytics": D, "ad_user_data": D, "ad_personalization": D}),
        # analytics only accepted
        ("13q3r2q2q5l1", {"ads": D, "analytics": G, "ad_user_data": D, "ad_personalization": D}),
        # granted by default, ads withdrawn by the user
        ("13u3v3u3u5", {"ads": D, "analytics": G, "ad_user_data": D, "ad_personalization": D}),
        # update without default: m denied, n granted
        ("11m1n1m1n5", {"ads": D, "analytics": G, "ad_user_data": D, "ad_personalization": G}),
        # v1-only setup: ad_user_data / ad_personalization not set
        ("11p1p1l1l5", {"ads": D, "analytics": D}),
        ("11l1l1l1l5", {}),
        # "e": updated to granted
        ("11e1e1e1e5", {"ads": G, "analytics": G, "ad_user_data": G, "ad_personalization": G}),
        # unknown letter: that signal is not stated
        ("11x1r1r1r5", {"analytics": G, "ad_user_data": G, "ad_personalization": G}),
        # other shapes state nothing
        ("1p1p1p1p", {}),
        ("garbage", {}),
        ("", {}),
    ],
)
def test_gcd(gcd: str, expected: dict[str, str]) -> None:
    assert parse_consent_gcd(gcd) == expected
    consent = one(minimal(f"&gcd={gcd}"))["context"]["consent"]
    assert consent == {**expected, "gcd": gcd}


def test_gcd_refines_gcs_and_npa_denies_personalization() -> None:
    consent = one(minimal("&gcs=G111&gcd=13q3r2r2r5l1&npa=1&dma=1"))["context"]["consent"]
    assert consent == {
        "ads": "denied",
        "analytics": "granted",
        "ad_user_data": "granted",
        "ad_personalization": "denied",
        "gcs": "G111",
        "gcd": "13q3r2r2r5l1",
        "dma": "1",
    }


def test_npa_alone() -> None:
    assert one(minimal("&npa=1"))["context"]["consent"] == {"ad_personalization": "denied"}
    assert "consent" not in one(minimal("&npa=0"))["context"]


def test_no_consent_params_no_consent_object() -> None:
    assert "consent" not in one(minimal())["context"]


# -- message ids -------------------------------------------------------------------------


def test_a_resent_request_gets_the_same_message_ids() -> None:
    first = [e["messageId"] for e in parse_collect(BATCH_QUERY, BATCH_BODY).events]
    again = [e["messageId"] for e in parse_collect(BATCH_QUERY, BATCH_BODY).events]
    assert first == again


def test_the_same_line_alone_keeps_its_id() -> None:
    alone = one(BATCH_QUERY, PURCHASE_LINE)["messageId"]
    in_batch = parse_collect(BATCH_QUERY, BATCH_BODY).events[1]["messageId"]
    assert alone == in_batch


def test_repeated_lines_and_different_hits_get_different_ids() -> None:
    hits = parse_collect(minimal(), "en=a\nen=a\nen=a\nen=b")
    ids = [e["messageId"] for e in hits.events]
    assert len(set(ids)) == 4
    other_query = parse_collect(minimal("&_s=2"), "en=a").events[0]["messageId"]
    assert other_query not in ids
    get_hit = one(minimal())["messageId"]
    assert get_hit not in ids


def test_query_and_line_boundaries_do_not_collide() -> None:
    # The same characters split differently between query and line
    a = parse_collect(minimal("&x=1"), "en=a&y=2").events[0]["messageId"]
    b = parse_collect(minimal("&x=1&en=a"), "y=2").events[0]["messageId"]
    assert a != b


# -- errors ------------------------------------------------------------------------------


def error_of(query: str, body: str = "") -> IngestError:
    with pytest.raises(IngestError) as caught:
        parse_collect(query, body)
    return caught.value


@pytest.mark.parametrize(
    ("query", "code"),
    [
        (f"v=2&cid={CID}&en=page_view", "missing_measurement_id"),
        (f"v=2&tid=&cid={CID}&en=page_view", "missing_measurement_id"),
        ("", "missing_measurement_id"),
        (f"v=1&tid={TID}&en=page_view", "unsupported_version"),
        (f"tid={TID}&en=page_view", "unsupported_version"),
        (f"v=2&tid={TID}&cid={CID}", "missing_event_name"),
        (f"v=2&tid={TID}&cid={CID}&en=", "missing_event_name"),
    ],
)
def test_request_errors(query: str, code: str) -> None:
    error = error_of(query)
    assert error.code == code
    assert error.status == 400


def test_the_version_error_says_what_arrived() -> None:
    assert "got '1'" in error_of(f"v=1&tid={TID}&en=x").message
    assert "got none" in error_of(f"tid={TID}&en=x").message


def test_missing_tid_is_checked_on_the_query_even_with_a_body() -> None:
    assert error_of("v=2", f"tid={TID}&en=a").code == "missing_measurement_id"


def test_lines_without_event_name_are_rejected_one_by_one() -> None:
    hits = parse_collect(f"v=2&tid={TID}&cid={CID}", "en=a\nep.x=1\n\nen=b\nen=")
    assert [e["event"] for e in hits.events] == ["a", "b"]
    assert [(index, error.code) for index, error in hits.rejected] == [
        (1, "missing_event_name"),
        (3, "missing_event_name"),
    ]


def test_a_shared_en_names_lines_without_their_own() -> None:
    hits = parse_collect(minimal(en="shared"), "ep.x=1\nen=own")
    assert [e["event"] for e in hits.events] == ["shared", "own"]


def test_too_many_events() -> None:
    body = "\n".join(f"en=e{i}" for i in range(MAX_COLLECT_EVENTS))
    assert len(parse_collect(minimal(), body).events) == MAX_COLLECT_EVENTS
    error = error_of(minimal(), body + "\nen=one_more")
    assert error.code == "too_many_events"
    assert "501" in error.message
