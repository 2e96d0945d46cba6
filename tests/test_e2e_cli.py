"""`turboflow dev` as a user runs it (a separate process), driven by `turboflow submit --wait` and
`turboflow events tail`; Ctrl-C (SIGINT) stops everything it started."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def listening(url: str) -> bool:
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def test_dev_submit_tail_and_ctrl_c(tiny_t2v_dir, tiny_i2v_dir, tmp_path):
    env = {**os.environ, "TURBOFLOW_DEV_STATE": str(tmp_path / "dev.json"), "PYTHONUNBUFFERED": "1"}
    env.pop("TURBOFLOW_BROKER_URL", None)
    env.pop("TURBOFLOW_NATS_URL", None)
    turboflow = [sys.executable, "-m", "turboflow.cli"]
    log = open(tmp_path / "dev.out", "w+")
    dev = subprocess.Popen(
        [
            *turboflow,
            "dev",
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
        deadline = time.monotonic() + 120
        while "functions ready" not in (tmp_path / "dev.out").read_text():
            assert dev.poll() is None, (tmp_path / "dev.out").read_text()
            assert time.monotonic() < deadline, (tmp_path / "dev.out").read_text()
            time.sleep(0.2)
        out = (tmp_path / "dev.out").read_text()
        state = json.loads((tmp_path / "dev.json").read_text())
        assert state["broker"] in out and state["nats"] in out and "TURBOFLOW_EVENTS" in out
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
        import httpx

        r = httpx.post(
            state["broker"], content=json.dumps(forged), headers={"content-type": "application/cloudevents+json"}
        )
        assert r.status_code == 403 and "turboflowsig" in r.text

        tail = subprocess.Popen(
            [*turboflow, "events", "tail", "--all", "-n", "2"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        sub = subprocess.run(
            [
                *turboflow,
                "submit",
                "t2v",
                "a red fox in the snow",
                "--num-frames",
                "1",
                "--num-steps",
                "2",
                "--aspect-ratio",
                "4:3",
                "--wait",
                "--out",
                str(tmp_path / "out"),
                "--timeout",
                "120",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert sub.returncode == 0, sub.stdout + sub.stderr
        assert "io.turboflow.video.completed" in sub.stdout and "sha256 ok" in sub.stdout
        printed = sub.stdout + sub.stderr
        assert "s3://" in printed and str(tmp_path / "out") in printed
        assert "X-Amz-" not in printed and "Signature=" not in printed and "credentials" not in printed.lower()
        assert "warning" not in printed  # the reply verified with the run's key
        assert len(list((tmp_path / "out").glob("*.mp4"))) == 1
        tail_out, _ = tail.communicate(timeout=30)
        lines = [ln for ln in tail_out.splitlines() if "io.turboflow.video." in ln]
        assert "t2v.requested" in lines[0] and "video.completed" in lines[1], tail_out

        dev.send_signal(signal.SIGINT)
        assert dev.wait(timeout=60) == 0, (tmp_path / "dev.out").read_text()
        assert "stopped" in (tmp_path / "dev.out").read_text()
        for url in [state["broker"], state["nats"], *state["functions"].values()]:
            assert not listening(url), url
        assert not (tmp_path / "dev.json").exists()
    finally:
        if dev.poll() is None:
            dev.kill()
        log.close()
