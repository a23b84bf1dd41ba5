// fedsilo dashboard: polls /api/view and draws it. Every value goes into the page as
// text (textContent), never as markup: a site name or a failure reason cannot inject.
"use strict";

const REFRESH_MS = 2000;
const PALETTE = ["#3182ce", "#dd6b20", "#38a169", "#d53f8c", "#805ad5", "#d69e2e",
  "#319795", "#e53e3e", "#718096", "#2c5282", "#9c4221", "#276749"];
const state = { view: null, etag: null, charts: {}, renders: 0 };
window.fedsilo = state; // for the browser test and for curious operators

const $ = (id) => document.getElementById(id);
const fmt = (x, digits = 4) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

function text(el, value) { el.textContent = value; return el; }

function cell(row, value, cls) {
  const td = row.insertCell();
  td.textContent = value;
  if (cls) td.className = cls;
  return td;
}

async function poll() {
  try {
    const headers = state.etag ? { "If-None-Match": state.etag } : {};
    const res = await fetch("api/view", { headers, cache: "no-store", credentials: "same-origin" });
    if (res.status === 200) {
      state.etag = res.headers.get("ETag");
      state.view = await res.json();
      render(state.view);
    } else if (res.status !== 304) {
      showProblem(`The dashboard answered ${res.status}: ${await res.text()}`);
    }
  } catch (err) {
    showProblem(`Cannot reach the dashboard (${err}); is \`fedsilo dashboard\` still running?`);
  }
  setTimeout(poll, REFRESH_MS);
}

function showProblem(message) {
  const el = $("problem");
  el.hidden = !message;
  el.textContent = message || "";
}

function render(view) {
  showProblem(view.problem || "");
  text($("name"), view.name || "");
  if (view.kind === "run") renderRun(view);
  else if (view.kind === "ledger") renderLedger(view);
  const when = view.updated ? new Date(view.updated * 1000).toLocaleString() : "never";
  text($("updated"), `files last written ${when}`);
  state.renders += 1;
}

function badge(status, label) {
  const el = $("status");
  el.className = `badge ${status}`;
  el.textContent = label || status;
}

// ------------------------------------------------------------------------ a run
function renderRun(v) {
  $("run").hidden = false;
  badge(v.quiet ? "quiet" : v.status,
    v.quiet ? "running? (no change for 5 min)" : v.stopped ? `stopped: ${v.stopped}` : v.status);
  const of = v.planned ? ` of ${v.planned}` : "";
  const inflight = v.status === "running" && v.started > v.completed ? `, round ${v.started} in flight` : "";
  text($("progress"), `${v.completed} round(s) done${of}${inflight}`);
  const last = v.rounds.length ? v.rounds[v.rounds.length - 1] : null;
  text($("card-accuracy"), last ? fmt(last.accuracy) : "–");
  text($("card-loss"), last ? fmt(last.loss) : "–");
  text($("card-epsilon"), last ? fmt(last.max_epsilon, 3) : "–");
  text($("card-sites"), last ? String(last.sites.length) : "–");
  text($("card-online"), v.online === null ? "–" : String(v.online));

  const x = v.rounds.map((r) => r.round);
  chart("accuracy", $("chart-accuracy"), [
    { label: "accuracy", stroke: PALETTE[0], scale: "acc" },
    { label: "loss", stroke: PALETTE[1], scale: "loss" },
  ], [x, v.rounds.map((r) => r.accuracy), v.rounds.map((r) => r.loss)],
  [{ scale: "acc", label: "accuracy" }, { scale: "loss", label: "loss", side: 1, grid: { show: false } }]);

  const names = v.sites.map((s) => s.site);
  chart("epsilon", $("chart-epsilon"),
    names.map((n, i) => ({ label: n, stroke: PALETTE[i % PALETTE.length] })),
    [x, ...names.map((n) => v.rounds.map((r) => (n in r.epsilon ? r.epsilon[n] : null)))],
    [{ label: "epsilon" }]);

  chart("sites", $("chart-sites"), [
    { label: "aggregated", stroke: PALETTE[2] },
    { label: "failed", stroke: PALETTE[7] },
    { label: "refused", stroke: PALETTE[5] },
  ], [x, v.rounds.map((r) => r.sites.length), v.rounds.map((r) => r.failed.length),
    v.rounds.map((r) => r.refused.length)], [{ label: "sites" }]);

  renderTimeline(v);
  renderSites(v.sites);
  renderEvents(v.events);
}

function renderTimeline(v) {
  const box = $("timeline");
  box.replaceChildren();
  const longest = Math.max(1e-9, ...v.rounds.map((r) => r.seconds || 0));
  for (const r of v.rounds) {
    const row = document.createElement("div");
    row.className = "row";
    text(row.appendChild(document.createElement("span")), `round ${r.round}`).className = "n";
    const bar = row.appendChild(document.createElement("span"));
    bar.className = "t";
    bar.style.width = `${Math.max(1, (300 * (r.seconds || 0)) / longest)}px`;
    const stages = r.stage_seconds
      ? " (" + Object.entries(r.stage_seconds).map(([k, s]) => `${k} ${fmt(s, 1)}`).join(", ") + ")"
      : "";
    text(row.appendChild(document.createElement("span")), `${fmt(r.seconds, 1)} s${stages}`).className = "s";
    box.appendChild(row);
  }
  for (const n of v.lost) {
    const row = document.createElement("div");
    row.className = "row";
    text(row.appendChild(document.createElement("span")), `round ${n}`).className = "n";
    row.appendChild(document.createElement("span")).className = "t lost";
    row.lastChild.style.width = "12px";
    text(row.appendChild(document.createElement("span")), "lost to a crash").className = "s";
    box.appendChild(row);
  }
}

function renderSites(sites) {
  const body = $("sites").tBodies[0];
  body.replaceChildren();
  for (const s of sites) {
    const row = body.insertRow();
    row.dataset.site = s.site;
    cell(row, s.site);
    cell(row, `${fmt(s.epsilon, 3)} / ${fmt(s.target_epsilon, 2)}`, "epsilon");
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = bar.appendChild(document.createElement("div"));
    const share = s.target_epsilon ? s.epsilon / s.target_epsilon : 0;
    fill.style.width = `${Math.min(100, 100 * share)}%`;
    if (share > 1) fill.className = "over";
    row.insertCell().appendChild(bar);
    for (const k of ["accepted", "failed", "refused", "flagged"]) cell(row, String(s[k]));
  }
}

function renderEvents(events) {
  const body = $("events").tBodies[0];
  body.replaceChildren();
  for (const e of events) {
    const row = body.insertRow();
    cell(row, String(e.round));
    cell(row, e.site);
    cell(row, `${e.kind} (${e.why}${e.stage ? `, ${e.stage} stage` : ""})`);
    cell(row, e.reason, "reason");
  }
  if (!events.length) cell(body.insertRow(), "none");
}

// ------------------------------------------------------------------------ a ledger
function renderLedger(v) {
  $("ledger").hidden = false;
  badge(v.status, `audit: ${v.status}`);
  text($("progress"), `${v.events} spend(s) in ${v.runs.length} run(s)`);
  text($("card-spent"), fmt(v.epsilon, 3));
  text($("card-budget"), v.budget === null ? "none set" : fmt(v.budget, 2));
  text($("card-left"), v.remaining === null ? "–" : fmt(v.remaining, 3));
  text($("card-spends"), `${v.events} / ${v.steps}`);
  const x = v.spends.map((s) => s.n);
  const series = [{ label: "epsilon spent", stroke: PALETTE[0] }];
  const data = [x, v.spends.map((s) => s.epsilon_total)];
  if (v.budget !== null) {
    series.push({ label: "budget", stroke: PALETTE[7], dash: [6, 4] });
    data.push(x.map(() => v.budget));
  }
  chart("ledger", $("chart-ledger"), series, data, [{ label: "epsilon" }], "spend");
  const problems = $("problems");
  problems.replaceChildren();
  for (const p of v.problems) text(problems.appendChild(document.createElement("li")), p);
  if (!v.problems.length) text(problems.appendChild(document.createElement("li")), "none: the ledger's chain holds and every spend is within its policy");
  const body = $("spends").tBodies[0];
  body.replaceChildren();
  for (const s of v.spends.slice().reverse()) {
    const row = body.insertRow();
    for (const value of [s.n, s.run, s.round, s.mode, s.steps, fmt(s.epsilon_total, 4), s.time]) cell(row, String(value));
  }
}

// ------------------------------------------------------------------------ charts
function chart(key, box, series, data, axes, xlabel = "round") {
  const signature = JSON.stringify(series.map((s) => s.label));
  let c = state.charts[key];
  if (c && c.signature === signature) {
    c.plot.setData(data);
    return;
  }
  if (c) c.plot.destroy();
  const width = Math.max(320, box.clientWidth || 520);
  const opts = {
    width,
    height: 240,
    scales: { x: { time: false } },
    series: [{ label: xlabel }, ...series.map((s) => ({ width: 2, points: { show: true, size: 6 }, ...s }))],
    axes: [{ label: xlabel, incrs: [1, 2, 5, 10, 20, 50, 100] }, ...axes],
  };
  const plot = new uPlot(opts, data, box);
  state.charts[key] = { plot, signature };
}

window.addEventListener("resize", () => {
  for (const { plot } of Object.values(state.charts)) {
    const width = Math.max(320, plot.root.parentElement.clientWidth || 520);
    plot.setSize({ width, height: 240 });
  }
});

poll();
