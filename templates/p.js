/*
 * tagrelay.js: the relay's first-party tracking script (the readable source).
 *
 * A Jinja2 template: the relay renders it once at start-up with the cfg object at the very
 * end (its only expression) and, when script.jitsu_compat is set, the blocks between
 * brace-percent if jitsu and endif: the Jitsu layer (keep every other brace-brace,
 * brace-percent and brace-hash pair out of this file). It minifies and gzips it
 * (tagrelay.web.script) and serves it at paths.script. It must stay at most 2,048 bytes
 * gzipped as served, and at most 2,560 with the Jitsu layer: tests/web/test_script.py
 * asserts both. Hence the terse style and the short names, each explained where it is
 * declared.
 *
 * cfg: g = the window property of the API, e = the events path (base path included),
 *      v = the library version, c = cookieless by default, a = automatic page views.
 *
 * The API mirrors Segment's analytics.js: page, track, identify, group, alias, reset, ready,
 * plus consent, init and anonymousId. Events follow the Segment spec and go to the relay as
 * {writeKey, sentAt, batch: [...]} in a text/plain POST (a simple request: no preflight).
 *
 * The Jitsu layer makes the same script answer to Jitsu's browser API too, so that a page
 * carrying Jitsu's snippet (<script async src=".../p.js" data-write-key="...">) works
 * unchanged: window.jitsu (track, page, identify, group, reset returning promises, and
 * user()), the jitsuQ queue of callbacks, and Jitsu's data-* attributes (see the layer).
 * Its events are the same events, through the same queue, ids and delivery.
 */
(function (w, d, N, cfg) {
  var G = cfg.g,
    q = w[G], // the snippet's queue: [[method, ...arguments], ...]
    X = Object.assign;
  // Loaded twice: the API has replaced the snippet's queue already.
  if (q && !q.push) return;

  var s = d.currentScript || {},
    a = s.dataset || {},
    // Options: cfg defaults < data-* attributes of this script tag < init().
    O = {
      writeKey: a.writeKey,
      host: a.host || s.src && new URL(s.src).origin,
      autoPage: (a.autoPage || "" + cfg.a) != "false",
      cookieless: (a.cookieless || "" + cfg.c) == "true"
    },
    // The visitor: CL cookieless (unset until the first init), A anonymous id, U user id,
    // T the traits given to identify (merged; on later track and page events as
    // context.traits), C consent ({category: "granted"|"denied"}), L the landing URL's
    // {campaign, clickIds} if it had any. All kept in storage (st); reset() forgets U and T.
    CL, A, U, L,
    T = {},
    C = {},
    V, // undefined: a field that does not apply (undefined values vanish in JSON)
    R = d.referrer, // context.page.referrer: the document's, then the previous URL in an SPA
    H, // the URL of the last page view
    Q = [], // events not yet sent
    Z, // the timer that sends Q
    P = new Set(), // batches waiting for their retry: {b: body, a: our anonymous id then}
    RS, // the anonymous id made by reset(), until the relay has taken it
    UL, // the page is being unloaded (from pagehide to pageshow)
    // A random id: 128 bits from crypto.getRandomValues (unlike crypto.randomUUID, it
    // exists outside secure contexts too).
    id = () => crypto.getRandomValues(new Uint32Array(4)).join("-"),
    // Browser storage as JSON under "<global>_<k>": sessionStorage for the landing
    // parameters ("lp"), localStorage for the rest. st(k) reads, st(k, v) writes (an
    // undefined v writes nothing: the key was never set). Cookieless: nothing is read or
    // written. Storage may throw (disabled, full): then it is simply not kept.
    st = (k, v, S) => {
      try {
        S = k == "lp" ? sessionStorage : localStorage;
        k = G + "_" + k;
        // (an absent key reads as undefined, which JSON.parse rejects: also undefined)
        if (!CL) return v === V ? JSON.parse(S[k]) : (S[k] = JSON.stringify(v));
      } catch (e) {}
    },
    save = () => {
      st("aid", A);
      st("uid", U);
      st("traits", T);
      st("consent", C);
      st("lp", L);
    },
    // (Re)load the visitor: on the first init, and when an init switches cookieless. The
    // landing parameters are the session's (sessionStorage); a page whose URL carries new
    // ones (another campaign or ad click in the same tab) replaces them. Cookieless: a new
    // anonymous id, and only this page load's parameters.
    load = (c, i) => {
      // The URL's utm_* parameters (Segment style: utm_campaign -> name, utm_source ->
      // source, ...) into c, its ad click ids into i.
      new URLSearchParams(location.search).forEach((v, k) =>
        k.slice(0, 4) == "utm_"
          ? ((c = c || {})[k == "utm_campaign" ? "name" : k.slice(4)] = v)
          : "gclid gbraid wbraid fbclid ttclid ScCid epik rdt_cid twclid li_fat_id msclkid".split(" ").includes(k) &&
            ((i = i || {})[k] = v)
      );
      L = (c || i) && { campaign: c, clickIds: i } || st("lp") || L;
      A = st("aid") || !CL && A || id();
      U = st("uid") || U;
      T = st("traits") || T;
      C = st("consent") || C;
      save();
    },
    // o itself if it has a key, else undefined (so that an empty object is left out)
    nz = o => Object.keys(o)[0] && o,
    // context.page, and the properties of a page event (like analytics.js)
    pg = (l = location) => ({ url: l.href, path: l.pathname, title: d.title, referrer: R, search: l.search }),
    // Build one event (Segment spec), queue it and return its messageId. A JSON copy is
    // queued: later changes to the caller's objects do not leak into it, and an object
    // that cannot be serialised throws here, in the caller, not in a whole batch later.
    // t (track and page): the event carries the user's traits as context.traits, where
    // Segment's spec puts them on calls other than identify (and where the relay's ad
    // forwarders find an email or phone given to identify() earlier).
    ev = (f, o, t) => {
{% if jitsu %}
      if (O.dontSend) return; // Jitsu's privacy.dontSend: nothing is sent
{% endif %}
      var e = JSON.parse(
          JSON.stringify(
            X({ messageId: o && o.messageId || id(), timestamp: new Date().toISOString(), anonymousId: A, userId: U }, f, {
              context: X(
                {
                  page: pg(),
                  locale: N.language,
                  timezone: Intl.DateTimeFormat().resolvedOptions().timeZone,
                  screen: { width: screen.width, height: screen.height, density: devicePixelRatio },
                  library: { name: "tagrelay.js", version: cfg.v },
                  traits: t && nz(T),
                  consent: nz(C),
                  cookieless: CL || V,
                  gpc: N.globalPrivacyControl || V
                },
                L
              )
            })
          )
        );
      Q.push(e);
{% if jitsu %}
      O.debug && console.log("[tagrelay]", e);
{% endif %}
      // Hidden or unloading: send at once, by beacon. Else at the end of this task, so that
      // the events of one tick share one request.
      hidden() ? flush(1) : Z || (Z = setTimeout(flush));
      return e.messageId;
    },
    url = () => (O.host || "") + cfg.e,
    hidden = () => UL || d.visibilityState == "hidden",
    beacon = B => N.sendBeacon(url(), B.b),
    /*
     * Delivery, and why every event arrives once.
     *
     * At any moment a batch is in exactly one place: queued (Q), handed to fetch with
     * keepalive (which the browser carries through an unload), or waiting for its one retry
     * (P). When the page is hidden or unloaded, flush(1) moves Q and P to sendBeacon and
     * forgets them (a retry timer that fires later finds its batch gone from P); a batch
     * owned by a keepalive fetch is left to it, never resent. So no batch goes by two paths.
     * One trap: as the document goes away, Chromium rejects the page's promise of a
     * keepalive fetch still in flight (before pagehide, in the same task), although the
     * browser goes on to deliver it. So a rejection is acted on one task later: a document
     * that is going away runs no later task, and such a batch never reaches P (where the
     * pagehide would beacon it a second time).
     * A retry, like the beacon of a waiting batch, sends the identical body (same
     * messageIds): if the first attempt did reach the relay and only the answer was lost,
     * the relay deduplicates by messageId.
     * Keepalive bodies share a 64 KiB quota: a body of 20,000 characters or more (dozens of
     * events in one tick) goes without keepalive, and is lost if the page unloads while it
     * is in flight (a beacon could not carry it either).
     */
    flush = (h, B) => {
      Z = clearTimeout(Z);
      if (Q[0]) {
        B = {
          // B.a: our anonymous id as the batch leaves. reset() flushes before it changes
          // the id, so the events of a batch made after a reset all carry the new one.
          a: A,
          b: JSON.stringify({
            writeKey: O.writeKey,
            sentAt: new Date().toISOString(),
            // After reset(): asks the relay to move its cookie to the new id instead of
            // answering with the old one.
            reset: A == RS || V,
            batch: Q.splice(0)
          })
        };
        h ? beacon(B) : post(B);
      }
      h && (P.forEach(beacon), P.clear());
    },
    // POST a batch. 2xx: done; adopt the relay's anonymous id if it differs (one id for the
    // script and the relay's cookie), unless reset() or an adoption changed ours meanwhile.
    // Network error, 429 or 5xx: retry once, a second later, same body (the retry is set
    // up one task later: see above). Other 4xx: give up.
    post = (B, n, f = () => n || setTimeout(() => P.add(B) && setTimeout(() => P.delete(B) && post(B, 1), 1e3))) =>
      fetch(url(), { method: "POST", body: B.b, keepalive: B.b.length < 2e4, credentials: "include" }).then(
        r =>
          r.status == 429 || r.status > 499
            ? f()
            : r.ok &&
              r.json().then(
                j => (B.a == RS ? RS = 0 : (j = j.anonymousId) && B.a == A && !CL && (A = j, save())),
                () => {} // a 2xx without JSON: nothing to adopt
              ),
        f
      ),
    // Page views: one per URL change. pushState and replaceState are wrapped and popstate
    // is heard; the check waits for the end of the task (the app sets the new title
    // meanwhile), and comparing with the last URL sent ignores a replaceState that keeps it.
    nav = () => O.autoPage && location.href != H && api.page(),
    // Apply a queued call [method, ...arguments]: an exception (bad arguments, a ready
    // callback's) is reported without stopping the caller, the replay of the queue.
    call = c => {
      try {
        return api[c[0]](...c.slice(1));
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    },
    api = {
      init: o => {
        X(O, o);
        if (CL !== (CL = !!O.cookieless)) load();
      },
      page: (n, p) => {
        if (H && H != location.href) R = H;
        H = location.href;
        return ev({ type: "page", name: n, properties: X(pg(), p) }, V, 1);
      },
      track: (e, p, o) => ev({ type: "track", event: e, properties: p || {} }, o, 1),
      // identify(userId, traits), or identify(traits) for the current user (or none).
      // Traits accumulate; another user starts from none.
      identify: (u, t) => {
        if (u === V || typeof u == "object") t = t || u, u = U;
        if (U && u != U) T = {};
        U = u;
        X(T, t);
        save();
        return ev({ type: "identify", traits: T });
      },
      group: (g, t) => ev({ type: "group", groupId: g, traits: t || {} }),
      alias: (u, p) => ev({ type: "alias", userId: u, previousId: p || U || A }),
      // Forget the user; a new anonymous id. Queued events leave first, with the old ids.
      reset: () => {
        flush(hidden());
        U = null;
        T = {};
        A = RS = id();
        save();
      },
      // (the snippet's queued ready calls are replayed last: see the end)
      ready: f => f(),
      // consent({analytics, ads, ad_user_data, ad_personalization}): true/"granted" or
      // false/"denied" (anything else denies); carried on every later event as
      // context.consent.
      consent: o => {
        ["analytics", "ads", "ad_user_data", "ad_personalization"].forEach(
          (k, v) => (v = o[k]) != null && (C[k] = v === true || v == "granted" ? "granted" : "denied")
        );
        save();
      },
      anonymousId: () => A
    };

  w.addEventListener("pagehide", () => flush(UL = 1));
  w.addEventListener("pageshow", () => UL = 0);
  d.addEventListener("visibilitychange", () => hidden() && flush(1));
  ["pushState", "replaceState"].forEach(m => {
    var f = history[m];
    history[m] = function () {
      setTimeout(nav);
      return f.apply(this, arguments);
    };
  });
  w.addEventListener("popstate", () => setTimeout(nav));

{% if jitsu %}
  /*
   * The Jitsu layer, part 1: Jitsu's data-* attributes and the ids Jitsu's script kept.
   * data-init-only: no automatic page view. data-debug: every event is logged to the
   * console as it is queued. data-privacy-dont-send: no event is sent (until
   * configure() says otherwise, see part 2). data-privacy-disable-user-ids: cookieless.
   * ("true", "1" and "yes" are true, as for Jitsu.) data-write-key is ours already;
   * data-user-id, data-onload and data-namespace are read by part 2. The other attributes of Jitsu's
   * script have no effect (cookie names and domain: the relay sets its own cookie).
   * A visitor's first page load with this script (nothing stored yet) takes over the
   * anonymous id, user id and traits that Jitsu's script kept in its cookies (__eventn_id,
   * __eventn_uid, and __eventn_id_usr: URI-encoded JSON), so that a site switching keeps
   * its visitors and users; from then on they are kept like ours.
   */
  var yes = v => /^(true|1|yes)$/.test(v),
    ck = n => (d.cookie.match("(^|; )" + n + "=([^;]*)") || [])[2];
  yes(a.initOnly) && (O.autoPage = !1);
  O.debug = yes(a.debug);
  O.dontSend = yes(a.privacyDontSend);
  yes(a.privacyDisableUserIds) && (O.cookieless = 1);
  if (!O.cookieless && st("aid") === V)
    try {
      A = ck("__eventn_id");
      U = ck("__eventn_uid");
      T = JSON.parse(decodeURIComponent(ck("__eventn_id_usr") || "{}")) || {};
    } catch (e) {}
{% endif %}
  // Replay the snippet's queue: init calls first, whatever their position, then the rest
  // in order, then the automatic page view, and the ready callbacks last. A page that kept
  // a reference to the snippet's stub still reaches the API.
  q = q || [];
  w[G] = api;
  q.push = call;
  q.forEach(c => c[0] == "init" && call(c));
  api.init();
  q.forEach(c => c[0] != "init" && c[0] != "ready" && call(c));
{% if jitsu %}
  /*
   * Part 2: window.jitsu (or window[data-namespace]). Its methods return promises, which
   * resolve once the event is queued (with its messageId): delivery goes on by keepalive
   * fetch or beacon, which outlive a navigation, so a page need not wait for them. An
   * exception (an object that cannot be serialised) rejects the promise instead.
   * page(name, properties) or page(properties). A page that calls page() itself tracks
   * its own page views: the automatic ones stop (an SPA would count every view twice).
   * user(): the ids and traits the next event carries. configure({privacy: {dontSend,
   * disableUserIds}}) (a consent banner's answer): each one given is applied (leaving
   * disableUserIds is leaving cookieless mode); the rest of Jitsu's options are ignored.
   * Then, like Jitsu's script: data-user-id is identified (unless user ids are disabled),
   * the data-onload function (its name) is called with the
   * instance, the callbacks queued in jitsuQ run (a function gets the instance, an array
   * [method, ...arguments] is a call), later pushes run at once; then the automatic page
   * view, which so carries what they identified.
   */
  var NS = a.namespace || "jitsu",
    J = {
      track: api.track,
      page: (n, p) => (O.autoPage = !1, n && typeof n == "object" ? api.page(n.name, n) : api.page(n, p)),
      identify: api.identify,
      group: api.group,
      reset: api.reset
    },
    // Run a jitsuQ entry (or the data-onload function); an exception is reported, as by
    // call(), without stopping the others.
    jq = f => {
      try {
        f.call ? f(J) : J[f[0]](...f.slice(1));
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    },
    JQ = w[NS + "Q"] || [];
  for (let m in J) {
    let f = J[m];
    J[m] = (...x) => new Promise(r => r(f(...x)));
  }
  J.user = () => ({ anonymousId: A, userId: U ?? null, traits: X({}, T) });
  J.configure = (o, v) => {
    o = o && o.privacy || {};
    (v = o.dontSend) != V && (O.dontSend = v);
    (v = o.disableUserIds) != V && api.init({ cookieless: v });
  };
  w[NS] = J;
  w[NS + "Q"] = { push: jq };
  a.userId && !O.cookieless && api.identify(a.userId);
  a.onload && jq(w[a.onload]);
  JQ.forEach(jq);
{% endif %}
  nav();
  q.forEach(c => c[0] == "ready" && call(c));
})(window, document, navigator, {{ cfg|tojson }});
