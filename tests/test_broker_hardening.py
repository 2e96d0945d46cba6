"""The local broker under hostile or sloppy producers, on a real nats-server: nothing it acknowledged is lost, bad
input is a clear 4xx, CloudEvents identity is source + id, replies need turboflow's signature, the dead-letter
failure says whether the cause was transient, and no `time` is invented."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest
from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from eventing_harness import Collector, Sink, data_of, event, free_port, running_broker, serve_asgi, wait_port

from turboflow.eventing import signing
from turboflow.eventing.contracts import failed_event, validate_data
from turboflow.eventing.deadletter import DeadLetterApp
from turboflow.eventing.nats_binding import ExactCloudEvent, msg_id
from turboflow.eventing.natsserver import NatsServer

FAST = dict(timeout=5.0, retry=2, backoff_delay=0.05)
T2V = "io.turboflow.video.t2v.requested"
FAILED, COMPLETED = "io.turboflow.video.failed", "io.turboflow.video.completed"
KEY = signing.new_signing_key().encode()
STRUCTURED = {"content-type": "application/cloudevents+json"}


@pytest.fixture
def nats_server():
    with NatsServer() as server:
        yield server


@contextlib.asynccontextmanager
async def dead_letter_sink(key=KEY):
    app, port, stop = DeadLetterApp(sink="", signing_key=key), free_port(), asyncio.Event()
    task = asyncio.create_task(serve_asgi(app, "127.0.0.1", port, stop))
    await wait_port(port)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        stop.set()
        await task


@contextlib.asynccontextmanager
async def stack(nats_url, behaviour=None, **broker_kwargs):
    async with Sink(behaviour) as fn, dead_letter_sink() as dlq, Collector(nats_url) as seen:
        addresses = {"turboflow-t2v": fn.url, "turboflow-i2v": fn.url, "turboflow-deadletter": dlq}
        async with running_broker(nats_url, addresses, delivery=FAST, signing_key=KEY, **broker_kwargs) as broker:
            yield broker, fn, seen


async def post(broker, headers, body):
    async with httpx.AsyncClient() as client:
        return await client.post(broker.ingress_url, headers=headers, content=body)


def binary(ev):
    msg = to_binary_event(ev)
    return dict(msg.headers), msg.body


def failed_for_id(request_id):
    return lambda e: e.get_type() == FAILED and e.get_subject() == request_id


# ---- 1. nothing acknowledged is dropped -------------------------------------------------------------------------
async def test_unreadable_stored_messages_become_failed_events_linked_to_the_request(nats_server):
    async with stack(nats_server.url) as (broker, fn, seen):
        subject = f"turboflow.events.{T2V}"
        # published straight to NATS: no ce-id (the SDK would invent one) -> undecodable, linked by the subject type
        await seen.publish_raw(
            subject,
            b'{"prompt": "x"}',
            {"ce-specversion": "1.0", "ce-type": T2V, "ce-source": "/raw", "content-type": "application/json"},
        )
        # JSON nested 100,000 levels deep in data -> undecodable, linked to its id
        deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        await seen.publish_raw(
            subject,
            deep,
            {
                "ce-specversion": "1.0",
                "ce-type": T2V,
                "ce-source": "/raw",
                "ce-id": "req-deep",
                "ce-tenant": "acme",
                "content-type": "application/json",
            },
        )
        # data that is not JSON although the content type says so -> invalid_data, linked to its id
        await seen.publish_raw(
            subject,
            b"{oops",
            {
                "ce-specversion": "1.0",
                "ce-type": T2V,
                "ce-source": "/raw",
                "ce-id": "req-oops",
                "content-type": "application/json",
            },
        )
        # structured, garbage JSON
        await seen.publish_raw(subject, b"\xff not json")
        deep_failed = (await seen.wait_for(failed_for_id("req-deep")))[0]
        oops_failed = (await seen.wait_for(failed_for_id("req-oops")))[0]
        await seen.wait_for(lambda e: e.get_type() == FAILED, count=4)
        assert data_of(deep_failed)["code"] == "undecodable_event" and data_of(deep_failed)["request_id"] == "req-deep"
        assert deep_failed.get_attributes()["tenant"] == "acme"
        assert data_of(oops_failed)["code"] == "invalid_data" and data_of(oops_failed)["retryable"] is False
        for failed in seen.of_type(FAILED):
            validate_data(FAILED, data_of(failed))
            assert signing.verify_event(failed, KEY)
        assert fn.received == []  # never handed to the function
        await asyncio.sleep(0.5)
        assert len(seen.of_type(FAILED)) == 4  # one failed per message although two Triggers consume the stream
        info = await broker.log.js.consumer_info(broker.stream, "trigger-turboflow-turboflow-t2v")
        assert info.num_ack_pending == 0 and info.num_pending == 0


# ---- 2. ingress hardening ---------------------------------------------------------------------------------------
async def test_ingress_rejects_malformed_events_with_400(nats_server):
    async with stack(nats_server.url) as (broker, fn, seen):
        base = {"type": T2V, "source": "/t", "id": "x-1", "specversion": "1.0", "data": {"prompt": "a"}}
        for missing in ("id", "specversion"):
            doc = {k: v for k, v in base.items() if k != missing}
            r = await post(broker, STRUCTURED, json.dumps(doc).encode())
            assert r.status_code == 400 and missing in r.text, r.text
        r = await post(broker, STRUCTURED, json.dumps({**base, "tenant": 5}).encode())
        assert r.status_code == 400 and "tenant" in r.text
        deep = (
            b'{"type": "%s", "source": "/t", "id": "x-2", "specversion": "1.0", "data": {"a": ' % T2V.encode()
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}}"
        )
        r = await post(broker, STRUCTURED, deep)
        assert r.status_code == 400 and "deeper" in r.text
        headers, _ = binary(event(T2V))
        r = await post(broker, headers, b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        assert r.status_code == 400 and "deeper" in r.text
        r = await post(broker, headers, b"{oops")
        assert r.status_code == 400 and "not valid JSON" in r.text
        raw = [(k.encode(), v.encode()) for k, v in headers.items() if k != "ce-source"]
        r = await post(broker, raw + [(b"ce-source", b"/caf\xe9")], b'{"prompt": "a"}')
        assert r.status_code == 400 and "UTF-8" in r.text
        assert (await post(broker, STRUCTURED, json.dumps(base).encode())).status_code == 202
        await asyncio.sleep(0.3)
        assert [e.get_id() for e in fn.received] == ["x-1"]


async def test_no_time_is_added_to_what_the_producer_sent(nats_server):
    async with stack(nats_server.url) as (broker, fn, seen):
        untimed = ExactCloudEvent(
            {"type": T2V, "source": "/t", "id": "untimed-1", "datacontenttype": "application/json"}, {"prompt": "a"}
        )
        assert "time" not in untimed.get_attributes()
        assert (await post(broker, *binary(untimed))).status_code == 202
        for _ in range(100):
            if fn.raw_headers:
                break
            await asyncio.sleep(0.05)
        assert fn.raw_headers[0]["ce-id"] == "untimed-1" and "ce-time" not in fn.raw_headers[0]
        stored = await broker.log.js.get_msg(broker.stream, 1)
        assert "ce-time" not in stored.headers


# ---- 3. identity is source + id ---------------------------------------------------------------------------------
async def test_identity_is_source_plus_id_and_conflicting_duplicates_are_409(nats_server):
    async with stack(nats_server.url) as (broker, fn, seen):
        mine = event(T2V, id="shared-id", source="/producer-a", data={"prompt": "a cat"})
        theirs = event(T2V, id="shared-id", source="/producer-b", data={"prompt": "a dog"})
        assert (await post(broker, *binary(mine))).status_code == 202
        assert (await post(broker, *binary(theirs))).status_code == 202  # another producer: not a duplicate
        msg = to_structured_event(mine)
        assert (await post(broker, dict(msg.headers), msg.body)).status_code == 202  # identical re-send
        changed = event(T2V, id="shared-id", source="/producer-a", data={"prompt": "a cow"})
        r = await post(broker, *binary(changed))
        assert r.status_code == 409 and "duplicate event id" in r.text and "different content" in r.text
        for _ in range(100):
            if len(fn.received) >= 2:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert sorted(data_of(e)["prompt"] for e in fn.received) == ["a cat", "a dog"]
        stored = await broker.log.js.get_msg(broker.stream, 1)
        assert stored.headers["Nats-Msg-Id"] == msg_id("/producer-a", "shared-id")


# ---- 4. the dead-letter failure carries the cause ---------------------------------------------------------------
async def test_dead_letter_failed_keeps_the_transient_cause(nats_server):
    outage = json.dumps({"error": "storage_unavailable", "message": "S3 is unreachable", "retryable": True})
    async with stack(nats_server.url, lambda ev, n: (503, outage.encode())) as (broker, fn, seen):
        req = event(T2V, tenant="acme")
        await broker.accept(req)
        (failed,) = await seen.wait_for(failed_for_id(req.get_id()))
        data = data_of(failed)
        assert len(fn.received) == 3  # 1 + retry 2
        assert data["code"] == "delivery_failed" and data["retryable"] is True
        assert data["cause"] == {"code": "storage_unavailable", "status": 503, "retryable": True}
        assert "S3 is unreachable" in data["message"] and signing.verify_event(failed, KEY)


# ---- 5. forged replies ------------------------------------------------------------------------------------------
async def test_ingress_refuses_unsigned_turboflow_replies(nats_server):
    async with stack(nats_server.url) as (broker, fn, seen):
        forged = failed_event("req-1", "internal_error", "forged", False, source="/evil")
        completed = event(COMPLETED, subject="req-1", data={"request_id": "req-1"})
        other = event("io.turboflow.video.progress", data={})
        wrong_key = failed_event("req-1", "internal_error", "forged", False, source="/evil", signing_key=b"k" * 32)
        for ev in (forged, completed, other, wrong_key):
            r = await post(broker, *binary(ev))
            assert r.status_code == 403 and "turboflowsig" in r.text, (ev.get_type(), r.status_code, r.text)
        genuine = failed_event(
            "req-2", "internal_error", "real", False, source="/turboflow/functions/t2v", signing_key=KEY
        )
        assert (await post(broker, *binary(genuine))).status_code == 202
        assert (await post(broker, *binary(event(T2V)))).status_code == 202  # requests need no signature
        (stored,) = await seen.wait_for(lambda e: e.get_type() == FAILED)
        assert stored.get_subject() == "req-2"


# ---- 5b. `submit --wait` acts only on its own, genuine reply ------------------------------------------------------
async def test_wait_for_reply_skips_forged_foreign_and_malformed_replies(nats_server):
    import nats

    from turboflow.eventing.client import build_request, reply_subscription, wait_for_reply
    from turboflow.eventing.contracts import completed_event
    from turboflow.eventing.jetstream import ensure_stream, publish_event

    request = build_request("t2v", "a cat", tenant="acme")
    rid = request.get_id()
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_stream(js)
    good = {
        "request_id": rid,
        "tenant": "acme",
        "kind": "t2v",
        "model": "m",
        "width": 8,
        "height": 8,
        "num_frames": 1,
        "fps": 16.0,
        "duration": 0.06,
        "seed": 1,
        "num_steps": 1,
        "sigma_max": 80.0,
        "input_sha256": "0" * 64,
        "timings": {},
        "usage": {"gpu_seconds": 0.1, "cold_start": False, "model_load_seconds": 0.0, "device": "cpu"},
        "completed_at": "2026-01-01T00:00:00Z",
        "video": {
            "uri": "s3://b/k.mp4",
            "url": "http://s3/b/k.mp4",
            "url_expires_at": "2026-01-02T00:00:00Z",
            "bucket": "b",
            "key": "k.mp4",
            "content_type": "video/mp4",
            "bytes": 10,
            "sha256": "0" * 64,
        },
    }
    malformed = {k: v for k, v in good.items() if k != "video"} | {"video": {"uri": "s3://b/k.mp4"}}
    replies = [
        completed_event(request, good, source="/evil"),  # unsigned (forged)
        completed_event(request, {**good, "tenant": "other"}, source="/a", signing_key=KEY),  # other tenant
        completed_event(request, malformed, source="/b", signing_key=KEY),  # KeyError: 'bucket' before
        completed_event(request, good, source="/turboflow/functions/t2v", signing_key=KEY),
    ]
    nc_sub, sub = await reply_subscription(nats_server.url)
    for reply in replies:  # straight into the stream, as anyone with NATS access could
        await publish_event(js, reply)
    warnings = []
    try:
        got = await wait_for_reply(sub, rid, 10, tenant="acme", signing_key=KEY, warn=warnings.append)
    finally:
        await nc_sub.close()
        await nc.close()
    assert got.get_source() == "/turboflow/functions/t2v" and signing.verify_event(got, KEY)
    assert len(warnings) == 3, warnings
    assert "signature" in warnings[0] and "tenant 'other'" in warnings[1] and "malformed" in warnings[2]
