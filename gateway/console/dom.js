// Tiny DOM helpers. Text always goes in as text (textContent), never as HTML: prompts and error messages are
// user data.

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

/** h("a", {href: "#/x", className: "c"}, "text", child) -> an element. */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name in el && typeof el[name] !== "function" && !name.startsWith("aria")) el[name] = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

/** Fill a <dl> with [term, description] pairs, skipping empty descriptions. */
export function fillFacts(dl, pairs) {
  dl.replaceChildren(
    ...pairs
      .filter(([, value]) => value !== undefined && value !== null && value !== "")
      .flatMap(([term, value]) => [h("dt", {}, term), h("dd", {}, String(value))]),
  );
}

export const seconds = (s) => (s === null || s === undefined ? "" : `${Number(s).toFixed(s < 10 ? 2 : 1)} s`);
export const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");
