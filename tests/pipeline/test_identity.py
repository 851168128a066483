"""Identity cookies, click ids, Meta and GA ids: the pure logic of pipeline.identity."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tagrelay.config.models import IdentityConfig
from tagrelay.model import BROWSER_ID_COOKIES
from tagrelay.pipeline.identity import (
    CLICK_COOKIE,
    IdentityService,
    Visit,
    _suffix_list,
    click_ids_in_url,
    parse_ga_client_id,
    parse_ga_session,
    registrable_domain,
    subdomain_index,
)

NOW_MS = 1_795_962_297_604


def service(**options: Any) -> IdentityService:
    return IdentityService(IdentityConfig(**options), "")


def event(**fields: Any) -> dict[str, Any]:
    return {"type": "page", "context": {}, **fields}


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("data.example.com", "example.com"),
        ("data.example.com:8443", "example.com"),
        ("www.shop.test:51234", "shop.test"),
        ("a.b.example.co.uk", "example.co.uk"),
        ("example.com", "example.com"),
        ("DATA.Example.COM", "example.com"),
        # An absolute name: browsers keep example.com. apart from example.com, and would
        # refuse a cookie for the domain example.com from it; host-only works.
        ("EXAMPLE.com.", None),
        ("foo.github.io", "foo.github.io"),  # a private suffix: each user is its own site
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),  # an A-label, as browsers send
        ("localhost", None),
        ("localhost:8080", None),
        ("127.0.0.1:8080", None),
        ("[::1]:8080", None),
        ("co.uk", None),
        ("", None),
        (None, None),
        # Not host names: never a Domain attribute, whatever part of them looks like one.
        ("a.shop.test; SameSite=None; Secure", None),
        ("a.shop.test;Domain=evil.test", None),
        ("a.shop.test, b.shop.test", None),
        ("a.shop.test b", None),
        ("a=b.shop.test", None),
        ("a_b.shop.test", None),
        ("bücher.example", None),
        ("a..shop.test", None),
        ("-a.shop.test", None),
        ("a.shop.test:99999", None),
        ("a.shop.test:80:80", None),
        ("a.shop.test:", None),
        ("1.2.3.999", None),
        ("x" * 64 + ".shop.test", None),
        (("a." * 130) + "shop.test", None),
    ],
)
def test_registrable_domain(host: str | None, expected: str | None) -> None:
    assert registrable_domain(host) == expected


def test_cookie_domain_settings() -> None:
    assert service().cookie_domain("data.example.com") == "example.com"
    assert service(cookie_domain="host").cookie_domain("data.example.com") is None
    assert service(cookie_domain=".example.org").cookie_domain("x.example.org") == "example.org"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("GA1.1.1234567890.1700000000", "1234567890.1700000000"),
        ("GA1.2.987.654", "987.654"),
        ("garbage", None),
        ("GA1.1.abc", None),
    ],
)
def test_ga_client_id(value: str, expected: str | None) -> None:
    assert parse_ga_client_id(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("GS1.1.1700000000.5.1.1700000100.0.0.0", ("1700000000", 5)),
        ("GS2.1.s1700000000$o12$g1$t1700000100$j0$l0$h0", ("1700000000", 12)),
        ("GS2.1.s1700000000", ("1700000000", None)),
        ("GS1.1.notanumber.5", None),
        ("XX", None),
    ],
)
def test_ga_session(value: str, expected: tuple[str, int | None] | None) -> None:
    assert parse_ga_session(value) == expected


def test_click_ids_from_url_and_search() -> None:
    url = "https://www.shop.test/landing?utm_source=x&gclid=Cj0KCQ&FBCLID=IwAR1&sccid=abc&x=1"
    assert click_ids_in_url(url, None) == {"gclid": "Cj0KCQ", "fbclid": "IwAR1", "ScCid": "abc"}
    assert click_ids_in_url(None, "?msclkid=m1&ttclid=t1") == {"msclkid": "m1", "ttclid": "t1"}
    assert click_ids_in_url("https://www.shop.test/", None) == {}
    # values that could break a cookie or a header are ignored
    assert click_ids_in_url(None, "?gclid=a%3Bb&fbclid=") == {}


def test_first_sight_adopts_the_script_id_and_sets_an_httponly_cookie() -> None:
    ids = service()
    visitor = ids.read({})
    visit = Visit(domain="shop.test")
    e = event(anonymousId="script-id-1")
    ids.apply(e, visitor, visit, own_script=True, ads=True, now_ms=NOW_MS)
    assert e["anonymousId"] == "script-id-1"
    assert visit.anonymous_id == "script-id-1"
    cookie = visit.cookies["tr_aid"]
    assert (cookie.value, cookie.http_only, cookie.domain, cookie.path) == (
        "script-id-1",
        True,
        "shop.test",
        "/",
    )
    assert cookie.max_age == 400 * 86_400


def test_the_cookie_id_wins_over_the_script_id() -> None:
    ids = service()
    visitor = ids.read({"tr_aid": "server-id"})
    visit = Visit()
    e = event(anonymousId="new-script-id")
    ids.apply(e, visitor, visit, own_script=True, ads=True, now_ms=NOW_MS)
    assert e["anonymousId"] == "server-id"
    assert visit.anonymous_id == "server-id"
    assert visit.cookies["tr_aid"].value == "server-id"  # renewed


def test_other_sdks_keep_their_id_and_anonymous_events_get_the_cookie_id() -> None:
    ids = service()
    visitor = ids.read({"tr_aid": "server-id"})
    visit = Visit()
    segment = event(anonymousId="ajs-id")
    ids.apply(segment, visitor, visit, own_script=False, ads=True, now_ms=NOW_MS)
    assert segment["anonymousId"] == "ajs-id"
    bare = event()
    ids.apply(bare, visitor, visit, own_script=False, ads=True, now_ms=NOW_MS)
    assert bare["anonymousId"] == "server-id"
    known_user = event(userId="u1")
    ids.apply(known_user, visitor, visit, own_script=False, ads=True, now_ms=NOW_MS)
    assert "anonymousId" not in known_user


def test_an_invalid_cookie_or_script_id_is_not_trusted() -> None:
    ids = service()
    visitor = ids.read({"tr_aid": "bad id; with spaces"})
    assert visitor.anonymous_id is None
    visit = Visit()
    e = event(anonymousId="x" * 500)
    ids.apply(e, visitor, visit, own_script=True, ads=True, now_ms=NOW_MS)
    assert e["anonymousId"] != "x" * 500
    assert len(e["anonymousId"]) == 36  # a fresh UUID


def test_click_ids_are_captured_kept_and_attached_to_later_events() -> None:
    ids = service()
    landing = event(context={"page": {"url": "https://www.shop.test/?gclid=G1&fbclid=F1"}})
    visitor = ids.read({})
    visit = Visit(domain="shop.test")
    ids.apply(landing, visitor, visit, own_script=True, ads=True, now_ms=NOW_MS)
    assert landing["context"]["clickIds"] == {"gclid": "G1", "fbclid": "F1"}
    click_cookie = visit.cookies[CLICK_COOKIE]
    assert click_cookie.http_only

    # the next page view, a later request: only the cookies tell
    later = event(context={"page": {"url": "https://www.shop.test/pricing"}})
    cookies = {name: c.value for name, c in visit.cookies.items()}
    visit2 = Visit(domain="shop.test")
    ids.apply(later, ids.read(cookies), visit2, own_script=True, ads=True, now_ms=NOW_MS + 5)
    assert later["context"]["clickIds"] == {"gclid": "G1", "fbclid": "F1"}
    assert later["context"]["clientIds"]["fbc"] == f"fb.1.{NOW_MS}.F1"
    assert CLICK_COOKIE not in visit2.cookies  # nothing new to store
    assert "_fbc" not in visit2.cookies


def test_fbc_is_rebuilt_for_a_new_fbclid_and_fbp_created_once() -> None:
    ids = service()
    visitor = ids.read({"_fbc": "fb.1.1000.OLD", "_fbp": "fb.1.1000.42"})
    visit = Visit(domain="shop.test")
    e = event(context={"page": {"search": "?fbclid=NEW"}})
    ids.apply(e, visitor, visit, own_script=True, ads=True, now_ms=NOW_MS)
    fbc = visit.cookies["_fbc"]
    assert fbc.value == f"fb.1.{NOW_MS}.NEW"
    assert not fbc.http_only  # Meta's pixel reads it
    assert fbc.path == "/"
    assert "_fbp" not in visit.cookies  # it exists already
    assert e["context"]["clientIds"] == {"fbc": f"fb.1.{NOW_MS}.NEW", "fbp": "fb.1.1000.42"}

    fresh = Visit(domain="www.shop.test")
    ids.apply(event(), ids.read({}), fresh, own_script=True, ads=True, now_ms=NOW_MS)
    fbp = fresh.cookies["_fbp"].value.split(".")
    assert fbp[:3] == ["fb", "2", str(NOW_MS)] and fbp[3].isdigit()


def test_without_ads_consent_no_click_or_meta_cookie_is_set_or_read() -> None:
    ids = service()
    visitor = ids.read({"_fbp": "fb.1.1000.42", CLICK_COOKIE: "gclid=OLD"})
    visit = Visit()
    e = event(context={"page": {"search": "?gclid=G1&fbclid=F1"}})
    ids.apply(e, visitor, visit, own_script=True, ads=False, now_ms=NOW_MS)
    assert set(visit.cookies) == {"tr_aid"}
    assert "clickIds" not in e["context"]
    assert "clientIds" not in e["context"]


def test_ga_cookies_become_client_ids() -> None:
    ids = service()
    visitor = ids.read(
        {
            "_ga": "GA1.1.111.222",
            "_ga_ABC123": "GS2.1.s1700000000$o3$g1$t1700000100$j0$l0$h0",
            "_ga_XYZ": "GS1.1.1699999999.7.1.1700000000.0.0.0",
        }
    )
    e = event()
    ids.apply(e, visitor, Visit(), own_script=True, ads=False, now_ms=NOW_MS)
    assert e["context"]["clientIds"]["ga4"] == {
        "clientId": "111.222",
        "sessionIds": {"G-ABC123": "1700000000", "G-XYZ": "1699999999"},
        "sessionNumbers": {"G-ABC123": 3, "G-XYZ": 7},
    }


def test_a_sender_s_own_client_ids_are_kept() -> None:
    ids = service()
    e = event(context={"clientIds": {"ga4": {"clientId": "from-sdk"}, "fbp": "fb.1.5.5"}})
    ids.apply(
        e,
        ids.read({"_ga": "GA1.1.1.2", "_fbp": "fb.1.9.9"}),
        Visit(),
        own_script=False,
        ads=True,
        now_ms=NOW_MS,
    )
    assert e["context"]["clientIds"]["ga4"] == {"clientId": "from-sdk"}
    assert e["context"]["clientIds"]["fbp"] == "fb.1.5.5"


def test_cookie_keeper_re_sets_matching_cookies_at_root() -> None:
    ids = service(cookie_keeper=["_ga", "_ga_*", "_ttp"])
    visitor = ids.read(
        {"_ga": "GA1.1.1.2", "_ga_ABC": "GS1.1.1.1", "_gid": "x", "_ttp": 'bad"value'}
    )
    visit = Visit(domain="shop.test")
    ids.keep(visitor, visit)
    assert set(visit.cookies) == {"_ga", "_ga_ABC"}
    kept = visit.cookies["_ga"]
    assert (kept.value, kept.path, kept.http_only, kept.max_age) == (
        "GA1.1.1.2",
        "/",
        False,
        400 * 86_400,
    )


def test_base_path_scopes_the_relay_s_own_cookies() -> None:
    ids = IdentityService(IdentityConfig(), "/t")
    visit = Visit()
    e = event(context={"page": {"search": "?gclid=G"}})
    ids.apply(e, ids.read({}), visit, own_script=True, ads=True, now_ms=NOW_MS)
    assert visit.cookies["tr_aid"].path == "/t"
    assert visit.cookies[CLICK_COOKIE].path == "/t"
    assert visit.cookies["_fbp"].path == "/"  # vendor cookies serve the whole site


@pytest.mark.parametrize(
    ("domain", "index"), [("example.com", 1), ("www.example.com", 2), (None, 1), ("localhost", 0)]
)
def test_subdomain_index(domain: str | None, index: int) -> None:
    assert subdomain_index(domain) == index


def test_server_managed_ga_client_id_adopts_then_keeps_its_own() -> None:
    ids = IdentityService(IdentityConfig(), "", ga_client_id_cookie="FPID")
    visitor = ids.read({"_ga": "GA1.1.111.222"})
    visit = Visit(domain="shop.test")
    e = event()
    ids.apply(e, visitor, visit, own_script=True, ads=False, now_ms=NOW_MS)
    assert e["context"]["clientIds"]["ga4"]["clientId"] == "111.222"  # adopted from _ga
    cookie = visit.cookies["FPID"]
    assert (cookie.value, cookie.http_only, cookie.path) == ("111.222", True, "/")

    # later gtag resets _ga (ITP); the relay's cookie wins and rewrites the hit's cid
    later = {
        "type": "page",
        "anonymousId": "999.888",
        "context": {
            "clientIds": {"ga4": {"clientId": "999.888"}},
            "ga4": {"request": "v=2&tid=G-1&cid=999.888&dl=x", "event": ""},
        },
    }
    ids.apply(
        later, ids.read({"FPID": "111.222"}), Visit(), own_script=False, ads=False, now_ms=NOW_MS
    )
    assert later["context"]["clientIds"]["ga4"]["clientId"] == "111.222"
    assert later["context"]["ga4"]["request"] == "v=2&tid=G-1&cid=111.222&dl=x"
    assert later["anonymousId"] == "111.222"


def test_server_managed_ga_client_id_is_made_when_there_is_none() -> None:
    ids = IdentityService(IdentityConfig(), "", ga_client_id_cookie="FPID")
    visit = Visit()
    e = event()
    ids.apply(
        e, ids.read({"FPID": "not-a-client-id"}), visit, own_script=True, ads=False, now_ms=NOW_MS
    )
    made = e["context"]["clientIds"]["ga4"]["clientId"]
    assert re.fullmatch(r"\d+\.\d+", made)
    assert visit.cookies["FPID"].value == made


def test_fbp_is_only_made_when_the_cookie_will_come_back() -> None:
    ids = service()
    # A cross-origin SDK request: no relay cookie came with it, none will come back.
    sdk = Visit()
    e = event(anonymousId="ajs-1")
    ids.apply(e, ids.read({}), sdk, own_script=False, ads=True, now_ms=NOW_MS)
    assert "_fbp" not in sdk.cookies
    assert "fbp" not in e["context"].get("clientIds", {})
    # The same SDK on the site's own origin: the relay's cookie came along.
    same_origin = Visit()
    ids.apply(
        event(), ids.read({"tr_aid": "v-1"}), same_origin, own_script=False, ads=True, now_ms=NOW_MS
    )
    assert "_fbp" in same_origin.cookies
    # The relay's own script always sends cookies.
    script = Visit()
    ids.apply(event(), ids.read({}), script, own_script=True, ads=True, now_ms=NOW_MS)
    assert "_fbp" in script.cookies


def test_the_suffix_list_is_loaded_up_front_only_when_cookie_domains_need_it() -> None:
    _suffix_list.cache_clear()
    service(cookie_domain="host").load_suffix_list()
    service(cookie_domain="example.com").load_suffix_list()
    assert _suffix_list.cache_info().currsize == 0
    service().load_suffix_list()  # cookie_domain "auto"
    assert _suffix_list.cache_info().currsize == 1


def test_tiktoks_ttp_cookie_is_attached_with_ads_consent_and_never_made_up() -> None:
    ids = service()
    ttp = "2F7h37YkS1j57AYSKTI7IHhJPYH"
    e, visit = event(), Visit()
    ids.apply(e, ids.read({"_ttp": ttp}), visit, own_script=True, ads=True, now_ms=NOW_MS)
    assert e["context"]["clientIds"]["_ttp"] == ttp
    assert "_ttp" not in visit.cookies  # TikTok's pixel owns it
    denied = event()
    ids.apply(denied, ids.read({"_ttp": ttp}), Visit(), own_script=True, ads=False, now_ms=NOW_MS)
    assert "_ttp" not in denied["context"].get("clientIds", {})
    fresh = event()
    ids.apply(fresh, ids.read({}), Visit(), own_script=True, ads=True, now_ms=NOW_MS)
    assert "_ttp" not in fresh["context"]["clientIds"]
    sent = event(context={"clientIds": {"_ttp": "from-the-sender"}})
    ids.apply(sent, ids.read({"_ttp": ttp}), Visit(), own_script=True, ads=True, now_ms=NOW_MS)
    assert sent["context"]["clientIds"]["_ttp"] == "from-the-sender"
    assert ids.read({"_ttp": "x" * 201}).ttp is None
    assert ids.read({"_ttp": 'a"b'}).ttp is None


@pytest.mark.parametrize("name", BROWSER_ID_COOKIES)
def test_every_ad_platforms_browser_id_cookie_is_attached_with_ads_consent(name: str) -> None:
    """Snap's ``_scid``, Pinterest's ``_epik``, ... go the way of TikTok's ``_ttp``: attached
    as ``context.clientIds.<name>`` under ads consent, never set or made up by the relay."""
    ids = service()
    value = "8b6f0f1c-2c58-4a8d-9d5e-0b1f7a3c2d41"
    e, visit = event(), Visit()
    ids.apply(e, ids.read({name: value}), visit, own_script=True, ads=True, now_ms=NOW_MS)
    assert e["context"]["clientIds"][name] == value
    assert name not in visit.cookies  # the vendor's pixel owns it
    denied = event()
    ids.apply(denied, ids.read({name: value}), Visit(), own_script=True, ads=False, now_ms=NOW_MS)
    assert name not in denied["context"].get("clientIds", {})
    sent = event(context={"clientIds": {name: "from-the-sender"}})
    ids.apply(sent, ids.read({name: value}), Visit(), own_script=True, ads=True, now_ms=NOW_MS)
    assert sent["context"]["clientIds"][name] == "from-the-sender"
    assert ids.read({name: "x" * 201}).browser_ids == {}
    assert ids.read({name: 'a"b'}).browser_ids == {}
