// The console shell: sign-in state, the fragment router (#/new, #/videos/<id>, #/history, #/usage) and one
// view module per page. Each view's show() may return a function that stops what it started (an event stream).
import { Api, ApiError } from "./api.js";
import { $, $$ } from "./dom.js";
import * as create from "./create.js";
import * as history from "./history.js";
import * as usage from "./usage.js";
import * as video from "./video.js";

const KEY = "turboflow.apiKey"; // sessionStorage: gone when the tab closes
const VIEWS = { new: create, videos: video, history, usage };
const SECTIONS = { new: "view-new", videos: "view-video", history: "view-history", usage: "view-usage" };

export const session = { api: null };
let stopView = null;
let signInMessage = "";

/** "#/videos/abc?x=1" -> {route: "videos", arg: "abc", params}. */
export function parseHash(hash) {
  const [path, query = ""] = hash.replace(/^#\/?/, "").split("?");
  const [route, ...rest] = path.split("/");
  return { route: route || "new", arg: decodeURIComponent(rest.join("/")), params: new URLSearchParams(query) };
}

/** Forget the key and show the sign-in page (with `message` when the key stopped working). */
export function signOut(message = "") {
  sessionStorage.removeItem(KEY);
  signInMessage = message;
  render();
}

/** Show a failed call's message in `element`; a 401 means the key is no longer good: back to sign-in. */
function fail(err, element) {
  if (err instanceof ApiError && err.status === 401) return signOut(err.message);
  if (err.name === "AbortError") return;
  element.textContent = err.message;
  element.hidden = false;
}

function showSection(id) {
  $("#loading").hidden = true;
  for (const section of $$("main > section")) section.hidden = section.id !== id;
}

function showSignIn() {
  showSection("view-signin");
  $("#nav").hidden = true;
  $("#api-key-error").textContent = signInMessage;
  $("#api-key").setAttribute("aria-invalid", signInMessage ? "true" : "false");
  $("#api-key").focus();
}

async function signIn(event) {
  event.preventDefault();
  const input = $("#api-key");
  const key = input.value.trim();
  const error = $("#api-key-error");
  if (!key) {
    error.textContent = "Enter an API key.";
    input.setAttribute("aria-invalid", "true");
    input.focus();
    return;
  }
  try {
    await new Api(key).checkKey();
  } catch (err) {
    error.textContent = err.message;
    input.setAttribute("aria-invalid", "true");
    input.focus();
    return;
  }
  sessionStorage.setItem(KEY, key);
  input.value = "";
  signInMessage = "";
  render();
}

function render() {
  stopView?.();
  stopView = null;
  const key = sessionStorage.getItem(KEY);
  session.api = key ? new Api(key) : null;
  if (!session.api) return showSignIn();
  let { route, arg, params } = parseHash(location.hash);
  if (!(route in VIEWS)) route = "new";
  $("#nav").hidden = false;
  for (const link of $$("#nav a")) {
    if (link.dataset.route === route) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const section = $(`#${SECTIONS[route]}`);
  showSection(section.id);
  // Keyboard and screen-reader users land on the new page's heading, not wherever focus was.
  if (!section.contains(document.activeElement)) $("h1", section).focus();
  stopView = VIEWS[route].show({ api: session.api, arg, params, section, fail }) || null;
}

$("#signin-form").addEventListener("submit", signIn);
$("#sign-out").addEventListener("click", () => signOut());
window.addEventListener("hashchange", render);
for (const view of Object.values(VIEWS)) view.setup?.();
render();
