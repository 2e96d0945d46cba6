"""The gateway's event side over real HTTP, for tests/test_gateway_events.py and tests/test_gateway_webhooks.py.

A real nats-server (request-state bucket and webhook outbox), a real SQLite file (API keys and usage ledger), and
the event-side routers (/internal/events, /v1/videos/{id}/events, /v1/usage, /metrics) served by hypercorn on a
free port, behind the gateway's own auth dependency and problem handlers. Events are made the way the functions
make them (eventing/contracts.lifecycle_event, signed) and POSTed in binary mode to /internal/events.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from datetime import UTC, datetime

import httpx
from cloudevents.core.bindings.http import to_binary_event
from cloudevents.core.v1.event import CloudEvent
from fastapi import FastAPI

from turboflow.billing.ledger import open_ledger
from turboflow.eventing.asgi import serve_asgi
from turboflow.eventing.contracts import lifecycle_event
from turboflow.eventing.requeststate import RequestRecord, RequestStates, now_rfc3339
from turboflow.eventing.types import COMPLETED, FAILED, PROGRESS, STARTED
from turboflow.gateway import consumer, metrics, problems, stream, usage
from turboflow.gateway.keys import KeyStore
from turboflow.gateway.webhooks import WebhookWorker
from turboflow.settings import Settings

SIGNING_KEY = b"s" * 32
FUNCTION_SOURCE = "/turboflow/functions/t2v"


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


class EventSideGateway:
    """A GatewayService-shaped object (settings, states, ledger, keys, store, webhooks, change_hooks, app) with
    only the event side mounted; `async with` starts and stops it."""

    def __init__(self, nats_url: str, db_path, *, webhook_secret: str | None = None, **worker_options):
        self.settings = Settings(
            nats_url=nats_url,
            event_signing_key=SIGNING_KEY,
            webhook_secret=webhook_secret,
            webhook_allow_private=True,
        )
        self.database_url = f"sqlite:///{db_path}"
        self.store = None
        self.change_hooks: list = []
        self.worker_options = worker_options
        self.app = FastAPI()
        self.app.state.service = self
        problems.install(self.app)
        for router in (consumer.router, stream.router, usage.router, metrics.metrics_router):
            self.app.include_router(router)

    async def __aenter__(self) -> EventSideGateway:
        self.keys = KeyStore.open(self.database_url)
        self.ledger = open_ledger(self.database_url)
        self.states = await RequestStates.connect(self.settings.nats_url)
        self.webhooks = await WebhookWorker(self, **self.worker_options).start()
        sock = free_socket()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._stop = asyncio.Event()
        self._server = asyncio.create_task(serve_asgi(self.app, "127.0.0.1", 0, self._stop, sock=sock))
        self.http = httpx.AsyncClient(base_url=self.url, timeout=10)
        for _ in range(200):
            try:
                await self.http.get("/metrics")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()
        self._stop.set()
        await self._server
        await self.webhooks.stop()
        await self.states.close()
        self.ledger.close()
        self.keys.close()

    def api_key(self, tenant: str) -> dict[str, str]:
        """Authorization headers of a fresh key for `tenant`."""
        _, token = self.keys.create(tenant)
        return {"Authorization": f"Bearer {token}"}

    async def post_event(self, event) -> httpx.Response:
        message = to_binary_event(event)
        return await self.http.post("/internal/events", headers=dict(message.headers), content=message.body)

    async def create(self, tenant: str, request_id: str, webhook: dict | None = None) -> RequestRecord:
        """A queued record as the gateway's POST /v1/videos stores it."""
        now = now_rfc3339()
        record = RequestRecord(
            id=request_id,
            tenant=tenant,
            task="t2v",
            created_at=now,
            updated_at=now,
            request={"prompt": "a fox"},
            source="/turboflow/gateway",
            webhook=webhook,
            events=["queued"],
        )
        assert await self.states.create(record)
        return record

    async def wait_for(self, tenant: str, request_id: str, predicate, timeout: float = 20.0) -> RequestRecord:
        """Poll the record until `predicate(record)` (a deadline, not a timing assertion)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = await self.states.get(tenant, request_id)
            if found is not None and predicate(found[0]):
                return found[0]
            assert asyncio.get_running_loop().time() < deadline, f"condition not reached: {found}"
            await asyncio.sleep(0.05)


def ctx(tenant: str, request_id: str) -> dict:
    return {"request_id": request_id, "tenant": tenant, "kind": "t2v", "request_source": "/turboflow/gateway"}


def requested_event(tenant: str, request_id: str) -> CloudEvent:
    return CloudEvent(
        attributes={
            "type": "io.turboflow.video.t2v.requested",
            "source": "/producer",
            "id": request_id,
            "tenant": tenant,
            "time": datetime.now(UTC),
        },
        data={"prompt": "a fox", "num_steps": 4},
    )


def started_event(tenant: str, request_id: str, key: bytes | None = SIGNING_KEY):
    data = {"pod": "t2v-abc", "cold_start": True, "model_load_seconds": 3.0, "queue_wait": 0.1,
            "started_at": now_rfc3339()}  # fmt: skip
    return lifecycle_event(STARTED, ctx(tenant, request_id), data, source=FUNCTION_SOURCE, signing_key=key)


def progress_event(tenant: str, request_id: str, stage: str, step: int, of: int = 4, key: bytes | None = SIGNING_KEY):
    data = {"stage": stage, "step": step, "of": of, "elapsed": 0.5 * step, "eta": 0.5 * (of - step)}
    return lifecycle_event(
        PROGRESS, ctx(tenant, request_id), data, source=FUNCTION_SOURCE, signing_key=key, sequence=f"{stage}/{step}"
    )


def completed_event(tenant: str, request_id: str, gpu_seconds: float = 2.5, key: bytes | None = SIGNING_KEY):
    data = {
        "video": {"uri": f"s3://out/{tenant}/{request_id}.mp4", "bucket": "out", "key": f"{tenant}/{request_id}.mp4",
                  "bytes": 1234, "sha256": "0" * 64},
        "usage": {"gpu_seconds": gpu_seconds, "cold_start": False, "model_load_seconds": 0.0, "device": "cpu"},
        "model": "tiny",
        "completed_at": now_rfc3339(),
    }  # fmt: skip
    return lifecycle_event(COMPLETED, ctx(tenant, request_id), data, source=FUNCTION_SOURCE, signing_key=key)


def failed_event(tenant: str, request_id: str, key: bytes | None = SIGNING_KEY):
    data = {"code": "internal_error", "message": "boom", "retryable": False, "usage": {"gpu_seconds": 1.0}}
    return lifecycle_event(FAILED, ctx(tenant, request_id), data, source=FUNCTION_SOURCE, signing_key=key)
