// GPU-seconds per day for the signed-in tenant (GET /v1/usage), as a bar chart and a table.
import { barChart, fillDays } from "./chart.js";
import { $, h } from "./dom.js";

const DAY = 86400000;
const isoDay = (t) => new Date(t).toISOString().slice(0, 10);
const DATE = /^\d{4}-\d{2}-\d{2}$/;

export function setup() {
  $("#usage-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = new URLSearchParams({ start: $("#u-start").value, end: $("#u-end").value });
    location.hash = `#/usage?${query}`;
  });
}

export function show({ api, params, fail }) {
  // Default: the last 30 days, today included (UTC, like the ledger's days).
  const end = DATE.test(params.get("end") || "") ? params.get("end") : isoDay(Date.now());
  const start = DATE.test(params.get("start") || "") ? params.get("start") : isoDay(Date.parse(end) - 29 * DAY);
  $("#u-start").value = start;
  $("#u-end").value = end;
  $("#u-error").textContent = "";
  $("#u-total").textContent = "";
  $("#u-chart").replaceChildren();
  $("#u-table tbody").replaceChildren();
  let stopped = false;
  (async () => {
    try {
      const usage = await api.usage(start, end);
      if (stopped) return;
      // Zero days are drawn too, for a range of up to a year; a longer one shows the days that have usage.
      const span = (Date.parse(end) - Date.parse(start)) / DAY;
      const days = span <= 366 ? fillDays(usage.days || [], start, end) : usage.days || [];
      $("#u-total").textContent =
        `${Number(usage.gpu_seconds).toFixed(1)} GPU-seconds over ${usage.requests} requests, ${start} to ${end}`;
      $("#u-chart").replaceChildren(
        barChart(days),
        h("figcaption", { className: "hint" }, "GPU-seconds per day"),
      );
      $("#u-table tbody").replaceChildren(
        ...days.map((d) =>
          h("tr", {}, h("td", {}, d.day), h("td", {}, Number(d.gpu_seconds).toFixed(1)), h("td", {}, String(d.requests))),
        ),
      );
    } catch (err) {
      if (!stopped) fail(err, $("#u-error"));
    }
  })();
  return () => (stopped = true);
}
