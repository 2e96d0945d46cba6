// The "New video" form: T2V or I2V, the request fields of engine/fields.py that people set by hand, an image
// upload with a preview. The API validates (the form has `novalidate`): its 422 `errors[]` are shown beside
// the field they name, so the console never disagrees with the API about what is valid.
import { $, $$ } from "./dom.js";

const FPS = 16; // Wan's frame rate: 81 frames = 5 s
const NUMBERS = ["num_frames", "num_steps", "seed", "sigma_max", "sla_topk", "boundary"];
const CHOICES = ["resolution", "aspect_ratio", "attention"];
const I2V_ONLY = new Set(["image", "boundary", "adaptive_resolution"]);

let form;
let keptImage = null; // an s3:// image of a reproduced request, used until another file is chosen
let prefill = null;

/** Open the form filled with a past request's input ("reproduce"). */
export function reproduce(task, input) {
  prefill = { task, input };
  if (location.hash === "#/new") window.dispatchEvent(new HashChangeEvent("hashchange"));
  else location.hash = "#/new";
}

const task = () => form.elements.task.value;

/** A whole number as typed, exactly: seeds may pass 2^53. */
function numberOf(text) {
  if (/^\d{16,}$/.test(text)) return BigInt(text);
  return Number(text);
}

/** The request body from the form: fields left empty are left out (the model's or the field's default). */
export function readRequest() {
  const request = { task: task(), prompt: form.elements.prompt.value };
  for (const name of [...NUMBERS, ...CHOICES]) {
    const value = form.elements[name].value.trim();
    if (value !== "" && !(task() === "t2v" && I2V_ONLY.has(name))) {
      request[name] = NUMBERS.includes(name) ? numberOf(value) : value;
    }
  }
  if (form.elements.ode.checked) request.ode = true;
  if (task() === "i2v") {
    if (!form.elements.adaptive_resolution.checked) request.adaptive_resolution = false;
    if (keptImage && !form.elements.image.files.length) request.image = keptImage;
  }
  return request;
}

function showFramesAsSeconds() {
  const frames = Number(form.elements.num_frames.value);
  $("#f-num_frames-seconds").textContent =
    frames > 0 ? `${frames} frames ≈ ${(frames / FPS).toFixed(1)} s at ${FPS} fps` : "";
}

function showTask() {
  form.dataset.task = task();
}

function showPreview() {
  const preview = $("#f-image-preview");
  const file = form.elements.image.files[0];
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  if (file) {
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
    keptImage = null;
    $("#f-image-hint").textContent = `${file.name}, ${Math.ceil(file.size / 1024)} KiB`;
  } else {
    preview.removeAttribute("src");
    preview.hidden = true;
  }
}

function clearErrors() {
  $("#create-error").textContent = "";
  for (const p of $$(".field .error", form)) p.textContent = "";
  for (const el of $$("[aria-invalid]", form)) el.removeAttribute("aria-invalid");
}

/** "prompt", "/prompt", "body.prompt", "request.image" -> the form field it names (or null). */
export function fieldName(path) {
  const parts = String(path || "")
    .split(/[./[\]]+/)
    .filter((p) => p && !["body", "request"].includes(p));
  return parts[0] || null;
}

/** The API's per-field errors beside their fields; the rest (and the detail) above the form. */
function showErrors(err) {
  const unplaced = [];
  let first = null;
  for (const e of err.errors) {
    const name = fieldName(e.field);
    const box = name && form.querySelector(`.field[data-field="${CSS.escape(name)}"]`);
    if (!box || box.offsetParent === null) {
      unplaced.push(e.field ? `${e.field}: ${e.message}` : e.message);
      continue;
    }
    const message = $(".error", box);
    message.textContent = message.textContent ? `${message.textContent} ${e.message}` : e.message;
    const control = box.querySelector("input, select, textarea");
    control.setAttribute("aria-invalid", "true");
    first ??= control;
  }
  const retry = err.problem.retry_after ? ` Try again in ${err.problem.retry_after} s.` : "";
  const summary = err.errors.length ? "The request was not accepted: see the marked fields." : err.message;
  $("#create-error").textContent = [summary + retry, ...unplaced].join(" ");
  (first || form.elements.prompt).focus();
}

function fill({ task: kind, input }) {
  form.reset();
  form.elements.task.value = kind;
  form.elements.prompt.value = input.prompt || "";
  for (const name of [...NUMBERS, ...CHOICES]) {
    if (input[name] !== undefined && input[name] !== null) form.elements[name].value = String(input[name]);
  }
  form.elements.ode.checked = input.ode === true;
  form.elements.adaptive_resolution.checked = input.adaptive_resolution !== false;
  keptImage = kind === "i2v" && input.image ? input.image : null;
  $("#f-image-hint").textContent = keptImage
    ? `Using the original image ${keptImage}; choose a file to replace it.`
    : "The first frame of the video (PNG, JPEG or WebP).";
}

export function setup() {
  form = $("#create-form");
  form.addEventListener("change", (e) => {
    if (e.target.name === "task") showTask();
    if (e.target.name === "image") showPreview();
  });
  form.elements.num_frames.addEventListener("input", showFramesAsSeconds);
  form.addEventListener("reset", () => setTimeout(() => (showTask(), showFramesAsSeconds(), showPreview())));
}

export function show({ api, fail }) {
  if (prefill) {
    fill(prefill);
    prefill = null;
  }
  showTask();
  showFramesAsSeconds();
  clearErrors();
  form.onsubmit = async (event) => {
    event.preventDefault();
    clearErrors();
    const button = $("#create-submit");
    button.disabled = true;
    try {
      const file = task() === "i2v" ? form.elements.image.files[0] : undefined;
      const video = await api.createVideo(readRequest(), file);
      location.hash = `#/videos/${encodeURIComponent(video.id)}`;
    } catch (err) {
      // The one part of a request that can be too large is the image.
      if (err.status === 413) err.errors.push({ field: "image", message: err.message });
      if ([409, 413, 415, 422, 429].includes(err.status)) showErrors(err);
      else fail(err, $("#create-error"));
    } finally {
      button.disabled = false;
    }
  };
}
