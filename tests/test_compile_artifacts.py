"""Compile artifacts prepared ahead of time (engine/compile_artifacts.py): keying, atomic writes, every fallback, and
frames from a process that loaded artifacts equal to the just-in-time compiled frames (Inductor on the CPU)."""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST

from turboflow.engine import compile_artifacts as ca
from turboflow.engine.loading import compile_artifact_inputs, load_pipeline

BASE = dict(
    platform={"accelerator": "cuda:sm_90", "torch": "2.9.0", "cuda": "12.8", "triton": "3.5.0", "python": "3.11"},
    model_name="wan2.1-t2v-1.3b",
    manifest_sha256="a" * 64,
    sizes=[("480p", "16:9", 81)],
    quant_linear="fp8",
    attention="sla",
    sla_topk=0.1,
    sla_pooling="input",
    compile_mode="default",
    backend="inductor",
    dtype="bfloat16",
)
CHANGED = {
    "model_name": "wan2.1-t2v-14b",
    "manifest_sha256": "b" * 64,
    "sizes": [("480p", "16:9", 81), ("720p", "16:9", 81)],
    "quant_linear": None,
    "attention": "original",
    "sla_topk": 0.2,
    "sla_pooling": "fp32",
    "sla_backend": "flex",
    "compile_mode": "max-autotune",
    "backend": "aot_eager",
    "dtype": "float16",
}
PLATFORM_CHANGED = {
    "accelerator": ["cuda:sm_89", "cpu"],
    "torch": ["2.10.0"],
    "cuda": ["13.0", None],
    "triton": [None, "3.6.0"],
    "python": ["3.12"],
    "engine_code": ["0" * 64],
}


def test_every_key_input_changes_the_key():
    base = ca.artifact_key(ca.key_inputs(**BASE))
    assert base == ca.artifact_key(dict(reversed(list(ca.key_inputs(**BASE).items()))))  # order-independent
    assert len(base) == 64 and int(base, 16) >= 0
    keys = {base}
    for name, value in CHANGED.items():
        keys.add(ca.artifact_key(ca.key_inputs(**{**BASE, name: value})))
    for name, values in PLATFORM_CHANGED.items():
        for value in values:
            keys.add(ca.artifact_key(ca.key_inputs(**{**BASE, "platform": {**BASE["platform"], name: value}})))
    assert len(keys) == 1 + len(CHANGED) + sum(map(len, PLATFORM_CHANGED.values()))
    sizes = ca.key_inputs(**{**BASE, "sizes": [("480p", "16:9", 81), ("720p", "16:9", 81)]})
    swapped = ca.key_inputs(**{**BASE, "sizes": [("720p", "16:9", 81), ("480p", "16:9", 81)]})
    assert ca.artifact_key(sizes) != ca.artifact_key(swapped)  # the warm-up compiles them in this order


def test_the_engine_code_digest_follows_the_sources(tmp_path):
    import shutil

    engine = Path(ca.__file__).resolve().parent
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert ca.engine_code_digest(copy) == ca.engine_code_digest(engine) == ca.platform_inputs("cpu")["engine_code"]
    sla = copy / "sla.py"
    sla.write_text(sla.read_text() + "\n# another release\n")
    assert ca.engine_code_digest(copy) != ca.engine_code_digest(engine)
    (copy / "sla.py").rename(copy / "sla2.py")  # a renamed module is other code too
    assert len({ca.engine_code_digest(copy), ca.engine_code_digest(engine)}) == 2


def test_platform_of_this_process():
    p = ca.platform_inputs("cpu")
    assert p["accelerator"] == "cpu" and p["torch"] == torch.__version__
    assert p["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"


def _inputs(**changes):
    return ca.key_inputs(**{**BASE, **changes})


def test_save_then_find_and_the_sidecar(tmp_path):
    store = ca.ArtifactStore([tmp_path / "a"])
    inputs = _inputs()
    key = ca.artifact_key(inputs)
    path = store.save(key, inputs, b"payload", {"inductor": 1})
    assert path == tmp_path / "a" / f"{key}.bin"
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["inputs"] == inputs and sidecar["payload_sha256"] == hashlib.sha256(b"payload").hexdigest()
    report, payload = store.find(key, inputs)
    assert (report.artifact, report.key, payload, report.info) == ("loaded", key, b"payload", {"inductor": 1})


def test_later_directories_are_searched_and_writes_go_to_the_first(tmp_path):
    beside_weights = ca.ArtifactStore([tmp_path / "ro"])
    inputs = _inputs()
    key = ca.artifact_key(inputs)
    beside_weights.save(key, inputs, b"from the model-cache job")
    store = ca.ArtifactStore([tmp_path / "rw", tmp_path / "ro", tmp_path / "rw"])
    assert store.directories == [tmp_path / "rw", tmp_path / "ro"]
    report, payload = store.find(key, inputs)
    assert report.path == str(tmp_path / "ro" / f"{key}.bin") and payload == b"from the model-cache job"
    assert store.save(key, inputs, b"new").parent == tmp_path / "rw"


def test_for_model_looks_in_the_compile_cache_then_beside_the_weights(tmp_path):
    store = ca.ArtifactStore.for_model(tmp_path / "model", tmp_path / "cc")
    assert store.directories == [tmp_path / "cc" / "artifacts", tmp_path / "model" / ".compile-cache" / "artifacts"]


def test_missing_and_mismatch(tmp_path):
    store = ca.ArtifactStore([tmp_path])
    inputs = _inputs()
    key = ca.artifact_key(inputs)
    report, payload = store.find(key, inputs)
    assert (report.artifact, payload) == ("missing", None)
    # built on another GPU architecture: a mismatch that says which input differs
    other = _inputs(platform={**BASE["platform"], "accelerator": "cuda:sm_89"})
    store.save(ca.artifact_key(other), other, b"sm_89 kernels")
    report, payload = store.find(key, inputs)
    assert (report.artifact, payload) == ("mismatch", None)
    assert "accelerator='cuda:sm_89'" in report.detail and "cuda:sm_90" in report.detail
    # another model's artifacts do not count as a mismatch of this one
    assert store.find(*_key_and(_inputs(model_name="other")))[0].artifact == "missing"
    # a file named with our key whose embedded inputs differ (copied or renamed by hand)
    (tmp_path / f"{key}.bin").write_bytes((tmp_path / f"{ca.artifact_key(other)}.bin").read_bytes())
    report, payload = store.find(key, inputs)
    assert (report.artifact, payload) == ("mismatch", None) and "accelerator" in report.detail


def _key_and(inputs):
    return ca.artifact_key(inputs), inputs


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-1] + bytes([b[-1] ^ 1]),  # one payload bit flipped
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b"",  # empty
        lambda b: b"garbage" * 10,  # not an artifact at all
        lambda b: b[:30] + b"\xff" * 8 + b[38:],  # header length out of range
    ],
    ids=["bitflip", "truncated", "empty", "garbage", "bad-length"],
)
def test_corrupt_files_are_reported_not_raised(tmp_path, damage):
    store = ca.ArtifactStore([tmp_path])
    inputs = _inputs()
    key = ca.artifact_key(inputs)
    path = store.save(key, inputs, b"x" * 1000)
    path.write_bytes(damage(path.read_bytes()))
    report = ca.load(store, key, inputs)
    assert report.artifact == "corrupt" and report.key == key and report.detail


def test_torch_rejecting_an_intact_file_is_corrupt(tmp_path, caplog):
    store = ca.ArtifactStore([tmp_path])
    inputs = _inputs()
    key = ca.artifact_key(inputs)
    store.save(key, inputs, b"\x00\x01 not torch's serialisation")
    report = ca.load(store, key, inputs)
    assert report.artifact == "corrupt" and "torch" in report.detail
    assert report.to_dict()["artifact"] == "corrupt" and report.to_dict()["key"] == key


def test_a_crash_mid_write_leaves_the_old_artifact(tmp_path):
    store = ca.ArtifactStore([tmp_path])
    inputs = _inputs()
    key = ca.artifact_key(inputs)
    store.save(key, inputs, b"old" * 100)
    # a writer that died after writing half its temp file and before the rename
    fd, tmp = tempfile.mkstemp(dir=tmp_path, prefix=f".{key}.bin.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(ca.encode({"key": key, "inputs": inputs}, b"new" * 100)[:50])
    report, payload = store.find(key, inputs)
    assert report.artifact == "loaded" and payload == b"old" * 100
    # and a writer whose write fails leaves no temp file behind and the old artifact in place
    with pytest.raises(TypeError):
        ca.write_atomic(tmp_path / f"{key}.bin", "not bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{key}.bin", f"{key}.json", Path(tmp).name])
    assert store.find(key, inputs)[1] == b"old" * 100


def test_concurrent_writers_and_readers_never_see_a_torn_file(tmp_path):
    store = ca.ArtifactStore([tmp_path])
    inputs = _inputs()
    key = ca.artifact_key(inputs)
    payloads = [bytes([i]) * (2 << 20) for i in range(6)]  # 2 MiB each: a write is not one syscall's worth
    store.save(key, inputs, payloads[0])
    seen, errors, stop = set(), [], threading.Event()

    def write(payload):
        for _ in range(5):
            store.save(key, inputs, payload)

    def read():
        while not stop.is_set():
            report, payload = store.find(key, inputs)
            if report.artifact != "loaded" or payload not in payloads:
                errors.append(report)
            else:
                seen.add(payload[0])

    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert errors == [] and seen
    assert store.find(key, inputs)[0].artifact == "loaded"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.bin", f"{key}.json"]  # no temp file left


# ---- through load_pipeline (aot_eager: dynamo without a C++ build) --------------------------------------------------
def _artifact_path(model_dir, cache, device="cpu", **option_changes):
    from turboflow.engine.families import family
    from turboflow.engine.modelcache import read_manifest
    from turboflow.engine.options import LoadOptions

    manifest = read_manifest(model_dir)
    opts = LoadOptions(compile=True, compile_backend="aot_eager", compile_cache_dir=str(cache), **option_changes)
    inputs = compile_artifact_inputs(
        Path(model_dir), manifest, family(manifest.family), torch.device(device), torch.float32, opts
    )
    return Path(cache) / "artifacts" / f"{ca.artifact_key(inputs)}.bin", inputs


def _compiled(transformer) -> bool:
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in transformer.blocks)


def test_a_corrupt_artifact_falls_back_to_a_jit_compile_with_equal_frames(tiny_t2v_dir, t2v_pipeline, tmp_path):
    path, inputs = _artifact_path(tiny_t2v_dir, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00" * 100)
    torch._dynamo.reset()
    pipe = load_pipeline(
        tiny_t2v_dir, device="cpu", compile=True, compile_backend="aot_eager", compile_cache_dir=str(tmp_path)
    )
    report = pipe.load_report["compile_artifact"]
    assert report["artifact"] == "corrupt" and report["key"] == path.stem and report["compiled"] is True
    assert _compiled(pipe.transformer)
    req = t2v_pipeline.request("a fox", seed=3, **FAST)
    a, b = pipe(req), t2v_pipeline(req)
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 2
    torch._dynamo.reset()


def test_required_artifacts_missing_means_eager_not_compiled(tiny_t2v_dir, t2v_pipeline, tmp_path):
    # an artifact for other options (fp32 pooling) is a mismatch; none for this load's key
    other_path, other_inputs = _artifact_path(tiny_t2v_dir, tmp_path, sla_pooling="fp32")
    ca.ArtifactStore([other_path.parent]).save(other_path.stem, other_inputs, b"other")
    pipe = load_pipeline(
        tiny_t2v_dir,
        device="cpu",
        compile=True,
        compile_backend="aot_eager",
        compile_cache_dir=str(tmp_path),
        compile_require_artifacts=True,
    )
    report = pipe.load_report["compile_artifact"]
    assert report["artifact"] == "mismatch" and "sla_pooling='fp32'" in report["detail"]
    assert report["compiled"] is False and not _compiled(pipe.transformer)
    req = t2v_pipeline.request("a fox", seed=4, **FAST)
    assert np.array_equal(pipe(req).frames, t2v_pipeline(req).frames)  # eager is eager


def test_no_compile_no_artifact_report(t2v_pipeline):
    assert t2v_pipeline.load_report["compile_artifact"] is None
    assert t2v_pipeline.load_report["compile_artifact_load_s"] == 0.0


def test_compile_artifacts_command_errors_are_typed(tiny_t2v_dir, tmp_path):
    base = [sys.executable, "-m", "turboflow.cli", "model", "compile-artifacts", "--model-dir", str(tiny_t2v_dir)]
    bad = subprocess.run([*base, "--sizes", "480p:16:9:80"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error[invalid_sizes]" in bad.stderr and "Traceback" not in bad.stderr
    # aot_eager fills no Inductor cache: nothing to save is an error, not an empty file
    empty = subprocess.run(
        [*base, "--device", "cpu", "--sizes", "480p:4:3:1", "--backend", "aot_eager", "--compile-cache", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert empty.returncode == 2 and "error[compile_artifact_not_saved]" in empty.stderr, empty.stderr[-2000:]
    assert not list(tmp_path.glob("artifacts/*.bin"))


# ---- Inductor: a process that loaded the artifact gives the JIT-compiled frames ------------------------------------
_CHILD = r"""
import json, sys
import numpy as np
from torch._dynamo.utils import counters
from turboflow.engine.loading import load_pipeline, save_compile_artifacts, warm_compiled

model, cache, out, save = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "save"
pipe = load_pipeline(model, device="cpu", compile=True, compile_cache_dir=cache, compile_warmup=[("480p", "4:3", 1)])
report = pipe.compile_artifact
warm_compiled(pipe, [("480p", "4:3", 1)])
frames = pipe(pipe.request("a fox", seed=7, resolution="480p", aspect_ratio="4:3", num_frames=1)).frames
np.save(out + ".npy", frames)
saved = save_compile_artifacts(pipe) if save else None
print(json.dumps({"artifact": report.artifact, "key": report.key, "saved": saved, **counters["inductor"]}))
"""


def _child(*args) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, *map(str, args)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_frames_from_loaded_artifacts_equal_the_jit_compiled_frames(tiny_t2v_dir, tmp_path):
    jit = _child(tiny_t2v_dir, tmp_path / "first-pod", tmp_path / "jit", "save")
    assert jit["artifact"] == "missing" and jit["fxgraph_cache_miss"] >= 1 and jit["saved"]
    # a fresh pod: an empty compile cache, the artifact the first one saved (as the model-cache job would place it)
    fresh = tmp_path / "fresh-pod" / "artifacts"
    fresh.mkdir(parents=True)
    Path(fresh / Path(jit["saved"]).name).write_bytes(Path(jit["saved"]).read_bytes())
    loaded = _child(tiny_t2v_dir, tmp_path / "fresh-pod", tmp_path / "loaded", "no")
    assert loaded["artifact"] == "loaded" and loaded["key"] == jit["key"]
    assert loaded.get("fxgraph_cache_miss", 0) == 0 and loaded["fxgraph_cache_hit"] >= 1  # no Inductor compile
    a, b = np.load(tmp_path / "jit.npy"), np.load(tmp_path / "loaded.npy")
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1
