"use strict";
// The fleet dashboard: polls /fleet/summary and a page of /fleet/devices, draws with <canvas>;
// every LOOP_EVERY polls, the learning loop of one model (/fleet/samples/summary?model=,
// /fleet/loop). No framework and no CDN: everything it needs is in this file. Whatever the API says is put in the page as text (textContent), never as HTML.
//
// The fleet's data needs the operator's token when the server has some: open the page as
// /dashboard/#token=... (a fragment never reaches the server, its logs or a Referer);
// &model=M opens the learning loop of M.

const PAGE = 50;  // devices per page of the table (the API pages by a cursor: ?after=)
// the cursor of each page seen so far: pages[0] is the first (no cursor)
const pages = [null];

const COLORS = ["#3465a4", "#f57900", "#4e9a06", "#75507b", "#cc0000", "#c4a000", "#06989a", "#555753"];

function $(id) { return document.getElementById(id); }

const FRAGMENT = new URLSearchParams(location.hash.slice(1));  // #token=...&model=...
const TOKEN = FRAGMENT.get("token");

// GET a JSON document of the API with the operator's token; an HTTP error is thrown.
async function api(path) {
  const r = await fetch(path, { headers: TOKEN ? { Authorization: "Bearer " + TOKEN } : {} });
  if (!r.ok) { throw new Error(path.split("?")[0] + ": HTTP " + r.status); }
  return r.json();
}

function setupCanvas(canvas) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "11px system-ui, sans-serif";
  return ctx;
}

function emptyNote(ctx, canvas, text) {
  ctx.fillStyle = "#888";
  ctx.fillText(text, canvas.width / 2 - 40, canvas.height / 2);
}

function barChart(canvas, labels, values) {
  const ctx = setupCanvas(canvas);
  if (!labels.length) { emptyNote(ctx, canvas, "no devices yet"); return; }
  const pad = 30, w = canvas.width - 2 * pad, h = canvas.height - 2 * pad;
  const max = Math.max(...values, 1);
  const bw = w / labels.length;
  labels.forEach((label, i) => {
    const bh = (values[i] / max) * h;
    ctx.fillStyle = COLORS[i % COLORS.length];
    ctx.fillRect(pad + i * bw + bw * 0.15, pad + h - bh, bw * 0.7, bh);
    ctx.fillStyle = "#222";
    ctx.fillText(String(values[i]), pad + i * bw + bw * 0.45, pad + h - bh - 4);
    ctx.fillText(label, pad + i * bw + bw * 0.15, pad + h + 14);
  });
}

function lineChart(canvas, series, opts) {
  const ctx = setupCanvas(canvas);
  const points = series.flatMap(s => s.points);
  if (!points.length) { emptyNote(ctx, canvas, "waiting for telemetry"); return; }
  const pad = 36, w = canvas.width - pad - 10, h = canvas.height - 2 * pad;
  const t0 = Math.min(...points.map(p => p[0])), t1 = Math.max(...points.map(p => p[0]), t0 + 1);
  const tr = opts.log ? (v => Math.log10(Math.max(v, 0.01))) : (v => v);
  const ys = points.map(p => tr(p[1]));
  const y0 = opts.min !== undefined ? tr(opts.min) : Math.min(...ys);
  const y1 = opts.max !== undefined ? tr(opts.max) : Math.max(...ys, y0 + 1e-9);
  const X = t => pad + ((t - t0) / (t1 - t0)) * w;
  const Y = v => pad + h - ((tr(v) - y0) / (y1 - y0 || 1)) * h;
  ctx.strokeStyle = "#ccc";
  ctx.strokeRect(pad, pad, w, h);
  ctx.fillStyle = "#444";
  ctx.fillText(opts.fmt(opts.log ? Math.pow(10, y1) : y1), 2, pad + 4);
  ctx.fillText(opts.fmt(opts.log ? Math.pow(10, y0) : y0), 2, pad + h);
  ctx.fillText(new Date(t0).toLocaleTimeString(), pad, pad + h + 14);
  ctx.fillText(new Date(t1).toLocaleTimeString(), pad + w - 50, pad + h + 14);
  series.forEach((s, i) => {
    if (!s.points.length) { return; }
    ctx.strokeStyle = COLORS[i % COLORS.length];
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    s.points.forEach((p, k) => { if (k) { ctx.lineTo(X(p[0]), Y(p[1])); } else { ctx.moveTo(X(p[0]), Y(p[1])); } });
    ctx.stroke();
    ctx.fillStyle = COLORS[i % COLORS.length];
    ctx.fillText(s.name, pad + 6 + (i % 4) * 100, 12 + Math.floor(i / 4) * 12);
  });
}

function pct(v) { return v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%"; }
function num(v, d) { return v === null || v === undefined ? "–" : Number(v).toFixed(d); }

function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value;
  if (cls) { el.className = cls; }
  return el;
}

function renderDevices(devices) {
  const body = $("devices").querySelector("tbody");
  body.replaceChildren();
  devices.forEach(d => {
    const tr = document.createElement("tr");
    tr.dataset.device = d.device;
    const dot = text("span", "", "dot " + (d.online ? "on" : "off"));
    const cell = document.createElement("td");
    cell.appendChild(dot);
    tr.appendChild(cell);
    tr.appendChild(text("td", d.device));
    tr.appendChild(text("td", d.group || "–"));
    tr.appendChild(text("td", d.models.map(m => m.model + ":" + m.version).join(", ") || "–"));
    const job = d.job ? d.job.model + "@" + d.job.version + " " + d.job.state : "–";
    tr.appendChild(text("td", job, d.job ? "state-" + d.job.state : ""));
    tr.appendChild(text("td", d.requests === null ? "–" : String(d.requests)));
    tr.appendChild(text("td", pct(d.offload_rate)));
    tr.appendChild(text("td", num(d.p95_ms, 2)));
    tr.appendChild(text("td", d.rss_bytes ? (d.rss_bytes / 1048576).toFixed(0) : "–"));
    tr.appendChild(text("td", d.last_seen ? new Date(d.last_seen).toLocaleTimeString() : "–"));
    body.appendChild(tr);
  });
}

function renderRollouts(rollouts) {
  const box = $("rollouts");
  if (!rollouts.length) { return; }
  box.replaceChildren();
  rollouts.slice().reverse().forEach(r => {
    const row = document.createElement("p");
    row.appendChild(text("b", "#" + r.id + " " + r.release + " → " + r.target + " "));
    row.appendChild(text("span", r.state + " ", "state-" + r.state));
    r.waves.forEach((w, i) => {
      const bar = text("span", "", "wave");
      bar.title = (i === 0 ? "canary" : "wave " + i) + ": " + w.active + "/" + w.devices + " active, " + w.failed + " failed";
      const ok = text("span", "", "ok");
      ok.style.width = (100 * w.active / w.devices) + "%";
      const bad = text("span", "", "bad");
      bad.style.left = ok.style.width;
      bad.style.width = (100 * w.failed / w.devices) + "%";
      bar.appendChild(ok);
      bar.appendChild(bad);
      row.appendChild(bar);
    });
    if (r.detail) { row.appendChild(text("span", " " + r.detail, "muted")); }
    box.appendChild(row);
  });
}

function devicesUrl() {
  const after = pages[pages.length - 1];
  return "/fleet/devices?limit=" + PAGE + (after ? "&after=" + encodeURIComponent(after) : "");
}

function renderPager(page) {
  const first = (pages.length - 1) * PAGE;
  $("page-info").textContent = page.devices.length
    ? (first + 1) + "–" + (first + page.devices.length) + " of " + page.total
    : page.total + " devices";
  $("prev").disabled = pages.length === 1;
  $("next").disabled = page.next === null;
  $("next").dataset.cursor = page.next || "";
}

async function refresh() {
  try {
    const [summary, page] = await Promise.all([
      api("/fleet/summary"),
      api(devicesUrl()),
    ]);
    $("fleet").textContent = summary.fleet;
    $("online").textContent = String(summary.online);
    $("offline").textContent = String(summary.devices - summary.online);
    const last = summary.series[summary.series.length - 1];
    $("offload").textContent = last ? pct(last.offload_rate) : "–";
    $("p95").textContent = last ? num(last.p95_ms, 2) : "–";
    const versions = Object.keys(summary.versions).sort();
    barChart($("versions"), versions, versions.map(v => summary.versions[v]));
    const per = Object.entries(summary.per_device);
    lineChart($("offload-chart"), per.map(([name, rows]) => ({
      name, points: rows.map(r => [Date.parse(r.ts), r.offload_rate]) })),
      { min: 0, max: 1, fmt: v => (100 * v).toFixed(0) + "%" });
    lineChart($("requests-chart"), [{ name: "fleet", points: summary.series.map(b => [Date.parse(b.ts), b.requests]) }],
      { min: 0, fmt: v => v.toFixed(0) });
    lineChart($("latency-chart"), per.map(([name, rows]) => ({
      name, points: rows.filter(r => r.p95_ms !== null).map(r => [Date.parse(r.ts), r.p95_ms]) })),
      { log: true, fmt: v => v.toFixed(2) });
    renderDevices(page.devices);
    renderPager(page);
    renderRollouts(summary.rollouts);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    lastSummary = summary;
    if (ticks++ % LOOP_EVERY === 0) { refreshLoop(summary); }  // not waited for
  } catch (err) {
    $("updated").textContent = "cannot reach the server: " + err;
  }
}

// ------------------------------------------------------------------ the learning loop

// The loop's figures move at the pace of telemetry and uploads: polled every LOOP_EVERY
// refreshes (10 s), or at once when the operator picks another model.
const LOOP_EVERY = 5;
const TOP_DEVICES = 5;  // devices named per version in the samples table (the API counts the rest)
let ticks = 0;
let lastSummary = null;
// the operator's choice, kept in the fragment (a bookmark opens it); null: the model most
// devices serve
let loopModel = FRAGMENT.get("model");
let loopRun = 0;  // the latest refreshLoop: an older one still under way draws nothing

function cell(tr, value, field, cls) {
  const td = text("td", value, cls);
  if (field) { td.dataset.field = field; }
  tr.appendChild(td);
  return td;
}

function wide(tr, value, span, field) {
  const td = cell(tr, value, field, "muted");
  td.colSpan = span;
  return td;
}

function table(headers) {
  const t = document.createElement("table");
  const head = document.createElement("tr");
  headers.forEach(h => head.appendChild(text("th", h)));
  t.appendChild(document.createElement("thead")).appendChild(head);
  return [t, t.appendChild(document.createElement("tbody"))];
}

function interval(low, high) {
  return low === null || low === undefined ? "" : " [" + pct(low) + ", " + pct(high) + "]";
}

function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }

function points(v) {
  return v === null || v === undefined ? "–" : (v >= 0 ? "+" : "−") + Math.abs(100 * v).toFixed(1) + " pts";
}

// The models to choose from, the most served first: those devices serve, then those with
// samples only (names: the samples summary's model_names; none yet: []).
function loopModels(summary, names) {
  const served = new Map();
  Object.entries(summary.versions).forEach(([key, n]) => {
    const model = key.slice(0, key.lastIndexOf(":"));
    served.set(model, (served.get(model) || 0) + n);
  });
  names.forEach(m => { if (!served.has(m)) { served.set(m, 0); } });
  return [...served.entries()]
    .sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))
    .map(e => e[0]);
}

function renderModelChoice(models, model) {
  const select = $("loop-model");
  const now = [...select.options].map(o => o.value);
  if (now.join("\n") !== models.join("\n")) {
    select.replaceChildren(...models.map(m => new Option(m, m)));
  }
  select.value = model || "";
  select.disabled = !models.length;
}

function renderLoopSamples(entries) {
  const box = $("loop-samples");
  if (!entries.length) { box.replaceChildren(text("p", "no samples yet", "muted empty")); return; }
  const [t, body] = table(["version", "samples", "escalations", "audits", "cloud labels",
    "operator labels", "unlabelled", "KB", "top devices"]);
  entries.forEach(e => {
    const tr = body.appendChild(document.createElement("tr"));
    tr.dataset.version = String(e.version);
    cell(tr, "v" + e.version);
    cell(tr, String(e.samples), "samples");
    ["escalation", "audit"].forEach(k => cell(tr, String(e.by_kind[k] || 0), k));
    ["cloud", "operator", "none"].forEach(k => cell(tr, String(e.by_label_source[k] || 0), "label-" + k));
    cell(tr, (e.bytes / 1024).toFixed(1), "kb");
    // the API's top devices (the most samples first), e.devices of them in all
    const devices = Object.entries(e.by_device).sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
    const top = devices.slice(0, TOP_DEVICES).map(([d, n]) => d + " " + n).join(", ");
    const rest = e.devices - Math.min(devices.length, TOP_DEVICES);
    const more = rest > 0 ? " (+" + rest + " more)" : "";
    cell(tr, top + more, "devices");
  });
  box.replaceChildren(t);
}

// The manifest's epsilon as the devices reported it with their audits, against the
// interval (at the manifest's delta: /fleet/loop computes it there).
function guaranteeCells(tr, audit) {
  const eps = audit.epsilon;
  if (eps === null || eps === undefined) { cell(tr, "–", "epsilon", "muted"); cell(tr, "no ε in the manifest", "verdict", "muted"); return; }
  cell(tr, pct(eps) + " (δ " + audit.delta + ")", "epsilon");
  let verdict = ["undecided: ε is inside the interval", "verdict-wait"];
  if (audit.error_low !== null && audit.error_low > eps) { verdict = ["above ε", "verdict-fail"]; }
  else if (audit.error_high !== null && audit.error_high <= eps) { verdict = ["within ε", "verdict-pass"]; }
  cell(tr, verdict[0], "verdict", verdict[1]);
}

function renderLoopVersions(versions) {
  const box = $("loop-versions");
  if (!versions.length) { box.replaceChildren(text("p", "no shadow or audit figures yet", "muted empty")); return; }
  const [t, body] = table(["version", "shadow runs", "labelled", "candidate vs cloud",
    "serving vs cloud", "difference [95%]", "agrees with serving", "would escalate",
    "audited", "edge error [interval]", "ε (manifest)", "against ε"]);
  versions.forEach(v => {
    const tr = body.appendChild(document.createElement("tr"));
    tr.dataset.version = String(v.version);
    cell(tr, "v" + v.version);
    const s = v.shadow;
    if (s) {
      const dropped = s.dropped ? ", " + s.dropped + " dropped" : "";
      cell(tr, s.samples + " on " + plural(s.devices, "device") + dropped, "shadow-samples");
      cell(tr, String(s.labelled), "labelled");
      cell(tr, pct(s.candidate_agreement), "candidate-agreement");
      cell(tr, pct(s.serving_agreement), "serving-agreement");
      cell(tr, points(s.diff) + (s.diff_low === null ? "" : " [" + points(s.diff_low) + ", " + points(s.diff_high) + "]"), "diff");
      cell(tr, pct(s.agreement_serving), "agreement-serving");
      cell(tr, pct(s.would_escalate_rate), "would-escalate");
    } else {
      wide(tr, "no shadow", 7, "shadow");
    }
    const a = v.audit;
    if (a) {
      cell(tr, a.wrong + " wrong of " + a.audited + " on " + plural(a.devices, "device"), "audited");
      const level = Math.round(100 * (1 - a.delta));
      cell(tr, pct(a.error) + interval(a.error_low, a.error_high) + " " + level + "%", "error");
      guaranteeCells(tr, a);
    } else {
      wide(tr, "no audits", 4, "audit");
    }
  });
  box.replaceChildren(t);
}

function gateLine(g, r) {
  const p = text("p", "", "gate");
  p.appendChild(text("span", "gate " + g.state, "gate-state gate-" + g.state));
  let figures = " candidate " + pct(g.candidate_agreement) + " vs serving " + pct(g.serving_agreement)
    + " agreement with the cloud, " + points(g.diff);
  if (g.diff_low !== null && g.diff_low !== undefined) { figures += " [" + points(g.diff_low) + ", " + points(g.diff_high) + "]"; }
  figures += " on " + g.labelled + " labelled (min " + r.min_samples + "), margin " + points(r.margin).slice(1);
  if (g.paired === false) { figures += " (interval: the worst case, without the agents' paired counts)"; }
  if (g.candidate_audit_error !== null && g.candidate_audit_error !== undefined) {
    figures += "; audit error " + pct(g.candidate_audit_error) + " vs serving " + pct(g.serving_audit_error);
  }
  p.appendChild(text("span", figures, "figures"));
  if (g.detail) { p.appendChild(text("span", " — " + g.detail, "muted reason")); }
  return p;
}

function renderLoopRollouts(model, rollouts) {
  const box = $("loop-rollouts");
  if (!rollouts.length) { box.replaceChildren(text("p", "no rollouts of " + model + " yet", "muted empty")); return; }
  box.replaceChildren(...rollouts.map(r => {
    const div = document.createElement("div");
    div.className = "loop-rollout";
    div.dataset.rollout = String(r.rollout);
    const head = div.appendChild(document.createElement("p"));
    head.appendChild(text("b", "#" + r.rollout + " " + r.release + " "));
    head.appendChild(text("span", r.state, "state-" + r.state));
    head.appendChild(text("span", r.shadow ? " · phase " + r.phase : " · no shadow phase", "phase"));
    if (r.detail) { head.appendChild(text("span", " · " + r.detail, "muted detail")); }
    if (r.gate) {
      div.appendChild(gateLine(r.gate, r));
      if (r.acted_on && r.acted_on.state !== r.gate.state) {
        div.appendChild(text("p", "the controller last acted on: gate " + r.acted_on.state, "muted"));
      }
    } else if (r.shadow) {
      div.appendChild(text("p", "no gate decision yet", "muted gate"));
    }
    return div;
  }));
}

const IDENTIFIER = /^[A-Za-z0-9_-]{1,64}$/;  // shared/identifiers.py: what the API takes

// The samples summary of one model (every model's when null), a few devices per version.
function samplesOf(model) {
  return api("/fleet/samples/summary?" + (model === null ? "" : "model=" + encodeURIComponent(model) + "&")
    + "top=" + TOP_DEVICES);
}

async function refreshLoop(summary) {
  const run = ++loopRun;
  try {
    // asked for the model the panel will most likely show: the operator's, else the most
    // served; asked again only when that guess is not among the models
    const chosen = loopModel !== null && IDENTIFIER.test(loopModel) ? loopModel : null;
    const guess = chosen !== null ? chosen : (loopModels(summary, [])[0] || null);
    let samples = await samplesOf(guess);
    if (run !== loopRun) { return; }
    const models = loopModels(summary, samples.model_names);
    const model = loopModel !== null && models.includes(loopModel) ? loopModel : (models[0] || null);
    if (model !== null && model !== guess) {
      samples = await samplesOf(model);
      if (run !== loopRun) { return; }
    }
    renderModelChoice(models, model);
    if (model === null) {
      $("loop-samples").replaceChildren(text("p", "no samples yet", "muted empty"));
      $("loop-versions").replaceChildren(text("p", "no models in the fleet yet", "muted empty"));
      $("loop-rollouts").replaceChildren();
      return;
    }
    const loop = await api("/fleet/loop?model=" + encodeURIComponent(model));
    if (run !== loopRun) { return; }
    renderLoopSamples(samples.models.filter(e => e.model === model));
    renderLoopVersions(loop.versions);
    renderLoopRollouts(model, loop.rollouts);
    $("loop-updated").textContent = model + ", updated " + new Date().toLocaleTimeString();
  } catch (err) {
    if (run === loopRun) { $("loop-updated").textContent = "cannot read the learning loop: " + err; }
  }
}

$("loop-model").addEventListener("change", () => {
  loopModel = $("loop-model").value;
  FRAGMENT.set("model", loopModel);
  history.replaceState(null, "", "#" + FRAGMENT.toString());
  if (lastSummary) { refreshLoop(lastSummary); }
});

$("next").addEventListener("click", () => {
  if ($("next").dataset.cursor) { pages.push($("next").dataset.cursor); refresh(); }
});
$("prev").addEventListener("click", () => {
  if (pages.length > 1) { pages.pop(); refresh(); }
});

refresh();
setInterval(refresh, 2000);
