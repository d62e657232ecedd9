// streamherd dashboard: reads the public API (/api/v1) and the live event WebSocket.
// No build step, no dependencies. Data is only ever put into the page as text nodes.

const API = new URL("../api/v1/", location.href);
const TOKEN_KEY = "streamherd.adminToken";
const WS_PROTOCOL = "streamherd.v1";
const WS_BEARER_PREFIX = "streamherd.bearer.";

const DEBOUNCE_MS = 400;          // a burst of events costs one refresh
const TYPING_MS = 300;            // a search or owner is sent once typing pauses
const MIN_REFRESH_GAP_MS = 1000;  // and a view is refreshed at most once a second
const FALLBACK_POLL_MS = { cluster: 15000, workers: 15000, streams: 30000 };
const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 15000;
const FEED_MAX = 300;
const FEED_BACKFILL = 50;
const WORKER_ROWS_MAX = 1000;

// ---------------------------------------------------------------------------- state
const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  auth: "unknown",            // unknown | open | token | needed
  cluster: null,
  workers: [],
  streams: { items: [], cursors: [null], page: 0, next: null, single: null },
  problems: { api: null, db: null, ws: null, shutdown: null },
  apiAttempt: 0,
  apiRetryTimer: null,
  ws: null,
  wsAttempt: 0,
  wsTimer: null,
  lastEventId: null,
  lastBeatAt: null,
  feedPaused: false,
  superseded: new Map(),      // worker id -> the last worker_superseded event's data
  pending: new Set(),
  debounceTimer: null,
  inFlight: new Set(),
  lastRefresh: { cluster: 0, workers: 0, streams: 0 },
};

// ---------------------------------------------------------------------------- DOM helpers
const $ = (id) => document.getElementById(id);

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function badge(text, kind) {
  return h("span", { class: `badge badge-${kind || text}` }, text);
}

function bar(fraction, label, kind) {
  const fill = h("span", { class: `bar-fill ${kind || ""}` });
  fill.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
  return h("span", { class: "bar", title: label }, fill);
}

function age(iso) {
  if (!iso) return null;
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  return seconds;
}

function formatAge(seconds) {
  if (seconds === null || Number.isNaN(seconds)) return "—";
  if (seconds < 60) return `${Math.floor(seconds)}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${Math.floor(seconds % 60)}s`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h ${Math.floor((seconds % 3600) / 60)}m`;
  return `${Math.floor(seconds / 86400)}d ${Math.floor((seconds % 86400) / 3600)}h`;
}

function clockTime(iso) {
  const date = iso ? new Date(iso) : new Date();
  return date.toLocaleTimeString([], { hour12: false });
}

function formatNumber(n) {
  return typeof n === "number" ? n.toLocaleString() : "—";
}

// ---------------------------------------------------------------------------- API
class ApiError extends Error {
  constructor(kind, message, status, code) {
    super(message);
    this.kind = kind;        // network | unauthorized | unavailable | http
    this.status = status;
    this.code = code;
  }
}

async function api(path, { method = "GET", body, token = state.token } = {}) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(new URL(path, API), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer",
    });
  } catch (err) {
    throw new ApiError("network", "the orchestrator does not answer", 0);
  }
  let payload = null;
  try {
    payload = await response.json();
  } catch (err) {
    payload = null;
  }
  if (response.ok) return payload;
  const error = (payload && payload.error) || {};
  const message = error.message || `HTTP ${response.status}`;
  if (response.status === 401) throw new ApiError("unauthorized", message, 401, error.code);
  if (response.status === 503) throw new ApiError("unavailable", message, 503, error.code);
  if (response.status >= 502 && response.status <= 504) {
    throw new ApiError("network", message, response.status, error.code);
  }
  throw new ApiError("http", message, response.status, error.code);
}

// Every data call goes through here: outages become the banner, 401 the sign-in dialog.
async function load(path, options) {
  try {
    const result = await api(path, options);
    apiRecovered();
    return result;
  } catch (err) {
    if (err instanceof ApiError) {
      if (err.kind === "unauthorized") signedOut("The admin token was refused; enter it again.");
      else if (err.kind === "network" || err.kind === "unavailable") apiFailed(err);
    }
    throw err;
  }
}

function backoff(attempt) {
  const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** attempt);
  return Math.round(delay * (0.5 + Math.random() * 0.5));
}

function apiFailed(err) {
  if (err.kind === "unavailable") {
    state.problems.db = err.message;
    state.problems.api = null;
  } else {
    state.problems.api = err.message;
  }
  renderBanner();
  if (state.apiRetryTimer) return;
  const delay = backoff(state.apiAttempt++);
  state.apiRetryTimer = setTimeout(() => {
    state.apiRetryTimer = null;
    if (state.auth === "unknown") start();
    else refresh(["cluster", "workers", "streams"], true);
  }, delay);
}

function apiRecovered() {
  state.apiAttempt = 0;
  if (state.problems.api || state.problems.db) {
    state.problems.api = null;
    state.problems.db = null;
    state.problems.shutdown = null;
    renderBanner();
  }
}

// ---------------------------------------------------------------------------- banner
function renderBanner() {
  const p = state.problems;
  const banner = $("banner");
  let text = null;
  let level = "error";
  if (p.api) {
    text = `Orchestrator unavailable (${p.api}). Retrying automatically; the page recovers by itself.`;
  } else if (p.shutdown) {
    text = `The orchestrator is shutting down (${p.shutdown}). Reconnecting when it returns.`;
  } else if (p.db) {
    text = `Database unavailable: ${p.db}. The orchestrator cannot read its catalogue; retrying.`;
  } else if (p.ws && state.auth !== "needed") {
    text = `Live updates interrupted (${p.ws}). Reconnecting; figures may be stale.`;
    level = "warning";
  }
  banner.hidden = text === null;
  banner.className = `banner banner-${level}`;
  banner.textContent = text || "";
  document.body.classList.toggle("degraded", text !== null);
}

// ---------------------------------------------------------------------------- auth
async function start() {
  // With no tokens configured the API answers without one: then no sign-in at all.
  try {
    await api("cluster", { token: state.token });
    apiRecovered();
    signedIn(state.token ? "token" : "open");
  } catch (err) {
    if (err.kind === "unauthorized") {
      if (state.token) signedOut("The stored admin token was refused; enter it again.");
      else signedOut(null);
    } else if (err.kind === "network" || err.kind === "unavailable") {
      apiFailed(err);
    } else {
      state.problems.api = err.message;
      renderBanner();
    }
  }
}

function signedIn(mode) {
  state.auth = mode;
  $("login").open && $("login").close();
  $("app").hidden = false;
  $("rebalance").hidden = false;
  $("sign-out").hidden = mode !== "token";
  $("auth-mode").textContent = mode === "open" ? "no token configured (loopback)" : "";
  refresh(["cluster", "workers", "streams"], true);
  connectEvents(true);
}

function signedOut(message) {
  state.auth = "needed";
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  closeEvents();
  // Nothing of the fleet stays on the page without a valid token.
  state.cluster = null;
  state.workers = [];
  state.streams.items = [];
  state.streams.single = null;
  for (const id of ["cluster", "feed"]) $(id).replaceChildren();
  for (const id of ["workers", "streams"]) $(id).tBodies[0].replaceChildren();
  $("app").hidden = true;
  $("rebalance").hidden = true;
  $("sign-out").hidden = true;
  state.problems.ws = null;
  renderBanner();
  const error = $("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  if (!$("login").open) $("login").showModal();
  $("login-token").focus();
}

async function submitToken(event) {
  event.preventDefault();
  const token = $("login-token").value.trim();
  if (!token) return;
  try {
    await api("cluster", { token });
  } catch (err) {
    const error = $("login-error");
    error.hidden = false;
    error.textContent = err.kind === "unauthorized" ? "That token was refused." : err.message;
    return;
  }
  $("login-token").value = "";
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  apiRecovered();
  signedIn("token");
}

// ---------------------------------------------------------------------------- refresh
function schedule(views) {
  for (const view of views) state.pending.add(view);
  if (state.debounceTimer) return;
  state.debounceTimer = setTimeout(() => {
    state.debounceTimer = null;
    const due = [...state.pending];
    state.pending.clear();
    refresh(due, false);
  }, DEBOUNCE_MS);
}

function refresh(views, force) {
  if (state.auth !== "open" && state.auth !== "token") return;
  for (const view of views) {
    const since = Date.now() - state.lastRefresh[view];
    if (state.inFlight.has(view) || (!force && since < MIN_REFRESH_GAP_MS)) {
      // Coming round again once the running (or recent) refresh is done.
      setTimeout(() => schedule([view]), Math.max(DEBOUNCE_MS, MIN_REFRESH_GAP_MS - since));
      continue;
    }
    state.inFlight.add(view);
    state.lastRefresh[view] = Date.now();
    LOADERS[view]()
      .catch((err) => {
        if (err instanceof ApiError && err.kind === "http") toast(`${view}: ${err.message}`, "error");
      })
      .finally(() => state.inFlight.delete(view));
  }
}

const LOADERS = {
  async cluster() {
    state.cluster = await load("cluster");
    renderCluster();
  },
  async workers() {
    const answer = await load("workers");
    state.workers = answer.items || [];
    renderWorkers();
  },
  async streams() {
    const s = state.streams;
    if (s.single !== null) {
      try {
        s.items = [await load(`streams/${s.single}`)];
      } catch (err) {
        if (err.status === 404) s.items = [];
        else throw err;
      }
      s.next = null;
      renderStreams();
      return;
    }
    const params = new URLSearchParams({ limit: $("stream-limit").value });
    const status = $("stream-status").value;
    const owner = $("stream-owner").value.trim();
    const search = $("stream-search").value.trim();
    if (status) params.set("status", status);
    if (owner) params.set("owner", owner);
    if (search) params.set("q", search);
    const cursor = s.cursors[s.page];
    if (cursor) params.set("cursor", cursor);
    const page = await load(`streams?${params}`);
    s.items = page.items || [];
    s.next = page.next_cursor || null;
    renderStreams();
  },
};

function fallbackPolls() {
  for (const [view, every] of Object.entries(FALLBACK_POLL_MS)) {
    setInterval(() => {
      if (document.hidden) return;
      if (Date.now() - state.lastRefresh[view] >= every - 50) refresh([view], false);
    }, every);
  }
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) schedule(["cluster", "workers", "streams"]);
  });
}

// ---------------------------------------------------------------------------- cluster
function renderCluster() {
  const c = state.cluster;
  if (!c) return;
  const workers = c.workers || {};
  const streams = c.streams || {};
  const tile = (label, value, kind, title) =>
    h("div", { class: `tile ${kind || ""}`, title: title || null },
      h("div", { class: "tile-value" }, formatNumber(value)),
      h("div", { class: "tile-label" }, label));
  const totalStreams = Object.values(streams).reduce((a, b) => a + b, 0);
  const used = c.capacity ? c.assigned / c.capacity : 0;
  $("cluster").replaceChildren(
    h("div", { class: "tile-group" },
      h("div", { class: "group-label" }, "workers"),
      tile("active", workers.active || 0, "ok"),
      tile("suspect", workers.suspect || 0, workers.suspect ? "warn" : ""),
      tile("draining", workers.draining || 0, workers.draining ? "info" : ""),
      tile("lost", workers.lost || 0, workers.lost ? "bad" : ""),
      tile("left", workers.left || 0, "")),
    h("div", { class: "tile-group" },
      h("div", { class: "group-label" }, "streams"),
      tile("total", totalStreams, ""),
      tile("active", streams.active || 0, ""),
      tile("disabled", streams.disabled || 0, streams.disabled ? "info" : ""),
      tile("quarantined", streams.quarantined || 0, streams.quarantined ? "bad" : "")),
    h("div", { class: "tile-group" },
      h("div", { class: "group-label" }, "assignment"),
      tile("assigned", c.assigned, "ok"),
      tile("unassigned", c.unassigned, c.unassigned ? "warn" : "",
        "active streams without an owner"),
      c.unplaceable !== undefined ? tile("unplaceable", c.unplaceable, c.unplaceable ? "bad" : "") : null,
      h("div", { class: "tile tile-wide" },
        h("div", { class: "tile-value" }, `${formatNumber(c.assigned)} / ${formatNumber(c.capacity)}`),
        bar(used, `${Math.round(used * 100)}% of capacity in use`, used > 0.9 ? "hot" : ""),
        h("div", { class: "tile-label" }, "capacity in use"))),
  );
}

// ---------------------------------------------------------------------------- workers
const STAT_PERCENTS = [
  ["cpu_percent", "cpu"],
  ["memory_percent", "mem"],
  ["disk_percent", "disk"],
];

function hostFigures(stats) {
  if (!stats || typeof stats !== "object" || Object.keys(stats).length === 0) {
    return h("span", { class: "muted", title: "this worker reports no host figures" }, "—");
  }
  const parts = [];
  for (const [key, label] of STAT_PERCENTS) {
    const value = stats[key];
    if (typeof value !== "number") continue;
    parts.push(h("span", { class: "stat", title: `${key}: ${value}` },
      h("span", { class: "stat-label" }, label),
      bar(value / 100, `${value.toFixed(1)}%`, value >= 90 ? "hot" : value >= 75 ? "warm" : ""),
      h("span", { class: "stat-value" }, `${Math.round(value)}%`)));
  }
  const load = ["load_1m", "load_5m", "load_15m"].filter((k) => typeof stats[k] === "number");
  if (load.length) {
    parts.push(h("span", { class: "stat", title: load.map((k) => `${k}: ${stats[k]}`).join(", ") },
      h("span", { class: "stat-label" }, "load"),
      h("span", { class: "stat-value" }, load.map((k) => stats[k].toFixed(2)).join(" "))));
  }
  // "held" repeats the load column.
  const shown = new Set([...STAT_PERCENTS.map(([k]) => k), "load_1m", "load_5m", "load_15m", "held"]);
  const others = Object.entries(stats).filter(
    ([k, v]) => !shown.has(k) && (typeof v === "number" || typeof v === "string"));
  if (others.length) {
    // Other figures the worker reports (its client's counters): on hover, not in the way.
    parts.push(h("span", { class: "chip", title: others.map(([k, v]) => `${k}: ${v}`).join("\n") },
      parts.length ? `+${others.length}` : `${others.length} figures`));
  }
  return parts.length ? h("span", { class: "stats" }, parts) : h("span", { class: "muted" }, "—");
}

function workerMatches(worker, text, wantedState) {
  if (wantedState && worker.state !== wantedState) return false;
  if (!text) return true;
  const hay = [worker.worker_id, ...Object.entries(worker.labels || {}).map(([k, v]) => `${k}=${v}`)];
  return hay.some((s) => s.toLowerCase().includes(text));
}

function renderWorkers() {
  const text = $("worker-search").value.trim().toLowerCase();
  const wanted = $("worker-state").value;
  const order = { active: 0, suspect: 1, draining: 2, lost: 3, left: 4 };
  const all = state.workers;
  const matching = all
    .filter((w) => workerMatches(w, text, wanted))
    .sort((a, b) => (order[a.state] ?? 9) - (order[b.state] ?? 9) ||
      a.worker_id.localeCompare(b.worker_id, undefined, { numeric: true }));
  const rows = matching.slice(0, WORKER_ROWS_MAX).map(workerRow);
  if (matching.length > WORKER_ROWS_MAX) {
    rows.push(h("tr", {}, h("td", { colspan: 8, class: "muted" },
      `${matching.length - WORKER_ROWS_MAX} more: narrow the filter`)));
  }
  $("workers").tBodies[0].replaceChildren(...rows);
  $("workers-count").textContent = matching.length === all.length
    ? `${all.length}` : `${matching.length} of ${all.length}`;
  $("workers-empty").hidden = all.length !== 0;
}

function workerRow(w) {
  const fraction = w.capacity ? w.held / w.capacity : 0;
  const beat = age(w.last_heartbeat_at);
  const live = w.state === "active" || w.state === "suspect" || w.state === "draining";
  const labels = Object.entries(w.labels || {}).map(([k, v]) => h("span", { class: "chip" }, `${k}=${v}`));
  const local = w.local_mode_since
    ? h("span", { class: "badge badge-local", title: `local mode since ${w.local_mode_since}` },
      `local ${formatAge(age(w.local_mode_since))}`)
    : h("span", { class: "muted" }, "—");
  return h("tr", { class: `state-${w.state}`, dataset: { worker: w.worker_id, state: w.state } },
    h("td", { class: "mono strong" }, w.worker_id, healthLink(w), supersededBadge(w)),
    h("td", {}, badge(w.state)),
    h("td", { class: "w-load" },
      h("span", { class: "load" },
        bar(fraction, `${w.held} of ${w.capacity}`, fraction >= 1 ? "full" : ""),
        h("span", { class: "load-text mono held" }, `${w.held}/${w.capacity}`))),
    h("td", { class: "mono beat", dataset: { at: w.last_heartbeat_at || "" } },
      live ? formatAge(beat) : h("span", { class: "muted" }, beat === null ? "—" : `${formatAge(beat)} ago`)),
    h("td", {}, local),
    h("td", {}, hostFigures(w.stats)),
    h("td", { class: "labels" }, labels.length ? labels : h("span", { class: "muted" }, "—")),
    h("td", { class: "right actions" },
      h("button", { class: "btn btn-small btn-link", type: "button", title: "show its streams",
        onclick: () => showWorkerStreams(w.worker_id) }, "streams"),
      live && w.state !== "draining"
        ? h("button", { class: "btn btn-small", type: "button", dataset: { action: "drain" },
          onclick: () => drainWorker(w) }, "Drain")
        : null,
      live
        ? h("button", { class: "btn btn-small btn-danger", type: "button", dataset: { action: "fail" },
          title: "declare it lost now: its streams move at once", onclick: () => failWorker(w) },
          "Declare failed")
        : null));
}

// Where the worker said its health endpoint answers (register's health_url): a link, and
// only an http(s) one (the orchestrator checks too), opened without this page as opener.
function healthLink(w) {
  let url;
  try {
    url = new URL(w.health_url);
  } catch {
    return null;
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") return null;
  return h("a", { class: "chip health-link", href: url.href, target: "_blank",
    rel: "noopener noreferrer", title: `its health endpoint: ${url.href}` }, "health");
}

// Two processes registered this worker id (worker_superseded seen in the feed): the
// newcomer holds it, the other was fenced and exited.
function supersededBadge(w) {
  const d = state.superseded.get(w.worker_id);
  if (!d) return null;
  return h("span", { class: "badge badge-superseded",
    title: `two processes share this WORKER_ID: ${d.previous_address || "?"} was fenced by ${d.address || "?"}` },
  "2 processes");
}

function tickAges() {
  for (const cell of document.querySelectorAll("#workers td.beat")) {
    const row = cell.parentElement;
    const live = ["active", "suspect", "draining"].includes(row.dataset.state);
    if (!live || !cell.dataset.at) continue;
    cell.textContent = formatAge(age(cell.dataset.at));
  }
  const pill = $("live");
  if (state.ws && state.ws.readyState === WebSocket.OPEN && state.lastBeatAt) {
    pill.textContent = `live · beat ${formatAge((Date.now() - state.lastBeatAt) / 1000)} ago`;
  }
}

function showWorkerStreams(workerId) {
  $("stream-owner").value = workerId;
  $("stream-status").value = "";
  $("stream-search").value = "";
  $("stream-id").value = "";
  resetStreamPaging();
  $("streams-title").scrollIntoView({ behavior: "smooth", block: "start" });
}

// ---------------------------------------------------------------------------- streams
function resetStreamPaging() {
  const s = state.streams;
  s.cursors = [null];
  s.page = 0;
  s.single = null;
  refresh(["streams"], true);
}

function renderStreams() {
  const s = state.streams;
  const items = s.items;
  $("streams").tBodies[0].replaceChildren(...items.map(streamRow));
  $("streams-empty").hidden = items.length !== 0;
  const limit = Number($("stream-limit").value);
  const first = s.page * limit;
  $("page-info").textContent = s.single !== null
    ? `stream ${s.single}`
    : items.length ? `page ${s.page + 1} · rows ${first + 1}–${first + s.items.length}` : `page ${s.page + 1}`;
  $("page-prev").disabled = s.single !== null || s.page === 0;
  $("page-first").disabled = s.single === null && s.page === 0;
  $("page-next").disabled = s.single !== null || !s.next;
  const c = state.cluster;
  $("streams-count").textContent = c ? formatNumber(Object.values(c.streams || {}).reduce((a, b) => a + b, 0)) : "";
}

function streamRow(st) {
  const actions = [];
  if (st.status === "active") {
    actions.push(h("button", { class: "btn btn-small", type: "button", dataset: { action: "disable" },
      onclick: () => setStreamStatus(st, "disabled") }, "Disable"));
  } else if (st.status === "disabled") {
    actions.push(h("button", { class: "btn btn-small", type: "button", dataset: { action: "enable" },
      onclick: () => setStreamStatus(st, "active") }, "Enable"));
  } else if (st.status === "quarantined") {
    actions.push(h("button", { class: "btn btn-small btn-primary", type: "button", dataset: { action: "reenable" },
      onclick: () => setStreamStatus(st, "active") }, "Re-enable"));
  }
  return h("tr", { class: `status-${st.status}`, dataset: { stream: st.id, status: st.status } },
    h("td", { class: "num mono" }, st.id),
    h("td", { class: "name", title: st.url || "" }, st.name),
    h("td", {}, badge(st.status)),
    h("td", { class: "mono owner" }, st.owner
      ? h("button", { class: "btn-link mono", type: "button", onclick: () => showWorkerStreams(st.owner) }, st.owner)
      : h("span", { class: "muted" }, st.status === "active" ? "unassigned" : "—")),
    h("td", { class: "num mono token" }, st.token),
    h("td", { class: `num mono ${st.failures ? "warn-text" : ""}` }, st.failures),
    h("td", { class: "right actions" }, actions));
}

function wireStreamControls() {
  for (const id of ["stream-status", "stream-limit"]) $(id).addEventListener("change", resetStreamPaging);
  // The server searches and filters (a keyset page of the whole catalogue, never the
  // catalogue in the browser); a pause in typing sends one request, from page one.
  let typingTimer = null;
  for (const id of ["stream-owner", "stream-search"]) {
    $(id).addEventListener("input", () => {
      clearTimeout(typingTimer);
      typingTimer = setTimeout(resetStreamPaging, TYPING_MS);
    });
  }
  $("stream-find").addEventListener("submit", (event) => {
    event.preventDefault();
    const raw = $("stream-id").value.trim();
    const s = state.streams;
    if (!raw) { resetStreamPaging(); return; }
    if (!/^\d+$/.test(raw)) { toast(`"${raw}" is not a stream id`, "error"); return; }
    s.single = Number(raw);
    refresh(["streams"], true);
  });
  $("stream-id").addEventListener("search", () => { if (!$("stream-id").value) resetStreamPaging(); });
  $("page-next").addEventListener("click", () => {
    const s = state.streams;
    if (!s.next) return;
    s.cursors[s.page + 1] = s.next;
    s.cursors.length = s.page + 2;
    s.page += 1;
    refresh(["streams"], true);
  });
  $("page-prev").addEventListener("click", () => {
    const s = state.streams;
    if (s.page === 0) return;
    s.page -= 1;
    refresh(["streams"], true);
  });
  $("page-first").addEventListener("click", () => {
    $("stream-id").value = "";
    resetStreamPaging();
  });
  $("worker-search").addEventListener("input", renderWorkers);
  $("worker-state").addEventListener("change", renderWorkers);
}

// ---------------------------------------------------------------------------- actions
function confirmDialog(title, body, okLabel) {
  const dialog = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-body").textContent = body;
  $("confirm-ok").textContent = okLabel;
  return new Promise((resolve) => {
    const finish = (answer) => {
      $("confirm-form").removeEventListener("submit", onSubmit);
      $("confirm-cancel").removeEventListener("click", onCancel);
      dialog.removeEventListener("cancel", onCancel);
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    const onSubmit = (event) => { event.preventDefault(); finish(true); };
    const onCancel = (event) => { event.preventDefault(); finish(false); };
    $("confirm-form").addEventListener("submit", onSubmit);
    $("confirm-cancel").addEventListener("click", onCancel);
    dialog.addEventListener("cancel", onCancel);
    dialog.showModal();
    $("confirm-ok").focus();
  });
}

async function act(description, call, describe) {
  try {
    const result = await call();
    toast(describe(result), "ok");
    addFeedNotice("action", description + ": done", "info");
  } catch (err) {
    toast(`${description} failed: ${err.message}`, "error");
  }
  schedule(["cluster", "workers", "streams"]);
}

async function drainWorker(w) {
  const ok = await confirmDialog(`Drain ${w.worker_id}?`,
    `It gets no new streams, and the ${w.held} it holds move to other workers ` +
    "(make-before-break). Its process keeps running.", "Drain");
  if (!ok) return;
  await act(`Drain ${w.worker_id}`,
    () => load(`workers/${encodeURIComponent(w.worker_id)}/drain`, { method: "POST" }),
    (worker) => `${worker.worker_id} is ${worker.state}; its streams are being moved.`);
}

async function failWorker(w) {
  const ok = await confirmDialog(`Declare ${w.worker_id} failed?`,
    `Only when you know its host is gone: it is declared lost now, as if its lease had run out. ` +
    `The ${w.held} stream(s) it holds move to other workers at once (new fencing tokens), ` +
    "and its session ends: if the process still runs, it must register again.", "Declare failed");
  if (!ok) return;
  await act(`Declare ${w.worker_id} failed`,
    () => load(`workers/${encodeURIComponent(w.worker_id)}/fail`, { method: "POST" }),
    (worker) => `${worker.worker_id} is ${worker.state}; its streams have moved.`);
}

async function setStreamStatus(st, status) {
  const verb = status === "disabled" ? "Disable" : st.status === "quarantined" ? "Re-enable" : "Enable";
  const body = status === "disabled"
    ? `Stream ${st.id} (${st.name}) is taken from ${st.owner || "nobody"} and not handed out until enabled.`
    : st.status === "quarantined"
      ? `Stream ${st.id} (${st.name}) failed ${st.failures} times. Re-enabling clears the quarantine and hands it out again.`
      : `Stream ${st.id} (${st.name}) is handed out to a worker again.`;
  if (!(await confirmDialog(`${verb} stream ${st.id}?`, body, verb))) return;
  await act(`${verb} stream ${st.id}`,
    () => load(`streams/${st.id}`, { method: "PATCH", body: { status } }),
    (stream) => `Stream ${stream.id} is ${stream.status}${stream.owner ? `, owned by ${stream.owner}` : ""}.`);
}

// Rebalance previews first (dry_run=true: nothing changes), shows what it would do, and
// only then, confirmed, rebalances.
async function rebalance() {
  let preview;
  try {
    preview = await load("rebalance?dry_run=true", { method: "POST" });
  } catch (err) {
    toast(`Rebalance preview failed: ${err.message}`, "error");
    return;
  }
  if (!(await confirmDialog("Rebalance now?", describePreview(preview), "Rebalance"))) return;
  await act("Rebalance", () => load("rebalance", { method: "POST" }),
    (answer) => {
      const moves = (answer && answer.moves) || [];
      return moves.length ? `Rebalance: ${moves.length} stream(s) moving.` : "Rebalance: already balanced, nothing moved.";
    });
}

function describePreview(preview) {
  const moves = (preview && preview.moves) || [];
  const pairs = new Map();
  for (const mv of moves) {
    const key = `${mv.from} → ${mv.to || "nobody"}`;
    pairs.set(key, (pairs.get(key) || 0) + 1);
  }
  const parts = [];
  parts.push(moves.length
    ? `Preview: ${moves.length} stream(s) would move (${[...pairs].map(([k, n]) => `${k} ×${n}`).join(", ")}).`
    : "Preview: nothing would move.");
  if (preview && preview.grants) parts.push(`${preview.grants} unassigned stream(s) would be handed out.`);
  const imb = preview && preview.imbalance;
  if (imb) {
    parts.push(`The furthest worker is ${imb.before} stream(s) off its fair share now, ${imb.after} once this settles.`);
  }
  parts.push("Moves are make-before-break.");
  return parts.join(" ");
}

function toast(message, kind) {
  const el = h("div", { class: `toast toast-${kind}`, role: kind === "error" ? "alert" : "status" }, message);
  $("toasts").append(el);
  setTimeout(() => el.remove(), kind === "error" ? 12000 : 6000);
}

// ---------------------------------------------------------------------------- live events
const REFRESH_ON = {
  worker_registered: ["cluster", "workers", "streams"],
  worker_lost: ["cluster", "workers", "streams"],
  worker_left: ["cluster", "workers", "streams"],
  worker_draining: ["cluster", "workers", "streams"],
  worker_declared_failed: ["cluster", "workers", "streams"],
  worker_superseded: ["cluster", "workers"],
  stream_assigned: ["cluster", "workers", "streams"],
  stream_released: ["cluster", "workers", "streams"],
  stream_reassigned: ["cluster", "workers", "streams"],
  stream_quarantined: ["cluster", "workers", "streams"],
  stream_created: ["cluster", "streams"],
  stream_updated: ["cluster", "workers", "streams"],
  stream_deleted: ["cluster", "workers", "streams"],
  rebalance: ["cluster", "workers", "streams"],
  reconciled: ["cluster", "workers", "streams"],
};

function wsUrl() {
  const url = new URL("../api/v1/events/ws", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (state.lastEventId !== null) url.searchParams.set("after", String(state.lastEventId));
  return url;
}

function bearerProtocol(token) {
  const bytes = new TextEncoder().encode(token);
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return WS_BEARER_PREFIX + btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function setPill(text, kind) {
  const pill = $("live");
  pill.textContent = text;
  pill.className = `pill pill-${kind}`;
}

function closeEvents() {
  clearTimeout(state.wsTimer);
  state.wsTimer = null;
  if (state.ws) {
    const ws = state.ws;
    state.ws = null;
    ws.onclose = null;
    ws.close(1000);
  }
  setPill("signed out", "idle");
}

function connectEvents(fresh) {
  if (state.auth !== "open" && state.auth !== "token") return;
  clearTimeout(state.wsTimer);
  state.wsTimer = null;
  if (fresh) state.lastEventId = null;
  const protocols = state.token ? [WS_PROTOCOL, bearerProtocol(state.token)] : [];
  let ws;
  try {
    ws = new WebSocket(wsUrl(), protocols);
  } catch (err) {
    reconnectLater("cannot open the event socket");
    return;
  }
  state.ws = ws;
  let opened = false;
  setPill(state.wsAttempt ? `reconnecting (${state.wsAttempt})…` : "connecting…", "idle");
  ws.onopen = () => { opened = true; };
  ws.onmessage = (message) => {
    let data;
    try { data = JSON.parse(message.data); } catch (err) { return; }
    onLiveMessage(data);
  };
  ws.onclose = (event) => {
    if (state.ws !== ws) return;
    state.ws = null;
    if (!opened && state.token) {
      // Refused before the handshake: maybe the token; the API says which.
      load("cluster").catch(() => {});
    }
    const why = state.problems.shutdown ? "server shutdown"
      : opened ? `closed${event.code ? ` (${event.code})` : ""}` : "no connection";
    reconnectLater(why);
  };
}

function reconnectLater(why) {
  if (state.auth !== "open" && state.auth !== "token") return;
  const delay = backoff(state.wsAttempt++);
  state.problems.ws = why;
  renderBanner();
  setPill(`offline · retry in ${Math.ceil(delay / 1000)}s`, "bad");
  state.wsTimer = setTimeout(() => connectEvents(false), delay);
}

function onLiveMessage(data) {
  switch (data.type) {
    case "subscribed": {
      const resumed = state.lastEventId !== null;
      const reconnected = state.wsAttempt > 0;
      state.wsAttempt = 0;
      state.lastBeatAt = Date.now();
      state.problems.ws = null;
      state.problems.shutdown = null;
      renderBanner();
      setPill("live", "ok");
      if (!resumed) {
        state.lastEventId = data.after;
        backfill(data.after);
      } else {
        addFeedNotice("connection", "live feed reconnected; missed events replayed", "info");
      }
      if (resumed || reconnected) refresh(["cluster", "workers", "streams"], true);
      break;
    }
    case "event": {
      const event = data.event;
      if (state.lastEventId === null || event.id > state.lastEventId) state.lastEventId = event.id;
      addFeedEvent(event);
      const views = REFRESH_ON[event.type];
      if (views) schedule(views);
      break;
    }
    case "heartbeat": {
      state.lastBeatAt = Date.now();
      setPill("live · beat 0s ago", "ok");
      if (data.database_available === false) {
        state.problems.db = state.problems.db || "the orchestrator reports its database down";
      } else if (state.problems.db && data.database_available === true) {
        state.problems.db = null;
        schedule(["cluster", "workers", "streams"]);
      }
      renderBanner();
      if ($("feed-heartbeats").checked) {
        addFeedNotice("heartbeat",
          `server alive · ${data.clients ?? "?"} client(s) · last event ${data.last_event_id ?? "?"}` +
          (data.database_available === false ? " · database DOWN" : ""), "beat", data.timestamp);
      }
      break;
    }
    case "error":
      onLiveError(data);
      break;
    default:
      break; // unknown message types are ignored, as the contract asks
  }
}

function onLiveError(data) {
  const severity = data.severity || "error";
  const message = `${data.code}: ${data.message || ""}`;
  addFeedNotice(data.code, message, severity === "critical" ? "critical" : severity, data.timestamp);
  const resume = data.details && data.details.resume_after;
  if (typeof resume === "number") state.lastEventId = resume;
  switch (data.code) {
    case "SERVER_SHUTDOWN":
      state.problems.shutdown = data.message || "graceful shutdown";
      break;
    case "SLOW_CLIENT":
      toast("The live feed fell behind and is reconnecting; no events are lost.", "warning");
      break;
    case "DATABASE_UNAVAILABLE":
      state.problems.db = data.message || "database unavailable";
      break;
    case "DATABASE_RECOVERED":
      state.problems.db = null;
      schedule(["cluster", "workers", "streams"]);
      break;
    default:
      break;
  }
  renderBanner();
}

async function backfill(upto) {
  try {
    const after = Math.max(0, upto - FEED_BACKFILL);
    const page = await load(`events?after=${after}&limit=${FEED_BACKFILL}`);
    const older = (page.items || []).filter((e) => e.id <= upto);
    const feed = $("feed");
    for (const event of older) feed.append(feedEventRow(event));
  } catch (err) {
    // The live feed goes on without its history.
  }
}

function summary(event) {
  const d = event.data || {};
  const parts = [];
  if (event.worker_id) parts.push(event.worker_id);
  if (event.stream_id !== null && event.stream_id !== undefined) parts.push(`stream ${event.stream_id}`);
  if (event.type === "worker_superseded") {
    // Two hosts share one WORKER_ID: say which two, the fenced one first.
    parts.push(`two processes share this id: ${d.previous_address || "?"} fenced by ${d.address || "?"}`);
  }
  for (const key of ["action", "caller", "from", "to", "owner", "reason", "token", "count", "moves", "cause", "message"]) {
    if (d[key] === undefined || d[key] === null) continue;
    const value = Array.isArray(d[key]) ? d[key].length : typeof d[key] === "object" ? "…" : d[key];
    parts.push(`${key}=${value}`);
  }
  return parts.join(" · ");
}

function feedKind(type) {
  if (type === "worker_lost" || type === "worker_declared_failed" || type === "stream_quarantined" ||
    type === "worker_superseded" || type === "error") return "bad";
  if (type === "stream_reassigned" || type === "rebalance" || type === "lease_grace") return "warn";
  if (type === "worker_registered" || type === "stream_assigned") return "ok";
  return "";
}

function feedEventRow(event) {
  return h("li", { class: `feed-item ${feedKind(event.type)}`, dataset: { type: event.type, id: event.id } },
    h("span", { class: "feed-time mono" }, clockTime(event.at)),
    h("span", { class: "feed-type" }, event.type),
    h("span", { class: "feed-text" }, summary(event)));
}

function prependFeed(row) {
  if (state.feedPaused) return;
  const feed = $("feed");
  feed.prepend(row);
  while (feed.childElementCount > FEED_MAX) feed.lastElementChild.remove();
}

function addFeedEvent(event) {
  if (event.type === "worker_superseded" && event.worker_id) {
    state.superseded.set(event.worker_id, event.data || {});
  }
  prependFeed(feedEventRow(event));
}

function addFeedNotice(type, text, kind, at) {
  prependFeed(h("li", { class: `feed-item notice notice-${kind}`, dataset: { type } },
    h("span", { class: "feed-time mono" }, clockTime(at)),
    h("span", { class: "feed-type" }, type),
    h("span", { class: "feed-text" }, text)));
}

// ---------------------------------------------------------------------------- boot
function boot() {
  $("login-form").addEventListener("submit", submitToken);
  $("login").addEventListener("cancel", (event) => event.preventDefault());
  $("sign-out").addEventListener("click", () => signedOut(null));
  $("rebalance").addEventListener("click", rebalance);
  $("feed-pause").addEventListener("click", () => {
    state.feedPaused = !state.feedPaused;
    $("feed-pause").textContent = state.feedPaused ? "resume" : "pause";
  });
  wireStreamControls();
  fallbackPolls();
  setInterval(tickAges, 1000);
  start();
}

boot();
