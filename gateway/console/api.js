// The console's only way to the gateway: the public /v1 API with the signed-in key as a Bearer token.
import { parseSse } from "./sse.js";

// Seeds go up to 2^63 - 1, beyond a JavaScript number's exact integers (2^53): integers that large are read as
// BigInt (JSON.parse's source text) and written back digit for digit (JSON.rawJSON), so "reproduce" sends the
// very seed the video was made with.
const exact = (key, value, context) =>
  typeof value === "number" && !Number.isSafeInteger(value) && context?.source && /^-?\d+$/.test(context.source)
    ? BigInt(context.source)
    : value;
const digits = (key, value) => (typeof value === "bigint" ? JSON.rawJSON(value.toString()) : value);
export const parseJson = (text) => JSON.parse(text, exact);
export const toJson = (value) => JSON.stringify(value, digits);

/** An answer other than 2xx, carrying the API's problem+json body (code, detail, per-field errors). */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
    this.code = problem.code || "";
    this.errors = problem.errors || [];
  }
}

async function problemOf(response) {
  try {
    return parseJson(await response.text());
  } catch {
    return { title: response.statusText || `HTTP ${response.status}` };
  }
}

export class Api {
  constructor(key, base = "/v1") {
    this.key = key;
    this.base = base;
  }

  async call(method, path, { json, form, signal, accept = "application/json" } = {}) {
    const headers = { Authorization: `Bearer ${this.key}`, Accept: accept };
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = toJson(json);
    } else if (form !== undefined) {
      body = form; // the browser writes the multipart boundary itself
    }
    let response;
    try {
      response = await fetch(this.base + path, { method, headers, body, signal });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, { code: "network", detail: "The gateway cannot be reached." });
    }
    if (!response.ok) throw new ApiError(response.status, await problemOf(response));
    return response;
  }

  async json(method, path, options) {
    return parseJson(await (await this.call(method, path, options)).text());
  }

  /** The key works when it may list videos (one is enough). */
  checkKey() {
    return this.json("GET", "/videos?limit=1");
  }

  /** POST /v1/videos: JSON, or multipart with the image file beside the request JSON. */
  createVideo(request, imageFile) {
    if (!imageFile) return this.json("POST", "/videos", { json: request });
    const form = new FormData();
    form.append("request", toJson(request)); // a text part: the image is the one file of the form
    form.append("image", imageFile, imageFile.name);
    return this.json("POST", "/videos", { form });
  }

  getVideo(id) {
    return this.json("GET", `/videos/${encodeURIComponent(id)}`);
  }

  listVideos({ status = "", cursor = "", limit = 20 } = {}) {
    const query = new URLSearchParams({ limit: String(limit) });
    if (status) query.set("status", status);
    if (cursor) query.set("cursor", cursor);
    return this.json("GET", `/videos?${query}`);
  }

  cancelVideo(id) {
    return this.json("POST", `/videos/${encodeURIComponent(id)}/cancel`);
  }

  usage(start, end) {
    return this.json("GET", `/usage?${new URLSearchParams({ start, end })}`);
  }

  /** Yield {event, id, video} for each state change of a request until the stream ends (after a terminal one). */
  async *events(id, signal) {
    const response = await this.call("GET", `/videos/${encodeURIComponent(id)}/events`, {
      signal,
      accept: "text/event-stream",
    });
    for await (const message of parseSse(response.body)) {
      yield { event: message.event, id: message.id, video: parseJson(message.data) };
    }
  }
}
