"""The identity store end to end, through a real relay (the delivery process, an encrypted
store): an identify with an email and a landing page with fbclid and gclid, then a
server-side purchase that carries only the userId, reach the fake Meta with the email's
hash and an fbc, and the fake Google Ads with the gclid; not when the purchase denies
ad_user_data. The store's files hold none of it in the clear."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tagrelay.appkeys import WORKERS
from tagrelay.errors import IdentityStoreError
from tagrelay.forwarders._user_data import sha256_hex
from tagrelay.identity_store import FILE_NAME
from tests.support import SERVER_KEY, Recorder, basic, metric_value, recording_server, wait_idle

META_PATH = "/v25.0/1234567890/events"
ADS_PATH = "/v26/customers/1234567890:uploadClickConversions"
ACTION = "customers/1234567890/conversionActions/42"
EMAIL = "Buyer.Enriched@Example.com"
USER_ID = "user-enrich-42"
ANONYMOUS_ID = "anon-enrich-7"
FBCLID = "IwAR0enrichFBCLID"
GCLID = "Cj0KCQiA-enrichGCLID"
GRANTED = {"analytics": "granted", "ads": "granted", "ad_user_data": "granted"}
NO_USER_DATA = {"analytics": "granted", "ads": "granted", "ad_user_data": "denied"}
UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari"


class Platforms:
    def __init__(self, meta: Recorder, ads: Recorder, token: Recorder) -> None:
        self.meta, self.ads, self.token = meta, ads, token

    def forwarders(self, *, enrich: bool = True) -> list[dict[str, Any]]:
        batch = {"max_events": 10, "max_wait_secs": 0.05}
        return [
            {
                "id": "meta",
                "type": "meta",
                "pixel_id": "1234567890",
                "access_token": "meta-secret-token",
                "base_url": self.meta.url.rstrip("/"),
                "batch": batch,
                "enrich": enrich,
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
                "enrich": enrich,
            },
        ]

    def meta_events(self) -> list[dict[str, Any]]:
        return [e for r in self.meta.requests for e in orjson.loads(r["body"])["data"]]

    def ads_rows(self) -> list[dict[str, Any]]:
        return [e for r in self.ads.requests for e in orjson.loads(r["body"])["conversions"]]


@pytest.fixture
async def platforms() -> AsyncIterator[Platforms]:
    async with (
        recording_server("Meta", [META_PATH]) as meta,
        recording_server("Google Ads", [ADS_PATH]) as ads,
        recording_server("Google's token endpoint", ["/token"], "/token") as token,
    ):
        token.script = [(200, {}, b'{"access_token":"ya29.enrich","expires_in":3599}')]
        yield Platforms(meta, ads, token)


def store_config(**more: Any) -> dict[str, Any]:
    return {
        "identity_store": {"enabled": True, **more},
        "encryption": {"keys": [base64.b64encode(os.urandom(32)).decode()]},
    }


async def journey(client: Any, purchase_consent: dict[str, str]) -> None:
    """Login (identify with the email), a landing page with both click ids, then the
    backend's purchase with the userId alone: three requests, each acknowledged."""
    requests = [
        (
            "/v1/identify",
            {
                "type": "identify",
                "messageId": "identify-1",
                "anonymousId": ANONYMOUS_ID,
                "userId": USER_ID,
                "traits": {"email": EMAIL, "firstName": "Ada"},
                "context": {"consent": GRANTED, "userAgent": UA},
            },
        ),
        (
            "/v1/page",
            {
                "type": "page",
                "messageId": "landing-1",
                "anonymousId": ANONYMOUS_ID,
                "context": {
                    "consent": GRANTED,
                    "userAgent": UA,
                    "page": {
                        "url": f"https://www.shop.test/sale?fbclid={FBCLID}&gclid={GCLID}",
                    },
                },
            },
        ),
        (
            "/v1/track",
            {
                "type": "track",
                "event": "Order Completed",
                "messageId": "purchase-1",
                "userId": USER_ID,
                "properties": {"order_id": "o-1", "revenue": 99.5, "currency": "EUR"},
                "context": {"consent": purchase_consent},
            },
        ),
    ]
    for path, body in requests:
        response = await client.post(path, json=body, headers=basic(SERVER_KEY))
        assert response.status == 200, await response.text()


async def test_a_purchase_with_only_the_user_id_is_enriched_from_the_store(
    relay: Any, platforms: Platforms, tmp_path: Path
) -> None:
    client = await relay(forwarders=platforms.forwarders(), **store_config())
    await journey(client, GRANTED)
    await wait_idle(client.app)

    purchases = [e for e in platforms.meta_events() if e["event_name"] == "Purchase"]
    assert len(purchases) == 1, platforms.meta_events()
    user = purchases[0]["user_data"]
    assert user["em"] == [sha256_hex(EMAIL.lower())]
    assert user["fn"] == [sha256_hex("ada")]
    assert user["external_id"] == [sha256_hex(USER_ID)]
    prefix, _, fbclid = user["fbc"].rpartition(".")
    assert fbclid == FBCLID and prefix.startswith("fb.1.")
    (row,) = platforms.ads_rows()
    assert row["gclid"] == GCLID
    emails = [i["hashedEmail"] for i in row["userIdentifiers"] if "hashedEmail" in i]
    assert emails == [sha256_hex(EMAIL.lower())]

    # The landing page's view went to Meta with the email too (its visitor is the user the
    # identify named), and with its own fbclid; the purchase got both from the store.
    (page,) = [e for e in platforms.meta_events() if e["event_name"] == "PageView"]
    assert page["user_data"]["em"] == [sha256_hex(EMAIL.lower())]
    app = client.app
    for forwarder, key, count in [
        ("meta", "email", 2),
        ("meta", "name", 2),
        ("meta", "click_id", 1),
        ("gads", "click_id", 1),
        ("gads", "email", 1),
    ]:
        labels = {"forwarder": forwarder, "key": key}
        assert metric_value(app, "tagrelay_forwarder_enriched_total", labels) == count, labels
    recorded = {"outcome": "recorded"}
    assert metric_value(app, "tagrelay_identity_store_events_total", recorded) == 2

    # The store's files hold neither the email, nor the ids, nor the click ids in the clear.
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(FILE_NAME))
    assert data
    lowered = data.lower()
    for needle in (EMAIL, USER_ID, ANONYMOUS_ID, FBCLID, GCLID):
        assert needle.lower().encode() not in lowered, needle


def purchase_user_data(platforms: Platforms) -> list[dict[str, Any]]:
    return [e["user_data"] for e in platforms.meta_events() if e["event_name"] == "Purchase"]


async def test_nothing_is_filled_in_when_the_purchase_denies_ad_user_data(
    relay: Any, platforms: Platforms
) -> None:
    client = await relay(forwarders=platforms.forwarders(), **store_config())
    await journey(client, NO_USER_DATA)
    await wait_idle(client.app)

    # Sent on the request's user agent alone (its IP is cleared under the denial); Google
    # Ads has no click id for it.
    (user,) = purchase_user_data(platforms)
    assert set(user) == {"client_user_agent"}
    assert [r for r in platforms.ads_rows() if r.get("orderId") == "o-1"] == []
    for forwarder, key in [("meta", "click_id"), ("gads", "email"), ("gads", "click_id")]:
        labels = {"forwarder": forwarder, "key": key}
        assert metric_value(client.app, "tagrelay_forwarder_enriched_total", labels) == 0


async def test_without_enrich_the_forwarders_do_not_read_the_store(
    relay: Any, platforms: Platforms
) -> None:
    # The counterpart of the first test: the same journey, the option off.
    client = await relay(forwarders=platforms.forwarders(enrich=False), **store_config())
    await journey(client, GRANTED)
    await wait_idle(client.app)
    (user,) = purchase_user_data(platforms)  # sent on the request's IP address alone
    assert not {"em", "fn", "fbc"} & user.keys()
    assert [r for r in platforms.ads_rows() if r.get("orderId") == "o-1"] == []


async def test_the_writer_runs_in_the_relay_when_the_delivery_process_is_off(
    relay: Any, platforms: Platforms
) -> None:
    client = await relay(
        forwarders=platforms.forwarders(), delivery={"process": False}, **store_config()
    )
    await journey(client, GRANTED)
    await wait_idle(client.app)
    purchases = [e for e in platforms.meta_events() if e["event_name"] == "Purchase"]
    assert [p["user_data"]["em"] for p in purchases] == [[sha256_hex(EMAIL.lower())]]
    (row,) = platforms.ads_rows()
    assert row["gclid"] == GCLID


async def test_a_relay_whose_key_does_not_open_the_store_does_not_start(
    relay: Any, tmp_path: Path
) -> None:
    first = store_config()
    client = await relay(**first)
    await client.close()
    with pytest.raises(IdentityStoreError, match=r"not in encryption\.keys"):
        await relay(**store_config())  # another key
    with pytest.raises(IdentityStoreError, match=r"encryption\.keys is empty"):
        await relay(identity_store={"enabled": True})
    client = await relay(**first)  # its own key opens it
    assert client.app[WORKERS]["identity_store"].status()["running"]
