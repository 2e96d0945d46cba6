// GPU-seconds per day as an inline SVG bar chart (no library). The chart scales with its container through
// the viewBox; each bar carries a <title> (its day and value) and the figure has a table beside it for screen
// readers.

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
  if (text !== undefined) el.textContent = text;
  return el;
}

/** Every day from `start` to `end` (YYYY-MM-DD, inclusive, UTC), with the API's numbers or zeros. */
export function fillDays(days, start, end) {
  const byDay = new Map(days.map((d) => [d.day, d]));
  const out = [];
  for (let t = Date.parse(`${start}T00:00:00Z`); t <= Date.parse(`${end}T00:00:00Z`); t += 86400000) {
    const day = new Date(t).toISOString().slice(0, 10);
    out.push(byDay.get(day) || { day, gpu_seconds: 0, requests: 0 });
  }
  return out;
}

/** The bar chart of `days` ([{day, gpu_seconds}]): bar height = gpu_seconds / max over the days. */
export function barChart(days, { width = 600, height = 200, pad = 28 } = {}) {
  const max = Math.max(0, ...days.map((d) => d.gpu_seconds));
  const total = days.reduce((sum, d) => sum + d.gpu_seconds, 0);
  const label = `GPU-seconds per day, ${days.length} days, ${total.toFixed(1)} in total, at most ${max.toFixed(1)}`;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label });
  const plotH = height - 2 * pad;
  const slot = (width - pad) / Math.max(1, days.length);
  root.append(svg("line", { x1: pad, y1: height - pad, x2: width, y2: height - pad, class: "axis" }));
  root.append(svg("text", { x: 2, y: pad, class: "tick" }, max ? max.toFixed(0) : "0"));
  days.forEach((d, i) => {
    const h = max ? (d.gpu_seconds / max) * plotH : 0;
    const bar = svg("rect", {
      x: pad + i * slot + slot * 0.1,
      y: height - pad - h,
      width: Math.max(1, slot * 0.8),
      height: h,
      class: "bar",
      "data-day": d.day,
    });
    bar.append(svg("title", {}, `${d.day}: ${d.gpu_seconds.toFixed(1)} GPU-seconds, ${d.requests} requests`));
    root.append(bar);
  });
  if (days.length) {
    root.append(svg("text", { x: pad, y: height - 8, class: "tick" }, days[0].day));
    root.append(svg("text", { x: width, y: height - 8, class: "tick end" }, days[days.length - 1].day));
  }
  return root;
}
