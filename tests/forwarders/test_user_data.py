"""``forwarders._user_data``: user data taken from events, and the normalization table with
the examples the platforms publish.

Expected hashes are pinned from the vendors' own pages where they publish one (the source is
cited next to each). Where a vendor publishes only the normalized string, the expected hash
is computed here from that string (``sha(...)``, marked "computed"); nothing is pinned that
neither a vendor nor the reference gives.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest

import tagrelay.forwarders._user_data as user_data_module
from tagrelay.forwarders._user_data import (
    BROWSER_ID_COOKIES,
    CLICK_ID_PARAMS,
    DROP_REASONS,
    FIELDS,
    MATCH_KEYS,
    PLATFORMS,
    RULES,
    Field,
    Platform,
    UserData,
    extract_user_data,
    looks_hashed,
    looks_like_email,
    match_keys,
    prepare,
)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def one(
    platform: Platform,
    field: Field,
    raw: str,
    default_phone_country: str | None = None,
    **more: Any,
) -> str | None:
    """What ``platform`` is sent for ``field`` = ``raw`` (None: left out)."""
    data = UserData(**{field: raw, **more})
    return prepare(data, platform, default_phone_country=default_phone_country).values.get(field)


# -- the vendors' published examples --------------------------------------------------------

# Meta, "Customer Information Parameters" (developers.facebook.com/documentation/ads-commerce/
# conversions-api/parameters/customer-information-parameters, updated Jan 9, 2026): inputs,
# normalized forms and "Expected SHA256 output" as printed there.
META_EMAIL = "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
META_PHONE = "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"
META_MARY = "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"
META_JEONG = "8fa8cd9c440be61d0151429310034083132b35975c4bea67fdd74158eb51db14"
META_VALERY = "08e1996b5dd49e62a4b4c010d44e4345592a863bb9f8e3976219bac29417149c"
META_BIRTHDAY = "01acdbf6ec7b4f478a225f1a246e5d6767eeab1a7ffa17f025265b5b94f40f0c"
META_US = "79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621"

# Snap, Conversions API "Parameters" (developers.snap.com/api/marketing-api/Conversions-API/
# Parameters): "Hashed Output" as printed there. The phone hash is cut short in the stored
# copy of the page (dc008fda46e2e64002cf2f82a4906236282d4...); the full value is the one
# Segment's Snap destination tests pin for the same number (segmentio/action-destinations).
SNAP_EMAIL = "542d240129883c019e106e3b1b2d3f3cb3537c43c425364de8e951d5a3083345"
SNAP_PHONE = "dc008fda46e2e64002cf2f82a4906236282d431c4f75e5b60bfe79fc48546383"


def test_meta_examples() -> None:
    assert one("meta", "email", "John_Smith@gmail.com") == META_EMAIL
    assert one("meta", "email", "  John_Smith@gmail.com ") == META_EMAIL
    # "US phone number (650)555-1212" -> 16505551212: the country code comes from the
    # forwarder's default country, or is already in the number.
    assert one("meta", "phone", "(650)555-1212", "US") == META_PHONE
    assert one("meta", "phone", "+1 (650) 555-1212") == META_PHONE
    assert one("meta", "phone", "16505551212") == META_PHONE
    assert one("meta", "first_name", "Mary") == META_MARY
    assert one("meta", "last_name", "Mary") == META_MARY  # "See First Name for examples"
    assert one("meta", "first_name", "정") == META_JEONG
    assert one("meta", "first_name", "Valéry") == META_VALERY  # accents are not stripped
    assert one("meta", "first_name", "Vale\u0301ry") == META_VALERY  # decomposed é: NFC
    assert one("meta", "birthday", "2/16/1997") == META_BIRTHDAY
    assert one("meta", "birthday", "1997-02-16") == META_BIRTHDAY
    assert one("meta", "birthday", "1997-02-16T00:00:00.000Z") == META_BIRTHDAY
    # Country: the page's input is "United States"; we take ISO codes only (no name table).
    assert one("meta", "country", "US") == META_US
    assert one("meta", "country", " us ") == META_US


def test_meta_examples_given_without_hashes() -> None:
    # Same page; it prints these normalized forms without hashes: computed here.
    assert one("meta", "gender", "Female") == sha("f")
    assert one("meta", "gender", "m") == sha("m")
    for city, normalized in (("Paris", "paris"), ("London", "london"), ("New York", "newyork")):
        assert one("meta", "city", city) == sha(normalized)
    assert one("meta", "state", "AZ") == sha("az")
    assert one("meta", "state", "CA") == sha("ca")
    for zip_code, normalized in (
        ("94035", "94035"),  # U.S.
        ("1987", "1987"),  # Australia
        ("75018", "75018"),  # France
        ("M1 1AE", "m11ae"),  # UK: area, district and sector
    ):
        assert one("meta", "zip", zip_code) == sha(normalized)


def test_snap_examples() -> None:
    assert one("snapchat", "email", "Person@Example.com") == SNAP_EMAIL
    assert one("snapchat", "phone", "+44 844 412 4653") == SNAP_PHONE
    # "remove any double 0 in front of the country code"
    assert one("snapchat", "phone", "0044 844 412 4653") == SNAP_PHONE
    # "If the number itself begins with a 0, this should be removed" (the national prefix).
    assert one("snapchat", "phone", "0844 412 4653", "GB") == SNAP_PHONE
    # Names: lowercase, punctuation removed, UTF-8 kept (the page's example: raphaël;
    # no hash printed: computed).
    assert one("snapchat", "first_name", "Raphaël") == sha("raphaël")
    assert one("snapchat", "last_name", "O'Brien-Smith") == sha("obriensmith")


def test_pinterest_gender_takes_non_binary() -> None:
    # Pinterest's ConversionEventsUserData (pinterest/pinterest-python-generated-api-client,
    # docs/ConversionEventsUserData.md, from the API spec): ge is "Either "f" or "m" or "n"
    # for non-binary gender", in lowercase. Meta's and Snap's ge take only f and m.
    for raw in ("n", "Non-Binary", " nonbinary "):
        assert one("pinterest", "gender", raw) == sha("n")
        assert one("meta", "gender", raw) is None
        assert one("snapchat", "gender", raw) is None
    assert one("pinterest", "gender", "Female") == sha("f")


def test_google_examples() -> None:
    # Google Data Manager, "Format user data" (developers.google.com/data-manager/api/
    # devguides/concepts/formatting): normalized forms only; hashes computed.
    assert one("google", "email", "cloudy.sanfrancisco+shopping@gmail.com") == sha(
        "cloudysanfrancisco@gmail.com"
    )
    assert one("google", "email", "user.name+NYC@Example.com") == sha("user.name+nyc@example.com")
    assert one("google", "phone", "(800)555-0100", "US") == sha("+18005550100")
    assert one("google", "phone", "+1 800 555 0100") == sha("+18005550100")
    # The reference (destinations.md §0) gives +16505551212 -> 1e231c66... next to Meta's.
    assert (one("google", "phone", "(650)555-1212", "US") or "").startswith("1e231c66")
    # googleads/google-ads-python examples/remarketing/tests: dots go for gmail and
    # googlemail only (its "username+alias@gmail.com" predates the +suffix rule above).
    assert one("google", "email", "  User@Example.COM  ") == sha("user@example.com")
    assert one("google", "email", "first.last.name@gmail.com") == sha("firstlastname@gmail.com")
    assert one("google", "email", "another.user.name@googlemail.com") == sha(
        "anotherusername@googlemail.com"
    )
    assert one("google", "email", "name.with.dots@otherdomain.com") == sha(
        "name.with.dots@otherdomain.com"
    )
    # Intermediate whitespace goes too (Data Manager: "leading, trailing and intermediate").
    assert one("google", "email", "jane doe@example.com") == sha("janedoe@example.com")


def test_ga4_user_data_examples() -> None:
    # GA4 "Send user-provided data with User-ID" (developers.google.com/analytics/devguides/
    # collection/ga4/uid-data): its sample values, already normalized; city, region, postal
    # code and country go unhashed. (Its sample phone, +15555555555, is no valid number: a
    # real one stands in.)
    data = UserData(
        email="test@yourdomain.com",
        phone="+16505551212",
        first_name="John",
        last_name="Doe",
        street="123 Main Street",
        city="San Francisco",
        state="California",
        zip="94000",
        country="us",
    )
    assert prepare(data, "google").values == {
        "email": sha("test@yourdomain.com"),
        "phone": sha("+16505551212"),
        "first_name": sha("john"),
        "last_name": sha("doe"),
        "street": sha("123 main street"),
        "city": "san francisco",
        "state": "california",
        "zip": "94000",
        "country": "US",
    }


# Reddit, Conversions API docs (ads-api.reddit.com/docs/v3, "Hashing rules", as captured in
# the destination Reddit maintains in segmentio/action-destinations,
# reddit-conversions-api/V3-API-REFERENCE.md): "alice@example.com and Al.ice+Apple@Example.Com
# -> ff8d98..."; "+15554441234 -> e5b124...".
REDDIT_EMAIL = "ff8d9819fc0e12bf0d24892e45987e249a28dce836a85cad60e28eaaa8c6d976"
REDDIT_PHONE = "e5b124c58580eb16bd959b8d0cac12b12c952e2ceae0203d416cff94f10b994a"

# Microsoft, "Conversions API (CAPI)" guide (learn.microsoft.com/advertising/guides/
# uet-conversion-api-integration, "Hashed identifiers"): john@contoso.com and +14255551234.
MICROSOFT_EMAIL = "ec81f3ac7b2b19675bab9d54cf416f9f18cff87c97da5cca82c0f0891bc40602"
MICROSOFT_PHONE = "c59475d96e9f01d7d18d06cfad84dd02333207f02c0c2c5663ef2782cda0390e"


def test_reddit_examples() -> None:
    assert one("reddit", "email", "alice@example.com") == REDDIT_EMAIL
    assert one("reddit", "email", "Al.ice+Apple@Example.Com") == REDDIT_EMAIL
    # Only dots and the +alias go: "_" and "-" stay (Reddit's own canonicalizeEmail). A
    # mirror of Reddit's help center said every non-alphanumeric goes; the API docs do not.
    assert one("reddit", "email", "Jane_Doe-X+ads@Example.com") == sha("jane_doe-x@example.com")
    # The docs' number has a 555 area code, which no real number has (phonenumbers refuses
    # it): the hash pins the form (E.164 with "+"), a real number shows the rule.
    assert sha("+15554441234") == REDDIT_PHONE
    assert one("reddit", "phone", "+1 (650) 555-1212") == sha("+16505551212")
    assert one("reddit", "phone", "(650) 555-1212", "US") == sha("+16505551212")


def test_microsoft_examples() -> None:
    assert one("microsoft", "email", "john@contoso.com") == MICROSOFT_EMAIL
    # "Trim all whitespace ... remove all dots ... remove any alias ... lowercase"
    assert one("microsoft", "email", "  Jo.hn+Ads@Contoso.COM ") == MICROSOFT_EMAIL
    assert one("microsoft", "phone", "+14255551234") == MICROSOFT_PHONE
    assert one("microsoft", "phone", "(425) 555-1234", "US") == MICROSOFT_PHONE
    # externalId "anonymized": hashed, case kept.
    assert one("microsoft", "external_id", " User-42 ") == sha("User-42")


def test_reddit_and_microsoft_email_aliases() -> None:
    # Reddit and Microsoft: dots and +suffix go, every domain.
    assert one("reddit", "email", "John.Doe+shop@Example.com") == sha("johndoe@example.com")
    assert one("microsoft", "email", "John.Doe+shop@Example.com") == sha("johndoe@example.com")
    # Meta and TikTok keep both.
    assert one("meta", "email", "John.Doe+shop@Example.com") == sha("john.doe+shop@example.com")
    assert one("tiktok", "email", "John.Doe+shop@Example.com") == sha("john.doe+shop@example.com")


def test_the_same_phone_hashes_differently_with_and_without_plus() -> None:
    with_plus = {p for p in PLATFORMS if "phone" in RULES[p]} - {"meta", "snapchat", "pinterest"}
    for platform in with_plus:
        assert one(platform, "phone", "+1 650 555 1212") == sha("+16505551212"), platform
    for platform in ("meta", "snapchat", "pinterest"):
        assert one(platform, "phone", "+1 650 555 1212") == META_PHONE, platform


# -- every rule of every platform ------------------------------------------------------------

# (platform, field, raw, sent): "sent" is the expected value, hashed by sha() where the
# platform hashes. Normalized forms come from the rules in the module docstring.
CASES: list[tuple[Platform, Field, str, str]] = [
    ("meta", "email", " Jane@Example.com ", sha("jane@example.com")),
    ("meta", "phone", "+44 20 7946 0958", sha("442079460958")),
    ("meta", "first_name", "Jean-Luc", sha("jeanluc")),
    ("meta", "last_name", "O'Neil Jr.", sha("oneil jr")),
    ("meta", "city", "Menlo Park", sha("menlopark")),
    ("meta", "state", "California", sha("ca")),
    ("meta", "zip", "94035-1234", sha("94035")),
    ("meta", "country", "UK", sha("gb")),
    ("meta", "gender", "MALE", sha("m")),
    ("meta", "birthday", "19970216", sha("19970216")),
    ("meta", "external_id", " User-42 ", sha("user-42")),
    ("google", "email", "J.O.H.N+x@GMAIL.com", sha("john@gmail.com")),
    ("google", "phone", "020 7946 0958", sha("+442079460958")),  # default GB below
    ("google", "first_name", "  Mary  Ann ", sha("mary ann")),
    ("google", "last_name", "O'Neil2", sha("oneil")),
    ("google", "street", "1600 Amphitheatre Pkwy.", sha("1600 amphitheatre pkwy")),
    ("google", "city", "Mountain View 1", "mountain view"),
    ("google", "state", "CA", "ca"),
    ("google", "zip", " 94043~ ", "94043"),
    ("google", "country", "de", "DE"),
    ("tiktok", "email", "Jane@Example.com", sha("jane@example.com")),
    ("tiktok", "phone", "+1 (650) 555-1212", sha("+16505551212")),
    ("tiktok", "first_name", " Jane ", sha("jane")),
    ("tiktok", "last_name", "Doe", sha("doe")),
    ("tiktok", "zip", "SW1A 1AA", sha("sw1a1aa")),
    ("tiktok", "external_id", " User-42 ", sha("User-42")),
    ("snapchat", "email", "Jane@Example.com", sha("jane@example.com")),
    ("snapchat", "phone", "+1 650 555 1212", sha("16505551212")),
    ("snapchat", "first_name", "Raphaël", sha("raphaël")),
    ("snapchat", "last_name", "Müller", sha("müller")),
    ("snapchat", "city", "Saint-Étienne", sha("saintétienne")),
    ("snapchat", "state", "NY", sha("ny")),
    ("snapchat", "zip", "10001", sha("10001")),
    ("snapchat", "country", "FR", sha("fr")),
    ("snapchat", "gender", "woman", sha("f")),
    ("snapchat", "birthday", "1990/01/31", sha("19900131")),
    ("snapchat", "external_id", "u-1", sha("u-1")),
    ("pinterest", "email", "Jane@Example.com", sha("jane@example.com")),
    ("pinterest", "phone", "+1-650-555-1212", sha("16505551212")),
    ("pinterest", "first_name", "Jane", sha("jane")),
    ("pinterest", "last_name", "Doe", sha("doe")),
    ("pinterest", "city", "San Francisco", sha("sanfrancisco")),
    ("pinterest", "state", "Texas", sha("tx")),
    ("pinterest", "zip", "94103-1234", sha("941031234")),
    ("pinterest", "country", "US", sha("us")),
    ("pinterest", "gender", "F", sha("f")),
    ("pinterest", "birthday", "12/25/1980", sha("19801225")),
    ("pinterest", "external_id", "u-1", sha("u-1")),
    ("linkedin", "email", "Jane@Example.com", sha("jane@example.com")),
    ("linkedin", "first_name", " Jane ", "Jane"),
    ("linkedin", "last_name", "Doe", "Doe"),
    ("linkedin", "country", "us", "US"),
    ("linkedin", "external_id", " u-1 ", "u-1"),
    ("reddit", "email", "Jane_Doe+ads@Example.com", sha("jane_doe@example.com")),
    ("reddit", "phone", "+1 650 555 1212", sha("+16505551212")),
    ("reddit", "external_id", "u-1", sha("u-1")),
    ("x", "email", "Jane@Example.com", sha("jane@example.com")),
    ("x", "phone", "+1 650 555 1212", sha("+16505551212")),
    ("microsoft", "email", "jane.doe+x@example.com", sha("janedoe@example.com")),
    ("microsoft", "phone", "+1 650 555 1212", sha("+16505551212")),
    ("microsoft", "external_id", "u-1", sha("u-1")),
]


@pytest.mark.parametrize(("platform", "field", "raw", "sent"), CASES)
def test_rule(platform: Platform, field: Field, raw: str, sent: str) -> None:
    country = "GB" if (platform, raw) == ("google", "020 7946 0958") else None
    assert one(platform, field, raw, country) == sent


def test_every_rule_of_every_platform_has_a_case() -> None:
    table = {(p, f) for p in RULES for f in RULES[p]}
    covered = {(p, f) for p, f, _, _ in CASES}
    assert table - covered == set()
    assert set(RULES) == set(PLATFORMS)


def test_a_field_a_platform_does_not_take_is_not_sent() -> None:
    data = UserData(email="jane@example.com", gender="f", birthday="1990-01-01", street="x")
    assert set(prepare(data, "google").values) == {"email", "street"}
    assert set(prepare(data, "x").values) == {"email"}


def test_the_docstring_table_is_the_table() -> None:
    """The table in the module docstring says what RULES does: which platform takes which
    field, hashed (H...) or plain."""
    doc = user_data_module.__doc__ or ""
    lines = doc[doc.index("field        meta") :].splitlines()
    header = lines[0].split()
    columns = [m.start() for m in re.finditer(r"\S+", lines[0])]
    rows = [line for line in lines[2:] if line and not line.startswith("=")][: len(FIELDS)]
    for line in rows:
        name = line.split()[0]
        for platform, start, end in zip(header[1:], columns[1:], [*columns[2:], None], strict=True):
            cell = line[start:end].strip()
            rule = RULES[platform].get(name)  # type: ignore[index,call-overload]
            if rule is None:
                assert cell == "", (name, platform)
            else:
                assert cell.startswith("H" if rule.hashed else "plain"), (name, platform, cell)
    assert [line.split()[0] for line in rows] == list(FIELDS)


# -- hashed values, invalid values, drops ----------------------------------------------------


def test_already_hashed_values_pass_unchanged_in_lowercase() -> None:
    digest = sha("jane@example.com")
    for platform in PLATFORMS:
        for field, rule in RULES[platform].items():
            sent = one(platform, field, " " + digest.upper() + " ")
            if rule.hashed:
                assert sent == digest, (platform, field)
            else:  # a plain field cannot be un-hashed: left out
                assert sent is None, (platform, field)
    assert looks_hashed(digest.upper()) and not looks_hashed(digest[:-1])


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("email", "jane.example.com"),
        ("email", "jane@localhost"),
        ("email", "jane doe@example.com"),
        ("email", "@example.com"),
        ("phone", "12345"),
        ("phone", "n/a"),
        ("phone", "(800)555-0100"),  # national, and no default country to complete it
        ("phone", "(650) 555-1212"),  # the same (not Singapore's +65 0555 1212)
        ("phone", "+1 555 555 5555"),  # no such area code
        ("first_name", "123 !!"),
        ("country", "Germany"),
        ("country", "ZZ"),
        ("gender", "x"),
        ("birthday", "2/3/1997"),  # 2 March or 3 February?
        ("birthday", "1997-02-30"),
        ("birthday", "1850-01-01"),
        ("birthday", "soon"),
        ("city", "12345"),
    ],
)
def test_a_value_that_does_not_normalize_is_dropped_and_counted(field: Field, raw: str) -> None:
    prepared = prepare(UserData(**{field: raw}), "meta")
    assert prepared.values == {}
    assert prepared.drops == {"invalid_" + field: 1}


def test_a_value_prepared_again_in_another_context_is_normalized_for_it() -> None:
    """Prepared user data and normalized values are cached: the same raw value under
    another default phone country or another event country comes out as if prepared alone,
    and caches emptied in between change nothing."""
    london = "020 7946 0958"

    def results() -> list[str | None]:
        return [
            one("meta", "phone", london, "US"),
            one("meta", "phone", london, "GB"),
            one("meta", "phone", london, "US"),
            one("meta", "zip", "94025-1234", country="US"),
            one("meta", "zip", "94025-1234", country="GB"),
            one("meta", "zip", "94025-1234"),
        ]

    expected = [None, sha("442079460958"), None, sha("94025"), sha("940251234"), sha("94025")]
    assert results() == expected
    assert results() == expected  # now from the cache
    user_data_module._prepared.cache_clear()
    assert results() == expected  # prepared again from the cached values
    user_data_module._normalized.cache_clear()
    user_data_module._prepared.cache_clear()
    assert results() == expected


def test_drop_reasons_are_codes_one_per_field() -> None:
    assert {f"invalid_{f}" for f in FIELDS} == DROP_REASONS
    assert all(re.fullmatch(r"invalid_[a-z_]+", reason) for reason in DROP_REASONS)


def test_over_long_values_are_dropped() -> None:
    assert prepare(UserData(phone="1" * 300), "google").drops == {"invalid_phone": 1}


def test_odd_input_never_raises() -> None:
    odd = ["", " ", "\x00", "@", "+", "00", "+0", "☎☎☎", "a" * 300, "\u200b", "0" * 20, "١٢٣"]
    for platform in PLATFORMS:
        for field in RULES[platform]:
            for raw in odd:
                prepare(UserData(**{field: raw}), platform, default_phone_country="US")


def test_the_module_prints_no_values() -> None:
    data = UserData(email="jane@example.com", phone="+16505551212", ip="203.0.113.9")
    assert repr(data) == "UserData(<email, phone, ip>)" and str(data) == repr(data)
    prepared = prepare(UserData(email="jane@example.com", phone="nope"), "meta")
    assert "jane" not in repr(prepared) and "nope" not in repr(prepared)
    assert "invalid_phone" in repr(prepared)
    # The module logs nothing: it has no logger to log with.
    assert "logging" not in vars(user_data_module)
    assert "log" not in vars(user_data_module)


def test_looks_like_email() -> None:
    assert looks_like_email("write to jane@example.com today")
    assert not looks_like_email("@handle") and not looks_like_email("a@b")


def test_the_public_names() -> None:
    assert sorted(user_data_module.__all__) == [
        "BROWSER_ID_COOKIES",
        "CLICK_ID_PARAMS",
        "DROP_REASONS",
        "FIELDS",
        "Field",
        "MATCH_KEYS",
        "PLATFORMS",
        "PLATFORM_BROWSER_IDS",
        "PLATFORM_CLICK_IDS",
        "PLATFORM_COOKIES",
        "PhoneCountry",
        "Platform",
        "Prepared",
        "RULES",
        "Rule",
        "UserData",
        "extract_user_data",
        "is_phone_country",
        "looks_hashed",
        "looks_like_email",
        "match_keys",
        "prepare",
        "sha256_hex",
    ]
    for name in user_data_module.__all__:
        assert getattr(user_data_module, name) is not None


# -- extraction ------------------------------------------------------------------------------


def test_identify_traits_win_over_context_traits_then_properties() -> None:
    event = {
        "type": "track",
        "userId": "user-42",
        "traits": {"email": "a@example.com"},
        "context": {"traits": {"email": "b@example.com", "phone": "+1 650 555 1212"}},
        "properties": {"email": "c@example.com", "phone": "+1 800 555 0100", "city": "Nope"},
    }
    data = extract_user_data(event)
    assert (data.email, data.phone, data.external_id) == (
        "a@example.com",
        "+1 650 555 1212",
        "user-42",
    )
    assert data.city is None  # only email and phone are read from properties
    only_properties = extract_user_data({"properties": {"email": " c@example.com "}})
    assert only_properties.email == "c@example.com"


def test_address_nested_or_flat_and_names() -> None:
    nested = extract_user_data(
        {
            "traits": {
                "first_name": "Jane",
                "lastName": "Doe",
                "gender": "female",
                "birthday": "1990-01-31",
                "address": {
                    "street": "1 Main St",
                    "city": "Springfield",
                    "region": "IL",
                    "postal_code": 62701,
                    "country": "US",
                },
            }
        }
    )
    assert (nested.first_name, nested.last_name, nested.gender, nested.birthday) == (
        "Jane",
        "Doe",
        "female",
        "1990-01-31",
    )
    assert (nested.street, nested.city, nested.state, nested.zip, nested.country) == (
        "1 Main St",
        "Springfield",
        "IL",
        "62701",
        "US",
    )
    flat = extract_user_data(
        {"context": {"traits": {"city": "Paris", "state": "IDF", "zip": "75018", "country": "FR"}}}
    )
    assert (flat.city, flat.state, flat.zip, flat.country) == ("Paris", "IDF", "75018", "FR")


def test_name_is_split_only_without_first_and_last_name() -> None:
    assert extract_user_data({"traits": {"name": "Mary Ann Smith"}}).first_name == "Mary"
    assert extract_user_data({"traits": {"name": "Mary Ann Smith"}}).last_name == "Ann Smith"
    alone = extract_user_data({"traits": {"name": "Cher"}})
    assert (alone.first_name, alone.last_name) == ("Cher", None)
    given = extract_user_data({"traits": {"name": "Mary Smith", "firstName": "Molly"}})
    assert (given.first_name, given.last_name) == ("Molly", None)


def test_what_the_relay_knows_ip_user_agent_click_and_browser_ids() -> None:
    event = {
        "anonymousId": "anon-1",
        "context": {
            "ip": "203.0.113.9",
            "userAgent": "Mozilla/5.0",
            "clickIds": {"GCLID": "g-1", "ttclid": "E.C.P.x", "bogus": "1", "fbclid": "bad value"},
            "clientIds": {
                "fbc": "fb.1.1554763741205.AbC",
                "fbp": "fb.1.1596403881668.11",
                "_ttp": "t",
                "_rdt_uuid": "1677712978045.b8f7eb7d-b357-437b-8bd3-e1c8166c7132",
                "_uetvid": "b171a9b06ce011ecafcd1b209be8601b",
            },
            "page": {"url": "https://shop.test/?ScCid=s-1&gclid=g-2&utm_source=x"},
        },
    }
    data = extract_user_data(event)
    assert (data.ip, data.user_agent) == ("203.0.113.9", "Mozilla/5.0")
    # The landing URL's ids win over those sent in context.clickIds (the latest landing).
    assert data.click_ids == {"gclid": "g-2", "ttclid": "E.C.P.x", "ScCid": "s-1"}
    assert (data.fbc, data.fbp, data.ttp) == (
        "fb.1.1554763741205.AbC",
        "fb.1.1596403881668.11",
        "t",
    )
    assert data.browser_ids == {
        "_ttp": "t",
        "_rdt_uuid": "1677712978045.b8f7eb7d-b357-437b-8bd3-e1c8166c7132",
        "_uetvid": "b171a9b06ce011ecafcd1b209be8601b",
    }
    search = extract_user_data(
        {"context": {"page": {"search": "?msclkid=m-1", "url": "https://x.test/?msclkid=m-2"}}}
    )
    assert search.click_ids == {"msclkid": "m-1"}
    assert extract_user_data({"context": {"clientIds": {"ttp": "t-2"}}}).ttp == "t-2"


def test_the_ad_platforms_browser_id_cookies_are_read_from_client_ids() -> None:
    client_ids = {name: f"{name}-value" for name in BROWSER_ID_COOKIES}
    data = extract_user_data({"context": {"clientIds": {**client_ids, "_other": "x"}}})
    assert data.browser_ids == client_ids
    assert "browser_ids" in repr(data) and "_scid-value" not in repr(data)
    blank = extract_user_data({"context": {"clientIds": {"_scid": " ", "_epik": 5}}})
    assert blank.browser_ids == {"_epik": "5"}  # a blank value is absent
    assert extract_user_data({}).browser_ids == {}


def test_odd_shapes_are_absent_not_errors() -> None:
    data = extract_user_data(
        {
            "userId": True,
            "traits": ["not", "a", "dict"],
            "context": {"traits": {"email": {"x": 1}, "phone": 16505551212}, "page": "x"},
        }
    )
    assert data.email is None and data.external_id is None
    assert data.phone == "16505551212"
    assert extract_user_data({}) == UserData()


def test_click_id_names_are_the_identity_steps() -> None:
    from tagrelay.pipeline.identity import CLICK_ID_PARAMS as CAPTURED

    assert CLICK_ID_PARAMS is CAPTURED  # one list, the event model's


def test_match_keys() -> None:
    data = UserData(
        email="jane@example.com",
        first_name="Jane",
        zip="94035",
        ip="203.0.113.9",
        user_agent="UA",
        click_ids={"gclid": "g-1"},
        fbc="fb.1.1.x",
        fbp="fb.1.1.y",
    )
    assert match_keys(prepare(data, "meta"), data) == {
        "email",
        "name",
        "address",
        "ip",
        "user_agent",
        "click_id",
        "browser_id",
    }
    assert match_keys(prepare(data, "google"), data) == {
        "email",
        "name",
        "address",
        "ip",
        "user_agent",
        "click_id",
    }
    assert match_keys(prepare(data, "tiktok"), data) == {
        "email",
        "name",
        "address",
        "ip",
        "user_agent",
    }
    browsers = UserData(browser_ids={"_rdt_uuid": "r", "_uetvid": "u"}, ttp="t")
    assert match_keys(prepare(browsers, "reddit"), browsers) == {"browser_id"}
    assert match_keys(prepare(browsers, "microsoft"), browsers) == {"browser_id"}
    assert match_keys(prepare(browsers, "x"), browsers) == frozenset()
    reddits = UserData(browser_ids={"_rdt_uuid": "r"})
    assert match_keys(prepare(reddits, "microsoft"), reddits) == frozenset()
    assert match_keys(prepare(UserData(), "x"), UserData()) == frozenset()
    cookies = UserData(browser_ids={"_scid": "s-1", "_epik": "e-1", "_ttp": "t-1"})
    # Snap's _scid is its browser id; Pinterest's _epik holds the click id its tag kept.
    assert match_keys(prepare(cookies, "snapchat"), cookies) == {"browser_id"}
    assert match_keys(prepare(cookies, "pinterest"), cookies) == {"click_id"}
    assert match_keys(prepare(cookies, "meta"), cookies) == frozenset()
    assert set(MATCH_KEYS) >= match_keys(prepare(data, "meta"), data)
