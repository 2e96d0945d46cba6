// One request: its state followed live through GET /v1/videos/{id}/events (queue position, a bar per stage,
// elapsed and ETA, cancel), then the result (player, download, seed, timings, GPU-seconds) or the error.
import { reproduce } from "./create.js";
import { $, fillFacts, h, seconds, when } from "./dom.js";
import { TERMINAL, stageFractions } from "./stages.js";

// The completion's timings in the order the stages run (others after them, total last).
const TIMING_ORDER = ["queue_wait", "image_fetch", "text_encode", "vae_encode", "diffusion", "vae_decode",
  "mp4_encode", "mp4_encode_total", "upload"];

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => (clearTimeout(timer), resolve()), { once: true });
  });

function renderStages(video) {
  const box = $("#v-progress");
  if (video.status === "failed" || video.status === "cancelled") return box.replaceChildren();
  box.replaceChildren(
    ...stageFractions(video).map((s) =>
      h(
        "div",
        { className: "stage", "data-stage": s.name },
        h("label", { htmlFor: `p-${s.name}` }, s.label),
        h("progress", { id: `p-${s.name}`, max: 1, value: s.fraction }),
        h("span", { className: "hint" }, s.of ? `${s.step}/${s.of}` : `${Math.round(s.fraction * 100)}%`),
      ),
    ),
  );
}

function renderClock(video) {
  const p = video.progress;
  const clock = $("#v-clock");
  if (TERMINAL.has(video.status) || !p) return (clock.textContent = "");
  const eta = p.eta === null || p.eta === undefined ? "estimating…" : `about ${seconds(p.eta)} left`;
  clock.textContent = `Elapsed ${seconds(p.elapsed)} · ${eta}`;
}

function renderResult(video) {
  const out = video.output;
  $("#v-result").hidden = !out;
  if (!out) return;
  const player = $("#v-player");
  // Only a new URL reloads the player (every state change re-renders the page).
  if (out.url && player.dataset.src !== out.url) {
    player.dataset.src = out.url;
    player.src = out.url;
  }
  const download = $("#v-download");
  download.href = out.url || "";
  download.setAttribute("download", `${video.id}.mp4`);
  fillFacts($("#v-facts"), [
    ["Seed", out.seed],
    ["Size", out.width && `${out.width}×${out.height}`],
    ["Frames", out.num_frames && `${out.num_frames} at ${out.fps} fps (${seconds(out.duration)})`],
    ["GPU-seconds", out.gpu_seconds !== undefined && Number(out.gpu_seconds).toFixed(2)],
    ["Bytes", out.bytes],
    ["SHA-256", out.sha256],
    ["Link expires", when(out.url_expires_at)],
  ]);
  const rank = (stage) =>
    stage === "total" ? Infinity : TIMING_ORDER.includes(stage) ? TIMING_ORDER.indexOf(stage) : TIMING_ORDER.length;
  const timings = Object.entries(out.timings || {}).sort(([a], [b]) => rank(a) - rank(b));
  fillFacts($("#v-timings"), timings.map(([stage, s]) => [stage.replaceAll("_", " "), seconds(s)]));
}

function renderError(video) {
  const box = $("#v-error");
  let text = "";
  if (video.status === "failed" && video.error) {
    const field = video.error.field ? ` (field ${video.error.field})` : "";
    text = `Failed: ${video.error.message} [${video.error.code}]${field}`;
  } else if (video.status === "cancelled") {
    text = video.cancelled?.while ? `Cancelled while ${video.cancelled.while}.` : "Cancelled.";
  }
  box.textContent = text;
  box.hidden = !text;
}

function render(video) {
  $("#video-title").textContent = video.input?.prompt ? `Video: ${video.input.prompt}` : "Video";
  $("#v-id").textContent = `${video.id} · ${video.task} · created ${when(video.created_at)}`;
  const status = $("#v-status");
  status.textContent = video.status;
  status.dataset.status = video.status;
  let note = "";
  if (video.status === "queued" && video.queue_position) note = `Position in queue: ${video.queue_position}`;
  if (video.cancel_requested && !TERMINAL.has(video.status)) note = "Cancelling at the next step…";
  $("#v-queue").textContent = note;
  $("#v-cancel").hidden = TERMINAL.has(video.status) || video.cancel_requested;
  renderStages(video);
  renderClock(video);
  renderResult(video);
  renderError(video);
  fillFacts(
    $("#v-input"),
    Object.entries(video.input || {}).map(([name, value]) => [name, value]),
  );
  $("#v-reproduce").onclick = () => reproduce(video.task, video.input || {});
}

/** Follow the event stream until a terminal state; a dropped stream is reopened (after a fresh GET). */
async function follow(api, id, signal, fail) {
  const live = $("#v-live");
  for (let attempt = 0; !signal.aborted; attempt++) {
    try {
      for await (const { video } of api.events(id, signal)) {
        attempt = 0;
        live.textContent = "";
        render(video);
        if (TERMINAL.has(video.status)) return;
      }
      const video = await api.getVideo(id);
      render(video);
      if (TERMINAL.has(video.status)) return;
    } catch (err) {
      if (signal.aborted) return;
      if (err.status >= 400 && err.status < 500) return fail(err, $("#v-error"));
      live.textContent = "Connection lost; reconnecting…";
    }
    await sleep(Math.min(1000 * 2 ** attempt, 10000), signal);
  }
}

export function show({ api, arg: id, fail }) {
  const controller = new AbortController();
  for (const el of ["#v-result", "#v-error"]) $(el).hidden = true;
  $("#v-player").removeAttribute("src");
  delete $("#v-player").dataset.src;
  $("#v-progress").replaceChildren();
  $("#v-live").textContent = "";
  $("#v-cancel").onclick = async () => {
    try {
      render(await api.cancelVideo(id));
    } catch (err) {
      fail(err, $("#v-error"));
    }
  };
  (async () => {
    try {
      const video = await api.getVideo(id);
      render(video);
      if (!TERMINAL.has(video.status)) await follow(api, id, controller.signal, fail);
    } catch (err) {
      fail(err, $("#v-error"));
    }
  })();
  return () => {
    controller.abort();
    $("#v-player").pause();
  };
}
