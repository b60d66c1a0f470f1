// Small SVG charts drawn here: no third-party code. Each returns an <svg> element.

const NS = "http://www.w3.org/2000/svg";

function el(name, attrs = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toFixed(3));

// series: [{name, points: [[x, y], ...], cls}]; a line chart with axes and a legend.
export function lineChart(title, series, { width = 480, height = 220, yMin } = {}) {
  const pad = { l: 48, r: 12, t: 24, b: 28 };
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", class: "chart",
    "aria-label": title });
  svg.append(el("title", {}, title), el("text", { x: pad.l, y: 16, class: "chart-title" }, title));
  if (!all.length) {
    svg.append(el("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "muted" },
      "no epochs yet"));
    return svg;
  }
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
  let [y0, y1] = [yMin ?? Math.min(...ys), Math.max(...ys)];
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => pad.l + ((x - x0) / (x1 - x0)) * (width - pad.l - pad.r);
  const sy = (y) => height - pad.b - ((y - y0) / (y1 - y0)) * (height - pad.t - pad.b);
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    svg.append(el("line", { x1: pad.l, x2: width - pad.r, y1: sy(y), y2: sy(y), class: "grid" }),
      el("text", { x: pad.l - 6, y: sy(y) + 4, "text-anchor": "end", class: "axis" }, fmt(y)));
  }
  svg.append(el("text", { x: width - pad.r, y: height - 6, "text-anchor": "end", class: "axis" },
    `epoch ${x1}`));
  series.forEach((s, i) => {
    const pts = s.points.filter((p) => Number.isFinite(p[1]));
    if (!pts.length) return;
    svg.append(el("polyline", { points: pts.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "),
      class: `line ${s.cls || `s${i}`}` }));
    svg.append(el("text", { x: pad.l + 8 + i * 110, y: height - 6, class: `legend ${s.cls || `s${i}`}` },
      `— ${s.name}`));
  });
  return svg;
}

// bars: [{label, value}]; horizontal bars, for counts per class.
export function barChart(title, bars, { width = 480 } = {}) {
  const row = 22;
  const labelW = 120;
  const height = 28 + bars.length * row;
  const max = Math.max(1, ...bars.map((b) => b.value));
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", class: "chart",
    "aria-label": title });
  svg.append(el("title", {}, title), el("text", { x: 0, y: 16, class: "chart-title" }, title));
  bars.forEach((b, i) => {
    const y = 26 + i * row;
    const w = ((width - labelW - 60) * b.value) / max;
    svg.append(el("text", { x: labelW - 6, y: y + 14, "text-anchor": "end", class: "axis" }, b.label),
      el("rect", { x: labelW, y: y + 2, width: Math.max(1, w), height: row - 6, class: "bar" }),
      el("text", { x: labelW + w + 6, y: y + 14, class: "axis" }, String(b.value)));
  });
  return svg;
}
