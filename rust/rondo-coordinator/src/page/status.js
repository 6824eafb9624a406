// The status page's logic (page/index.html): poll the coordinator's own JSON once a second and
// redraw. Plain DOM, no library. Participant names, metric names and reasons come from
// outside, so every value is set with textContent or setAttribute, never as markup.
"use strict";

const POLL_MS = 1000;
const SVG_NS = "http://www.w3.org/2000/svg";
const MAX_PARTICIPANT_ROWS = 200;
const STATES = ["available", "selected", "training", "delivered", "dropped"];

const byId = (id) => document.getElementById(id);

function text(id, value) {
  const node = byId(id);
  const shown = value === null || value === undefined || value === "" ? "–" : String(value);
  if (node.textContent !== shown) node.textContent = shown;
}

function cell(row, value, className) {
  const td = document.createElement("td");
  td.textContent = value === null || value === undefined ? "–" : String(value);
  if (className) td.className = className;
  row.appendChild(td);
}

function number(value, digits = 4) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "–";
  if (value !== 0 && (Math.abs(value) >= 1e5 || Math.abs(value) < 1e-3)) {
    return value.toExponential(2);
  }
  return String(Number(value.toPrecision(digits)));
}

function seconds(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "–";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 120) return `${value.toFixed(1)} s`;
  return `${Math.floor(value / 60)} min ${Math.round(value % 60)} s`;
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

// --- the cards ----------------------------------------------------------------------------

function renderSummary(status) {
  const phase = byId("phase");
  phase.textContent = status.phase.replaceAll("_", " ");
  phase.className = `badge ${status.phase}`;
  text("round", status.round);
  text("rounds", status.rounds);
  text("attempt", status.attempt);
  text("participants-total", status.participants.length);

  const counts = byId("counts");
  counts.replaceChildren(
    ...STATES.map((state) => {
      const item = document.createElement("li");
      const count = document.createElement("b");
      count.textContent = String(status.counts[state] || 0);
      count.dataset.state = state;
      item.append(count, ` ${state}`);
      return item;
    }),
  );

  const health = status.aggregator || {};
  const state = byId("aggregator-state");
  state.textContent = health.connected ? "connected" : "unreachable";
  state.className = `badge ${health.connected ? "ok" : "bad"}`;
  text("aggregator-url", status.aggregator_url);
  text(
    "aggregator-seen",
    health.last_answer_secs_ago === null || health.last_answer_secs_ago === undefined
      ? null
      : `${seconds(health.last_answer_secs_ago)} ago`,
  );
  text("aggregator-model", health.model_round);
  text("aggregator-error", health.last_error);
}

// --- the chart ----------------------------------------------------------------------------

// The metric names any round reported, for the chart's selector ("loss" first).
function metricNames(rounds) {
  const names = new Set(["loss"]);
  for (const r of rounds) {
    Object.keys(r.training_metrics || {}).forEach((name) => names.add(name));
    Object.keys((r.evaluation && r.evaluation.metrics) || {}).forEach((name) => names.add(name));
  }
  return [...names];
}

function updateMetricChoice(rounds) {
  const select = byId("metric");
  const have = [...select.options].map((o) => o.value);
  for (const name of metricNames(rounds)) {
    if (!have.includes(name)) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      select.appendChild(option);
    }
  }
}

// Points of one series: [round, value] of every aggregated round that reported the metric.
function seriesOf(rounds, metric, kind) {
  const points = [];
  for (const r of rounds) {
    if (r.outcome !== "aggregated") continue;
    let value;
    if (kind === "train") {
      value = (r.training_metrics || {})[metric];
    } else if (r.evaluation) {
      value = metric === "loss" ? r.evaluation.loss : (r.evaluation.metrics || {})[metric];
    }
    if (typeof value === "number" && Number.isFinite(value)) points.push([r.round, value]);
  }
  return points;
}

function svg(tag, attributes, label) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (label !== undefined) node.textContent = label;
  return node;
}

function niceTicks(lo, hi, count) {
  const span = hi - lo || Math.abs(hi) || 1;
  const step0 = span / count;
  const magnitude = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= step0) || step0;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return ticks;
}

function renderChart(rounds) {
  const metric = byId("metric").value;
  const series = { train: seriesOf(rounds, metric, "train"), eval: seriesOf(rounds, metric, "eval") };
  const all = [...series.train, ...series.eval];
  const chart = byId("chart");
  byId("chart-empty").hidden = all.length > 0;
  chart.replaceChildren();
  chart.dataset.points = String(all.length);
  if (all.length === 0) return;

  const [width, height] = [760, 272];
  const pad = { left: 56, right: 16, top: 12, bottom: 42 };
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const margin = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 1;
  [y0, y1] = [y0 - margin, y1 + margin];
  if (Math.min(...ys) >= 0 && y0 < 0) y0 = 0;
  const sx = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const sy = (y) => height - pad.bottom - ((y - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);

  const base = height - pad.bottom;
  chart.appendChild(svg("line", { class: "axis", x1: pad.left, y1: base, x2: width - pad.right, y2: base }));
  chart.appendChild(svg("line", { class: "axis", x1: pad.left, y1: pad.top, x2: pad.left, y2: base }));
  for (const t of niceTicks(y0, y1, 5)) {
    chart.appendChild(svg("line", { class: "axis", x1: pad.left - 4, y1: sy(t), x2: width - pad.right, y2: sy(t), "stroke-dasharray": "2 4" }));
    chart.appendChild(svg("text", { class: "tick", x: pad.left - 8, y: sy(t) + 4, "text-anchor": "end" }, number(t, 3)));
  }
  const xTicks = niceTicks(x0, x1, Math.min(10, x1 - x0)).filter((t) => Number.isInteger(t));
  for (const t of xTicks) {
    chart.appendChild(svg("text", { class: "tick", x: sx(t), y: base + 18, "text-anchor": "middle" }, t));
  }
  chart.appendChild(svg("text", { class: "tick", x: (pad.left + width - pad.right) / 2, y: base + 34, "text-anchor": "middle" }, "round"));

  for (const kind of ["train", "eval"]) {
    const points = series[kind];
    if (points.length === 0) continue;
    const path = points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
    chart.appendChild(svg("polyline", { class: `series ${kind}`, points: path }));
    for (const [x, y] of points) {
      const point = svg("circle", { class: `point ${kind}`, cx: sx(x), cy: sy(y), r: 3.5, "data-round": x });
      point.appendChild(svg("title", {}, `round ${x}: ${kind === "train" ? "training" : "evaluation"} ${metric} ${number(y, 6)}`));
      chart.appendChild(point);
    }
  }
}

// --- the tables ---------------------------------------------------------------------------

function renderHistory(status, rounds) {
  const body = byId("history").tBodies[0];
  const rows = [];
  const running = status.history.length ? status.history[status.history.length - 1] : null;
  if (running && running.outcome === null) {
    const row = document.createElement("tr");
    row.className = "running";
    cell(row, running.round);
    cell(row, running.attempt);
    cell(row, "running");
    cell(row, `${running.delivered.length} of ${running.selected.length} delivered so far`, "reason");
    for (let i = 0; i < 6; i++) cell(row, "");
    rows.push(row);
  }
  for (const r of [...rounds].reverse()) {
    const row = document.createElement("tr");
    row.dataset.round = String(r.round);
    cell(row, r.round);
    cell(row, r.attempt);
    const outcome = document.createElement("td");
    const badge = document.createElement("span");
    badge.className = `badge ${r.outcome}`;
    badge.textContent = r.outcome || "–";
    outcome.appendChild(badge);
    // The code, for telling kinds of close apart at a glance (the reason beside says it in words).
    if (r.close_reason) {
      const code = document.createElement("div");
      code.className = "close-reason";
      code.textContent = r.close_reason;
      outcome.appendChild(code);
    }
    row.appendChild(outcome);
    cell(row, r.reason, "reason");
    cell(row, seconds(r.duration_secs));
    cell(row, r.selected);
    cell(row, r.delivered);
    cell(row, r.total_samples);
    cell(row, number((r.training_metrics || {}).loss));
    cell(row, number(r.evaluation ? r.evaluation.loss : undefined));
    rows.push(row);
  }
  body.replaceChildren(...rows);
}

function renderParticipants(status) {
  const body = byId("participants").tBodies[0];
  const shown = status.participants.slice(0, MAX_PARTICIPANT_ROWS);
  body.replaceChildren(
    ...shown.map((p) => {
      const row = document.createElement("tr");
      cell(row, p.name);
      cell(row, p.participant_id.slice(0, 8));
      cell(row, p.state);
      cell(row, p.can_evaluate ? "yes" : "no");
      cell(row, `${seconds(p.last_heartbeat_secs_ago)} ago`);
      return row;
    }),
  );
  const more = status.participants.length - shown.length;
  byId("participants-more").textContent = more > 0 ? `and ${more} more (see v1/status)` : "";
}

// --- the loop -----------------------------------------------------------------------------

let last = null;

function render() {
  if (!last) return;
  const [status, rounds] = last;
  renderSummary(status);
  updateMetricChoice(rounds);
  renderChart(rounds);
  renderHistory(status, rounds);
  renderParticipants(status);
}

async function refresh() {
  const connection = byId("connection");
  try {
    const [status, history] = await Promise.all([getJSON("v1/status"), getJSON("v1/history")]);
    last = [status, history.rounds];
    render();
    connection.textContent = "live";
    connection.className = "connection";
    byId("updated").textContent = new Date().toLocaleTimeString();
  } catch (error) {
    connection.textContent = `coordinator unreachable (${error.message}); retrying`;
    connection.className = "connection bad";
  } finally {
    // One request pair at a time: the next poll starts a second after this one ended.
    setTimeout(refresh, POLL_MS);
  }
}

byId("metric").addEventListener("change", render);
refresh();
