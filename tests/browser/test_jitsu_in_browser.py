"""Jitsu's snippet, unchanged, against the relay (``script.jitsu_compat``) in Chromium.

A site that switches from Jitsu keeps its pages: Jitsu's own script tag pointed at the
relay's ``/p.js`` (``data-write-key``, ``data-onload``), ``jitsuQ`` pushes before and after
the script loads, and calls written as Jitsu's documentation writes them
(``window.jitsu.track/page/identify/group/reset``, ``user()``). What the relay stored is read
from its recording webhook forwarder. The relay is mounted at the root, as Jitsu is, on its
own tracking host (``data.shop.test``); the pages are on ``www.shop.test``. The rig is the one
of conftest.py, with a relay of its own for this module.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.conftest import BROWSER_KEY, Site
from tests.rig import free_port, relay_process, serve_in_thread

pytestmark = pytest.mark.browser

RELAY_CONFIG = """
data_dir: {data_dir}
server:
  host: 127.0.0.1
  port: {port}
# The admin listener on a free port, so that relays run side by side.
admin: {{listen: "127.0.0.1:0"}}
keys:
  - id: website
    kind: browser
    key: {browser_key}
    allowed_origins: ["http://www.shop.test:{site_port}"]
script:
  jitsu_compat: {jitsu_compat}
forwarders:
  - id: all
    type: webhook
    endpoint: http://127.0.0.1:{site_port}/hooks/all
    batch: {{max_events: 100, max_wait_secs: 0.05}}
"""

# The first page: Jitsu's snippet as Jitsu documents it, with a data-onload hook, and a
# jitsuQ callback pushed before the script has loaded.
FIRST_PAGE = """<!doctype html><html><head><title>Jitsu first</title>
<script>
  window.jitsuQ = window.jitsuQ || [];
  jitsuQ.push(function (jitsu) {{
    jitsu.track("Queued Before Load", {{ from: "jitsuQ" }});
  }});
  window.jitsuLoaded = function (jitsu) {{
    window.onloadGotTheInstance = typeof jitsu.track === "function";
    jitsu.identify("user-42", {{ email: "ada@shop.test", plan: "pro" }});
  }};
</script>
<script async src="{relay}/p.js" data-write-key="{key}" data-onload="jitsuLoaded"></script>
</head><body>first</body></html>"""

# The second page: the bare snippet.
SECOND_PAGE = """<!doctype html><html><head><title>Jitsu second</title>
<script async src="{relay}/p.js" data-write-key="{key}"></script>
</head><body>second</body></html>"""

# After the script has loaded: the calls of Jitsu's documentation, each awaited.
CALLS_AFTER_LOAD = """async () => {
  const out = {};
  window.jitsuQ = window.jitsuQ || [];
  window.jitsuQ.push(function (jitsu) {
    out.pushedAfterLoadRanAtOnce = true;
    jitsu.track("Pushed After Load", { n: 1 });
  });
  out.trackResult = await window.jitsu.track("Product Viewed", { sku: "SKU-1", price: 19.99 });
  await window.jitsu.page("Pricing", { plan: "pro" });
  await window.jitsu.group("org-7", { name: "Acme" });
  out.user = window.jitsu.user();
  return out;
}"""


@pytest.fixture(scope="module")
def jitsu_site(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("jitsu-relay")
    site = Site(port=free_port(), relay_port=free_port())
    config = tmp / "tagrelay.yaml"
    config.write_text(
        RELAY_CONFIG.format(
            data_dir=tmp / "data",
            port=site.relay_port,
            browser_key=BROWSER_KEY,
            site_port=site.port,
            jitsu_compat=getattr(request, "param", "true"),
        )
    )
    relay = site.relay_origin
    site.pages["/jitsu/first"] = FIRST_PAGE.format(relay=relay, key=BROWSER_KEY)
    site.pages["/jitsu/second"] = SECOND_PAGE.format(relay=relay, key=BROWSER_KEY)
    stop_site = serve_in_thread(site.build_app(), site.port)
    try:
        with relay_process(config, site.relay_port, "", tmp / "relay.log"):
            yield site
    finally:
        stop_site()


def on_page(path: str) -> Any:
    return lambda e: e["context"].get("page", {}).get("path") == path


def settle(site: Site, path: str, expected: int) -> list[dict[str, Any]]:
    """The events of ``path`` once there are ``expected``, after a little longer to catch
    any extra one."""
    site.wait_for(on_page(path), expected)
    time.sleep(0.6)
    return [e for e in site.events() if on_page(path)(e)]


def relay_cookie(context: Any, expected: str, timeout: float = 5.0) -> str | None:
    """The relay's identity cookie, once it is ``expected`` or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        values = [c["value"] for c in context.cookies() if c["name"] == "tr_aid"]
        value = values[0] if len(values) == 1 else None
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def summary(event: dict[str, Any]) -> tuple[Any, ...]:
    return (event["type"], event.get("event") or event.get("name"), event.get("userId"))


def test_jitsus_snippet_and_calls_work_unchanged(jitsu_site: Site, context: Any) -> None:
    site = jitsu_site
    page = context.new_page()
    page.goto(site.origin + "/jitsu/first")
    site.wait_for(lambda e: on_page("/jitsu/first")(e) and e["type"] == "page")
    assert page.evaluate("typeof window.jitsu") == "object"
    assert page.evaluate("window.onloadGotTheInstance") is True
    out = page.evaluate(CALLS_AFTER_LOAD)
    assert out["pushedAfterLoadRanAtOnce"] is True

    events = settle(site, "/jitsu/first", 7)
    # data-onload, then the callbacks queued before load, then the automatic page view
    # (which so carries the user id), then the calls made after load, in order.
    assert [summary(e) for e in events] == [
        ("identify", None, "user-42"),
        ("track", "Queued Before Load", "user-42"),
        ("page", None, "user-42"),
        ("track", "Pushed After Load", "user-42"),
        ("track", "Product Viewed", "user-42"),
        ("page", "Pricing", "user-42"),
        ("group", None, "user-42"),
    ]
    identify, queued, view, pushed, viewed, pricing, group = events
    assert identify["traits"] == {"email": "ada@shop.test", "plan": "pro"}
    assert queued["properties"] == {"from": "jitsuQ"}
    assert view["context"]["page"]["title"] == "Jitsu first"
    assert pushed["properties"] == {"n": 1}
    assert viewed["properties"] == {"sku": "SKU-1", "price": 19.99}
    assert viewed["messageId"] == out["trackResult"]  # the promise resolves to it
    assert pricing["properties"]["plan"] == "pro"
    assert pricing["properties"]["path"] == "/jitsu/first"
    assert group["groupId"] == "org-7" and group["traits"] == {"name": "Acme"}
    for event in events:
        assert event["context"]["library"]["name"] == "tagrelay.js"
        assert event["context"]["source"] == "tagrelay"

    # One anonymous id: the relay's server-set one (its HttpOnly cookie), which user()
    # reports too.
    anonymous_id = view["anonymousId"]
    assert {e["anonymousId"] for e in events} == {anonymous_id}
    [cookie] = [c for c in context.cookies() if c["name"] == "tr_aid"]
    assert cookie["value"] == anonymous_id and cookie["httpOnly"] is True
    assert out["user"] == {
        "anonymousId": anonymous_id,
        "userId": "user-42",
        "traits": {"email": "ada@shop.test", "plan": "pro"},
    }

    # The next page load: the user is still known, as with Jitsu.
    page.goto(site.origin + "/jitsu/second")
    page.wait_for_function("!!window.jitsu")
    [second_view] = settle(site, "/jitsu/second", 1)
    assert summary(second_view) == ("page", None, "user-42")
    assert second_view["anonymousId"] == anonymous_id
    assert page.evaluate("window.jitsu.user()") == out["user"]

    # reset(): a new anonymous visitor, on the page, in the events and in the relay's cookie.
    after = page.evaluate("""async () => {
      await window.jitsu.reset();
      await window.jitsu.track("After Reset");
      return window.jitsu.user();
    }""")
    assert after["userId"] is None and after["traits"] == {}
    assert after["anonymousId"] != anonymous_id
    [after_reset] = settle(site, "/jitsu/second", 2)[1:]
    assert after_reset["event"] == "After Reset"
    assert after_reset.get("userId") is None
    assert after_reset["anonymousId"] == after["anonymousId"]
    assert relay_cookie(context, after["anonymousId"]) == after["anonymousId"]


@pytest.mark.parametrize("jitsu_site", ["false"], indirect=True)
def test_without_the_switch_jitsus_api_is_absent(jitsu_site: Site, context: Any) -> None:
    # The relay's script as it is by default (within its 2 KB budget): no window.jitsu, so
    # of the seven calls above only the automatic page view would land.
    site = jitsu_site
    page = context.new_page()
    page.goto(site.origin + "/jitsu/second")
    [view] = settle(site, "/jitsu/second", 1)
    assert view["type"] == "page"
    assert page.evaluate("typeof window.jitsu") == "undefined"
