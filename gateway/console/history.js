// The tenant's requests, newest first, with a status filter and cursor paging (GET /v1/videos).
import { $, h, when } from "./dom.js";

const PAGE = 20;

const link = (status, cursor, limit = PAGE) => {
  const query = new URLSearchParams();
  if (status) query.set("status", status);
  if (cursor) query.set("cursor", cursor);
  if (limit !== PAGE) query.set("limit", String(limit));
  return `#/history${query.size ? `?${query}` : ""}`;
};

function card(video) {
  const prompt = video.input?.prompt || "(no prompt)";
  return h(
    "li",
    { className: "card" },
    h("a", { href: `#/videos/${encodeURIComponent(video.id)}` }, prompt),
    h("span", { className: "badge", "data-status": video.status }, video.status),
    h("span", { className: "hint" }, `${video.task} · ${when(video.created_at)}`),
  );
}

const limitNow = () => Number(new URLSearchParams(location.hash.split("?")[1] || "").get("limit")) || PAGE;

export function setup() {
  $("#h-status").addEventListener("change", (e) => (location.hash = link(e.target.value, "", limitNow())));
}

export function show({ api, params, fail }) {
  const status = params.get("status") || "";
  const cursor = params.get("cursor") || "";
  // The page size may come in the URL (#/history?limit=50), within the API's 1..100.
  const limit = Math.min(100, Math.max(1, Number.parseInt(params.get("limit"), 10) || PAGE));
  $("#h-status").value = status;
  $("#h-error").textContent = "";
  $("#h-list").replaceChildren();
  $("#h-empty").hidden = true;
  $("#h-first").href = link(status, "", limit);
  $("#h-first").hidden = !cursor;
  $("#h-next").hidden = true;
  let stopped = false;
  (async () => {
    try {
      const page = await api.listVideos({ status, cursor, limit });
      if (stopped) return;
      $("#h-list").replaceChildren(...page.data.map(card));
      $("#h-empty").hidden = page.data.length > 0;
      if (page.next_cursor) {
        $("#h-next").href = link(status, page.next_cursor, limit);
        $("#h-next").hidden = false;
      }
    } catch (err) {
      if (!stopped) fail(err, $("#h-error"));
    }
  })();
  return () => (stopped = true);
}
