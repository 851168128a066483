"""One relay, three ad platforms: a purchase reaches Meta, TikTok and Google Ads with the same
event id (its ``messageId``, what the tracking script's ``track`` returns for the pixel);
an event without ``ads`` consent reaches none of them; one without ``ad_user_data`` reaches
each without hashed identifiers or IP, and Google Ads gets its consent as DENIED.

Each platform has its own file with its golden requests; this one checks what they promise
together, through real HTTP: Segment-spec requests -> relay -> local fakes (and Google's
token endpoint)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from tagrelay.forwarders._user_data import sha256_hex
from tests.support import SERVER_KEY, Recorder, basic, metric_value, recording_server, wait_idle

META_PATH = "/v25.0/1234567890/events"
TIKTOK_PATH = "/open_api/v1.3/event/track/"
ADS_PATH = "/v26/customers/1234567890:uploadClickConversions"
ACTION = "customers/1234567890/conversionActions/42"
UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari"
EMAIL = "Buyer@Example.com"
GRANTED = {
    "analytics": "granted",
    "ads": "granted",
    "ad_user_data": "granted",
    "ad_personalization": "denied",
}


class Platforms:
    def __init__(self, meta: Recorder, tiktok: Recorder, ads: Recorder, token: Recorder) -> None:
        self.meta, self.tiktok, self.ads, self.token = meta, tiktok, ads, token

    def forwarders(self) -> list[dict[str, Any]]:
        batch = {"max_events": 10, "max_wait_secs": 0.05}
        return [
            {
                "id": "meta",
                "type": "meta",
                "pixel_id": "1234567890",
                "access_token": "meta-secret-token",
                "base_url": self.meta.url.rstrip("/"),
                "batch": batch,
            },
            {
                "id": "tiktok",
                "type": "tiktok",
                "pixel_code": "CQ1A2B3C4D5E6F7G8H9J",
                "access_token": "tiktok-secret-token",
                "base_url": self.tiktok.url.rstrip("/"),
                "batch": batch,
            },
            {
                "id": "gads",
                "type": "google_ads",
                "customer_id": "123-456-7890",
                "developer_token": "dev-token",
                "oauth": {
                    "client_id": "client.apps.googleusercontent.com",
                    "client_secret": "client-secret",
                    "refresh_token": "refresh-token",
                },
                "token_url": self.token.url,
                "conversions": [{"event": "Order Completed", "conversion_action": ACTION}],
                "base_url": self.ads.url.rstrip("/"),
                "batch": batch,
            },
        ]

    def sent(self) -> dict[str, list[dict[str, Any]]]:
        """Every event each platform received, in order."""
        return {
            "meta": [e for r in self.meta.requests for e in orjson.loads(r["body"])["data"]],
            "tiktok": [e for r in self.tiktok.requests for e in orjson.loads(r["body"])["data"]],
            "gads": [e for r in self.ads.requests for e in orjson.loads(r["body"])["conversions"]],
        }


@pytest.fixture
async def platforms() -> AsyncIterator[Platforms]:
    async with (
        recording_server("Meta", [META_PATH]) as meta,
        recording_server("TikTok", [TIKTOK_PATH]) as tiktok,
        recording_server("Google Ads", [ADS_PATH]) as ads,
        recording_server("Google's token endpoint", ["/token"], "/token") as token,
    ):
        tiktok.script = [(200, {}, b'{"code":0,"message":"OK"}')] * 10
        token.script = [(200, {}, b'{"access_token":"ya29.fanout","expires_in":3599}')]
        yield Platforms(meta, tiktok, ads, token)


def order(message_id: str, consent: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "userId": "user-42",
        "messageId": message_id,
        "properties": {"order_id": f"o-{message_id}", "revenue": 42.5, "currency": "usd"},
        "context": {
            "consent": consent,
            "traits": {"email": EMAIL, "phone": "+1 650 555 1212"},
            "userAgent": UA,
            "ip": "198.51.100.4",
            "page": {"url": "https://www.shop.test/checkout/done"},
            "clickIds": {"gclid": "Cj0KCQiA-fanout", "ttclid": "E.C.P.fanout"},
        },
    }


async def test_a_purchase_reaches_every_platform_with_its_message_id(
    relay: Any, platforms: Platforms
) -> None:
    client = await relay(forwarders=platforms.forwarders())
    response = await client.post(
        "/v1/track", json=order("purchase-1", GRANTED), headers=basic(SERVER_KEY)
    )
    assert response.status == 200
    await wait_idle(client.app)
    sent = platforms.sent()

    (meta,) = sent["meta"]
    assert (meta["event_name"], meta["event_id"]) == ("Purchase", "purchase-1")
    assert meta["user_data"]["em"] == [sha256_hex("buyer@example.com")]
    assert meta["custom_data"]["value"] == 42.5
    assert meta["custom_data"]["currency"] == "USD"

    (tiktok,) = sent["tiktok"]
    assert (tiktok["event"], tiktok["event_id"]) == ("Purchase", "purchase-1")
    assert tiktok["user"]["email"] == sha256_hex("buyer@example.com")
    assert tiktok["user"]["ttclid"] == "E.C.P.fanout"

    (ads,) = sent["gads"]
    assert ads["orderId"] == "o-purchase-1"  # Google Ads deduplicates on the order id
    assert (ads["conversionAction"], ads["gclid"]) == (ACTION, "Cj0KCQiA-fanout")
    assert {"hashedEmail": sha256_hex("buyer@example.com")} in [
        {k: v for k, v in ident.items() if k == "hashedEmail"} for ident in ads["userIdentifiers"]
    ]
    assert ads["consent"] == {"adUserData": "GRANTED", "adPersonalization": "DENIED"}
    for forwarder in ("meta", "tiktok", "gads"):
        delivered = {"forwarder": forwarder, "outcome": "delivered"}
        assert metric_value(client.app, "tagrelay_forwarder_events_total", delivered) == 1
        email = {"forwarder": forwarder, "key": "email"}
        assert metric_value(client.app, "tagrelay_forwarder_match_keys_total", email) == 1


async def test_without_ads_consent_no_platform_gets_the_event(
    relay: Any, platforms: Platforms
) -> None:
    client = await relay(forwarders=platforms.forwarders())
    denied = {"analytics": "granted", "ads": "denied", "ad_user_data": "denied"}
    response = await client.post(
        "/v1/track", json=order("purchase-2", denied), headers=basic(SERVER_KEY)
    )
    assert response.status == 200
    await wait_idle(client.app)
    assert platforms.sent() == {"meta": [], "tiktok": [], "gads": []}
    for forwarder in ("meta", "tiktok", "gads"):
        labels = {"forwarder": forwarder, "reason": "consent_denied"}
        assert metric_value(client.app, "tagrelay_forwarder_dropped_total", labels) == 1


async def test_without_ad_user_data_no_platform_gets_hashed_identifiers(
    relay: Any, platforms: Platforms
) -> None:
    client = await relay(forwarders=platforms.forwarders())
    no_user_data = {"analytics": "granted", "ads": "granted", "ad_user_data": "denied"}
    response = await client.post(
        "/v1/track", json=order("purchase-3", no_user_data), headers=basic(SERVER_KEY)
    )
    assert response.status == 200
    await wait_idle(client.app)
    sent = platforms.sent()
    hashed = {sha256_hex("buyer@example.com"), sha256_hex("16505551212")}
    hashed |= {sha256_hex("+16505551212"), sha256_hex("user-42")}
    for platform, events in sent.items():
        text = orjson.dumps(events).decode()
        assert not [h for h in hashed if h in text], platform
        assert "198.51.100.4" not in text, platform
        assert "purchase-3" in text, platform  # sent all the same
    (ads,) = sent["gads"]
    assert ads["gclid"] == "Cj0KCQiA-fanout"  # the click id still matches it
    assert "userIdentifiers" not in ads
    assert ads["consent"]["adUserData"] == "DENIED"
    (meta,) = sent["meta"]
    assert meta["event_id"] == "purchase-3"
    assert not {"em", "ph", "external_id", "client_ip_address"} & set(meta["user_data"])
