"""SLA matches its dense reference, selects blocks as specified, and runs inside the tiny pipeline."""

import math

import numpy as np
import pytest
import torch
from conftest import FAST

from turboflow.engine.sla import select_blocks, sla_attention, sla_reference


def _qkv(b=1, h=2, length=300, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("length,topk", [(300, 0.1), (300, 0.5), (256, 0.25), (1000, 0.1), (77, 1.0)])
def test_fast_path_matches_dense_reference(length, topk):
    q, k, v = _qkv(length=length, seed=length)
    g = torch.Generator().manual_seed(1)
    w, b = (
        torch.randn(16, 16, generator=g, dtype=torch.float64) * 0.1,
        torch.randn(16, generator=g, dtype=torch.float64) * 0.1,
    )
    fast = sla_attention(q, k, v, topk=topk, proj_weight=w, proj_bias=b)
    ref = sla_reference(q, k, v, topk=topk, proj_weight=w, proj_bias=b)
    assert fast.shape == q.shape
    assert torch.allclose(fast, ref, atol=1e-10, rtol=1e-10)


def test_full_topk_sparse_branch_is_dense_attention():
    q, k, v = _qkv(length=200)
    dense = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(16), dim=-1) @ v
    # without proj_l the linear branch adds nothing (upstream initialises proj_l to zero)
    assert torch.allclose(sla_attention(q, k, v, topk=1.0), dense, atol=1e-10)


def test_sparse_branch_differs_from_dense_when_blocks_are_dropped():
    q, k, v = _qkv(length=512)
    dense = torch.softmax((q @ k.transpose(-1, -2)) / 4.0, dim=-1) @ v
    assert not torch.allclose(sla_attention(q, k, v, topk=0.1), dense, atol=1e-3)


def test_block_selection_uses_pooled_q_and_smoothed_pooled_k():
    q, k, _ = _qkv(length=256)
    lut = select_blocks(q, k, 0.25, blk_q=128, blk_k=64)
    assert lut.shape == (1, 2, 2, 1)
    qm = q.unflatten(-2, (2, 128)).mean(-2)
    km = (k - k.mean(-2, keepdim=True)).unflatten(-2, (4, 64)).mean(-2)
    assert torch.equal(lut[..., 0], (qm @ km.transpose(-1, -2)).argmax(-1))


def test_linear_branch_uses_all_tokens_through_proj_l():
    q, k, v = _qkv(length=128)
    eye = torch.eye(16, dtype=torch.float64)
    with_proj = sla_attention(q, k, v, topk=1.0, proj_weight=eye, proj_bias=torch.zeros(16, dtype=torch.float64))
    without = sla_attention(q, k, v, topk=1.0)
    fq, fk = torch.softmax(q, -1), torch.softmax(k, -1)
    linear = (fq @ (fk.transpose(-1, -2) @ v)) / (1e-5 + (fq * fk.sum(-2, keepdim=True)).sum(-1, keepdim=True))
    assert torch.allclose(with_proj - without, linear, atol=1e-10)


def test_pipeline_runs_sla_per_request(t2v_pipeline):
    dense = t2v_pipeline(t2v_pipeline.request("a fox", seed=4, **FAST))
    sparse = t2v_pipeline(t2v_pipeline.request("a fox", seed=4, attention="sla", sla_topk=0.1, **FAST))
    again = t2v_pipeline(t2v_pipeline.request("a fox", seed=4, **FAST))
    assert sparse.frames.shape == dense.frames.shape
    assert not np.array_equal(sparse.frames, dense.frames)
    assert np.array_equal(again.frames, dense.frames)  # the dense processor is restored for 'original'


def test_the_sla_backend_setting_reaches_every_processor(tiny_t2v_dir):
    from turboflow.engine.loading import load_pipeline
    from turboflow.engine.options import LoadOptions
    from turboflow.engine.sla import SLAProcessor
    from turboflow.settings import Settings

    options = LoadOptions.from_settings(Settings.from_env({"TURBOFLOW_SLA_BACKEND": "gather"}))
    assert options.sla_backend == "gather"
    pipeline = load_pipeline(tiny_t2v_dir, device="cpu", options=options)
    video = pipeline(pipeline.request("a fox", seed=3, attention="sla", sla_topk=0.5, **FAST))
    processors = [block.attn1.processor for block in pipeline.transformer.blocks]
    assert all(isinstance(p, SLAProcessor) and p.backend == "gather" for p in processors)
    # on the CPU "auto" is gather + SDPA too: the same frames
    auto = load_pipeline(tiny_t2v_dir, device="cpu")
    assert np.array_equal(
        auto(auto.request("a fox", seed=3, attention="sla", sla_topk=0.5, **FAST)).frames, video.frames
    )


@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_a_cuda_only_sla_backend_on_the_cpu_is_a_config_error(tiny_t2v_dir, backend):
    from turboflow.engine.loading import load_pipeline
    from turboflow.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_pipeline(tiny_t2v_dir, device="cpu", sla_backend=backend)
    assert info.value.field == "sla_backend" and "CUDA" in info.value.message


def test_unknown_sla_backends_are_refused_where_they_are_set():
    from turboflow.engine.options import LoadOptions
    from turboflow.engine.sla import SLAProcessor
    from turboflow.errors import ConfigError
    from turboflow.settings import Settings

    with pytest.raises(ConfigError) as info:
        Settings.from_env({"TURBOFLOW_SLA_BACKEND": "cuda"})
    assert "TURBOFLOW_SLA_BACKEND" in str(info.value)
    with pytest.raises(ConfigError):
        LoadOptions(sla_backend="sdpa")
    with pytest.raises(ValueError):
        SLAProcessor(0.1, backend="sdpa")
    q = torch.randn(1, 1, 64, 16)
    with pytest.raises(ValueError):
        sla_attention(q, q, q, topk=0.5, backend="sdpa")
