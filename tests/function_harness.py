"""Run the real function ASGI app under hypercorn on a loopback port, and talk to it with the cloudevents SDK."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid

import httpx
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveFunction:
    """`turboflow.functions.cli.serve` in a background thread (its own event loop), stopped on close()."""

    def __init__(self, kind: str, config: dict, **kwargs):
        from turboflow.functions.app import FunctionApp
        from turboflow.functions.video import VideoFunction

        self.fn = VideoFunction(kind, config=config, **kwargs)
        self.app = FunctionApp(self.fn)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.client = httpx.Client(base_url=self.url, timeout=120)
        self._wait_listening()

    def _run(self):
        from turboflow.functions.cli import serve

        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self.fn.kind, "127.0.0.1", self.port, self._stop, app=self.app)

        asyncio.run(main())

    def _wait_listening(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.client.get("/health/liveness", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError("function did not start listening")

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.client.get("/health/readiness")
            if r.status_code == 200:
                return r.text
            time.sleep(0.05)
        raise TimeoutError(f"function not ready: {r.text}")

    def send(self, event: CloudEvent, mode: str = "binary", **kwargs) -> httpx.Response:
        msg = to_binary_event(event) if mode == "binary" else to_structured_event(event)
        return self.client.post("/", headers=msg.headers, content=msg.body, **kwargs)

    def close(self):
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=15)
        self.client.close()


def request_event(
    kind: str = "t2v",
    data: dict | None = None,
    *,
    tenant: str | None = "acme",
    event_id: str | None = None,
    traceparent: str | None = TRACEPARENT,
    **attrs,
) -> CloudEvent:
    attributes = {
        "type": f"io.turboflow.video.{kind}.requested",
        "source": "/tests/producer",
        "id": event_id or str(uuid.uuid4()),
        "datacontenttype": "application/json",
        **attrs,
    }
    if tenant is not None:
        attributes["tenant"] = tenant
    if traceparent is not None:
        attributes["traceparent"] = traceparent
    return CloudEvent(attributes=attributes, data=data)


def reply_event(response: httpx.Response):
    """Decode the HTTP reply as a CloudEvent (binary or structured), data as a dict."""
    headers = {k.lower(): v for k, v in response.headers.items()}
    event = from_http_event(HTTPMessage(headers=headers, body=response.content))
    data = event.get_data()
    if isinstance(data, (bytes, str)):
        data = json.loads(data)
    return event, data
