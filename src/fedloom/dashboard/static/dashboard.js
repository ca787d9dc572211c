// fedloom dashboard: polls /api/state for the rounds each run has added, and redraws. Read-only: it only GETs.
"use strict";

const runs = new Map();   // key -> {view, rows}
const hidden = new Set(); // runs unticked in the list
let refreshMs = 2000;
let lastOk = null;
let chartsStale = true;   // the curves change only with new rows, runs that come or go, or a run ticked or unticked

const fmt = {
  n(v, d = 3) { return v === null || v === undefined ? "–" : Number(v).toFixed(d); },
  int(v) { return v === null || v === undefined ? "–" : Math.round(v).toLocaleString("en"); },
  bytes(v) {
    if (v === null || v === undefined) return "–";
    const u = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (v >= 1000 && i < u.length - 1) { v /= 1000; i++; }
    return `${v.toFixed(i ? 1 : 0)} ${u[i]}`;
  },
  secs(v) {
    if (v === null || v === undefined) return "–";
    if (v < 60) return `${v.toFixed(1)} s`;
    if (v < 3600) return `${Math.floor(v / 60)} min ${Math.round(v % 60)} s`;
    return `${Math.floor(v / 3600)} h ${Math.round((v % 3600) / 60)} min`;
  },
  ago(t) { return t === null || t === undefined ? "never" : `${fmt.secs(Math.max(0, Date.now() / 1000 - t))} ago`; },
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function table(headers, rows, numeric = []) {
  const head = el("tr", {}, ...headers.map((h, i) => el("th", { class: numeric.includes(i) ? "num" : "", text: h })));
  const body = rows.map(({ cells, attrs }) => el("tr", attrs || {},
    ...cells.map((c, i) => el("td", { class: numeric.includes(i) ? "num" : "", text: c }))));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...body));
}

async function poll() {
  const since = [...runs].map(([k, r]) => `${k}:${r.rows.length ? r.rows[r.rows.length - 1].round : 0}`).join(",");
  try {
    const answer = await fetch(`/api/state?since=${encodeURIComponent(since)}`, { cache: "no-store" });
    if (!answer.ok) throw new Error(`${answer.status} ${answer.statusText}`);
    const state = await answer.json();
    refreshMs = Math.max(250, state.refresh_s * 1000);
    const seen = new Set();
    for (const view of state.runs) {
      seen.add(view.key);
      const known = runs.get(view.key);
      const rows = !known || view.reset ? view.rows : known.rows.concat(view.rows);
      chartsStale = chartsStale || !known || view.reset || view.rows.length > 0;
      runs.set(view.key, { view, rows });
    }
    for (const key of [...runs.keys()]) if (!seen.has(key)) { runs.delete(key); chartsStale = true; }
    lastOk = Date.now();
    render();
  } catch (err) {
    const link = document.getElementById("link");
    link.textContent = `cannot reach the dashboard (${err.message}); retrying`;
    link.className = "lost";
  } finally {
    setTimeout(poll, refreshMs);
  }
}

function shown() { return [...runs.values()].filter(r => !hidden.has(r.view.key)); }

function renderList() {
  const nav = document.getElementById("runs");
  nav.replaceChildren(...[...runs.values()].map(({ view }) => {
    const box = el("input", { type: "checkbox", "data-key": view.key });
    box.checked = !hidden.has(view.key);
    box.addEventListener("change", () => {
      if (box.checked) hidden.delete(view.key); else hidden.add(view.key);
      chartsStale = true;
      render();
    });
    return el("label", {}, box, ` ${view.name} `, el("span", { class: "muted", text: `(${view.kind})` }));
  }));
  if (!runs.size) nav.replaceChildren(el("span", { class: "empty", text: "no run yet: waiting for one to write its first round" }));
}

function traces(keyX, keysY) {
  const out = [];
  const many = shown().length > 1;
  for (const { view, rows } of shown()) {
    for (const [key, label, dash] of keysY) {
      const pts = rows.filter(r => r[key] !== null && r[key] !== undefined && r[keyX] !== null && r[keyX] !== undefined);
      if (!pts.length) continue;
      out.push({ x: pts.map(r => r[keyX]), y: pts.map(r => r[key]), mode: pts.length > 30 ? "lines" : "lines+markers",
        name: many ? `${view.name}: ${label}` : label, line: { dash }, type: "scatter" });
    }
  }
  return out;
}

const LAYOUT = { margin: { l: 50, r: 10, t: 36, b: 80 }, legend: { orientation: "h", y: -0.32 }, font: { size: 12 },
  showlegend: true };
const title = text => ({ text, x: 0.01, xanchor: "left" });
const CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["sendDataToCloud"] };

function renderCharts() {
  const acc = [["test_accuracy", "central accuracy", "solid"], ["fed_accuracy", "federated accuracy", "dot"]];
  const loss = [["train_loss", "training loss", "solid"], ["test_loss", "central loss", "dash"], ["fed_loss", "federated loss", "dot"]];
  Plotly.react("chart-accuracy", traces("round", acc),
    { ...LAYOUT, title: title("accuracy by round"), xaxis: { title: { text: "round" } }, yaxis: { rangemode: "tozero" } }, CONFIG);
  Plotly.react("chart-loss", traces("round", loss),
    { ...LAYOUT, title: title("loss by round"), xaxis: { title: { text: "round" } } }, CONFIG);
  const clock = traces("sim_time_s", acc);
  const div = document.getElementById("chart-clock");
  if (div.hidden !== !clock.length) {  // the grid changed: the other charts take their new widths
    div.hidden = !clock.length;
    for (const id of ["chart-accuracy", "chart-loss"]) Plotly.Plots.resize(id);
  }
  if (clock.length) {
    Plotly.react(div, clock, { ...LAYOUT, title: title("accuracy on the simulated clock"),
      xaxis: { title: { text: "simulated seconds" } }, yaxis: { rangemode: "tozero" } }, CONFIG);
  }
}

function card({ view, rows }) {
  const s = view.summary;
  const head = el("h2", {}, view.name, el("span", { class: `badge ${view.status}`, text: view.status }));
  const of = s.rounds_planned ? ` of ${s.rounds_planned}` : "";
  const open = s.open_round ? ` (round ${s.open_round} under way)` : "";
  const pct = s.rounds_planned ? Math.min(100, 100 * s.rounds_done / s.rounds_planned) : 0;
  const facts = [
    ["rounds", `${s.rounds_done}${of}${open}`],
    ["ETA", view.status === "running" ? fmt.secs(s.eta_s) : "–"],
    ["updates", `${fmt.int(s.accepted)} accepted, ${fmt.int(s.refused)} refused`],
    ["traffic", `${fmt.bytes(s.bytes_down)} down, ${fmt.bytes(s.bytes_up)} up`],
  ];
  if (s.compression_ratio !== null) facts.push(["compression", `${fmt.n(s.compression_ratio, 2)}x (dense updates ÷ bytes up)`]);
  if (s.sim_time_s !== null) facts.push(["simulated clock", `${fmt.secs(s.sim_time_s)} (${fmt.int(s.trips)} trips)`]);
  facts.push(["last change", fmt.ago(view.updated)]);
  const parts = [head, el("div", { class: "where", text: `${view.kind}: ${view.where}` }),
    el("div", { class: "bar", title: `${pct.toFixed(0)}%` }, el("div", { style: `width:${pct}%` })),
    el("div", { class: "facts" }, ...facts.map(([k, v]) => el("span", {}, el("b", { text: `${k}: ` }), v)))];
  if (s.epsilon !== null) {
    const budget = s.epsilon_budget;
    parts.push(el("h3", { text: "privacy" }), el("div", {},
      `ε spent ${fmt.n(s.epsilon, 3)}` + (budget ? ` of a budget of ${fmt.n(budget, 2)}` : " (no budget set)") + ` at δ = ${s.delta}`));
    if (budget) parts.push(el("div", { class: "bar budget" }, el("div", { style: `width:${Math.min(100, 100 * s.epsilon / budget)}%` })));
  }
  const refusals = Object.entries(s.rejected);
  parts.push(el("h3", { text: "refused updates by reason" }), refusals.length
    ? table(["reason", "updates"], refusals.map(([why, n]) => ({ cells: [why, fmt.int(n)], attrs: { class: "refusal" } })), [1])
    : el("div", { class: "empty", text: "none" }));
  const measured = Object.entries(s.measurements);
  if (measured.length) {
    parts.push(el("h3", { text: "aggregator's measurements (latest round)" }),
      table(["measurement", "value"], measured.map(([k, v]) => ({ cells: [k, fmt.n(v, 4)] })), [1]));
  }
  const listed = view.clients.length < view.clients_total ? `${view.clients.length} of ${view.clients_total}, the most recently ${view.kind === "server" ? "heard from" : "asked"}` : `${view.clients_total}`;
  parts.push(el("h3", { text: `clients (${listed})` }));
  if (!view.clients.length) {
    parts.push(el("div", { class: "empty", text: view.kind === "simulation" ? "no clients.csv in this run folder (run.client_metrics)" : "none enrolled" }));
  } else if (view.kind === "server") {
    parts.push(table(["client", "state", "last heard", "tasks", "updates", "work s", "down s", "up s", "bytes down", "bytes up", "failures"],
      view.clients.map(c => ({ attrs: { class: `client ${c.state.replace(" ", "-")}`, "data-client": c.name },
        cells: [c.name, c.state, fmt.ago(c.last_heard), fmt.int(c.asked), fmt.int(c.accepted), fmt.n(c.work_s, 2),
          fmt.n(c.down_s, 3), fmt.n(c.up_s, 3), fmt.bytes(c.bytes_down), fmt.bytes(c.bytes_up), c.failure || "" ] })),
      [3, 4, 5, 6, 7, 8, 9]));
  } else {
    parts.push(table(["client", "last round", "last status", "asked", "accepted", "loss", "examples", "simulated s"],
      view.clients.map(c => ({ attrs: { class: "client", "data-client": c.name },
        cells: [c.name, fmt.int(c.last_round), c.state, fmt.int(c.asked), fmt.int(c.accepted), fmt.n(c.loss, 3),
          fmt.int(c.examples), fmt.n(c.mean_s, 2)] })),
      [1, 3, 4, 5, 6, 7]));
  }
  return el("article", { class: "card", id: `run-${view.key}`, "data-round": String(s.rounds_done), "data-status": view.status }, ...parts);
}

function render() {
  const link = document.getElementById("link");
  link.textContent = `updated ${new Date(lastOk).toLocaleTimeString()}, every ${refreshMs / 1000} s`;
  link.className = "muted";
  renderList();
  if (chartsStale) renderCharts();
  chartsStale = false;
  document.getElementById("cards").replaceChildren(...shown().map(card));
}

poll();
