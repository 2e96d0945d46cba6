"""The local broker on a real nats-server, against in-test HTTP sinks: ingress, routing by the real Trigger YAML,
retries, dead letter, replies, at-least-once across a broker kill and a nats-server restart."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from eventing_harness import Collector, Sink, data_of, event, free_port, running_broker, serve_asgi, wait_port

from turboflow.eventing.deadletter import DeadLetterApp
from turboflow.eventing.jetstream import publish_event, subject_for
from turboflow.eventing.nats_binding import from_nats, msg_id, to_nats
from turboflow.eventing.natsserver import NatsServer, find_nats_server
from turboflow.eventing.triggers import load_triggers

FAST = dict(timeout=5.0, retry=3, backoff_delay=0.05)
T2V, I2V = "io.turboflow.video.t2v.requested", "io.turboflow.video.i2v.requested"


@pytest.fixture
def nats_server():
    with NatsServer() as server:
        yield server


def test_nats_server_binary_comes_from_the_wheel():
    assert find_nats_server().endswith("nats-server")


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_nats_binding_round_trip(mode):
    ev = event(
        tenant="acme",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        data={"prompt": "über café"},
    )
    headers, payload = to_nats(ev, mode)
    assert headers["Nats-Msg-Id"] == msg_id(ev.get_source(), ev.get_id()) != msg_id("/other", ev.get_id())
    if mode == "binary":
        assert headers["ce-type"] == T2V and headers["Content-Type"] == "application/json"
        assert json.loads(payload) == {"prompt": "über café"}
    else:
        assert headers["Content-Type"] == "application/cloudevents+json" and json.loads(payload)["id"] == ev.get_id()
    back = from_nats(headers, payload)
    assert back.get_id() == ev.get_id() and back.get_attributes()["tenant"] == "acme"
    assert data_of(back) == {"prompt": "über café"}
    # the binding's header-less form (structured JSON payload only) is read too
    _, structured = to_nats(ev, "structured")
    assert from_nats(None, structured).get_id() == ev.get_id()
    with pytest.raises(ValueError):
        from_nats({}, b"not json")


def test_subjects():
    assert subject_for("io.turboflow.video.completed") == "turboflow.events.io.turboflow.video.completed"
    assert subject_for("we ird.*.>") == "turboflow.events.we_ird._._"


async def test_ingress_routes_by_the_trigger_yaml_and_publishes_replies(nats_server):
    def reply(ev, n):
        from cloudevents.core.v1.event import CloudEvent

        return 200, CloudEvent(
            attributes={
                "type": "io.turboflow.video.completed",
                "source": "/sink",
                "id": f"done-{ev.get_id()}",
                "subject": ev.get_id(),
            },
            data={"request_id": ev.get_id()},
        )

    async with Sink(reply) as t2v, Sink(reply) as i2v, Collector(nats_server.url) as seen:
        async with running_broker(
            nats_server.url, {"turboflow-t2v": t2v.url, "turboflow-i2v": i2v.url}, delivery=FAST
        ) as broker:
            assert broker.log.server_name == nats_server.server_name  # what `turboflow dev` checks
            async with httpx.AsyncClient() as client:
                a, b = event(T2V), event(I2V)
                r1 = await client.post(
                    broker.ingress_url, headers=to_binary_event(a).headers, content=to_binary_event(a).body
                )
                msg = to_structured_event(b)
                r2 = await client.post(broker.ingress_url, headers=msg.headers, content=msg.body)
                assert (r1.status_code, r2.status_code) == (202, 202)
                other = event("com.example.unrelated")
                assert (
                    await client.post(
                        broker.ingress_url, headers=to_binary_event(other).headers, content=to_binary_event(other).body
                    )
                ).status_code == 202
                # not a CloudEvent / wrong broker
                assert (
                    await client.post(broker.ingress_url, content=b"{}", headers={"content-type": "application/json"})
                ).status_code == 400
                bad = await client.post(
                    broker.ingress_url, content=b"{oops", headers={"content-type": "application/cloudevents+json"}
                )
                assert bad.status_code == 400
                wrong = broker.ingress_url.replace("/default", "/other")
                assert (
                    await client.post(wrong, headers=to_binary_event(a).headers, content=to_binary_event(a).body)
                ).status_code == 404
            done = await seen.wait_for(lambda e: e.get_type() == "io.turboflow.video.completed", count=2)
            assert {e.get_subject() for e in done} == {a.get_id(), b.get_id()}
            assert [e.get_id() for e in t2v.received] == [a.get_id()]
            assert [e.get_id() for e in i2v.received] == [b.get_id()]
            assert data_of(i2v.received[0]) == {"prompt": "a cat"}


async def test_direct_nats_publishing_both_modes(nats_server):
    async with Sink() as t2v, Sink() as i2v:
        async with running_broker(
            nats_server.url, {"turboflow-t2v": t2v.url, "turboflow-i2v": i2v.url}, delivery=FAST, ingress=False
        ) as _broker:
            import nats

            nc = await nats.connect(nats_server.url)
            js = nc.jetstream()
            a, b = event(T2V), event(I2V)
            await publish_event(js, a, mode="binary")
            await publish_event(js, b, mode="structured")
            dup = await publish_event(js, a, mode="binary")
            assert dup.duplicate  # Nats-Msg-Id = f(source, id): JetStream drops the repeat
            await nc.close()
            for _ in range(200):
                if t2v.received and i2v.received:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            assert [e.get_id() for e in t2v.received] == [a.get_id()]
            assert [e.get_id() for e in i2v.received] == [b.get_id()]


async def test_retries_then_dead_letter_emits_failed(nats_server):
    dlq = DeadLetterApp(sink="")
    port = free_port()
    stop = asyncio.Event()
    server = asyncio.create_task(serve_asgi(dlq, "127.0.0.1", port, stop))
    await wait_port(port)
    try:
        async with Sink(lambda ev, n: (503, None)) as t2v, Collector(nats_server.url) as seen:
            async with running_broker(
                nats_server.url,
                {
                    "turboflow-t2v": t2v.url,
                    "turboflow-i2v": t2v.url,
                    "turboflow-deadletter": f"http://127.0.0.1:{port}/",
                },
                delivery=FAST,
            ) as broker:
                req = event(T2V, tenant="acme")
                await broker.accept(req)
                failed = await seen.wait_for(lambda e: e.get_type() == "io.turboflow.video.failed")
                assert len(t2v.received) == 4  # 1 + retry 3
                data = data_of(failed[0])
                assert data["code"] == "delivery_failed" and data["retryable"] is True  # a 503 is transient
                assert data["request_id"] == req.get_id() and failed[0].get_subject() == req.get_id()
                assert "HTTP 503" in data["message"] and "sink says no" in data["message"]
                assert failed[0].get_attributes()["tenant"] == "acme"
                assert failed[0].get_id() != req.get_id()
    finally:
        stop.set()
        await server


async def test_terminal_4xx_is_not_retried(nats_server):
    seen_dlq = []
    async with (
        Sink(lambda ev, n: (400, None)) as t2v,
        Sink(lambda ev, n: seen_dlq.append(ev.get_attributes()) or (202, None)) as dlq,
    ):
        async with running_broker(
            nats_server.url,
            {"turboflow-t2v": t2v.url, "turboflow-i2v": t2v.url, "turboflow-deadletter": dlq.url},
            delivery=FAST,
        ) as broker:
            await broker.accept(event(T2V))
            for _ in range(100):
                if seen_dlq:
                    break
                await asyncio.sleep(0.05)
            assert len(t2v.received) == 1
            assert seen_dlq[0]["knativeerrorcode"] == "400" and seen_dlq[0]["knativeerrordest"] == t2v.url


async def test_slow_subscriber_is_not_redelivered_while_running(nats_server):
    """A delivery longer than AckWait's margin keeps the message in progress: no duplicate delivery."""

    async def slow(ev, n):
        await asyncio.sleep(2.0)
        return 200, None

    async with Sink(slow) as t2v:
        async with running_broker(
            nats_server.url,
            {"turboflow-t2v": t2v.url, "turboflow-i2v": t2v.url},
            delivery=dict(FAST, timeout=3.0),
            ack_margin=0.5,
        ) as broker:
            await broker.accept(event(T2V))
            await asyncio.sleep(3.5)
            assert len(t2v.received) == 1


async def test_broker_killed_mid_delivery_redelivers(nats_server):
    """Nothing is acked before the delivery finished: a new broker process picks the event up again."""
    gate = asyncio.Event()

    async def hang(ev, n):
        if n == 1:
            await gate.wait()
        return 200, None

    async with Sink(hang) as t2v:
        addresses = {"turboflow-t2v": t2v.url, "turboflow-i2v": t2v.url}
        async with running_broker(
            nats_server.url, addresses, delivery=dict(FAST, timeout=1.0), ack_margin=0.5
        ) as broker:
            req = event(T2V)
            await broker.accept(req)
            for _ in range(100):
                if t2v.received:
                    break
                await asyncio.sleep(0.05)
        gate.set()  # the first broker is gone without acking
        async with running_broker(nats_server.url, addresses, delivery=dict(FAST, timeout=1.0), ack_margin=0.5):
            for _ in range(200):
                if len(t2v.received) >= 2:
                    break
                await asyncio.sleep(0.05)
        assert [e.get_id() for e in t2v.received] == [req.get_id(), req.get_id()]


async def test_nats_server_restart_loses_no_accepted_event(nats_server):
    async with Sink() as t2v:
        addresses = {"turboflow-t2v": t2v.url, "turboflow-i2v": t2v.url}
        # accepted while nothing consumes
        async with running_broker(nats_server.url, addresses, delivery=FAST, triggers=[]) as broker:
            ids = [event(T2V) for _ in range(5)]
            async with httpx.AsyncClient() as client:
                for ev in ids:
                    msg = to_binary_event(ev)
                    assert (
                        await client.post(broker.ingress_url, headers=msg.headers, content=msg.body)
                    ).status_code == 202
        nats_server.stop(kill=True)  # SIGKILL: only what JetStream wrote to its file store survives
        nats_server.start()
        async with running_broker(nats_server.url, addresses, delivery=FAST) as broker:
            later = [event(T2V) for _ in range(3)]
            for ev in later[:1]:
                await broker.accept(ev)
            nats_server.stop()  # restart under a running broker: it reconnects and carries on
            nats_server.start()
            for ev in later[1:]:
                for _ in range(100):
                    try:
                        await broker.accept(ev)
                        break
                    except Exception:
                        await asyncio.sleep(0.1)
            want = {e.get_id() for e in ids + later}
            for _ in range(300):
                if want <= {e.get_id() for e in t2v.received}:
                    break
                await asyncio.sleep(0.05)
            assert want <= {e.get_id() for e in t2v.received}


async def test_a_deleted_consumer_is_recreated_and_delivery_goes_on(nats_server):
    """JetStream answers a pull on a deleted consumer with "no responders": the adapter recognises that by type
    (ServiceUnavailableError, then NotFoundError from consumer_info) and subscribes again."""
    async with Sink() as t2v:
        addresses = {"turboflow-t2v": t2v.url, "turboflow-i2v": t2v.url}
        async with running_broker(nats_server.url, addresses, delivery=FAST, ingress=False) as broker:
            first = event(T2V)
            await broker.accept(first)
            for _ in range(200):
                if t2v.received:
                    break
                await asyncio.sleep(0.05)
            await broker.log.js.delete_consumer(broker.stream, "trigger-turboflow-turboflow-t2v")
            second = event(T2V)
            await broker.accept(second)
            # the re-created consumer starts at the beginning of the stream: the first event may come again
            # before the second, so wait for the second itself
            for _ in range(300):
                if second.get_id() in {e.get_id() for e in t2v.received}:
                    break
                await asyncio.sleep(0.05)
            assert second.get_id() in {e.get_id() for e in t2v.received}


def test_trigger_yaml_is_what_the_broker_routes():
    triggers = {t.name: t for t in load_triggers()}
    assert set(triggers) == {"turboflow-t2v", "turboflow-i2v", "turboflow-gateway"}
    t2v = triggers["turboflow-t2v"]
    assert t2v.matches({"type": T2V}) and not t2v.matches({"type": I2V})
    gateway = triggers["turboflow-gateway"]  # every request and lifecycle event, nothing else
    assert all(gateway.matches({"type": t}) for t in (T2V, I2V, "io.turboflow.video.progress"))
    assert not gateway.matches({"type": "io.turboflow.pod.ready"}) and not gateway.matches({"type": "com.example"})
    assert t2v.delivery.timeout == 600 and t2v.delivery.retry == 7
    assert t2v.delivery.backoff_policy == "exponential" and t2v.delivery.backoff(3) == 20.0
    budget = sum(t2v.delivery.backoff(n) for n in range(1, t2v.delivery.retry + 1))
    assert budget >= 600, f"the retry budget ({budget:g} s) must ride out a 10 minute outage"
    assert t2v.delivery.dead_letter.ref["name"] == "turboflow-deadletter"
