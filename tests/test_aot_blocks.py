"""AOTInductor packages of the DiT blocks (engine/aot_blocks.py, `compile="aot"`) on the CPU, tiny model with SLA,
its own proj_l per block and FP8 linears: one package built once for the module (a first pod that found none), then
its output against eager, every fallback, and a fresh process that loads it and compiles nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST
from safetensors.torch import save_file

from turboflow.engine import aot_blocks, modelcache
from turboflow.engine import compile_artifacts as ca
from turboflow.engine.checkpoint import SLA_FILE
from turboflow.engine.families import family
from turboflow.engine.loading import compile_artifact_inputs, load_pipeline
from turboflow.engine.options import LoadOptions
from turboflow.errors import ConfigError
from turboflow.settings import Settings

SIZE = (FAST["resolution"], FAST["aspect_ratio"], FAST["num_frames"])  # the served size the package is built for
REQUEST = dict(seed=3, num_steps=2, **FAST)
AOT = dict(device="cpu", compile="aot", quant_linear="fp8", compile_warmup=[SIZE])


@pytest.fixture(scope="module")
def sla_model(tiny_t2v_dir, tmp_path_factory):
    """The tiny model with SLA as its default attention and a distinct proj_l per block (P is a graph input)."""
    root = tmp_path_factory.mktemp("aot-model") / "model"
    shutil.copytree(tiny_t2v_dir, root)
    manifest = modelcache.read_manifest(root)
    generator = torch.Generator().manual_seed(5)
    proj_l = {}
    for i in range(2):  # the tiny DiT's blocks, head dim 12
        proj_l[f"blocks.{i}.proj_l.weight"] = torch.randn(12, 12, generator=generator) * 0.5
        proj_l[f"blocks.{i}.proj_l.bias"] = torch.randn(12, generator=generator) * 0.1
    (root / "transformer" / SLA_FILE).parent.mkdir(parents=True)
    save_file(proj_l, root / "transformer" / SLA_FILE)
    modelcache.write_manifest(
        root,
        name=manifest.name,
        kind=manifest.kind,
        components=manifest.components,
        defaults={**manifest.defaults, "attention": "sla"},
    )
    return root


@pytest.fixture(scope="module")
def first_pod(sla_model, tmp_path_factory):
    """A first pod: no package anywhere, compile_require_artifacts off: it builds, saves and uses the package."""
    cache = tmp_path_factory.mktemp("aot-cache")
    pipe = load_pipeline(sla_model, compile_cache_dir=str(cache), **AOT)
    return pipe, cache


@pytest.fixture(scope="module")
def eager_frames(sla_model):
    """The eager pipeline's frames for REQUEST (the reference every compiled or fallen-back load is held to)."""
    pipe = load_pipeline(sla_model, device="cpu", quant_linear="fp8")
    return pipe(pipe.request("a fox", **REQUEST)).frames


def test_the_first_pod_builds_saves_and_runs_every_block_through_the_package(first_pod, eager_frames):
    pipe, cache = first_pod
    report = pipe.compile_artifact
    assert report.artifact == "missing" and report.compiled and report.info["blocks"] == 2
    assert Path(report.saved) == cache / "aoti" / f"{report.key}.bin" and Path(report.saved).is_file()
    assert report.inputs["compile_mode"] == "aot" and report.inputs["quant_linear"] == "fp8"
    assert report.inputs["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    before = report.stats.aot_calls
    frames = pipe(pipe.request("a fox", **REQUEST)).frames
    assert report.stats.aot_calls - before == 2 * 2 and report.stats.eager_calls == 0  # blocks x steps
    assert np.abs(frames.astype(int) - eager_frames.astype(int)).max() <= 2


def test_each_block_through_the_package_equals_its_eager_forward(first_pod):
    pipe, _ = first_pod
    (example,) = aot_blocks.capture(pipe, [SIZE])  # a forward pre-hook: the package runs, the hook still sees it
    assert example.signature["projections"][0] is not None  # SLA's proj_l went in as an input
    proj = [b.attn1.processor.proj_weight for b in pipe.transformer.blocks]
    assert not torch.equal(proj[0], proj[1])  # so each block's output below is computed with its own P and W
    with torch.no_grad():
        for block in pipe.transformer.blocks:
            calls = pipe.compile_artifact.stats.aot_calls
            compiled = block(*example.args, **example.kwargs)
            assert pipe.compile_artifact.stats.aot_calls == calls + 1
            reference = type(block).forward(block, *example.args, **example.kwargs)
            torch.testing.assert_close(compiled, reference, rtol=1e-4, atol=1e-5)


def _runs_eager(pipe, example, reason: str) -> None:
    """A call of block 0 that the guard must send to the block's own forward, for `reason`."""
    stats, block = pipe.compile_artifact.stats, pipe.transformer.blocks[0]
    aot, eager = stats.aot_calls, stats.eager_calls
    out = block(*example.args, **example.kwargs)
    assert (stats.aot_calls, stats.eager_calls) == (aot, eager + 1) and reason in stats.last_reason
    with torch.no_grad():
        assert torch.equal(out, type(block).forward(block, *example.args, **example.kwargs))


def test_other_sizes_attention_settings_and_grad_mode_run_eager(first_pod):
    pipe, _ = first_pod
    (other_size,) = aot_blocks.capture(pipe, [("480p", "16:9", 1)])  # another served size: other shapes
    (served,) = aot_blocks.capture(pipe, [SIZE])
    with torch.no_grad():
        _runs_eager(pipe, other_size, "no package for activations")
        try:
            pipe.use_attention("sla", 0.5)  # another top-k: the same tensors, another graph
            _runs_eager(pipe, served, "attention processors")
            pipe.use_attention("original", 0.0)  # dense attention: no proj_l either
            _runs_eager(pipe, served, "no package for activations")
        finally:
            default = pipe.request("a fox", **FAST).request
            pipe.use_attention(default.attention, default.sla_topk)
    _runs_eager(pipe, served, "grad mode")  # the package has no backward
    with torch.no_grad():
        calls = pipe.compile_artifact.stats.aot_calls
        pipe.transformer.blocks[0](*served.args, **served.kwargs)
        assert pipe.compile_artifact.stats.aot_calls == calls + 1  # back on the package after the swaps


def _copy_artifact(pipe, cache: Path) -> Path:
    target = cache / "aoti" / Path(pipe.compile_artifact.saved).name
    target.parent.mkdir(parents=True)
    shutil.copy(pipe.compile_artifact.saved, target)
    shutil.copy(Path(pipe.compile_artifact.saved).with_suffix(".json"), target.with_suffix(".json"))
    return target


def test_a_key_mismatch_falls_back_to_eager(sla_model, first_pod, eager_frames, tmp_path):
    pipe, _ = first_pod
    _copy_artifact(pipe, tmp_path)  # this size's package; the load below serves another size: another key
    required = dict(AOT, compile_require_artifacts=True, compile_warmup=[("480p", "16:9", 1)])
    other = load_pipeline(sla_model, compile_cache_dir=str(tmp_path), **required)
    report = other.compile_artifact
    assert report.artifact == "mismatch" and "sizes=" in report.detail and not report.compiled
    assert aot_blocks.installed(other.transformer) == 0 and other.load_report["compile_artifact"]["compiled"] is False
    assert np.array_equal(other(other.request("a fox", **REQUEST)).frames, eager_frames)  # eager is eager


def test_corrupt_and_foreign_packages_are_reported_not_raised(sla_model, first_pod, tmp_path):
    pipe, _ = first_pod
    key, inputs = pipe.compile_artifact.key, pipe.compile_artifact.inputs
    cpu = torch.device("cpu")
    # a flipped byte: the checksum catches it before AOTInductor sees the bytes
    path = _copy_artifact(pipe, tmp_path / "flipped")
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    report = aot_blocks.load(aot_blocks.store_for_model(sla_model, tmp_path / "flipped"), key, inputs, cpu)
    assert report.artifact == "corrupt" and "checksum" in report.detail and report.packages == []
    # intact framing around bytes that are no .pt2: AOTInductor's loader refuses them
    store = aot_blocks.store_for_model(sla_model, tmp_path / "foreign")
    signature = json.loads(Path(pipe.compile_artifact.saved).with_suffix(".json").read_text())["info"]["models"][0]
    store.save(key, inputs, b"not a pt2", {"format": aot_blocks.FORMAT, "models": [{**signature, "bytes": 9}]})
    report = aot_blocks.load(store, key, inputs, cpu)
    assert report.artifact == "corrupt" and "AOTInductor" in report.detail and report.packages == []
    # a header whose sizes do not add up to the payload
    store.save(key, inputs, b"x" * 10, {"format": aot_blocks.FORMAT, "models": [{**signature, "bytes": 9}]})
    assert aot_blocks.load(store, key, inputs, cpu).artifact == "corrupt"


_CHILD = r"""
import json, os, subprocess, sys
import numpy as np
from turboflow.cli import main
from turboflow.engine.loading import load_pipeline

model, cache, out = sys.argv[1:4]
assert 0 == main(["model", "compile-artifacts", "--model-dir", model, "--device", "cpu", "--sizes", "480p:4:3:1",
      "--quant-linear", "fp8", "--compile", "aot", "--compile-cache", cache])
pipe = load_pipeline(model, device="cpu", compile="aot", quant_linear="fp8", compile_warmup=[("480p", "4:3", 1)],
                     compile_cache_dir=cache, compile_require_artifacts=True)
frames = pipe(pipe.request("a fox", seed=3, num_steps=2, resolution="480p", aspect_ratio="4:3", num_frames=1)).frames
np.save(out, frames)
from torch._dynamo.utils import counters
inductor_dir = os.environ["TORCHINDUCTOR_CACHE_DIR"]
print(json.dumps({
    "artifact": pipe.compile_artifact.artifact, "stats": pipe.compile_artifact.stats.to_dict(),
    "counters": {k: dict(v) for k, v in counters.items() if v},
    "inductor_files": [os.path.join(d, f) for d, _, fs in os.walk(inductor_dir) for f in fs],
    "inductor_packaging_imported": "torch._inductor.package" in sys.modules,
}))
"""


def test_a_fresh_process_loads_the_package_and_compiles_nothing(sla_model, first_pod, tmp_path):
    pipe, _ = first_pod
    _copy_artifact(pipe, tmp_path / "fresh")  # as the model-cache job or the first pod would leave it
    frames = pipe(pipe.request("a fox", **REQUEST)).frames
    inductor = tmp_path / "inductor"  # empty: a compile, or Inductor's C-compiler probes, would write here
    inductor.mkdir()
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(inductor), TRITON_CACHE_DIR=str(tmp_path / "triton"))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(sla_model), str(tmp_path / "fresh"), str(tmp_path / "frames.npy")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli, child = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    # the command found the package intact and did not build it again
    assert cli["built"] is False and cli["before"] == "loaded" and cli["key"] == pipe.compile_artifact.key
    assert child["artifact"] == "loaded" and child["stats"]["aot_calls"] == 2 * 2 and child["stats"]["eager_calls"] == 0
    # no dynamo frame, no Inductor graph, no C++ build, and Inductor's packaging code never imported
    assert child["counters"] == {} and child["inductor_files"] == []
    assert child["inductor_packaging_imported"] is False
    assert np.abs(np.load(tmp_path / "frames.npy").astype(int) - frames.astype(int)).max() <= 1


def test_aot_is_a_compile_setting_and_refuses_several_gpus():
    assert Settings.from_env({"TURBOFLOW_COMPILE": "AOT"}).compile == "aot"
    assert LoadOptions.from_settings(Settings.from_env({"TURBOFLOW_COMPILE": "aot"})).compile == "aot"
    with pytest.raises(ConfigError, match="gpus"):
        LoadOptions(compile="aot", gpus=2)
    with pytest.raises(ConfigError, match="aot"):
        LoadOptions(compile="ahead")


def test_the_key_differs_from_the_compile_artifacts_and_the_stores_are_apart(sla_model, first_pod, tmp_path):
    report = first_pod[0].compile_artifact
    manifest = modelcache.read_manifest(sla_model)
    jit = LoadOptions(compile=True, quant_linear="fp8", compile_warmup=[SIZE])
    inputs = compile_artifact_inputs(
        sla_model, manifest, family(manifest.family), torch.device("cpu"), torch.float32, jit
    )
    assert {k for k, v in report.inputs.items() if inputs.get(k) != v} == {"compile_mode", "cpu_capability"}
    assert ca.artifact_key(inputs) != report.key
    assert aot_blocks.store_for_model(sla_model, tmp_path).directories == [
        tmp_path / "aoti",
        sla_model / ".compile-cache" / "aoti",
    ]


def test_a_cuda_load_is_refused_until_the_loader_is_verified():
    """The package loader segfaulted on CUDA (BENCHMARKS.md run 15): a CUDA load must be a report, never a try."""
    from turboflow.engine.compile_artifacts import CorruptArtifact

    info = {"format": aot_blocks.FORMAT, "models": [{"signature": {}, "bytes": 3}]}
    assert aot_blocks.CUDA_LOADER_VERIFIED is False
    with pytest.raises(CorruptArtifact, match="not loaded on CUDA"):
        aot_blocks.load_packages(b"pt2", info, torch.device("cuda", 0))
