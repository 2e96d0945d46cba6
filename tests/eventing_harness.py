"""Helpers for the eventing tests: an in-test HTTP sink (ASGI under hypercorn), a broker on a real nats-server,
a plain nats-py subscriber collecting events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event
from cloudevents.core.v1.event import CloudEvent

from turboflow.eventing.asgi import lifespan, read_body, request_headers, respond_event, serve_asgi
from turboflow.eventing.broker import Broker
from turboflow.eventing.nats_binding import from_nats
from turboflow.eventing.natsserver import free_port
from turboflow.eventing.triggers import load_triggers


class Sink:
    """An HTTP subscriber. `behaviour(event, n)` returns (status, reply CloudEvent | None); default 200, no reply."""

    def __init__(self, behaviour=None):
        self.behaviour = behaviour or (lambda event, n: (200, None))
        self.received: list = []
        self.raw_headers: list[dict] = []  # what came over the wire (the SDK's parse would invent a `time`)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self._stop = asyncio.Event()
        self._task = None

    async def app(self, scope, receive, send):
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await lifespan(receive, send)
            return
        body = await read_body(receive)
        headers = request_headers(scope)
        self.raw_headers.append(headers)
        event = from_http_event(HTTPMessage(headers=headers, body=body))
        self.received.append(event)
        result = self.behaviour(event, len(self.received))
        if asyncio.iscoroutine(result):
            result = await result
        status, reply = result
        if isinstance(reply, bytes):  # a plain JSON answer, e.g. a function's {error, message, retryable}
            await send(
                {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": reply})
            return
        if reply is None:
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b"sink says no" if status >= 400 else b""})
            return
        await respond_event(send, status, to_binary_event(reply))

    async def __aenter__(self):
        self._task = asyncio.create_task(serve_asgi(self.app, "127.0.0.1", self.port, self._stop))
        await wait_port(self.port)
        return self

    async def __aexit__(self, *exc):
        self._stop.set()
        await asyncio.wait_for(self._task, 10)


async def wait_port(port: int, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


class Collector:
    """A plain nats-py core subscriber on `turboflow.events.>` decoding events with the NATS binding."""

    def __init__(self, nats_url: str, subject: str = "turboflow.events.>"):
        self.nats_url, self.subject = nats_url, subject
        self.events: list = []

    async def __aenter__(self):
        import nats

        self.nc = await nats.connect(self.nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)

        async def on_msg(msg):
            self.events.append(from_nats(msg.headers, msg.data))

        await self.nc.subscribe(self.subject, cb=on_msg)
        await self.nc.flush()
        return self

    async def __aexit__(self, *exc):
        await self.nc.close()

    async def publish_raw(self, subject: str, payload: bytes, headers: dict | None = None):
        """Store a message as any NATS client could (no binding, no validation)."""
        return await self.nc.jetstream().publish(subject, payload, headers=headers)

    def of_type(self, event_type: str) -> list:
        return [e for e in self.events if e.get_type() == event_type]

    async def wait_for(self, predicate, timeout: float = 30.0, count: int = 1) -> list:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            found = [e for e in self.events if predicate(e)]
            if len(found) >= count:
                return found
            await asyncio.sleep(0.05)
        raise TimeoutError(
            f"only {len([e for e in self.events if predicate(e)])}/{count} events; have "
            f"{[(e.get_type(), e.get_subject()) for e in self.events]}"
        )


def event(etype: str = "io.turboflow.video.t2v.requested", data=None, **attrs) -> CloudEvent:
    attributes = {
        "type": etype,
        "source": "/tests",
        "id": str(uuid.uuid4()),
        "datacontenttype": "application/json",
        **attrs,
    }
    return CloudEvent(attributes=attributes, data=data if data is not None else {"prompt": "a cat"})


def data_of(ev) -> dict:
    d = ev.get_data()
    return json.loads(d) if isinstance(d, (bytes, str)) else d


@contextlib.asynccontextmanager
async def running_broker(
    nats_url: str,
    addresses: dict,
    *,
    delivery: dict | None = None,
    gates=None,
    triggers=None,
    ingress: bool = True,
    **kwargs,
):
    """The real Trigger YAML, subscribers mapped to `addresses`, delivery shortened for tests. Triggers whose
    subscriber has no address here (the gateway's, in a broker-only test) are left out, as `turboflow dev` does."""
    if triggers is None:
        triggers = [
            t
            for t in load_triggers(broker="default", namespace="turboflow")
            if t.subscriber.ref is None or t.subscriber.ref.get("name") in addresses
        ]
    delivery = dict(delivery or {})
    if "turboflow-deadletter" not in addresses:
        delivery["dead_letter"] = None
    triggers = [t.with_delivery(**delivery) for t in triggers]
    broker = Broker(nats_url, triggers, addresses, gates=gates, **kwargs)
    await broker.start()
    stop = asyncio.Event()
    port = free_port()
    task = asyncio.create_task(serve_asgi(broker.asgi, "127.0.0.1", port, stop)) if ingress else None
    if task:
        await wait_port(port)
    broker.ingress_url = f"http://127.0.0.1:{port}/{broker.namespace}/{broker.name}"
    try:
        yield broker
    finally:
        stop.set()
        if task:
            await asyncio.wait_for(task, 10)
        await broker.stop()
