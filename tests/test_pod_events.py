"""Pod events (issue 15 deliverable 1, issue 14 deliverable 5): the real function app under hypercorn with a tiny
model, moto S3 over HTTP and a recording HTTP server standing in for K_SINK.

    model loaded   -> io.turboflow.pod.ready: signed, schema-valid, id from (pod, process start, type), load seconds
    a request      -> completed usage names the pod and gpu_type
    stop           -> io.turboflow.pod.stopped: busy = the request's device time, warm idle = ready - busy
"""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from function_harness import LiveFunction, reply_event, request_event
from test_functions_lifecycle import RecordingSink

from turboflow.eventing.contracts import pod_event, validator
from turboflow.eventing.signing import derive_id, new_signing_key, verify_event
from turboflow.eventing.types import COMPLETED, POD_READY, POD_STOPPED
from turboflow.functions.lifecycle import LifecycleEmitter
from turboflow.functions.pod import PodClock, gpu_type_from_name, gpu_type_of

BUCKET = "tf-pod-events"
KEY = new_signing_key()
POD = "t2v-pod-events-1"
QUICK = dict(resolution="480p", aspect_ratio="4:3", num_frames=1, num_steps=1)


def _data(event) -> dict:
    data = event.get_data()
    return json.loads(data) if isinstance(data, (bytes, str)) else data


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def bucket(s3_client):
    try:
        s3_client.create_bucket(Bucket=BUCKET)
    except s3_client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return s3_client


def test_a_pod_reports_ready_then_stopped_with_its_busy_and_idle_time(tiny_t2v_dir, moto_s3, bucket):
    sink = RecordingSink()
    live = LiveFunction(
        "t2v",
        {
            "MODEL_DIR": str(tiny_t2v_dir),
            "TURBOFLOW_BUCKET": BUCKET,
            "S3_ENDPOINT_URL": moto_s3,
            "TURBOFLOW_DEVICE": "cpu",
            "TURBOFLOW_EVENT_SIGNING_KEY": KEY,
            "HOSTNAME": POD,
            "K_SINK": sink.url,
        },
    )
    try:
        live.wait_ready()
        events = sink.wait_for(lambda es: any(e.get_type() == POD_READY for e in es), timeout=30)
        (ready,) = [e for e in events if e.get_type() == POD_READY]
        data = _data(ready)
        assert verify_event(ready, KEY.encode())
        validator(POD_READY).validate(data)
        assert ready.get_subject() == POD
        assert (data["pod"], data["kind"], data["gpu_type"], data["device"]) == (POD, "t2v", "cpu", "cpu")
        assert data["model"] == live.fn.slot.pipeline.model_name
        assert data["load_seconds"] == pytest.approx(live.fn.slot.load_seconds, abs=1e-5)
        assert data["start_to_ready_seconds"] >= data["load_seconds"]  # the load is part of start -> ready
        started = data["process_started_at"]
        assert ready.get_id() == derive_id(KEY.encode(), "pod", ready.get_source(), POD, started, POD_READY)

        response = live.send(request_event("t2v", {"prompt": "a pod at work", **QUICK}, tenant="acme"))
        assert response.status_code == 200, response.text
        reply, completed = reply_event(response)
        assert reply.get_type() == COMPLETED
        usage = completed["usage"]
        assert (usage["gpu_type"], usage["pod"], usage["cold_start"]) == ("cpu", POD, True)
        validator(COMPLETED).validate(completed)
        held = usage["gpu_seconds"] - usage["model_load_seconds"]
    finally:
        live.close()
    try:
        events = sink.wait_for(lambda es: any(e.get_type() == POD_STOPPED for e in es), timeout=15)
    finally:
        sink.close()
    (stopped,) = [e for e in events if e.get_type() == POD_STOPPED]
    data = _data(stopped)
    assert verify_event(stopped, KEY.encode())
    validator(POD_STOPPED).validate(data)
    assert data["process_started_at"] == started
    assert stopped.get_id() == derive_id(KEY.encode(), "pod", stopped.get_source(), POD, started, POD_STOPPED)
    assert data["requests_served"] == 1
    assert data["busy_seconds"] == pytest.approx(held, abs=1e-4)
    assert data["warm_idle_seconds"] == pytest.approx(data["ready_seconds"] - data["busy_seconds"], abs=1e-5)
    assert _when(data["stopped_at"]) >= _when(data["ready_at"])


def test_pod_event_ids_are_deterministic_per_process_and_new_after_a_restart():
    base = {"pod": "p", "kind": "t2v", "model": "m", "gpu_type": "H200", "device": "cuda:0"}
    first = {**base, "process_started_at": "2026-11-30T22:54:40.000Z", "load_seconds": 8.1}
    resent = pod_event(POD_READY, dict(first), source="/f", signing_key=b"k")
    assert resent.get_id() == pod_event(POD_READY, dict(first), source="/f", signing_key=b"k").get_id()
    restarted = {**first, "process_started_at": "2026-11-30T23:10:00.000Z"}
    assert pod_event(POD_READY, restarted, source="/f", signing_key=b"k").get_id() != resent.get_id()
    assert pod_event(POD_STOPPED, dict(first), source="/f", signing_key=b"k").get_id() != resent.get_id()
    with pytest.raises(ValueError):
        pod_event("io.turboflow.video.completed", dict(first), source="/f")
    with pytest.raises(ValueError):
        pod_event(POD_READY, {**first, "pod": ""}, source="/f")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H200", "H200"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA GeForce RTX 5090", "RTX5090"),
        ("Tesla T4", "T4"),
        ("NVIDIA", "unknown"),
    ],
)
def test_gpu_type_from_the_device_name(name, expected):
    assert gpu_type_from_name(name) == expected


def test_the_configured_gpu_type_wins_and_a_cpu_is_cpu():
    assert gpu_type_of("cuda:0", "B200") == "B200"
    assert gpu_type_of("cpu") == "cpu"


def test_busy_time_never_exceeds_ready_time_and_idle_is_the_rest():
    """Pure bookkeeping: warm_idle = max(ready - busy, 0), busy capped at ready (no event loop, nothing sent)."""
    clock = PodClock(LifecycleEmitter(None, source="/f", signing_key=None), kind="t2v", pod="p", started_at=0.0)

    class Pipeline:
        model_name, device = "tiny", "cpu"

    clock.ready(Pipeline(), 1.5)
    clock.request_done(2.0)
    clock.request_done(0.0)  # a request that never held the device is not counted
    at = clock._ready_monotonic
    data = clock.stopped_data(now_monotonic=at + 10.0)
    assert (data["ready_seconds"], data["busy_seconds"], data["warm_idle_seconds"]) == (10.0, 2.0, 8.0)
    assert data["requests_served"] == 1
    assert clock.stopped_data(now_monotonic=at + 1.0)["warm_idle_seconds"] == 0.0
