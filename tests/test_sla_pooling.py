"""SLA's block selection rounds like upstream TurboDiffusion's (SLA/utils.py get_block_map): in the input dtype."""

import pytest
import torch
from conftest import FAST

from turboflow.engine.loading import load_pipeline
from turboflow.engine.sla import SLAProcessor, select_blocks, set_attention, sla_attention, sla_reference
from turboflow.errors import ConfigError


def _upstream_selection(q, k, ratio, blk_q=128, blk_k=64):
    """Written from upstream's description, independently of engine/sla.py: smooth-k in the input dtype, each block
    summed in fp32 and divided by its real length, stored back in the input dtype (its Triton mean_pool), the
    pooled score in the input dtype, top-k of int(ratio * K) blocks."""

    def mean_pool(x, blk):
        blocks = [x[..., s : s + blk, :].float() for s in range(0, x.shape[-2], blk)]
        return torch.stack([(b.sum(dim=-2) / b.shape[-2]).to(x.dtype) for b in blocks], dim=-2)

    smooth_k = k - torch.mean(k, dim=-2, keepdim=True)
    score = mean_pool(q, blk_q) @ mean_pool(smooth_k, blk_k).transpose(-1, -2)
    n_k = score.shape[-1]
    return torch.topk(score, min(n_k, int(ratio * n_k)), dim=-1, sorted=False).indices


def _bf16_qk(length, seed=0, heads=2, dim=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, length, dim, generator=g).to(torch.bfloat16) for _ in range(2)]


def _differing_query_blocks(a, b) -> float:
    return (a.sort(dim=-1).values != b.sort(dim=-1).values).any(dim=-1).float().mean().item()


@pytest.mark.parametrize("length,topk", [(8192, 0.1), (5000, 0.1), (4096, 0.2)])  # 5000: short last blocks
def test_default_selection_in_bf16_matches_upstream(length, topk):
    q, k = _bf16_qk(length, seed=length)
    ours = select_blocks(q, k, topk)
    assert ours.dtype == torch.int64
    assert _differing_query_blocks(ours, _upstream_selection(q, k, topk)) == 0.0


def test_fp32_pooling_is_selectable_and_selects_differently_in_bf16():
    q, k = _bf16_qk(8192)
    upstream = _upstream_selection(q, k, 0.1)
    fp32 = select_blocks(q, k, 0.1, pooling="fp32")
    # the variant the engine used before: some query blocks pick other key blocks (near-tied scores)
    assert 0.0 < _differing_query_blocks(fp32, upstream) < 0.2
    with pytest.raises(ValueError, match="pooling"):
        select_blocks(q, k, 0.1, pooling="fp16")


def test_pooling_modes_agree_in_float64():
    # the two modes differ only by rounding: without rounding to speak of they pick the same blocks
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 700, 16, generator=g, dtype=torch.float64) for _ in range(3))
    assert _differing_query_blocks(select_blocks(q, k, 0.25), select_blocks(q, k, 0.25, pooling="fp32")) == 0.0
    assert torch.allclose(
        sla_attention(q, k, v, topk=0.25, pooling="fp32"), sla_reference(q, k, v, topk=0.25), atol=1e-10
    )


def test_pipeline_passes_the_pooling_mode_to_every_sla_block(tiny_t2v_dir):
    pipeline = load_pipeline(tiny_t2v_dir, device="cpu", sla_pooling="fp32")
    result = pipeline(pipeline.request("a fox", seed=4, attention="sla", **FAST))
    processors = [block.attn1.processor for block in pipeline.transformer.blocks]
    assert result.attention == "sla"
    assert all(isinstance(p, SLAProcessor) and p.pooling == "fp32" for p in processors)
    set_attention(pipeline.transformer, "sla", topk=0.1)
    assert all(block.attn1.processor.pooling == "input" for block in pipeline.transformer.blocks)  # the default
    with pytest.raises(ConfigError) as info:
        load_pipeline(tiny_t2v_dir, device="cpu", sla_pooling="bf16")
    assert info.value.field == "sla_pooling"
