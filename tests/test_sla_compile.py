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
