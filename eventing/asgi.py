"""Small ASGI helpers shared by the broker ingress and the dead-letter sink (no web framework needed), and the
hypercorn runner that serves them."""

from __future__ import annotations

import asyncio
import logging


async def lifespan(receive, send) -> None:
    """Answer the ASGI lifespan protocol (nothing to set up)."""
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def read_body(receive, limit: int | None = None) -> bytes | None:
    """The request body, or None once it grows past `limit` bytes."""
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if limit is not None and len(body) > limit:
            return None
        if not msg.get("more_body"):
            return body


class HeaderEncodingError(ValueError):
    """A request header value that is not UTF-8 (answered 400: it cannot become an event attribute)."""


def request_headers(scope) -> dict[str, str]:
    """Lower-case header names -> values; raises HeaderEncodingError for a value that is not UTF-8."""
    out = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1").lower()
        try:
            out[key] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise HeaderEncodingError(f"header {key!r} is not UTF-8") from None
    return out


async def respond(send, status: int, body: bytes, headers: list | None = None) -> None:
    hdrs = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": hdrs + (headers or [])})
    await send({"type": "http.response.body", "body": body})


async def respond_event(send, status: int, message) -> None:
    """Send an HTTPMessage (the SDK's to_binary_event/to_structured_event output) as the response."""
    body = bytes(message.body or b"")
    hdrs = [(k.encode("latin-1"), str(v).encode("latin-1")) for k, v in message.headers.items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": hdrs + [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def serve_asgi(app, host: str, port: int, stop: asyncio.Event, sock=None) -> None:
    """Run an ASGI app under hypercorn until `stop` is set; on `sock` (a listening socket the caller bound, so
    "ready" means this process owns the port) when given, else on host:port."""
    import hypercorn.asyncio
    import hypercorn.config

    cfg = hypercorn.config.Config()
    # hypercorn owns (and closes) an fd:// socket: hand the descriptor over instead of sharing it
    cfg.bind = [f"fd://{sock.detach()}"] if sock is not None else [f"{host}:{port}"]
    cfg.graceful_timeout = 2
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    await hypercorn.asyncio.serve(app, cfg, shutdown_trigger=stop.wait)
