// Line charts of scalar series with uPlot: one chart per metric, one line per
// (run, labels), NaN and infinities marked, smoothing, groups drawn as their
// mean with a min-max band, zoom that re-queries the service.
//
// What each chart holds is kept in window.steplog.charts[<key>]: `series` is
// the data the service sent (values as numbers, NaN included), `drawn` the
// arrays handed to uPlot. Tests read these, not pixels.

const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#17becf"];

export function color(i) { return COLORS[i % COLORS.length]; }

export function num(v) { return typeof v === "string" ? Number(v) : v; }

function state() {
  const s = (window.steplog = window.steplog || {});
  s.charts = s.charts || {};
  return s;
}

// Exponential moving average over the finite values, debiased (as TensorBoard).
export function smooth(ys, weight) {
  if (!weight) return ys;
  let last = 0, n = 0;
  return ys.map((v) => {
    if (v === null || v === undefined || !Number.isFinite(v)) return v === undefined ? undefined : null;
    last = last * weight + (1 - weight) * v;
    n += 1;
    return last / (1 - Math.pow(weight, n));
  });
}

function label(s, runs, showLabels) {
  const run = runs[s.run_id] || {};
  let name = run.display_name || (run.number !== undefined ? `#${run.number}` : s.run_id);
  const keys = Object.keys(s.labels || {});
  if (showLabels && keys.length) name += " " + keys.map((k) => `${k}=${s.labels[k]}`).join(",");
  return name;
}

// Per x of the joined table, the value a series had last (within its own range).
function carried(xs, ys) {
  const out = new Array(xs.length).fill(null);
  let last = null, first = -1, end = -1;
  for (let i = 0; i < ys.length; i++) if (ys[i] !== undefined) { if (first < 0) first = i; end = i; }
  for (let i = 0; i < ys.length; i++) {
    if (ys[i] !== undefined) last = ys[i];
    if (i >= first && i <= end && last !== null && Number.isFinite(last)) out[i] = last;
  }
  return out;
}

const ascending = (xs) => { for (let i = 1; i < xs.length; i++) if (!(xs[i - 1] <= xs[i])) return false; return true; };

// uPlot.join for tables whose xs ascend (steps always do): the union of the
// xs by one typed-array sort, then each table's values by one merge walk
// (undefined where a table has no point: uPlot draws across it; null stays a gap).
export function join(tables) {
  if (!tables.every(([xs]) => ascending(xs))) return window.uPlot.join(tables, tables.map(() => [1]));
  let n = 0;
  for (const [xs] of tables) n += xs.length;
  const all = new Float64Array(n);
  let k = 0;
  for (const [xs] of tables) { all.set(xs, k); k += xs.length; }
  all.sort();
  let u = 0;
  for (let i = 0; i < n; i++) if (u === 0 || all[i] !== all[u - 1]) all[u++] = all[i];
  const xs = Array.from(all.subarray(0, u));
  const out = [xs];
  for (const [sx, sy] of tables) {
    const col = new Array(u).fill(undefined);
    for (let i = 0, j = 0; i < sx.length; i++) {
      const x = sx[i];
      while (xs[j] < x) j++;
      col[j] = sy[i];
    }
    out.push(col);
  }
  return out;
}

// The uPlot data and series options for one chart.
export function build(series, runs, opts) {
  const tables = series.map((s) => {
    const xs = opts.x === "time" ? s.times : s.steps;
    const ys = s.values.map((v) => (Number.isFinite(v) ? v : null));
    return [xs, ys];
  });
  const marks = [];  // [x, kind] of NaN and infinities
  series.forEach((s) => s.values.forEach((v, i) => {
    if (!Number.isFinite(v)) marks.push([opts.x === "time" ? s.times[i] : s.steps[i], Number.isNaN(v) ? "NaN" : v > 0 ? "+inf" : "-inf"]);
  }));
  if (!tables.length) return { data: [[]], series: [{}], bands: [], marks, groups: [] };
  const joined = tables.length === 1 ? [tables[0][0], tables[0][1]] : join(tables);
  const xs = joined[0];
  const cols = joined.slice(1);
  const keyOf = (s) => {
    if (opts.group) { const v = (runs[s.run_id] || {}).tags || {}; return `${opts.group}=${v[opts.group] ?? "(none)"}`; }
    if (opts.labels === "grouped" && Object.keys(s.labels || {}).length) return label(s, runs, false);
    return null;
  };
  const data = [xs], uSeries = [{ label: opts.x === "time" ? "time" : "step" }], bands = [], groups = [];
  const groupCols = new Map();
  series.forEach((s, i) => {
    const k = keyOf(s);
    if (k === null) {
      const c = color(uSeries.length - 1);
      if (opts.smooth) {
        data.push(cols[i]);
        uSeries.push({ label: label(s, runs, true) + " (raw)", stroke: c + "40", width: 1, spanGaps: false });
      }
      data.push(smooth(cols[i], opts.smooth));
      uSeries.push({ label: label(s, runs, true), stroke: c, width: 1.5, spanGaps: false });
    } else {
      if (!groupCols.has(k)) groupCols.set(k, []);
      groupCols.get(k).push(carried(xs, cols[i]));
    }
  });
  let g = 0;
  for (const [k, members] of groupCols) {
    const mean = [], lo = [], hi = [];
    for (let j = 0; j < xs.length; j++) {
      let sum = 0, n = 0, mn = Infinity, mx = -Infinity;
      for (const m of members) { const v = m[j]; if (v !== null) { sum += v; n++; if (v < mn) mn = v; if (v > mx) mx = v; } }
      mean.push(n ? sum / n : null); lo.push(n ? mn : null); hi.push(n ? mx : null);
    }
    const c = color(g++);
    const base = data.length;
    data.push(hi, lo, smooth(mean, opts.smooth));
    uSeries.push({ label: `${k} max`, stroke: c + "00", width: 0, points: { show: false } },
      { label: `${k} min`, stroke: c + "00", width: 0, points: { show: false } },
      { label: `${k} mean (${members.length})`, stroke: c, width: 2 });
    bands.push({ series: [base, base + 1], fill: c + "30" });
    groups.push({ key: k, members: members.length, mean, lo, hi });
  }
  return { data, series: uSeries, bands, marks, groups };
}

// A uPlot plugin that draws NaN (red) and infinity (orange) marks at their x.
function marksPlugin(getMarks) {
  return {
    hooks: {
      draw: (u) => {
        const ctx = u.ctx;
        ctx.save();
        for (const [x, kind] of getMarks()) {
          const px = u.valToPos(x, "x", true);
          if (px < u.bbox.left || px > u.bbox.left + u.bbox.width) continue;
          ctx.strokeStyle = kind === "NaN" ? "#d62728" : "#ff7f0e";
          ctx.lineWidth = 2 * devicePixelRatio;
          ctx.beginPath();
          ctx.moveTo(px, u.bbox.top);
          ctx.lineTo(px, u.bbox.top + 8 * devicePixelRatio);
          ctx.stroke();
          ctx.fillStyle = ctx.strokeStyle;
          ctx.font = `${10 * devicePixelRatio}px sans-serif`;
          ctx.fillText(kind, px + 3, u.bbox.top + 10 * devicePixelRatio);
        }
        ctx.restore();
      },
    },
  };
}

// One chart in `el`: fetches its data with `load(range)` (range null: all),
// draws it, re-queries on zoom (drag to zoom, double-click to reset).
export class Chart {
  constructor(el, key, title, load, opts, onZoom) {
    this.el = el; this.key = key; this.load = load; this.opts = opts; this.onZoom = onZoom;
    this.range = opts.range || null;
    el.innerHTML = "";
    this.head = document.createElement("div");
    this.head.className = "title";
    this.head.textContent = title;
    this.note = document.createElement("div");
    this.note.className = "note";
    this.body = document.createElement("div");
    el.append(this.head, this.body, this.note);
    this.u = null;
    this.marks = [];
    this.seq = 0;
  }

  async refresh() {
    const seq = ++this.seq;
    const t0 = performance.now();
    const got = await this.load(this.range);
    if (seq !== this.seq) return;
    const t1 = performance.now();
    const series = got.series.map((s) => ({ ...s, values: s.values.map(num) }));
    const built = build(series, got.runs || {}, this.opts);
    const t2 = performance.now();
    this.marks = built.marks;
    const st = state();
    st.charts[this.key] = { series, drawn: built.data, labels: built.series.map((s) => s.label),
      groups: built.groups, marks: built.marks, range: this.range, query_ms: got.query_ms,
      updates: ((st.charts[this.key] || {}).updates || 0) + 1 };
    const down = series.filter((s) => s.downsampled).length;
    const total = series.reduce((a, s) => a + s.points_in_range, 0);
    this.note.textContent = `${series.length} series, ${total.toLocaleString()} points` +
      (down ? `; ${down} downsampled to the chart's width (min, max, last and NaN of each bucket kept)` : "; full resolution") +
      ` · query ${got.query_ms} ms`;
    if (!series.length) { this.body.textContent = "no numeric points"; return; }
    const shape = built.series.map((s) => s.label).join("|") + built.bands.length;
    if (this.u && this.shape === shape) {
      this.u.setData(built.data, !this.range);
      if (this.range) this.u.setScale("x", { min: this.range[0], max: this.range[1] });
    } else {
      if (this.u) this.u.destroy();
      this.body.innerHTML = "";
      this.shape = shape;
      const width = Math.max(300, this.el.clientWidth - 16);
      const opts = {
        width, height: 260, series: built.series, bands: built.bands,
        scales: { x: { time: this.opts.x === "time", ...(this.range ? { min: this.range[0], max: this.range[1] } : {}) } },
        cursor: { drag: { x: true, y: false }, sync: { key: "steplog" } },
        legend: { live: true },
        plugins: [marksPlugin(() => this.marks)],
        hooks: {
          setSelect: [(u) => {
            if (u.select.width < 3) return;
            const lo = u.posToVal(u.select.left, "x"), hi = u.posToVal(u.select.left + u.select.width, "x");
            u.setSelect({ width: 0, height: 0 }, false);
            this.onZoom([lo, hi]);
          }],
          draw: [() => {
            const s = state();
            if (s.firstChartMs === undefined) s.firstChartMs = performance.now();
            s.charts[this.key].drawnAt = performance.now();
          }],
        },
      };
      opts.cursor.drag.setScale = false;
      this.u = new window.uPlot(opts, built.data, this.body);
      this.u.over.addEventListener("dblclick", () => this.onZoom(null));
    }
    const t3 = performance.now();
    Object.assign(st.charts[this.key], { ms: t3 - t0, fetchMs: t1 - t0, buildMs: t2 - t1, drawMs: t3 - t2 });
  }

  width() { return Math.max(100, Math.min(4096, Math.round(this.el.clientWidth || 800))); }
}

// Bars (predictions, residuals) and curves (ROC, precision-recall).
export function bars(el, title, xs, ys, label) {
  const t = document.createElement("div");
  t.className = "title"; t.textContent = title;
  const body = document.createElement("div");
  el.append(t, body);
  return new window.uPlot({
    width: Math.max(300, el.clientWidth - 16), height: 220,
    scales: { x: { time: false } },
    series: [{ label: "bin" }, { label, fill: "#1f77b480", stroke: "#1f77b4", paths: window.uPlot.paths.bars({ size: [0.9, 60] }), points: { show: false } }],
  }, [xs, ys], body);
}

export function curves(el, title, xLabel, tables, names) {
  const t = document.createElement("div");
  t.className = "title"; t.textContent = title;
  const body = document.createElement("div");
  el.append(t, body);
  const data = tables.length === 1 ? tables[0] : window.uPlot.join(tables);
  return new window.uPlot({
    width: Math.max(300, el.clientWidth - 16), height: 240,
    scales: { x: { time: false, range: [0, 1] }, y: { range: [0, 1] } },
    series: [{ label: xLabel }, ...names.map((n, i) => ({ label: n, stroke: color(i), width: 1.5, spanGaps: true }))],
  }, data, body);
}
