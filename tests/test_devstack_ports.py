"""`turboflow dev` announces only what it bound itself: a busy ingress or NATS port is `error[port_in_use]`
(exit 2), never a stack silently sharing another stack's NATS and durable consumers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from turboflow.eventing.natsserver import NatsServer


def run_dev(tmp_path, *args):
    env = {
        **os.environ,
        "TURBOFLOW_DEV_STATE": str(tmp_path / "dev.json"),
        "TURBOFLOW_TINY_DIR": str(tmp_path / "no-models-needed"),
    }
    return subprocess.run(
        [sys.executable, "-m", "turboflow.cli", "dev", *args, "--data-dir", str(tmp_path / "d")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_busy_ingress_port_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_dev(tmp_path, "--port", str(port), "--nats-port", "0")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error[port_in_use]: broker ingress port 127.0.0.1:{port} is already in use" in result.stderr
    assert "Traceback" not in result.stderr and "is running" not in result.stdout
    assert not (tmp_path / "dev.json").exists()


def test_nats_port_of_another_server_is_a_clear_error(tmp_path):
    with NatsServer() as other:  # e.g. the first `turboflow dev`
        result = run_dev(tmp_path, "--port", "0", "--nats-port", str(other.port))
        assert other.proc.poll() is None  # untouched
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error[port_in_use]: NATS port 127.0.0.1:{other.port} is already in use" in result.stderr
    assert not (tmp_path / "dev.json").exists()


def test_nats_server_readiness_is_its_own_process():
    with NatsServer() as first:
        second = NatsServer(port=first.port)
        with pytest.raises(Exception, match="already in use"):
            second.start()
        assert second.proc is None and first.proc.poll() is None
