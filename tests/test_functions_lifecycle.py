"""Lifecycle events and cancellation in the functions: the real function app under hypercorn, a real nats-server
with the request-state KV, moto S3 over HTTP, and a recording HTTP server standing in for K_SINK.

    started + progress reach K_SINK in order, signed, schema-valid, coalesced (count bounds, never timings)
    cancel while queued   -> reply `cancelled`, no device used (the GPU worker never saw the job)
    cancel while running  -> reply `cancelled` at the next step boundary, nothing uploaded
    K_SINK down, NATS down -> the request completes all the same
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http_event
from function_harness import LiveFunction, free_port, reply_event, request_event

from turboflow.eventing.contracts import validator
from turboflow.eventing.natsserver import NatsServer
from turboflow.eventing.requeststate import RequestStates
from turboflow.eventing.signing import new_signing_key, verify_event
from turboflow.eventing.types import CANCELLED, COMPLETED, PROGRESS, PROGRESS_STAGES, STARTED
from turboflow.functions.lifecycle import LifecycleEmitter, eta_seconds

BUCKET = "tf-lifecycle"
KEY = new_signing_key()
QUICK = dict(resolution="480p", aspect_ratio="4:3", num_frames=1, num_steps=4)


# ---- a recording K_SINK ----------------------------------------------------------------------------------------
class RecordingSink:
    """An HTTP server that records every CloudEvent POSTed to it and answers 202, as the broker ingress does."""

    def __init__(self):
        self.events: list = []
        self._changed = threading.Condition()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                event = from_http_event(HTTPMessage(headers=headers, body=body))
                self.send_response(202)
                self.send_header("content-length", "0")
                self.end_headers()
                with sink._changed:
                    sink.events.append(event)
                    sink._changed.notify_all()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def about(self, request_id: str) -> list:
        with self._changed:
            return [e for e in self.events if e.get_subject() == request_id]

    def wait_for(self, predicate, timeout: float = 60.0) -> list:
        """The events so far once `predicate(events)` holds; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.events):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"sink never saw what was expected; got {[_short(e) for e in self.events]}")
                self._changed.wait(left)
            return list(self.events)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _short(event) -> str:
    data = _data(event)
    return f"{event.get_type().rsplit('.', 1)[-1]}:{data.get('stage', '')}/{data.get('step', '')}"


def _data(event) -> dict:
    data = event.get_data()
    return json.loads(data) if isinstance(data, (bytes, str)) else data


def _states(nats_url: str, fn):
    """Run `fn(states)` (async) against the request-state bucket on a fresh connection."""

    async def go():
        states = await RequestStates.connect(nats_url)
        try:
            return await fn(states)
        finally:
            await states.close()

    return asyncio.run(go())


def _metric(live: LiveFunction, name: str, **labels) -> float:
    """A sample from the function's own GET /metrics (0 when absent)."""
    text = live.client.get("/metrics").text
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _objects(s3_client, prefix: str) -> list[str]:
    return [o["Key"] for o in s3_client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


# ---- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nats():
    server = NatsServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sink():
    recording = RecordingSink()
    yield recording
    recording.close()


@pytest.fixture(scope="module")
def bucket(s3_client):
    try:
        s3_client.create_bucket(Bucket=BUCKET)
    except s3_client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return s3_client


def _config(model_dir, endpoint, **extra):
    return {
        "MODEL_DIR": str(model_dir),
        "TURBOFLOW_BUCKET": BUCKET,
        "S3_ENDPOINT_URL": endpoint,
        "TURBOFLOW_DEVICE": "cpu",
        "TURBOFLOW_EVENT_SIGNING_KEY": KEY,
        "HOSTNAME": "t2v-pod-1",
        **extra,
    }


@pytest.fixture(scope="module")
def t2v(tiny_t2v_dir, moto_s3, bucket, sink, nats):
    live = LiveFunction("t2v", _config(tiny_t2v_dir, moto_s3, K_SINK=sink.url, TURBOFLOW_NATS_URL=nats.url))
    live.wait_ready()
    yield live
    live.close()


def _queued(nats_url: str, event) -> None:
    """The gateway's part: the request's record, queued, in the KV."""
    _states(nats_url, lambda states: states.apply_event(event))


# ---- started and progress ---------------------------------------------------------------------------------------
def test_started_and_progress_reach_the_sink_in_order_signed_and_coalesced(t2v, sink):
    event = request_event("t2v", {"prompt": "a heron at dawn", "seed": 4, **QUICK}, event_id=f"life-{uuid.uuid4()}")
    request_id = event.get_id()
    response = t2v.send(event)
    assert response.status_code == 200, response.text
    reply, completed = reply_event(response)
    assert reply.get_type() == COMPLETED
    events = sink.wait_for(
        lambda _: any(_data(e).get("stage") == "upload" and _data(e)["step"] == 1 for e in sink.about(request_id))
    )
    mine = [e for e in events if e.get_subject() == request_id]
    assert mine[0].get_type() == STARTED
    started = _data(mine[0])
    validator(STARTED).validate(started)
    assert started["pod"] == "t2v-pod-1" and started["tenant"] == "acme" and started["kind"] == "t2v"
    assert started["input_sha256"] == completed["input_sha256"]
    assert started["cold_start"] is completed["usage"]["cold_start"]
    assert started["queue_wait"] >= 0 and started["model_load_seconds"] >= 0

    progress = [_data(e) for e in mine[1:]]
    assert {e.get_type() for e in mine[1:]} == {PROGRESS}
    for data in progress:
        validator(PROGRESS).validate(data)
        assert data["input_sha256"] == completed["input_sha256"]
    positions = [(PROGRESS_STAGES.index(d["stage"]), d["step"]) for d in progress]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)  # in order, each once
    # the last step of every stage this request went through is always sent (no vae_encode: T2V)
    finals = {(d["stage"], d["step"]) for d in progress if d["step"] == d["of"]}
    assert finals == {("text_encode", 1), ("diffusion", 4), ("vae_decode", 1), ("upload", 1)}
    elapsed = [d["elapsed"] for d in progress]
    assert elapsed == sorted(elapsed)
    assert progress[-1]["eta"] is not None and progress[-1]["eta"] <= 0.001  # the upload finished: nothing left
    # the engine reported 2 (text) + 5 (steps 0..4) + 2 (decode) + 2 (upload) = 11 times; coalescing sends fewer
    assert 4 <= len(progress) <= 11
    assert all(verify_event(e, KEY.encode()) for e in mine)
    assert len({e.get_id() for e in mine}) == len(mine)
    assert all(e.get_extension("tenant") == "acme" for e in mine)


def test_progress_is_coalesced_per_request_and_never_blocks_the_reporting_thread(sink):
    """A reporter called 2,000 times in a tight loop from another thread sends the finals plus a handful: at most
    one event per min_interval besides the stage finals (the bound is counted over the run's own duration)."""
    request = {"request_id": f"burst-{uuid.uuid4()}", "tenant": "acme", "kind": "t2v", "request_source": "/t"}

    async def run():
        emitter = LifecycleEmitter(sink.url, source="/tests", signing_key=KEY.encode(), kind="t2v", min_interval=0.5)
        await emitter.start()
        reporter = emitter.reporter(request, {"diffusion": 1500, "vae_decode": 500}, asyncio.get_running_loop())
        began = time.perf_counter()

        def hot_loop():
            for step in range(1501):
                reporter("diffusion", step, 1500)
            for frame in range(501):
                reporter("vae_decode", frame, 500)

        await asyncio.to_thread(hot_loop)
        await asyncio.sleep(0)  # let the last wake-up run
        reporter.close()
        seconds = time.perf_counter() - began
        await emitter.stop(drain_seconds=10)
        return reporter, seconds

    reporter, seconds = asyncio.run(run())
    assert reporter.reports == 2002
    sent = [_data(e) for e in sink.about(request["request_id"])]
    assert len(sent) == reporter.emitted
    assert {(d["stage"], d["step"]) for d in sent if d["step"] == d["of"]} == {("diffusion", 1500), ("vae_decode", 500)}
    assert len(sent) <= 2 + 1 + int(seconds / 0.5) + 1  # finals + the first + one per interval
    positions = [(PROGRESS_STAGES.index(d["stage"]), d["step"]) for d in sent]
    assert positions == sorted(positions)


def test_eta_formula():
    units, rates = {"text_encode": 1, "diffusion": 4, "vae_decode": 9, "upload": 1}, {"vae_decode": 0.5, "upload": 2}
    # 1 step took 3 s: 3 steps left at 3 s, then 9 frames at 0.5 s and an upload of 2 s
    assert eta_seconds("diffusion", 1, 4, 3.0, units, rates) == pytest.approx(9 + 4.5 + 2)
    assert eta_seconds("diffusion", 0, 4, 0.0, units, rates) is None  # no rate for diffusion yet
    assert eta_seconds("vae_decode", 0, 9, 0.0, units, rates) == pytest.approx(4.5 + 2)
    assert eta_seconds("text_encode", 1, 1, 1.0, units, rates) is None  # the diffusion rate is not known yet
    assert eta_seconds("upload", 1, 1, 2.0, units, rates) == 0


# ---- cancellation -----------------------------------------------------------------------------------------------
def test_cancel_while_queued_replies_cancelled_without_the_device(t2v, nats, sink, bucket):
    event = request_event("t2v", {"prompt": "a kite over dunes", "seed": 5, **QUICK}, event_id=f"q-{uuid.uuid4()}")
    request_id = event.get_id()
    _queued(nats.url, event)
    record, changes = _states(nats.url, lambda states: states.request_cancel("acme", request_id))
    assert record.status == "cancelled" and changes == ["cancelled"]
    device_jobs = _metric(t2v, "turboflow_queue_wait_seconds_count", kind="t2v")
    cancelled_before = _metric(t2v, "turboflow_requests_total", kind="t2v", outcome="cancelled")

    response = t2v.send(event, "structured")
    assert response.status_code == 200, response.text
    reply, data = reply_event(response)
    assert reply.get_type() == CANCELLED and reply.get_subject() == request_id
    validator(CANCELLED).validate(data)
    assert data["while"] == "queued" and data["gpu_seconds"] == 0 and data["tenant"] == "acme"
    assert re.fullmatch(r"[0-9a-f]{64}", data["input_sha256"])
    assert verify_event(reply, KEY.encode())
    assert _metric(t2v, "turboflow_queue_wait_seconds_count", kind="t2v") == device_jobs  # never on the worker
    assert _metric(t2v, "turboflow_requests_total", kind="t2v", outcome="cancelled") == cancelled_before + 1
    assert _metric(t2v, "turboflow_requests_total", kind="t2v", outcome="failed", code="cancelled") == 0
    assert sink.about(request_id) == []  # no started, no progress
    assert not any(request_id in key for key in _objects(bucket, "videos/"))  # nothing generated

    again = t2v.send(event)  # a redelivery is cancelled again, with the same event id
    assert reply_event(again)[0].get_id() == reply.get_id()


def test_cancel_while_running_stops_at_a_step_and_uploads_nothing(t2v, nats, sink, bucket):
    # 17 frames decode in several chunks, seconds of work after the first step: the cancel lands long before
    fields = {"prompt": "a lighthouse in a storm", "seed": 6, **QUICK, "num_frames": 17}
    event = request_event("t2v", fields, event_id=f"r-{uuid.uuid4()}")
    request_id = event.get_id()
    _queued(nats.url, event)
    results = {}
    worker = threading.Thread(target=lambda: results.setdefault("response", t2v.send(event)))
    worker.start()
    try:
        # once it runs (a started event at the sink), the gateway's consumer applies it and a user cancels
        events = sink.wait_for(lambda _: any(e.get_type() == STARTED for e in sink.about(request_id)))
        started = next(e for e in events if e.get_subject() == request_id and e.get_type() == STARTED)
        record, _ = _states(nats.url, lambda states: states.apply_event(started))
        assert record.status == "running"
        record, changes = _states(nats.url, lambda states: states.request_cancel("acme", request_id))
        assert record.cancel_requested and record.status == "running" and changes == []
    finally:
        worker.join(300)
    response = results["response"]
    assert response.status_code == 200, response.text
    reply, data = reply_event(response)
    assert reply.get_type() == CANCELLED, data
    validator(CANCELLED).validate(data)
    assert data["while"] == "running" and data["gpu_seconds"] > 0
    assert verify_event(reply, KEY.encode())
    assert not any(request_id in key for key in _objects(bucket, "videos/"))  # neither mp4 nor sidecar
    reached = {(_data(e).get("stage"), _data(e).get("step")) for e in sink.about(request_id)}
    assert ("vae_decode", 17) not in reached and ("upload", 0) not in reached  # it stopped at a step boundary
    # the terminal event moves the record to cancelled (the gateway applies the reply it gets back)
    record, changes = _states(nats.url, lambda states: states.apply_event(reply))
    assert record.status == "cancelled" and changes == ["cancelled"]


# ---- what is down never fails a request -----------------------------------------------------------------------
def test_a_sink_and_kv_that_are_down_do_not_fail_the_request(tiny_t2v_dir, moto_s3, bucket):
    dead = free_port()
    live = LiveFunction(
        "t2v",
        _config(
            tiny_t2v_dir, moto_s3, K_SINK=f"http://127.0.0.1:{dead}/", TURBOFLOW_NATS_URL=f"nats://127.0.0.1:{dead}"
        ),
    )
    try:
        live.wait_ready()
        unavailable = _metric(live, "turboflow_cancel_checks_total", kind="t2v", outcome="unavailable")
        dropped = _metric(live, "turboflow_lifecycle_events_total", kind="t2v", type="started", outcome="dropped")
        event = request_event("t2v", {"prompt": "rain on a window", "seed": 8, **QUICK})
        response = live.send(event)
        assert response.status_code == 200, response.text
        reply, data = reply_event(response)
        assert reply.get_type() == COMPLETED
        assert httpx.get(data["video"]["url"], timeout=30).status_code == 200
        assert _metric(live, "turboflow_cancel_checks_total", kind="t2v", outcome="unavailable") == unavailable + 1
        deadline = time.monotonic() + 30  # the sender gives up after its retries, in the background
        while time.monotonic() < deadline:
            now = _metric(live, "turboflow_lifecycle_events_total", kind="t2v", type="started", outcome="dropped")
            if now > dropped:
                break
            time.sleep(0.1)
        assert now == dropped + 1
    finally:
        live.close()
