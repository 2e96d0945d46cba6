"""The T2V/I2V functions end to end: the real func-python ASGI app under hypercorn on loopback, CloudEvents from
the SDK over HTTP (binary and structured), outputs in a moto S3 server, mp4s decoded and checked."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
from function_harness import TRACEPARENT, LiveFunction, free_port, reply_event, request_event
from PIL import Image

from turboflow.engine.video import probe_video
from turboflow.eventing.contracts import validator
from turboflow.eventing.types import COMPLETED, FAILED

BUCKET, INPUTS, PRIVATE = "tf-videos", "tf-inputs", "tf-private"
SMALL = dict(resolution="480p", aspect_ratio="4:3", num_frames=1, num_steps=2)  # 640x480, ~1 s on CPU


def _png(w=400, h=300, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A few KB of PNG that decodes to 100 megapixels."""
    buf = io.BytesIO()
    Image.new("L", (10000, 10000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _data_uri(raw: bytes, media="png") -> str:
    return f"data:image/{media};base64," + base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def buckets(s3_client):
    for b in (BUCKET, INPUTS, PRIVATE):
        try:
            s3_client.create_bucket(Bucket=b)
        except s3_client.exceptions.BucketAlreadyOwnedByYou:
            pass
    s3_client.put_object(Bucket=INPUTS, Key="uploads/acme/cat.png", Body=_png())
    s3_client.put_object(Bucket=INPUTS, Key="uploads/acme/not-an-image.png", Body=b"this is text, not a png")
    s3_client.put_object(Bucket=INPUTS, Key="uploads/acme/tiny.png", Body=_png(8, 8))
    s3_client.put_object(Bucket=INPUTS, Key="uploads/globex/secret.png", Body=_png(seed=5))  # another tenant's
    s3_client.put_object(Bucket=INPUTS, Key="shared/styles/wave.png", Body=_png(seed=6))
    s3_client.put_object(Bucket=PRIVATE, Key="uploads/acme/cat.png", Body=_png())
    return s3_client


def _config(model_dir, endpoint, **extra):
    return {
        "MODEL_DIR": str(model_dir),
        "TURBOFLOW_BUCKET": BUCKET,
        "S3_ENDPOINT_URL": endpoint,
        "TURBOFLOW_DEVICE": "cpu",
        "TURBOFLOW_INPUT_BUCKETS": f"{BUCKET},{INPUTS}",
        "TURBOFLOW_SHARED_IMAGE_PREFIXES": f"{INPUTS}/shared/styles/",
        **extra,
    }


@pytest.fixture(scope="module")
def t2v(tiny_t2v_dir, moto_s3, buckets):
    live = LiveFunction("t2v", _config(tiny_t2v_dir, moto_s3))
    live.wait_ready()
    yield live
    live.close()


@pytest.fixture(scope="module")
def i2v(tiny_i2v_dir, moto_s3, buckets):
    live = LiveFunction("i2v", _config(tiny_i2v_dir, moto_s3))
    live.wait_ready()
    yield live
    live.close()


def _completed(response):
    assert response.status_code == 200, response.text
    event, data = reply_event(response)
    assert event.get_type() == COMPLETED, data
    validator(COMPLETED).validate(data)
    return event, data


def _fetch_and_probe(data, tmp_path):
    r = httpx.get(data["video"]["url"], timeout=30)  # the presigned URL works as handed out
    assert r.status_code == 200
    path = tmp_path / "out.mp4"
    path.write_bytes(r.content)
    assert len(r.content) == data["video"]["bytes"]
    return probe_video(path)


# ---------------------------------------------------------------------------------------------------------------
def test_t2v_binary_mode_end_to_end(t2v, buckets, tmp_path):
    cold_expected = t2v.fn.slot._cold_start_pending
    event = request_event(
        "t2v",
        {
            "prompt": "a red fox running in the snow",
            "resolution": "480p",
            "aspect_ratio": "4:3",
            "num_frames": 5,
            "num_steps": 2,
            "seed": 7,
        },
    )
    response = t2v.send(event, "binary")
    reply, data = _completed(response)
    # the reply mirrors the request's binary mode and keeps the tracing/tenant context
    assert response.headers["ce-type"] == COMPLETED
    assert reply.get_subject() == event.get_id() == data["request_id"]
    assert reply.get_id() != event.get_id()
    assert reply.get_extension("traceparent") == TRACEPARENT and reply.get_extension("tenant") == "acme"
    assert data["seed"] == 7 and data["num_steps"] == 2 and data["model"] == "tiny-wan2.1-t2v"
    assert (data["width"], data["height"], data["num_frames"], data["fps"]) == (640, 480, 5, 16.0)
    key = data["video"]["key"]
    day = event.get_time().strftime("%Y/%m/%d")
    assert key == f"videos/acme/{day}/{event.get_id()}.mp4" and data["video"]["uri"] == f"s3://{BUCKET}/{key}"
    info = _fetch_and_probe(data, tmp_path)
    assert (info.width, info.height, info.num_frames, info.fps) == (640, 480, 5, 16.0)
    assert info.sha256 == data["video"]["sha256"]
    head = buckets.head_object(Bucket=BUCKET, Key=key)
    assert head["ContentType"] == "video/mp4"
    assert head["Metadata"]["request-id"] == event.get_id()
    assert (head["Metadata"]["seed"], head["Metadata"]["steps"], head["Metadata"]["model"]) == (
        "7",
        "2",
        "tiny-wan2.1-t2v",
    )
    usage, timings = data["usage"], data["timings"]
    assert usage["cold_start"] is cold_expected
    assert usage["gpu_seconds"] >= timings["diffusion"] + timings["vae_decode"]
    if cold_expected:
        assert usage["gpu_seconds"] >= usage["model_load_seconds"] + timings["diffusion"]
    for stage in ("queue_wait", "text_encode", "diffusion", "vae_decode", "mp4_encode", "upload", "total"):
        assert stage in timings


def test_structured_mode_and_redelivery_is_idempotent(t2v, buckets):
    event = request_event("t2v", {"prompt": "a boat on the sea", "seed": 3, **SMALL}, tenant="globex", traceparent=None)
    first = t2v.send(event, "structured")
    assert first.headers["content-type"].startswith("application/cloudevents+json")
    reply1, data1 = _completed(first)
    assert reply1.get_extension("traceparent") is None and data1["tenant"] == "globex"
    assert data1["usage"]["cold_start"] is False or data1["usage"]["gpu_seconds"] > 0

    from turboflow.functions import metrics

    replayed_before = metrics.REQUESTS.labels("t2v", "replayed", "")._value.get()
    for mode in ("structured", "binary"):  # the broker may redeliver in either mode
        reply2, data2 = _completed(t2v.send(event, mode))
        assert data2 == data1
        assert reply2.get_id() == reply1.get_id() and reply2.get_subject() == event.get_id()
        assert reply2.get_time() == reply1.get_time()
    assert metrics.REQUESTS.labels("t2v", "replayed", "")._value.get() == replayed_before + 2  # no generation
    keys = [o["Key"] for o in buckets.list_objects_v2(Bucket=BUCKET, Prefix="videos/globex/")["Contents"]]
    assert sorted(keys) == sorted([data1["video"]["key"], data1["video"]["key"][:-4] + ".json"])


def test_output_prefix_stays_under_tenant(t2v):
    event = request_event(
        "t2v", {"prompt": "a city at night", "seed": 5, "output_prefix": "campaign-7/drafts", **SMALL}, tenant="initech"
    )
    _, data = _completed(t2v.send(event))
    assert data["video"]["key"].startswith("videos/initech/campaign-7/drafts/")
    assert data["video"]["key"].endswith(f"/{event.get_id()}.mp4")


def test_health_and_metrics_answer_while_generating_and_busy_is_retryable(t2v):
    """GPU work runs on one worker thread: health, readiness and /metrics answer while it is busy; with no queue
    allowed, a second request gets 503 (the broker retries it)."""
    fn = t2v.fn.slot
    gate, entered = threading.Event(), threading.Event()
    real_job = fn._gpu_job

    def gated(*args):
        entered.set()
        assert gate.wait(30)
        return real_job(*args)

    fn._gpu_job, saved_queue = gated, fn.max_queue
    fn.max_queue = 0
    results = {}
    first = request_event("t2v", {"prompt": "a dog", "seed": 9, **SMALL})
    worker = threading.Thread(target=lambda: results.setdefault("first", t2v.send(first)))
    try:
        worker.start()
        assert entered.wait(30)
        for path in ("/health/liveness", "/health/readiness", "/metrics"):
            t = time.perf_counter()
            r = t2v.client.get(path, timeout=5)
            assert r.status_code == 200 and time.perf_counter() - t < 2, (path, r.text)
        assert "turboflow_inflight_requests" in t2v.client.get("/metrics").text
        busy = t2v.send(request_event("t2v", {"prompt": "a cat", "seed": 1, **SMALL}))
        assert busy.status_code == 503 and busy.json()["error"] == "device_busy"
        assert busy.headers.get("retry-after")
    finally:
        gate.set()
        worker.join(60)
        fn._gpu_job, fn.max_queue = real_job, saved_queue
    _completed(results["first"])


def test_queued_requests_wait_for_the_worker(t2v):
    """With the default queue, a second request while busy waits and then completes (queue_wait > 0)."""
    fn = t2v.fn.slot
    gate, entered = threading.Event(), threading.Event()
    real_job = fn._gpu_job

    def gated(*args):
        entered.set()
        assert gate.wait(30)
        return real_job(*args)

    fn._gpu_job = gated
    results = {}
    events = [request_event("t2v", {"prompt": f"bird {i}", "seed": 20 + i, **SMALL}) for i in range(2)]
    threads = [threading.Thread(target=lambda i=i: results.setdefault(i, t2v.send(events[i]))) for i in range(2)]
    try:
        threads[0].start()
        assert entered.wait(30)
        threads[1].start()
        time.sleep(0.3)
        gate.set()
    finally:
        gate.set()
        for th in threads:
            th.join(60)
        fn._gpu_job = real_job
    waits = sorted(_completed(results[i])[1]["timings"]["queue_wait"] for i in range(2))
    assert waits[1] > 0.2


def test_redelivery_during_generation_joins_the_running_job(t2v, buckets):
    """The broker redelivers a long request before it finishes: the pod generates once and both deliveries get
    the same completion. An omitted seed becomes a seed derived from the request id."""
    from turboflow.eventing.contracts import derived_seed

    fn = t2v.fn.slot
    gate, entered = threading.Event(), threading.Event()
    real_job, calls = fn._gpu_job, []

    def gated(*args):
        calls.append(args[0].request.seed)
        entered.set()
        assert gate.wait(30)
        return real_job(*args)

    fn._gpu_job = gated
    event = request_event("t2v", {"prompt": "a slow river", **SMALL}, tenant="umbrella")
    results = {}
    threads = [
        threading.Thread(target=lambda i=i: results.setdefault(i, t2v.send(event, ("binary", "structured")[i])))
        for i in range(2)
    ]
    try:
        threads[0].start()
        assert entered.wait(30)
        threads[1].start()
        time.sleep(0.3)
    finally:
        gate.set()
        for th in threads:
            th.join(60)
        fn._gpu_job = real_job
    (r0, d0), (r1, d1) = _completed(results[0]), _completed(results[1])
    assert d0 == d1 and r0.get_id() == r1.get_id()
    assert calls == [derived_seed(event.get_id())] and d0["seed"] == calls[0]
    keys = [o["Key"] for o in buckets.list_objects_v2(Bucket=BUCKET, Prefix="videos/umbrella/")["Contents"]]
    assert len([k for k in keys if k.endswith(".mp4")]) == 1


def test_out_of_memory_is_a_failed_reply(t2v):
    import torch

    pipeline = t2v.fn.pipeline

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    pipeline._generate = oom
    try:
        r = t2v.send(request_event("t2v", {"prompt": "a huge video", **SMALL}))
    finally:
        del pipeline._generate
    assert r.status_code == 200
    event, data = reply_event(r)
    assert event.get_type() == FAILED and data["code"] == "out_of_memory" and data["retryable"] is False
    assert t2v.client.get("/health/readiness").status_code == 200


def test_i2v_with_s3_image_end_to_end(i2v, tmp_path, buckets):
    event = request_event(
        "i2v",
        {
            "prompt": "a cat walking",
            "image": f"s3://{INPUTS}/uploads/acme/cat.png",
            "seed": 4,
            "boundary": 0.9,
            "adaptive_resolution": True,
            **SMALL,
        },
    )
    reply, data = _completed(i2v.send(event))
    assert data["kind"] == "i2v" and data["model"] == "tiny-wan2.2-i2v-a14b"
    assert "image_fetch" in data["timings"] and "vae_encode" in data["timings"]
    info = _fetch_and_probe(data, tmp_path)
    # 400x300 is 4:3: adaptive resolution keeps 640x480
    assert (info.width, info.height, info.num_frames, info.fps) == (640, 480, 1, 16.0)


def test_i2v_with_inline_image_structured(i2v, tmp_path):
    event = request_event("i2v", {"prompt": "a bird flying", "image": _data_uri(_png(320, 320)), "seed": 2, **SMALL})
    _, data = _completed(i2v.send(event, "structured"))
    info = _fetch_and_probe(data, tmp_path)
    assert info.num_frames == 1 and info.width == info.height  # square image: adaptive square frame (area kept)


# ---------------------------------------------------------------------------------------------------------------
# Malformed requests: each gets a `failed` reply with a specific code; the function keeps serving.
HUGE = "a " * 2600  # 5200 characters
MALFORMED = [
    # (id, kind, data, attrs, expected code)
    ("missing-prompt", "t2v", {"num_steps": 2}, {}, "missing_field"),
    ("empty-prompt", "t2v", {"prompt": ""}, {}, "invalid_prompt"),
    ("prompt-not-string", "t2v", {"prompt": 42}, {}, "invalid_prompt"),
    ("huge-prompt", "t2v", {"prompt": HUGE}, {}, "prompt_too_long"),
    ("unknown-field", "t2v", {"prompt": "x", "num_step": 4}, {}, "unknown_field"),
    ("steps-5", "t2v", {"prompt": "x", "num_steps": 5}, {}, "invalid_num_steps"),
    ("steps-string", "t2v", {"prompt": "x", "num_steps": "4"}, {}, "invalid_num_steps"),
    ("frames-80", "t2v", {"prompt": "x", "num_frames": 80}, {}, "invalid_num_frames"),
    ("frames-0", "t2v", {"prompt": "x", "num_frames": 0}, {}, "invalid_num_frames"),
    ("resolution-1080p", "t2v", {"prompt": "x", "resolution": "1080p"}, {}, "invalid_resolution"),
    ("aspect-21-9", "t2v", {"prompt": "x", "aspect_ratio": "21:9"}, {}, "invalid_aspect_ratio"),
    ("seed-negative", "t2v", {"prompt": "x", "seed": -1}, {}, "invalid_seed"),
    ("seed-float", "t2v", {"prompt": "x", "seed": 1.5}, {}, "invalid_seed"),
    ("sigma-zero", "t2v", {"prompt": "x", "sigma_max": 0}, {}, "invalid_sigma_max"),
    ("attention-unknown", "t2v", {"prompt": "x", "attention": "flash"}, {}, "invalid_attention"),
    ("topk-2", "t2v", {"prompt": "x", "sla_topk": 2}, {}, "invalid_sla_topk"),
    ("ode-string", "t2v", {"prompt": "x", "ode": "yes"}, {}, "invalid_ode"),
    ("prefix-traversal", "t2v", {"prompt": "x", "output_prefix": "../../other-tenant"}, {}, "invalid_output_prefix"),
    ("prefix-absolute", "t2v", {"prompt": "x", "output_prefix": "/etc"}, {}, "invalid_output_prefix"),
    ("prefix-dot-segment", "t2v", {"prompt": "x", "output_prefix": "a/../../b"}, {}, "invalid_output_prefix"),
    ("unknown-model", "t2v", {"prompt": "x", "model": "Wan2.1-14B"}, {}, "unknown_model"),
    ("model-bad-name", "t2v", {"prompt": "x", "model": "../weights"}, {}, "invalid_model"),
    ("data-list", "t2v", ["prompt", "x"], {}, "invalid_data"),
    ("data-missing", "t2v", None, {}, "invalid_data"),
    ("tenant-traversal", "t2v", {"prompt": "x"}, {"tenant": "acme/../globex"}, "invalid_tenant"),
    ("tenant-uppercase", "t2v", {"prompt": "x"}, {"tenant": "ACME"}, "invalid_tenant"),
    ("request-id-traversal", "t2v", {"prompt": "x"}, {"event_id": "../../escape"}, "invalid_request_id"),
    (
        "wrong-event-type",
        "t2v",
        {"prompt": "x", "image": "s3://tf-inputs/uploads/acme/cat.png"},
        {"type": "io.turboflow.video.i2v.requested"},
        "unsupported_event_type",
    ),
    ("t2v-with-image", "t2v", {"prompt": "x", "image": "s3://tf-inputs/uploads/acme/cat.png"}, {}, "unknown_field"),
    ("i2v-missing-image", "i2v", {"prompt": "x"}, {}, "missing_field"),
    ("i2v-http-image", "i2v", {"prompt": "x", "image": "http://example.com/cat.png"}, {}, "invalid_image_reference"),
    (
        "i2v-bad-base64",
        "i2v",
        {"prompt": "x", "image": "data:image/png;base64,!!not*base64!!"},
        {},
        "invalid_image_base64",
    ),
    ("i2v-inline-not-image", "i2v", {"prompt": "x", "image": _data_uri(b"hello, I am text")}, {}, "invalid_image"),
    ("i2v-inline-too-large", "i2v", {"prompt": "x", "image": _data_uri(b"\0" * (600 << 10))}, {}, "image_too_large"),
    ("i2v-inline-pixel-bomb", "i2v", {"prompt": "x", "image": _data_uri(_bomb_png())}, {}, "image_too_large"),
    (
        "i2v-bucket-not-allowed",
        "i2v",
        {"prompt": "x", "image": f"s3://{PRIVATE}/uploads/acme/cat.png"},
        {},
        "image_bucket_not_allowed",
    ),
    (
        "i2v-image-missing",
        "i2v",
        {"prompt": "x", "image": f"s3://{INPUTS}/uploads/acme/nope.png"},
        {},
        "image_not_found",
    ),
    (
        "i2v-s3-not-image",
        "i2v",
        {"prompt": "x", "image": f"s3://{INPUTS}/uploads/acme/not-an-image.png"},
        {},
        "invalid_image",
    ),
    (
        "i2v-s3-image-too-small",
        "i2v",
        {"prompt": "x", "image": f"s3://{INPUTS}/uploads/acme/tiny.png"},
        {},
        "invalid_image",
    ),
    (
        "i2v-s3-key-traversal",
        "i2v",
        {"prompt": "x", "image": f"s3://{INPUTS}/uploads/acme/../secrets.png"},
        {},
        "invalid_image_reference",
    ),
    (
        "i2v-other-tenants-image",
        "i2v",
        {"prompt": "x", "image": f"s3://{INPUTS}/uploads/globex/secret.png"},
        {},
        "image_not_allowed",
    ),
    (
        "i2v-other-tenants-missing",
        "i2v",
        {"prompt": "x", "image": f"s3://{INPUTS}/uploads/globex/nope.png"},
        {},
        "image_not_allowed",
    ),
    (
        "i2v-outside-uploads",
        "i2v",
        {"prompt": "x", "image": f"s3://{INPUTS}/elsewhere/cat.png"},
        {},
        "image_not_allowed",
    ),
    (
        "i2v-tenant-name-prefix",
        "i2v",
        {"prompt": "x", "image": f"s3://{INPUTS}/uploads/acme-evil/cat.png"},
        {},
        "image_not_allowed",
    ),
    (
        "i2v-boundary-1.5",
        "i2v",
        {"prompt": "x", "image": f"s3://{INPUTS}/uploads/acme/cat.png", "boundary": 1.5},
        {},
        "invalid_boundary",
    ),
]


@pytest.mark.parametrize("case_id,kind,data,attrs,code", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_request_gets_failed_reply(request, case_id, kind, data, attrs, code):
    live = request.getfixturevalue(kind)
    attrs = dict(attrs)
    event_id = attrs.pop("event_id", None)
    tenant = attrs.pop("tenant", "acme")
    event = request_event(kind, data, tenant=tenant, event_id=event_id, **attrs)
    r = live.send(event, "binary" if len(case_id) % 2 else "structured")
    assert r.status_code == 200, r.text
    reply, body = reply_event(r)
    assert reply.get_type() == FAILED
    validator(FAILED).validate(body)
    assert body["code"] == code, body
    assert body["retryable"] is False and body["message"]
    assert body["request_id"] == event.get_id() and reply.get_subject() == event.get_id()
    assert reply.get_extension("traceparent") == TRACEPARENT
    if code == "image_not_allowed":
        assert "globex" not in body["message"]


def test_invalid_json_body_in_binary_mode(t2v):
    headers = {
        "ce-specversion": "1.0",
        "ce-type": "io.turboflow.video.t2v.requested",
        "ce-source": "/tests",
        "ce-id": str(uuid.uuid4()),
        "content-type": "application/json",
    }
    r = t2v.client.post("/", headers=headers, content=b'{"prompt": "unterminated')
    event, body = reply_event(r)
    assert r.status_code == 200 and event.get_type() == FAILED and body["code"] == "invalid_data"


def test_not_a_cloudevent_is_400(t2v):
    r = t2v.client.post("/", content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 400


def test_keeps_serving_after_malformed_requests(t2v, i2v):
    for live in (t2v, i2v):
        assert live.client.get("/health/liveness").status_code == 200
        assert live.client.get("/health/readiness").status_code == 200
    _completed(t2v.send(request_event("t2v", {"prompt": "a golden sun over the sea", "seed": 12, **SMALL})))
    text = t2v.client.get("/metrics").text
    assert 'turboflow_requests_total{code="invalid_num_steps",kind="t2v",outcome="failed"}' in text
    assert "turboflow_stage_seconds_bucket" in text and "turboflow_queue_wait_seconds" in text
    assert "turboflow_gpu_seconds_total" in text and 'turboflow_model_ready{kind="t2v"} 1.0' in text


# ---------------------------------------------------------------------------------------------------------------
def test_s3_unreachable_is_retryable_503(t2v_pipeline, moto_s3, tiny_t2v_dir):
    dead = f"http://127.0.0.1:{free_port()}"
    live = LiveFunction("t2v", _config(tiny_t2v_dir, dead), pipeline=t2v_pipeline)
    try:
        live.wait_ready()
        r = live.send(request_event("t2v", {"prompt": "a fox", **SMALL}))
        assert r.status_code == 503 and r.json()["error"] == "storage_unavailable", r.text
        assert dead not in r.text and "127.0.0.1" not in r.text  # internals stay in the (debug) log
        assert live.client.get("/health/liveness").status_code == 200
    finally:
        live.close()


def test_not_ready_until_the_model_cache_is_complete(tmp_path, moto_s3, buckets, tiny_t2v_dir):
    import shutil

    model = tmp_path / "model"
    live = LiveFunction("t2v", _config(model, moto_s3, TURBOFLOW_LOAD_RETRY_SECONDS="0.2"))
    try:
        deadline = time.monotonic() + 60
        while True:  # "loading" until the loader's first attempt meets the empty cache (torch may still import)
            r = live.client.get("/health/readiness")
            assert r.status_code == 500, r.text
            if "model_cache" in r.text or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert "model_cache" in r.text, r.text
        assert live.client.get("/health/liveness").status_code == 200
        # bad input is still answered right away; good input is retried later
        bad = live.send(request_event("t2v", {"prompt": "x", "num_steps": 9}))
        assert bad.status_code == 200 and reply_event(bad)[1]["code"] == "invalid_num_steps"
        good = live.send(request_event("t2v", {"prompt": "x", **SMALL}))
        assert good.status_code == 503 and good.json()["error"] == "not_ready"
        shutil.copytree(tiny_t2v_dir, model)  # the pull job finishes: the function recovers by itself
        assert "ready" in live.wait_ready(30)
    finally:
        live.close()


def test_missing_bucket_config_is_reported_by_readiness(tiny_t2v_dir, t2v_pipeline):
    live = LiveFunction("t2v", {"MODEL_DIR": str(tiny_t2v_dir), "TURBOFLOW_BUCKET": ""}, pipeline=t2v_pipeline)
    try:
        r = live.client.get("/health/readiness")
        assert r.status_code == 500 and "TURBOFLOW_BUCKET" in r.text
    finally:
        live.close()


def test_func_py_new_and_the_composed_app(tiny_t2v_dir):
    """The Knative entry point: function/func.py's new() keeps func-python's contract; FunctionApp composes
    func-python's own ASGIApplication (no library global is rebound)."""
    import func_python.cloudevent as ce

    from turboflow.functions.app import FunctionApp
    from turboflow.functions.i2v.function import new as new_i2v
    from turboflow.functions.t2v.function import new as new_t2v

    fn = new_t2v()
    assert fn.kind == "t2v" and new_i2v().kind == "i2v"
    for attr in ("handle", "start", "stop", "alive", "ready"):
        assert callable(getattr(fn, attr))
    app = FunctionApp(fn)
    assert type(app.inner) is ce.ASGIApplication and app.inner.f is fn
    assert ce.ASGIApplication.__module__ == "func_python.cloudevent" and not issubclass(ce.ASGIApplication, FunctionApp)


def test_cli_serve(tiny_t2v_dir, moto_s3, buckets):
    port = free_port()
    env = {**__import__("os").environ, "TURBOFLOW_BUCKET": BUCKET, "S3_ENDPOINT_URL": moto_s3}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "turboflow.cli",
            "serve",
            "t2v",
            "--port",
            str(port),
            "--model",
            str(tiny_t2v_dir),
            "--device",
            "cpu",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health/readiness", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.2)
        else:
            raise AssertionError("turboflow serve never became ready")
        from cloudevents.core.bindings.http import to_binary_event

        msg = to_binary_event(request_event("t2v", {"prompt": "x", "num_frames": 7}))
        r = httpx.post(url, headers=msg.headers, content=msg.body, timeout=30)
        assert r.status_code == 200 and json.loads(r.content)["code"] == "invalid_num_frames"
        assert "turboflow_requests_total" in httpx.get(f"{url}/metrics").text
    finally:
        proc.terminate()
        proc.wait(20)


# ---------------------------------------------------------------------------------------------------------------
# Issue 10: the fuzzed edges, at the HTTP level against the live function
def _post_structured(live, envelope: dict):
    return live.client.post(
        "/", content=json.dumps(envelope).encode(), headers={"content-type": "application/cloudevents+json"}
    )


def _envelope(data, **attrs):
    return {
        "specversion": "1.0",
        "type": "io.turboflow.video.t2v.requested",
        "source": "/tests/producer",
        "id": str(uuid.uuid4()),
        "tenant": "acme",
        "datacontenttype": "application/json",
        "data": data,
        **attrs,
    }


@pytest.mark.parametrize(
    "attrs,data,code",
    [
        ({"id": "req-newline\n"}, {"prompt": "x"}, "invalid_request_id"),
        ({"tenant": "acme\n"}, {"prompt": "x"}, "invalid_tenant"),
        ({}, {"prompt": "x", "output_prefix": "promo\n"}, "invalid_output_prefix"),
        ({}, {"prompt": "x", "model": "tiny-wan2.1-t2v\n"}, "invalid_model"),
    ],
)
def test_trailing_newline_identifiers_fail_before_storage(t2v, attrs, data, code):
    r = _post_structured(t2v, _envelope({**data, **SMALL}, **attrs))
    assert r.status_code == 200, r.text
    reply, body = reply_event(r)
    assert reply.get_type() == FAILED and body["code"] == code and body["retryable"] is False
    assert "\n" not in (reply.get_subject() or "")


def test_deeply_nested_body_is_400_in_both_modes(t2v):
    deep = b'{"prompt": "x", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    headers = {
        "ce-specversion": "1.0",
        "ce-type": "io.turboflow.video.t2v.requested",
        "ce-source": "/tests",
        "ce-id": str(uuid.uuid4()),
        "content-type": "application/json",
    }
    r = t2v.client.post("/", headers=headers, content=deep)
    assert r.status_code == 400 and r.json()["error"] == "invalid_cloudevent", r.text
    envelope = (
        json.dumps(_envelope({"prompt": "x"}))[:-1].encode() + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    )
    r = t2v.client.post("/", content=envelope, headers={"content-type": "application/cloudevents+json"})
    assert r.status_code == 400 and "nests" in r.json()["message"]
    assert t2v.client.get("/health/liveness").status_code == 200


def test_non_utf8_header_is_400(t2v):
    headers = [
        (b"ce-specversion", b"1.0"),
        (b"ce-type", b"io.turboflow.video.t2v.requested"),
        (b"ce-source", b"/tests"),
        (b"ce-id", str(uuid.uuid4()).encode()),
        (b"content-type", b"application/json"),
        (b"x-note", b"caf\xe9"),
    ]
    r = t2v.client.post("/", headers=headers, content=json.dumps({"prompt": "x"}).encode())
    assert r.status_code == 400 and r.json()["error"] == "invalid_cloudevent", r.text


@pytest.mark.parametrize("missing", ["id", "specversion"])
def test_cloudevent_without_id_or_specversion_is_400(t2v, buckets, missing):
    envelope = _envelope({"prompt": "x", "seed": 1, **SMALL})
    del envelope[missing]
    before = len(buckets.list_objects_v2(Bucket=BUCKET).get("Contents", []))
    r = _post_structured(t2v, envelope)
    assert r.status_code == 400 and missing in r.json()["message"], r.text
    headers = {
        "ce-specversion": "1.0",
        "ce-type": "io.turboflow.video.t2v.requested",
        "ce-source": "/tests",
        "ce-id": str(uuid.uuid4()),
        "content-type": "application/json",
    }
    del headers[f"ce-{missing}"]
    r = t2v.client.post("/", headers=headers, content=json.dumps({"prompt": "x", "seed": 1, **SMALL}).encode())
    assert r.status_code == 400 and f"ce-{missing}" in r.json()["message"], r.text
    assert len(buckets.list_objects_v2(Bucket=BUCKET).get("Contents", [])) == before  # nothing generated


def test_request_without_time_has_no_date_folders_and_redelivers_to_one_key(t2v):
    request_id = str(uuid.uuid4())
    headers = {
        "ce-specversion": "1.0",
        "ce-type": "io.turboflow.video.t2v.requested",
        "ce-source": "/tests",
        "ce-id": request_id,
        "ce-tenant": "acme",
        "content-type": "application/json",
    }
    body = json.dumps({"prompt": "a lighthouse", "seed": 2, **SMALL}).encode()
    _, first = _completed(t2v.client.post("/", headers=headers, content=body))
    assert first["video"]["key"] == f"videos/acme/{request_id}.mp4"
    _, again = _completed(t2v.client.post("/", headers=headers, content=body))
    assert again == first


def test_seed_zero_is_seed_zero_and_omitted_seed_is_derived(t2v):
    from turboflow.eventing.contracts import derived_seed

    _, data = _completed(t2v.send(request_event("t2v", {"prompt": "a kite", "seed": 0, **SMALL})))
    assert data["seed"] == 0
    event = request_event("t2v", {"prompt": "a kite", **SMALL})
    _, data = _completed(t2v.send(event))
    assert data["seed"] == derived_seed(event.get_id())


def test_reused_request_id_with_other_input_is_an_id_conflict(t2v, buckets):
    event_id = str(uuid.uuid4())
    first = request_event("t2v", {"prompt": "a red balloon", "seed": 8, **SMALL}, event_id=event_id)
    _, data = _completed(t2v.send(first))
    assert len(data["input_sha256"]) == 64
    _, replay = _completed(t2v.send(first, "structured"))
    assert replay == data
    other_prompt = request_event("t2v", {"prompt": "a blue balloon", "seed": 8, **SMALL}, event_id=event_id)
    other_source = request_event(
        "t2v", {"prompt": "a red balloon", "seed": 8, **SMALL}, event_id=event_id, source="/tests/another-producer"
    )
    for event in (other_prompt, other_source):
        r = t2v.send(event)
        assert r.status_code == 200, r.text
        reply, body = reply_event(r)
        assert reply.get_type() == FAILED and body["code"] == "id_conflict" and body["retryable"] is False
    keys = [o["Key"] for o in buckets.list_objects_v2(Bucket=BUCKET, Prefix="videos/acme/")["Contents"]]
    assert len([k for k in keys if k.endswith(f"/{event_id}.mp4")]) == 1


def test_i2v_reads_a_shared_prefix(i2v):
    event = request_event(
        "i2v",
        {"prompt": "waves", "image": f"s3://{INPUTS}/shared/styles/wave.png", "seed": 3, **SMALL},
        tenant="globex",
    )
    _, data = _completed(i2v.send(event))
    assert data["tenant"] == "globex" and data["video"]["key"].startswith("videos/globex/")


def test_signed_replies(t2v_pipeline, moto_s3, buckets, tiny_t2v_dir):
    from turboflow.eventing.signing import SIGNATURE_EXTENSION, derive_id, verify_event

    key = "s" * 32
    live = LiveFunction("t2v", _config(tiny_t2v_dir, moto_s3, TURBOFLOW_EVENT_SIGNING_KEY=key), pipeline=t2v_pipeline)
    try:
        live.wait_ready()
        event = request_event("t2v", {"prompt": "a signed fox", "seed": 1, **SMALL})
        reply, data = _completed(live.send(event))
        assert reply.get_extension(SIGNATURE_EXTENSION) and verify_event(reply, key.encode())
        assert reply.get_id() == derive_id(key.encode(), "/tests/producer", event.get_id(), COMPLETED)
        again, _ = _completed(live.send(event, "structured"))
        assert again.get_id() == reply.get_id() and verify_event(again, key.encode())
        failed, body = reply_event(live.send(request_event("t2v", {"prompt": "x", "num_steps": 9})))
        assert failed.get_type() == FAILED and verify_event(failed, key.encode())
    finally:
        live.close()


def test_unusable_signing_key_keeps_the_pod_unready(t2v_pipeline, moto_s3, buckets, tiny_t2v_dir):
    live = LiveFunction(
        "t2v", _config(tiny_t2v_dir, moto_s3, TURBOFLOW_EVENT_SIGNING_KEY="short"), pipeline=t2v_pipeline
    )
    try:
        r = live.client.get("/health/readiness")
        assert r.status_code == 500 and "TURBOFLOW_EVENT_SIGNING_KEY" in r.text, r.text
    finally:
        live.close()


@pytest.mark.parametrize(
    "status,s3_code,error", [(503, "SlowDown", "storage_unavailable"), (403, "AccessDenied", "storage_misconfigured")]
)
def test_refused_upload_is_retryable_503(t2v_pipeline, moto_s3, buckets, tiny_t2v_dir, status, s3_code, error):
    from s3_fault_proxy import S3FaultProxy, refuse_video_writes

    proxy = S3FaultProxy(moto_s3, refuse_video_writes(status, s3_code))
    live = LiveFunction("t2v", _config(tiny_t2v_dir, proxy.url), pipeline=t2v_pipeline)
    try:
        live.wait_ready()
        r = live.send(request_event("t2v", {"prompt": "a throttled fox", "seed": 1, **SMALL}))
        assert r.status_code == 503, r.text
        assert r.json()["error"] == error and r.json()["retryable"] is True and proxy.refused
        assert proxy.url not in r.text and "127.0.0.1" not in r.text and "/tmp" not in r.text
    finally:
        live.close()
        proxy.close()


def test_unexpected_error_body_reveals_nothing_internal(t2v):
    pipeline = t2v.fn.pipeline

    def bug(*a, **k):
        raise RuntimeError("boom at /tmp/turboflow-secret/x.mp4 via http://10.0.0.5:9000/bucket")

    pipeline._generate = bug
    try:
        r = t2v.send(request_event("t2v", {"prompt": "a bug", "seed": 1, **SMALL}))
    finally:
        del pipeline._generate
    assert r.status_code == 500 and r.json()["error"] == "internal_error"
    assert "/tmp" not in r.text and "10.0.0.5" not in r.text and "boom" not in r.text
