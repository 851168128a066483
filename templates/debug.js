// The live debug view (/debug on the admin listener): reads /debug/stream (Server-Sent
// Events) and shows the requests that came in, their events and, per forwarder, what became
// of each. Everything that comes from the stream is shown as text (textContent), never as
// markup: events are written by whoever sends them.
"use strict";

(function () {
  const MAX_REQUESTS = Math.max(50, 2 * Number(document.body.dataset.bufferEvents || 500));
  const MAX_EVENTS = 4 * MAX_REQUESTS;

  const state = {
    requests: [], // request records, oldest first
    events: new Map(), // messageId -> {event, request, forwarders: Map(id -> {outcomes, exchanges})}
    selected: null, // messageId
    paused: false,
    unseen: 0,
    dirty: false,
    connected: false,
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function time(ms) {
    if (!ms) return "";
    const d = new Date(ms);
    return d.toLocaleTimeString(undefined, { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
  }

  function ago(ms) {
    if (!ms) return "never";
    const secs = Math.max(0, (Date.now() - ms) / 1000);
    if (secs < 60) return secs.toFixed(0) + " s ago";
    if (secs < 3600) return (secs / 60).toFixed(0) + " min ago";
    return (secs / 3600).toFixed(1) + " h ago";
  }

  function pretty(text) {
    if (typeof text !== "string") return JSON.stringify(text, null, 2);
    try {
      return JSON.stringify(JSON.parse(text), null, 2);
    } catch (e) {
      return text;
    }
  }

  // -- the data ------------------------------------------------------------------------

  function entry(messageId) {
    let found = state.events.get(messageId);
    if (!found) {
      found = { event: null, request: null, forwarders: new Map() };
      state.events.set(messageId, found);
      if (state.events.size > MAX_EVENTS) {
        const oldest = state.events.keys().next().value;
        state.events.delete(oldest);
      }
    }
    return found;
  }

  function forwarderOf(found, forwarder) {
    let f = found.forwarders.get(forwarder);
    if (!f) {
      f = { outcomes: [], exchanges: [] };
      found.forwarders.set(forwarder, f);
    }
    return f;
  }

  function take(kind, record) {
    if (kind === "request") {
      state.requests.push(record);
      if (state.requests.length > MAX_REQUESTS) state.requests.shift();
      for (const event of record.events || []) {
        const found = entry(event.messageId);
        found.event = event;
        found.request = record;
      }
    } else if (kind === "exchange") {
      for (const id of record.message_ids || []) forwarderOf(entry(id), record.forwarder).exchanges.push(record);
    } else if (kind === "outcome") {
      for (const id of record.message_ids || []) forwarderOf(entry(id), record.forwarder).outcomes.push(record);
    }
    if (state.paused) state.unseen += 1;
    state.dirty = true;
  }

  // What became of an event at one forwarder, from its latest outcome.
  function verdict(forwarder, f, messageId) {
    const last = f.outcomes[f.outcomes.length - 1];
    if (!last) return { text: forwarder + ": pending", cls: "muted" };
    if (last.status === "sent") {
      const sentInRequest = f.exchanges.some((x) => (x.message_ids || []).includes(messageId));
      const dropped = Object.keys(last.dropped || {});
      if (!sentInRequest && dropped.length && f.exchanges.length === 0) {
        return { text: forwarder + ": dropped (" + dropped.join(", ") + ")", cls: "warn" };
      }
      return { text: forwarder + ": sent", cls: "ok" };
    }
    if (last.status === "retrying") return { text: forwarder + ": retrying #" + last.attempt, cls: "warn" };
    if (last.status === "dead_letter") return { text: forwarder + ": dead letter (" + last.reason + ")", cls: "bad" };
    if (last.status === "left_out") return { text: forwarder + ": left out (" + last.reason + ")", cls: "muted" };
    return { text: forwarder + ": " + last.status, cls: "muted" };
  }

  // -- filters ---------------------------------------------------------------------------

  function filters() {
    const get = (id) => $(id).value.trim().toLowerCase();
    return { key: get("filter-key"), type: get("filter-type"), event: get("filter-event"), user: get("filter-user") };
  }

  function eventMatches(event, f) {
    if (f.type && String(event.type || "").toLowerCase() !== f.type) return false;
    if (f.event && !String(event.event || "").toLowerCase().includes(f.event)) return false;
    if (f.user) {
      const ids = [event.anonymousId, event.userId].map((v) => String(v || "").toLowerCase());
      if (!ids.some((v) => v.includes(f.user))) return false;
    }
    return true;
  }

  // -- rendering -------------------------------------------------------------------------

  function renderRequests() {
    const f = filters();
    const rows = [];
    let shown = 0;
    for (let i = state.requests.length - 1; i >= 0; i--) {
      const request = state.requests[i];
      if (f.key && !String(request.key || "").toLowerCase().includes(f.key)) continue;
      const events = (request.events || []).filter((e) => eventMatches(e, f));
      const eventFilter = f.type || f.event || f.user;
      if (eventFilter && events.length === 0) continue;
      shown += 1;
      const answerClass = request.status >= 400 ? "bad" : request.outcome === "partial" ? "warn" : "ok";
      const answer = [request.status, request.outcome, request.error].filter(Boolean).join(" ");
      const counts = (request.events || []).length + " accepted" +
        ((request.rejected || []).length ? ", " + request.rejected.length + " rejected" : "") +
        (request.duplicates ? ", " + request.duplicates + " duplicate" : "");
      rows.push(el("tr", { class: "request", dataset: { seq: request.seq } },
        el("td", {}, time(request.at_ms)),
        el("td", {}, request.source),
        el("td", {}, request.key || "-"),
        el("td", {}, request.method + " " + request.path + (request.query ? "?" + request.query : "")),
        el("td", { class: answerClass, title: request.message || "" }, answer),
        el("td", {}, counts)));
      if (request.message && request.status >= 400) {
        rows.push(el("tr", { class: "refusal" }, el("td", {}), el("td", { colspan: 5, class: "bad" }, request.message)));
      }
      for (const event of events) {
        const found = state.events.get(event.messageId);
        const badges = [];
        if (found) {
          for (const [forwarder, fw] of found.forwarders) {
            const v = verdict(forwarder, fw, event.messageId);
            badges.push(el("span", { class: "badge " + v.cls }, v.text));
          }
        }
        rows.push(el("tr", {
          class: "event" + (state.selected === event.messageId ? " selected" : ""),
          dataset: { messageId: event.messageId },
          onclick: () => select(event.messageId),
        },
          el("td", {}, event.type),
          el("td", {}, event.event || ""),
          el("td", { colspan: 2, class: "muted" },
            "anon " + (event.anonymousId || "-") + " · user " + (event.userId || "-") +
            (event.consent ? " · consent " + Object.entries(event.consent).map(([k, v]) => k + "=" + v).join(" ") : "")),
          el("td", { colspan: 2 }, badges)));
      }
      for (const rejected of request.rejected || []) {
        rows.push(el("tr", { class: "rejected" }, el("td", {}),
          el("td", { colspan: 5, class: "bad" }, "event " + rejected.index + " rejected: " + rejected.error + " (" + rejected.message + ")")));
      }
    }
    $("requests").replaceChildren(...rows);
    $("counts").textContent = "(" + shown + " of " + state.requests.length + ")";
  }

  function headerTable(headers) {
    return el("table", {}, Object.entries(headers || {}).map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))));
  }

  function renderExchange(x) {
    const parts = [
      el("div", {}, el("strong", {}, x.request.method + " "), x.request.url,
        el("span", { class: "muted" }, " · " + time(x.at_ms) + " · " + x.duration_ms + " ms")),
      el("h3", {}, "request headers"), headerTable(x.request.headers),
      el("h3", {}, "request body" + (x.request.body_truncated ? " (cut)" : "")), el("pre", { class: "request-body" }, pretty(x.request.body)),
    ];
    if (x.response) {
      const cls = x.response.status < 300 ? "ok" : x.response.status < 500 && x.response.status !== 429 && x.response.status !== 408 ? "bad" : "warn";
      parts.push(el("h3", {}, "answer: ", el("span", { class: "status " + cls }, "HTTP " + x.response.status)));
      parts.push(headerTable(x.response.headers));
      parts.push(el("pre", { class: "response-body" }, pretty(x.response.body) + (x.response.body_truncated ? "\n(cut)" : "")));
    } else {
      parts.push(el("h3", {}, "no answer: ", el("span", { class: "bad" }, x.error || "")));
    }
    return el("div", { class: "exchange" }, parts);
  }

  function renderOutcome(o) {
    const bits = [time(o.at_ms), o.status];
    if (o.reason) bits.push(o.reason);
    if (o.attempt) bits.push("attempt " + o.attempt);
    if (o.next_try_ms) bits.push("next try " + time(o.next_try_ms));
    if (o.dropped && Object.keys(o.dropped).length) bits.push("dropped from the batch: " + JSON.stringify(o.dropped));
    return el("li", { class: "outcome" }, bits.join(" · "), o.detail ? el("pre", {}, pretty(o.detail)) : null);
  }

  function renderDetail() {
    const box = $("detail");
    const id = state.selected;
    const found = id && state.events.get(id);
    if (!found) return;
    const parts = [];
    if (found.event) {
      const request = found.request;
      parts.push(el("p", {}, el("strong", {}, found.event.type + (found.event.event ? " " + found.event.event : "")),
        el("span", { class: "muted" }, " · " + id + (request ? " · " + request.source + " · key " + (request.key || "-") : ""))));
      parts.push(el("h3", {}, "normalized"), el("pre", { class: "normalized" }, JSON.stringify(found.event.normalized, null, 2)));
    } else {
      parts.push(el("p", { class: "muted" }, id + " (its request was not captured)"));
    }
    for (const [forwarder, f] of found.forwarders) {
      const v = verdict(forwarder, f, id);
      parts.push(el("h3", { class: "forwarder" }, el("span", { class: "badge " + v.cls }, v.text)));
      parts.push(el("ul", {}, f.outcomes.map(renderOutcome)));
      for (const x of f.exchanges) parts.push(renderExchange(x));
    }
    if (found.forwarders.size === 0) parts.push(el("p", { class: "muted" }, "No forwarder has reported on it yet."));
    box.replaceChildren(...parts);
  }

  function select(messageId) {
    state.selected = messageId;
    renderDetail();
    for (const row of document.querySelectorAll("tr.event")) {
      row.classList.toggle("selected", row.dataset.messageId === messageId);
    }
  }

  function renderForwarders(panel) {
    const rows = panel.forwarders.map((f) => {
      const stateClass = f.state === "running" ? "ok" : f.state === "retrying" ? "warn" : "bad";
      const error = f.last_error
        ? el("details", {}, el("summary", { class: "bad" }, time(f.last_error.at_ms) + " " + f.last_error.reason),
            el("pre", { class: "last-error" }, pretty(f.last_error.detail)))
        : "none";
      return el("tr", { dataset: { forwarder: f.id } },
        el("td", {}, f.id),
        el("td", {}, f.type + (f.endpoint ? " → " + f.endpoint : "")),
        el("td", { class: stateClass }, f.state + (f.attempts ? " (attempt " + f.attempts + ")" : "")),
        el("td", { class: "num" }, f.delivered_per_sec === null ? "-" : f.delivered_per_sec),
        el("td", { class: "num" }, f.errors_per_sec === null ? "-" : f.errors_per_sec),
        el("td", { class: "num" }, f.lag_secs + " s"),
        el("td", { class: "num" }, f.behind),
        el("td", {}, ago(f.last_success_ms)),
        el("td", {}, error));
    });
    $("forwarders").replaceChildren(...rows);
  }

  function render() {
    if (!state.dirty || state.paused) return;
    state.dirty = false;
    renderRequests();
    renderDetail();
  }

  function showStatus() {
    const status = $("status");
    if (!state.connected) {
      status.className = "down";
      status.textContent = "disconnected, reconnecting";
    } else if (state.paused) {
      status.className = "paused";
      status.textContent = "paused (" + state.unseen + " new)";
    } else {
      status.className = "live";
      status.textContent = "live";
    }
  }

  // -- dead letters ----------------------------------------------------------------------

  async function loadDeadLetters() {
    const note = $("dead-letters-note");
    try {
      const resp = await fetch("/debug/dead-letters?limit=100", { credentials: "same-origin" });
      const body = await resp.json();
      const total = Object.values(body.stored || {}).reduce((a, b) => a + b, 0);
      note.textContent = total + " stored" + (total > body.dead_letters.length ? ", the newest " + body.dead_letters.length + " shown" : "");
      $("dead-letters").replaceChildren(...body.dead_letters.map((d) =>
        el("tr", { dataset: { deadLetter: d.id } },
          el("td", {}, d.id),
          el("td", {}, d.forwarder),
          el("td", {}, d.dead_at),
          el("td", {}, d.reason),
          el("td", {}, (d.type || "") + (d.event ? " " + d.event : "")),
          el("td", {}, d.message_id || ""),
          el("td", { class: "num" }, d.attempts),
          el("td", {}, el("details", {}, el("summary", {}, String(d.detail || "").slice(0, 80)), el("pre", {}, pretty(d.detail)))),
          el("td", {}, el("button", { type: "button", class: "replay", onclick: (e) => replay(d.id, e.target) }, "Replay")))));
    } catch (e) {
      note.textContent = "could not load the dead letters: " + e;
    }
  }

  async function replay(id, button) {
    button.disabled = true;
    const note = $("dead-letters-note");
    try {
      const resp = await fetch("/dead-letters/replay", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ ids: [id] }),
      });
      const body = await resp.json();
      if (!resp.ok) {
        note.textContent = "replay of " + id + " refused: " + (body.message || resp.status);
      } else {
        note.textContent = "replay of " + id + ": " + body.replayed.map((r) => JSON.stringify(r)).join("; ");
      }
    } catch (e) {
      note.textContent = "replay of " + id + " failed: " + e;
    }
    setTimeout(loadDeadLetters, 300);
  }

  // -- the stream ------------------------------------------------------------------------

  function connect() {
    const source = new EventSource("/debug/stream");
    source.addEventListener("open", () => { state.connected = true; showStatus(); });
    source.addEventListener("error", () => { state.connected = false; showStatus(); });
    source.addEventListener("hello", () => {
      // A new connection sends the backlog again: start over.
      state.requests = [];
      state.events = new Map();
      state.dirty = true;
    });
    for (const kind of ["request", "exchange", "outcome"]) {
      source.addEventListener(kind, (message) => take(kind, JSON.parse(message.data)));
    }
    source.addEventListener("forwarders", (message) => renderForwarders(JSON.parse(message.data)));
    source.addEventListener("missed", (message) => {
      const gap = JSON.parse(message.data);
      $("capture-note").textContent = "This view fell behind: " + gap.records + " records were skipped.";
    });
  }

  $("pause").addEventListener("click", () => {
    state.paused = !state.paused;
    $("pause").textContent = state.paused ? "Resume" : "Pause";
    state.unseen = 0;
    state.dirty = true;
    showStatus();
    render();
  });
  $("clear").addEventListener("click", () => {
    state.requests = [];
    state.events = new Map();
    state.selected = null;
    state.dirty = true;
    $("detail").replaceChildren();
    render();
  });
  for (const id of ["filter-key", "filter-type", "filter-event", "filter-user"]) {
    $(id).addEventListener("input", () => { state.dirty = true; render(); });
  }
  $("refresh-dead-letters").addEventListener("click", loadDeadLetters);

  setInterval(() => { render(); showStatus(); }, 250);
  connect();
  loadDeadLetters();
})();
