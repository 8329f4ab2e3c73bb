/* oneoff-audit dashboard: talks only to the public API, with the caller's bearer token.
 *
 * Routes live in the URL fragment so nothing about them reaches the server:
 *   #token=...                         (once: the token is moved to sessionStorage and removed from the URL)
 *   #/                                 choose an app
 *   #/apps/<app>?actor=&status=&from=&to=      the app's timeline
 *   #/apps/<app>/sessions/<session>    one session: metadata, integrity, replay or download
 *
 * Everything from the API is written with textContent (never as HTML).
 */
(function () {
  "use strict";

  var TOKEN_KEY = "oneoff-audit.token";
  var APPS_KEY = "oneoff-audit.recent-apps";
  var APP_RE = /^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$/;
  var SESSION_RE = /^[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?$/;
  var PAGE_SIZE = 50;
  var IDLE_LIMIT = 2;
  var PENDING_RETRY_MS = 3000;
  var STATUSES = ["succeeded", "failed", "killed", "abandoned", "incomplete"];

  var $ = function (id) { return document.getElementById(id); };
  var state = {
    token: null,
    gen: 0,              // bumps on every route change; stale async results are dropped
    timelineKey: null,   // app + filters of the rows on screen
    cursor: null,
    player: null,
    replay: null,        // {cast lines builder inputs, ...} of the open session
    timers: [],
  };

  /* ---------- small helpers ---------- */

  function el(tag, props, children) {
    var node = document.createElement(tag);
    if (props) {
      Object.keys(props).forEach(function (k) {
        if (k === "text") node.textContent = props[k];
        else if (k === "class") node.className = props[k];
        else if (k === "dataset") Object.assign(node.dataset, props[k]);
        else if (k.slice(0, 2) === "on") node.addEventListener(k.slice(2), props[k]);
        else node.setAttribute(k, props[k]);
      });
    }
    (children || []).forEach(function (c) {
      if (c !== null && c !== undefined) node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
  function say(text) { $("status").textContent = text || ""; }
  function show(id) {
    ["view-token", "view-home", "view-timeline", "view-session"].forEach(function (v) { $(v).hidden = v !== id; });
  }
  function later(fn, ms) { state.timers.push(setTimeout(fn, ms)); }
  function every(fn, ms) { state.timers.push(setInterval(fn, ms)); }
  function stopTimers() { state.timers.forEach(function (t) { clearTimeout(t); clearInterval(t); }); state.timers = []; }

  function fmtBytes(n) {
    if (typeof n !== "number") return "—";
    if (n < 1024) return n + " B";
    var units = ["KiB", "MiB", "GiB", "TiB"];
    var v = n / 1024, i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (v >= 100 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
  }

  function fmtDuration(s) {
    if (typeof s !== "number") return "—";
    if (s < 60) return (s < 10 ? s.toFixed(1) : Math.round(s)) + " s";
    var h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = Math.floor(s % 60);
    var pad = function (x) { return (x < 10 ? "0" : "") + x; };
    return h ? h + " h " + pad(m) + " m" : m + " m " + pad(sec) + " s";
  }

  function fmtClock(t) {
    var m = Math.floor(t / 60), s = t - m * 60;
    return (m < 10 ? "0" : "") + m + ":" + (s < 10 ? "0" : "") + s.toFixed(1);
  }

  function fmtTime(iso) {
    if (!iso) return "—";
    var m = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})/.exec(iso);
    return m ? m[1] + " " + m[2] : iso;
  }

  function localTitle(iso) {
    var d = new Date(iso);
    return isNaN(d) ? "" : "your local time: " + d.toLocaleString();
  }

  function b64bytes(b64) {
    var bin = atob(b64), out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  var utf8 = new TextDecoder("utf-8");
  /** A data value (str, or {b64} for bytes that are not UTF-8) as text for a terminal (invalid bytes as U+FFFD). */
  function dataText(d) {
    if (typeof d === "string") return d;
    if (d && typeof d.b64 === "string") return utf8.decode(b64bytes(d.b64));
    return "";
  }
  /** A data value for reading: invalid bytes shown as \xNN. */
  function dataVisible(d) {
    if (typeof d === "string") return d;
    if (d && typeof d.b64 === "string") {
      return Array.prototype.map.call(b64bytes(d.b64), function (b) {
        return "\\x" + (b < 16 ? "0" : "") + b.toString(16);
      }).join("");
    }
    return "";
  }

  var KEY_NAMES = { "\r": "⏎", "\n": "↵", "\t": "⇥", "\x7f": "⌫", "\b": "⌫", "\x1b[A": "↑", "\x1b[B": "↓",
    "\x1b[C": "→", "\x1b[D": "←", "\x1bOA": "↑", "\x1bOB": "↓", "\x1bOC": "→", "\x1bOD": "←", "\x1b": "⎋" };
  /** Typed input made visible: control keys as symbols or ^X. */
  function keysVisible(text) {
    return text.replace(/\x1b(\[|O)[A-D]|[\x00-\x1f\x7f]/g, function (k) {
      if (KEY_NAMES[k]) return KEY_NAMES[k];
      return "^" + String.fromCharCode(k.charCodeAt(0) + 64);
    });
  }

  var ANSI = /\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b\[[0-?]*[ -/]*[@-~]|\x1b[PX^_][^\x1b]*\x1b\\|\x1b[ -/]*[0-~]/g;
  /** Output as plain text for the transcript: escape sequences and stray control characters removed. */
  function plain(text) {
    return text.replace(ANSI, "").replace(/\r+\n/g, "\n").replace(/[\x00-\x08\x0b-\x1f\x7f]/g, "");
  }

  function shellWord(d) {
    if (typeof d !== "string") {
      var bytes = d && typeof d.b64 === "string" ? b64bytes(d.b64) : [];
      return "$'" + Array.prototype.map.call(bytes, function (b) {
        return "\\x" + (b < 16 ? "0" : "") + b.toString(16);
      }).join("") + "'";
    }
    if (d !== "" && /^[A-Za-z0-9_@%+=:,./-]+$/.test(d)) return d;
    if (/[\x00-\x1f\x7f]/.test(d)) {
      return "$'" + d.replace(/[\\']/g, "\\$&").replace(/[\x00-\x1f\x7f]/g, function (c) {
        var h = c.charCodeAt(0).toString(16);
        return "\\x" + (h.length < 2 ? "0" : "") + h;
      }) + "'";
    }
    return "'" + d.replace(/'/g, "'\\''") + "'";
  }
  function argvText(argv) { return (argv || []).map(shellWord).join(" "); }
  function clip(text, max) { return text.length > max ? text.slice(0, max - 1) + "…" : text; }

  function statusBadges(status, complete) {
    var out = [];
    if (status) out.push(el("span", { class: "badge " + status, text: status }));
    if (complete === false) out.push(el("span", { class: "badge incomplete", text: "incomplete" }));
    return out;
  }

  function exitText(exit) {
    if (!exit) return "—";
    if (exit.signal) return "signal " + exit.signal;
    if (exit.code === null || exit.code === undefined) return "—";
    return "code " + exit.code;
  }

  function errorMessage(body) {
    if (!body) return "";
    if (typeof body === "string") return body;
    if (typeof body.message === "string") return body.message;
    if (body.error && typeof body.error === "object" && typeof body.error.message === "string") return body.error.message;
    if (typeof body.error === "string") return body.error;
    return "";
  }

  /* ---------- API ---------- */

  function api(path) {
    var headers = { Accept: "application/json" };
    if (state.token) headers.Authorization = "Bearer " + state.token;
    return fetch(path, { headers: headers, cache: "no-store", credentials: "omit" }).then(function (res) {
      return res.text().then(function (text) {
        var body = null;
        try { body = text ? JSON.parse(text) : null; } catch (e) { body = text; }
        return { status: res.status, body: body };
      });
    }, function (err) {
      return { status: 0, body: { message: String(err && err.message || err) } };
    });
  }

  function appPath(app) { return "/apps/" + encodeURIComponent(app); }
  function sessionPath(app, sid) { return appPath(app) + "/sessions/" + encodeURIComponent(sid); }

  /** The API's answer shown as what it means: denied, not found, still recording, or an error. */
  function renderProblem(container, res, ctx) {
    clear(container);
    var kind, title, lines = [], action = null;
    var msg = errorMessage(res.body);
    if (res.status === 401) {
      kind = "denied"; title = "Not signed in";
      lines.push("The API did not accept the token" + (msg ? ": " + msg : "."));
      action = el("button", { type: "button", text: "Enter a token", onclick: function () { forgetToken(); } });
    } else if (res.status === 403) {
      kind = "denied"; title = "Access denied";
      lines.push("Your token may not read the app “" + ctx.app + "”.");
      lines.push("Ask for access to this app, or sign in with another token.");
    } else if (res.status === 404) {
      kind = "notfound"; title = "Not found";
      lines.push(ctx.session ? "There is no session “" + ctx.session + "” in the app “" + ctx.app + "”."
        : "Nothing was found" + (msg ? ": " + msg : "."));
    } else if (res.status === 202) {
      var assembling = res.body && res.body.status === "assembling";
      kind = "pending"; title = assembling ? "Being assembled" : "Still recording";
      lines.push(assembling
        ? "The session has ended; its log is being assembled, encrypted and filed."
        : "The session is still running: its log is filed once it ends.");
      lines.push("This page checks again every " + PENDING_RETRY_MS / 1000 + " seconds.");
    } else if (res.status === 400) {
      kind = "error"; title = "Rejected by the API";
      lines.push(msg || "The request was malformed.");
    } else if (res.status === 0) {
      kind = "error"; title = "The API is unreachable";
      lines.push(msg);
    } else {
      kind = "error"; title = "The API failed (HTTP " + res.status + ")";
      if (msg) lines.push(msg);
    }
    var box = el("div", { class: "problem " + kind, role: kind === "pending" ? "status" : "alert",
      "data-problem": String(res.status) }, [el("h2", { text: title })]);
    lines.forEach(function (l) { box.appendChild(el("p", { text: l })); });
    if (action) box.appendChild(el("p", null, [action]));
    container.appendChild(box);
    return box;
  }

  /* ---------- token and apps ---------- */

  function takeTokenFromFragment() {
    var m = /^#token=([^&]+)(?:&(.*))?$/.exec(location.hash);
    if (!m) return;
    try { sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1])); } catch (e) { state.token = decodeURIComponent(m[1]); }
    var rest = m[2] ? "#" + m[2] : "#/";
    history.replaceState(null, "", location.pathname + location.search + rest);
  }

  function loadToken() {
    try { state.token = sessionStorage.getItem(TOKEN_KEY) || state.token; } catch (e) { /* storage disabled */ }
    $("signout").hidden = !state.token;
  }

  function forgetToken() {
    try { sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* storage disabled */ }
    state.token = null;
    state.timelineKey = null;
    $("signout").hidden = true;
    route();
  }

  function recentApps() {
    try {
      var list = JSON.parse(localStorage.getItem(APPS_KEY) || "[]");
      return Array.isArray(list) ? list.filter(function (a) { return typeof a === "string" && APP_RE.test(a); }) : [];
    } catch (e) { return []; }
  }

  function rememberApp(app) {
    var list = [app].concat(recentApps().filter(function (a) { return a !== app; })).slice(0, 12);
    try { localStorage.setItem(APPS_KEY, JSON.stringify(list)); } catch (e) { /* storage disabled */ }
    fillApps();
  }

  function fillApps() {
    var apps = recentApps();
    var dl = clear($("app-list"));
    apps.forEach(function (a) { dl.appendChild(el("option", { value: a })); });
    var ul = clear($("recent-apps"));
    apps.forEach(function (a) { ul.appendChild(el("li", null, [el("a", { href: "#" + appPath(a), text: a })])); });
    if (!apps.length) ul.appendChild(el("li", { class: "muted", text: "(none yet)" }));
  }

  /* ---------- routing ---------- */

  function parseRoute() {
    var h = location.hash.replace(/^#/, "");
    var q = "", i = h.indexOf("?");
    if (i >= 0) { q = h.slice(i + 1); h = h.slice(0, i); }
    var parts = h.split("/").filter(Boolean).map(function (p) {
      try { return decodeURIComponent(p); } catch (e) { return p; }
    });
    if (parts[0] === "apps" && parts.length === 2) return { view: "timeline", app: parts[1], query: new URLSearchParams(q) };
    if (parts[0] === "apps" && parts.length === 4 && parts[2] === "sessions") {
      return { view: "session", app: parts[1], session: parts[3] };
    }
    return { view: "home" };
  }

  function route() {
    state.gen++;
    stopTimers();
    disposePlayer();
    say("");
    var r = parseRoute();
    if (!state.token) {
      show("view-token");
      $("token-input").focus();
      return;
    }
    if (r.view === "home") {
      var last = recentApps()[0];
      if (last && !route.visited) { route.visited = true; location.replace("#" + appPath(last)); return; }
      route.visited = true;
      show("view-home");
      return;
    }
    route.visited = true;
    $("app-input").value = r.app;
    if (!APP_RE.test(r.app)) {
      show("view-timeline");
      $("timeline-app").textContent = r.app;
      $("timeline").hidden = true; $("timeline-empty").hidden = true; $("load-more").hidden = true;
      renderProblem($("timeline-problem"), { status: 400, body: { message: "“" + r.app + "” is not an app id." } }, r);
      return;
    }
    if (r.view === "timeline") openTimeline(r);
    else openSession(r);
  }

  /* ---------- timeline ---------- */

  function localToUtc(value) {
    if (!value) return "";
    var d = new Date(value);   // a datetime-local value is read in the browser's time zone
    return isNaN(d) ? "" : d.toISOString().replace(/\.\d{3}Z$/, "Z");
  }
  function utcToLocal(iso) {
    var d = new Date(iso);
    if (isNaN(d)) return "";
    var p = function (x) { return (x < 10 ? "0" : "") + x; };
    return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + "T" + p(d.getHours()) + ":" +
      p(d.getMinutes()) + ":" + p(d.getSeconds());
  }

  function openTimeline(r) {
    show("view-timeline");
    $("timeline-app").textContent = r.app;
    document.title = r.app + " · oneoff-audit";
    var q = r.query;
    $("f-actor").value = q.get("actor") || "";
    $("f-status").value = STATUSES.indexOf(q.get("status")) >= 0 ? q.get("status") : "";
    $("f-from").value = q.get("from") ? utcToLocal(q.get("from")) : "";
    $("f-to").value = q.get("to") ? utcToLocal(q.get("to")) : "";
    var key = r.app + "?" + q.toString();
    if (key === state.timelineKey && $("timeline-rows").children.length) return;  // back from a session
    state.timelineKey = key;
    state.cursor = null;
    clear($("timeline-rows"));
    clear($("timeline-problem"));
    $("timeline").hidden = true;
    $("timeline-empty").hidden = true;
    $("load-more").hidden = true;
    loadPage(r, true);
  }

  function loadPage(r, first) {
    var gen = state.gen;
    var params = new URLSearchParams();
    ["actor", "status", "from", "to"].forEach(function (k) { if (r.query.get(k)) params.set(k, r.query.get(k)); });
    params.set("limit", String(PAGE_SIZE));
    if (!first && state.cursor) params.set("cursor", state.cursor);
    say(first ? "Loading sessions…" : "Loading more sessions…");
    $("load-more").disabled = true;
    return api(appPath(r.app) + "/sessions?" + params.toString()).then(function (res) {
      if (gen !== state.gen) return;
      $("load-more").disabled = false;
      if (res.status !== 200) {
        say("");
        state.timelineKey = null;
        $("load-more").hidden = true;
        renderProblem($("timeline-problem"), res, r);
        return;
      }
      if (first) rememberApp(r.app);
      var sessions = (res.body && res.body.sessions) || [];
      var tbody = $("timeline-rows");
      sessions.forEach(function (s) { tbody.appendChild(timelineRow(r.app, s)); });
      state.cursor = (res.body && (res.body.cursor || res.body.next_cursor)) || null;
      var skipped = (res.body && res.body.skipped) || [];
      if (skipped.length) {
        renderProblem($("timeline-problem"), { status: 500, body: { message: skipped.length +
          " index entr" + (skipped.length === 1 ? "y" : "ies") + " could not be read and " +
          (skipped.length === 1 ? "is" : "are") + " not listed: " +
          skipped.map(function (k) { return k.key + " (" + k.reason + ")"; }).join("; ") } }, r)
          .querySelector("h2").textContent = "Unreadable timeline entries";
      }
      $("load-more").hidden = !state.cursor;
      $("timeline").hidden = !tbody.children.length;
      $("timeline-empty").hidden = !!tbody.children.length;
      say(first ? tbody.children.length + " session" + (tbody.children.length === 1 ? "" : "s") +
        (state.cursor ? " shown, more available." : ".") : sessions.length + " more loaded.");
    });
  }

  /** A timeline cell; its content in one box so a narrow window can lay it out beside its label. */
  function cell(label, children, cls) {
    return el("td", { "data-label": label, class: cls || "" }, [el("div", { class: "cell" }, children)]);
  }

  function timelineRow(app, s) {
    var actor = s.actor || {};
    var command = s.command || {};
    var href = "#" + sessionPath(app, s.session_id);
    var targets = Object.keys(s.target || {}).sort().map(function (k) {
      return el("span", { class: "target", text: k + "=" + s.target[k] });
    });
    var tr = el("tr", { "data-session": s.session_id }, [
      cell("Started", [
        el("a", { href: href, title: localTitle(s.started_at), text: fmtTime(s.started_at) }),
        el("span", { class: "sub", text: s.session_id }),
      ], "when"),
      cell("Actor", [
        document.createTextNode(actor.name || actor.id || "—"),
        el("span", { class: "sub", text: [actor.name ? actor.id : null, actor.type, actor.source_ip]
          .filter(Boolean).join(" · ") }),
      ]),
      cell("Command", [
        el("code", { text: clip(argvText(command.argv), 120), title: argvText(command.argv) }),
        el("span", { class: "sub", text: command.tty ? "interactive (TTY)" : "no TTY" }),
      ], "cmd"),
      cell("Target", targets.length ? targets : ["—"]),
      cell("Duration", [fmtDuration(s.duration)]),
      cell("Exit", [exitText(s.exit)]),
      cell("Status", statusBadges(s.status, s.complete)),
      cell("Size", [el("span", { title: typeof s.size === "number" ? s.size + " bytes" : "", text: fmtBytes(s.size) })],
        "num"),
    ]);
    tr.addEventListener("click", function (ev) {
      if (ev.target.closest("a") || (window.getSelection && String(window.getSelection()))) return;
      location.hash = href;
    });
    return tr;
  }

  /* ---------- one session ---------- */

  function openSession(r) {
    show("view-session");
    $("session-id").textContent = r.session;
    var filters = state.timelineKey && state.timelineKey.indexOf(r.app + "?") === 0
      ? state.timelineKey.slice(r.app.length + 1) : "";
    $("back-link").href = "#" + appPath(r.app) + (filters ? "?" + filters : "");
    $("back-link").textContent = "← Back to the timeline of " + r.app;
    document.title = r.session + " · " + r.app + " · oneoff-audit";
    clear($("session-problem"));
    clear($("log-problem"));
    $("session-body").hidden = true;
    $("session-title").focus();
    if (!SESSION_RE.test(r.session)) {
      renderProblem($("session-problem"), { status: 400, body: { message: "“" + r.session + "” is not a session id." } }, r);
      return;
    }
    loadSession(r);
  }

  function loadSession(r) {
    var gen = state.gen;
    say("Loading the session…");
    api(sessionPath(r.app, r.session)).then(function (res) {
      if (gen !== state.gen) return;
      say("");
      if (res.status !== 200) {
        renderProblem($("session-problem"), res, r);
        if (res.status === 202) later(function () { if (gen === state.gen) loadSession(r); }, PENDING_RETRY_MS);
        return;
      }
      clear($("session-problem"));
      rememberApp(r.app);
      var parts = sessionParts(res.body);
      state.details = parts;
      renderMeta(r, parts);
      renderIntegrity(parts);
      $("session-body").hidden = false;
      $("access").open = false;
      clear($("access-rows"));
      clear($("access-problem"));
      loadLog(r);
    });
  }

  /** The session answer: {header, trailer (null when the log is too big to read whole), summary (the
   *  timeline entry, null if missing), integrity, retention}. */
  function sessionParts(body) {
    body = body || {};
    return {
      header: body.header || {},
      trailer: body.trailer || {},
      entry: body.summary || {},
      integrity: body.integrity || {},
      retention: body.retention || null,
      body: body,
    };
  }

  function pick() {
    for (var i = 0; i < arguments.length; i++) if (arguments[i] !== undefined && arguments[i] !== null) return arguments[i];
    return null;
  }

  function kv(dl, rows) {
    clear(dl);
    rows.forEach(function (row) {
      if (row[1] === null || row[1] === undefined || row[1] === "") return;
      dl.appendChild(el("dt", { text: row[0] }));
      var dd = el("dd");
      if (Array.isArray(row[1])) row[1].forEach(function (c) { dd.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
      else if (row[1] instanceof Node) dd.appendChild(row[1]);
      else dd.textContent = String(row[1]);
      dl.appendChild(dd);
    });
  }

  function renderMeta(r, p) {
    var h = p.header, t = p.trailer, e = p.entry;
    var actor = h.actor || e.actor || {};
    var command = h.command || e.command || {};
    var target = h.target || e.target || {};
    var agent = h.agent || {};
    var status = pick(t.status, e.status);
    var size = command.term_size;
    kv($("meta"), [
      ["Status", statusBadges(status, pick(t.complete, e.complete))],
      ["Actor", (actor.name ? actor.name + " (" + actor.id + ")" : actor.id) + (actor.type ? ", " + actor.type : "")],
      ["Source IP", actor.source_ip],
      ["Command", el("code", { text: argvText(command.argv) })],
      ["Terminal", command.tty ? "interactive (TTY)" + (size ? ", " + size.cols + "×" + size.rows : "") : "no TTY"],
      ["Environment keys", (command.env_keys || []).length ? el("details", null, [
        el("summary", { text: command.env_keys.length + " variable names (values are never recorded)" }),
        el("p", { class: "env-keys", text: command.env_keys.join(" ") }),
      ]) : "none"],
      ["App", h.app || r.app],
      ["Target", Object.keys(target).sort().map(function (k) { return k + "=" + target[k]; }).join("  ") || null],
      ["Started", fmtTime(pick(h.started_at, e.started_at)) + " UTC"],
      ["Ended", pick(t.ended_at, e.ended_at) ? fmtTime(pick(t.ended_at, e.ended_at)) + " UTC" : "—"],
      ["Duration", fmtDuration(pick(t.duration, e.duration))],
      ["Exit", exitText(pick(t.exit, e.exit)) + (t.reason ? " (" + t.reason + ")" : "")],
      ["Recorded by", agent.hostname ? agent.hostname + " (agent " + agent.version + ", pid " + agent.pid + ")" : null],
    ]);
  }

  function renderIntegrity(p) {
    var t = p.trailer, e = p.entry, g = p.integrity;
    var complete = pick(g.complete, t.complete, e.complete);
    var gaps = g.gaps || t.gaps || { missing: [], corrupt: [] };
    var problems = g.problems || [];
    var summary = $("integrity-summary");
    var chunks = t.chunk_count, expected = t.expected_chunk_count;
    if (complete === true && !problems.length) {
      summary.className = "integrity ok";
      summary.textContent = "Complete: every chunk present, in order, hash chain intact" +
        (typeof chunks === "number" ? " (" + chunks + " chunk" + (chunks === 1 ? "" : "s") + ")." : ".");
    } else if (complete === false || problems.length) {
      summary.className = "integrity bad";
      var what = [];
      if ((gaps.missing || []).length) what.push("missing chunks " + gaps.missing.join(", "));
      if ((gaps.corrupt || []).length) {
        what.push("corrupt chunks " + gaps.corrupt.map(function (c) { return c.seq + " (" + c.reason + ")"; }).join(", "));
      }
      if (complete === false && p.body.trailer && expected === null) what.push("no close marker: the runner never reported the end");
      what = what.concat(problems);
      summary.textContent = (complete === false ? "Incomplete: " : "Complete, but: ") + (what.join("; ") || "see below") + ".";
    } else {
      summary.className = "integrity";
      summary.textContent = "The API gave no integrity summary.";
    }
    var bytes = t.bytes || {};
    var ret = p.retention;
    kv($("integrity"), [
      ["Chunks", typeof chunks === "number" ? chunks + (typeof expected === "number" ? " of " + expected + " expected" : " (expected: unknown)") : null],
      ["Chain SHA-256", pick(g.chain_sha256, t.chain_sha256) ? el("code", { text: pick(g.chain_sha256, t.chain_sha256) }) : null],
      ["Events", pick(g.event_count, t.event_count, e.event_count)],
      ["Bytes", bytes.i !== undefined ? "stdin " + bytes.i + " · stdout " + bytes.o + " · stderr " + bytes.e : null],
      ["Input withheld", t.withheld_input_bytes ? t.withheld_input_bytes + " bytes (typed with echo off)" : null],
      ["Bytes lost", t.lost_bytes ? t.lost_bytes + " bytes" : null],
      ["Log (plaintext)", typeof g.plaintext_size === "number" ? fmtBytes(g.plaintext_size) + " (" + g.plaintext_size + " bytes)" : null],
      ["Plaintext SHA-256", g.plaintext_sha256 ? el("code", { text: g.plaintext_sha256 }) : null],
      ["Encrypted file", typeof g.ciphertext_size === "number" ? fmtBytes(g.ciphertext_size) + " (" + g.ciphertext_size + " bytes)" : null],
      ["Encrypted SHA-256", g.ciphertext_sha256 ? el("code", { text: g.ciphertext_sha256 }) : null],
      ["Signed manifest", g.manifest === true ? "present" : g.manifest === false ? "MISSING" : null],
      ["Checked by the API", g.verified],
      ["Retention", ret && ret.mode ? ret.mode.toLowerCase() + " until " + fmtTime(ret.retain_until) + " UTC" : ret ? "none" : null],
      ["Legal hold", ret ? (ret.legal_hold ? "on" : "off") : null],
      ["Filed", pick(t.filed_at, e.filed_at) ? fmtTime(pick(t.filed_at, e.filed_at)) + " UTC" : null],
    ]);
  }

  function loadLog(r) {
    var gen = state.gen;
    $("log-inline").hidden = true;
    $("log-download").hidden = true;
    say("Loading the log…");
    api(sessionPath(r.app, r.session) + "/log").then(function (res) {
      if (gen !== state.gen) return;
      say("");
      if (res.status !== 200) {
        renderProblem($("log-problem"), res, r);
        if (res.status === 202) later(function () { if (gen === state.gen) loadLog(r); }, PENDING_RETRY_MS);
        return;
      }
      clear($("log-problem"));
      if (res.body && res.body.download_url) showDownload(r, res.body);
      else if (res.body && Array.isArray(res.body.events)) showReplay(r, res.body);
      else renderProblem($("log-problem"), { status: 500, body: { message: "unexpected answer from /log" } }, r);
    });
  }

  /* ---------- access audit ---------- */

  var HOW = { details: "viewed the details", inline: "viewed the log", url: "got a download link",
    asciicast: "exported as asciicast", "asciicast-url": "got an asciicast download link" };

  function loadAccess(r, more) {
    var gen = state.gen;
    var q = new URLSearchParams({ limit: "50" });
    if (more && state.accessCursor) q.set("cursor", state.accessCursor);
    if (!more) clear($("access-rows"));
    $("access-more").hidden = true;
    api(sessionPath(r.app, r.session) + "/access?" + q.toString()).then(function (res) {
      if (gen !== state.gen) return;
      if (res.status !== 200) { renderProblem($("access-problem"), res, r); return; }
      clear($("access-problem"));
      var tbody = $("access-rows");
      ((res.body && res.body.access) || []).forEach(function (a) {
        if (a.invalid) {
          tbody.appendChild(el("tr", { class: "bad" }, [el("td", { colspan: "4", text: "damaged record " + a.record + ": " + a.invalid })]));
          return;
        }
        var who = a.who || {};
        tbody.appendChild(el("tr", null, [
          el("td", { "data-label": "When", text: fmtTime(a.at) }),
          el("td", { "data-label": "Who", text: (who.name ? who.name + " (" + who.subject + ")" : who.subject || "—") +
            (who.admin ? ", admin" : "") }),
          el("td", { "data-label": "How", text: HOW[a.how] || a.how || "—" }),
          el("td", { "data-label": "From", text: a.source_ip || "—" }),
        ]));
      });
      state.accessCursor = (res.body && res.body.cursor) || null;
      $("access-more").hidden = !state.accessCursor;
    });
  }

  /* ---------- replay ---------- */

  function markerLabel(d) {
    if (!d || typeof d !== "object") return String(d);
    switch (d.kind) {
      case "input-withheld": return "input withheld: " + d.bytes + " bytes typed with echo off";
      case "capture-gap": return "capture gap: " + d.bytes + " bytes lost";
      case "gap": return "missing chunk " + d.seq + (d.reason ? " (" + d.reason + ")" : "");
      default: return (d.kind || "note") + " " + JSON.stringify(d);
    }
  }

  /** The log's events, prepared once: original times, and the typed input and transcript pieces. */
  function prepareReplay(log) {
    var header = log.header || {};
    var command = header.command || {};
    var tty = command.tty !== false;
    var size = command.term_size || {};
    var events = log.events.filter(function (e) { return Array.isArray(e) && e.length >= 3; });
    var rows = size.rows > 0 ? size.rows : 0;
    if (!rows) {  // no terminal: as many rows as the output has lines, 4 to 24
      var lines = 1;
      events.forEach(function (e) {
        if ((e[1] === "o" || e[1] === "e") && typeof e[2] === "string") lines += (e[2].match(/\n/g) || []).length;
      });
      rows = Math.min(24, Math.max(4, lines + 1));
    }
    return {
      header: header,
      tty: tty,
      cols: size.cols > 0 ? size.cols : 80,
      rows: rows,
      events: events,
      started: Date.parse(header.started_at),
    };
  }

  /** Original event times mapped to replay times: pauses longer than `limit` shortened to it. */
  function timeMap(events, limit) {
    var out = new Array(events.length), prev = 0, at = 0;
    for (var i = 0; i < events.length; i++) {
      var t = Number(events[i][0]) || 0;
      var gap = Math.max(0, t - prev);
      at += limit ? Math.min(gap, limit) : gap;
      out[i] = Math.round(at * 1e6) / 1e6;
      prev = Math.max(prev, t);
    }
    return out;
  }

  /** asciicast v2 for the player: stdout and stderr as output, stdin as input, notes as markers. */
  function buildCast(rp, times) {
    var lines = [JSON.stringify({
      version: 2, width: rp.cols, height: rp.rows,
      timestamp: isNaN(rp.started) ? undefined : Math.floor(rp.started / 1000),
      title: argvText((rp.header.command || {}).argv),
    })];
    rp.events.forEach(function (ev, i) {
      var s = ev[1], d = ev[2], t = times[i];
      if (s === "o" || s === "e") {
        var text = dataText(d);
        if (!rp.tty) text = text.replace(/\r?\n/g, "\r\n");  // no terminal added CR for a pipe
        lines.push(JSON.stringify([t, "o", text]));
      } else if (s === "i") {
        lines.push(JSON.stringify([t, "i", dataText(d)]));
      } else if (s === "r" && typeof d === "string" && /^\d+x\d+$/.test(d)) {
        lines.push(JSON.stringify([t, "r", d]));
      } else if (s === "m") {
        lines.push(JSON.stringify([t, "m", markerLabel(d)]));
      }
    });
    return lines.join("\n") + "\n";
  }

  function showReplay(r, log) {
    var rp = prepareReplay(log);
    state.replay = rp;
    $("log-inline").hidden = false;
    renderInputs(rp);
    // with a terminal the typed input is echoed in the output already: show it apart only on request
    $("show-stdin").checked = !rp.tty;
    renderTranscript(rp);
    mountPlayer(0, false);
  }

  function disposePlayer() {
    if (state.player) {
      try { state.player.dispose(); } catch (e) { /* already gone */ }
    }
    state.player = null;
    clear($("player"));
  }

  function currentMap() {
    var rp = state.replay;
    var limit = $("idle").checked ? IDLE_LIMIT : 0;
    if (!rp.maps) rp.maps = {};
    if (!rp.maps[limit]) rp.maps[limit] = { times: timeMap(rp.events, limit) };
    var m = rp.maps[limit];
    if (!m.cast) m.cast = buildCast(rp, m.times);
    return m;
  }

  /** Replay time <-> original time, through the nearest earlier event. */
  function convert(fromTimes, toTimes, t) {
    var lo = 0, hi = fromTimes.length - 1, best = -1;
    while (lo <= hi) {
      var mid = (lo + hi) >> 1;
      if (fromTimes[mid] <= t) { best = mid; lo = mid + 1; } else hi = mid - 1;
    }
    if (best < 0) return t;
    return toTimes[best] + Math.min(t - fromTimes[best], (toTimes[best + 1] !== undefined ? toTimes[best + 1] : Infinity) - toTimes[best]);
  }

  function originalTimes() {
    var rp = state.replay;
    if (!rp.orig) rp.orig = rp.events.map(function (e) { return Number(e[0]) || 0; });
    return rp.orig;
  }

  function mountPlayer(startAt, autoPlay) {
    if (!window.AsciinemaPlayer) {
      renderProblem($("log-problem"), { status: 500, body: { message:
        "The terminal player is missing (static/vendor/asciinema-player.min.js): run `make setup`." } }, {});
      return;
    }
    disposePlayer();
    var m = currentMap();
    $("player").style.maxWidth = Math.max(36, state.replay.cols * 0.72) + "rem";
    state.player = window.AsciinemaPlayer.create({ data: m.cast }, $("player"), {
      speed: Number($("speed").value) || 1,
      autoPlay: !!autoPlay && !startAt,
      preload: true,  // the data is already here
      fit: "width",
      controls: true,
      keystrokeOverlay: true,
      terminalFontSize: "small",
      terminalLineHeight: 1.4,
    });
    var p = state.player;
    state.playing = !!autoPlay;
    state.ended = false;
    var on = function (names, fn) {
      names.forEach(function (n) { p.addEventListener(n, function () { if (p === state.player) fn(n); }); });
    };
    on(["play", "playing"], function () { state.playing = true; state.ended = false; });
    on(["pause", "ended"], function (n) { state.playing = false; state.ended = n === "ended"; });
    if (startAt) {  // the player's own startAt does not draw that frame until played: seek explicitly
      Promise.resolve(p.seek(startAt)).then(function () { return autoPlay ? p.play() : null; })
        .catch(function () { /* disposed meanwhile */ });
    }
  }

  /** Recreate the player with new options at the same moment of the session. */
  function remountPlayer(prevTimes) {
    if (!state.replay || !state.player) return;
    var now = 0, playing = false;
    try {  // after the end the player's clock reads 0: stay at the end
      now = (state.ended ? state.player.getDuration() : state.player.getCurrentTime()) || 0;
    } catch (e) { now = 0; }
    playing = !!state.playing;
    var orig = prevTimes ? convert(prevTimes, originalTimes(), now) : null;
    var m = currentMap();
    var at = orig === null ? now : convert(originalTimes(), m.times, orig);
    mountPlayer(at, playing);
  }

  function seekTo(originalT) {
    if (!state.player) return;
    var m = currentMap();
    var t = Math.max(0, convert(originalTimes(), m.times, originalT) - 0.05);
    var p = state.player;
    Promise.resolve(p.seek(t)).then(function () { return p.play(); }).catch(function () { /* player gone */ });
    $("player").scrollIntoView({ block: "nearest" });
  }

  /** Typed input grouped into lines (split at Enter or a pause), each a button that jumps the replay there. */
  function renderInputs(rp) {
    var list = clear($("input-list"));
    var group = null;
    var flush = function () {
      if (!group) return;
      var t = group.t, label = group.text;
      list.appendChild(el("li", null, [el("button", {
        type: "button", title: "Replay from " + fmtClock(t), "aria-label": "At " + fmtClock(t) + " typed: " + label,
        onclick: function () { seekTo(t); },
      }, [el("span", { class: "t", text: fmtClock(t) }), el("span", { class: "typed", text: label })])]));
      group = null;
    };
    rp.events.forEach(function (ev) {
      var t = Number(ev[0]) || 0;
      if (ev[1] === "i") {
        var text = keysVisible(dataVisible(ev[2]));
        if (group && t - group.last > 2) flush();
        if (!group) group = { t: t, text: "", last: t };
        group.text += text;
        group.last = t;
        if (/[⏎↵]$/.test(text)) flush();
      } else if (ev[1] === "m") {
        flush();
        var label = markerLabel(ev[2]);
        list.appendChild(el("li", null, [el("button", {
          type: "button", title: "Replay from " + fmtClock(t), onclick: function () { seekTo(t); },
        }, [el("span", { class: "t", text: fmtClock(t) }), el("span", { class: "note", text: label })])]));
      }
    });
    flush();
    if (!list.children.length) list.appendChild(el("li", { class: "muted", text: "No input was typed." }));
  }

  /** Every event as text: stdin, stdout, stderr and notes each styled apart; escape sequences removed. */
  function renderTranscript(rp) {
    var pre = clear($("transcript"));
    var pieces = [];
    rp.events.forEach(function (ev) {
      var s = ev[1], text;
      if (s === "o" || s === "e") text = dataText(ev[2]);
      else if (s === "i") { if (!$("show-stdin").checked) return; text = dataVisible(ev[2]); }
      else if (s === "m") text = "[" + markerLabel(ev[2]) + "]\n";
      else return;
      var last = pieces[pieces.length - 1];
      if (last && last[0] === s) last[1] += text;
      else pieces.push([s, text]);
    });
    var frag = document.createDocumentFragment();
    var atLineStart = true;
    pieces.forEach(function (p) {
      var s = p[0], text = s === "i" ? keysVisible(p[1]) : s === "m" ? p[1] : plain(p[1]);
      if (s === "i" && !rp.tty && /[\r\n]$/.test(p[1])) text += "\n";
      if (s === "m" && !atLineStart) text = "\n" + text;  // notes stand on their own lines
      if (!text) return;
      atLineStart = text.slice(-1) === "\n";
      var title = { i: "stdin (typed)", o: "stdout", e: "stderr", m: "note" }[s];
      frag.appendChild(el("span", { class: s, title: title, text: text }));
    });
    pre.appendChild(frag);
    if (!pieces.length) pre.textContent = "(no output)";
  }

  /* ---------- download ---------- */

  function showDownload(r, d) {
    var box = $("log-download");
    box.hidden = false;
    var file = r.session + ".jsonl.enc";
    var link = $("download-link");
    link.href = d.download_url;
    link.setAttribute("download", file);
    link.removeAttribute("aria-disabled");
    link.textContent = "Download encrypted log (" + fmtBytes(d.size) + ")";
    var plainSize = state.details && state.details.integrity.plaintext_size;
    $("download-why").textContent = "This log is " + (typeof plainSize === "number" ? fmtBytes(plainSize) + " " : "") +
      "too big to show here: the API returns it as an encrypted file behind a signed link instead.";
    kv($("download-facts"), [
      ["File", el("code", { text: file })],
      ["Size", typeof d.size === "number" ? d.size + " bytes (encrypted)" : null],
      ["SHA-256", d.sha256 ? el("code", { text: d.sha256 }) : null],
      ["Encryption", d.encryption === "aws-encryption-sdk" ? "AWS Encryption SDK message (KMS key of the audit bucket)"
        : d.encryption],
    ]);
    $("decrypt-command").textContent = decryptCommand(r, file);
    var renew = $("download-renew");
    renew.hidden = true;
    renew.onclick = function () { stopTimers(); loadLog(r); };
    var expires = Date.now() + (Number(d.expires_in) || 0) * 1000;
    var tick = function () {
      var left = Math.round((expires - Date.now()) / 1000);
      if (left > 0) {
        $("download-expiry").textContent = "link valid for " + fmtDuration(left).replace(/\.0 s$/, " s");
      } else {
        $("download-expiry").textContent = "link expired";
        link.removeAttribute("href");
        link.setAttribute("aria-disabled", "true");
        renew.hidden = false;
        stopTimers();
      }
    };
    if (d.expires_in) { tick(); every(tick, 1000); }
  }

  /** The auditor CLI's commands for the downloaded file: decrypt (bound to this app and session), then verify. */
  function decryptCommand(r, file) {
    var out = file.replace(/\.enc$/, "");
    var sha = state.details && state.details.integrity.plaintext_sha256;
    return "oneoff-audit decrypt " + shellWord(file) + " -o " + shellWord(out) + " --app " + shellWord(r.app) +
      " --session " + shellWord(r.session) + "\n" +
      "oneoff-audit verify " + shellWord(out) + (sha ? " --sha256 " + sha : "");
  }

  /* ---------- wiring ---------- */

  function init() {
    takeTokenFromFragment();
    loadToken();
    fillApps();
    $("token-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var token = $("token-input").value.trim();
      if (!token) return;
      try { sessionStorage.setItem(TOKEN_KEY, token); } catch (e) { state.token = token; }
      $("token-input").value = "";
      loadToken();
      state.timelineKey = null;
      route();
    });
    $("signout").addEventListener("click", forgetToken);
    $("app-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var app = $("app-input").value.trim();
      if (!APP_RE.test(app)) { $("app-input").reportValidity(); return; }
      var target = "#" + appPath(app);
      if (location.hash === target) { state.timelineKey = null; route(); } else location.hash = target;
    });
    $("filters").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var r = parseRoute();
      var q = new URLSearchParams();
      var actor = $("f-actor").value.trim();
      if (actor) q.set("actor", actor);
      if ($("f-status").value) q.set("status", $("f-status").value);
      if (localToUtc($("f-from").value)) q.set("from", localToUtc($("f-from").value));
      if (localToUtc($("f-to").value)) q.set("to", localToUtc($("f-to").value));
      var target = "#" + appPath(r.app) + (q.toString() ? "?" + q.toString() : "");
      state.timelineKey = null;
      if (location.hash === target) route(); else location.hash = target;
    });
    $("filters").addEventListener("reset", function () {
      var r = parseRoute();
      state.timelineKey = null;
      setTimeout(function () { location.hash = "#" + appPath(r.app); }, 0);
    });
    $("show-stdin").addEventListener("change", function () { if (state.replay) renderTranscript(state.replay); });
    $("load-more").addEventListener("click", function () { loadPage(parseRoute(), false); });
    $("access").addEventListener("toggle", function () {
      var r = parseRoute();
      if (!$("access").open || r.view !== "session") return;
      loadAccess(r, false);  // fresh each time it is opened: it grows as people look
    });
    $("access-more").addEventListener("click", function () { loadAccess(parseRoute(), true); });
    $("speed").addEventListener("change", function () { remountPlayer(null); });
    $("idle").addEventListener("change", function () {
      if (!state.replay) return;
      var prev = state.replay.maps && state.replay.maps[$("idle").checked ? 0 : IDLE_LIMIT];
      remountPlayer(prev ? prev.times : null);
    });
    document.addEventListener("click", function (ev) {
      var b = ev.target.closest("button.copy");
      if (!b) return;
      var text = $(b.dataset.copy).textContent;
      var done = function () { b.textContent = "Copied"; setTimeout(function () { b.textContent = "Copy"; }, 1500); };
      if (navigator.clipboard) navigator.clipboard.writeText(text).then(done, function () { selectText(b.dataset.copy); });
      else selectText(b.dataset.copy);
    });
    window.addEventListener("hashchange", route);
    route();
  }

  function selectText(id) {
    var range = document.createRange();
    range.selectNodeContents($(id));
    var sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }

  document.addEventListener("DOMContentLoaded", init);
})();
