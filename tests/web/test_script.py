"""The first-party tracking script: the minifier, the built asset and its size, how it is
served (encodings, ETags, HEAD), the snippet, and what the script does in a browser.

The browser tests run the script as served in node (``vm``) with a small fake of the
browser APIs it uses; fetch, sendBeacon and timers are recorded and driven by each scenario
(see ``HARNESS``). They are skipped only when node is absent.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tagrelay.config.models import Config
from tagrelay.web.script import (
    MinifyError,
    ScriptAsset,
    accepts_gzip,
    add_script_route,
    build_script,
    minify_js,
    render_snippet,
)
from tagrelay.web.templates import templates_dir
from tests.support import make_config

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")
MAX_GZIPPED_BYTES = 2048
MAX_GZIPPED_BYTES_JITSU = 2560  # with script.jitsu_compat


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
def asset(config: Config) -> ScriptAsset:
    return build_script(config, "0.1.0")


def node_check(tmp_path: Path, source: str, name: str = "check.js") -> None:
    assert NODE is not None
    path = tmp_path / name
    path.write_text(source)
    result = subprocess.run(
        [NODE, "--check", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def node_output(tmp_path: Path, source: str, name: str) -> str:
    assert NODE is not None
    path = tmp_path / name
    path.write_text(source)
    result = subprocess.run([NODE, str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---------------------------------------------------------------------------------------
# The minifier


def test_minify_removes_comments_and_whitespace() -> None:
    source = """
    /* header
       comment */
    function add ( a , b ) {   // sum
      return a + b ;  /* inline */
    }
    """
    assert minify_js(source) == "function add(a,b){return a+b;}"


def test_minify_keeps_strings_containing_comment_markers() -> None:
    source = """var a = "// not a comment",  b = '/* nor this */' ;  // but this is"""
    assert minify_js(source) == """var a="// not a comment",b='/* nor this */';"""


def test_minify_keeps_escaped_quotes_in_strings() -> None:
    source = r"""x = "say \"hi\"  // there" + 'it\'s  /* */'"""
    assert minify_js(source) == r"""x="say \"hi\"  // there"+'it\'s  /* */'"""


def test_minify_keeps_regex_literals() -> None:
    source = r"""
    u = host.replace( /\/$/ , "" );
    v = /[/]  "x" \/ '/g.test( s );
    w = a / b / c;
    if (ok) return /  /.source;
    """
    assert minify_js(source) == (
        r"""u=host.replace(/\/$/,"");v=/[/]  "x" \/ '/g.test(s);w=a/b/c;"""
        r"""if(ok)return/  /.source;"""
    )


def test_minify_keeps_template_literals_and_minifies_their_substitutions() -> None:
    source = "t = `a  // ${ b /* c */ + `  ${ d }  ` }  /* e */ ${ {x: 1}.x }`;"
    assert minify_js(source) == "t=`a  // ${b+`  ${d}  `}  /* e */ ${{x:1}.x}`;"


def test_minify_keeps_spaces_that_separate_tokens() -> None:
    source = "a = b + +c; d = e - -f; g = h + ++i; typeof x; 1 .toString(); a / /re/.source"
    assert minify_js(source) == ("a=b+ +c;d=e- -f;g=h+ ++i;typeof x;1 .toString();a/ /re/.source")


def test_minify_keeps_line_breaks_where_semicolon_insertion_may_apply() -> None:
    source = "a = b\nc = d\nreturn\nx\ni\n++j\nk = [\n1,\n2\n]\nfoo()\n.bar"
    assert minify_js(source) == "a=b\nc=d\nreturn\nx\ni\n++j\nk=[1,2]\nfoo().bar"


def test_minify_treats_a_multiline_comment_as_a_line_break() -> None:
    assert minify_js("return /*\n*/ x") == "return\nx"
    assert minify_js("return /* */ x") == "return x"


def test_minify_rejects_what_it_cannot_tokenize() -> None:
    for source in ['x = "open', "x = `open", "/* open", "x = /open\n/"]:
        with pytest.raises(MinifyError):
            minify_js(source)


def test_minify_is_idempotent(asset: ScriptAsset) -> None:
    once = asset.identity.decode()
    assert minify_js(once) == once
    sample = "a = b\n/* c */ d = `e ${ f }`; g = /h/ .test( i ) ;"
    assert minify_js(minify_js(sample)) == minify_js(sample)


@needs_node
def test_minified_program_behaves_like_the_original(tmp_path: Path) -> None:
    program = r"""
    var out = [];
    function f() {
      return
      42
    }
    out.push(String(f()));
    var i = 1
    var j = i
    ++j
    out.push(i, j);
    var s = "a // b /* c */", t = `x ${ s.length /* n */ } ${ `y ${ 1 + +"2" }` }`;
    out.push(s, t);
    var re = /[/"']+\/ /g;
    out.push("a/'/ b".replace(re, "_"), 10 / 2 / 5);
    var o = { a: 1 }
    ;[1, 2].forEach(function (n) { out.push(n - -n) })
    out.push(typeof o, 1 .toString(), o.a)
    console.log(JSON.stringify(out));
    """
    original = node_output(tmp_path, program, "original.js")
    minified = node_output(tmp_path, minify_js(program), "minified.js")
    assert minified == original
    assert json.loads(original)[:3] == ["undefined", 1, 2]


# ---------------------------------------------------------------------------------------
# The built asset


def test_script_template_has_exactly_one_template_expression() -> None:
    # ... and the Jitsu layer's blocks, nothing else.
    source = (templates_dir() / "p.js").read_text()
    assert source.count("{{") == 1
    assert "{{ cfg|tojson }}" in source
    blocks = re.findall(r"\{%.*?%\}", source)
    assert blocks == ["{% if jitsu %}", "{% endif %}"] * 4
    assert source.count("{%") == len(blocks)
    assert "{#" not in source


def test_script_is_rendered_with_the_settings(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        server={"base_path": "/t"},
        script={"global_name": "tr", "cookieless": True, "auto_page": False},
        paths={"events": "/in"},
    )
    text = build_script(config, "9.9").identity.decode()
    assert text.endswith('{"a":false,"c":true,"e":"/t/in","g":"tr","v":"9.9"});')


def test_asset_is_deterministic_with_strong_etags(config: Config) -> None:
    first, second = build_script(config, "0.1.0"), build_script(config, "0.1.0")
    assert first == second
    assert gzip.decompress(first.gzipped) == first.identity
    assert re.fullmatch(r'"[0-9a-f]{32}"', first.etag)
    assert first.gzip_etag == first.etag[:-1] + '-gz"'
    assert build_script(config, "0.1.1").etag != first.etag


def test_gzipped_script_is_at_most_2048_bytes(tmp_path: Path, asset: ScriptAsset) -> None:
    # Long but valid settings (the longest global name, a base path, a dev version) add to
    # the rendered cfg: shown for information.
    long_settings = make_config(
        tmp_path,
        server={"base_path": "/some/long-prefix"},
        script={"global_name": "a" * 41},
        paths={"events": "/collect-events-here"},
    )
    long_size = len(build_script(long_settings, "0.1.0.dev123+g1234abcd").gzipped)
    print(
        f"\ntracking script: {len(asset.identity)} bytes minified, "
        f"{len(asset.gzipped)} bytes gzipped ({long_size} with long settings)"
    )
    assert len(asset.gzipped) <= MAX_GZIPPED_BYTES


@needs_node
def test_served_script_is_valid_javascript(tmp_path: Path, asset: ScriptAsset) -> None:
    node_check(tmp_path, asset.identity.decode())


def test_script_with_the_jitsu_layer_is_at_most_2560_bytes(tmp_path: Path) -> None:
    asset = build_script(make_config(tmp_path, script={"jitsu_compat": True}), "0.1.0")
    print(
        f"\ntracking script with the Jitsu layer: {len(asset.identity)} bytes minified, "
        f"{len(asset.gzipped)} bytes gzipped"
    )
    assert len(asset.gzipped) <= MAX_GZIPPED_BYTES_JITSU
    if NODE is not None:
        node_check(tmp_path, asset.identity.decode())


def test_the_jitsu_layer_is_only_in_the_script_when_switched_on(
    tmp_path: Path, asset: ScriptAsset
) -> None:
    assert b"jitsu" not in asset.identity
    with_layer = build_script(make_config(tmp_path, script={"jitsu_compat": True}), "0.1.0")
    assert b"jitsu" in with_layer.identity
    assert with_layer.etag != asset.etag


# ---------------------------------------------------------------------------------------
# The snippet


def stub_of(snippet: str) -> str:
    match = re.search(r"<script>(.*?)</script>", snippet, re.S)
    assert match is not None
    return match.group(1)


def test_snippet_loads_the_script_with_the_write_key(config: Config) -> None:
    snippet = render_snippet(config, "https://data.shop.test/p.js?v=1&x=2", 'wk"<1>')
    assert '<script async src="https://data.shop.test/p.js?v=1&amp;x=2"' in snippet
    assert 'data-write-key="wk&#34;&lt;1&gt;"' in snippet
    assert stub_of(snippet).rstrip().endswith('(window,"tagrelay");')
    assert len(stub_of(snippet).strip()) < 400


@needs_node
def test_snippet_stub_is_valid_javascript(tmp_path: Path, config: Config) -> None:
    node_check(tmp_path, stub_of(render_snippet(config, "/p.js", "wk")))


# ---------------------------------------------------------------------------------------
# Serving


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, False),
        ("", False),
        ("gzip", True),
        ("gzip, deflate, br", True),
        ("GZIP;q=0.5", True),
        ("x-gzip", True),
        ("gzip;q=0", False),
        ("gzip;q=0.000", False),
        ("identity", False),
        ("br", False),
        ("*", True),
        ("*;q=0", False),
        ("gzip;q=0, *", False),
        ("br, *;q=0.1", True),
        ("gzip;q=2", False),
        ("gzip;q=abc", False),
    ],
)
def test_accepts_gzip(header: str | None, expected: bool) -> None:
    assert accepts_gzip(header) is expected


@pytest.fixture
async def script_client(aiohttp_client: Callable[..., Any], config: Config) -> Any:
    app = web.Application()
    add_script_route(app.router, config, "", version="0.1.0")
    return await aiohttp_client(app, auto_decompress=False)


def assert_common_headers(resp: Any, etag: str) -> None:
    assert resp.headers["Cache-Control"] == "public, max-age=300"
    assert resp.headers["ETag"] == etag
    assert resp.headers["Vary"] == "Accept-Encoding"
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_script_served_gzipped_when_accepted(script_client: Any, asset: ScriptAsset) -> None:
    resp = await script_client.get("/p.js", headers={"Accept-Encoding": "gzip, deflate, br"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert resp.headers["Content-Encoding"] == "gzip"
    assert_common_headers(resp, asset.gzip_etag)
    body = await resp.read()
    assert body == asset.gzipped
    assert gzip.decompress(body) == asset.identity


async def test_script_served_as_is_otherwise(script_client: Any, asset: ScriptAsset) -> None:
    for accept in ("identity", "gzip;q=0", "br"):
        resp = await script_client.get("/p.js", headers={"Accept-Encoding": accept})
        assert resp.status == 200
        assert "Content-Encoding" not in resp.headers
        assert resp.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert_common_headers(resp, asset.etag)
        assert await resp.read() == asset.identity


async def test_script_revalidation_answers_304(script_client: Any, asset: ScriptAsset) -> None:
    gz = {"Accept-Encoding": "gzip"}
    for if_none_match in (
        asset.gzip_etag,
        asset.etag,  # the other representation is current too
        "W/" + asset.gzip_etag,
        f'"stale", {asset.gzip_etag}',
        "*",
    ):
        resp = await script_client.get("/p.js", headers={**gz, "If-None-Match": if_none_match})
        assert resp.status == 304, if_none_match
        assert_common_headers(resp, asset.gzip_etag)
        assert await resp.read() == b""
    resp = await script_client.get("/p.js", headers={**gz, "If-None-Match": '"stale"'})
    assert resp.status == 200
    assert await resp.read() == asset.gzipped


async def test_script_head_has_the_headers_without_a_body(
    script_client: Any, asset: ScriptAsset
) -> None:
    resp = await script_client.head("/p.js", headers={"Accept-Encoding": "gzip"})
    assert resp.status == 200
    assert resp.headers["Content-Encoding"] == "gzip"
    assert resp.headers["Content-Length"] == str(len(asset.gzipped))
    assert_common_headers(resp, asset.gzip_etag)
    assert await resp.read() == b""


async def test_script_route_under_a_prefix(
    aiohttp_client: Callable[..., Any], tmp_path: Path
) -> None:
    config = make_config(tmp_path, paths={"script": "/s.js"}, script={"cache_max_age_secs": 60})
    app = web.Application()
    add_script_route(app.router, config, "/t")
    client = await aiohttp_client(app)
    resp = await client.get("/t/s.js")
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "public, max-age=60"
    assert (await client.get("/s.js")).status == 404


# ---------------------------------------------------------------------------------------
# The script in a (fake) browser

HARNESS = r"""
"use strict";
const vm = require("vm");
const fs = require("fs");
const [scriptPath, stubPath, scenarioPath] = process.argv.slice(2);
const SCRIPT = fs.readFileSync(scriptPath, "utf8");
const STUB = fs.readFileSync(stubPath, "utf8");

const settle = async () => {
  for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
};

// open(opts) -> a fake browser tab. opts: url, title, referrer, gpc, localStorage,
// sessionStorage (plain objects, so that a later tab can share them), global, cookie
// (document.cookie), insecure (no secure context: no crypto.randomUUID).
function open(opts = {}) {
  const b = { fetches: [], beacons: [], errors: [], logs: [], responses: [], timers: [], clock: 0 };
  b.pending = []; // rejecters of fetches answered "hang"
  let timerId = 0;
  const listeners = {};
  const on = (name, f) => (listeners[name] = listeners[name] || []).push(f);
  const loc = {};
  const go = (u) => {
    const x = new URL(u, loc.href || "https://www.shop.test/");
    Object.assign(loc, { href: x.href, pathname: x.pathname, search: x.search, origin: x.origin });
  };
  go(opts.url || "https://www.shop.test/");
  const doc = {
    title: opts.title || "Home",
    referrer: opts.referrer === undefined ? "https://www.google.com/" : opts.referrer,
    visibilityState: "visible",
    cookie: opts.cookie || "",
    currentScript: null,
    addEventListener: (t, f) => on("document:" + t, f),
  };
  const win = {
    document: doc,
    location: loc,
    history: { pushState: (s, t, u) => u && go(u), replaceState: (s, t, u) => u && go(u) },
    navigator: {
      language: "en-GB",
      globalPrivacyControl: opts.gpc,
      sendBeacon: (u, body) => {
        b.beacons.push({ url: String(u), raw: body, body: JSON.parse(body) });
        return true;
      },
    },
    screen: { width: 1440, height: 900 },
    devicePixelRatio: 2,
    localStorage: opts.localStorage || {},
    sessionStorage: opts.sessionStorage || {},
    // A page on plain http is no secure context: crypto.randomUUID is missing there.
    crypto: opts.insecure
      ? { getRandomValues: (a) => require("crypto").webcrypto.getRandomValues(a) }
      : require("crypto").webcrypto,
    console: { log: (...x) => b.logs.push(x) },
    URL,
    URLSearchParams,
    setTimeout: (f, ms) => {
      b.timers.push({ id: ++timerId, at: b.clock + (ms || 0), f });
      return timerId;
    },
    clearTimeout: (id) => {
      b.timers = b.timers.filter((t) => t.id !== id);
    },
    // responses: scripted with b.respond({status, body} | "network" | "hang"); default 200
    fetch: (u, init) => {
      const raw = init.body;
      const sent = { ...init, body: undefined };
      b.fetches.push({ url: String(u), init: sent, raw, body: JSON.parse(raw) });
      const r = b.responses.shift() || { status: 200, body: { ok: true, accepted: 1 } };
      if (r === "network") return Promise.reject(new TypeError("Failed to fetch"));
      if (r === "hang") return new Promise((_, reject) => b.pending.push(reject));
      return Promise.resolve({
        status: r.status,
        ok: r.status >= 200 && r.status < 300,
        json: () =>
          r.body === undefined
            ? Promise.reject(new SyntaxError("no JSON"))
            : Promise.resolve(r.body),
      });
    },
    addEventListener: (t, f) => on("window:" + t, f),
  };
  win.window = win;
  vm.createContext(win);
  b.win = win;
  b.go = go;
  b.stub = () => vm.runInContext(STUB, win);
  b.load = (dataset = { writeKey: "wk" }, src = "https://data.shop.test/p.js") => {
    doc.currentScript = { src, dataset };
    try {
      vm.runInContext(SCRIPT, win);
    } finally {
      doc.currentScript = null;
    }
  };
  b.api = () => win[opts.global || "tagrelay"];
  b.respond = (...rs) => b.responses.push(...rs);
  b.fire = (name) => (listeners[name] || []).forEach((f) => f({}));
  b.hide = () => {
    doc.visibilityState = "hidden";
    b.fire("document:visibilitychange");
  };
  // run the timers due within ms (fake clock), letting promises settle in between
  b.advance = async (ms = 0) => {
    const end = b.clock + ms;
    for (;;) {
      await settle();
      b.timers.sort((x, y) => x.at - y.at || x.id - y.id);
      const t = b.timers[0];
      if (!t || t.at > end) break;
      b.timers.shift();
      b.clock = t.at;
      try {
        t.f();
      } catch (e) {
        b.errors.push(String(e));
      }
    }
    b.clock = end;
    await settle();
  };
  b.events = () => b.fetches.flatMap((f) => f.body.batch);
  return b;
}

(async () => {
  const AsyncFunction = (async () => {}).constructor;
  const scenario = new AsyncFunction("open", fs.readFileSync(scenarioPath, "utf8"));
  const result = await scenario(open);
  process.stdout.write(JSON.stringify(result === undefined ? null : result));
})().catch((e) => {
  process.stderr.write(String(e && e.stack ? e.stack : e));
  process.exit(1);
});
"""

Browser = Callable[..., Any]


@pytest.fixture(params=[False, True], ids=["script", "with-jitsu-layer"])
def browser(tmp_path: Path, config: Config, request: pytest.FixtureRequest) -> Browser:
    """``browser(scenario_js, config=None)``: run an async JS scenario (it gets ``open``)
    against the script as built for ``config``; returns what the scenario returns. Every
    scenario runs twice: on the script as configured, and with the Jitsu layer, which must
    change nothing else."""

    def run(scenario: str, config_: Config | None = None) -> Any:
        if NODE is None:
            pytest.skip("node is not installed")
        cfg = config_ or config
        if request.param:
            script = cfg.script.model_copy(update={"jitsu_compat": True})
            cfg = cfg.model_copy(update={"script": script})
        (tmp_path / "harness.js").write_text(HARNESS)
        (tmp_path / "p.js").write_bytes(build_script(cfg, "0.1.0").identity)
        (tmp_path / "stub.js").write_text(stub_of(render_snippet(cfg, "/p.js", "wk")))
        (tmp_path / "scenario.js").write_text(scenario)
        result = subprocess.run(
            [NODE, *(str(tmp_path / n) for n in ("harness.js", "p.js", "stub.js", "scenario.js"))],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    return run


def test_queue_is_replayed_init_first_then_page_view_then_ready(browser: Browser) -> None:
    out = browser("""
        const b = open({ url: "https://www.shop.test/landing" });
        b.stub();
        const t = b.api();
        const id = t.track("Before", { a: 1 });
        t.identify("u-1", { plan: "pro" });
        t.ready(() => t.track("Ready", {}, { messageId: "m-ready" }));
        t.init({ writeKey: "wk-init" });
        b.load();
        await b.advance(0);
        return { id, fetches: b.fetches, errors: b.errors };
    """)
    assert out["errors"] == []
    [request] = out["fetches"]
    assert request["url"] == "https://data.shop.test/d"
    assert request["init"] == {"method": "POST", "keepalive": True, "credentials": "include"}
    body = request["body"]
    assert body["writeKey"] == "wk-init"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["sentAt"])
    events = body["batch"]
    assert [(e["type"], e.get("event")) for e in events] == [
        ("track", "Before"),
        ("identify", None),
        ("page", None),
        ("track", "Ready"),
    ]
    # the stub's messageId is the one sent, so a page can pass it to a vendor pixel
    assert events[0]["messageId"] == out["id"]
    assert events[3]["messageId"] == "m-ready"
    assert events[1]["userId"] == "u-1" and events[1]["traits"] == {"plan": "pro"}
    assert "userId" not in events[0]
    assert all(e["userId"] == "u-1" for e in events[2:])
    assert len({e["anonymousId"] for e in events}) == 1


UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


@pytest.mark.parametrize("insecure", [False, True], ids=["https", "plain-http"])
def test_the_stubs_track_returns_a_uuid4_that_becomes_the_messageid(
    browser: Browser, insecure: bool
) -> None:
    out = browser(
        f"const insecure = {str(insecure).lower()};"
        + """
        const b = open({ insecure });
        b.stub();
        const t = b.api();
        const ids = Array.from({ length: 200 }, (_, i) => t.track("Before " + i));
        const own = t.track("Own", {}, { messageId: "m-own" });
        b.load();
        await b.advance(0);
        return { ids, own, events: b.events().filter(e => e.type == "track") };
        """
    )
    ids = out["ids"]
    assert all(re.fullmatch(UUID4, i) for i in ids), ids[:3]
    assert len(set(ids)) == len(ids)
    # every digit that is not the version or the variant is random
    assert all(len({i[n] for i in ids}) > 8 for n in range(36) if n not in (8, 13, 14, 18, 19, 23))
    assert out["own"] == "m-own"
    assert [e["messageId"] for e in out["events"]] == [*ids, "m-own"]


def test_events_carry_the_segment_fields_and_context(browser: Browser) -> None:
    out = browser("""
        const b = open({
          url: "https://www.shop.test/p/1?utm_source=news&utm_medium=email&utm_campaign=spring"
            + "&utm_term=t&utm_content=c&gclid=G1&fbclid=F1&ScCid=S1&other=x",
          title: "Product", referrer: "https://www.google.com/",
        });
        b.load();
        const id = b.api().track("Viewed", { sku: "A" });
        await b.advance(0);
        return { id, events: b.events(), ls: b.win.localStorage, ret: b.api().anonymousId() };
    """)
    page, track = out["events"]
    assert track["messageId"] == out["id"]
    assert page["messageId"] != track["messageId"]
    url = (
        "https://www.shop.test/p/1?utm_source=news&utm_medium=email&utm_campaign=spring"
        "&utm_term=t&utm_content=c&gclid=G1&fbclid=F1&ScCid=S1&other=x"
    )
    page_fields = {
        "url": url,
        "path": "/p/1",
        "title": "Product",
        "referrer": "https://www.google.com/",
        "search": url[url.index("?") :],
    }
    assert page["type"] == "page" and "name" not in page
    assert page["properties"] == page_fields
    assert track["event"] == "Viewed" and track["properties"] == {"sku": "A"}
    context = track["context"]
    assert context == {
        "page": page_fields,
        "locale": "en-GB",
        "timezone": context["timezone"],
        "screen": {"width": 1440, "height": 900, "density": 2},
        "library": {"name": "tagrelay.js", "version": "0.1.0"},
        "campaign": {
            "source": "news",
            "medium": "email",
            "name": "spring",
            "term": "t",
            "content": "c",
        },
        "clickIds": {"gclid": "G1", "fbclid": "F1", "ScCid": "S1"},
    }
    assert context["timezone"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", track["timestamp"])
    assert track["anonymousId"] == out["ret"]
    assert json.loads(out["ls"]["tagrelay_aid"]) == track["anonymousId"]


def test_page_name_and_properties(browser: Browser) -> None:
    out = browser("""
        const b = open();
        b.load({ writeKey: "wk", autoPage: "false" });
        b.api().page("Pricing", { plan: "pro", title: "Custom" });
        b.api().group("g-1", { name: "Acme" });
        b.api().alias("u-2");
        await b.advance(0);
        return b.events();
    """)
    page, group, alias = out
    assert page["name"] == "Pricing"
    assert page["properties"]["plan"] == "pro"
    assert page["properties"]["title"] == "Custom"  # the caller's properties win
    assert page["properties"]["path"] == "/"
    assert group["groupId"] == "g-1" and group["traits"] == {"name": "Acme"}
    assert alias["userId"] == "u-2" and alias["previousId"] == alias["anonymousId"]


def test_spa_navigation_sends_one_page_view_per_url_change(browser: Browser) -> None:
    out = browser("""
        const b = open({ url: "https://www.shop.test/" });
        b.load();
        const h = b.win.history;
        h.pushState({}, "", "/a");
        b.win.document.title = "A";
        await b.advance(0);
        h.replaceState({ x: 1 }, "", "/a");  // same URL: nothing
        h.replaceState({}, "");
        await b.advance(0);
        h.pushState({}, "", "/b");
        h.replaceState({}, "", "/b?tab=2");  // one task: one page view, the final URL
        await b.advance(0);
        b.go("/a");
        b.fire("window:popstate");
        await b.advance(0);
        return b.events().filter(e => e.type == "page").map(e => {
          const p = e.context.page;
          return [p.path + p.search, p.referrer, e.properties.title];
        });
    """)
    assert out == [
        ["/", "https://www.google.com/", "Home"],
        ["/a", "https://www.shop.test/", "A"],
        ["/b?tab=2", "https://www.shop.test/a", "A"],
        ["/a", "https://www.shop.test/b?tab=2", "A"],
    ]


def test_auto_page_can_be_turned_off(browser: Browser, tmp_path: Path) -> None:
    scenario = """
        const b = open();
        b.load(%s);
        b.win.history.pushState({}, "", "/a");
        await b.advance(0);
        return b.events().length;
    """
    assert browser(scenario % '{ writeKey: "wk", autoPage: "false" }') == 0
    assert browser(scenario % '{ writeKey: "wk" }') == 2
    no_auto = make_config(tmp_path, script={"auto_page": False})
    assert browser(scenario % '{ writeKey: "wk" }', no_auto) == 0
    assert browser(scenario % '{ writeKey: "wk", autoPage: "true" }', no_auto) == 2


def test_landing_parameters_last_the_session(browser: Browser) -> None:
    out = browser("""
        const session = {}, local = {};
        const tab = (url) => open({ url, localStorage: local, sessionStorage: session });
        const first = tab("https://www.shop.test/?utm_source=ad&gbraid=GB");
        first.load();
        await first.advance(0);
        const second = tab("https://www.shop.test/next");
        second.load();
        await second.advance(0);
        const third = tab("https://www.shop.test/?msclkid=M");
        third.load();
        await third.advance(0);
        const other = open({ url: "https://www.shop.test/next", localStorage: local });
        other.load();
        await other.advance(0);
        return [first, second, third, other].map(b => b.events()[0].context)
          .map(c => [c.campaign || null, c.clickIds || null]);
    """)
    assert out == [
        [{"source": "ad"}, {"gbraid": "GB"}],
        [{"source": "ad"}, {"gbraid": "GB"}],  # same session: the landing page's
        [None, {"msclkid": "M"}],  # a new ad click in the session replaces them
        [None, None],  # another session (tab)
    ]


def test_identity_survives_a_reload_and_reset_starts_over(browser: Browser) -> None:
    out = browser("""
        const local = {};
        const one = open({ localStorage: local });
        one.load();
        one.api().identify("u-1", { plan: "pro" });
        one.api().identify({ seats: 3 });
        await one.advance(0);
        const two = open({ localStorage: local });
        two.load();
        two.api().track("Again");
        await two.advance(0);
        two.api().reset();
        two.api().track("After reset");
        await two.advance(0);
        two.api().track("Later");
        await two.advance(0);
        const bodies = two.fetches.map(f => f.body);
        return { one: one.events(), two: two.events(), bodies, local };
    """)
    first_aid = out["one"][0]["anonymousId"]
    assert out["one"][2]["traits"] == {"plan": "pro", "seats": 3}
    again = out["two"][1]
    assert again["anonymousId"] == first_aid and again["userId"] == "u-1"
    after = out["two"][2]
    assert after["anonymousId"] != first_aid
    assert after.get("userId") is None
    # the first batch after reset() asks the relay to move its cookie to the new id
    assert "reset" not in out["bodies"][0]
    assert out["bodies"][1]["reset"] is True
    assert "reset" not in out["bodies"][2]
    assert json.loads(out["local"]["tagrelay_aid"]) == after["anonymousId"]
    assert json.loads(out["local"]["tagrelay_traits"]) == {}


def test_another_user_starts_without_the_previous_traits(browser: Browser) -> None:
    out = browser("""
        const b = open();
        b.load({ writeKey: "wk", autoPage: "false" });
        b.api().identify("u-1", { plan: "pro" });
        b.api().identify("u-2", { seats: 2 });
        b.api().identify();
        await b.advance(0);
        return b.events().map(e => [e.userId, e.traits]);
    """)
    assert out == [["u-1", {"plan": "pro"}], ["u-2", {"seats": 2}], ["u-2", {"seats": 2}]]


def test_identify_traits_go_with_later_track_and_page_events_as_context_traits(
    browser: Browser,
) -> None:
    out = browser("""
        const local = {};
        const one = open({ localStorage: local });
        one.load({ writeKey: "wk", autoPage: "false" });
        one.api().track("Anonymous");
        const traits = { email: "ada@shop.test", address: { city: "London" } };
        one.api().identify("u-1", traits);
        traits.email = "changed@shop.test";  // after the call: not taken
        one.api().identify({ phone: "+44 20 7946 0000" });
        one.api().track("Known");
        one.api().page("Pricing");
        one.api().group("g-1", { name: "Acme" });
        one.api().alias("u-9", "u-1");
        await one.advance(0);
        // A later page load: the traits were kept with the other ids.
        const two = open({ localStorage: local });
        two.load({ writeKey: "wk", autoPage: "false" });
        two.api().track("Next page");
        two.api().identify("u-2", { plan: "pro" });  // another user: the traits start over
        two.api().track("Other user");
        two.api().reset();
        two.api().page();
        await two.advance(0);
        const row = e => [e.type, e.event || e.name || null, e.context.traits || null];
        return { one: one.events().map(row), two: two.events().map(row), local };
    """)
    known = {
        "email": "ada@shop.test",
        "address": {"city": "London"},
        "phone": "+44 20 7946 0000",
    }
    assert out["one"] == [
        ["track", "Anonymous", None],
        ["identify", None, None],  # its traits are the event's own
        ["identify", None, None],
        ["track", "Known", known],
        ["page", "Pricing", known],
        ["group", None, None],
        ["alias", None, None],
    ]
    assert out["two"] == [
        ["track", "Next page", known],
        ["identify", None, None],
        ["track", "Other user", {"plan": "pro"}],
        ["page", None, None],  # after reset()
    ]
    assert json.loads(out["local"]["tagrelay_traits"]) == {}


def test_cookieless_traits_go_with_events_of_the_page_but_are_not_stored(
    browser: Browser,
) -> None:
    out = browser("""
        const local = {}, tracks = [];
        for (const n of [1, 2]) {
          const b = open({ localStorage: local });
          b.load({ writeKey: "wk", autoPage: "false", cookieless: "true" });
          if (n == 1) b.api().identify("u-1", { email: "ada@shop.test" });
          b.api().track("T" + n);
          await b.advance(0);
          tracks.push(...b.events().filter(e => e.type == "track"));
        }
        return { tracks, local };
    """)
    first, second = out["tracks"]
    assert first["context"]["traits"] == {"email": "ada@shop.test"}
    assert "traits" not in second["context"]  # a new page load knows nothing
    assert out["local"] == {}


def test_the_relay_anonymous_id_is_adopted(browser: Browser) -> None:
    out = browser("""
        const b = open();
        b.respond({ status: 200, body: { ok: true, accepted: 1, anonymousId: "relay-id" } });
        b.load();
        await b.advance(0);
        b.api().track("Next");
        await b.advance(0);
        return { events: b.events(), local: b.win.localStorage };
    """)
    page, nxt = out["events"]
    assert page["anonymousId"] != "relay-id"
    assert nxt["anonymousId"] == "relay-id"
    assert json.loads(out["local"]["tagrelay_aid"]) == "relay-id"


def test_consent_is_normalised_remembered_and_carried(browser: Browser) -> None:
    out = browser("""
        const local = {};
        const b = open({ localStorage: local });
        b.load({ writeKey: "wk", autoPage: "false" });
        b.api().track("Before");
        b.api().consent({ analytics: true, ads: "denied", other: "granted" });
        b.api().track("After");
        b.api().consent({
          ad_user_data: false, ad_personalization: "granted", analytics: undefined,
        });
        b.api().track("Later");
        await b.advance(0);
        const next = open({ localStorage: local });
        next.load({ writeKey: "wk", autoPage: "false" });
        next.api().track("Next page");
        await next.advance(0);
        return [...b.events(), ...next.events()].map(e => e.context.consent || null);
    """)
    assert out == [
        None,
        {"analytics": "granted", "ads": "denied"},
        {
            "analytics": "granted",
            "ads": "denied",
            "ad_user_data": "denied",
            "ad_personalization": "granted",
        },
        {
            "analytics": "granted",
            "ads": "denied",
            "ad_user_data": "denied",
            "ad_personalization": "granted",
        },
    ]


def test_cookieless_stores_nothing_and_says_so(browser: Browser, tmp_path: Path) -> None:
    scenario = """
        const local = {}, session = {};
        const ids = [];
        let ctx;
        for (const url of ["https://www.shop.test/?utm_source=x", "https://www.shop.test/"]) {
          const b = open({ url, localStorage: local, sessionStorage: session });
          b.load(%s);
          b.api().identify("u-1");
          b.api().consent({ analytics: "denied" });
          b.api().track("T");
          await b.advance(0);
          ids.push(b.events()[0].anonymousId);
          ctx = ctx || b.events()[2].context;
        }
        return { ids, local, session, ctx };
    """
    out = browser(scenario % '{ writeKey: "wk", cookieless: "true" }')
    assert out["local"] == {} and out["session"] == {}
    assert out["ids"][0] != out["ids"][1]
    assert out["ctx"]["cookieless"] is True
    assert out["ctx"]["consent"] == {"analytics": "denied"}
    assert out["ctx"]["campaign"] == {"source": "x"}

    cookieless_default = make_config(tmp_path, script={"cookieless": True})
    assert browser(scenario % '{ writeKey: "wk" }', cookieless_default)["local"] == {}
    out = browser(scenario % '{ writeKey: "wk", cookieless: "false" }', cookieless_default)
    assert out["ids"][0] == out["ids"][1]
    assert "cookieless" not in out["ctx"]


def test_init_can_leave_cookieless_mode_after_consent(browser: Browser) -> None:
    out = browser("""
        const b = open();
        b.load({ writeKey: "wk", cookieless: "true" });
        await b.advance(0);
        b.api().init({ cookieless: false });
        b.api().track("Consented");
        await b.advance(0);
        return { events: b.events(), local: b.win.localStorage };
    """)
    page, consented = out["events"]
    assert consented["anonymousId"] == page["anonymousId"]
    assert "cookieless" not in consented["context"]
    assert json.loads(out["local"]["tagrelay_aid"]) == page["anonymousId"]


def test_gpc_is_flagged(browser: Browser) -> None:
    out = browser("""
        const on = open({ gpc: true }), off = open({ gpc: false });
        on.load(); off.load();
        await on.advance(0); await off.advance(0);
        return [on.events()[0].context.gpc, off.events()[0].context.gpc === undefined];
    """)
    assert out == [True, True]


def test_host_attribute_and_init_options(browser: Browser) -> None:
    out = browser("""
        const a = open();
        a.load({ writeKey: "wk", host: "https://relay.shop.test" });
        await a.advance(0);
        const b = open();
        b.stub();
        b.api().init({ host: "https://other.shop.test", writeKey: "wk-2", autoPage: false });
        b.api().track("T");
        b.load({ writeKey: "wk", host: "https://relay.shop.test" });
        await b.advance(0);
        const c = open();
        c.load({ writeKey: "wk" }, "");  // no src (inline): same origin as the page
        await c.advance(0);
        return [a, b, c].map(x => {
          return [x.fetches[0].url, x.fetches[0].body.writeKey, x.events().length];
        });
    """)
    assert out == [
        ["https://relay.shop.test/d", "wk", 1],
        ["https://other.shop.test/d", "wk-2", 1],
        ["/d", "wk", 1],
    ]


def test_events_path_includes_the_base_path(browser: Browser, tmp_path: Path) -> None:
    config = make_config(tmp_path, server={"base_path": "/t"}, script={"global_name": "tr"})
    out = browser(
        """
        const b = open({ global: "tr" });
        b.stub();
        b.api().track("Queued");
        b.load({ writeKey: "wk" }, "https://www.shop.test/t/p.js");
        await b.advance(0);
        return [b.fetches[0].url, b.events().map(e => e.type), Object.keys(b.win.localStorage)];
        """,
        config,
    )
    assert out == [
        "https://www.shop.test/t/d",
        ["track", "page"],
        ["tr_aid", "tr_traits", "tr_consent"],
    ]


def test_failed_batches_are_retried_once_with_the_same_body(browser: Browser) -> None:
    out = browser("""
        const results = {};
        for (const [name, answers] of Object.entries({
          "503": [{ status: 503, body: {} }, { status: 200, body: { ok: true } }],
          "network": ["network", "network"],
          "429": [{ status: 429, body: {} }, { status: 500, body: {} }],
          "400": [{ status: 400, body: { error: "invalid_body" } }],
        })) {
          const b = open();
          b.respond(...answers);
          b.load();
          await b.advance(0);
          const before = b.fetches.length;
          await b.advance(999);
          const early = b.fetches.length;
          await b.advance(10000);
          results[name] = { before, early, raws: b.fetches.map(f => f.raw) };
        }
        return results;
    """)
    for name in ("503", "network", "429"):
        result = out[name]
        assert (result["before"], result["early"]) == (1, 1), name
        assert len(result["raws"]) == 2, name
        assert result["raws"][0] == result["raws"][1], name  # identical body: same messageIds
    assert len(out["400"]["raws"]) == 1


def test_unload_hands_queued_and_waiting_batches_to_sendbeacon_once(browser: Browser) -> None:
    out = browser("""
        const b = open();
        b.respond({ status: 503, body: {} });
        b.load();
        await b.advance(0);               // the page view fails: waits for its retry
        b.api().track("In flight");
        await b.advance(0);               // handed to a keepalive fetch (200)
        b.api().track("Queued");          // not sent yet when the page goes
        b.fire("window:pagehide");
        b.api().track("During unload");   // a page's own pagehide handler
        await b.advance(5000);            // the retry timer finds nothing to do
        b.fire("window:pageshow");        // back from the bfcache
        b.api().track("Restored");
        await b.advance(0);
        return {
          fetched: b.fetches.map(f => f.body.batch.map(e => e.event || e.type)),
          beaconed: b.beacons.map(x => x.body.batch.map(e => e.event || e.type)),
          urls: b.beacons.map(x => x.url),
          retryBody: b.beacons[1].raw === b.fetches[0].raw,
        };
    """)
    assert out["fetched"] == [["page"], ["In flight"], ["Restored"]]
    assert out["beaconed"] == [["Queued"], ["page"], ["During unload"]]
    assert set(out["urls"]) == {"https://data.shop.test/d"}
    assert out["retryBody"] is True


def test_keepalive_fetch_rejected_as_the_page_goes_is_not_sent_again(browser: Browser) -> None:
    # Chromium rejects the promise of a keepalive fetch in flight as the document goes away
    # (before pagehide, in the same task) and still delivers the request.
    out = browser("""
        const b = open();
        b.respond({ status: 200, body: { ok: true } }, "hang");
        b.load();
        await b.advance(0);
        b.api().track("Probe");
        await b.advance(0);                           // handed to a keepalive fetch
        b.pending[0](new TypeError("Failed to fetch"));
        await new Promise(r => setImmediate(r));      // the rejection handlers run
        b.fire("window:pagehide");
        b.timers = [];                                // the document is gone
        return [b.fetches.length, b.beacons.length];
    """)
    assert out == [2, 0]


def test_hidden_tab_sends_by_beacon(browser: Browser) -> None:
    out = browser("""
        const b = open();
        b.load();
        b.hide();
        b.api().track("Hidden");
        await b.advance(0);
        return [b.fetches.length, b.beacons.map(x => x.body.batch.map(e => e.event || e.type))];
    """)
    assert out == [0, [["page"], ["Hidden"]]]


def test_bad_queued_call_does_not_stop_the_replay(browser: Browser) -> None:
    out = browser("""
        const b = open();
        b.stub();
        const cyclic = {};
        cyclic.self = cyclic;
        b.api().track("Cyclic", cyclic);
        b.api().ready(() => { throw new Error("page bug"); });
        b.api().ready(() => b.api().track("Still ready"));
        b.load();
        await b.advance(0);
        return { events: b.events().map(e => e.event || e.type), errors: b.errors.length };
    """)
    assert out == {"events": ["page", "Still ready"], "errors": 2}


def test_loading_twice_is_harmless(browser: Browser) -> None:
    out = browser("""
        const b = open();
        b.stub();
        b.load();
        const api = b.api();
        b.load();
        b.win.history.pushState({}, "", "/a");
        await b.advance(0);
        return [b.api() === api, b.events().map(e => e.context.page.path)];
    """)
    assert out == [True, ["/", "/a"]]


# ---------------------------------------------------------------------------------------
# The Jitsu layer (script.jitsu_compat): Jitsu's browser API on the same script


@pytest.fixture
def jitsu_config(tmp_path: Path) -> Config:
    return make_config(tmp_path, script={"jitsu_compat": True})


def test_jitsu_api_onload_and_queue_run_before_the_page_view(
    browser: Browser, jitsu_config: Config
) -> None:
    out = browser(
        """
        const b = open({ url: "https://www.shop.test/pricing" });
        const win = b.win;
        const seen = [];
        win.jitsuQ = win.jitsuQ || [];
        win.jitsuQ.push(function (jitsu) { seen.push("queue"); jitsu.track("Queued", { a: 1 }); });
        win.jitsuQ.push(["track", "As Array", { b: 2 }]);
        win.jitsuQ.push(function () { throw new Error("page bug"); });
        win.hello = function (jitsu) {
          seen.push("onload");
          jitsu.identify("u-1", { plan: "pro" });
        };
        b.load({ writeKey: "wk", onload: "hello" });
        seen.push(win.jitsu === undefined ? "no api" : "api");
        win.jitsuQ.push(jitsu => { seen.push("later"); jitsu.group("g-1", { name: "Acme" }); });
        const id = await win.jitsu.track("Later", { c: 3 });
        const promises = ["page", "identify", "group", "reset"].map(
          m => typeof win.jitsu[m]().then == "function"
        );
        await b.advance(0);
        return { seen, id, promises, errors: b.errors.length,
                 events: b.events().map(e => [e.type, e.event || null, e.userId || null]),
                 later: b.events().find(e => e.event == "Later") };
        """,
        jitsu_config,
    )
    assert out["seen"] == ["onload", "queue", "api", "later"]
    assert out["errors"] == 1  # the failing callback is reported, the others run
    assert out["events"][:6] == [
        ["identify", None, "u-1"],
        ["track", "Queued", "u-1"],
        ["track", "As Array", "u-1"],
        ["page", None, "u-1"],
        ["group", None, "u-1"],
        ["track", "Later", "u-1"],
    ]
    assert out["later"]["messageId"] == out["id"]
    assert all(out["promises"])


def test_jitsu_page_user_and_reset(browser: Browser, jitsu_config: Config) -> None:
    out = browser(
        """
        const local = {};
        const b = open({ localStorage: local });
        b.load({ writeKey: "wk" });
        const j = b.win.jitsu;
        await j.identify("u-1", { plan: "pro" });
        const user = j.user();
        j.user().traits.plan = "changed by the page";   // a copy
        await j.page("Pricing", { tier: 2 });
        await j.page({ name: "Named", x: 1 });
        b.win.history.pushState({}, "", "/after");    // the page tracks its own views now
        await b.advance(0);
        await j.reset();
        const reset = j.user();
        await j.track("After");
        await b.advance(0);
        const next = open({ localStorage: local });
        next.load({ writeKey: "wk" });
        return { user, reset, again: j.user(), next: next.win.jitsu.user(),
                 pages: b.events().filter(e => e.type == "page")
                   .map(e => [e.name || null, e.properties.tier || e.properties.x || null]),
                 after: b.events().at(-1) };
        """,
        jitsu_config,
    )
    assert out["user"]["userId"] == "u-1" and out["user"]["traits"] == {"plan": "pro"}
    assert out["pages"] == [[None, None], ["Pricing", 2], ["Named", 1]]
    assert out["reset"]["userId"] is None and out["reset"]["traits"] == {}
    assert out["reset"]["anonymousId"] != out["user"]["anonymousId"]
    assert out["after"]["anonymousId"] == out["reset"]["anonymousId"]
    assert out["next"] == out["again"]


def test_jitsu_data_attributes(browser: Browser, jitsu_config: Config) -> None:
    out = browser(
        """
        const r = {};
        const a = open();
        a.load({ writeKey: "wk", initOnly: "true" });
        a.win.history.pushState({}, "", "/a");
        await a.advance(0);
        r.initOnly = a.events().length;
        const d = open();
        d.load({ writeKey: "wk", debug: "yes" });
        await d.advance(0);
        r.debug = d.logs.map(l => [l[0], l[1].type]);
        const n = open();
        n.win.tracker = function (t) { t.track("From Onload"); };
        n.load({ writeKey: "wk", namespace: "tracker", onload: "tracker", initOnly: "1" });
        await n.advance(0);
        r.namespace = [typeof n.win.jitsu, typeof n.win.tracker.user, typeof n.win.trackerQ.push];
        const local = {};
        const c = open({ localStorage: local });
        c.load({ writeKey: "wk", privacyDisableUserIds: "true" });
        await c.advance(0);
        r.cookieless = [c.events()[0].context.cookieless, Object.keys(local).length];
        const o = open();
        o.load({ writeKey: "wk", onload: "missing" });
        await o.advance(0);
        r.missingOnload = [o.errors.length, o.events().length, typeof o.win.jitsu];
        const u = open();
        u.load({ writeKey: "wk", userId: "u-9" });
        await u.advance(0);
        r.userId = u.events().map(e => [e.type, e.userId]);
        const uc = open();
        uc.load({ writeKey: "wk", userId: "u-9", privacyDisableUserIds: "yes" });
        await uc.advance(0);
        r.userIdDisabled = uc.events().map(e => [e.type, e.userId || null]);
        return r;
        """,
        jitsu_config,
    )
    assert out["initOnly"] == 0  # no automatic page views at all
    assert out["debug"] == [["[tagrelay]", "page"]]
    assert out["namespace"] == ["undefined", "function", "function"]
    assert out["cookieless"] == [True, 0]
    assert out["missingOnload"] == [1, 1, "object"]
    assert out["userId"] == [["identify", "u-9"], ["page", "u-9"]]
    assert out["userIdDisabled"] == [["page", None]]


def test_jitsu_privacy_dont_send_until_configure(browser: Browser, jitsu_config: Config) -> None:
    # Jitsu's consent flow: data-privacy-dont-send until the visitor agrees, then
    # configure({privacy: {dontSend: false}}); disableUserIds is cookieless mode.
    out = browser(
        """
        const local = {};
        const b = open({ localStorage: local });
        b.load({ writeKey: "wk", privacyDontSend: "true", privacyDisableUserIds: "true" });
        const j = b.win.jitsu;
        await j.track("Before Consent");
        await b.advance(0);
        const before = [b.fetches.length, Object.keys(local).length];
        j.configure({ privacy: { dontSend: false } });
        await j.track("Consented, Still Without Ids");
        j.configure({ privacy: { disableUserIds: false } });
        await j.track("With Ids");
        j.configure({ debug: true });  // not a privacy option: ignored
        j.configure();
        await j.track("Still With Ids");
        await b.advance(0);
        return { before, local: Object.keys(local).sort(),
                 events: b.events().map(e => [e.event, e.context.cookieless || false]) };
        """,
        jitsu_config,
    )
    assert out["before"] == [0, 0]
    assert out["events"] == [
        ["Consented, Still Without Ids", True],
        ["With Ids", False],
        ["Still With Ids", False],
    ]
    assert out["local"] == ["tagrelay_aid", "tagrelay_consent", "tagrelay_traits"]


def test_a_visitor_jitsu_knew_keeps_its_ids(browser: Browser, jitsu_config: Config) -> None:
    out = browser(
        """
        const local = {};
        const cookie = "_ga=GA1.1.1.2; __eventn_id=jitsu-anon-1; __eventn_uid=u-7";
        const first = open({ localStorage: local, cookie });
        first.load();
        await first.advance(0);
        first.win.jitsu.reset();
        const second = open({ localStorage: local, cookie });   // Jitsu's cookies remain
        second.load();
        await second.advance(0);
        const fresh = open({ cookie: "__eventn_id=jitsu-anon-2" });
        fresh.load({ writeKey: "wk", cookieless: "true" });
        await fresh.advance(0);
        return { first: first.events()[0], second: second.events()[0],
                 fresh: fresh.events()[0].anonymousId };
        """,
        jitsu_config,
    )
    first = out["first"]
    assert [first["anonymousId"], first["userId"]] == ["jitsu-anon-1", "u-7"]
    # taken over once: after reset() they do not come back from Jitsu's cookies
    assert out["second"]["anonymousId"] not in ("jitsu-anon-1", None)
    assert out["second"].get("userId") is None
    assert out["fresh"] != "jitsu-anon-2"  # cookieless reads no cookie


def test_identify_traits_from_jitsus_cookie(browser: Browser, jitsu_config: Config) -> None:
    out = browser(
        """
        const b = open({ cookie: "__eventn_uid=u-7; __eventn_id_usr="
          + "%7B%22email%22%3A%22ada%40shop.test%22%7D" });
        b.load({ writeKey: "wk", initOnly: "true" });
        b.win.jitsu.identify({ plan: "pro" });
        await b.advance(0);
        return b.events()[0];
        """,
        jitsu_config,
    )
    assert out["userId"] == "u-7"
    assert out["traits"] == {"email": "ada@shop.test", "plan": "pro"}


def test_jitsu_promise_rejects_on_a_bad_call(browser: Browser, jitsu_config: Config) -> None:
    out = browser(
        """
        const b = open();
        b.load();
        const cyclic = {};
        cyclic.self = cyclic;
        try {
          await b.win.jitsu.track("Cyclic", cyclic);
          return "resolved";
        } catch (e) {
          return e.name;
        }
        """,
        jitsu_config,
    )
    assert out == "TypeError"
