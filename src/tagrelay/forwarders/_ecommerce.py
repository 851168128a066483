"""Segment's e-commerce spec, read once for every destination.

Events arrive named by Segment's spec (``Order Completed``, ``Product Added``, ...) or by
GA4's recommended events (``purchase``, ``add_to_cart``, ... from gtag.js and Measurement
Protocol senders). The canonical names here are GA4's (``SEGMENT_EVENT_NAMES`` maps
Segment's onto them, matched with ``event_name_key``); a destination maps canonical names
onto its own standard events (``STANDARD_EVENTS`` holds the platforms' tables).

Their commerce fields, in both vocabularies, come in two layers:

- **the field tables**, for a destination that keeps values as sent (GA4 does, and counts
  its own cuts): ``AMOUNT_KEYS`` (``value`` wins, then ``total``, what the customer paid,
  then ``revenue``), ``ITEM_FIELDS`` (canonical item field <- Segment product fields, the
  first present wins; ``item_fields`` applies it to one product), ``GA4_ITEM_NAMES``
  (canonical item field -> GA4's item field), and for single-product events
  (``SINGLE_PRODUCT_EVENTS``) the product's fields at the top of the properties
  (``SINGLE_PRODUCT_KEYS``);
- **the normalized view** (``commerce``), for the ad platforms: ``value`` a number,
  ``currency`` an uppercased ISO 4217 code, ``order_id`` text (``order_id``, else
  ``transaction_id``), ``items`` with ``id`` (``product_id``/``sku``/``id`` or GA4's
  ``item_id``, as text), ``name``, ``brand``, ``category``, ``variant``, ``price``,
  ``quantity``, and ``num_items`` (the quantities summed). What could not be read is left
  out and counted in ``Commerce.problems`` by a bounded reason.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

from tagrelay.forwarders._memo import ObjectMemo

__all__ = [
    "AMOUNT_KEYS",
    "GA4_ITEM_NAMES",
    "ITEM_FIELDS",
    "ITEM_SOURCE_KEYS",
    "SEGMENT_EVENT_NAMES",
    "SINGLE_PRODUCT_EVENTS",
    "SINGLE_PRODUCT_KEYS",
    "STANDARD_EVENTS",
    "Commerce",
    "CommerceItem",
    "commerce",
    "currency_code",
    "decimal_text",
    "event_name_key",
    "item_fields",
    "number",
]

SEGMENT_EVENT_NAMES: Final[Mapping[str, str]] = {
    "Products Searched": "search",
    "Product List Viewed": "view_item_list",
    "Product Clicked": "select_item",
    "Product Viewed": "view_item",
    "Product Added": "add_to_cart",
    "Product Removed": "remove_from_cart",
    "Cart Viewed": "view_cart",
    "Checkout Started": "begin_checkout",
    "Payment Info Entered": "add_payment_info",
    "Order Completed": "purchase",
    "Order Refunded": "refund",
    "Product Added to Wishlist": "add_to_wishlist",
    "Product Shared": "share",
    "Promotion Viewed": "view_promotion",
    "Promotion Clicked": "select_promotion",
    "Signed Up": "sign_up",
    "Signed In": "login",
    "Lead Generated": "generate_lead",
}
"""Segment's e-commerce (and B2B) spec events -> GA4 recommended events (the canonical
names); look names up by ``event_name_key``."""

STANDARD_EVENTS: Final[Mapping[str, Mapping[str, str]]] = {
    "page_view": {
        "meta": "PageView",
        # Not in TikTok's 2025 standard list: the name its pixel gives its automatic page
        # views, which integrations still send (destinations.md §4, §11).
        "tiktok": "Pageview",
        "snap": "PAGE_VIEW",
        "pinterest": "page_visit",
        "reddit": "PAGE_VISIT",
    },
    "view_item": {
        "meta": "ViewContent",
        "tiktok": "ViewContent",
        "snap": "VIEW_CONTENT",
        "pinterest": "page_visit",
        "reddit": "VIEW_CONTENT",
    },
    "view_item_list": {
        "meta": "ViewContent",
        "tiktok": "ViewContent",
        "snap": "LIST_VIEW",
        "pinterest": "view_category",
        "reddit": "VIEW_CONTENT",
    },
    "search": {
        "meta": "Search",
        "tiktok": "Search",
        "snap": "SEARCH",
        "pinterest": "search",
        "reddit": "SEARCH",
    },
    "view_search_results": {
        "meta": "Search",
        "tiktok": "Search",
        "snap": "SEARCH",
        "pinterest": "search",
        "reddit": "SEARCH",
    },
    "add_to_cart": {
        "meta": "AddToCart",
        "tiktok": "AddToCart",
        "snap": "ADD_CART",
        "pinterest": "add_to_cart",
        "reddit": "ADD_TO_CART",
    },
    "add_to_wishlist": {
        "meta": "AddToWishlist",
        "tiktok": "AddToWishlist",
        "snap": "ADD_TO_WISHLIST",
        "pinterest": "add_to_wishlist",
        "reddit": "ADD_TO_WISHLIST",
    },
    "begin_checkout": {
        "meta": "InitiateCheckout",
        "tiktok": "InitiateCheckout",
        "snap": "START_CHECKOUT",
        # Pinterest's current event list (developers.pinterest.com/docs/api-features/
        # conversion-overview, and the v5 spec's event_name enum): initiate_checkout, "people
        # who start the checkout process"; also its subscribe and start_trial below.
        "pinterest": "initiate_checkout",
    },
    "add_payment_info": {
        "meta": "AddPaymentInfo",
        "tiktok": "AddPaymentInfo",
        "snap": "ADD_BILLING",
        "pinterest": "add_payment_info",
    },
    "purchase": {
        "meta": "Purchase",
        "tiktok": "Purchase",
        "snap": "PURCHASE",
        "pinterest": "checkout",
        "reddit": "PURCHASE",
    },
    "generate_lead": {"meta": "Lead", "tiktok": "Lead", "pinterest": "lead", "reddit": "LEAD"},
    "sign_up": {
        "meta": "CompleteRegistration",
        "tiktok": "CompleteRegistration",
        "snap": "SIGN_UP",
        "pinterest": "signup",
        "reddit": "SIGN_UP",
    },
    "subscribe": {
        "meta": "Subscribe",
        "tiktok": "Subscribe",
        "snap": "SUBSCRIBE",
        "pinterest": "subscribe",
    },
    "start_trial": {
        "meta": "StartTrial",
        "tiktok": "StartTrial",
        "snap": "START_TRIAL",
        "pinterest": "start_trial",
    },
    "contact": {"meta": "Contact", "tiktok": "Contact", "pinterest": "contact"},
    "login": {"snap": "LOGIN"},
}
"""Canonical event -> each platform's standard event (destinations.md §11), as data: a
platform missing from an entry has no standard event for it (the forwarder's ``unmapped``
rule decides). Where the sources disagree (Snap's lead, TikTok's page view: a pixel
auto-event) no name is given. Google Ads, LinkedIn and X name no events: a configured
conversion action / rule / event tag stands for them."""

AMOUNT_KEYS: Final = ("value", "total", "revenue")
"""Where an event's value is read from, the first present winning."""

ITEM_FIELDS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("id", ("product_id", "sku", "id")),
    ("name", ("name",)),
    ("brand", ("brand",)),
    ("category", ("category",)),
    ("variant", ("variant",)),
    ("price", ("price",)),
    ("quantity", ("quantity",)),
    ("position", ("position",)),
    ("coupon", ("coupon",)),
    ("discount", ("discount",)),
    ("affiliation", ("affiliation",)),
)
"""Canonical item field <- Segment product fields (the first present, not null, wins)."""

ITEM_SOURCE_KEYS: Final = frozenset(k for _, sources in ITEM_FIELDS for k in sources)
"""Every Segment product field that ``ITEM_FIELDS`` reads."""

GA4_ITEM_NAMES: Final[Mapping[str, str]] = {
    "id": "item_id",
    "name": "item_name",
    "brand": "item_brand",
    "category": "item_category",
    "variant": "item_variant",
    "price": "price",
    "quantity": "quantity",
    "position": "index",
    "coupon": "coupon",
    "discount": "discount",
    "affiliation": "affiliation",
}
"""Canonical item field -> GA4's item field of the same meaning."""

SINGLE_PRODUCT_EVENTS: Final = frozenset(
    {"select_item", "view_item", "add_to_cart", "remove_from_cart", "add_to_wishlist"}
)
"""Canonical events about one product, whose fields Segment puts at the top of the
properties (``{"product_id": "p-1", "price": 5}``) rather than in ``products[]``."""

SINGLE_PRODUCT_KEYS: Final = ITEM_SOURCE_KEYS - {"coupon", "affiliation"}
"""The top-level properties of a single-product event read as its product's fields (an
order-level ``coupon`` or ``affiliation`` stays the event's)."""

_CURRENCY = re.compile(r"[A-Z]{3}")


def event_name_key(name: str) -> str:
    """The form event names are matched in: case and runs of whitespace ignored."""
    return " ".join(name.split()).lower()


def number(value: Any) -> int | float | None:
    """A number from a JSON number or numeric text (``"12"`` -> 12, ``"12.0"`` -> 12.0);
    None for anything else, booleans included."""
    if isinstance(value, (int, float)):
        return None if isinstance(value, bool) else value
    if isinstance(value, str):
        try:
            parsed = float(value.strip())
        except ValueError:
            return None
        return int(parsed) if parsed.is_integer() and "." not in value else parsed
    return None


def decimal_text(value: int | float) -> str | None:
    """A number as plain decimal text, for APIs that take amounts as strings (Pinterest's
    ``value``, Snap's ``item_price``): ``20`` -> ``"20"``, ``65.5`` -> ``"65.5"``, ``1e-07``
    -> ``"0.0000001"`` (the shortest form that reads back as the same float, never in
    exponent notation); None for infinities and NaN."""
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return None
    return format(Decimal(repr(value)), "f")


def currency_code(value: Any) -> str | None:
    """Text trimmed and uppercased (``" eur"`` -> ``EUR``); None when not text or blank."""
    if isinstance(value, str) and value.strip():
        return value.strip().upper()
    return None


def item_fields(product: Mapping[str, Any]) -> dict[str, Any]:
    """A Segment product's values by canonical item field, as sent (``ITEM_FIELDS`` order;
    fields it does not carry are absent)."""
    fields: dict[str, Any] = {}
    for target, sources in ITEM_FIELDS:
        for source in sources:
            if product.get(source) is not None:
                fields[target] = product[source]
                break
    return fields


@dataclass(frozen=True)
class CommerceItem:
    id: str | None = None
    name: str | None = None
    brand: str | None = None
    category: str | None = None
    variant: str | None = None
    price: int | float | None = None
    quantity: int | None = None


@dataclass(frozen=True)
class Commerce:
    """The commerce fields of one event, normalized (see the module docstring)."""

    value: int | float | None = None
    currency: str | None = None
    order_id: str | None = None
    items: tuple[CommerceItem, ...] = ()
    num_items: int | None = None
    """The items' quantities summed (1 for an item without one); None without items."""
    problems: Mapping[str, int] = field(default_factory=dict)
    """Fields left out, by reason: ``invalid_value`` (a number that is not one),
    ``invalid_currency`` (not three letters), ``invalid_item`` (a product that is not an
    object)."""


_COMMERCE_ITEM_KEYS: Final = tuple(
    (target, tuple(dict.fromkeys((*sources, GA4_ITEM_NAMES[target]))))
    for target, sources in ITEM_FIELDS
    if target in CommerceItem.__dataclass_fields__
)
"""What ``commerce`` reads of a product: each ``CommerceItem`` field <- Segment's names
(``ITEM_FIELDS``), then GA4's (``GA4_ITEM_NAMES``), the first present, not null, winning."""


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return str(value).strip() or None


def _product_fields(product: Mapping[str, Any]) -> dict[str, Any]:
    """Segment's names first, then GA4's; only the fields a ``CommerceItem`` has."""
    fields: dict[str, Any] = {}
    for target, sources in _COMMERCE_ITEM_KEYS:
        for source in sources:
            value = product.get(source)
            if value is not None:
                fields[target] = value
                break
    return fields


def _problem(problems: dict[str, int], reason: str) -> None:
    problems[reason] = problems.get(reason, 0) + 1


def _item(fields: Mapping[str, Any], problems: dict[str, int]) -> CommerceItem:
    raw_price, raw_quantity = fields.get("price"), fields.get("quantity")
    price = quantity = None
    if raw_price is not None:
        price = number(raw_price)
        if price is None:
            _problem(problems, "invalid_value")
    if raw_quantity is not None:
        quantity = number(raw_quantity)
        if quantity is None:
            _problem(problems, "invalid_value")
        elif quantity != int(quantity) or quantity < 0:
            _problem(problems, "invalid_value")
            quantity = None
    return CommerceItem(
        id=_text(fields.get("id")),
        name=_text(fields.get("name")),
        brand=_text(fields.get("brand")),
        category=_text(fields.get("category")),
        variant=_text(fields.get("variant")),
        price=price,
        quantity=None if quantity is None else int(quantity),
    )


_NO_COMMERCE: Final = Commerce()
"""What an event without commerce fields has (a page view): one shared, immutable value."""


_READ: Final[ObjectMemo[Commerce]] = ObjectMemo(1024)
"""The commerce of the properties read last (``_memo``): the delivery process gives every
forwarder the same event objects, so each event's commerce fields are read once for all ad
forwarders."""


def commerce(properties: Mapping[str, Any], event_name: str | None = None) -> Commerce:
    """The normalized commerce view of an event's ``properties``; ``event_name`` is its
    canonical name (for single-product events, see ``SINGLE_PRODUCT_EVENTS``). Pure. The
    same properties object (never changed: forwarders do not change events) with the same
    name gets the same ``Commerce`` again."""
    if not properties:
        return _NO_COMMERCE
    found = _READ.get(properties, event_name)
    if found is not None:
        return found
    return _READ.put(properties, _commerce(properties, event_name), event_name)


def _commerce(properties: Mapping[str, Any], event_name: str | None) -> Commerce:
    problems: dict[str, int] = {}
    value = None
    for key in AMOUNT_KEYS:
        amount = properties.get(key)
        if amount is not None:
            value = number(amount)
            if value is None:
                _problem(problems, "invalid_value")
            break
    currency = currency_code(properties.get("currency"))
    if currency is not None and not _CURRENCY.fullmatch(currency):
        _problem(problems, "invalid_currency")
        currency = None
    order_id = _text(properties.get("order_id")) or _text(properties.get("transaction_id"))

    products = properties.get("products")
    if not isinstance(products, list):
        products = properties.get("items")
    items: list[CommerceItem] = []
    if isinstance(products, list):
        for product in products:
            if isinstance(product, Mapping):
                items.append(_item(_product_fields(product), problems))
            else:
                _problem(problems, "invalid_item")
    elif event_name in SINGLE_PRODUCT_EVENTS:
        own = {k: v for k, v in properties.items() if k in SINGLE_PRODUCT_KEYS}
        if own:
            item = _item(item_fields(own), problems)
            items.append(item)
            if value is None and item.price is not None:
                value = item.price * (item.quantity if item.quantity is not None else 1)
    num_items = None
    if items:
        num_items = 0
        for item in items:
            num_items += item.quantity if item.quantity is not None else 1
    return Commerce(
        value=value,
        currency=currency,
        order_id=order_id,
        items=tuple(items),
        num_items=num_items,
        problems=problems,
    )
