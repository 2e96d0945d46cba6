"""Local use of the gateway: the dev stack delivers the gateway's Trigger to an extra subscriber (real nats-server,
broker, dispatcher and a real HTTP receiver), the client's problem handling and printed lines, and `turboflow demo`
run as `make demo` runs it (a separate process: gateway, both functions on tiny models, T2V JSON + I2V multipart,
progress from the streams, both mp4s decoded). `turboflow dev` itself is driven in tests/test_e2e_cli.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import httpx
import pytest

from turboflow.gateway.client import describe_event, problem_error, public_view
from turboflow.gateway.devcli import curl_example, progress_bar

RUNNING = {
    "id": "r-1",
    "status": "running",
    "started": {"pod": "pod-a", "cold_start": True, "model_load_seconds": 3.14, "queue_wait": 0.5},
    "progress": {"stage": "diffusion", "step": 2, "of": 4, "elapsed": 1.25, "eta": 2.5},
}
DONE = {
    "id": "r-1",
    "status": "completed",
    "output": {
        "url": "http://s3/b/k.mp4?X-Amz-Signature=secret",
        "url_expires_at": "2030-01-01T00:00:00Z",
        "uri": "s3://b/k.mp4",
        "width": 64,
        "height": 48,
        "num_frames": 5,
        "seed": 7,
        "gpu_seconds": 1.5,
    },
}


def test_event_lines_say_what_happened_and_never_show_the_presigned_url():
    assert describe_event("queued", {"queue_position": 2}) == "queued (position 2)"
    assert describe_event("started", RUNNING) == "started on pod-a (cold start, model load 3.1s, queued 0.5s)"
    assert describe_event("progress", RUNNING) == "progress diffusion 2/4 elapsed 1.2s eta 2.5s"
    assert describe_event("progress", {"progress": {**RUNNING["progress"], "eta": None}}).endswith("eta -")
    line = describe_event("completed", DONE)
    assert line == "completed 64x48x5 seed=7 s3://b/k.mp4 gpu_s=1.50" and "X-Amz" not in line
    failed = {"error": {"code": "invalid_request", "message": "num_steps must be 1..4"}}
    assert describe_event("failed", failed) == "failed invalid_request: num_steps must be 1..4"
    shown = json.dumps(public_view(DONE))
    assert "X-Amz" not in shown and "url_expires_at" not in shown and "s3://b/k.mp4" in shown
    assert progress_bar(RUNNING, width=8) == "[####....]" and progress_bar({}, width=4) == "[....]"


def test_problem_answers_become_typed_errors():
    problem = {
        "type": "https://turboflow.io/problems/invalid_request",
        "title": "Invalid request",
        "status": 422,
        "detail": "the request is invalid",
        "code": "invalid_request",
        "errors": [{"field": "num_steps", "code": "out_of_range", "message": "must be 1..4"}],
    }
    err = problem_error(httpx.Response(422, json=problem, headers={"content-type": "application/problem+json"}))
    assert (err.code, err.status, err.field, err.retryable) == ("invalid_request", 422, "num_steps", False)
    assert err.message == "the request is invalid (num_steps: must be 1..4)"
    busy = problem_error(
        httpx.Response(429, json={"code": "too_many_requests", "detail": "8 active", "status": 429, "retry_after": 5})
    )
    assert busy.retryable and busy.retry_after == 5
    html = problem_error(httpx.Response(502, text="<html>bad gateway</html>"))
    assert html.code == "gateway_error" and "502" in html.message


def test_curl_example_is_a_valid_request():
    line = curl_example("http://127.0.0.1:8000", "tf_k_s")
    body = json.loads(line.split("-d '", 1)[1].rstrip("'"))
    assert body["task"] == "t2v" and "Bearer tf_k_s" in line and line.startswith("curl -s http://127.0.0.1:8000/v1/")


# ---- the dev stack delivers the gateway's Trigger to its subscriber ------------------------------------------------
class Receiver:
    """A plain ASGI app recording the CloudEvents the dispatcher POSTs to it (answers 202, no reply)."""

    def __init__(self):
        self.got: list[tuple[str, dict]] = []

    async def __call__(self, scope, receive, send):
        from turboflow.eventing.asgi import lifespan, read_body, request_headers, respond

        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        body = await read_body(receive)
        self.got.append((scope["path"], {**request_headers(scope), "body": body}))
        await respond(send, 202, b"")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_dev_stack_delivers_the_gateway_trigger_to_its_subscriber(moto_s3, tmp_path):
    from turboflow.eventing import contracts, signing
    from turboflow.eventing.asgi import serve_asgi
    from turboflow.eventing.client import send
    from turboflow.eventing.devstack import DevConfig, DevStack
    from turboflow.eventing.natsserver import bind_listener
    from turboflow.eventing.types import PROGRESS

    receiver, stop = Receiver(), asyncio.Event()
    listener = bind_listener("receiver", "127.0.0.1", 0)
    port = listener.getsockname()[1]
    serving = asyncio.create_task(serve_asgi(receiver, "127.0.0.1", port, stop, sock=listener))
    cfg = DevConfig(
        s3_endpoint=moto_s3,
        bucket=f"dev-{uuid.uuid4().hex[:8]}",
        kinds=(),  # no functions: only the broker's routing is under test
        subscribers={"turboflow-gateway": f"http://127.0.0.1:{port}/"},
        delivery={"timeout": 10.0, "retry": 2, "backoff_delay": 0.1},
        log_dir=tmp_path / "dev",
    )
    try:
        async with DevStack(cfg) as stack:
            ctx = {"request_id": "req-1", "tenant": "default", "kind": "t2v"}
            data = {"stage": "diffusion", "step": 1, "of": 2, "elapsed": 0.5, "eta": 0.5}
            event = contracts.lifecycle_event(
                PROGRESS, ctx, data, source="/turboflow/t2v", signing_key=stack.signing_key.encode(), sequence="d1"
            )
            await send(event, broker_url=stack.ingress_url)
            for _ in range(200):
                if receiver.got:
                    break
                await asyncio.sleep(0.05)
            path, headers = receiver.got[0]
            # the Trigger's subscriber is `ref: Service turboflow-gateway` + `uri: /internal/events`
            assert path == "/internal/events" and headers["ce-type"] == PROGRESS
            assert headers["ce-subject"] == "req-1" and signing.verify_event(event, stack.signing_key.encode())
    finally:
        stop.set()
        await asyncio.gather(serving, return_exceptions=True)


# ---- `make demo` ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_demo_goes_through_the_gateway_and_decodes_both_videos(tiny_t2v_dir, tiny_i2v_dir, tmp_path):
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "t2v").symlink_to(tiny_t2v_dir)
    (tiny / "i2v").symlink_to(tiny_i2v_dir)
    env = {**os.environ, "TURBOFLOW_TINY_DIR": str(tiny), "TURBOFLOW_DEV_STATE": str(tmp_path / "dev.json")}
    demo = subprocess.run(
        [sys.executable, "-m", "turboflow.cli", "demo", "--no-keep", "--out", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    printed = demo.stdout + demo.stderr
    assert demo.returncode == 0, printed
    assert "both videos decoded" in demo.stdout and "API key tf_" in demo.stdout
    assert "(multipart upload)" in demo.stdout
    for task in ("t2v", "i2v"):  # progress lines from each request's stream, then its completion
        assert f"  {task} started on " in demo.stdout and f"  {task} progress diffusion " in demo.stdout, printed
        assert f"  {task} completed " in demo.stdout
    assert "X-Amz-" not in printed and "Signature=" not in printed and "Traceback" not in printed
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 2
    assert not (tmp_path / "dev.json").exists()  # the demo writes no state file a later `submit` would trust
