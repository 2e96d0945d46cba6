"""infra/image-prepull: the DaemonSet that keeps the turboflow image (and its serving files in the page cache) on
every GPU node. Rendered with real kustomize; its schema is checked by tests/test_infra.py (KUSTOMIZATIONS); here the
policy: the functions' nodes and image, no GPU, locked down, no memory limit, and its script run for real."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kustomized import INFRA, kustomized

FUNCTIONS = ("turboflow-t2v", "turboflow-i2v")


@pytest.fixture(scope="module")
def daemonset() -> dict:
    (ds,) = [d for d in kustomized("image-prepull") if d["kind"] == "DaemonSet"]
    return ds


def _functions(overlay: str) -> list[dict]:
    return [
        d
        for d in kustomized(overlay)
        if d["kind"] == "Service"
        and d["apiVersion"].startswith("serving.knative.dev")
        and d["metadata"]["name"] in FUNCTIONS
    ]


def test_it_holds_the_functions_image_on_their_gpu_nodes(daemonset):
    pod = daemonset["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    for svc in _functions("overlays/gpu"):
        fpod = svc["spec"]["template"]["spec"]
        assert c["image"] == fpod["containers"][0]["image"], "pre-pull a different image than the functions run"
        assert pod["tolerations"] == fpod["tolerations"]
        assert (
            pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            == fpod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        )
    # the same tag as the overlay and as the model-cache warmer (one `images:` edit per directory, same value)
    tags = {
        k: yaml.safe_load((INFRA / k / "kustomization.yaml").read_text())["images"]
        for k in ("image-prepull", "overlays/gpu", "model-cache/warm")
    }
    assert tags["image-prepull"] == tags["overlays/gpu"] == tags["model-cache/warm"]
    meta = daemonset["spec"]["template"]["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= meta.items()
    assert meta["app.kubernetes.io/component"] == "image-prepull"
    assert daemonset["spec"]["updateStrategy"]["type"] == "RollingUpdate"  # a new tag is pulled on every node


def test_it_takes_no_gpu_no_volume_and_no_memory_limit(daemonset):
    pod = daemonset["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    resources = c["resources"]
    assert "nvidia.com/gpu" not in {**resources.get("requests", {}), **resources.get("limits", {})}
    assert "limits" not in resources  # a memory limit would evict the pages it reads as fast as it reads them
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert [v for v in pod["volumes"] if "persistentVolumeClaim" in v] == []  # the image only, not the model PVC


def test_it_runs_locked_down_like_the_other_workloads(daemonset):
    pod = daemonset["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc = {**pod["securityContext"], **c["securityContext"]}
    containerfile = (INFRA / "Containerfile").read_text()
    (user,) = re.findall(r"^USER (\d+):(\d+)$", containerfile, re.M)
    assert (sc["runAsUser"], sc["runAsGroup"]) == tuple(map(int, user)) and sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert {e["name"]: e["value"] for e in c["env"]}["HOME"] == "/tmp" and tmp["name"] == "tmp"
    assert c["command"][:3] == ["nice", "-n", "19"]  # the warm-up yields to a function starting on the node


def test_the_script_warms_the_serving_path_then_sleeps_until_terminated(daemonset, tmp_path):
    """The container's command as the manifest has it (this venv's python for `python`): it imports the serving
    path, reads the shared libraries, then waits as a shell that exits 0 on SIGTERM (no grace-period wait)."""
    (c,) = daemonset["spec"]["template"]["spec"]["containers"]
    command = list(c["command"])
    assert command[3] == "python"
    command[3] = sys.executable
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.Popen(
        [*command, *c["args"]],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not line.startswith(("warm:", "warm-up failed")):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert line.startswith("warm:"), line
        gb = float(re.search(r"\+ ([\d.]+) GB of libraries", line)[1])
        assert gb > 0.1  # torch's libraries at least
        time.sleep(0.5)
        assert proc.poll() is None, "it must keep running (the running container keeps the image from image GC)"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the shell's `sleep infinity`, in the session this test started
        except ProcessLookupError:
            pass
        proc.stdout.close()
