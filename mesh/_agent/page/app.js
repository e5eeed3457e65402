// zeromesh mesh page: live from GET /v1/events (SSE), picture from GET /v1/topology,
// dead letters from GET /v1/dead-letters. Plain JavaScript, no library, no build step.
// Every name shown comes from the network, so text is only ever set with textContent.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const TOPOLOGY_EVERY_MS = 3000;
const DEAD_EVERY_MS = 5000;
const STALE_MS = 5000;          // no stats for this long: the stream is reconnected
const LOG_KEEP = 200;

const $ = (id) => document.getElementById(id);

// ---- numbers for people --------------------------------------------------------------

function short(n) {
  // 950 -> "950", 1234 -> "1.2 k", 12345678 -> "12 M"
  const a = Math.abs(n);
  const units = [[1e9, " G"], [1e6, " M"], [1e3, " k"]];
  for (const [size, unit] of units) {
    if (a >= size) {
      const v = n / size;
      return (Math.abs(v) < 10 ? v.toFixed(1) : Math.round(v).toString()) + unit;
    }
  }
  if (Number.isInteger(n)) return n.toString();
  return a < 10 ? n.toFixed(1).replace(/\.0$/, "") : Math.round(n).toString();
}

function count(n) { return n === null || n === undefined ? "–" : short(n); }

function rate(n) { return n === null || n === undefined ? "–" : short(n) + "/s"; }

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = [[2 ** 30, " GiB"], [2 ** 20, " MiB"], [2 ** 10, " KiB"]];
  for (const [size, unit] of units) {
    if (Math.abs(n) >= size) {
      const v = n / size;
      return (v < 10 ? v.toFixed(1) : Math.round(v).toString()) + unit;
    }
  }
  return Math.round(n) + " B";
}

function byteRate(n) { return n === null || n === undefined ? "–" : bytes(n) + "/s"; }

function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + " min" + (s % 60 ? " " + (s % 60) + " s" : "");
  const h = Math.floor(m / 60);
  if (h < 24) return h + " h" + (m % 60 ? " " + (m % 60) + " min" : "");
  const d = Math.floor(h / 24);
  return d + " d" + (h % 24 ? " " + (h % 24) + " h" : "");
}

function ago(s) {
  if (s === null || s === undefined) return "–";
  return s < 1 ? "just now" : duration(s) + " ago";
}

function ms(x) {
  if (x === null || x === undefined) return "–";
  if (x < 10) return x.toFixed(1) + " ms";
  if (x < 1000) return Math.round(x) + " ms";
  return (x / 1000).toFixed(2) + " s";
}

function clock(t) {
  const d = t ? new Date(t * 1000) : new Date();
  return d.toLocaleTimeString([], { hour12: false });
}

function when(t) {
  if (t === null || t === undefined) return "–";
  return ago(Date.now() / 1000 - t);
}

// ---- DOM helpers ---------------------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else if (key === "title") node.title = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function setText(id, text) {
  const node = $(id);
  if (node.textContent !== text) node.textContent = text;
}

const STATE_MARK = { alive: "●", suspect: "◐", lost: "✕" };

function stateBadge(state) {
  const s = state || "unknown";
  return el("span", { class: "badge state state-" + s, "data-state": s },
    (STATE_MARK[s] || "?") + " " + s);
}

function num(text, title) { return el("td", { class: "num", title }, text); }

// Fills a table's body with one row per item; shows the card's "empty" line when none.
function fill(tableId, items, row) {
  const table = $(tableId);
  const body = table.tBodies[0];
  const rows = items.map(row);
  body.replaceChildren(...rows);
  const empty = table.closest(".card").querySelector(".empty");
  if (empty) empty.hidden = items.length > 0;
}

// ---- live figures (event: stats) -----------------------------------------------------

const live = { self: null, peers: new Map(), deadCount: null, lastStats: 0, snapshots: 0 };

function showNode(node) {
  if (!node) return;
  live.self = node;
  setText("node-name", node.name || "?");
  setText("node-mesh", node.mesh || "–");
  const id = $("node-id");
  setText("node-id", (node.id || "").slice(0, 12));
  id.title = node.id || "";
  setText("node-version", node.version || "–");
  setText("node-uptime", duration(node.uptime_s));
  const health = typeof node.health === "object" && node.health !== null
    ? (node.health.status || JSON.stringify(node.health)) : String(node.health ?? "–");
  const badge = $("node-health");
  setText("node-health", health);
  badge.className = "badge " + (/^(ok|healthy|up)$/i.test(health) ? "ok" : "warn");
  document.title = "zeromesh · " + (node.name || "") + " · " + (node.mesh || "");
}

function showPeers(peers) {
  live.peers = new Map(peers.map((p) => [p.id, p]));
  const alive = peers.filter((p) => p.state === "alive").length;
  setText("peers-summary", peers.length ? `${alive} of ${peers.length} alive` : "");
  const order = { alive: 0, suspect: 1, lost: 2 };
  const sorted = [...peers].sort((a, b) =>
    (order[a.state] ?? 3) - (order[b.state] ?? 3) || String(a.name).localeCompare(b.name));
  fill("peers", sorted, (p) => el("tr", { class: "state-" + p.state, "data-id": p.id },
    el("td", { class: "name" }, p.name),
    el("td", {}, stateBadge(p.state)),
    el("td", {}, ago(p.last_seen_s)),
    num(ms(p.rtt_ms)),
    num(rate(p.in_per_s)),
    num(rate(p.out_per_s)),
    num(count(p.dropped)),
    el("td", { class: "mono", title: p.id }, String(p.id).slice(0, 12))));
  markStates();
}

function sparkline(values) {
  const w = 120, h = 24;
  const pic = svg("svg", { class: "spark", viewBox: `0 0 ${w} ${h}`, width: w, height: h,
    role: "img", "aria-label": "messages per second over the last minute" });
  const data = (values || []).slice(-60);
  if (!data.length) return pic;
  const top = Math.max(1, ...data);
  const step = w / Math.max(1, 59);
  const off = 60 - data.length;
  const pts = data.map((v, i) => [(i + off) * step, h - 1 - (v / top) * (h - 3)]);
  const line = pts.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
  pic.append(svg("polygon", { class: "area",
    points: `${pts[0][0].toFixed(1)},${h} ${line} ${pts[pts.length - 1][0].toFixed(1)},${h}` }));
  pic.append(svg("polyline", { class: "line", points: line }));
  const title = svg("title");
  title.textContent = `peak ${short(top)}/s in the last minute`;
  pic.append(title);
  return pic;
}

function showTopics(topics) {
  const sorted = [...topics].sort((a, b) =>
    (b.msgs_per_s || 0) - (a.msgs_per_s || 0) || String(a.topic).localeCompare(b.topic));
  fill("topics", sorted, (t) => el("tr", { "data-topic": t.topic,
    class: t.subscribers ? "" : "unheard" },
  el("td", { class: "name mono" }, t.topic),
  num(rate(t.msgs_per_s)),
  num(byteRate(t.bytes_per_s)),
  el("td", {}, sparkline(t.spark)),
  num(t.subscribers ? count(t.subscribers) : "none", t.subscribers ? null : "no subscriber"),
  num(count(t.dropped))));
}

function showQueues(queues) {
  fill("queues", queues, (q) => el("tr", { "data-queue": q.queue },
    el("td", { class: "name mono" }, q.queue),
    num(count(q.workers)), num(count(q.in_flight)), num(count(q.backlog)),
    num(rate(q.msgs_per_s))));
}

function showServices(services) {
  fill("services", services, (s) => el("tr", { "data-service": s.service },
    el("td", { class: "name mono" }, s.service),
    num(count(s.servers)), num(ms(s.p50_ms)), num(ms(s.p99_ms)), num(count(s.timeouts)),
    num(rate(s.per_s))));
}

function showSpool(spool) {
  if (!spool) {
    for (const id of ["spool-messages", "spool-bytes", "spool-quota", "spool-oldest",
      "spool-fsync", "spool-dead"]) setText(id, "–");
    return;
  }
  setText("spool-messages", count(spool.messages));
  setText("spool-bytes", bytes(spool.bytes));
  const pct = spool.quota_pct;
  setText("spool-quota", !spool.quota_bytes ? "no quota"
    : pct === null || pct === undefined ? "of " + bytes(spool.quota_bytes)
    : `${pct < 10 ? pct.toFixed(1) : Math.round(pct)} % of ${bytes(spool.quota_bytes)}`);
  $("spool-meter").value = pct || 0;
  setText("spool-oldest", spool.oldest_age_s ? duration(spool.oldest_age_s) : "–");
  setText("spool-fsync", spool.fsync === undefined || spool.fsync === null
    ? "–" : String(spool.fsync));
  setText("spool-dead", count(spool.dead_letters));
  if (spool.dead_letters !== live.deadCount) {
    live.deadCount = spool.dead_letters;
    refreshDead();
  }
}

function showUplinks(uplinks) {
  fill("uplinks", uplinks, (u) => el("tr", { "data-url": u.url },
    el("td", { class: "name mono", title: u.last_error || null }, u.url,
      el("small", {}, " " + [u.kind, u.prefix].filter(Boolean).join(" · ")),
      u.last_error ? el("div", { class: "error" }, u.last_error) : null),
    el("td", {}, el("span", { class: "badge uplink-" + u.state }, String(u.state))),
    num(count(u.backlog)), num(u.oldest_pending_age ? duration(u.oldest_pending_age) : "–"),
    num(count(u.exported)), num(count(u.imported)), num(count(u.failed))));
}

function onStats(ev) {
  const s = JSON.parse(ev.data);
  live.lastStats = Date.now();
  live.snapshots += 1;
  document.body.dataset.snapshots = String(live.snapshots);  // for scripts and tests
  showNode(s.node);
  showPeers(s.peers || []);
  showTopics(s.topics || []);
  showQueues(s.queues || []);
  showServices(s.services || []);
  showSpool(s.spool);
  showUplinks(s.uplinks || []);
}

// ---- peer events (joined / left / lost) ----------------------------------------------

function onPeerEvent(ev) {
  const p = JSON.parse(ev.data);
  const log = $("log");
  log.prepend(el("li", { class: "ev-" + ev.type, "data-kind": ev.type },
    el("time", {}, clock()), " ",
    el("span", { class: "badge ev ev-" + ev.type }, ev.type), " ",
    el("b", {}, p.name || "?"), " ",
    el("span", { class: "mono dim" }, String(p.id || "").slice(0, 12))));
  while (log.children.length > LOG_KEEP) log.lastElementChild.remove();
  log.closest(".card").querySelector(".empty").hidden = true;
  const known = live.peers.get(p.id);
  if (known) known.state = ev.type === "joined" ? "alive" : ev.type === "left" ? "left" : "lost";
  markStates();
  soon(refreshTopology);
}

// ---- the picture (GET /v1/topology, force-directed SVG) ------------------------------

const graph = { nodes: new Map(), links: [], drawn: "" };

function stateOf(node) {
  if (node.self) return "self";
  const peer = live.peers.get(node.id);
  return (peer && peer.state) || node.state || "unknown";
}

function layout(ticks) {
  const nodes = [...graph.nodes.values()];
  const index = new Map(nodes.map((n, i) => [n.id, i]));
  for (let t = 0; t < ticks; t++) {
    const heat = 1 - t / ticks;
    for (let i = 0; i < nodes.length; i++) {
      const a = nodes[i];
      for (let j = i + 1; j < nodes.length; j++) {
        const b = nodes[j];
        let dx = a.x - b.x, dy = a.y - b.y;
        let d2 = dx * dx + dy * dy;
        if (d2 < 1) { dx = 1; dy = 0.5; d2 = 1.25; }
        const f = 9000 / d2;
        const d = Math.sqrt(d2);
        a.vx += (dx / d) * f; a.vy += (dy / d) * f;
        b.vx -= (dx / d) * f; b.vy -= (dy / d) * f;
      }
    }
    for (const link of graph.links) {
      const a = nodes[index.get(link.source)], b = nodes[index.get(link.target)];
      const dx = b.x - a.x, dy = b.y - a.y;
      const d = Math.max(1, Math.sqrt(dx * dx + dy * dy));
      const f = (d - 150) * 0.06;
      a.vx += (dx / d) * f; a.vy += (dy / d) * f;
      b.vx -= (dx / d) * f; b.vy -= (dy / d) * f;
    }
    for (const n of nodes) {
      n.vx -= n.x * 0.02; n.vy -= n.y * 0.02;
      const step = Math.min(30, Math.hypot(n.vx, n.vy)) * heat;
      const speed = Math.hypot(n.vx, n.vy) || 1;
      n.x += (n.vx / speed) * step; n.y += (n.vy / speed) * step;
      n.vx *= 0.5; n.vy *= 0.5;
    }
  }
}

function linkWidth(perS) { return Math.min(12, 1.5 + 2.2 * Math.log10(1 + (perS || 0))); }

function drawTopology() {
  const pic = $("topology");
  const nodes = [...graph.nodes.values()];
  const linkLayer = svg("g", { class: "links" });
  const nodeLayer = svg("g", { class: "nodes" });
  for (const link of graph.links) {
    const a = graph.nodes.get(link.source), b = graph.nodes.get(link.target);
    const line = svg("line", { class: "link", x1: a.x.toFixed(1), y1: a.y.toFixed(1),
      x2: b.x.toFixed(1), y2: b.y.toFixed(1), "data-source": link.source,
      "data-target": link.target, "data-kind": link.kinds.join(" ") });
    line.style.strokeWidth = linkWidth(link.msgs_per_s).toFixed(1) + "px";
    const title = svg("title");
    title.textContent = `${a.name} ↔ ${b.name}: ${rate(link.msgs_per_s)} (${link.kinds.join(", ")})`;
    line.append(title);
    linkLayer.append(line);
  }
  for (const n of nodes) {
    const g = svg("g", { class: "node", "data-id": n.id,
      transform: `translate(${n.x.toFixed(1)},${n.y.toFixed(1)})` });
    g.append(svg("circle", { r: n.self ? 17 : 13 }));
    const label = svg("text", { y: n.self ? 32 : 28, "text-anchor": "middle", class: "label" });
    label.textContent = n.name;
    const status = svg("text", { y: n.self ? 44 : 40, "text-anchor": "middle", class: "status" });
    const mark = svg("text", { y: 4, "text-anchor": "middle", class: "mark" });
    const title = svg("title");
    title.textContent = `${n.name} ${n.id}`;
    g.append(label, status, mark, title);
    nodeLayer.append(g);
  }
  pic.replaceChildren(linkLayer, nodeLayer);
  fitView(nodes);
  markStates();
}

function fitView(nodes) {
  if (!nodes.length) return;
  const xs = nodes.map((n) => n.x), ys = nodes.map((n) => n.y);
  const pad = 60;
  let x0 = Math.min(...xs) - pad, x1 = Math.max(...xs) + pad;
  let y0 = Math.min(...ys) - pad / 1.5, y1 = Math.max(...ys) + pad;
  const w = Math.max(560, x1 - x0), h = Math.max(330, y1 - y0);
  const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
  $("topology").setAttribute("viewBox",
    `${(cx - w / 2).toFixed(0)} ${(cy - h / 2).toFixed(0)} ${w.toFixed(0)} ${h.toFixed(0)}`);
}

// States change every second (stats) and on peer events; the picture's shape only with
// /v1/topology. This restyles the drawn nodes and links in place.
function markStates() {
  const states = new Map();
  for (const g of $("topology").querySelectorAll("g.node")) {
    const node = graph.nodes.get(g.getAttribute("data-id"));
    if (!node) continue;
    const state = stateOf(node);
    states.set(node.id, state);
    g.setAttribute("data-state", state);
    g.setAttribute("class", "node state-" + state);
    const status = g.querySelector("text.status");
    const label = state === "self" ? "this node" : state === "alive" ? "" : state;
    if (status.textContent !== label) status.textContent = label;
    const mark = g.querySelector("text.mark");
    const symbol = state === "lost" ? "✕" : state === "suspect" ? "?" : "";
    if (mark.textContent !== symbol) mark.textContent = symbol;
  }
  for (const line of $("topology").querySelectorAll("line.link")) {
    const ends = [states.get(line.getAttribute("data-source")),
      states.get(line.getAttribute("data-target"))];
    const state = ends.includes("lost") ? "lost" : ends.includes("suspect") ? "suspect" : "up";
    line.setAttribute("class", "link link-" + state);
    line.setAttribute("data-state", state);
  }
}

function mergeTopology(topo) {
  const seen = new Set();
  let changed = false;
  const fresh = [];
  for (const n of topo.nodes || []) {
    seen.add(n.id);
    const old = graph.nodes.get(n.id);
    if (old) {
      old.name = n.name; old.state = n.state; old.self = !!n.self;
    } else {
      fresh.push(n);
      changed = true;
    }
  }
  for (const id of [...graph.nodes.keys()]) {
    if (!seen.has(id)) { graph.nodes.delete(id); changed = true; }
  }
  fresh.forEach((n, i) => {
    const angle = (graph.nodes.size + i) * 2.39996;  // golden angle: spread, deterministic
    const r = n.self ? 0 : 120;
    graph.nodes.set(n.id, { id: n.id, name: n.name, state: n.state, self: !!n.self,
      x: r * Math.cos(angle), y: r * Math.sin(angle), vx: 0, vy: 0 });
  });
  const pairs = new Map();
  for (const l of topo.links || []) {
    if (!graph.nodes.has(l.source) || !graph.nodes.has(l.target) || l.source === l.target) continue;
    const key = l.source < l.target ? l.source + " " + l.target : l.target + " " + l.source;
    const [source, target] = key.split(" ");
    const pair = pairs.get(key) || { source, target, kinds: [], msgs_per_s: 0 };
    if (l.kind && !pair.kinds.includes(l.kind)) pair.kinds.push(l.kind);
    pair.msgs_per_s += l.msgs_per_s || 0;
    pairs.set(key, pair);
  }
  const links = [...pairs.values()].sort((a, b) =>
    (a.source + a.target).localeCompare(b.source + b.target));
  const shape = links.map((l) => l.source + l.target).join();
  if (shape !== graph.drawn) { changed = true; graph.drawn = shape; }
  graph.links = links;
  layout(changed ? 300 : 20);
  drawTopology();
  const lost = [...graph.nodes.values()].filter((n) => stateOf(n) === "lost").length;
  setText("topology-summary", `${graph.nodes.size} node${graph.nodes.size === 1 ? "" : "s"}, `
    + `${links.length} link${links.length === 1 ? "" : "s"}` + (lost ? `, ${lost} lost` : ""));
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store", headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

async function refreshTopology() {
  if (!stream.open) return;
  try {
    mergeTopology(await getJSON("/v1/topology"));
  } catch (err) {
    setText("topology-summary", "picture unavailable: " + err.message);
  }
}

// ---- dead letters (GET /v1/dead-letters; replay, purge) ------------------------------

const dead = { shown: "", armed: null };

async function refreshDead() {
  if (!stream.open) return;
  let letters;
  try {
    letters = await getJSON("/v1/dead-letters");
  } catch (err) {
    setText("dead-status", "cannot list dead letters: " + err.message);
    return;
  }
  const shown = JSON.stringify(letters.map((d) => [d.id, d.attempts, d.reason]));
  // The agent lists the oldest ones only (at most 10,000): say so when there are more.
  const total = live.deadCount ?? 0;
  setText("dead-summary", !letters.length ? ""
    : total > letters.length ? `oldest ${short(letters.length)} of ${short(total)}`
      : String(letters.length));
  if (shown === dead.shown) return;  // unchanged: leave the buttons under the pointer alone
  dead.shown = shown;
  fill("dead-letters", letters, (d) => el("tr", { "data-id": d.id },
    el("td", { class: "mono" }, String(d.id)),
    el("td", { class: "actions" },
      el("button", { type: "button", class: "replay", "data-id": d.id }, "Replay"),
      el("button", { type: "button", class: "purge danger", "data-id": d.id }, "Purge")),
    el("td", { class: "name mono" }, d.queue || d.topic || "–",
      d.queue && d.topic && d.topic !== d.queue ? el("small", {}, " " + d.topic) : null),
    el("td", { class: "reason" }, d.reason || "–"),
    num(count(d.attempts)),
    el("td", { title: d.time ? new Date(d.time * 1000).toISOString() : null }, when(d.time)),
    num(bytes(d.size)),
    el("td", { class: "mono preview" }, d.data_preview ?? "")));
}

async function post(path, body) {
  const init = { method: "POST", cache: "no-store" };
  if (body !== undefined) {
    init.headers = { "Content-Type": "application/json" };
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let answer = null;
  try { answer = await response.json(); } catch (err) { answer = null; }
  if (!response.ok) {
    throw new Error((answer && answer.error) || `HTTP ${response.status}`);
  }
  return answer || {};
}

async function act(what, run) {
  setText("dead-status", what + "…");
  try {
    const answer = await run();
    const n = answer.replayed ?? answer.purged;
    setText("dead-status", what + (n === undefined ? " done" : `: ${n}`));
  } catch (err) {
    setText("dead-status", what + " failed: " + err.message);
  }
  dead.shown = "";
  await refreshDead();
}

function onDeadClick(ev) {
  const button = ev.target.closest("button");
  if (!button) return;
  const id = button.getAttribute("data-id");
  if (button.classList.contains("replay")) {
    act(`replay ${id}`, () => post("/v1/dead-letters/replay?id=" + encodeURIComponent(id)));
  } else if (button.classList.contains("purge")) {
    act(`purge ${id}`, () => post("/v1/dead-letters/purge", { ids: [Number(id)] }));
  }
}

function onPurgeAll() {
  const button = $("purge-all");
  if (dead.armed === null) {  // a second click within 4 s purges: no blocking confirm()
    button.textContent = "Click again to purge all";
    dead.armed = setTimeout(() => { dead.armed = null; button.textContent = "Purge all"; }, 4000);
    return;
  }
  clearTimeout(dead.armed);
  dead.armed = null;
  button.textContent = "Purge all";
  act("purge all", () => post("/v1/dead-letters/purge"));  // no body: all
}

// ---- the stream, and reconnecting to an agent that restarted -------------------------

const stream = { source: null, open: false, retry: 500, timer: null };

function setConn(state, text) {
  const badge = $("conn");
  badge.className = "badge " + state;
  badge.textContent = text;
  badge.setAttribute("data-state", state);
}

function connect() {
  clearTimeout(stream.timer);
  stream.timer = null;
  if (stream.source) stream.source.close();
  const source = new EventSource("/v1/events");
  stream.source = source;
  setConn("warn", stream.open ? "reconnecting" : "connecting");
  source.addEventListener("open", () => {
    stream.open = true;
    stream.retry = 500;
    live.lastStats = Date.now();
    setConn("ok", "live");
    refreshTopology();
    dead.shown = "";
    refreshDead();
  });
  source.addEventListener("stats", onStats);
  for (const kind of ["joined", "left", "lost"]) source.addEventListener(kind, onPeerEvent);
  source.addEventListener("error", () => {
    if (stream.source !== source) return;
    stream.open = false;
    setConn("bad", "reconnecting");
    if (source.readyState === EventSource.CLOSED) later();
  });
}

function later() {
  if (stream.timer !== null) return;
  if (stream.source) stream.source.close();
  stream.timer = setTimeout(connect, stream.retry);
  stream.retry = Math.min(5000, stream.retry * 2);
}

function watchdog() {
  // A stream that is open but silent (a half-open connection to an agent that is gone) is
  // dropped and opened again.
  if (stream.open && Date.now() - live.lastStats > STALE_MS) {
    stream.open = false;
    setConn("bad", "reconnecting");
    later();
  }
}

const pending = new Set();
function soon(fn) {
  if (pending.has(fn)) return;
  pending.add(fn);
  setTimeout(() => { pending.delete(fn); fn(); }, 300);
}

document.addEventListener("DOMContentLoaded", () => {
  $("dead-letters").addEventListener("click", onDeadClick);
  $("replay-all").addEventListener("click",
    () => act("replay all", () => post("/v1/dead-letters/replay")));
  $("purge-all").addEventListener("click", onPurgeAll);
  connect();
  setInterval(refreshTopology, TOPOLOGY_EVERY_MS);
  setInterval(refreshDead, DEAD_EVERY_MS);
  setInterval(watchdog, 1000);
});
