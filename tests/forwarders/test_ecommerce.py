"""Segment's e-commerce spec read once (``forwarders._ecommerce``): the field tables GA4
maps from, and the normalized commerce view the ad platforms take, for events in Segment's
vocabulary and in GA4's."""

from __future__ import annotations

import math

import tagrelay.forwarders._ecommerce as ecommerce
from tagrelay.forwarders._ecommerce import (
    SEGMENT_EVENT_NAMES,
    STANDARD_EVENTS,
    Commerce,
    CommerceItem,
    commerce,
    currency_code,
    decimal_text,
    event_name_key,
    item_fields,
    number,
)


def test_the_module_exports_its_public_names() -> None:
    assert sorted(ecommerce.__all__) == [
        "AMOUNT_KEYS",
        "Commerce",
        "CommerceItem",
        "GA4_ITEM_NAMES",
        "ITEM_FIELDS",
        "ITEM_SOURCE_KEYS",
        "SEGMENT_EVENT_NAMES",
        "SINGLE_PRODUCT_EVENTS",
        "SINGLE_PRODUCT_KEYS",
        "STANDARD_EVENTS",
        "commerce",
        "currency_code",
        "decimal_text",
        "event_name_key",
        "item_fields",
        "number",
    ]
    for name in ecommerce.__all__:
        assert getattr(ecommerce, name) is not None


def test_event_names_match_whatever_the_case_and_spacing() -> None:
    names = {event_name_key(k): v for k, v in SEGMENT_EVENT_NAMES.items()}
    assert names[event_name_key("  order   COMPLETED ")] == "purchase"
    assert names[event_name_key("Lead Generated")] == "generate_lead"


def test_the_standard_event_table_is_keyed_by_canonical_names() -> None:
    canonical = set(SEGMENT_EVENT_NAMES.values()) | {
        "page_view",
        "view_search_results",
        "subscribe",
        "start_trial",
        "contact",
    }
    assert set(STANDARD_EVENTS) <= canonical
    platforms = {p for names in STANDARD_EVENTS.values() for p in names}
    assert platforms == {"meta", "tiktok", "snap", "pinterest", "reddit"}
    purchase = SEGMENT_EVENT_NAMES["Order Completed"]
    assert (STANDARD_EVENTS[purchase]["meta"], STANDARD_EVENTS[purchase]["tiktok"]) == (
        "Purchase",
        "Purchase",
    )


def test_pinterest_has_checkout_subscription_and_trial_events() -> None:
    # Pinterest's event list (developers.pinterest.com/docs/api-features/conversion-overview):
    # initiate_checkout, subscribe and start_trial are standard events (once sent as custom
    # events here); checkout is the completed transaction.
    pinterest = {canonical: names.get("pinterest") for canonical, names in STANDARD_EVENTS.items()}
    assert pinterest["begin_checkout"] == "initiate_checkout"
    assert pinterest["subscribe"] == "subscribe"
    assert pinterest["start_trial"] == "start_trial"
    assert pinterest["purchase"] == "checkout"


def test_amounts_as_decimal_text() -> None:
    cases = [(20, "20"), (65.5, "65.5"), (0.1 + 0.2, "0.30000000000000004"), (1e-07, "0.0000001")]
    cases += [(1e21, "1000000000000000000000"), (-3.25, "-3.25"), (2.0, "2.0")]
    assert [decimal_text(v) for v, _ in cases] == [text for _, text in cases]
    assert [decimal_text(v) for v in (math.inf, -math.inf, math.nan)] == [None, None, None]


def test_numbers_and_currencies() -> None:
    assert [number(v) for v in (3, 2.5, "12", "12.0", " 7 ", "x", True, None, [1])] == [
        3,
        2.5,
        12,
        12.0,
        7,
        None,
        None,
        None,
        None,
    ]
    assert [currency_code(v) for v in (" eur", "USD", "", "  ", 978, None)] == [
        "EUR",
        "USD",
        None,
        None,
        None,
        None,
    ]


def test_item_fields_take_the_first_source_present_in_table_order() -> None:
    product = {"sku": "S-1", "product_id": None, "price": "9.5", "name": "Runner", "url": "/r"}
    assert list(item_fields(product).items()) == [
        ("id", "S-1"),
        ("name", "Runner"),
        ("price", "9.5"),
    ]


def test_an_order_completed_in_segments_vocabulary() -> None:
    view = commerce(
        {
            "order_id": 50314,
            "total": "27.50",
            "revenue": 25,
            "currency": "eur ",
            "products": [
                {
                    "product_id": "507f",
                    "sku": "45790-32",
                    "name": "Monopoly",
                    "price": 19,
                    "quantity": 1,
                    "category": "Games",
                },
                {"sku": "46493-32", "name": "Uno", "price": 3, "quantity": "2"},
                "not a product",
            ],
        },
        "purchase",
    )
    assert view == Commerce(
        value=27.5,
        currency="EUR",
        order_id="50314",
        items=(
            CommerceItem(id="507f", name="Monopoly", category="Games", price=19, quantity=1),
            CommerceItem(id="46493-32", name="Uno", price=3, quantity=2),
        ),
        num_items=3,
        problems={"invalid_item": 1},
    )


def test_a_purchase_in_ga4s_vocabulary() -> None:
    view = commerce(
        {
            "transaction_id": "T-1",
            "value": 12.5,
            "currency": "USD",
            "items": [
                {
                    "item_id": "p-1",
                    "item_name": "Runner",
                    "item_category": "Shoes",
                    "item_brand": "Acme",
                    "item_variant": "red",
                    "price": 12.5,
                }
            ],
        },
        "purchase",
    )
    assert view.order_id == "T-1"
    assert view.items == (
        CommerceItem(
            id="p-1", name="Runner", brand="Acme", category="Shoes", variant="red", price=12.5
        ),
    )
    assert view.num_items == 1
    assert view.problems == {}


def test_a_single_product_event_is_its_own_item_and_values_itself() -> None:
    properties = {"product_id": 42, "price": 4.5, "quantity": 2, "coupon": "SPRING"}
    view = commerce(properties, "add_to_cart")
    assert view.items == (CommerceItem(id="42", price=4.5, quantity=2),)
    assert (view.value, view.num_items) == (9.0, 2)
    # an event that is not about one product has no item of its own
    assert commerce(properties, "purchase").items == ()


def test_what_cannot_be_read_is_left_out_and_counted() -> None:
    view = commerce(
        {
            "value": "a lot",
            "currency": "euros",
            "products": [{"id": True, "price": "free", "quantity": 1.5}],
        }
    )
    assert view == Commerce(
        items=(CommerceItem(),), num_items=1, problems={"invalid_value": 3, "invalid_currency": 1}
    )
    assert commerce({}) == Commerce()
