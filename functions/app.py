"""The function's ASGI application, by composition: `FunctionApp(function)` answers `GET /metrics` with
prometheus_client's ASGI app, runs the request guard on every other HTTP request, and hands the rest (lifespan ->
start/stop, /health/*, CloudEvents -> handle) to func-python's own `ASGIApplication`, unchanged.

func-python routes every path except /health/* through CloudEvent decoding, so a Prometheus scrape (a plain GET)
would get 400 before `handle` is ever called; hence the wrapper in front rather than a route inside.

Before func-python sees a request, `inspect_request` checks what its decoder does not, answering 400
(`invalid_cloudevent`, JSON body, functions/replies.py) instead of a 500 or an accepted malformed event:

* header names and values must be UTF-8 (func-python decodes them and answers 500 otherwise);
* a JSON body may nest at most MAX_JSON_DEPTH levels, checked by a linear scan before anything parses it (a body
  nested 100,000 deep would exhaust Python's recursion limit inside the parser);
* the CloudEvents spec requires `id` and `specversion`: binary mode needs `ce-id` / `ce-specversion` headers,
  structured mode the `id` / `specversion` members (the SDK would otherwise invent an id, and a redelivery could
  not be recognised).

The SDK also invents a `time` for an event that has none; the guard records in the ASGI scope (TIME_PRESENT_KEY)
whether the request really carried one, because the output key's date folders come from the request's own `time`.

`serve(new)` is the drop-in for func-python's `serve(new)` that serves this composition (func-python's own
`serve` always builds its bare `ASGIApplication`; nothing here rebinds a library global).
"""

from __future__ import annotations

import asyncio
import json
import signal

from func_python.cloudevent import ASGIApplication
from prometheus_client import make_asgi_app

from turboflow.eventing.nats_binding import MAX_JSON_DEPTH, json_depth_exceeds

from . import metrics, replies
from .video import TIME_PRESENT_KEY, VideoFunction

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


class FunctionApp:
    """func-python's ASGIApplication behind the request guard, plus `GET /metrics` (Prometheus text format)."""

    def __init__(self, function):
        self.function = function
        self.inner = ASGIApplication(function)
        self.metrics = make_asgi_app(registry=metrics.REGISTRY)

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http" and scope.get("path") == "/metrics":
            return await self.metrics(scope, receive, send)
        if scope.get("type") == "http" and scope.get("path") not in _HEALTH_PATHS:
            body, pending = await _read_body(receive)
            problem, time_present = inspect_request(scope.get("headers", []), body)
            if problem:
                return await replies.send(replies.bad_request(problem), send)
            scope[TIME_PRESENT_KEY] = time_present
            receive = _replaying(body, pending, receive)
        await self.inner(scope, receive, send)


def create_app(kind: str, **kwargs) -> FunctionApp:
    return FunctionApp(VideoFunction(kind, **kwargs))


async def run(app, bind: list[str], shutdown: asyncio.Event | None = None) -> None:
    """Serve `app` under hypercorn until `shutdown` is set or SIGINT/SIGTERM arrives."""
    import hypercorn.asyncio
    import hypercorn.config

    cfg = hypercorn.config.Config()
    cfg.bind = bind
    cfg.graceful_timeout = 5
    stop = shutdown or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests run servers in threads)
            pass
    await hypercorn.asyncio.serve(app, cfg, shutdown_trigger=stop.wait)
    wait_closed = getattr(getattr(app, "function", None), "wait_closed", None)
    if wait_closed is not None:  # pod.stopped and queued lifecycle events go out before asyncio.run cancels them
        await wait_closed()


def serve(new) -> None:
    """func-python's `serve(new)` contract (LISTEN_ADDRESS, SIGINT/SIGTERM) with FunctionApp in front, for the
    func roots' `python -m turboflow.functions.<task>.function`."""
    import func_python.sock

    asyncio.run(run(FunctionApp(new()), func_python.sock.bind()))
