"""The function roots build and run the way knative/func's Python host builder builds and runs them.

`func` itself is a Go binary that is not available here, so each step below repeats what its source does (knative/func
at c18d6045, the scaffolding copied in tests/data/func-scaffolding), on a copy of this checkout:

1. scaffold  pkg/oci/scaffolder.go + pkg/scaffolding/scaffold.go `Write`: the `instanced-cloudevents` scaffolding
             goes to `<function root>/.func/build`, its `f` link is replaced by one to the function root.
2. install   pkg/oci/python_builder.go `WriteShared`: `pip install . --target lib` in `.func/build`; the
             scaffolding's pyproject requires `function @ {root:uri}/f`, so pip builds the function root and checks
             that it is named `function`. Here offline: --no-deps --no-build-isolation, the dependencies come from
             this venv, and the test checks the wheel declares the project's own.
3. run       pkg/oci/python_builder.go `Configure` (image: PYTHONPATH=.func/build/lib, `python
             .func/build/service/main.py`) and pkg/functions/runner.go `runPython` (LISTEN_ADDRESS, func.yaml's
             envs); func run then waits for /health/readiness (`waitFor`), and we send a real CloudEvent.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
import tomllib
from email.parser import Parser
from pathlib import Path

import httpx
import pytest
from cloudevents.core.bindings.http import to_binary_event
from function_harness import free_port, reply_event, request_event
from packaging.requirements import Requirement

from turboflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCAFFOLDING = ROOT / "tests" / "data" / "func-scaffolding" / "instanced-cloudevents"
BUCKET = "func-layout"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of this checkout as git sees it (tracked and new files, nothing ignored), the builder's input."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    copy = tmp_path_factory.mktemp("checkout")
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    return copy


def scaffold(function_root: Path) -> Path:
    """Step 1: func's scaffolding in `.func/build`, `f` linking back to the function root (a relative link)."""
    build = function_root / ".func" / "build"
    shutil.rmtree(build, ignore_errors=True)
    shutil.copytree(SCAFFOLDING, build)
    (build / "f").symlink_to(os.path.relpath(function_root, build))
    return build


def dist_requirements(lib: Path, name: str) -> list[str]:
    (info,) = lib.glob(f"{name}-*.dist-info")
    return Parser().parsestr((info / "METADATA").read_text()).get_all("Requires-Dist") or []


def pip_install(build: Path, *requirements: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    done = subprocess.run([*command, "--target", "lib", *requirements], cwd=build, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def install(build: Path) -> Path:
    """Step 2: the service, then the `function` it requires (the scaffolding's own requirement string)."""
    pip_install(build, ".")
    lib = build / "lib"
    service_requires = dist_requirements(lib, "service")
    (function_requirement,) = [r for r in service_requires if r.startswith("function @ ")]
    assert function_requirement == f"function @ {(build / 'f').as_uri()}"
    pip_install(build, function_requirement)
    # the scaffolding's middleware pin is the one the project runs and tests
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [r for r in service_requires if r.startswith("func-python")] == [
        d for d in project["dependencies"] if d.startswith("func-python")
    ]
    return lib


class Service:
    """Step 3: the scaffolded service as its own process, as the image (or `func run`) starts it."""

    def __init__(self, build: Path, env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            **env,
            "PYTHONPATH": str(build / "lib"),
            "LISTEN_ADDRESS": f"127.0.0.1:{self.port}",
        }
        self.build = build
        self.proc = subprocess.Popen(
            [sys.executable, str(build / "service" / "main.py")],
            cwd=build,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def imported_from(self) -> list[str]:
        """Where `function` and `turboflow` come from in that environment (the builder's lib, not this venv)."""
        code = "import function, turboflow; print(function.__file__); print(turboflow.__file__)"
        command = [sys.executable, "-c", code]
        done = subprocess.run(command, cwd=self.build, env=self.env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                response = httpx.get(f"{self.url}/health/readiness", timeout=2)
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the scaffolded service never became ready: {last}")

    def send(self, event) -> httpx.Response:
        message = to_binary_event(event)
        return httpx.post(self.url, headers=message.headers, content=message.body, timeout=120)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def bucket(moto_s3, s3_client):
    s3_client.create_bucket(Bucket=BUCKET)
    return {"TURBOFLOW_BUCKET": BUCKET, "S3_ENDPOINT_URL": moto_s3, "TURBOFLOW_DEVICE": "cpu"}


def built(function_root: Path) -> tuple[Path, Path]:
    build = scaffold(function_root)
    lib = install(build)
    assert (lib / "function" / "__init__.py").is_file() and (lib / "turboflow" / "engine" / "pipeline.py").is_file()
    assert (lib / "turboflow" / "eventing" / "schemas" / "t2v.requested.json").is_file()  # package data too
    return build, lib


def test_t2v_function_root_builds_and_generates(checkout, bucket, tiny_t2v_dir):
    build, lib = built(checkout / "functions" / "t2v")
    # the function root's wheel carries the project with the project's dependencies (torch, func-python, ...)
    project = tomllib.loads((checkout / "pyproject.toml").read_text())["project"]
    declared = {str(Requirement(r)) for r in dist_requirements(lib, "function")}
    assert declared == {str(Requirement(r)) for r in project["dependencies"]}
    service = Service(build, {**bucket, "MODEL_DIR": str(tiny_t2v_dir)})
    try:
        assert all(Path(p).is_relative_to(lib) for p in service.imported_from())
        service.wait_ready()
        data = {"prompt": "a lantern", "resolution": "480p", "aspect_ratio": "4:3", "num_frames": 1, "num_steps": 1}
        response = service.send(request_event("t2v", data))
        event, reply = reply_event(response)
        assert response.status_code == 200 and event.get_type() == "io.turboflow.video.completed", reply
        assert reply["video"]["bytes"] > 0 and reply["video"]["uri"].startswith(f"s3://{BUCKET}/")
    finally:
        service.close()


def test_i2v_function_root_builds_and_serves_i2v(checkout, bucket, tiny_i2v_dir):
    build, _ = built(checkout / "functions" / "i2v")
    service = Service(build, {**bucket, "MODEL_DIR": str(tiny_i2v_dir)})
    try:
        service.wait_ready()
        response = service.send(request_event("i2v", {"prompt": "no image given"}))
        event, reply = reply_event(response)
        # an i2v request without its image: the i2v function's own validation answers, with a typed code
        assert response.status_code == 200 and event.get_type() == "io.turboflow.video.failed", reply
        assert event.get_source().endswith("/i2v") and reply["retryable"] is False and reply["code"]
    finally:
        service.close()


def test_repository_root_builds_and_serves_the_task_it_is_told(checkout, bucket, tiny_i2v_dir):
    build, _ = built(checkout)
    service = Service(build, {**bucket, "MODEL_DIR": str(tiny_i2v_dir), "TURBOFLOW_TASK": "i2v"})
    try:
        service.wait_ready()
        event, reply = reply_event(service.send(request_event("i2v", {"prompt": "no image given"})))
        assert event.get_type() == "io.turboflow.video.failed" and event.get_source().endswith("/i2v"), reply
    finally:
        service.close()


def test_root_function_needs_a_known_task():
    spec = importlib.util.spec_from_file_location("root_function_func", ROOT / "function" / "func.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.new.__name__ == "new"  # func-python's serve() dispatches on this name
    assert [module.task_from({"TURBOFLOW_TASK": t}) for t in ("t2v", "i2v")] == ["t2v", "i2v"]
    for environ in ({}, {"TURBOFLOW_TASK": "T2V"}, {"TURBOFLOW_TASK": "v2v"}):
        with pytest.raises(ConfigError, match=r"^TURBOFLOW_TASK: ") as raised:
            module.task_from(environ)
        assert raised.value.code == "invalid_config"


def test_funcignore_keeps_the_build_small_and_the_code_in():
    """func's rules (pkg/functions/client.go IsIgnored): `/x` root-relative, globs and bare names at any depth."""
    patterns = [
        line.strip()
        for line in (ROOT / ".funcignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(relative: str) -> bool:
        import fnmatch

        base = relative.rsplit("/", 1)[-1]
        for pattern in patterns:
            if pattern.startswith("/"):
                if relative == pattern[1:] or relative.startswith(pattern[1:] + "/"):
                    return True
            elif fnmatch.fnmatch(base, pattern.rstrip("/")) or fnmatch.fnmatch(relative, pattern.rstrip("/")):
                return True
        return False

    for path in (".venv", ".venv/lib/x.py", "tests/test_e2e.py", "out/a.mp4", "engine/__pycache__", "x.egg-info"):
        assert ignored(path), path
    for path in ("pyproject.toml", "func.yaml", "function/func.py", "engine/pipeline.py", "infra/func/hatch_build.py"):
        assert not ignored(path), path
