"""engine.fastload: bit-identical tensors to safetensors.load_file, modules equal to from_pretrained's, and a
pipeline loaded through it produces the same frames as one loaded the library way (CPU)."""

import json
import struct

import numpy as np
import pytest
import torch
from conftest import FAST
from safetensors.torch import load_file, save_file

from bench.reference_loader import load_component
from turboflow.engine import ModelCacheError, fastload
from turboflow.engine.families import family
from turboflow.engine.loading import load_pipeline
from turboflow.engine.modelcache import read_manifest
from turboflow.engine.pipeline import TurboVideoPipeline
from turboflow.errors import CheckpointError

WAN21 = family("wan2.1")


def _classes(role: str) -> dict:
    return {role: WAN21.components[role].load_class()}


def _mixed_state():
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(33, 7, generator=g).to(torch.bfloat16),
        "b.f32": torch.randn(5, 3, 2, generator=g),
        "c.f16": torch.randn(11, generator=g).to(torch.float16),
        "d.i64": torch.randint(-5, 5, (9,), generator=g),
        "e.u8": torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8),
        "f.bool": torch.rand(6, generator=g) > 0.5,
        "g.scalar": torch.tensor(3.5),
        "h.empty": torch.zeros(0, 4),
        "i.f64": torch.randn(3, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("threads,chunk", [(1, 1 << 20), (4, 7), (3, 64)])
def test_load_safetensors_is_bit_identical_to_load_file(tmp_path, threads, chunk):
    state = _mixed_state()
    path = tmp_path / "m.safetensors"
    save_file(state, path)
    ref = load_file(path)
    got = fastload.load_safetensors(path, "cpu", threads=threads, chunk_bytes=chunk)
    assert set(got) == set(ref) == set(state)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        assert torch.equal(
            got[k].view(-1).view(torch.uint8) if got[k].numel() else got[k],
            ref[k].view(-1).view(torch.uint8) if ref[k].numel() else ref[k],
        ), k


def test_several_files_and_model_cache_weights(tmp_path, tiny_t2v_dir):
    save_file({"x": torch.arange(10.0)}, tmp_path / "a.safetensors")
    save_file({"y": torch.arange(4, dtype=torch.int32)}, tmp_path / "b.safetensors")
    got = fastload.load_safetensors(sorted(tmp_path.glob("*.safetensors")), "cpu", threads=2, chunk_bytes=8)
    assert torch.equal(got["x"], torch.arange(10.0)) and torch.equal(got["y"], torch.arange(4, dtype=torch.int32))
    for role in ("text_encoder", "transformer", "vae"):
        (f,) = fastload.weight_files(tiny_t2v_dir / role)
        ref, got = load_file(f), fastload.load_safetensors(f, "cpu", threads=3, chunk_bytes=4096)
        assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)


def test_truncated_and_garbage_files_are_cache_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.randn(100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ModelCacheError) as info:
        fastload.load_safetensors(path)
    assert info.value.code == "model_cache_incomplete"
    path.write_bytes(struct.pack("<Q", 5) + b"nope!")
    with pytest.raises(ModelCacheError) as info:
        fastload.load_safetensors(path)
    assert info.value.code == "model_cache_invalid"
    with pytest.raises(ModelCacheError):
        fastload.weight_files(tmp_path / "nothing-here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("role", ["text_encoder", "transformer", "vae"])
def test_modules_equal_from_pretrained(tiny_t2v_dir, role, dtype):
    """Every parameter and buffer (non-persistent rotary tables too) with the same dtype and values, tied
    weights tied, for both diffusers' keep-in-fp32 rule and transformers' rules."""
    ref = load_component(WAN21, role, tiny_t2v_dir / role, dtype)
    got = fastload.load_models({role: tiny_t2v_dir / role}, dtype, {role: torch.device("cpu")}, classes=_classes(role))[
        role
    ]
    ref_t = dict([*ref.named_parameters(remove_duplicate=False), *ref.named_buffers(remove_duplicate=False)])
    got_t = dict([*got.named_parameters(remove_duplicate=False), *got.named_buffers(remove_duplicate=False)])
    assert set(ref_t) == set(got_t)
    for k in ref_t:
        assert got_t[k].dtype == ref_t[k].dtype and torch.equal(got_t[k], ref_t[k]), k
        assert not got_t[k].requires_grad
    if role == "transformer" and dtype == torch.bfloat16:  # diffusers keeps these in fp32
        assert got.scale_shift_table.dtype == torch.float32 and got.blocks[0].attn1.to_q.weight.dtype == dtype
    if role == "text_encoder":
        assert got.encoder.embed_tokens.weight is got.shared.weight


def test_wrong_weights_are_checkpoint_errors(tmp_path, tiny_t2v_dir):
    import shutil

    bad = tmp_path / "transformer"
    shutil.copytree(tiny_t2v_dir / "transformer", bad)
    (f,) = fastload.weight_files(bad)
    state = load_file(f)
    state.pop("proj_out.bias")
    state["extra.weight"] = torch.zeros(2)
    save_file(state, f)
    with pytest.raises(CheckpointError) as info:
        fastload.load_models(
            {"transformer": bad}, torch.float32, {"transformer": torch.device("cpu")}, classes=_classes("transformer")
        )
    assert "proj_out.bias" in info.value.message and "extra.weight" in info.value.message
    state = load_file(tiny_t2v_dir / "transformer" / f.name)
    state["proj_out.bias"] = torch.zeros(3)
    save_file(state, f)
    with pytest.raises(CheckpointError) as info:
        fastload.load_models(
            {"transformer": bad}, torch.float32, {"transformer": torch.device("cpu")}, classes=_classes("transformer")
        )
    assert "mismatched" in info.value.message


def _library_pipeline(model_dir, fast_vae):
    """The pre-fastload path: from_pretrained per component on the CPU."""
    manifest = read_manifest(model_dir)
    spec = family(manifest.family)
    parts = {
        role: load_component(spec, role, model_dir / sub, torch.float32) for role, sub in manifest.components.items()
    }
    return TurboVideoPipeline(
        kind=manifest.kind,
        family=spec,
        transformer=parts["transformer"],
        transformer_2=parts.get("transformer_2"),
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        device="cpu",
        dtype=torch.float32,
        model_name=manifest.name,
        defaults=manifest.defaults,
        fast_vae=fast_vae,
    )


def test_pipeline_through_fastload_gives_identical_frames(tiny_t2v_dir, t2v_pipeline):
    ref = _library_pipeline(tiny_t2v_dir, fast_vae=t2v_pipeline.fast_vae)  # same decode path: only loading differs
    request = t2v_pipeline.request("a red fox running in the snow", seed=7, **FAST)
    a, b = ref(request), t2v_pipeline(request)
    assert np.array_equal(a.frames, b.frames) and a.frames.std() > 0


def test_load_pipeline_reports_offload_and_loads_experts_on_cpu_when_asked(tiny_i2v_dir):
    pipe = load_pipeline(tiny_i2v_dir, device="cpu", offload="experts")
    assert pipe.offload == "experts" and next(pipe.transformer_2.parameters()).device.type == "cpu"
    assert json.loads((tiny_i2v_dir / "manifest.json").read_text())["kind"] == "i2v"
