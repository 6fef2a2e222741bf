/* bastion web console.
 *
 * Plain JavaScript, no library and no build step; served by the gateway with
 * a strict CSP (script-src 'self'), so there is no inline script or style.
 *
 * Theory of operation. Unary calls go to POST /v1/{service}/{method} with the
 * session cookie the gateway set at login, echoing the readable CSRF cookie
 * in X-CSRF-Token (double-submit CSRF proof; csrfToken() below names it).
 * Server streams (kv.watch, jobs.watch, files.download, messages.watch, messages.subscribe) run over one
 * WebSocket at /ws, as JSON-RPC calls whose items arrive as "stream.item"
 * notifications; an error ending a stream carries the server's status and
 * details (a lagged subscription's dropped count and resume offset). Uploads hash the
 * file in the browser (incremental SHA-256), open it with files.begin_upload,
 * then send it in chunks as raw bodies to POST /v1/files/upload?upload_id=&offset=
 * (the gateway carries bytes client streams that way). JSON has no bytes:
 * byte values (kv values, file chunks, mail bodies) travel as base64. Data
 * from other users (mail, topic payloads) only ever enters the page as text
 * (textContent), never as HTML.
 */
"use strict";

// -- small DOM helpers ------------------------------------------------------------------

const $ = (sel) => document.querySelector(sel);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

let toastTimer = null;
function toast(message, bad) {
  const box = $("#toast");
  box.textContent = message;
  box.className = bad ? "bad" : "";
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { box.hidden = true; }, bad ? 8000 : 3000);
}

function showError(err) {
  console.warn(err); // shown to the user in the toast; not a page error
  toast(err && err.message ? err.message : String(err), true);
}

/** Loads that can overlap (a refresh begun while another is on its way; answers may come back in any
 * order): `const current = latest("files")` as a load begins, and after each await `if (!current()) return;`
 * -- only the latest load of `what` begun shows its answer, so an older answer never overwrites a newer one. */
const generations = new Map();
function latest(what) {
  const n = (generations.get(what) || 0) + 1;
  generations.set(what, n);
  return () => generations.get(what) === n;
}

/** One action at a time for a group of buttons: while it runs they are disabled and further clicks or
 * submits are ignored, so a double click (or Enter pressed twice) does it once. `guard(...buttons)` returns
 * a wrapper: `form.addEventListener("submit", guard(button)(async () => ...))`; errors go to the toast. */
function guard(...buttons) {
  let running = false;
  return (action) => async (event) => {
    if (event && event.type === "submit") event.preventDefault();
    if (running) return;
    running = true;
    for (const b of buttons) b.disabled = true;
    try {
      await action(event);
    } catch (err) {
      showError(err);
    } finally {
      running = false;
      for (const b of buttons) b.disabled = false;
    }
  };
}

const submitButton = (form) => $(`${form} button[type=submit]`);

const fmtTime = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
const fmtBytes = (n) => (n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 1048576).toFixed(1)} MiB`);

// -- bytes --------------------------------------------------------------------------------

function toBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function fromBase64(text) {
  const s = atob(text || "");
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

const utf8 = new TextEncoder();
const utf8Decoder = new TextDecoder("utf-8", { fatal: false });

// SHA-256 (FIPS 180-4), incremental, so a file is hashed slice by slice (crypto.subtle has no
// streaming digest and needs a secure context).
const K256 = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);

class Sha256 {
  constructor() {
    this.h = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
    this.buf = new Uint8Array(64);
    this.bufLen = 0;
    this.length = 0;
    this.w = new Uint32Array(64);
  }

  update(data) {
    let i = 0;
    this.length += data.length;
    if (this.bufLen) {
      const n = Math.min(64 - this.bufLen, data.length);
      this.buf.set(data.subarray(0, n), this.bufLen);
      this.bufLen += n;
      i = n;
      if (this.bufLen < 64) return;
      this.block(this.buf, 0);
      this.bufLen = 0;
    }
    for (; i + 64 <= data.length; i += 64) this.block(data, i);
    if (i < data.length) {
      this.buf.set(data.subarray(i), 0);
      this.bufLen = data.length - i;
    }
  }

  block(d, o) {
    const w = this.w;
    for (let t = 0; t < 16; t++) w[t] = (d[o + 4 * t] << 24) | (d[o + 4 * t + 1] << 16) | (d[o + 4 * t + 2] << 8) | d[o + 4 * t + 3];
    for (let t = 16; t < 64; t++) {
      const x = w[t - 15], y = w[t - 2];
      const s0 = ((x >>> 7) | (x << 25)) ^ ((x >>> 18) | (x << 14)) ^ (x >>> 3);
      const s1 = ((y >>> 17) | (y << 15)) ^ ((y >>> 19) | (y << 13)) ^ (y >>> 10);
      w[t] = (w[t - 16] + s0 + w[t - 7] + s1) | 0;
    }
    let [a, b, c, e0, e, f, g, h] = this.h;
    for (let t = 0; t < 64; t++) {
      const S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
      const t1 = (h + S1 + ((e & f) ^ (~e & g)) + K256[t] + w[t]) | 0;
      const S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
      const t2 = (S0 + ((a & b) ^ (a & c) ^ (b & c))) | 0;
      h = g; g = f; f = e; e = (e0 + t1) | 0; e0 = c; c = b; b = a; a = (t1 + t2) | 0;
    }
    const H = this.h;
    H[0] += a; H[1] += b; H[2] += c; H[3] += e0; H[4] += e; H[5] += f; H[6] += g; H[7] += h;
  }

  hex() {
    const bits = this.length * 8;
    const pad = new Uint8Array((this.bufLen < 56 ? 56 : 120) - this.bufLen + 8);
    pad[0] = 0x80;
    const view = new DataView(pad.buffer);
    view.setUint32(pad.length - 8, Math.floor(bits / 0x100000000));
    view.setUint32(pad.length - 4, bits >>> 0);
    this.update(pad);
    return Array.from(this.h, (v) => v.toString(16).padStart(8, "0")).join("");
  }
}

// -- calls --------------------------------------------------------------------------------

function cookie(name) {
  for (const part of document.cookie.split(";")) {
    const [key, ...rest] = part.trim().split("=");
    if (key === name) return decodeURIComponent(rest.join("="));
  }
  return "";
}

/** The CSRF cookie's value: __Host-bastion_csrf when the gateway's cookies are Secure (as they are over
 * HTTPS), bastion_csrf only from a plaintext development gateway (cookie_secure = false). The gateway
 * compares the header with the cookie of the name it uses itself, so a planted cookie of the other name
 * authenticates nothing. */
function csrfToken() {
  return cookie("__Host-bastion_csrf") || cookie("bastion_csrf");
}

class CallError extends Error {
  constructor(status, message, httpStatus, details) {
    super(`${status}: ${message}`);
    this.status = status;
    this.httpStatus = httpStatus;
    this.details = details || {};
  }
}

async function errorFrom(response) {
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  const error = body && body.error;
  if (error && typeof error === "object") return new CallError(error.status, error.message, response.status, error.details);
  return new CallError("HTTP " + response.status, response.statusText, response.status);
}

/** One unary call: POST /v1/{service}/{method}; its result, or a thrown CallError. */
async function api(method, params) {
  const dot = method.indexOf(".");
  const response = await fetch(`/v1/${method.slice(0, dot)}/${method.slice(dot + 1)}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken() },
    body: JSON.stringify(params || {}),
    credentials: "same-origin",
  });
  if (!response.ok) {
    const err = await errorFrom(response);
    if (response.status === 401 && state.user) loggedOut("Your session has ended: log in again.");
    throw err;
  }
  return response.json();
}

/** The WebSocket at /ws: JSON-RPC calls, and server streams delivered as stream.item notifications. */
class Socket {
  constructor() {
    this.ws = null;
    this.opening = null;
    this.nextId = 1;
    this.pending = new Map(); // id -> {resolve, reject, onItem}
  }

  open() {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) return Promise.resolve(this.ws);
    if (this.opening) return this.opening;
    this.opening = new Promise((resolve, reject) => {
      const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
      ws.onopen = () => { this.ws = ws; this.opening = null; resolve(ws); };
      ws.onerror = () => { this.opening = null; reject(new Error("cannot open the WebSocket")); };
      ws.onclose = () => {
        if (this.ws === ws) this.ws = null;
        for (const [, call] of this.pending) call.reject(new CallError("UNAVAILABLE", "the WebSocket closed"));
        this.pending.clear();
      };
      ws.onmessage = (event) => this.receive(JSON.parse(event.data));
    });
    return this.opening;
  }

  receive(message) {
    for (const m of Array.isArray(message) ? message : [message]) {
      if (m.method === "stream.item") {
        const call = this.pending.get(m.params.id);
        if (call && call.onItem) call.onItem(m.params.item);
        continue;
      }
      const call = this.pending.get(m.id);
      if (!call) continue;
      this.pending.delete(m.id);
      if (m.error) {
        const data = m.error.data || {};
        call.reject(new CallError(data.status || m.error.code, m.error.message, undefined, data.details));
      } else call.resolve(m.result);
    }
  }

  /** Start a server stream; returns {done: Promise, cancel()}. */
  stream(method, params, onItem) {
    const id = this.nextId++;
    const done = new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, onItem });
    });
    this.open().then(
      (ws) => ws.send(JSON.stringify({ jsonrpc: "2.0", method, params: params || {}, id })),
      (err) => { const call = this.pending.get(id); this.pending.delete(id); if (call) call.reject(err); },
    );
    return {
      done,
      cancel: () => {
        if (this.ws && this.pending.has(id)) {
          this.ws.send(JSON.stringify({ jsonrpc: "2.0", method: "stream.cancel", params: { id } }));
        }
      },
    };
  }

  close() {
    if (this.ws) this.ws.close();
    this.ws = null;
  }
}

const state = { user: null, roles: [], socket: new Socket(), tab: null, timers: [] };

// -- log in / out -------------------------------------------------------------------------

async function start() {
  for (const link of document.querySelectorAll("#nav a")) {
    link.addEventListener("click", (event) => { event.preventDefault(); showTab(link.dataset.tab); });
  }
  $("#login-form").addEventListener("submit", guard(submitButton("#login-form"))(login));
  $("#logout").addEventListener("click", logout);
  setupUsers();
  setupKV();
  setupFiles();
  setupJobs();
  setupInbox();
  setupTopics();
  setupExplorer();
  try {
    const me = await api("auth.whoami");
    if (me.authenticated) return loggedIn(me);
  } catch (_) { /* not logged in */ }
  loggedOut();
}

async function login() {
  $("#login-error").textContent = "";
  let response;
  try {
    response = await fetch("/v1/auth/login", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ username: $("#login-user").value, password: $("#login-password").value }),
      credentials: "same-origin",
    });
  } catch (err) {
    $("#login-error").textContent = `cannot reach the server: ${err.message}`;
    return;
  }
  if (!response.ok) {
    $("#login-error").textContent = (await errorFrom(response)).message;
    return;
  }
  $("#login-password").value = "";
  loggedIn(await api("auth.whoami"));
}

async function logout() {
  try {
    await fetch("/logout", { method: "POST", headers: { "X-CSRF-Token": csrfToken() }, credentials: "same-origin" });
  } finally {
    loggedOut();
  }
}

function loggedIn(me) {
  state.user = me.name;
  state.roles = me.roles || [];
  $("#who").textContent = `${me.name}${state.roles.length ? " (" + state.roles.join(", ") + ")" : ""}`;
  $("#login-view").hidden = true;
  $("#nav").hidden = false;
  $("#logout").hidden = false;
  showTab((location.hash || "#dashboard").slice(1));
  startMailWatch();
}

function loggedOut(message) {
  state.user = null;
  stopMailWatch();
  stopSubscription();
  state.socket.close();
  for (const t of state.timers) clearInterval(t);
  state.timers = [];
  dashboard.stop();
  $("#who").textContent = "";
  $("#nav").hidden = true;
  $("#logout").hidden = true;
  for (const tab of document.querySelectorAll(".tab")) tab.hidden = true;
  $("#login-view").hidden = false;
  if (message) $("#login-error").textContent = message;
}

const loaders = {};

function showTab(name) {
  if (!document.getElementById(`tab-${name}`)) name = "dashboard";
  state.tab = name;
  history.replaceState(null, "", `#${name}`);
  for (const tab of document.querySelectorAll(".tab")) tab.hidden = tab.id !== `tab-${name}`;
  for (const link of document.querySelectorAll("#nav a")) link.classList.toggle("active", link.dataset.tab === name);
  if (name === "dashboard") dashboard.start(); else dashboard.stop();
  if (loaders[name]) loaders[name]().catch(showError);
}

// -- dashboard ----------------------------------------------------------------------------

const COLORS = ["#2457c5", "#d97706", "#b42318", "#067647", "#7c3aed"];

/** A line chart of the last `size` samples of one or more series, drawn on a canvas. */
class Chart {
  constructor(canvas, labels, size = 90) {
    this.canvas = canvas;
    this.labels = labels;
    this.size = size;
    this.data = labels.map(() => []);
  }

  push(values) {
    values.forEach((v, i) => {
      const series = this.data[i];
      series.push(v);
      if (series.length > this.size) series.shift();
    });
    this.canvas.dataset.samples = String(this.data[0].length);
    this.draw();
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 460, height = canvas.clientHeight || 150;
    if (canvas.width !== Math.round(width * ratio)) { canvas.width = Math.round(width * ratio); canvas.height = Math.round(height * ratio); }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    let max = 0;
    for (const series of this.data) for (const v of series) if (v !== null && v > max) max = v;
    max = niceMax(max);
    const left = 44, top = 18, right = width - 6, bottom = height - 16;
    ctx.font = "11px system-ui, sans-serif";
    ctx.strokeStyle = "#e2e5ea";
    ctx.fillStyle = "#6b7280";
    ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = bottom - ((bottom - top) * i) / 4;
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(right, y); ctx.stroke();
      ctx.fillText(fmtNumber((max * i) / 4), 2, y + 4);
    }
    ctx.fillText(`last ${this.size} s`, left, height - 3);
    const step = (right - left) / (this.size - 1);
    let legendX = left;
    this.data.forEach((series, i) => {
      ctx.strokeStyle = COLORS[i % COLORS.length];
      ctx.lineWidth = 1.8;
      ctx.beginPath();
      let pen = false;
      const offset = this.size - series.length;
      series.forEach((v, j) => {
        if (v === null) { pen = false; return; }
        const x = left + (offset + j) * step, y = bottom - ((bottom - top) * v) / max;
        if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
        pen = true;
      });
      ctx.stroke();
      const last = series.length ? series[series.length - 1] : null;
      const text = `${this.labels[i]} ${last === null ? "–" : fmtNumber(last)}`;
      ctx.fillStyle = COLORS[i % COLORS.length];
      ctx.fillRect(legendX, 5, 8, 8);
      ctx.fillStyle = "#1d2330";
      ctx.fillText(text, legendX + 11, 13);
      legendX += ctx.measureText(text).width + 24;
    });
  }
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function fmtNumber(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (Math.abs(v) >= 1e4) return (v / 1e3).toFixed(1) + "k";
  if (Number.isInteger(v)) return String(v);
  return Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2);
}

/** Cumulative bucket counts of the call-latency histogram in a Prometheus text exposition, by `le`. */
function latencyBuckets(text) {
  const families = new Map();
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)_bucket\{(.*)\}\s+(\S+)/.exec(line);
    if (!match) continue;
    const [, name, labels, value] = match;
    if (!/call|request|rpc/.test(name) || !/second|duration|latency/.test(name)) continue;
    const le = /(?:^|,)le="([^"]+)"/.exec(labels);
    if (!le) continue;
    const bound = le[1] === "+Inf" ? Infinity : Number(le[1]);
    if (!families.has(name)) families.set(name, new Map());
    const buckets = families.get(name);
    buckets.set(bound, (buckets.get(bound) || 0) + Number(value));
  }
  let best = null;
  for (const [name, buckets] of families) if (!best || /call/.test(name) && !/call/.test(best[0])) best = [name, buckets];
  return best;
}

/** The q-quantile (seconds) of the calls between two cumulative histograms, or null without calls. */
function quantile(now, before, q) {
  const bounds = [...now.keys()].sort((a, b) => a - b);
  const delta = bounds.map((b) => now.get(b) - ((before && before.get(b)) || 0));
  const total = delta[delta.length - 1];
  if (!(total > 0)) return null;
  const target = q * total;
  let lowerBound = 0, lowerCount = 0;
  for (let i = 0; i < bounds.length; i++) {
    if (delta[i] >= target) {
      if (bounds[i] === Infinity) return lowerBound;
      const span = delta[i] - lowerCount;
      return lowerBound + (bounds[i] - lowerBound) * (span > 0 ? (target - lowerCount) / span : 1);
    }
    lowerBound = bounds[i];
    lowerCount = delta[i];
  }
  return lowerBound;
}

const dashboard = {
  timer: null,
  previous: null,
  previousBuckets: null,
  metricsMissing: 0,
  charts: null,
  ticking: false, // a sample is on its way: the next tick waits for it rather than overlapping it

  start() {
    if (this.timer) return;
    if (!this.charts) {
      this.charts = {
        rate: new Chart($("#chart-rate"), ["calls/s"]),
        latency: new Chart($("#chart-latency"), ["p50", "p95", "p99"]),
        errors: new Chart($("#chart-errors"), ["errors/s"]),
        connections: new Chart($("#chart-connections"), ["connections", "in flight"]),
        queue: new Chart($("#chart-queue"), ["queued", "running"]),
      };
    }
    this.tick();
    this.timer = setInterval(() => this.tick(), 1000);
  },

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  },

  /** One sample a second, never two at once: a sample slower than a second (a busy server) makes the
   * ticks meanwhile skip, so samples are taken, and reach the charts, in order. */
  async tick() {
    if (this.ticking) return;
    this.ticking = true;
    try {
      await this.sample();
    } finally {
      this.ticking = false;
    }
  },

  async sample() {
    let stats;
    try {
      stats = await api("admin.stats");
    } catch (err) {
      $("#dash-note").textContent = err.httpStatus === 403
        ? "The dashboard needs the admin role (admin.stats)."
        : `admin.stats failed: ${err.message}`;
      return;
    }
    const now = performance.now() / 1000;
    const errors = (stats.internal_errors_total || 0) + (stats.rejected_rate_limited || 0) +
      Object.entries(stats).filter(([k]) => k.startsWith("scheduler_rejected_")).reduce((sum, [, v]) => sum + v, 0);
    const previous = this.previous;
    this.previous = { t: now, calls: stats.calls_total, errors };
    $("#dash-note").textContent = `pid ${stats.pid ?? "?"} · updated ${new Date().toLocaleTimeString()}`;
    $("#stat-calls").textContent = fmtNumber(stats.calls_total);
    $("#stat-connections").textContent = fmtNumber(stats.connections);
    $("#stat-queue").textContent = `${fmtNumber(stats.scheduler_queued ?? 0)} / ${fmtNumber(stats.scheduler_running ?? 0)}`;
    $("#stat-uptime").textContent = fmtDuration(stats.uptime_seconds);
    const latency = await this.latency(stats);
    $("#stat-latency").textContent = latency[0] === null ? "–" : `${fmtNumber(latency[0])} / ${fmtNumber(latency[2])}`;
    this.charts.connections.push([stats.connections, stats.calls_in_flight]);
    this.charts.queue.push([stats.scheduler_queued ?? 0, stats.scheduler_running ?? 0]);
    this.charts.latency.push(latency);
    if (!previous) return;
    const dt = Math.max(now - previous.t, 0.001);
    const rate = Math.max(0, (stats.calls_total - previous.calls) / dt);
    const errorRate = Math.max(0, (errors - previous.errors) / dt);
    $("#stat-rate").textContent = fmtNumber(rate);
    $("#stat-errors").textContent = fmtNumber(errorRate);
    this.charts.rate.push([rate]);
    this.charts.errors.push([errorRate]);
  },

  /** [p50, p95, p99] in ms from /metrics' latency histogram; without /metrics, the scheduler's queue delay. */
  async latency(stats) {
    if (this.metricsMissing > 0) {
      this.metricsMissing--;
    } else {
      try {
        const response = await fetch("/metrics", { credentials: "same-origin" });
        const found = response.ok ? latencyBuckets(await response.text()) : null;
        if (found) {
          const [name, buckets] = found;
          const before = this.previousBuckets;
          this.previousBuckets = buckets;
          $("#latency-caption").textContent = `call latency percentiles (ms), from /metrics ${name}`;
          if (!before) return [null, null, null];
          return [0.5, 0.95, 0.99].map((q) => { const v = quantile(buckets, before, q); return v === null ? null : v * 1000; });
        }
      } catch (_) { /* fall through */ }
      this.metricsMissing = 30; // look again in 30 s
    }
    $("#latency-caption").textContent = "scheduler queue delay (ms): last, average, max (no latency histogram at /metrics)";
    const ms = (v) => (typeof v === "number" ? v * 1000 : null);
    return [ms(stats.scheduler_delay_last), ms(stats.scheduler_delay_ewma), ms(stats.scheduler_delay_max)];
  },
};

function fmtDuration(s) {
  if (s === undefined) return "–";
  if (s < 120) return `${Math.round(s)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

// -- users and tokens ---------------------------------------------------------------------

function setupUsers() {
  loaders.users = loadUsers;
  $("#user-form").addEventListener("submit", guard(submitButton("#user-form"))(async () => {
    await api("auth.create_user", {
      name: $("#user-name").value.trim(),
      password: $("#user-password").value || null,
      roles: splitRoles($("#user-roles").value),
    });
    toast(`user ${$("#user-name").value} created`);
    $("#user-form").reset();
    await loadUsers();
  }));
  $("#token-form").addEventListener("submit", guard(submitButton("#token-form"))(async () => {
    const ttl = $("#token-ttl").value;
    const made = await api("auth.create_token", {
      user: $("#token-user").value.trim() || null,
      label: $("#token-label").value,
      ttl: ttl ? Number(ttl) : null,
    });
    const box = $("#token-new");
    box.textContent = `New token for ${made.user} (shown once, copy it now): ${made.token}`;
    box.hidden = false;
    $("#token-form").reset();
    await loadUsers();
  }));
}

const splitRoles = (text) => text.split(",").map((r) => r.trim()).filter(Boolean);

async function loadUsers() {
  const current = latest("users");
  const [users, tokens] = await Promise.all([api("auth.list_users"), api("auth.list_tokens", {})]);
  if (!current()) return;
  const body = $("#users-table tbody");
  body.replaceChildren(...users.map((u) => {
    const roles = el("input", { value: u.roles.join(", "), "aria-label": `roles of ${u.name}` });
    return el("tr", { dataset: { user: u.name } },
      el("td", { text: u.name }),
      el("td", {}, roles),
      el("td", { text: u.has_password ? "yes" : "no" }),
      el("td", { text: u.disabled ? "yes" : "no" }),
      el("td", {},
        el("button", { class: "small", text: "Set roles", onclick: async () => {
          try { await api("auth.set_roles", { name: u.name, roles: splitRoles(roles.value) }); toast(`roles of ${u.name} set`); await loadUsers(); } catch (err) { showError(err); }
        } }),
        " ",
        el("button", { class: "small", text: u.disabled ? "Enable" : "Disable", onclick: async () => {
          try { await api("auth.disable_user", { name: u.name, disabled: !u.disabled }); await loadUsers(); } catch (err) { showError(err); }
        } })));
  }));
  $("#tokens-table tbody").replaceChildren(...tokens.map((t) => el("tr", { dataset: { token: t.id } },
    el("td", { class: "mono", text: t.id }),
    el("td", { text: t.user }),
    el("td", { text: t.kind }),
    el("td", { text: t.label }),
    el("td", { text: t.expires_at ? fmtTime(t.expires_at) : "never" }),
    el("td", { text: t.revoked_at ? fmtTime(t.revoked_at) : "" }),
    el("td", {}, t.revoked_at ? null : el("button", { class: "small danger", text: "Revoke", onclick: async () => {
      try { await api("auth.revoke_token", { id: t.id }); toast(`token ${t.id} revoked`); await loadUsers(); } catch (err) { showError(err); }
    } })))));
}

// -- key-value ----------------------------------------------------------------------------

const kv = { watch: null, refresh: null };

const kvNamespace = () => $("#kv-namespace").value.trim() || null;

function setupKV() {
  loaders.kv = loadKV;
  $("#kv-filter").addEventListener("submit", (event) => { event.preventDefault(); loadKV().catch(showError); if (kv.watch) startWatch(); });
  $("#kv-watch").addEventListener("change", () => (($("#kv-watch").checked) ? startWatch() : stopWatch()));
  const one = guard($("#kv-put"), $("#kv-delete")); // a put and a delete of the same key never overlap
  $("#kv-form").addEventListener("submit", one(async () => {
    const version = $("#kv-version").value;
    const v = await api("kv.put", {
      key: $("#kv-key").value,
      value: toBase64(utf8.encode($("#kv-value").value)),
      namespace: kvNamespace(),
      expected_version: version === "" ? null : Number(version),
    });
    $("#kv-version").value = v;
    toast(`${$("#kv-key").value} is now version ${v}`);
    await loadKV();
  }));
  $("#kv-delete").addEventListener("click", one(async () => {
    const version = $("#kv-version").value;
    const gone = await api("kv.delete", { key: $("#kv-key").value, namespace: kvNamespace(), expected_version: version === "" ? null : Number(version) });
    toast(gone ? `${$("#kv-key").value} deleted` : "no such key");
    $("#kv-version").value = "";
    await loadKV();
  }));
}

async function loadKV() {
  const current = latest("kv");
  const page = await api("kv.list", { prefix: $("#kv-prefix").value, namespace: kvNamespace(), limit: 200 });
  if (!current()) return;
  $("#kv-table tbody").replaceChildren(...page.items.map((item) => {
    const text = utf8Decoder.decode(fromBase64(item.value));
    return el("tr", { dataset: { key: item.key } },
      el("td", { class: "mono", text: item.key }),
      el("td", { text: item.version }),
      el("td", { class: "mono", text: text.length > 120 ? text.slice(0, 120) + "…" : text }),
      el("td", {}, el("button", { class: "small", text: "Edit", onclick: () => {
        $("#kv-key").value = item.key;
        $("#kv-value").value = text;
        $("#kv-version").value = item.version;
      } })));
  }));
}

function startWatch() {
  stopWatch();
  const events = $("#kv-events");
  const handle = state.socket.stream("kv.watch", { prefix: $("#kv-prefix").value, namespace: kvNamespace() }, (change) => {
    if (kv.watch !== handle) return; // a watch stopped or replaced: what it still sends is not this one's
    if (change.type === "start") {
      events.append(el("li", { class: "muted", text: `watching from version ${change.version}` }));
      return;
    }
    const value = change.value === null || change.value === undefined ? "" : ` = ${utf8Decoder.decode(fromBase64(change.value)).slice(0, 80)}`;
    events.append(el("li", { dataset: { type: change.type, key: change.key }, text: `v${change.version} ${change.type} ${change.key}${value}` }));
    events.scrollTop = events.scrollHeight;
    clearTimeout(kv.refresh);
    kv.refresh = setTimeout(() => loadKV().catch(showError), 150);
  });
  kv.watch = handle;
  handle.done.then(
    () => { if (kv.watch === handle) { kv.watch = null; $("#kv-watch").checked = false; } },
    (err) => {
      if (kv.watch !== handle) return;
      kv.watch = null;
      $("#kv-watch").checked = false;
      if (err.status !== "CANCELLED") showError(err);
    });
}

function stopWatch() {
  if (kv.watch) { const w = kv.watch; kv.watch = null; w.cancel(); }
}

// -- files --------------------------------------------------------------------------------

const UPLOAD_REQUEST_BYTES = 512 * 1024; // one request's body; the gateway's max_body is 1 MiB by default
const HASH_SLICE = 4 * 1024 * 1024;

/** The files list, a page at a time: files.list's `next` cursor leads to the following page, and the
 * cursors of the pages before are kept to go back. `end` is a cursor found to lead to an empty page (a
 * full last page has a `next` too): Next is off there. */
const FILES_PAGE = 100;
const filesPages = { cursors: [null], index: 0, next: null, end: undefined, busy: false };

function setupFiles() {
  loaders.files = () => { filesPages.end = undefined; return loadFiles(); }; // files may have come since
  $("#upload-form").addEventListener("submit", (event) => { event.preventDefault(); upload().catch(showError); });
  $("#files-next").addEventListener("click", () => turnFilesPage(+1));
  $("#files-prev").addEventListener("click", () => turnFilesPage(-1));
}

async function turnFilesPage(step) {
  if (filesPages.busy) return; // a double click turns one page
  const p = filesPages;
  if (step > 0) {
    if (!p.next || p.next === p.end) return;
    p.cursors[p.index + 1] = p.next;
  } else if (p.index === 0) {
    return;
  }
  p.index += step;
  p.cursors.length = p.index + 1;
  await loadFiles().catch(showError);
}

function showFilesPager(count) {
  const p = filesPages;
  const first = p.index * FILES_PAGE;
  $("#files-range").textContent = count ? `files ${first + 1}–${first + count}` : "no files";
  $("#files-prev").disabled = p.busy || p.index === 0;
  $("#files-next").disabled = p.busy || !p.next || p.next === p.end;
}

async function loadFiles() {
  const current = latest("files");
  const p = filesPages;
  const after = p.cursors[p.index];
  p.busy = true;
  $("#files-prev").disabled = $("#files-next").disabled = true;
  let page;
  try {
    page = await api("files.list", after === null ? { limit: FILES_PAGE } : { limit: FILES_PAGE, after });
  } finally {
    p.busy = false;
    if (current()) showFilesPager($("#files-table tbody").children.length);
  }
  if (!current()) return;
  if (page.files.length === 0 && p.index > 0) {
    // Past the last file (the page before was full, or its files were deleted): back to the one before.
    p.end = after;
    p.index -= 1;
    p.cursors.length = p.index + 1;
    return loadFiles();
  }
  p.next = page.next;
  showFilesPager(page.files.length);
  $("#files-table tbody").replaceChildren(...page.files.map((f) => el("tr", { dataset: { name: f.name, owner: f.owner } },
    el("td", { text: f.owner }),
    el("td", { text: f.name }),
    el("td", { text: fmtBytes(f.size) }),
    el("td", { class: "mono", text: f.sha256.slice(0, 16) + "…", title: f.sha256 }),
    el("td", { text: fmtTime(f.updated_at) }),
    el("td", {},
      el("button", { class: "small", text: "Download", onclick: () => download(f).catch(showError) }),
      " ",
      el("button", { class: "small danger", text: "Delete", onclick: async () => {
        try { await api("files.delete", { file_id: f.id }); toast(`${f.name} deleted`); await loadFiles(); } catch (err) { showError(err); }
      } })))));
}

function setBar(id, fraction) {
  document.getElementById(id).style.width = `${Math.round(Math.min(1, Math.max(0, fraction)) * 100)}%`;
}

const files = { uploading: false, downloading: false };

/** Upload the chosen file. One at a time: the form's button is disabled until this one has ended, and
 * #upload-status says how it ended (data-state: hashing, uploading, done or failed; data-done: the name). */
async function upload() {
  const file = $("#upload-input").files[0];
  if (!file || files.uploading) return;
  const name = $("#upload-name").value.trim() || file.name;
  const status = $("#upload-status");
  const button = $("#upload-form button[type=submit]");
  files.uploading = true;
  button.disabled = true;
  delete status.dataset.done; // a previous upload's
  status.dataset.state = "hashing";
  setBar("upload-bar", 0);
  try {
    const hasher = new Sha256();
    for (let at = 0; at < file.size; at += HASH_SLICE) {
      hasher.update(new Uint8Array(await file.slice(at, at + HASH_SLICE).arrayBuffer()));
      status.textContent = `hashing ${name}: ${fmtBytes(Math.min(file.size, at + HASH_SLICE))} of ${fmtBytes(file.size)}`;
    }
    const sha256 = hasher.hex();
    const info = await api("files.begin_upload", { name, size: file.size, sha256, overwrite: $("#upload-overwrite").checked });
    status.dataset.state = "uploading";
    let offset = info.offset;
    let result = null;
    do {
      const at = offset; // this request's own: its progress events must not read a later one's
      status.textContent = `uploading ${name}: ${fmtBytes(at)} of ${fmtBytes(file.size)}`;
      result = await sendChunk(info.upload_id, at, file.slice(at, at + UPLOAD_REQUEST_BYTES), (loaded) => {
        setBar("upload-bar", file.size ? (at + loaded) / file.size : 1);
        status.textContent = `uploading ${name}: ${fmtBytes(at + loaded)} of ${fmtBytes(file.size)}`;
      });
      offset = result.offset;
    } while (!result.complete);
    setBar("upload-bar", 1);
    status.textContent = `uploaded ${name} (${fmtBytes(file.size)}, SHA-256 ${sha256.slice(0, 16)}…)`;
    status.dataset.state = "done";
    status.dataset.done = name;
  } catch (err) {
    status.textContent = `upload of ${name} failed: ${err && err.message ? err.message : err}`;
    status.dataset.state = "failed";
    throw err; // and the toast says so too
  } finally {
    files.uploading = false;
    button.disabled = false;
  }
  filesPages.end = undefined; // a new file may make a page where there was none
  await loadFiles();
}

/** One raw-body request of an upload, with progress events (fetch has none for uploads). */
function sendChunk(uploadId, offset, blob, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/v1/files/upload?upload_id=${encodeURIComponent(uploadId)}&offset=${offset}`);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.setRequestHeader("X-CSRF-Token", csrfToken());
    xhr.upload.onprogress = (event) => onProgress(event.loaded);
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
      if (xhr.status === 200) resolve(body);
      else reject(body && body.error ? new CallError(body.error.status, body.error.message, xhr.status) : new Error(`upload failed: HTTP ${xhr.status}`));
    };
    xhr.onerror = () => reject(new Error("upload failed: network error"));
    xhr.send(blob);
  });
}

/** Download `file` over the WebSocket and hand it to the browser. One at a time (another click meanwhile is
 * ignored: two downloads would share the bar and the status); #download-status says how it ended
 * (data-state: downloading, done or failed). */
async function download(file) {
  if (files.downloading) return;
  files.downloading = true;
  const status = $("#download-status");
  const parts = [];
  let received = 0;
  setBar("download-bar", 0);
  status.dataset.state = "downloading";
  status.textContent = `downloading ${file.name}…`;
  try {
    await state.socket.stream("files.download", { file_id: file.id }, (chunk) => {
      const bytes = fromBase64(chunk);
      parts.push(bytes);
      received += bytes.length;
      setBar("download-bar", file.size ? received / file.size : 1);
      status.textContent = `downloading ${file.name}: ${fmtBytes(received)} of ${fmtBytes(file.size)}`;
    }).done;
  } catch (err) {
    status.textContent = `download of ${file.name} failed: ${err && err.message ? err.message : err}`;
    status.dataset.state = "failed";
    throw err; // and the toast says so too
  } finally {
    files.downloading = false;
  }
  setBar("download-bar", 1);
  status.textContent = `downloaded ${file.name} (${fmtBytes(received)})`;
  status.dataset.state = "done";
  const url = URL.createObjectURL(new Blob(parts, { type: "application/octet-stream" }));
  const link = el("a", { href: url, download: file.name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// -- jobs ---------------------------------------------------------------------------------

const jobs = { registered: [], watches: new Map(), getArgs: () => ({}) };
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

function setupJobs() {
  loaders.jobs = loadJobs;
  $("#job-name").addEventListener("change", jobFormFor);
  $("#jobs-refresh").addEventListener("click", () => loadJobs().catch(showError));
  $("#job-form").addEventListener("submit", guard(submitButton("#job-form"))(async () => {
    const id = await api("jobs.submit", { name: $("#job-name").value, args: jobs.getArgs() });
    toast(`job ${id} submitted`);
    await loadJobs();
  }));
}

function jobFormFor() {
  const job = jobs.registered.find((j) => j.name === $("#job-name").value);
  $("#job-doc").textContent = job ? job.doc || "" : "";
  jobs.getArgs = schemaForm($("#job-args"), job ? job.params : {});
}

async function loadJobs() {
  if (!jobs.registered.length) {
    jobs.registered = await api("jobs.registered");
    $("#job-name").replaceChildren(...jobs.registered.map((j) => el("option", { value: j.name, text: j.name })));
    jobFormFor();
  }
  const current = latest("jobs");
  const list = await listJobs(current);
  if (!list || !current()) return;
  $("#jobs-table tbody").replaceChildren(...list.map(jobRow));
  for (const job of list) if (!FINISHED.has(job.state)) watchJob(job.id);
}

/** The newest JOBS_SHOWN jobs, newest first, page after page (each page's `after` the last id of the one
 * before; oldest first, a user with more than JOBS_SHOWN never saw their newest): jobs.list stops a page
 * early to fit one answer (long failure reasons fill it after a few hundred jobs), so a short page is not
 * the last -- an empty one is. Null if a later load took over meanwhile. */
const JOBS_SHOWN = 1000;
async function listJobs(current) {
  const list = [];
  let after = null;
  while (list.length < JOBS_SHOWN) {
    const limit = JOBS_SHOWN - list.length;
    const args = after === null ? { limit } : { limit, after };
    const page = await api("jobs.list", { ...args, newest_first: true });
    if (!current()) return null;
    if (!page.length) break;
    list.push(...page);
    after = page[page.length - 1].id;
  }
  return list;
}

function jobRow(job) {
  const row = el("tr", { id: `job-${job.id}`, dataset: { job: job.id } },
    el("td", { class: "mono", text: job.id }),
    el("td", { text: job.name }),
    el("td", { class: "state" }),
    el("td", {}, el("div", { class: "progress small" }, el("div", { class: "bar" })), el("span")),
    el("td"),
    el("td", {}, el("button", { class: "small danger", text: "Cancel", onclick: async () => {
      try {
        fillJobRow(row, await api("jobs.cancel", { id: job.id }));
        followJob(job.id).catch(showError);
      } catch (err) { showError(err); }
    } })));
  fillJobRow(row, job);
  return row;
}

/** Show `job` in its row, in place: the row and its Cancel button stay the same elements while the job
 * reports progress, so a click is never lost to a re-render between mouse down and up. */
function fillJobRow(row, job) {
  const finished = FINISHED.has(job.state);
  row.dataset.state = job.state;
  const cells = row.cells;
  cells[2].className = `state state-${job.state}`;
  cells[2].textContent = job.state + (job.cancel_requested && !finished ? " (cancelling)" : "");
  cells[3].querySelector(".bar").style.width = `${Math.round(job.progress * 100)}%`;
  cells[3].querySelector("span").textContent = ` ${Math.round(job.progress * 100)}%`;
  cells[4].textContent = job.error || job.message || "";
  cells[5].hidden = false;
  const button = cells[5].querySelector("button");
  if (button) button.hidden = finished;
}

function updateJob(job) {
  const row = document.getElementById(`job-${job.id}`);
  if (row) fillJobRow(row, job);
}

function watchJob(id) {
  if (jobs.watches.has(id)) return;
  const handle = state.socket.stream("jobs.watch", { id }, updateJob);
  jobs.watches.set(id, handle);
  const forget = () => jobs.watches.delete(id);
  handle.done.then(() => { forget(); followJob(id).catch(showError); },
                   (err) => { forget(); if (err.status !== "CANCELLED") showError(err); followJob(id).catch(showError); });
}

/** Poll a job's status until it has finished (at most a minute): the row shows the final state even if
 * its watch stream ended early or a notification was missed. */
async function followJob(id) {
  for (let i = 0; i < 120; i++) {
    const job = await api("jobs.status", { id });
    updateJob(job);
    if (FINISHED.has(job.state)) return;
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

// -- inbox --------------------------------------------------------------------------------

// Everything a message holds (sender, subject, headers, body) is written with textContent, never as HTML.
const INBOX_PAGE = 20;
const inbox = {
  cursors: [null], // the cursor of each page up to the one shown (null: the newest page)
  next: null, // the cursor of the page after the one shown (null: it is the last)
  open: null, // the message shown, whole
  fresh: new Set(), // ids that arrived live since the page loaded
  watch: null,
  retry: null,
  delay: 1000, // before the watch is opened again after it failed; doubles up to 30 s
  draftId: null, // the client_id of the draft being sent: a resubmitted draft is stored once
  turning: false, // a page turn (Newer, Older) is loading
};

function setupInbox() {
  loaders.inbox = loadInbox;
  $("#inbox-refresh").addEventListener("click", () => loadInbox().catch(showError));
  $("#inbox-unread-only").addEventListener("change", () => { inbox.cursors = [null]; loadInbox().catch(showError); });
  // One page turn at a time: a second click before the page has loaded would turn from the page not yet shown
  // (two Older clicks pushed the same cursor twice: page 3 said, page 2 shown).
  const turn = (move) => () => {
    if (inbox.turning) return;
    inbox.turning = true;
    move();
    loadInbox().catch(showError).finally(() => { inbox.turning = false; });
  };
  $("#inbox-newer").addEventListener("click", turn(() => inbox.cursors.pop()));
  $("#inbox-older").addEventListener("click", turn(() => inbox.cursors.push(inbox.next)));
  $("#inbox-all").addEventListener("change", () => {
    for (const box of document.querySelectorAll("#inbox-table tbody input[type=checkbox]")) box.checked = $("#inbox-all").checked;
  });
  $("#inbox-mark-read").addEventListener("click", () => markMail(selectedMail(), true).catch(showError));
  $("#inbox-mark-unread").addEventListener("click", () => markMail(selectedMail(), false).catch(showError));
  $("#inbox-delete").addEventListener("click", () => deleteMail(selectedMail()).catch(showError));
  $("#message-unread").addEventListener("click", () => { if (inbox.open) markMail([inbox.open.id], false).catch(showError); });
  $("#message-delete").addEventListener("click", () => { if (inbox.open) deleteMail([inbox.open.id]).catch(showError); });
  $("#message-reply").addEventListener("click", () => {
    const m = inbox.open;
    if (!m) return;
    $("#compose-to").value = m.sender;
    $("#compose-subject").value = /^re:/i.test(m.subject) ? m.subject : `Re: ${m.subject}`;
    $("#compose-body").focus();
  });
  $("#compose-form").addEventListener("input", () => { inbox.draftId = null; });
  $("#compose-form").addEventListener("submit", guard(submitButton("#compose-form"))(sendMail));
}

const selectedMail = () => Array.from(document.querySelectorAll("#inbox-table tbody input[type=checkbox]:checked"), (box) => Number(box.value));

async function loadInbox() {
  const current = latest("inbox");
  const cursor = inbox.cursors[inbox.cursors.length - 1];
  const [page] = await Promise.all([
    api("messages.inbox", { unread_only: $("#inbox-unread-only").checked, limit: INBOX_PAGE, cursor }),
    loadUnread(),
  ]);
  // A newer load has begun since (the user paged while new mail reloaded the newest page): its
  // answer is the one to show, whichever comes back first.
  if (!current()) return;
  inbox.next = page.next;
  $("#inbox-all").checked = false;
  $("#inbox-table tbody").replaceChildren(...page.messages.map(mailRow));
  if (!page.messages.length) {
    $("#inbox-table tbody").append(el("tr", {}, el("td", { colspan: 5, class: "muted", text: cursor === null ? "No messages." : "No more messages." })));
  }
  $("#inbox-newer").disabled = inbox.cursors.length < 2;
  $("#inbox-older").disabled = page.next === null;
  $("#inbox-page").textContent = `page ${inbox.cursors.length}`;
}

function mailRow(m) {
  const open = inbox.open && inbox.open.id === m.id;
  const classes = [m.read ? "" : "unread", inbox.fresh.has(m.id) ? "fresh" : "", open ? "open" : ""].filter(Boolean).join(" ");
  return el("tr", { class: classes, dataset: { id: m.id, read: m.read ? "yes" : "no" } },
    el("td", {}, el("input", { type: "checkbox", value: m.id, "aria-label": `select message ${m.id}` })),
    el("td", { text: m.sender }),
    el("td", {}, el("a", { href: "#inbox", text: m.subject || "(no subject)", onclick: (event) => { event.preventDefault(); readMail(m.id).catch(showError); } }),
      m.attachments ? el("span", { class: "muted", text: ` 📎${m.attachments}` }) : null),
    el("td", { text: fmtTime(m.sent_at) }),
    el("td", { text: fmtBytes(m.size) }));
}

async function loadUnread() {
  const current = latest("unread");
  const info = await api("messages.unread");
  if (!current()) return info;
  const badge = $("#nav-unread");
  badge.textContent = String(info.unread);
  badge.hidden = info.unread === 0;
  $("#inbox-counts").textContent = `${info.unread} unread of ${info.total} · ${fmtBytes(info.bytes)} of ${fmtBytes(info.max_bytes)}`;
  return info;
}

/** A message body as text: structured data as JSON; bytes as UTF-8 text when they are that, else a hex summary. */
function bodyText(m) {
  if (m.data !== null && m.data !== undefined) return { kind: "JSON", text: JSON.stringify(m.data, null, 2) };
  const bytes = fromBase64(m.body);
  if (!bytes.length) return { kind: "empty", text: "" };
  try {
    return { kind: "text", text: new TextDecoder("utf-8", { fatal: true }).decode(bytes) };
  } catch (_) {
    const shown = bytes.subarray(0, 256);
    const hex = Array.from(shown, (b) => b.toString(16).padStart(2, "0")).join(" ").replace(/((?:\S\S ){16})/g, "$1\n");
    return { kind: "binary", text: `${fmtBytes(bytes.length)}, not UTF-8 text; ${shown.length < bytes.length ? "the first 256 bytes" : "hex"}:\n${hex}` };
  }
}

async function readMail(id) {
  const current = latest("message"); // the message last clicked is the one shown
  const m = await api("messages.read", { id });
  if (!current()) return;
  inbox.open = m;
  const body = bodyText(m);
  const fields = el("dl", { class: "fields" });
  const field = (name, value) => fields.append(el("dt", { text: name }), el("dd", {}, value));
  field("subject", m.subject || "(no subject)");
  field("from", m.sender);
  field("to", m.to.join(", "));
  field("sent", fmtTime(m.sent_at));
  field("size", fmtBytes(m.size));
  for (const [name, value] of Object.entries(m.headers)) field(name, el("span", { class: "mono", text: value }));
  for (const a of m.attachments) {
    field("attachment", el("span", {}, `${a.name} (${fmtBytes(a.size)}, from ${a.owner}) `,
      el("button", { class: "small", text: "Download", onclick: () => download({ id: a.file_id, name: a.name, size: a.size }).catch(showError) })));
  }
  $("#message-view").replaceChildren(fields, el("pre", { class: "body", id: "message-body", dataset: { kind: body.kind, id: m.id }, text: body.text }));
  $("#message-actions").hidden = false;
  inbox.fresh.delete(id);
  await loadInbox();
}

async function markMail(ids, read) {
  if (!ids.length) return;
  const changed = await api("messages.mark", { ids, read });
  toast(`${changed} message${changed === 1 ? "" : "s"} marked ${read ? "read" : "unread"}`);
  await loadInbox();
}

async function deleteMail(ids) {
  if (!ids.length) return;
  const gone = await api("messages.delete", { ids });
  toast(`${gone} message${gone === 1 ? "" : "s"} deleted`);
  if (inbox.open && ids.includes(inbox.open.id)) {
    inbox.open = null;
    $("#message-view").replaceChildren(el("p", { class: "muted", text: "Pick a message to read it." }));
    $("#message-actions").hidden = true;
  }
  await loadInbox();
}

function newClientId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return "console-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function sendMail() {
  const to = $("#compose-to").value.split(",").map((t) => t.trim()).filter(Boolean);
  inbox.draftId = inbox.draftId || newClientId();
  const sent = await api("messages.send", {
    to,
    subject: $("#compose-subject").value,
    body: toBase64(utf8.encode($("#compose-body").value)),
    client_id: inbox.draftId,
  });
  toast(`sent to ${sent.recipients.join(", ")}${sent.duplicate ? " (already sent)" : ""}`);
  $("#compose-form").reset();
  inbox.draftId = null;
  if (sent.recipients.includes(state.user)) await loadInbox();
}

/** messages.watch while logged in: new mail updates the unread count at once, and the list when it shows the newest page. */
function startMailWatch() {
  stopMailWatch();
  const live = $("#inbox-live");
  const handle = state.socket.stream("messages.watch", {}, (event) => {
    if (event.type === "start") {
      live.textContent = "● live";
      live.dataset.live = "yes";
      inbox.delay = 1000;
      loadUnread().catch(showError);
      return;
    }
    inbox.fresh.add(event.id);
    const m = event.message;
    toast(`New mail from ${m.sender}: ${m.subject || "(no subject)"}`);
    loadUnread().catch(showError);
    if (state.tab === "inbox" && inbox.cursors.length === 1) loadInbox().catch(showError);
  });
  inbox.watch = handle;
  const ended = (err) => {
    if (inbox.watch !== handle) return;
    inbox.watch = null;
    live.dataset.live = "no";
    if (err && (err.status === "UNIMPLEMENTED" || err.status === "PERMISSION_DENIED")) { live.textContent = ""; return; }
    live.textContent = "reconnecting…";
    inbox.retry = setTimeout(() => { if (state.user) startMailWatch(); }, inbox.delay);
    inbox.delay = Math.min(30000, inbox.delay * 2);
  };
  handle.done.then(() => ended(null), ended);
}

function stopMailWatch() {
  clearTimeout(inbox.retry);
  if (inbox.watch) { const w = inbox.watch; inbox.watch = null; w.cancel(); }
}

// -- topics -------------------------------------------------------------------------------

const TAIL_ROWS = 500; // the oldest rows of the tail are dropped past this
const topics = { sub: null, count: 0, finish: null };

function setupTopics() {
  loaders.topics = async () => {
    const own = `user.${(state.user || "").replaceAll(".", "~")}`;
    if (!$("#sub-pattern").value) $("#sub-pattern").value = `${own}.>`;
    if (!$("#pub-topic").value) $("#pub-topic").value = `${own}.notes`;
  };
  $("#sub-form").addEventListener("submit", (event) => { event.preventDefault(); subscribe(); });
  $("#sub-stop").addEventListener("click", stopSubscription);
  $("#sub-clear").addEventListener("click", () => { $("#tail-table tbody").replaceChildren(); $("#sub-lagged").hidden = true; });
  $("#pub-form").addEventListener("submit", guard(submitButton("#pub-form"))(publish));
}

function payloadText(payload) {
  return typeof payload === "string" ? payload : JSON.stringify(payload);
}

function tailRow(item) {
  const headers = Object.entries(item.headers || {}).map(([k, v]) => `${k}=${v}`).join(" ");
  return el("tr", { dataset: { topic: item.topic, offset: item.offset ?? "" } },
    el("td", { text: new Date(item.time * 1000).toLocaleTimeString() }),
    el("td", { class: "mono", text: item.topic }),
    el("td", { text: item.offset === null || item.offset === undefined ? "live" : String(item.offset) }),
    el("td", { text: item.publisher }),
    el("td", { class: "mono payload" }, payloadText(item.payload), headers ? el("div", { class: "muted", text: headers }) : null));
}

function subscribe() {
  stopSubscription();
  const pattern = $("#sub-pattern").value.trim();
  const offset = $("#sub-offset").value;
  const params = { pattern };
  if (offset !== "") params.from_offset = Number(offset);
  const status = $("#sub-status");
  const box = $("#tail-box");
  const body = $("#tail-table tbody");
  $("#sub-lagged").hidden = true;
  status.textContent = `subscribing to ${pattern}…`;
  status.dataset.state = "opening";
  topics.count = 0;
  const handle = state.socket.stream("messages.subscribe", params, (item) => {
    if (topics.sub !== handle) return; // stopped: what the server sent before it had the cancel is not shown
    if (item.type === "start") {
      status.textContent = `subscribed to ${item.topic}${offset !== "" ? ` from offset ${offset}` : ""}: live`;
      status.dataset.state = "live";
      return;
    }
    const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    body.append(tailRow(item));
    while (body.rows.length > TAIL_ROWS) body.rows[0].remove();
    if (atBottom) box.scrollTop = box.scrollHeight;
    topics.count++;
    if (item.offset !== null && item.offset !== undefined) $("#sub-offset").placeholder = `from offset (last: ${item.offset})`;
  });
  topics.sub = handle;
  $("#sub-start").disabled = true;
  $("#sub-stop").disabled = false;
  const finish = (text, err) => {
    if (topics.sub !== handle) return;
    const lagged = err && err.status === "RESOURCE_EXHAUSTED" && "dropped" in err.details;
    if (lagged) text = "ended by the server: this subscriber fell behind";
    topics.sub = null;
    $("#sub-start").disabled = false;
    $("#sub-stop").disabled = true;
    status.textContent = `${text} (${topics.count} message${topics.count === 1 ? "" : "s"} received)`;
    status.dataset.state = err && err.status !== "CANCELLED" ? "failed" : "ended";
    if (lagged) showLagged(err, params);
    else if (err && err.status !== "CANCELLED") showError(err);
  };
  topics.finish = finish;
  handle.done.then(() => finish("the subscription ended"), (err) => finish(err.status === "CANCELLED" ? "stopped" : `ended: ${err.message}`, err));
}

/** The server ended a subscriber that fell behind: say what was lost, and offer to resume where it can. */
function showLagged(err, params) {
  const box = $("#sub-lagged");
  const d = err.details;
  const resume = d.resume_from ?? null;
  const others = d.resume_offsets ? Object.entries(d.resume_offsets).map(([t, o]) => `${t} from ${o}`).join(", ") : "";
  const parts = [
    el("strong", { text: `Lagged: ${d.dropped} message${d.dropped === 1 ? "" : "s"} dropped. ` }),
    el("span", { text: err.message }),
  ];
  if (others) parts.push(el("div", { text: `Durable topics resume: ${others}` }));
  if (resume !== null) {
    parts.push(el("div", {}, el("button", { class: "small", id: "sub-resume", text: `Resume from offset ${resume}`, onclick: () => {
      $("#sub-pattern").value = params.pattern;
      $("#sub-offset").value = String(resume);
      subscribe();
    } })));
  }
  box.replaceChildren(...parts);
  box.dataset.dropped = String(d.dropped);
  box.hidden = false;
}

/** Stop the tail now: the page shows it stopped at once, while the server gets the cancel. */
function stopSubscription() {
  if (!topics.sub) return;
  topics.sub.cancel();
  topics.finish("stopped", null);
}

async function publish() {
  const topic = $("#pub-topic").value.trim();
  const raw = $("#pub-payload").value;
  let payload = raw;
  if ($("#pub-json").checked) {
    try { payload = JSON.parse(raw); } catch (_) { throw new Error("the payload is not valid JSON"); }
  }
  const headers = {};
  for (const pair of $("#pub-headers").value.split(",").map((p) => p.trim()).filter(Boolean)) {
    const eq = pair.indexOf("=");
    if (eq < 1) throw new Error(`header ${pair}: write it as key=value`);
    headers[pair.slice(0, eq).trim()] = pair.slice(eq + 1).trim();
  }
  const offset = await api("messages.publish", { topic, payload, headers });
  const result = $("#pub-result");
  result.textContent = offset === null ? `published to ${topic} (live: delivered to its current subscribers)` : `published to ${topic} at offset ${offset}`;
  result.dataset.offset = offset === null ? "" : String(offset);
}

// -- method explorer ----------------------------------------------------------------------

const explorer = { method: null, getArgs: () => ({}), running: null };

function setupExplorer() {
  loaders.explorer = loadMethods;
  $("#method-form").addEventListener("submit", (event) => { event.preventDefault(); tryCall().catch(showError); });
}

async function loadMethods() {
  const current = latest("methods");
  const services = await api("admin.methods");
  if (!current()) return;
  const list = $("#methods-list");
  list.replaceChildren();
  for (const svc of services) {
    list.append(el("li", { class: "service", text: svc.name, title: svc.doc || "" }));
    for (const m of svc.methods) {
      const link = el("a", { href: "#explorer", text: m.name, dataset: { method: m.name } });
      link.addEventListener("click", (event) => { event.preventDefault(); pickMethod(m, link); });
      list.append(el("li", {}, link));
    }
  }
}

function pickMethod(m, link) {
  latest("explorer"); // an answer still on its way was for the method shown before
  if (explorer.running) { explorer.running.cancel(); explorer.running = null; }
  for (const a of document.querySelectorAll("#methods-list a")) a.classList.toggle("active", a === link);
  explorer.method = m;
  $("#method-title").textContent = m.name;
  $("#method-doc").textContent = m.doc || "";
  const flags = [m.kind, m.public ? "public" : "authenticated", m.idempotent ? "idempotent" : null, m.roles.length ? `roles: ${m.roles.join(", ")}` : null];
  $("#method-flags").textContent = flags.filter(Boolean).join(" · ");
  $("#method-schema").textContent = JSON.stringify({ params: m.params, result: m.result, input: m.input }, null, 2);
  $("#method-result").textContent = "";
  explorer.getArgs = schemaForm($("#method-args"), m.params);
  const button = $("#method-call");
  button.disabled = m.kind === "client_stream";
  button.textContent = m.kind === "client_stream" ? "Input streams: use the Files tab" : m.kind === "unary" ? "Call" : "Start stream";
}

async function tryCall() {
  const m = explorer.method;
  if (!m) return;
  const out = $("#method-result");
  const args = explorer.getArgs();
  if (m.kind === "unary") {
    const current = latest("explorer"); // a second click, or another method picked, wins over this answer
    out.textContent = "…";
    let text;
    try {
      text = JSON.stringify(await api(m.name, args), null, 2);
    } catch (err) {
      text = `error ${err.message}`;
    }
    if (current()) out.textContent = text;
    return;
  }
  if (explorer.running) { explorer.running.cancel(); return; }
  const current = latest("explorer"); // once another method is picked, this stream writes nothing more
  out.textContent = "";
  const button = $("#method-call");
  button.textContent = "Stop stream";
  const handle = state.socket.stream(m.name, args, (item) => {
    if (current()) out.textContent += JSON.stringify(item) + "\n";
  });
  explorer.running = handle;
  try {
    const end = await handle.done;
    if (current()) out.textContent += `-- end: ${JSON.stringify(end)}\n`;
  } catch (err) {
    if (current()) out.textContent += `-- ${err.message}\n`;
  } finally {
    if (explorer.running === handle) explorer.running = null;
    if (current()) button.textContent = "Start stream";
  }
}

// -- forms generated from JSON Schema ------------------------------------------------------

function schemaType(prop) {
  const options = prop.anyOf || prop.oneOf;
  if (options) {
    const real = options.filter((o) => o.type !== "null");
    return { type: real.length === 1 ? real[0].type || "json" : "json", nullable: real.length < options.length, base64: real.length === 1 && real[0].contentEncoding === "base64" };
  }
  return { type: prop.type || "json", nullable: false, base64: prop.contentEncoding === "base64" };
}

/** Inputs for the properties of an object schema, in `container`; returns a function reading the arguments. */
function schemaForm(container, schema) {
  container.replaceChildren();
  const props = (schema && schema.properties) || {};
  const required = new Set((schema && schema.required) || []);
  const readers = [];
  for (const [name, prop] of Object.entries(props)) {
    const { type, nullable, base64 } = schemaType(prop);
    let input;
    if (type === "boolean") {
      input = el("select", {}, el("option", { value: "", text: "(default)" }), el("option", { value: "true", text: "true" }), el("option", { value: "false", text: "false" }));
    } else if (type === "integer" || type === "number") {
      input = el("input", { type: "number", step: type === "integer" ? "1" : "any" });
    } else if (type === "string") {
      input = el("input", { type: "text" });
    } else {
      input = el("textarea", { rows: 3, placeholder: "JSON" });
    }
    input.dataset.arg = name;
    if ("default" in prop && prop.default !== null) input.placeholder = `default: ${JSON.stringify(prop.default)}`;
    const note = `${type === "json" ? "JSON" : type}${base64 ? ", base64" : ""}${nullable ? ", optional" : ""}`;
    container.append(el("label", {}, `${name}${required.has(name) ? " *" : ""} `, el("span", { class: "muted", text: `(${note})` }), input));
    readers.push(() => {
      const raw = input.value;
      if (raw === "") return null;
      if (type === "boolean") return [name, raw === "true"];
      if (type === "integer" || type === "number") return [name, Number(raw)];
      if (type === "string") return [name, raw];
      try { return [name, JSON.parse(raw)]; } catch (_) { throw new Error(`${name}: not valid JSON`); }
    });
  }
  if (!readers.length) container.append(el("p", { class: "muted", text: "No arguments." }));
  return () => {
    const args = {};
    for (const read of readers) { const pair = read(); if (pair) args[pair[0]] = pair[1]; }
    return args;
  };
}

document.addEventListener("DOMContentLoaded", () => { start().catch(showError); });
