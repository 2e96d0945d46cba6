"""Request state (eventing/requeststate.py): the pure transitions, and the JetStream KV store on a real nats-server."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime

import pytest

from turboflow.eventing.contracts import completed_event, failed_event, lifecycle_event
from turboflow.eventing.natsserver import NatsServer
from turboflow.eventing.requeststate import (
    RequestRecord,
    RequestStates,
    apply,
    id_key,
    request_cancel_transition,
    request_id_of,
)
from turboflow.eventing.types import CANCELLED, PROGRESS, STARTED

KEY = b"k" * 32
CTX = {"request_id": "r.1", "tenant": "acme", "kind": "t2v", "request_source": "/turboflow/gateway"}


def requested(request_id="r.1", tenant="acme", prompt="a fox"):
    from cloudevents.core.v1.event import CloudEvent

    return CloudEvent(
        attributes={
            "type": "io.turboflow.video.t2v.requested",
            "source": "/turboflow/gateway",
            "id": request_id,
            "tenant": tenant,
            "time": datetime(2026, 12, 1, 10, 0, tzinfo=UTC),
        },
        data={"prompt": prompt, "num_steps": 4},
    )


def started(**ctx):
    data = {"pod": "t2v-abc", "cold_start": True, "model_load_seconds": 3.0, "queue_wait": 0.1}
    return lifecycle_event(STARTED, {**CTX, **ctx}, data, source="/turboflow/functions/t2v", signing_key=KEY)


def progress(stage, step, of=4, **ctx):
    data = {"stage": stage, "step": step, "of": of, "elapsed": 1.0, "eta": 2.0}
    return lifecycle_event(
        PROGRESS, {**CTX, **ctx}, data, source="/turboflow/functions/t2v", signing_key=KEY, sequence=f"{stage}/{step}"
    )


def completed(**ctx):
    data = {
        "request_id": CTX["request_id"],
        "tenant": CTX["tenant"],
        "kind": "t2v",
        "video": {"uri": "s3://b/k.mp4", "url": "http://secret", "url_expires_at": "x", "bucket": "b", "key": "k.mp4"},
        "usage": {"gpu_seconds": 2.0},
        "completed_at": "2026-12-01T10:00:05Z",
        "input_sha256": "0" * 64,
    }
    from cloudevents.core.v1.event import CloudEvent

    request = CloudEvent(attributes={"type": "x", "source": "/s", "id": ctx.get("request_id", "r.1"), "tenant": "acme"})
    return completed_event(request, {**data, "request_id": ctx.get("request_id", "r.1")})


def replay(events):
    record, names = None, []
    for event in events:
        new, changes = apply(record, event)
        if new is not None:
            record = new
        names += changes
    return record, names


def test_a_request_goes_queued_started_progress_completed():
    record, names = replay([requested(), started(), progress("diffusion", 1), progress("diffusion", 2), completed()])
    assert names == ["queued", "started", "progress", "progress", "completed"]
    assert record.status == "completed" and record.started["pod"] == "t2v-abc"
    assert record.events == ["queued", "started", "progress", "completed"]
    assert record.result["video"]["key"] == "k.mp4" and "url" not in record.result["video"]  # no stale credential
    assert record.request == {"prompt": "a fox", "num_steps": 4} and record.task == "t2v"


def test_redelivery_changes_nothing_and_order_does_not_matter():
    events = [requested(), started(), progress("text_encode", 1, 1), progress("diffusion", 3), completed()]
    final, _ = replay(events)
    for event in events:  # every event again, after the end: no change
        assert apply(final, event) == (None, [])
    for order in itertools.permutations(events):
        record, names = replay(order)
        assert record.status == "completed" and names.count("completed") == 1
        assert record.result == final.result


def test_progress_only_moves_forward_and_terminal_wins_first():
    record, _ = replay([requested(), progress("vae_decode", 5, 9), progress("diffusion", 4)])
    assert record.progress["stage"] == "vae_decode" and record.status == "running"
    failed = failed_event("r.1", "out_of_memory", "oom", False, source="/f", tenant="acme", signing_key=KEY)
    record, names = replay([requested(), failed, completed()])
    assert record.status == "failed" and names == ["queued", "failed"]
    assert record.error == {"code": "out_of_memory", "message": "oom", "retryable": False}


def test_a_request_never_overwrites_an_existing_record():
    record, _ = replay([requested(prompt="mine")])
    assert apply(record, requested(prompt="someone else's")) == (None, [])


def test_events_for_invalid_ids_are_ignored():
    assert apply(None, requested(request_id="a\n")) == (None, [])
    assert apply(None, requested(tenant="Not_A_Label")) == (None, [])


def test_cancel_queued_is_terminal_running_is_requested():
    record, _ = replay([requested()])
    cancelled, changes = request_cancel_transition(record)
    assert cancelled.status == "cancelled" and changes == ["cancelled"]
    assert cancelled.cancelled["while"] == "queued" and cancelled.cancelled["gpu_seconds"] == 0
    running, _ = replay([requested(), started()])
    asked, changes = request_cancel_transition(running)
    assert asked.status == "running" and asked.cancel_requested and changes == []
    assert request_cancel_transition(asked) == (None, [])
    data = {"while": "running", "gpu_seconds": 1.5, "cancelled_at": "2026-12-01T10:00:03Z"}
    event = lifecycle_event(CANCELLED, CTX, data, source="/turboflow/functions/t2v", signing_key=KEY)
    done, changes = apply(asked, event)
    assert done.status == "cancelled" and changes == ["cancelled"] and done.cancelled["gpu_seconds"] == 1.5


def test_id_keys_are_one_to_one():
    for request_id in ("a", "a.b", "a..b", "a.", "x_y-z.1"):
        assert request_id_of(id_key(request_id)) == request_id
        assert ".." not in id_key(request_id) and not id_key(request_id).endswith(".")


@pytest.fixture(scope="module")
def nats_url():
    with NatsServer() as server:
        yield server.url


async def test_store_applies_events_with_compare_and_set(nats_url):
    states = await RequestStates.connect(nats_url, retention_seconds=3600)
    try:
        rid = "s.1"
        record, changes = await states.apply_event(requested(request_id=rid))
        assert changes == ["queued"] and (await states.get("acme", rid))[0].status == "queued"
        assert await states.count_active("acme") == 1
        # concurrent writers: every progress event lands or is superseded, none is lost to a lost update
        await asyncio.gather(*(states.apply_event(progress("diffusion", s, request_id=rid)) for s in range(1, 5)))
        record, _ = await states.get("acme", rid)
        assert record.status == "running" and record.progress["step"] == 4
        record, changes = await states.apply_event(completed(request_id=rid))
        assert record.status == "completed" or changes == []
        assert await states.count_active("acme") == 0
        assert await states.get("other", rid) is None  # tenants are separate key spaces
    finally:
        await states.close()


async def test_store_lists_watches_queues_and_claims(nats_url):
    states = await RequestStates.connect(nats_url)
    try:
        for n in range(3):
            record = RequestRecord(
                id=f"q{n}", tenant="beta", task="t2v", created_at=f"2026-12-01T10:00:0{n}Z", events=["queued"]
            )
            assert await states.create(record)
            assert not await states.create(record)
        listed = await states.list("beta")
        assert [r.id for r in listed] == ["q2", "q1", "q0"]
        assert [r.id for r in await states.list("beta", status="running")] == []
        positions = [await states.queue_position((await states.get("beta", f"q{n}"))[0]) for n in range(3)]
        assert positions == [1, 2, 3]
        cancelled, changes = await states.request_cancel("beta", "q0")
        assert cancelled.status == "cancelled" and changes == ["cancelled"]
        assert await states.queue_position((await states.get("beta", "q1"))[0]) == 1

        seen = []

        async def follow():
            async for record in states.watch("beta", "q1"):
                seen.append(record.status)
                if record.terminal:
                    return

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.2)
        await states.request_cancel("beta", "q1")
        await asyncio.wait_for(task, 10)
        assert seen == ["queued", "cancelled"]

        assert await states.claim_idempotency("beta", "key-1", "q1", "a" * 64) == ("q1", "a" * 64)
        assert await states.claim_idempotency("beta", "key-1", "q9", "b" * 64) == ("q1", "a" * 64)
    finally:
        await states.close()


def test_a_functions_terminal_event_settles_a_provisional_cancel():
    """The gateway cancels a queued request at once; if the function had in fact started it, its own terminal
    event wins: a finished video is shown (and paid), a cancel while running records the device time used."""
    record, _ = replay([requested()])
    cancelled, _ = request_cancel_transition(record)
    assert cancelled.cancelled["by"] == "gateway"
    done, changes = apply(cancelled, completed())
    assert done.status == "completed" and changes == ["completed"] and done.events[-1] == "completed"
    data = {"while": "running", "gpu_seconds": 2.5, "cancelled_at": "2026-12-01T10:00:03Z"}
    late = lifecycle_event(CANCELLED, CTX, data, source="/turboflow/functions/t2v", signing_key=KEY)
    settled, changes = apply(cancelled, late)
    assert settled.status == "cancelled" and changes == [] and settled.cancelled["gpu_seconds"] == 2.5
    assert apply(settled, completed()) == (None, [])  # settled: no longer provisional
    gateway_echo = lifecycle_event(CANCELLED, CTX, dict(data, gpu_seconds=0.0), source="/turboflow/gateway")
    assert apply(cancelled, gateway_echo) == (None, [])


def test_events_of_another_input_under_the_same_id_are_ignored():
    record, _ = replay([requested()])
    record.input_sha256 = "a" * 64
    data = {"stage": "diffusion", "step": 1, "of": 4, "elapsed": 1.0, "eta": 2.0, "input_sha256": "b" * 64}
    other = lifecycle_event(PROGRESS, CTX, data, source="/turboflow/functions/t2v", signing_key=KEY, sequence="x")
    assert apply(record, other) == (None, [])
    same = lifecycle_event(
        PROGRESS, CTX, dict(data, input_sha256="a" * 64), source="/turboflow/functions/t2v", signing_key=KEY
    )
    assert apply(record, same)[1] == ["started", "progress"]


def test_started_details_arriving_after_progress_are_kept():
    record, _ = replay([requested(), progress("diffusion", 1)])
    assert record.started is None
    later, changes = apply(record, started())
    assert changes == [] and later.started["pod"] == "t2v-abc"  # written although nothing new is announced


def test_an_event_marks_an_unaccepted_record_accepted():
    record, _ = replay([requested()])
    record.accepted = False
    assert apply(record, started())[0].accepted


async def test_discard_removes_only_records_the_broker_never_accepted(nats_url):
    states = await RequestStates.connect(nats_url)
    try:
        pending = RequestRecord(id="d1", tenant="gamma", task="t2v", created_at="2026-12-01T10:00:00Z", accepted=False)
        taken = RequestRecord(id="d2", tenant="gamma", task="t2v", created_at="2026-12-01T10:00:01Z")
        assert await states.create(pending) and await states.create(taken)
        assert await states.count_active("gamma") == 2
        assert await states.discard("gamma", "d1") and await states.get("gamma", "d1") is None
        assert not await states.discard("gamma", "d2") and await states.get("gamma", "d2") is not None
        assert await states.count_active("gamma") == 1
        assert await states.count_active("gamma", source="/turboflow/gateway") == 0  # d2 has no gateway source
    finally:
        await states.close()
