// Server-Sent Events over fetch(): EventSource cannot send an Authorization header, so the console reads the
// response body itself. This is the parsing algorithm of the HTML standard ("event stream interpretation"),
// reduced to what the console uses: `event`, `data` (several lines joined with "\n") and `id`; comments
// (heartbeats) and `retry` are ignored.

/** Yield {event, data, id} for each event of a byte stream (a fetch Response body). */
export async function* parseSse(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { event: "message", data: [], id: "" };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      // A chunk may end between "\r" and "\n": keep a trailing "\r" until the next chunk says which it was.
      const complete = buffer.endsWith("\r") ? buffer.slice(0, -1) : buffer;
      const lines = complete.split(/\r\n|\r|\n/);
      buffer = lines.pop() + buffer.slice(complete.length);
      for (const line of lines) {
        if (line === "") {
          if (event.data.length) yield { event: event.event, data: event.data.join("\n"), id: event.id };
          event = { event: "message", data: [], id: event.id };
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") event.event = text;
        else if (field === "data") event.data.push(text);
        else if (field === "id") event.id = text;
      }
    }
  } finally {
    // Stopped early (the page moved on) or ended: either way the connection is not needed any more.
    reader.cancel().catch(() => {});
  }
}
