// steplog web UI: pages routed by the URL's hash (#/path?query), so a link
// shows the same view. Plain modules, no build step.
import { Chart, bars, curves, num } from "./charts.js";

const app = document.getElementById("app");
const crumbs = document.getElementById("crumbs");
const TOKEN_KEY = "steplog.token";
let timers = [];
let page = 0;

window.steplog = window.steplog || {};

// -- the API ------------------------------------------------------------------

class Refused extends Error {}

async function request(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
  const ws = route().params.get("ws");
  if (ws) q.set("workspace", ws);
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const r = await fetch(`/api/${path}?${q}`, { headers });
  if (!r.ok) {
    const body = await r.json().catch(() => ({ error: r.statusText }));
    if (r.status === 401 || r.status === 403) throw new Refused(body.error || "refused");
    throw new Error(body.error || `HTTP ${r.status}`);
  }
  return r;
}

async function api(path, params = {}) {
  return (await request(path, params)).json();
}

// A chart in the service's binary form (ingest/ui/server.py chart_binary):
// uint32 N, N bytes of JSON, then per series n float64 steps, n float64
// values (NaN and infinities as they are) and, by wall time, n float64 times.
async function chartApi(params) {
  const buf = await (await request("chart", { ...params, format: "binary" })).arrayBuffer();
  const n = new DataView(buf).getUint32(0, true);
  const got = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, n)));
  let at = 4 + n;
  const next = (k) => { const a = Array.from(new Float64Array(buf, at, k)); at += 8 * k; return a; };
  for (const s of got.series) {
    s.steps = next(s.n);
    s.values = next(s.n);
    s.times = got.times ? next(s.n) : s.steps.map(() => null);
  }
  return got;
}

// -- small DOM helpers --------------------------------------------------------------

function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) el.append(kid instanceof Node ? kid : String(kid));
  return el;
}

function route() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, query] = raw.split("?");
  return { path, params: new URLSearchParams(query || "") };
}

function link(path, params) {
  const q = new URLSearchParams(params);
  const ws = route().params.get("ws");
  if (ws && !q.has("ws")) q.set("ws", ws);
  const s = q.toString();
  return `#${path}${s ? "?" + s : ""}`;
}

function setParams(update, push = false) {
  const { path, params } = route();
  for (const [k, v] of Object.entries(update)) {
    if (v === null || v === undefined || v === "" || v === false) params.delete(k); else params.set(k, v);
  }
  const url = `#${path}?${params}`;
  if (push) location.hash = url; else history.replaceState(null, "", url);
}

function every(ms, fn) { const id = setInterval(fn, ms); timers.push(id); }

const fmtTime = (iso) => (iso ? new Date(iso).toLocaleString() : "");
function fmtDuration(s) {
  if (s === null || s === undefined) return "";
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} m ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} m`;
}
function fmtValue(v) {
  v = num(v);
  if (typeof v !== "number") return v ?? "";
  if (!Number.isFinite(v)) return String(v);
  return Math.abs(v) >= 1e5 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3) : String(+v.toPrecision(5));
}
const status = (s) => h("span", { class: `status ${s}` }, s);
const chips = (obj) => Object.entries(obj || {}).map(([k, v]) => h("span", { class: "chip" }, v === null ? k : `${k}: ${v}`));
const runName = (r) => r.display_name || `#${r.number}`;

// -- pages --------------------------------------------------------------------------

async function home() {
  crumbs.replaceChildren();
  const got = await api("experiments", { recent: 5 });
  const cards = got.experiments.map((e) => h("div", { class: "card" },
    h("a", { href: link("/runs", { exp: e.name }), class: "exp" }, h("b", {}, e.name)),
    h("div", { class: "muted" }, `${e.run_count} runs`, e.archived ? " · archived" : "",
      e.last_run_at ? ` · last ${fmtTime(e.last_run_at)}` : ""),
    h("div", {}, chips(e.tags)),
    h("ul", {}, e.recent_runs.map((r) => h("li", {}, status(r.status), " ",
      h("a", { href: link("/run", { id: r.run_id }) }, runName(r)))))));
  const recent = h("table", { class: "grid" },
    h("tr", {}, ["status", "run", "experiment", "started", "duration"].map((c) => h("th", {}, c))),
    got.recent_runs.map((r) => h("tr", {}, h("td", {}, status(r.status)),
      h("td", {}, h("a", { href: link("/run", { id: r.run_id }) }, runName(r))),
      h("td", {}, h("a", { href: link("/runs", { exp: r.experiment }) }, r.experiment)),
      h("td", {}, fmtTime(r.start_time)), h("td", { class: "num" }, fmtDuration(r.duration_s)))));
  app.replaceChildren(h("h2", {}, "Experiments"),
    got.experiments.length ? h("div", { class: "cards" }, cards) : h("p", { class: "muted" }, "No experiments yet."),
    h("h3", {}, "Most recent runs"), recent);
}

// The runs of an experiment: a table with filter, sort, metric columns and child runs as a tree.
async function runsPage() {
  const { params } = route();
  const exp = params.get("exp");
  crumbs.replaceChildren(h("a", { href: link("/", {}) }, "experiments"), " / ", exp);
  const metrics = (params.get("metrics") || "").split(",").filter(Boolean);
  let got = await api("runs", { experiment: exp, metrics: metrics.join(",") });
  const selected = new Set((params.get("sel") || "").split(",").filter(Boolean));
  const collapsed = new Set((params.get("fold") || "").split(",").filter(Boolean));
  const filter = h("input", { type: "search", placeholder: "filter: text or key=value", value: params.get("q") || "", size: 30 });
  const metricSel = h("select", { multiple: true, size: 4, title: "metric columns" },
    got.metric_names.map((m) => h("option", { value: m, selected: metrics.includes(m) }, m)));
  const compare = h("a", { class: "compare", href: "#" }, "compare selected");
  const table = h("table", { class: "grid runs" });
  const columns = [["status", (r) => r.status], ["name", (r) => runName(r)], ["number", (r) => r.number],
    ["start", (r) => r.start_time || ""], ["duration", (r) => r.duration_s ?? -1], ["tags", (r) => JSON.stringify(r.tags)],
    ["properties", (r) => JSON.stringify(r.properties)],
    ...metrics.map((m) => [m, (r) => { const v = num((r.metrics || {})[m]); return typeof v === "number" ? v : -Infinity; }])];

  function matches(r, q) {
    if (!q) return true;
    const eq = q.indexOf("=");
    if (eq > 0) {
      const k = q.slice(0, eq).trim(), v = q.slice(eq + 1).trim();
      return String({ ...r.properties, ...r.tags, status: r.status }[k] ?? "") === v;
    }
    const text = [runName(r), r.run_id, r.status, JSON.stringify(r.tags), JSON.stringify(r.properties)].join(" ").toLowerCase();
    return text.includes(q.toLowerCase());
  }

  function draw() {
    const q = filter.value.trim();
    const sortCol = params.get("sort") || "start";
    const desc = params.get("desc") !== "0";
    const key = (columns.find((c) => c[0] === sortCol) || columns[3])[1];
    const byId = new Map(got.runs.map((r) => [r.run_id, r]));
    const kids = new Map();
    for (const r of got.runs) {
      const p = r.parent_run_id && byId.has(r.parent_run_id) ? r.parent_run_id : "";
      if (!kids.has(p)) kids.set(p, []);
      kids.get(p).push(r);
    }
    const keep = new Set();  // a match keeps its ancestors, so the tree stays whole
    for (const r of got.runs) if (matches(r, q)) { let x = r; while (x && !keep.has(x.run_id)) { keep.add(x.run_id); x = byId.get(x.parent_run_id); } }
    const cmp = (a, b) => { const x = key(a), y = key(b); const o = x < y ? -1 : x > y ? 1 : 0; return desc ? -o : o; };
    const rows = [];
    const walk = (parent, depth) => {
      for (const r of (kids.get(parent) || []).filter((r) => keep.has(r.run_id)).sort(cmp)) {
        const has = (kids.get(r.run_id) || []).length > 0;
        const box = h("input", { type: "checkbox", class: "pick", "data-run": r.run_id, checked: selected.has(r.run_id),
          onchange: (e) => { e.target.checked ? selected.add(r.run_id) : selected.delete(r.run_id); setParams({ sel: [...selected].join(",") }); updateCompare(); } });
        const toggle = h("span", { class: "tree-toggle", onclick: () => { collapsed.has(r.run_id) ? collapsed.delete(r.run_id) : collapsed.add(r.run_id); setParams({ fold: [...collapsed].join(",") }); draw(); } },
          has ? (collapsed.has(r.run_id) ? "▸" : "▾") : "");
        rows.push(h("tr", { "data-run": r.run_id }, h("td", {}, box), h("td", {}, status(r.status)),
          h("td", { style: `padding-left:${8 + depth * 18}px` }, toggle, h("a", { href: link("/run", { id: r.run_id }) }, runName(r))),
          h("td", { class: "num" }, r.number), h("td", {}, fmtTime(r.start_time)), h("td", { class: "num" }, fmtDuration(r.duration_s)),
          h("td", {}, chips(r.tags)), h("td", {}, chips(r.properties)),
          metrics.map((m) => h("td", { class: "num metric", "data-metric": m }, fmtValue((r.metrics || {})[m])))));
        if (has && !collapsed.has(r.run_id)) walk(r.run_id, depth + 1);
      }
    };
    walk("", 0);
    const head = h("tr", {}, h("th", {}, ""), columns.map(([c]) => h("th", {
      onclick: () => { const d = sortCol === c ? (desc ? "0" : "1") : "1"; setParams({ sort: c, desc: d }); params.set("sort", c); params.set("desc", d); draw(); },
    }, c + (c === sortCol ? (desc ? " ↓" : " ↑") : ""))));
    table.replaceChildren(head, ...rows);
  }

  function updateCompare() {
    const ms = metrics.length ? metrics : got.metric_names.slice(0, 6);
    compare.href = link("/compare", { runs: [...selected].join(","), metrics: ms.join(","), exp });
    compare.textContent = `compare selected (${selected.size})`;
  }

  filter.addEventListener("input", () => { setParams({ q: filter.value }); draw(); });
  metricSel.addEventListener("change", () => {
    setParams({ metrics: [...metricSel.selectedOptions].map((o) => o.value).join(",") });
    go();
  });
  app.replaceChildren(h("h2", {}, exp, " ", chips(got.tags)),
    h("div", { class: "toolbar" }, filter, h("label", {}, "metric columns "), metricSel, compare,
      got.truncated ? h("span", { class: "muted" }, "(newest runs only)") : null),
    table);
  draw();
  updateCompare();
  const mine = page;
  every(5000, async () => {
    if (mine !== page || !got.runs.some((r) => ["Running", "NotResponding", "Queued", "Finalizing"].includes(r.status))) return;
    got = await api("runs", { experiment: exp, metrics: metrics.join(",") });
    draw();
  });
}

// Compare runs: one chart per metric.
async function comparePage() {
  const { params } = route();
  const ids = (params.get("runs") || "").split(",").filter(Boolean);
  const metrics = (params.get("metrics") || "").split(",").filter(Boolean);
  const exp = params.get("exp");
  crumbs.replaceChildren(h("a", { href: link("/", {}) }, "experiments"), " / ",
    exp ? h("a", { href: link("/runs", { exp, sel: ids.join(",") }) }, exp) : "", " / compare");
  const metaP = api("runs-meta", { ids: ids.join(",") });
  const opts = {
    x: params.get("x") || "step",
    smooth: Number(params.get("smooth") || 0),
    group: params.get("group") || "",
    labels: params.get("labels") || "lines",
    range: params.get("range") ? params.get("range").split(",").map(Number) : null,
  };
  const grid = h("div", { class: "charts" });
  const charts = [];
  const runsOf = {};
  app.replaceChildren(h("h2", {}, `Compare ${ids.length} runs`), grid);
  window.steplog.charts = {};
  window.steplog.firstChartMs = undefined;

  const zoom = (range) => {
    setParams({ range: range ? range.map((v) => +v.toPrecision(12)).join(",") : null });
    for (const c of charts) { c.range = range; c.refresh().catch(show); }
  };
  for (const m of metrics) {
    const el = h("div", { class: "chart", "data-metric": m });
    grid.append(el);
    const chart = new Chart(el, m, m, async (range) => {
      const got = await chartApi({ metric: m, runs: ids.join(","), width: chart.width(), x: opts.x,
        start: range ? range[0] : "", end: range ? range[1] : "" });
      await metaP;
      got.runs = runsOf;
      return got;
    }, opts, zoom);
    charts.push(chart);
  }
  // The first chart first (its request goes out with the runs' details): it
  // is what a user looks at while the others load.
  const first = charts.length ? charts[0].refresh() : Promise.resolve();
  const meta = await metaP;
  for (const r of meta.runs) runsOf[r.run_id] = r;
  const tagKeys = [...new Set(meta.runs.flatMap((r) => Object.keys(r.tags || {})))].sort();

  const sel = (name, values, current) => h("select", { "data-opt": name, onchange: (e) => { setParams({ [name]: e.target.value, range: null }); go(); } },
    values.map(([v, t]) => h("option", { value: v, selected: v === current }, t)));
  const smoothIn = h("input", { type: "range", min: 0, max: 0.99, step: 0.01, value: opts.smooth, "data-opt": "smooth",
    onchange: (e) => { setParams({ smooth: e.target.value }); go(); } });
  const toolbar = h("div", { class: "toolbar" },
    h("label", {}, "x "), sel("x", [["step", "step"], ["time", "wall time"]], opts.x),
    h("label", {}, "smoothing "), smoothIn,
    h("label", {}, "group by tag "), sel("group", [["", "(none)"], ...tagKeys.map((k) => [k, k])], opts.group),
    h("label", {}, "labels "), sel("labels", [["lines", "as lines"], ["grouped", "grouped"]], opts.labels),
    h("span", { class: "muted" }, "drag to zoom (re-queried at full resolution), double-click to reset"));
  grid.before(toolbar);
  await first;
  await Promise.all(charts.slice(1).map((c) => c.refresh()));
  const mine = page;
  // Live: while a run is Running, its charts grow without a reload.
  every(2000, async () => {
    if (mine !== page) return;
    const live = Object.values(runsOf).some((r) => ["Running", "NotResponding", "Queued", "Finalizing"].includes(r.status));
    if (!live) return;
    const fresh = await api("runs-meta", { ids: ids.join(",") });
    for (const r of fresh.runs) Object.assign(runsOf[r.run_id] || (runsOf[r.run_id] = {}), r);
    await Promise.all(charts.map((c) => c.refresh()));
  });
}

// One run: metrics, system metrics, tables, evaluations, images, files.
async function runPage() {
  const { params } = route();
  const id = params.get("id");
  const run = await api("run", { id });
  crumbs.replaceChildren(h("a", { href: link("/", {}) }, "experiments"), " / ",
    h("a", { href: link("/runs", { exp: run.experiment }) }, run.experiment), " / ", runName(run));
  const kv = (rows) => h("table", { class: "kv" }, rows.map(([k, v]) => h("tr", {}, h("td", { class: "muted" }, k), h("td", {}, v))));
  const scalars = [...new Set(run.series.filter((s) => s.kind === "scalar").map((s) => s.name))];
  const system = scalars.filter((n) => n.startsWith("system/"));
  const metrics = scalars.filter((n) => !n.startsWith("system/"));
  const texts = run.series.filter((s) => s.kind === "text");
  const sections = [
    h("h2", {}, runName(run), " ", status(run.status)),
    kv([["run id", run.run_id], ["started", fmtTime(run.start_time)], ["duration", fmtDuration(run.duration_s)],
      ["tags", chips(run.tags)], ["properties", chips(run.properties)],
      ["parent", run.parent_run_id ? h("a", { href: link("/run", { id: run.parent_run_id }) }, run.parent_run_id) : "—"],
      ["children", run.children.length ? run.children.map((c) => h("span", {}, h("a", { href: link("/run", { id: c.run_id }) }, runName(c)), " ")) : "—"],
      ...(run.error ? [["error", h("span", { class: "error" }, run.error)]] : []),
      ...texts.map((s) => [s.name, String(s.last_value)])]),
  ];
  if (run.children.length) {
    const compare = link("/compare", { runs: run.children.map((c) => c.run_id).join(","), metrics: metrics.slice(0, 6).join(","), exp: run.experiment });
    sections.push(h("p", {}, h("a", { href: compare }, `compare the ${run.children.length} child runs`)));
  }
  const chartsEl = h("div", { class: "charts" });
  const systemEl = h("div", { class: "charts" });
  const evalEl = h("div", { class: "cards evaluations" });
  const tablesEl = h("div", {});
  const imagesEl = h("div", { class: "cards images" });
  const histEl = h("div", { class: "cards histograms" });
  const filesEl = h("div", {});
  sections.push(h("h3", {}, "Metrics"), metrics.length ? chartsEl : h("p", { class: "muted" }, "none"));
  if (system.length) sections.push(h("h3", {}, "System"), systemEl);
  app.replaceChildren(...sections, h("h3", {}, "Evaluations"), evalEl, h("h3", {}, "Tables"), tablesEl,
    h("h3", {}, "Images"), imagesEl, h("h3", {}, "Histograms"), histEl, h("h3", {}, "Files"), filesEl);
  window.steplog.charts = {};
  const charts = [];
  const zoom = (range) => { for (const c of charts) { c.range = range; c.refresh().catch(show); } };
  for (const [names, where] of [[metrics, chartsEl], [system, systemEl]]) {
    for (const m of names) {
      const el = h("div", { class: "chart", "data-metric": m });
      where.append(el);
      const c = new Chart(el, m, m, async (range) => {
        const got = await chartApi({ metric: m, runs: id, width: c.width(), start: range ? range[0] : "", end: range ? range[1] : "" });
        got.runs = { [id]: run };
        return got;
      }, { x: "step", smooth: 0, labels: "lines" }, zoom);
      charts.push(c);
    }
  }
  const work = [Promise.all(charts.map((c) => c.refresh()))];
  const others = run.series.filter((s) => !["scalar", "text"].includes(s.kind));
  if (!others.some((s) => !["image", "table", "histogram"].includes(s.kind))) evalEl.append(h("p", { class: "muted" }, "none"));
  for (const s of others) {
    const args = { run: id, name: s.name, labels: JSON.stringify(s.labels) };
    if (s.kind === "table") work.push(api("table", { ...args, limit: 200 }).then((t) => drawTable(tablesEl, s, t)));
    else if (s.kind === "image") work.push(api("images", args).then((t) => drawImages(imagesEl, s, t)));
    else if (s.kind === "histogram") work.push(api("histograms", args).then((t) => drawHistograms(histEl, s, t)));
    else work.push(api("evaluation", args).then((t) => drawEvaluation(evalEl, s, t)));
  }
  work.push(api("files", { run: id }).then((f) => {
    filesEl.append(f.files.length ? h("table", { class: "grid files" }, h("tr", {}, h("th", {}, "path"), h("th", {}, "size"), h("th", {}, "type")),
      f.files.map((x) => h("tr", {}, h("td", {}, h("a", { href: x.url, download: x.path.split("/").pop() }, x.path)),
        h("td", { class: "num" }, x.size.toLocaleString()), h("td", {}, x.content_type)))) : h("p", { class: "muted" }, "none"));
  }));
  await Promise.all(work);
  if (!tablesEl.childElementCount) tablesEl.append(h("p", { class: "muted" }, "none"));
  if (!imagesEl.childElementCount) imagesEl.append(h("p", { class: "muted" }, "none"));
  if (!histEl.childElementCount) histEl.append(h("p", { class: "muted" }, "none"));
  const mine = page;
  every(3000, async () => {
    if (mine !== page || !["Running", "NotResponding"].includes(run.status)) return;
    Object.assign(run, await api("run", { id }));
    await Promise.all(charts.map((c) => c.refresh()));
  });
}

function drawTable(el, s, t) {
  el.append(h("div", { class: "card table-series", "data-name": s.name }, h("b", {}, s.name), h("span", { class: "muted" }, ` (last ${t.rows.length} rows)`),
    h("div", { style: "overflow:auto;max-height:320px" }, h("table", { class: "grid" },
      h("tr", {}, h("th", {}, "step"), t.columns.map((c) => h("th", {}, c))),
      t.rows.map((r) => h("tr", {}, h("td", { class: "num" }, r.step), r.cells.map((v) => h("td", { class: "num" }, fmtValue(v)))))))));
}

function drawImages(el, s, t) {
  const card = h("div", { class: "card image-series", "data-name": s.name });
  const img = h("img", { alt: s.name });
  const cap = h("div", { class: "muted" });
  const show = (i) => { const im = t.images[i]; if (!im) return; img.src = im.url; cap.textContent = `step ${im.step} · ${im.width}×${im.height} · ${im.content_type}`; };
  const slider = h("input", { type: "range", min: 0, max: Math.max(0, t.images.length - 1), value: Math.max(0, t.images.length - 1), class: "step-slider",
    oninput: (e) => show(Number(e.target.value)) });
  card.append(h("b", {}, s.name), h("div", {}, img), cap, t.images.length > 1 ? slider : null);
  el.append(card);
  show(t.images.length - 1);
}

// Histograms over steps: the one at the slider's step as bars.
function drawHistograms(el, s, t) {
  const card = h("div", { class: "card histogram-series", "data-name": s.name });
  const body = h("div", {});
  const cap = h("div", { class: "muted" });
  el.append(card);
  let u = null;
  const show = (i) => {
    const x = t.histograms[i];
    if (!x) return;
    const e = x.edges.map(num);
    const mids = x.counts.map((_, k) => (e[k] + e[k + 1]) / 2);
    cap.textContent = `step ${x.step} · ${x.counts.length} bins` + (x.underflow || x.overflow || x.nan_count ? ` · under ${x.underflow}, over ${x.overflow}, NaN ${x.nan_count}` : "");
    if (u) u.destroy();
    body.replaceChildren();
    u = bars(body, "", mids, x.counts, "count");
  };
  const slider = h("input", { type: "range", min: 0, max: Math.max(0, t.histograms.length - 1), value: Math.max(0, t.histograms.length - 1), class: "step-slider",
    oninput: (e) => show(Number(e.target.value)) });
  card.append(h("b", {}, s.name), body, cap, t.histograms.length > 1 ? slider : null);
  show(t.histograms.length - 1);
}

function drawEvaluation(el, s, t) {
  const card = h("div", { class: `card evaluation ${s.kind}`, "data-name": s.name });
  el.append(card);
  card.append(h("b", {}, s.name), h("span", { class: "muted" }, ` ${s.kind}` + (t.latest ? ` · step ${t.latest.step}` : "")));
  if (!t.latest) return;
  const d = t.latest.document.data;
  if (s.kind === "confusion_matrix") {
    const m = d.matrix, labels = d.class_labels.map(String);
    const max = Math.max(1, ...m.flat());
    window.steplog.confusion = window.steplog.confusion || {};
    window.steplog.confusion[s.name] = m;
    card.append(h("table", { class: "confusion" },
      h("tr", {}, h("th", {}, "true \\ predicted"), labels.map((l) => h("th", {}, l))),
      m.map((row, i) => h("tr", {}, h("th", {}, labels[i]), row.map((v) => {
        const a = v / max;
        return h("td", { style: `background:rgba(31,119,180,${a.toFixed(3)});color:${a > 0.5 ? "#fff" : "#000"}`, title: `${v}` }, v);
      })))));
  } else if (s.kind === "accuracy_table") {
    const th = d.probability_thresholds, tabs = d.probability_tables;
    const roc = [], pr = [];
    tabs.forEach((cls) => {
      const pts = cls.map(([tp, fp, tn, fn]) => [fp / (fp + tn || 1), tp / (tp + fn || 1), tp + fp ? tp / (tp + fp) : null]);
      const r = pts.map((p) => [p[0], p[1]]).sort((a, b) => a[0] - b[0]);
      const p = pts.filter((q) => q[2] !== null).map((q) => [q[1], q[2]]).sort((a, b) => a[0] - b[0]);
      roc.push([r.map((q) => q[0]), r.map((q) => q[1])]);
      pr.push([p.map((q) => q[0]), p.map((q) => q[1])]);
    });
    const names = d.class_labels.map(String);
    const a = h("div", {}), b = h("div", {});
    card.append(a, b, h("div", { class: "muted" }, `${th.length} thresholds`));
    curves(a, "ROC (true positive rate by false positive rate)", "FPR", roc, names);
    curves(b, "precision-recall (precision by recall)", "recall", pr, names);
  } else if (s.kind === "predictions") {
    const e = d.bin_edges, xs = d.bin_averages.map((_, i) => (e[i] + e[i + 1]) / 2);
    const a = h("div", {});
    card.append(a);
    bars(a, "mean prediction by bin of the true value", xs, d.bin_averages, "average");
  } else if (s.kind === "residuals") {
    const e = d.bin_edges, xs = d.bin_counts.map((_, i) => (e[i] + e[i + 1]) / 2);
    const a = h("div", {});
    card.append(a);
    bars(a, "residuals (count by bin)", xs, d.bin_counts, "count");
  }
}

// -- the frame: who am I, a token when needed, errors ---------------------------------------

function askToken(message) {
  const input = h("input", { type: "password", placeholder: "stl_…", autocomplete: "off", name: "token" });
  const form = h("form", { class: "refused", onsubmit: (e) => { e.preventDefault(); sessionStorage.setItem(TOKEN_KEY, input.value.trim()); go(); } },
    h("h2", {}, "A token is needed"), h("p", { class: "error" }, message),
    h("p", {}, "Paste a steplog token (a reader token is enough: ", h("code", {}, "steplog-ingest token create --role reader"),
      "). It is kept in this tab only (sessionStorage)."), input, h("button", { type: "submit" }, "open"));
  app.replaceChildren(form);
  window.steplog.refused = message;
}

function show(err) {
  if (err instanceof Refused) { askToken(err.message); return; }
  console.error(err);
  app.append(h("p", { class: "error" }, String(err.message || err)));
}

async function go() {
  for (const t of timers) clearInterval(t);
  timers = [];
  page += 1;
  window.steplog.refused = undefined;
  try {
    // Who am I goes out with the page's own requests (a refused token refuses both).
    const whoP = api("whoami").then((who) => {
      document.getElementById("who").textContent = who.auth === "token" ? `workspace ${who.workspace} · ${who.role} token ${who.token_id}` : `workspace ${who.workspace}`;
    });
    whoP.catch(() => {});
    const { path } = route();
    if (path === "/runs") await runsPage();
    else if (path === "/compare") await comparePage();
    else if (path === "/run") await runPage();
    else await home();
    await whoP;
    window.steplog.ready = true;
  } catch (err) { show(err); }
}

window.addEventListener("hashchange", go);
go();
