"""A real gateway stack for the gateway tests: nats-server (request state), moto S3 over HTTP (uploads, presigned
URLs), a SQLite file (keys, ledger), a recording "broker sink" (where the gateway POSTs CloudEvents), and the
gateway itself served by hypercorn on a free port.

The whole stack runs on its own event loop in a background thread, so tests may be sync or async and talk to it
over HTTP like any client (schemathesis included). Use:

    from gateway_harness import gateway_stack        # the module-scoped fixture (needs conftest's moto_s3)

    def test_x(gateway_stack):
        key = gateway_stack.api_key("acme")          # a fresh key for tenant "acme" ("tf_..._...")
        r = httpx.post(gateway_stack.url + "/v1/videos", json={...}, headers=gateway_stack.auth(key))
        gateway_stack.emitted_for(r.json()["id"])     # the CloudEvents the broker sink received for that id
        record, _ = gateway_stack.run(gateway_stack.states.get("acme", id))   # RequestStates, on the stack's loop

Tests share one stack per module: use a tenant of your own (`gateway_stack.tenant()` makes a unique one) so
per-tenant limits and lists do not see other tests' requests. `GatewayStack.start(moto_url, tmp, **settings)`
builds another one with other settings (e.g. `webhook_allow_private=False`).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path

import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http_event

from turboflow.eventing.asgi import lifespan, read_body, request_headers, serve_asgi
from turboflow.eventing.natsserver import NatsServer, bind_listener
from turboflow.gateway.app import GatewayService
from turboflow.settings import Settings

BUCKET = "turboflow-gateway-tests"
SIGNING_KEY = b"gateway-tests-signing-key-0123456789"


class BrokerSink:
    """Accepts CloudEvents like a broker ingress (202) and keeps them; `status` makes it refuse (e.g. 503)."""

    def __init__(self):
        self.events: list = []
        self.status = 202

    async def app(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(receive)
        status = self.status
        if status == 202:
            self.events.append(from_http_event(HTTPMessage(headers=request_headers(scope), body=body)))
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


class GatewayStack:
    """See the module docstring. Attributes: url, service, states, sink, emitted, settings, nats."""

    def __init__(self, service: GatewayService, sink: BrokerSink, nats: NatsServer, url: str, loop, thread, stop):
        self.service, self.sink, self.nats, self.url = service, sink, nats, url
        self._loop, self._thread, self._stop = loop, thread, stop

    @property
    def settings(self) -> Settings:
        return self.service.settings

    @property
    def states(self):
        """The service's RequestStates: call its coroutines through `run` (they live on the stack's loop)."""
        return self.service.states

    @property
    def emitted(self) -> list:
        return self.sink.events

    def emitted_for(self, request_id: str) -> list:
        return [e for e in self.sink.events if e.get_id() == request_id or e.get_subject() == request_id]

    def run(self, coroutine, timeout: float = 30):
        """Run a coroutine on the stack's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def api_key(self, tenant: str = "default", label: str = "tests") -> str:
        return self.service.keys.create(tenant, label)[1]

    @staticmethod
    def tenant() -> str:
        return f"t-{uuid.uuid4().hex[:12]}"

    @staticmethod
    def auth(key: str) -> dict:
        return {"Authorization": f"Bearer {key}"}

    @classmethod
    def start(cls, moto_url: str, tmp: Path, **overrides) -> GatewayStack:
        import boto3

        s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
        if BUCKET not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
            s3.create_bucket(Bucket=BUCKET)
        nats = NatsServer(store_dir=tmp / "nats").start()
        sink = BrokerSink()
        sink_sock = bind_listener("sink", "127.0.0.1", 0)
        gateway_sock = bind_listener("gateway", "127.0.0.1", 0)
        settings = Settings(
            nats_url=nats.url,
            sink_url=f"http://127.0.0.1:{sink_sock.getsockname()[1]}/",
            bucket=BUCKET,
            s3_endpoint_url=moto_url,
            aws_region="us-east-1",
            gateway_database_url=f"sqlite:///{tmp / 'gateway.db'}",
            webhook_allow_private=True,
            tenant_max_active=3,
            event_signing_key=SIGNING_KEY,
        ).replace(**overrides)
        service = GatewayService(settings)
        url = f"http://127.0.0.1:{gateway_sock.getsockname()[1]}"
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        holder: dict = {}

        async def main():
            holder["stop"] = stop = asyncio.Event()
            await service.start()
            servers = [
                asyncio.create_task(serve_asgi(sink.app, "127.0.0.1", 0, stop, sock=sink_sock)),
                asyncio.create_task(serve_asgi(service.app, "127.0.0.1", 0, stop, sock=gateway_sock)),
            ]
            ready.set()
            await asyncio.gather(*servers)
            await service.stop()

        def target():
            try:
                loop.run_until_complete(main())
            except BaseException as e:  # surfaced to the test through `ready`
                holder["error"] = e
                ready.set()

        thread = threading.Thread(target=target, name="gateway-stack", daemon=True)
        thread.start()
        ready.wait(60)
        if "error" in holder or "stop" not in holder:
            nats.close()
            raise RuntimeError(f"the gateway stack did not start: {holder.get('error')!r}")
        _wait_http(url + "/healthz")
        return cls(service, sink, nats, url, loop, thread, holder["stop"])

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self.nats.close()


def _wait_http(url: str, timeout: float = 30) -> None:
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s")


@pytest.fixture(scope="module")
def gateway_stack(moto_s3, tmp_path_factory):
    stack = GatewayStack.start(moto_s3, tmp_path_factory.mktemp("gateway"))
    try:
        yield stack
    finally:
        stack.close()
