"use strict";
// The fleet dashboard: polls /fleet/summary and a page of /fleet/devices, draws with <canvas>.
// No framework and no CDN: everything it needs is in this file.

const PAGE = 50;  // devices per page of the table (the API pages by a cursor: ?after=)
// the cursor of each page seen so far: pages[0] is the first (no cursor)
const pages = [null];

const COLORS = ["#3465a4", "#f57900", "#4e9a06", "#75507b", "#cc0000", "#c4a000", "#06989a", "#555753"];

function $(id) { return document.getElementById(id); }

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
      fetch("/fleet/summary").then(r => r.json()),
      fetch(devicesUrl()).then(r => r.json()),
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
  } catch (err) {
    $("updated").textContent = "cannot reach the server: " + err;
  }
}

$("next").addEventListener("click", () => {
  if ($("next").dataset.cursor) { pages.push($("next").dataset.cursor); refresh(); }
});
$("prev").addEventListener("click", () => {
  if (pages.length > 1) { pages.pop(); refresh(); }
});

refresh();
setInterval(refresh, 2000);
