"""Compiled DiT blocks (engine/compiled.py): dynamo traces the blocks, SLA processor included; cache dir choice."""

import os

import numpy as np
import torch
from conftest import FAST

from turboflow.engine.compiled import compile_cache_dir, compile_transformer, use_cache_dir


def test_compiled_blocks_give_the_same_video(tiny_t2v_dir, t2v_pipeline, monkeypatch):
    from turboflow.engine.loading import load_pipeline

    torch._dynamo.reset()
    pipe = load_pipeline(tiny_t2v_dir, device="cpu")
    # aot_eager: dynamo + AOTAutograd tracing without a C++ toolchain build (inductor runs on the GPU bench)
    compile_transformer(pipe.transformer, backend="aot_eager")
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None for b in pipe.transformer.blocks)
    for attention in ("original", "sla"):
        req = t2v_pipeline.request("a fox", seed=11, attention=attention, **FAST)
        a, b = pipe(req), t2v_pipeline(req)
        assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 2, attention
    torch._dynamo.reset()


def test_compile_cache_dir_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOFLOW_COMPILE_CACHE", str(tmp_path / "env"))  # the engine reads no variable
    assert compile_cache_dir(tmp_path) == tmp_path / ".compile-cache"
    assert compile_cache_dir(tmp_path, tmp_path / "x") == tmp_path / "x"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not os.access(ro, os.W_OK):  # root ignores permissions
            assert compile_cache_dir(ro).parts[-3:] == ("turboflow", "compile", "ro")
    finally:
        ro.chmod(0o755)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")
    monkeypatch.setenv("TRITON_CACHE_DIR", "unset")
    use_cache_dir(tmp_path / "c")
    assert (tmp_path / "c").is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "c" / "inductor")


def test_kernel_caches_point_at_the_volume_without_importing_inductor(tmp_path):
    """A pod with compile off still keeps the kernels it compiles on first use (SLA's Triton kernels, the FP8
    quantizer) in its compile cache folder, and pays no Inductor import for saying where."""
    import json
    import subprocess
    import sys

    code = (
        "import json, os, sys; from turboflow.engine.compiled import point_kernel_caches; "
        f"point_kernel_caches(__import__('pathlib').Path({str(tmp_path / 'c')!r})); "
        "print(json.dumps([os.environ['TRITON_CACHE_DIR'], os.environ['TORCHINDUCTOR_CACHE_DIR'], "
        "'torch._inductor' in sys.modules, 'torch._dynamo' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    triton, inductor, *imported = json.loads(out.stdout)
    assert (triton, inductor) == (str(tmp_path / "c" / "triton"), str(tmp_path / "c" / "inductor"))
    assert imported == [False, False] and (tmp_path / "c").is_dir()
