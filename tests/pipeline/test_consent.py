"""Consent normalization, GPC and anonymization (pipeline.consent)."""

from __future__ import annotations

from typing import Any

import pytest

from tagrelay.config.models import ConsentConfig
from tagrelay.pipeline.consent import ConsentPolicy, anonymize

ALL_GRANTED = {
    "analytics": "granted",
    "ads": "granted",
    "ad_user_data": "granted",
    "ad_personalization": "granted",
}


def apply(consent: Any, *, gpc: bool = False, **config: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "track", "context": {}}
    if consent is not None:
        event["context"]["consent"] = consent
    ConsentPolicy(ConsentConfig(**config)).apply(event, gpc_header=gpc)
    result: dict[str, Any] = event["context"]["consent"]
    return result


def test_defaults_fill_every_category() -> None:
    assert apply(None) == ALL_GRANTED
    assert apply(None, default={"ads": "denied"}) == {**ALL_GRANTED, "ads": "denied"}


@pytest.mark.parametrize(
    ("stated", "expected"),
    [
        ({"analytics": False, "ads": True}, {"analytics": "denied", "ads": "granted"}),
        ({"analytics": "denied"}, {"analytics": "denied"}),
        (
            {"analytics_storage": "denied", "ad_storage": "denied"},
            {"analytics": "denied", "ads": "denied"},
        ),
        (
            {"ad_user_data": "DENIED", "ad_personalization": 0},
            {"ad_user_data": "denied", "ad_personalization": "denied"},
        ),
        (
            {"categoryPreferences": {"Analytics": False, "Advertising": True}},
            {"analytics": "denied", "ads": "granted"},
        ),
        ({"categoryPreferences": {"Marketing": False}}, {"ads": "denied"}),
    ],
)
def test_stated_consent_in_each_shape(stated: dict[str, Any], expected: dict[str, str]) -> None:
    result = apply(stated)
    for category, state in expected.items():
        assert result[category] == state
    for category in set(ALL_GRANTED) - set(expected):
        assert result[category] == "granted"


def test_unknown_values_and_shapes_fall_back_to_the_default() -> None:
    assert apply({"analytics": "maybe", "ads": [1]}) == ALL_GRANTED
    result = apply("yes please", default={"analytics": "denied"})
    assert result["analytics"] == "denied"
    assert apply({"analytics": "maybe"}, default={"analytics": "denied"})["analytics"] == "denied"
    assert apply({"ads": [1]}, default={"ads": "denied"})["ads"] == "denied"


def test_other_keys_the_sender_stated_are_kept() -> None:
    prefs = {"Analytics": True}
    result = apply({"categoryPreferences": prefs})
    assert result["categoryPreferences"] == prefs


def test_gpc_denies_the_advertising_categories() -> None:
    assert apply({"ads": "granted"}, gpc=True) == {
        "analytics": "granted",
        "ads": "denied",
        "ad_user_data": "denied",
        "ad_personalization": "denied",
    }
    event: dict[str, Any] = {"context": {"gpc": True}}
    ConsentPolicy(ConsentConfig()).apply(event, gpc_header=False)
    assert event["context"]["consent"]["ads"] == "denied"
    assert apply({"ads": "granted"}, gpc=True, honor_gpc=False)["ads"] == "granted"


def test_anonymize_removes_identifiers_and_keeps_the_rest() -> None:
    event = {
        "type": "identify",
        "anonymousId": "a",
        "userId": "u",
        "traits": {"email": "x@example.com"},
        "properties": {"plan": "pro"},
        "context": {
            "ip": "203.0.113.7",
            "clientIds": {"fbp": "fb.1.1.1"},
            "clickIds": {"gclid": "g"},
            "page": {"path": "/signup"},
            "consent": {"analytics": "denied"},
        },
    }
    anonymize(event)
    assert event == {
        "type": "identify",
        "properties": {"plan": "pro"},
        "context": {
            "page": {"path": "/signup"},
            "consent": {"analytics": "denied"},
            "anonymized": True,
        },
    }
