// ctct-proxy dashboard: polls /dashboard.json and draws each key's day, rate, queue and clients.
// Hand-written, no libraries. Every value from the JSON goes into the page as text (textContent
// or an SVG attribute), never as markup: client names come from clients.
"use strict";

(() => {
  const SVG = "http://www.w3.org/2000/svg";
  let pollMs = 1500;
  let windowSeconds = 300;
  let timer = null;
  let inflight = false;
  const cards = new Map(); // key fingerprint -> card element

  // -- formatting ----------------------------------------------------------------------------

  const intFormat = new Intl.NumberFormat();
  const fmtInt = (n) => intFormat.format(n);

  function fmtSeconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 0.001) return "0 s";
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 90) return `${Math.round(s)} s`;
    return fmtDuration(s);
  }

  function fmtDuration(s) {
    const total = Math.max(0, Math.round(s));
    const h = Math.floor(total / 3600);
    const m = Math.floor((total % 3600) / 60);
    if (h > 0) return `${h} h ${m} min`;
    if (m > 0) return `${m} min ${total % 60} s`;
    return `${total} s`;
  }

  const two = (n) => String(n).padStart(2, "0");
  const localTime = (d) => `${two(d.getHours())}:${two(d.getMinutes())}`;
  const utcTime = (d) => `${two(d.getUTCHours())}:${two(d.getUTCMinutes())}`;

  function localWhen(d, now) {
    const sameDay = d.toDateString() === now.toDateString();
    const day = sameDay ? "" : ` ${d.toLocaleDateString(undefined, { weekday: "short" })}`;
    return `${localTime(d)}${day}`;
  }

  // -- small DOM helpers -----------------------------------------------------------------------

  function field(root, name) {
    return root.querySelector(`[data-field="${name}"]`);
  }

  // Text for people; data-value keeps the raw number for scripts (and the browser test).
  function put(root, name, text, value) {
    const el = field(root, name);
    if (!el) return;
    el.textContent = text;
    if (value !== undefined) el.dataset.value = value === null ? "" : String(value);
  }

  function svg(tag, attrs, parent) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (parent) parent.appendChild(el);
    return el;
  }

  // -- the page --------------------------------------------------------------------------------

  function renderTop(doc) {
    const mode = document.getElementById("mode");
    mode.textContent = doc.mode;
    mode.className = `pill ${doc.mode}`;
    mode.dataset.value = doc.mode;
    put(document, "qps", fmtInt(doc.qps), doc.qps);
    put(document, "daily_quota", fmtInt(doc.daily_quota), doc.daily_quota);
    put(document, "max_wait", fmtSeconds(doc.max_wait), doc.max_wait);
    put(document, "poll", String(doc.poll_seconds));
    put(document, "updated", `updated ${new Date(doc.now * 1000).toLocaleTimeString()}`);
    renderToken(doc.token);
  }

  function renderToken(token) {
    const root = document.getElementById("token");
    const kinds = {
      oauth: "OAuth, refreshed by the proxy",
      fixed: "fixed (--access-token)",
      "pass-through": "the clients' own (pass-through)",
    };
    put(root, "token_kind", kinds[token.kind] || token.kind, token.kind);
    const expires = field(root, "token_expires");
    const refreshed = field(root, "token_refreshed");
    const failures = field(root, "token_failures");
    if (token.kind !== "oauth") {
      expires.textContent = refreshed.textContent = failures.textContent = "";
      return;
    }
    put(
      root,
      "token_expires",
      token.expires_in === null ? "no access token yet" : `expires in ${fmtDuration(token.expires_in)}`,
      token.expires_in,
    );
    put(
      root,
      "token_refreshed",
      token.last_refresh === null ? "" : `last refresh ${new Date(token.last_refresh * 1000).toLocaleTimeString()}`,
      token.last_refresh,
    );
    if (token.failures > 0) {
      const retry = token.retry_in === null ? "" : `, retry in ${fmtSeconds(token.retry_in)}`;
      put(root, "token_failures", `refresh failing: ${token.failures} in a row (${token.last_error})${retry}`, token.failures);
      failures.className = "bad";
    } else {
      put(root, "token_failures", `${token.failures_total} failed refreshes since start`, 0);
      failures.className = token.ready ? "ok" : "bad";
    }
  }

  function cardFor(fp) {
    let card = cards.get(fp);
    if (!card) {
      const template = document.getElementById("key-card");
      card = template.content.firstElementChild.cloneNode(true);
      card.dataset.key = fp;
      cards.set(fp, card);
    }
    return card;
  }

  function renderKeys(doc) {
    const main = document.getElementById("keys");
    const seen = new Set();
    for (const key of doc.keys) {
      seen.add(key.key);
      const card = cardFor(key.key);
      renderKey(card, key, doc);
      main.appendChild(card); // keeps the server's order (most recently active first)
    }
    for (const [fp, card] of cards) {
      if (!seen.has(fp)) {
        card.remove();
        cards.delete(fp);
      }
    }
    document.getElementById("no-keys").hidden = doc.keys.length > 0;
    const more = document.getElementById("more-keys");
    more.hidden = doc.keys_total <= doc.keys.length;
    more.textContent = `Showing the ${doc.keys.length} most recently active of ${doc.keys_total} keys; /status lists them all.`;
  }

  function renderKey(card, key, doc) {
    const now = new Date(doc.now * 1000);
    put(card, "name", key.name || "key", key.name);
    put(card, "key", key.key, key.key);

    const paused = field(card, "paused");
    if (key.paused_until) {
      const until = new Date(key.paused_until);
      paused.textContent = `paused until ${localWhen(until, now)} (${utcTime(until)} UTC)`;
      paused.dataset.value = key.paused_until;
      paused.hidden = false;
    } else {
      paused.hidden = true;
      paused.dataset.value = "";
    }

    // Today against the daily quota.
    const used = key.sent_today / doc.daily_quota;
    put(card, "sent_today", fmtInt(key.sent_today), key.sent_today);
    put(card, "daily_quota", fmtInt(doc.daily_quota), doc.daily_quota);
    put(card, "remaining_today", fmtInt(key.remaining_today), key.remaining_today);
    put(card, "used_pct", `${(used * 100).toFixed(used < 0.1 ? 2 : 1)}%`, used);
    const fill = card.querySelector(".fill");
    fill.style.width = `${Math.min(100, used * 100)}%`;
    fill.classList.toggle("high", used >= 0.8 && used < 1);
    fill.classList.toggle("full", used >= 1);
    const reset = new Date(key.next_reset);
    put(card, "reset_local", localWhen(reset, now), key.next_reset);
    put(card, "reset_utc", utcTime(reset));
    put(card, "reset_in", `in ${fmtDuration((reset - now) / 1000)}`);

    // The queue.
    put(card, "queued", fmtInt(key.queued), key.queued);
    put(card, "predicted_wait", fmtSeconds(key.predicted_wait_seconds), key.predicted_wait_seconds);
    const note = field(card, "predicted_note");
    note.className = "note";
    if (key.paused_until) {
      note.textContent = "paused: a new request gets 429 now";
      note.classList.add("bad");
    } else if (key.remaining_today <= key.queued) {
      note.textContent = "daily quota used up: 429 now";
      note.classList.add("bad");
    } else if (key.predicted_wait_seconds > doc.max_wait) {
      note.textContent = "beyond max wait: 429 now";
      note.classList.add("bad");
    } else {
      note.textContent = key.queued ? `behind ${fmtInt(key.queued)} queued` : "sent at once";
    }
    put(card, "wait_p50", fmtSeconds(key.wait_p50_seconds), key.wait_p50_seconds);
    put(card, "wait_p95", fmtSeconds(key.wait_p95_seconds), key.wait_p95_seconds);
    put(card, "wait_samples", `${fmtInt(key.wait_samples)} sends`, key.wait_samples);
    put(card, "sends_last_minute", fmtInt(key.sends_last_minute), key.sends_last_minute);
    put(card, "spacing", `one send every ${fmtSeconds(key.spacing_seconds)}`, key.spacing_seconds);

    drawChart(card, key.history, doc.qps);
    renderClients(card, key.clients);
  }

  function renderClients(card, clients) {
    const none = field(card, "no_clients");
    const table = card.querySelector(".clients table");
    if (!clients) {
      none.hidden = false;
      table.hidden = true;
      return;
    }
    none.hidden = true;
    table.hidden = false;
    const body = table.tBodies[0];
    body.replaceChildren();
    for (const c of clients) {
      const row = body.insertRow();
      row.dataset.client = c.name;
      row.insertCell().textContent = c.name;
      const share = row.insertCell();
      const wrap = document.createElement("div");
      wrap.className = "share";
      const bar = document.createElement("div");
      bar.className = "bar";
      const fill = document.createElement("div");
      fill.className = "fill";
      fill.style.width = `${Math.round(c.share * 100)}%`;
      bar.appendChild(fill);
      const pct = document.createElement("span");
      pct.textContent = `${Math.round(c.share * 100)}%`;
      wrap.append(bar, pct);
      share.appendChild(wrap);
      const cells = [fmtInt(c.sends_last_minute), fmtInt(c.queued), c.lane === null ? "–" : String(c.lane)];
      for (const text of cells) {
        const cell = row.insertCell();
        cell.className = "num";
        cell.textContent = text;
      }
    }
  }

  // -- the chart -------------------------------------------------------------------------------

  function niceCeiling(x) {
    if (x <= 1) return 1;
    const p = 10 ** Math.floor(Math.log10(x));
    for (const m of [1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) {
      if (m * p >= x) return m * p;
    }
    return 10 * p;
  }

  function drawChart(card, history, qps) {
    const chart = card.querySelector(".chart");
    // Whole seconds only: the server leaves out the one still filling.
    const { sends, rejections, replays } = history;
    const n = sends.length;
    const last = history.end; // epoch second of the rightmost bar
    put(card, "rejections_window", fmtInt(rejections.reduce((a, b) => a + b, 0)));
    put(card, "replays_window", fmtInt(replays.reduce((a, b) => a + b, 0)));

    const width = Math.max(320, Math.round(chart.getBoundingClientRect().width || 800));
    const height = 190;
    const m = { left: 34, right: 50, top: 16, bottom: 22 };
    const w = width - m.left - m.right;
    const h = height - m.top - m.bottom;
    chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
    chart.dataset.seconds = String(n);
    chart.replaceChildren();

    const top = niceCeiling(Math.max(qps * 1.25, ...sends, 1));
    const x = (i) => m.left + (i * w) / n;
    const y = (v) => m.top + h - (v / top) * h;
    const barWidth = Math.max(0.5, w / n - (w / n > 3 ? 1 : 0));

    // Horizontal grid and the y axis.
    for (const v of [0, top / 2, top]) {
      svg("line", { class: "grid", x1: m.left, x2: m.left + w, y1: y(v), y2: y(v) }, chart);
      const label = svg("text", { class: "axis", x: m.left - 6, y: y(v) + 4, "text-anchor": "end" }, chart);
      label.textContent = Number.isInteger(v) ? String(v) : v.toFixed(1);
    }

    // Time ticks: every minute (5-minute view) or every 3 minutes (longer views).
    const step = n > 400 ? 180 : 60;
    const first = last - n + 1;
    for (let t = Math.ceil(first / step) * step; t <= last; t += step) {
      const i = t - first;
      svg("line", { class: "grid", x1: x(i), x2: x(i), y1: m.top, y2: m.top + h }, chart);
      const label = svg("text", { class: "axis", x: x(i), y: height - 6, "text-anchor": "middle" }, chart);
      label.textContent = localTime(new Date(t * 1000));
    }

    // Sends per second as one path of bars.
    let d = "";
    for (let i = 0; i < n; i++) {
      if (sends[i] > 0) {
        const top_ = y(sends[i]);
        d += `M${x(i).toFixed(1)} ${(m.top + h).toFixed(1)}V${top_.toFixed(1)}h${barWidth.toFixed(2)}V${(m.top + h).toFixed(1)}Z`;
      }
    }
    if (d) svg("path", { class: "bars", d }, chart);

    // The qps limit.
    svg("line", { class: "qps", x1: m.left, x2: m.left + w, y1: y(qps), y2: y(qps) }, chart);
    // Labelled in the right margin, where no bar can hide it.
    const qpsLabel = svg("text", { class: "qps-label", x: m.left + w + 6, y: y(qps) + 4 }, chart);
    qpsLabel.textContent = `qps ${qps}`;

    // Gateway rejections: red triangles on the top edge; replays: amber dots above their bar.
    for (let i = 0; i < n; i++) {
      const cx = x(i) + barWidth / 2;
      if (rejections[i] > 0) {
        const t = svg("path", { class: "rej", d: `M${cx - 4} ${m.top - 10}h8l-4 8Z` }, chart);
        svg("title", {}, t).textContent = `${rejections[i]} gateway rejection(s)`;
      }
      if (replays[i] > 0) {
        const c = svg("circle", { class: "rep", cx, cy: y(sends[i]) - 5, r: 3.5 }, chart);
        svg("title", {}, c).textContent = `${replays[i]} replay(s)`;
      }
    }
  }

  // -- polling ---------------------------------------------------------------------------------

  function setConnection(ok, why) {
    const dot = document.getElementById("connection");
    dot.className = `dot ${ok ? "live" : "down"}`;
    if (!ok) put(document, "updated", `no answer from the proxy (${why}); retrying`);
  }

  async function poll() {
    if (inflight) return;
    inflight = true;
    try {
      const response = await fetch(`/dashboard.json?seconds=${windowSeconds}`, { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const doc = await response.json();
      pollMs = Math.round((doc.poll_seconds || 1.5) * 1000);
      renderTop(doc);
      renderKeys(doc);
      setConnection(true);
    } catch (error) {
      setConnection(false, error.message);
    } finally {
      inflight = false;
      clearTimeout(timer);
      timer = setTimeout(poll, pollMs);
    }
  }

  function chooseWindow(seconds) {
    windowSeconds = seconds;
    for (const b of document.querySelectorAll("[data-window]")) {
      b.setAttribute("aria-pressed", String(Number(b.dataset.window) === seconds));
    }
    if (!inflight) {
      clearTimeout(timer);
      poll();
    } // else the poll under way reschedules itself and the next one uses the new window
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const b of document.querySelectorAll("[data-window]")) {
      b.addEventListener("click", () => chooseWindow(Number(b.dataset.window)));
    }
    poll();
  });
})();
