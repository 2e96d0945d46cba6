"""The ASGI application: func-python's CloudEvent middleware behind a request guard, plus GET /metrics.

func-python routes every path except /health/* through CloudEvent decoding, so a Prometheus scrape (a plain GET)
would get 400 before `handle` is ever called. `FunctionApp` subclasses its `ASGIApplication` and answers
`/metrics` first; everything else (lifespan -> start/stop, health, CloudEvents) is func-python's own code.

Before func-python sees a request, `request_problem` checks what its decoder does not, answering 400
(`invalid_cloudevent`, JSON body) instead of a 500 or an accepted malformed event:

* header names and values must be UTF-8 (func-python decodes them and answers 500 otherwise);
* a JSON body may nest at most MAX_JSON_DEPTH levels, checked by a linear scan before anything parses it (a body
  nested 100,000 deep would exhaust Python's recursion limit inside the parser);
* the CloudEvents spec requires `id` and `specversion`: binary mode needs `ce-id` / `ce-specversion` headers,
  structured mode the `id` / `specversion` members (the SDK would otherwise invent an id, and a redelivery could
  not be recognised).

The SDK also invents a `time` for an event that has none; the guard records in the ASGI scope (TIME_PRESENT_KEY)
whether the request really carried one, because the output key's date folders come from the request's own `time`.

`install()` makes func-python's stock `serve(new)` (the Knative func scaffolding) build a FunctionApp too, so the
image built by `func build` and `turboflow serve` expose the same endpoints.
"""

from __future__ import annotations

import json

import func_python.cloudevent as _ce

from turboflow.eventing.nats_binding import MAX_JSON_DEPTH, json_depth_exceeds

from . import metrics

_Original = getattr(_ce.ASGIApplication, "_turboflow_original", _ce.ASGIApplication)

TIME_PRESENT_KEY = "turboflow.time_present"  # scope key: did the request carry a `time` attribute?
_HEALTH_PATHS = ("/health/liveness", "/health/readiness")


def _decoded_headers(raw_headers) -> tuple[dict[str, str] | None, str | None]:
    """({lower-case name: value}, None), or (None, problem) when a header is not UTF-8."""
    headers: dict[str, str] = {}
    for name, value in raw_headers:
        try:
            headers[name.decode("utf-8").lower()] = value.decode("utf-8")
        except UnicodeDecodeError:
            shown = name.decode("latin-1")[:60]
            return None, f"header {shown!r} is not valid UTF-8"
    return headers, None


def _missing_attributes(present: set[str]) -> list[str]:
    return [name for name in ("id", "specversion") if name not in present]


def request_problem(raw_headers, body: bytes) -> str | None:
    """Why this POST cannot be a valid CloudEvent (a message for a 400), or None to hand it to func-python."""
    return inspect_request(raw_headers, body)[0]


def inspect_request(raw_headers, body: bytes) -> tuple[str | None, bool]:
    """(why this POST cannot be a valid CloudEvent, or None; whether it carries a `time` attribute)."""
    headers, problem = _decoded_headers(raw_headers)
    if problem:
        return problem, False
    problem, time_present = _event_problem(headers, body)
    return problem, time_present


def _event_problem(headers: dict[str, str], body: bytes) -> tuple[str | None, bool]:
    content_type = headers.get("content-type", "").lower()
    structured = content_type.startswith("application/cloudevents")
    binary = any(name.startswith("ce-") for name in headers)
    if content_type.startswith("application/cloudevents-batch"):
        return "batched CloudEvents are not accepted: send one event per request", False
    if (structured or (binary and "json" in content_type)) and json_depth_exceeds(body):
        return f"the JSON body nests more than {MAX_JSON_DEPTH} levels deep", False
    if structured:
        try:
            envelope = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return "the structured CloudEvent is not valid JSON", False
        if not isinstance(envelope, dict):
            return "the structured CloudEvent is not a JSON object", False
        present = {k for k, v in envelope.items() if isinstance(v, str) and v}
        missing = _missing_attributes(present)
        if missing:
            return f"the CloudEvent has no {' or '.join(missing)} (both are required)", False
        return None, "time" in present
    if binary:
        present = {name[3:] for name, value in headers.items() if name.startswith("ce-") and value.strip()}
        missing = _missing_attributes(present)
        if missing:
            return f"the CloudEvent has no {' or '.join('ce-' + m for m in missing)} header (both are required)", False
        return None, "time" in present
    return None, False


async def _read_body(receive) -> tuple[bytes, list[dict]]:
    """The whole request body, and any non-body messages received meanwhile (a disconnect), to replay."""
    chunks, other = [], []
    while True:
        message = await receive()
        if message.get("type") != "http.request":
            other.append(message)
            return b"".join(chunks), other
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), other


def _replaying(body: bytes, pending: list[dict], receive):
    """A `receive` that hands out the already-read body once, then whatever the server sends next."""
    queue = [{"type": "http.request", "body": body, "more_body": False}, *pending]

    async def replay():
        if queue:
            return queue.pop(0)
        return await receive()

    return replay


async def _bad_request(send, message: str) -> None:
    payload = json.dumps({"error": "invalid_cloudevent", "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class FunctionApp(_Original):
    """func_python.cloudevent.ASGIApplication + `GET /metrics` (Prometheus text format) + the request guard."""

    _turboflow_original = _Original

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http" and scope.get("path") == "/metrics":
            body, content_type = metrics.render()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        if scope.get("type") == "http" and scope.get("path") not in _HEALTH_PATHS:
            body, pending = await _read_body(receive)
            problem, time_present = inspect_request(scope.get("headers", []), body)
            if problem:
                return await _bad_request(send, problem)
            scope[TIME_PRESENT_KEY] = time_present
            receive = _replaying(body, pending, receive)
        await super().__call__(scope, receive, send)


def install() -> None:
    """Point func-python's `serve` at FunctionApp (idempotent)."""
    _ce.ASGIApplication = FunctionApp


def create_app(kind: str, **kwargs) -> FunctionApp:
    from .common import VideoFunction

    return FunctionApp(VideoFunction(kind, **kwargs))
