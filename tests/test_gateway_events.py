"""The gateway's event side over real HTTP: the lifecycle consumer (/internal/events), the SSE stream, usage and
metrics, on a real nats-server and a real SQLite ledger (tests/gateway_event_side.py)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from cloudevents.core.bindings.http import to_binary_event
from gateway_event_side import (
    EventSideGateway,
    completed_event,
    failed_event,
    new_webhook_secret,
    progress_event,
    requested_event,
    started_event,
)
from httpx_sse import aconnect_sse, connect_sse
from standardwebhooks import Webhook

from turboflow.eventing.natsserver import NatsServer
from turboflow.gateway.stream import update_names


@pytest.fixture(scope="module")
def nats_url():
    with NatsServer() as server:
        yield server.url


@pytest.fixture
async def gateway(nats_url, tmp_path):
    async with EventSideGateway(nats_url, tmp_path / "gateway.db") as gw:
        yield gw


def new_id() -> str:
    return "r-" + uuid.uuid4().hex[:12]


async def test_lifecycle_events_need_a_valid_signature(gateway):
    request_id = new_id()
    assert (await gateway.post_event(requested_event("acme", request_id))).status_code == 200  # unsigned: creates
    unsigned = await gateway.post_event(started_event("acme", request_id, key=None))
    forged = await gateway.post_event(started_event("acme", request_id, key=b"x" * 32))
    assert (unsigned.status_code, unsigned.content, forged.status_code) == (202, b"", 202)
    assert (await gateway.states.get("acme", request_id))[0].status == "queued"

    genuine = await gateway.post_event(started_event("acme", request_id))
    assert (genuine.status_code, genuine.content) == (200, b"")
    record = (await gateway.states.get("acme", request_id))[0]
    assert (record.status, record.started["pod"], record.events) == ("running", "t2v-abc", ["queued", "started"])


async def test_a_requested_event_never_changes_an_existing_record(gateway):
    request_id = new_id()
    await gateway.create("acme", request_id)
    await gateway.post_event(completed_event("acme", request_id))
    again = await gateway.post_event(requested_event("acme", request_id))
    assert again.status_code == 202
    assert (await gateway.states.get("acme", request_id))[0].status == "completed"


async def test_redelivery_is_idempotent_and_feeds_the_ledger_once(gateway):
    request_id = new_id()
    await gateway.create("acme", request_id)
    event = completed_event("acme", request_id, gpu_seconds=4.0)
    first, second = await gateway.post_event(event), await gateway.post_event(event)
    assert (first.status_code, second.status_code) == (200, 202)
    record = (await gateway.states.get("acme", request_id))[0]
    assert record.status == "completed" and record.events == ["queued", "completed"]
    assert record.result["video"]["uri"] == f"s3://out/acme/{request_id}.mp4"
    facts = [f for f in gateway.ledger.facts(tenant="acme") if f.data.get("request_id") == request_id]
    assert [f.type for f in facts] == ["io.turboflow.video.completed"]


async def test_internal_events_answer_only_internal_host_names(gateway):
    """Knative's external ingress serves the public domain only; the broker calls <svc>.<ns>.svc.cluster.local."""
    from turboflow.gateway.consumer import internal_host

    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-type": "com.example.other", "ce-source": "/x"}
    public = await gateway.http.post("/internal/events", headers={**headers, "host": "videos.example.com"})
    assert public.status_code == 404 and public.json()["code"] == "not_found"
    internal = {**headers, "host": "turboflow-gateway.turboflow.svc.cluster.local"}
    assert (await gateway.http.post("/internal/events", headers=internal)).status_code == 202
    assert [internal_host(h) for h in ("127.0.0.1:8080", "[::1]:80", "gw.ns.svc", "gw.ns.svc.cluster.local.")] == [
        True
    ] * 4
    assert not any(internal_host(h) for h in ("example.com", "svc.example.com", "evil.svc.example.com", "", None))


async def test_completed_before_started_ends_completed(gateway):
    request_id = new_id()
    assert (await gateway.post_event(completed_event("acme", request_id))).status_code == 200  # first news
    assert (await gateway.post_event(started_event("acme", request_id))).status_code == 202
    assert (await gateway.post_event(progress_event("acme", request_id, "diffusion", 2))).status_code == 202
    record = (await gateway.states.get("acme", request_id))[0]
    assert (record.status, record.events, record.progress) == ("completed", ["queued", "completed"], None)


async def test_malformed_events_are_refused_with_a_problem(gateway):
    missing_id = await gateway.http.post(
        "/internal/events",
        headers={"ce-specversion": "1.0", "ce-type": "io.turboflow.video.started", "ce-source": "/x"},
        content=b"{}",
    )
    assert missing_id.status_code == 400
    assert missing_id.headers["content-type"] == "application/problem+json"
    assert missing_id.json()["code"] == "invalid_event"
    not_json = await gateway.http.post(
        "/internal/events", headers={"content-type": "application/cloudevents+json"}, content=b"{not json"
    )
    assert not_json.status_code == 400
    # a type the gateway does not follow is accepted and ignored
    ignored = await gateway.http.post(
        "/internal/events",
        headers={"ce-specversion": "1.0", "ce-id": "1", "ce-type": "com.example.other", "ce-source": "/x"},
        content=b"",
    )
    assert ignored.status_code == 202


async def test_the_event_stream_follows_a_request_to_completion(gateway):
    request_id = new_id()
    await gateway.create("acme", request_id)
    headers = gateway.api_key("acme")
    seen: list[tuple[str, str, dict]] = []
    async with aconnect_sse(gateway.http, "GET", f"/v1/videos/{request_id}/events", headers=headers) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        async for sse in source.aiter_sse():
            seen.append((sse.event, sse.id, sse.json()))
            if len(seen) == 1:  # the current state came first: now the function runs
                for event in (
                    started_event("acme", request_id),
                    progress_event("acme", request_id, "diffusion", 1),
                    progress_event("acme", request_id, "diffusion", 2),
                    completed_event("acme", request_id),
                ):
                    assert (await gateway.post_event(event)).status_code == 200
    # the loop ended because the server closed the stream after the terminal event
    names = [name for name, _, _ in seen]
    assert names[0] == "queued" and names[-1] == "completed"
    assert names[1] == "started" and set(names[1:-1]) == {"started", "progress"}
    assert [int(i) for _, i, _ in seen] == list(range(1, len(seen) + 1))
    assert seen[0][2]["status"] == "queued" and seen[0][2]["queue_position"] >= 1
    last = seen[-1][2]
    assert (last["id"], last["status"], last["output"]["uri"]) == (
        request_id,
        "completed",
        f"s3://out/acme/{request_id}.mp4",
    )
    assert last["urls"]["stream"].endswith(f"/v1/videos/{request_id}/events")


async def test_heartbeats_keep_the_stream_open_without_events_of_their_own(gateway, monkeypatch):
    from turboflow.gateway import stream

    monkeypatch.setattr(stream, "HEARTBEAT_SECONDS", 0.1)
    request_id = new_id()
    await gateway.create("acme", request_id)
    headers = gateway.api_key("acme")
    seen: list[tuple[str, str]] = []
    async with gateway.http.stream("GET", f"/v1/videos/{request_id}/events", headers=headers) as response:
        raw = b""
        async for chunk in response.aiter_raw():
            raw += chunk
            if raw.count(b": keep-alive") >= 3:
                break
    # the heartbeats went out after the first event; a decoder sees that event and nothing else
    assert raw.startswith(b"event: queued") and raw.count(b": keep-alive") >= 3
    async with aconnect_sse(gateway.http, "GET", f"/v1/videos/{request_id}/events", headers=headers) as source:
        async for sse in source.aiter_sse():
            seen.append((sse.event, sse.data[:1]))
            if len(seen) == 1:
                await asyncio.sleep(0.5)  # several heartbeats in a row, then the request ends
                assert (await gateway.post_event(completed_event("acme", request_id))).status_code == 200
    assert seen == [("queued", "{"), ("completed", "{")]


async def test_a_stream_opened_mid_run_starts_with_started_then_progress(gateway):
    """A client that joins while the request runs still learns who runs it (pod, cold start) before the progress."""
    request_id = new_id()
    await gateway.create("acme", request_id)
    for event in (started_event("acme", request_id), progress_event("acme", request_id, "diffusion", 2)):
        assert (await gateway.post_event(event)).status_code == 200
    seen: list[tuple[str, dict]] = []
    async with aconnect_sse(
        gateway.http, "GET", f"/v1/videos/{request_id}/events", headers=gateway.api_key("acme")
    ) as source:
        async for sse in source.aiter_sse():
            seen.append((sse.event, sse.json()))
            if len(seen) == 2:
                assert (await gateway.post_event(completed_event("acme", request_id))).status_code == 200
    assert [name for name, _ in seen] == ["started", "progress", "completed"]
    assert seen[0][1]["started"]["pod"] and seen[1][1]["progress"]["step"] == 2


async def test_the_stream_of_a_finished_request_sends_its_state_and_ends(gateway):
    request_id = new_id()
    await gateway.create("acme", request_id)
    await gateway.post_event(failed_event("acme", request_id))
    async with aconnect_sse(
        gateway.http, "GET", f"/v1/videos/{request_id}/events", headers=gateway.api_key("acme")
    ) as source:
        events = [(sse.event, sse.json()["error"]["code"]) async for sse in source.aiter_sse()]
    assert events == [("failed", "internal_error")]


async def test_the_stream_is_tenant_scoped(gateway):
    request_id = new_id()
    await gateway.create("acme", request_id)
    other = await gateway.http.get(f"/v1/videos/{request_id}/events", headers=gateway.api_key("globex"))
    unknown = await gateway.http.get("/v1/videos/nope/events", headers=gateway.api_key("acme"))
    anonymous = await gateway.http.get(f"/v1/videos/{request_id}/events")
    assert (other.status_code, unknown.status_code, anonymous.status_code) == (404, 404, 401)
    assert other.headers["content-type"] == "application/problem+json" and other.json()["code"] == "not_found"


async def test_a_client_that_disconnects_stops_its_watch(gateway):
    request_id = new_id()
    await gateway.create("acme", request_id)
    headers = gateway.api_key("acme")
    for _ in range(3):
        async with aconnect_sse(gateway.http, "GET", f"/v1/videos/{request_id}/events", headers=headers) as source:
            async for sse in source.aiter_sse():
                assert sse.event == "queued"
                break  # leave with the stream still open
    # the server is still serving, and the request still moves on and streams for a new client
    await gateway.post_event(completed_event("acme", request_id))
    async with aconnect_sse(gateway.http, "GET", f"/v1/videos/{request_id}/events", headers=headers) as source:
        assert [sse.event async for sse in source.aiter_sse()] == ["completed"]


def test_update_names_follow_the_record():
    from turboflow.eventing.requeststate import RequestRecord

    queued = RequestRecord(id="r", tenant="t", task="t2v", events=["queued"])
    running = RequestRecord(id="r", tenant="t", task="t2v", status="running", events=["queued", "started", "progress"],
                            progress={"stage": "diffusion", "step": 1})  # fmt: skip
    further = RequestRecord(id="r", tenant="t", task="t2v", status="running", events=running.events,
                            progress={"stage": "diffusion", "step": 2})  # fmt: skip
    webhook_only = RequestRecord(**{**further.__dict__, "webhook": {"attempts": [{}]}})
    done = RequestRecord(**{**further.__dict__, "status": "completed", "events": [*further.events, "completed"]})
    assert update_names(queued, running) == ["started", "progress"]
    assert update_names(running, further) == ["progress"]
    assert update_names(further, webhook_only) == []
    assert update_names(further, done) == ["completed"]


async def test_usage_sums_the_tenants_gpu_seconds_per_day(gateway):
    tenant = "u" + uuid.uuid4().hex[:8]
    for seconds in (2.0, 3.5):
        request_id = new_id()
        await gateway.create(tenant, request_id)
        await gateway.post_event(started_event(tenant, request_id))
        await gateway.post_event(completed_event(tenant, request_id, gpu_seconds=seconds))
        await gateway.post_event(completed_event(tenant, request_id, gpu_seconds=seconds))  # redelivered
    failed_id = new_id()
    await gateway.post_event(failed_event(tenant, failed_id))
    await gateway.post_event(completed_event("someone-else", new_id(), gpu_seconds=100.0))

    today = datetime.now(UTC).date().isoformat()
    answer = await gateway.http.get("/v1/usage", params={"start": today, "end": today}, headers=gateway.api_key(tenant))
    assert answer.status_code == 200
    body = answer.json()
    assert (body["tenant"], body["gpu_seconds"], body["requests"]) == (tenant, 6.5, 3)
    assert body["days"] == [{"day": today, "gpu_seconds": 6.5, "requests": 3}]

    empty = await gateway.http.get("/v1/usage", params={"end": "2001-01-01"}, headers=gateway.api_key(tenant))
    assert (empty.json()["gpu_seconds"], empty.json()["days"]) == (0, [])
    for params in ({"start": "yesterday"}, {"start": "2026-02-30"}, {"start": today, "end": "2001-01-01"}):
        bad = await gateway.http.get("/v1/usage", params=params, headers=gateway.api_key(tenant))
        assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json", params
        assert bad.json()["errors"][0]["field"] in ("start", "end")


async def test_metrics_observe_accepted_to_terminal_once(gateway):
    def count(text: str) -> float:
        prefix = 'turboflow_gateway_request_seconds_count{status="completed",task="t2v"} '
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = count((await gateway.http.get("/metrics")).text)
    request_id = new_id()
    await gateway.create("acme", request_id)
    event = completed_event("acme", request_id)
    await asyncio.gather(gateway.post_event(event), gateway.post_event(event))
    after = (await gateway.http.get("/metrics")).text
    assert count(after) == before + 1
    assert "turboflow_gateway_lifecycle_events_total" in after


# ---- through the whole gateway (G1's app and harness): submit, stream, webhooks, usage ----------------------------
class WebhookReceiver(ThreadingHTTPServer):
    """A stdlib HTTP server on a free port that records every POST and answers 204."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append((dict(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hook"
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def full_stack(moto_s3, tmp_path_factory):
    from gateway_harness import GatewayStack

    secret = new_webhook_secret()
    stack = GatewayStack.start(moto_s3, tmp_path_factory.mktemp("gateway-events"), webhook_secret=secret)
    stack.webhook_secret = secret
    try:
        yield stack
    finally:
        stack.close()


def post_event_sync(url: str, event) -> int:
    message = to_binary_event(event)
    return httpx.post(url + "/internal/events", headers=dict(message.headers), content=message.body).status_code


def wait_until(condition, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
    return value


def test_submit_stream_webhooks_and_usage_through_the_gateway(full_stack):
    from gateway_harness import SIGNING_KEY as STACK_KEY

    tenant, receiver = full_stack.tenant(), WebhookReceiver()
    auth = full_stack.auth(full_stack.api_key(tenant))
    body = {"task": "t2v", "prompt": "a fox", "webhook": receiver.url,
            "webhook_events": ["queued", "started", "completed"]}  # fmt: skip
    created = httpx.post(full_stack.url + "/v1/videos", json=body, headers=auth)
    assert created.status_code == 201, created.text
    request_id = created.json()["id"]
    lifecycle = [
        started_event(tenant, request_id, key=STACK_KEY),
        progress_event(tenant, request_id, "diffusion", 1, key=STACK_KEY),
        progress_event(tenant, request_id, "diffusion", 2, key=STACK_KEY),
        completed_event(tenant, request_id, gpu_seconds=3.25, key=STACK_KEY),
    ]
    names = []
    with httpx.Client(timeout=30) as client:
        with connect_sse(client, "GET", created.json()["urls"]["stream"], headers=auth) as source:
            for sse in source.iter_sse():
                names.append(sse.event)
                if len(names) == 1:
                    assert [post_event_sync(full_stack.url, e) for e in lifecycle] == [200] * 4
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "completed"
    assert set(names[2:-1]) <= {"progress"} and "progress" in names

    wait_until(lambda: len(receiver.received) == 3)
    payloads = [Webhook(full_stack.webhook_secret).verify(b, h) for h, b in receiver.received]
    assert sorted(p["type"] for p in payloads) == ["video.completed", "video.queued", "video.started"]
    video = wait_until(
        lambda: (v := httpx.get(created.json()["urls"]["get"], headers=auth).json())["webhook"]["attempts"][2:] and v
    )
    assert video["status"] == "completed" and all(a["ok"] for a in video["webhook"]["attempts"])

    usage = httpx.get(full_stack.url + "/v1/usage", headers=auth).json()
    assert (usage["tenant"], usage["gpu_seconds"], usage["requests"]) == (tenant, 3.25, 1)
    receiver.shutdown()
