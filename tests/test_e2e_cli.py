"""`turboflow dev` as a user runs it (a separate process, with the gateway), driven like a newcomer would: the raw
broker path (`turboflow submit --via http --wait`), the API with a plain HTTP client (POST -> SSE stream -> GET ->
download, as the README's curl quickstart), `turboflow submit --wait` through the gateway (progress from the
stream), and `turboflow events tail`; Ctrl-C (SIGINT) stops everything it started."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from httpx_sse import connect_sse

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SMALL = ["--num-frames", "1", "--num-steps", "2", "--aspect-ratio", "4:3"]


def listening(url: str) -> bool:
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def no_credentials(text: str) -> bool:
    return "X-Amz-" not in text and "Signature=" not in text and "credentials" not in text.lower()


def test_dev_gateway_submit_tail_and_ctrl_c(tiny_t2v_dir, tiny_i2v_dir, tmp_path):
    env = {**os.environ, "TURBOFLOW_DEV_STATE": str(tmp_path / "dev.json"), "PYTHONUNBUFFERED": "1"}
    for name in ("TURBOFLOW_BROKER_URL", "TURBOFLOW_NATS_URL", "TURBOFLOW_GATEWAY_URL", "TURBOFLOW_API_KEY"):
        env.pop(name, None)
    turboflow = [sys.executable, "-m", "turboflow.cli"]
    log = open(tmp_path / "dev.out", "w+")
    dev = subprocess.Popen(
        [
            *turboflow,
            "dev",
            "--gateway-port",
            "0",
            "--port",
            "0",
            "--nats-port",
            "0",
            "--t2v-model",
            str(tiny_t2v_dir),
            "--i2v-model",
            str(tiny_i2v_dir),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 150
        while "functions ready" not in (tmp_path / "dev.out").read_text():
            assert dev.poll() is None, (tmp_path / "dev.out").read_text()
            assert time.monotonic() < deadline, (tmp_path / "dev.out").read_text()
            time.sleep(0.2)
        out = (tmp_path / "dev.out").read_text()
        state = json.loads((tmp_path / "dev.json").read_text())
        gateway, key = state["gateway"], state["api_key"]
        assert state["broker"] in out and state["nats"] in out and "TURBOFLOW_EVENTS" in out
        # the gateway's URL, the dev key and a curl line that uses them are printed
        assert gateway in out and key in out and f"curl -s {gateway}/v1/videos" in out and key.startswith("tf_")
        assert (tmp_path / "dev.json").stat().st_mode & 0o777 == 0o600 and len(state["signing_key"]) >= 32
        assert state["signing_key"] not in out
        # nobody but turboflow may post a completion: the ingress wants the run's signature
        forged = {
            "specversion": "1.0",
            "type": "io.turboflow.video.completed",
            "source": "/evil",
            "id": "f-1",
            "subject": "anything",
            "data": {"request_id": "anything"},
        }
        r = httpx.post(
            state["broker"], content=json.dumps(forged), headers={"content-type": "application/cloudevents+json"}
        )
        assert r.status_code == 403 and "turboflowsig" in r.text

        tail = subprocess.Popen(
            [*turboflow, "events", "tail", "--all"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # 1. the raw broker path is still there
        raw = subprocess.run(
            [*turboflow, "submit", "t2v", "a red fox in the snow", *SMALL, "--via", "http", "--wait"]
            + ["--out", str(tmp_path / "raw"), "--timeout", "120"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert raw.returncode == 0, raw.stdout + raw.stderr
        assert "io.turboflow.video.completed" in raw.stdout and "sha256 ok" in raw.stdout
        assert "s3://" in raw.stdout and no_credentials(raw.stdout + raw.stderr)
        assert "warning" not in raw.stdout + raw.stderr  # the reply verified with the run's key
        assert len(list((tmp_path / "raw").glob("*.mp4"))) == 1

        # 2. the API as the README's curl quickstart uses it
        auth = {"authorization": f"Bearer {key}"}
        assert httpx.get(f"{gateway}/v1/videos").status_code == 401
        body = {"task": "t2v", "prompt": "a boat at night", "num_frames": 1, "num_steps": 2, "aspect_ratio": "4:3"}
        created = httpx.post(f"{gateway}/v1/videos", json=body, headers=auth)
        assert created.status_code == 201, created.text
        video = created.json()
        assert video["status"] in ("queued", "running") and set(video["urls"]) >= {"get", "cancel", "stream"}
        with httpx.Client(headers=auth, timeout=httpx.Timeout(30, read=120)) as client:
            with connect_sse(client, "GET", video["urls"]["stream"]) as stream:
                assert stream.response.headers["content-type"].startswith("text/event-stream")
                events = [(sse.event, sse.id, sse.data) for sse in stream.iter_sse()]
            done = client.get(video["urls"]["get"]).json()
        names = [name for name, _, _ in events]
        assert all(data.startswith("{") for _, _, data in events), [(n, i, d[:60]) for n, i, d in events]
        assert names[-1] == "completed" and json.loads(events[-1][2])["status"] == "completed", names
        assert set(names) <= {"queued", "started", "progress", "completed"}, names  # current state first, then changes
        # the function's lifecycle events reached the gateway through the ingress and the gateway's Trigger
        assert done["started"]["pod"] and done["progress"]["stage"], done
        assert done["output"]["num_frames"] == 1 and done["output"]["uri"].startswith("s3://")
        mp4 = httpx.get(done["output"]["url"])  # the presigned URL, no gateway key needed
        assert mp4.status_code == 200 and hashlib.sha256(mp4.content).hexdigest() == done["output"]["sha256"]

        # 3. `turboflow submit` goes through the gateway it finds in the state file, with progress from the stream
        sub = subprocess.run(
            [*turboflow, "submit", "t2v", "a red fox in the snow", *SMALL, "--wait"]
            + ["--out", str(tmp_path / "out"), "--timeout", "120"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert sub.returncode == 0, sub.stdout + sub.stderr
        assert "completed" in sub.stdout and "sha256 ok" in sub.stdout and "s3://" in sub.stdout
        assert f"through {gateway}" in sub.stderr and "progress diffusion" in sub.stderr, sub.stderr
        assert no_credentials(sub.stdout + sub.stderr)
        assert len(list((tmp_path / "out").glob("*.mp4"))) == 1
        # a refusal is the gateway problem's code, not a traceback
        bad = subprocess.run(
            [*turboflow, "submit", "t2v", "x", "--api-key", "tf_0000_nope"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2 and bad.stderr.startswith("error[unauthorized]"), bad.stderr

        tail.send_signal(signal.SIGINT)
        tail_out, _ = tail.communicate(timeout=30)
        lines = [ln for ln in tail_out.splitlines() if "io.turboflow.video." in ln]
        requested = [i for i, ln in enumerate(lines) if "t2v.requested" in ln]
        completed = [i for i, ln in enumerate(lines) if "video.completed" in ln]
        assert len(requested) == 3 and len(completed) == 3 and requested[0] < completed[0], tail_out

        dev.send_signal(signal.SIGINT)
        assert dev.wait(timeout=60) == 0, (tmp_path / "dev.out").read_text()
        assert "stopped" in (tmp_path / "dev.out").read_text()
        for url in [gateway, state["broker"], state["nats"], *state["functions"].values()]:
            assert not listening(url), url
        assert not (tmp_path / "dev.json").exists()
    finally:
        if dev.poll() is None:
            dev.kill()
        log.close()
