"""Knative delivery rules of the dispatcher over the in-memory event log (no NATS), against real HTTP sinks:
filters, which answers are retried, terminal 4xx, timeouts, dead-letter extensions, replies, poison messages, a
dead-letter sink that is down. The same dispatcher runs on JetStream in tests/test_broker*.py."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys

import pytest
from cloudevents.core.v1.event import CloudEvent
from eventing_harness import Sink, event
from memory_eventlog import MemoryEventLog

from turboflow.eventing.dispatcher import ERROR_DATA_LIMIT, ERROR_EXTENSION, Dispatcher, decode_error_data
from turboflow.eventing.eventlog import Appended
from turboflow.eventing.triggers import load_triggers

FAST = dict(timeout=5.0, retry=2, backoff_delay=0.01)
T2V, I2V = "io.turboflow.video.t2v.requested", "io.turboflow.video.i2v.requested"
COMPLETED, FAILED = "io.turboflow.video.completed", "io.turboflow.video.failed"


@contextlib.asynccontextmanager
async def dispatching(event_log, t2v: str, i2v: str | None = None, dead_letter: str | None = None, **delivery):
    """The real Trigger YAML (t2v and i2v; the gateway's Trigger has its own tests), delivery shortened, subscribers
    and sink at the given URLs."""
    triggers = [
        t.with_delivery(**{**FAST, **delivery})
        for t in load_triggers(broker="default", namespace="turboflow")
        if t.name in ("turboflow-t2v", "turboflow-i2v")
    ]
    urls = {"turboflow-t2v": t2v, "turboflow-i2v": i2v or t2v}
    dispatcher = Dispatcher(event_log, triggers, {t.name: (urls[t.name], dead_letter) for t in triggers}, ack_margin=1)
    await dispatcher.start()
    try:
        yield dispatcher
    finally:
        await dispatcher.stop()


async def until(predicate, timeout: float = 20.0):
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("condition not reached")


def all_acked(event_log: MemoryEventLog) -> bool:
    want = {e.seq for e in event_log.entries}
    return len(event_log.consumers) == 2 and all(set(c.acked) >= want for c in event_log.consumers.values())


def failed_reply(ev, n):
    """What the dead-letter sink answers: a failed event linked to the request."""
    reply = CloudEvent(
        attributes={"type": FAILED, "source": "/dlq", "id": f"failed-{ev.get_id()}", "subject": ev.get_id()},
        data={"request_id": ev.get_id()},
    )
    return 200, reply


async def test_filters_send_each_event_to_its_trigger_and_ack_everything():
    event_log = MemoryEventLog()
    a, b, other = event(T2V), event(I2V), event("com.example.unrelated")
    for ev in (a, b, other):
        assert await event_log.append(ev) is Appended.NEW
    async with Sink() as t2v, Sink() as i2v, dispatching(event_log, t2v.url, i2v.url) as dispatcher:
        await until(lambda: all_acked(event_log))
        assert [e.get_id() for e in t2v.received] == [a.get_id()]
        assert [e.get_id() for e in i2v.received] == [b.get_id()]
        assert dispatcher.stats.delivered == 2 and dispatcher.stats.retries == 0


@pytest.mark.parametrize("status", [500, 503, 408, 429])
async def test_retryable_answers_are_retried_then_dead_lettered_with_knative_extensions(status):
    event_log = MemoryEventLog()
    req = event(T2V, tenant="acme")
    await event_log.append(req)
    async with (
        Sink(lambda ev, n: (status, None)) as fn,
        Sink(failed_reply) as dlq,
        dispatching(event_log, fn.url, dead_letter=dlq.url) as dispatcher,
    ):
        await until(lambda: all_acked(event_log))
        assert len(fn.received) == 1 + FAST["retry"] and dispatcher.stats.retries == FAST["retry"]
        (dead,) = dlq.received
        attrs = dead.get_attributes()
        assert dead.get_id() == req.get_id() and attrs["tenant"] == "acme"
        assert attrs["knativeerrorcode"] == str(status) and attrs["knativeerrordest"] == fn.url
        assert decode_error_data(attrs["knativeerrordata"]) == "sink says no"
        # the dead-letter sink's answer is appended like any reply
        assert [e.get_subject() for e in event_log.events(FAILED)] == [req.get_id()]


@pytest.mark.parametrize("status", [400, 404, 413])
async def test_other_4xx_is_terminal(status):
    event_log = MemoryEventLog()
    await event_log.append(event(T2V))
    async with (
        Sink(lambda ev, n: (status, None)) as fn,
        Sink() as dlq,
        dispatching(event_log, fn.url, dead_letter=dlq.url) as dispatcher,
    ):
        await until(lambda: all_acked(event_log))
        assert len(fn.received) == 1 and dispatcher.stats.retries == 0
        assert dlq.received[0].get_attributes()["knativeerrorcode"] == str(status)


async def test_a_timeout_is_retried_and_dead_lettered_without_a_status():
    async def slow(ev, n):
        await asyncio.sleep(2.0)
        return 200, None

    event_log = MemoryEventLog()
    await event_log.append(event(T2V))
    async with Sink(slow) as fn, Sink() as dlq, dispatching(event_log, fn.url, dead_letter=dlq.url, timeout=0.3):
        await until(lambda: bool(dlq.received))
        attrs = dlq.received[0].get_attributes()
        assert len(fn.received) == 1 + FAST["retry"]
        assert "knativeerrorcode" not in attrs and "knativeerrordata" not in attrs
        assert attrs["knativeerrordest"] == fn.url


async def test_error_data_is_the_first_kib_of_the_last_answer():
    body = b'{"error": "x", "pad": "' + b"y" * 3000 + b'"}'
    event_log = MemoryEventLog()
    await event_log.append(event(T2V))
    async with (
        Sink(lambda ev, n: (503, body)) as fn,
        Sink() as dlq,
        dispatching(event_log, fn.url, dead_letter=dlq.url),
    ):
        await until(lambda: bool(dlq.received))
        data = decode_error_data(dlq.received[0].get_attributes()["knativeerrordata"])
        assert data.encode() == body[:ERROR_DATA_LIMIT]


async def test_replies_are_appended_once():
    def completion(ev, n):
        # both requests name the same reply (same source + id + content): the log keeps one
        return 200, CloudEvent(
            attributes={"type": COMPLETED, "source": "/fn", "id": "done-1", "subject": "r"}, data={"ok": True}
        )

    event_log = MemoryEventLog()
    await event_log.append(event(T2V))
    await event_log.append(event(T2V))
    async with Sink(completion) as fn, dispatching(event_log, fn.url) as dispatcher:
        await until(lambda: all_acked(event_log) and len(fn.received) == 2)
        assert [e.get_id() for e in event_log.events(COMPLETED)] == ["done-1"]
        assert dispatcher.stats.delivered == 2 and dispatcher.stats.replies == 1


async def test_without_a_dead_letter_sink_an_undeliverable_event_is_dropped_and_acked():
    event_log = MemoryEventLog()
    await event_log.append(event(T2V))
    async with Sink(lambda ev, n: (503, None)) as fn, dispatching(event_log, fn.url) as dispatcher:
        await until(lambda: all_acked(event_log))
        assert len(fn.received) == 1 + FAST["retry"] and dispatcher.stats.dead_lettered == 0


async def test_a_dead_letter_sink_that_is_down_keeps_the_message_until_it_is_back():
    event_log = MemoryEventLog()
    req = event(T2V)
    await event_log.append(req)
    dlq = Sink(failed_reply)  # its port is chosen, nothing listens yet
    async with Sink(lambda ev, n: (400, None)) as fn, dispatching(event_log, fn.url, dead_letter=dlq.url):
        t2v_consumer = lambda: event_log.consumers["trigger-turboflow-turboflow-t2v"]  # noqa: E731
        await until(lambda: "trigger-turboflow-turboflow-t2v" in event_log.consumers and t2v_consumer().naks)
        assert 1 not in t2v_consumer().acked
        async with dlq:
            await until(lambda: all_acked(event_log))
        assert [e.get_id() for e in dlq.received][-1] == req.get_id()
        assert [e.get_subject() for e in event_log.events(FAILED)] == [req.get_id()]


async def test_poison_messages_go_once_to_the_dead_letter_sink_with_the_reason():
    event_log = MemoryEventLog()
    no_id = {"ce-specversion": "1.0", "ce-type": I2V, "ce-source": "/raw", "content-type": "application/json"}
    event_log.append_raw(I2V, no_id, b'{"prompt": "x"}')
    not_json = {**no_id, "ce-type": T2V, "ce-id": "req-oops", "ce-tenant": "acme"}
    event_log.append_raw(T2V, not_json, b"{oops")
    event_log.append_raw("com.example.garbage", None, b"\xff not json")  # matches no Trigger: the first one owns it
    async with Sink() as fn, Sink(failed_reply) as dlq, dispatching(event_log, fn.url, dead_letter=dlq.url):
        await until(lambda: all_acked(event_log))
        assert fn.received == []
        by_id = {e.get_id(): e.get_attributes() for e in dlq.received}
        assert set(by_id) == {"memory-1", "req-oops", "memory-3"}  # one each, although two Triggers read the log
        assert by_id["memory-1"][ERROR_EXTENSION] == "undecodable_event" and by_id["memory-1"]["type"] == I2V
        assert by_id["memory-1"]["knativeerrordest"] == f"memory:{I2V}"
        assert "missing required attributes" in decode_error_data(by_id["memory-1"]["knativeerrordata"])
        oops = by_id["req-oops"]
        assert oops[ERROR_EXTENSION] == "invalid_data" and oops["tenant"] == "acme"
        assert "not valid JSON" in decode_error_data(oops["knativeerrordata"])
        assert by_id["memory-3"]["type"] == "com.example.garbage"
        assert by_id["memory-3"]["source"] == "/turboflow/broker"


def test_the_dispatcher_and_the_ingress_import_no_nats():
    code = (
        "import sys, turboflow.eventing.dispatcher, turboflow.eventing.ingress\n"
        "print(sorted(m for m in sys.modules if m == 'nats' or m.startswith('nats.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
