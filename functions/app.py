"""The ASGI application: func-python's CloudEvent middleware plus GET /metrics on the same port.

func-python routes every path except /health/* through CloudEvent decoding, so a Prometheus scrape (a plain GET)
would get 400 before `handle` is ever called. `FunctionApp` subclasses its `ASGIApplication` and answers
`/metrics` first; everything else (lifespan -> start/stop, health, CloudEvents) is func-python's own code.

`install()` makes func-python's stock `serve(new)` (the Knative func scaffolding) build a FunctionApp too, so the
image built by `func build` and `turboflow serve` expose the same endpoints.
"""
from __future__ import annotations

import func_python.cloudevent as _ce

from . import metrics

_Original = getattr(_ce.ASGIApplication, "_turboflow_original", _ce.ASGIApplication)


class FunctionApp(_Original):
    """func_python.cloudevent.ASGIApplication + `GET /metrics` (Prometheus text format)."""

    _turboflow_original = _Original

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http" and scope.get("path") == "/metrics":
            body, content_type = metrics.render()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", content_type.encode()),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await super().__call__(scope, receive, send)


def install() -> None:
    """Point func-python's `serve` at FunctionApp (idempotent)."""
    _ce.ASGIApplication = FunctionApp


def create_app(kind: str, **kwargs) -> FunctionApp:
    from .common import VideoFunction

    return FunctionApp(VideoFunction(kind, **kwargs))
