"""What every forwarder type in the registry promises, checked the same way for each: a new
forwarder is held to it without anyone writing a new test (it only needs its entry in
``CONFIGS``, and the first test fails until it has one).

- It never changes the events it is given: in the delivery process every forwarder is handed
  the same decoded event objects (``_process.SpanCache``).
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from tagrelay.forwarders import FORWARDERS, ForwarderContext
from tests.support import fake_server

NOW = datetime.now(UTC)

CONFIGS: dict[str, dict[str, Any]] = {
    "ga4": {
        "measurement_id": "G-CONTRACT1",
        "api_secret": "ga4-secret-value",
        "mp_url": "{url}/mp/collect",
        "collect_url": "{url}/g/collect",
    },
    "google_ads": {
        "customer_id": "123-456-7890",
        "developer_token": "gads-developer-secret",
        "oauth": {
            "client_id": "client.apps.googleusercontent.com",
            "client_secret": "gads-client-secret",
            "refresh_token": "gads-refresh-secret",
        },
        "token_url": "{url}/token",
        "base_url": "{url}",
        "conversions": [
            {
                "event": "Order Completed",
                "conversion_action": "customers/1234567890/conversionActions/1",
            }
        ],
    },
    "linkedin": {
        "access_token": "linkedin-secret-token",
        "base_url": "{url}",
        "conversions": [{"event": "Order Completed", "conversion_rule_id": "104"}],
    },
    "meta": {"pixel_id": "1234567890", "access_token": "meta-secret-token", "base_url": "{url}"},
    "microsoft": {
        "uet_tag_id": "187012345",
        "access_token": "microsoft-secret-token",
        "base_url": "{url}",
    },
    "pinterest": {
        "ad_account_id": "549755885175",
        "access_token": "pinterest-secret-token",
        "base_url": "{url}",
    },
    "reddit": {
        "pixel_id": "a2_gu5a8gq2hzbq",
        "access_token": "reddit-secret-token",
        "base_url": "{url}",
    },
    "snapchat": {
        "pixel_id": "5d8e3f1a-2b4c-4d6e-8f90-1a2b3c4d5e6f",
        "access_token": "snap-secret-token",
        "base_url": "{url}",
    },
    "tiktok": {
        "pixel_code": "CQ1A2B3C4D5E6F7G8H9J",
        "access_token": "tiktok-secret-token",
        "base_url": "{url}",
    },
    "webhook": {"endpoint": "{url}/hook"},
    "x": {
        "pixel_id": "o8z6j",
        "consumer_key": "x-consumer-key",
        "consumer_secret": "x-consumer-secret",
        "access_token": "x-access-token",
        "access_token_secret": "x-access-token-secret",
        "base_url": "{url}",
        "conversions": [{"event": "Order Completed", "event_id": "tw-o8z6j-o87ne"}],
    },
}
"""A working configuration of each HTTP forwarder type, pointed at the fake (``{url}``)."""

HTTP_TYPES = sorted(t for t, cls in FORWARDERS.items() if cls.in_delivery_process)

GRANTED = {
    "analytics": "granted",
    "ads": "granted",
    "ad_user_data": "granted",
    "ad_personalization": "granted",
}
UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36"


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def contract_events() -> list[dict[str, Any]]:
    """A page view, a purchase with items and every kind of user data, one without ``ads``
    consent, one without ``ad_user_data``, and one 8 days old."""
    context = {
        "consent": GRANTED,
        "ip": "203.0.113.9",
        "userAgent": UA,
        "locale": "en-US",
        "page": {
            "url": "https://www.shop.test/thanks?gclid=Cj0KCQ-contract&fbclid=IwAR-contract",
            "referrer": "https://www.google.com/",
            "path": "/thanks",
            "title": "Thanks",
        },
        "traits": {
            "email": "Buyer.Contract@Example.com",
            "phone": "+1 (650) 555-1212",
            "firstName": "Zoë",
            "lastName": "Müller",
            "address": {
                "city": "San Francisco",
                "state": "CA",
                "postalCode": "94107",
                "country": "US",
            },
        },
        "clickIds": {
            "gclid": "Cj0KCQ-contract",
            "fbclid": "IwAR-contract",
            "ttclid": "E.C.P.contract",
            "li_fat_id": "contract-li-fat-id",
            "ScCid": "contract-sc-cid",
            "epik": "contract-epik",
            "rdt_cid": "contract-rdt-cid",
            "twclid": "contract-twclid",
            "msclkid": "0f8fad5bd9cb469fa16570867728950e",
        },
        "clientIds": {"fbp": "fb.1.1700000000000.123", "_ttp": "contract-ttp"},
    }
    page = {
        "type": "page",
        "anonymousId": "anon-1",
        "messageId": "contract-page",
        "timestamp": iso(NOW),
        "receivedAt": iso(NOW),
        "properties": {"url": context["page"]["url"], "path": "/thanks"},
        "context": context,
    }
    purchase = {
        "type": "track",
        "event": "Order Completed",
        "anonymousId": "anon-1",
        "userId": "user-contract",
        "messageId": "contract-purchase",
        "timestamp": iso(NOW),
        "receivedAt": iso(NOW),
        "properties": {
            "order_id": "o-contract",
            "revenue": 99.5,
            "currency": "usd",
            "products": [
                {"product_id": "p-1", "sku": "SKU-1", "name": "Mug", "price": 12.5, "quantity": 2},
                {"product_id": "p-2", "name": "Tee", "price": 74.5, "quantity": 1},
            ],
        },
        "context": context,
    }
    no_ads = copy.deepcopy(purchase)
    no_ads["messageId"] = "contract-no-ads"
    no_ads["context"]["consent"] = {**GRANTED, "ads": "denied"}
    no_user_data = copy.deepcopy(purchase)
    no_user_data["messageId"] = "contract-no-user-data"
    no_user_data["context"]["consent"] = {**GRANTED, "ad_user_data": "denied"}
    old = copy.deepcopy(purchase)
    old["messageId"] = "contract-old"
    old["timestamp"] = old["receivedAt"] = iso(NOW - timedelta(days=8))
    return [page, purchase, no_ads, no_user_data, old]


SUCCESS = (
    b'{"code":0,"message":"OK","access_token":"contract-access","expires_in":3600,'
    b'"token_type":"Bearer"}'
)


@pytest.fixture
async def fake_url() -> AsyncIterator[str]:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=SUCCESS, content_type="application/json")

    async with fake_server("any destination", {"/{tail:.*}": ok}) as server:
        yield str(server.make_url("")).rstrip("/")


def make(kind: str, url: str, context: ForwarderContext) -> Any:
    raw = {
        k: (v.replace("{url}", url) if isinstance(v, str) else v) for k, v in CONFIGS[kind].items()
    }
    cls = FORWARDERS[kind]
    config = cls.config_model.model_validate({"id": f"contract-{kind}", "type": kind, **raw})
    return cls(config, context)


def test_every_http_forwarder_type_has_a_contract_configuration() -> None:
    assert sorted(CONFIGS) == HTTP_TYPES


@pytest.mark.parametrize("kind", HTTP_TYPES)
async def test_a_forwarder_never_changes_the_events_it_is_given(
    kind: str, fake_url: str, context: ForwarderContext
) -> None:
    forwarder = make(kind, fake_url, context)
    events = contract_events()
    before = copy.deepcopy(events)
    await forwarder.start()
    try:
        await forwarder.deliver(events)
        await forwarder.deliver(events)  # twice: a retry is given the same objects
    finally:
        await forwarder.close()
    assert events == before
