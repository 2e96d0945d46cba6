"""SLA: sparse-linear attention as TurboDiffusion's `turbodiffusion/SLA` computes it, for Wan self-attention.

Per (batch, head):
  * block selection: Q mean-pooled over blocks of `blk_q` tokens, K made zero-mean over the sequence ("smooth-k") and
    mean-pooled over blocks of `blk_k` tokens (a short last block is averaged over its real tokens); each Q block
    keeps the top `int(topk * n_k_blocks)` K blocks by pooled score. As upstream, the smoothed K, the pooled blocks
    and the scores are rounded to the input dtype (bf16 on GPU; each block sum accumulates in fp32): near-tied
    scores then break the way they break upstream. `pooling="fp32"` keeps them in fp32 instead (in bf16 it picks
    other key blocks for a part of the query blocks: bench/sla_pooling.py measures how many);
  * sparse branch: exact softmax attention (scale 1/sqrt(D)) of each query over the keys of its selected blocks only;
  * linear branch over ALL tokens with the softmax feature map phi(x) = softmax(x, dim=-1):
    o_l = phi(q) (phi(k)^T v) / (1e-5 + phi(q) . sum phi(k)), then projected by the fine-tuned `proj_l` (D x D);
  * output o_s + proj_l(o_l).
TurboDiffusion's `--attention sla` uses blk_q 128, blk_k 64. The checkpoints were fine-tuned with this attention,
so it is needed for faithful output, not only for speed. Upstream's default, `sagesla`, is a different computation
(SpargeAttn kernels: 64x128 blocks on Hopper, int8 Q·Kᵀ and fp8 P·V): engine/sagesla.py.

Backends of `sla_attention` (the block selection is torch in all of them):
  * "triton": engine/kernels' Triton kernels: the sparse branch walks each query tile's selected K blocks, the linear
    branch and proj_l are fused into its epilogue, one output write (the torch op turboflow::sla_sparse_linear, so a
    compiled DiT block calls it without a graph break). Head dim 64 or 128;
  * "flex": FlexAttention with a BlockMask built from the block table, the linear branch in torch (CUDA);
  * "gather": each Q block's selected K/V blocks gathered and SDPA run on them (CPU and GPU);
  * "auto": "triton" on CUDA when Triton imports and the kernels build, else "flex", else "gather" (a failed build
    warns once and is not tried again in the process).
`sla_reference` is the same math with an explicit dense mask, for tests.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from turboflow.settings import SLA_BACKENDS

log = logging.getLogger(__name__)

BLK_Q, BLK_K = 128, 64
BACKENDS = SLA_BACKENDS  # see the module docstring
# how block selection rounds: "input" = the input dtype, as upstream (default); "fp32" = pooled and scored in fp32
POOLING_MODES = ("input", "fp32")


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x.shape[-2]) % multiple
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _block_means(x: torch.Tensor, blk: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, ceil(L/blk), D] in fp32, each block summed in fp32 and averaged over its real tokens
    (one read of x, no padded or fp32 copy)."""
    length = x.shape[-2]
    full, tail = divmod(length, blk)
    parts = []
    if full:
        parts.append(x[..., : full * blk, :].unflatten(-2, (full, blk)).sum(dim=-2, dtype=torch.float32) / blk)
    if tail:
        parts.append(x[..., full * blk :, :].sum(dim=-2, keepdim=True, dtype=torch.float32) / tail)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def block_scores(
    q: torch.Tensor, k: torch.Tensor, blk_q: int = BLK_Q, blk_k: int = BLK_K, pooling: str = "input"
) -> torch.Tensor:
    """Pooled Q-block x K-block scores [B, H, n_q_blocks, n_k_blocks] (dtype: see the module docstring)."""
    if pooling == "fp32":
        # pooling commutes with the mean subtraction in exact arithmetic: pooled(k - mean k) = pooled(k) - mean k
        # (no smoothed copy of k)
        pooled_k = _block_means(k, blk_k) - k.mean(dim=-2, keepdim=True, dtype=torch.float32)
        return _block_means(q, blk_q) @ pooled_k.transpose(-1, -2)
    if pooling != "input":
        raise ValueError(f"pooling must be one of {list(POOLING_MODES)}, got {pooling!r}")
    # upstream's order of roundings: k - mean(k) rounded per token, each pooled block rounded, the score rounded
    smooth_k = k - k.mean(dim=-2, keepdim=True)
    pooled_q = _block_means(q, blk_q).to(q.dtype)
    pooled_k = _block_means(smooth_k, blk_k).to(k.dtype)
    return pooled_q @ pooled_k.transpose(-1, -2)


def select_blocks(
    q: torch.Tensor, k: torch.Tensor, topk: float, blk_q: int = BLK_Q, blk_k: int = BLK_K, pooling: str = "input"
):
    """Indices [B, H, n_q_blocks, n_sel] of the K blocks each Q block attends to exactly."""
    score = block_scores(q, k, blk_q, blk_k, pooling)
    n_k = score.shape[-1]
    n_sel = max(1, min(n_k, int(topk * n_k)))  # upstream has no floor at 1: with 0 blocks its output is undefined
    return torch.topk(score, n_sel, dim=-1, sorted=False).indices


def _linear_branch(q, k, v):
    fq, fk = torch.softmax(q, dim=-1), torch.softmax(k, dim=-1)
    kv = fk.transpose(-1, -2) @ v
    ksum = fk.sum(dim=-2, keepdim=True)
    return (fq @ kv) / (1e-5 + (fq * ksum).sum(dim=-1, keepdim=True))


def _project(o_l: torch.Tensor, proj_weight, proj_bias) -> torch.Tensor:
    if proj_weight is None:
        return torch.zeros_like(o_l)  # proj_l initialised to zero upstream: a checkpoint without it adds nothing
    return F.linear(o_l, proj_weight.to(o_l.dtype), None if proj_bias is None else proj_bias.to(o_l.dtype))


_flex = None
_flex_broken = False
_triton_broken = False
_AUTO_TRITON_DEVICES = ("cuda",)  # where backend "auto" tries the Triton kernels (Triton's interpreter aside)


def _triton_ready() -> bool:
    """Whether the Triton kernels can be tried: Triton imports and no earlier build failed. Imports the kernel module
    (registering the op) on first use, never at engine import (Triton's import costs seconds of cold start);
    set_attention calls it eagerly so a compiled block's trace only reads the flag."""
    from .kernels import kernels_ready

    # sparse_attention registers torch.ops.turboflow.sla_sparse_linear
    return not _triton_broken and kernels_ready("sparse_attention", "SLA uses FlexAttention or gather+SDPA")


def _triton_supports(q: torch.Tensor, blk_q: int, blk_k: int) -> bool:
    """Shapes the kernels take (engine/kernels/sparse_attention.check_inputs); others go to flex/gather quietly."""
    return (
        q.shape[-1] in (64, 128)
        and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and blk_k >= 16
        and blk_k & (blk_k - 1) == 0
        and blk_q >= 16
        and blk_q & (blk_q - 1) == 0
    )


def _sla_triton(q, k, v, lut, proj_weight, proj_bias, blk_q: int, blk_k: int) -> torch.Tensor:
    from .kernels import sla_sparse_linear

    return sla_sparse_linear(q, k, v, lut, proj_weight, proj_bias, blk_q, blk_k)


def _sparse_flex(q, k, v, lut, blk_q: int, blk_k: int, compiled: bool = True) -> torch.Tensor:
    """Sparse branch with FlexAttention (CUDA): the selected blocks become a BlockMask built from block tables
    (never from a per-token mask_mod, which would materialise the whole L x L grid)."""
    global _flex
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if compiled and _flex is None:
        _flex = torch.compile(flex_attention, dynamic=False)
    b, h, mq, n_sel = lut.shape
    length = q.shape[-2]
    n_kb = -(-length // blk_k)
    indices = torch.zeros(b, h, mq, n_kb, dtype=torch.int32, device=q.device)
    indices[..., :n_sel] = torch.sort(lut, dim=-1).values.to(torch.int32)
    mask = BlockMask.from_kv_blocks(
        torch.zeros(b, h, mq, dtype=torch.int32, device=q.device),
        indices,
        torch.full((b, h, mq), n_sel, dtype=torch.int32, device=q.device),
        indices,
        BLOCK_SIZE=(blk_q, blk_k),
        seq_lengths=(length, length),
    )
    return (_flex if compiled else flex_attention)(q, k, v, block_mask=mask)


def sla_attention(
    q,
    k,
    v,
    *,
    topk: float,
    proj_weight=None,
    proj_bias=None,
    blk_q: int = BLK_Q,
    blk_k: int = BLK_K,
    backend: str = "auto",
    pooling: str = "input",
) -> torch.Tensor:
    """q, k, v [B, H, L, D] -> [B, H, L, D]. backend: BACKENDS (see the module docstring);
    pooling: the block selection's rounding, POOLING_MODES."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    b, h, length, d = q.shape
    lut = select_blocks(q, k, topk, blk_q, blk_k, pooling)  # [B, H, Mq, S]
    global _flex_broken, _triton_broken
    if backend == "triton":
        return _sla_triton(q, k, v, lut, proj_weight, proj_bias, blk_q, blk_k)
    if (
        backend == "auto"
        and q.device.type in _AUTO_TRITON_DEVICES
        and _triton_supports(q, blk_q, blk_k)
        and _triton_ready()
    ):
        if torch.compiler.is_compiling():  # a build failure surfaces when the graph compiles, as for flex
            return _sla_triton(q, k, v, lut, proj_weight, proj_bias, blk_q, blk_k)
        try:
            return _sla_triton(q, k, v, lut, proj_weight, proj_bias, blk_q, blk_k)
        except torch.OutOfMemoryError:
            raise  # another backend would not fit either; the caller reports it
        except Exception as e:  # e.g. no C compiler for Triton's launcher in a slim image: stay correct, get slower
            _triton_broken = True
            log.warning("Triton SLA kernels unavailable (%s: %s); SLA falls back", type(e).__name__, e)
    if torch.compiler.is_compiling() and backend != "gather" and q.is_cuda:
        # inside a torch.compile'd DiT block: let dynamo trace FlexAttention itself (fused with the rest)
        return _sparse_flex(q, k, v, lut, blk_q, blk_k, compiled=False) + _project(
            _linear_branch(q, k, v), proj_weight, proj_bias
        )
    if backend == "flex" or (backend == "auto" and q.is_cuda and not _flex_broken):
        o_l = _project(_linear_branch(q, k, v), proj_weight, proj_bias)
        try:
            return _sparse_flex(q, k, v, lut, blk_q, blk_k) + o_l
        except Exception as e:  # e.g. no C compiler for Triton in a slim image: stay correct, get slower
            if backend == "flex":
                raise
            _flex_broken = True
            log.warning("FlexAttention unavailable (%s: %s); SLA falls back to gather+SDPA", type(e).__name__, e)
    n_sel = lut.shape[-1]
    kp = _pad_to(k, blk_k).unflatten(-2, (-1, blk_k))  # [B, H, Kb, blk_k, D]
    vp = _pad_to(v, blk_k).unflatten(-2, (-1, blk_k))
    index = lut[..., None, None].expand(-1, -1, -1, -1, blk_k, d)
    k_sel = torch.gather(kp[:, :, None].expand(-1, -1, lut.shape[2], -1, -1, -1), 3, index).flatten(3, 4)
    v_sel = torch.gather(vp[:, :, None].expand(-1, -1, lut.shape[2], -1, -1, -1), 3, index).flatten(3, 4)
    key_pos = (lut[..., None] * blk_k + torch.arange(blk_k, device=q.device)).flatten(-2)  # [B, H, Mq, S*blk_k]
    valid = (key_pos < length)[..., None, :]  # [B, H, Mq, 1, S*blk_k]
    qb = _pad_to(q, blk_q).unflatten(-2, (-1, blk_q))  # [B, H, Mq, blk_q, D]
    o_s = F.scaled_dot_product_attention(qb, k_sel, v_sel, attn_mask=valid).flatten(2, 3)[:, :, :length]
    del k_sel, v_sel, n_sel
    o_l = _project(_linear_branch(q, k, v), proj_weight, proj_bias)
    return o_s + o_l


def sla_reference(
    q,
    k,
    v,
    *,
    topk: float,
    proj_weight=None,
    proj_bias=None,
    blk_q: int = BLK_Q,
    blk_k: int = BLK_K,
    pooling: str = "input",
) -> torch.Tensor:
    """The same function with an explicit [L, L] block mask (small sizes only)."""
    length = q.shape[-2]
    lut = select_blocks(q, k, topk, blk_q, blk_k, pooling)
    block_mask = torch.zeros(*lut.shape[:3], -(-length // blk_k), dtype=torch.bool, device=q.device)
    block_mask.scatter_(-1, lut, True)
    mask = block_mask.repeat_interleave(blk_q, dim=2)[:, :, :length].repeat_interleave(blk_k, dim=3)[..., :length]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    o_s = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v
    return o_s + _project(_linear_branch(q, k, v), proj_weight, proj_bias)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding (same as diffusers' WanAttnProcessor)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


SPARSE_KINDS = ("sla", "sagesla")  # what SLAProcessor computes: SLA, or SageSLA (engine/sagesla.py)


class SLAProcessor:
    """Attention processor for a WanTransformer3DModel block's self-attention (`attn1`) computing SLA, or SageSLA
    (`kind="sagesla"`: the same selection, linear branch and proj_l, a quantized sparse branch)."""

    def __init__(
        self,
        topk: float,
        proj_weight: torch.Tensor | None = None,
        proj_bias: torch.Tensor | None = None,
        pooling: str = "input",
        kind: str = "sla",
        backend: str = "auto",
    ):
        if kind not in SPARSE_KINDS:
            raise ValueError(f"kind must be one of {list(SPARSE_KINDS)}, got {kind!r}")
        self.topk, self.proj_weight, self.proj_bias, self.pooling = topk, proj_weight, proj_bias, pooling
        self.kind = kind
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.backend = backend  # SLA's sparse-branch kernels; SageSLA picks its own (engine/sagesla.py)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[B, H, L, D] each -> [B, H, L, D]: this processor's attention over all the tokens given."""
        common = {"topk": self.topk, "proj_weight": self.proj_weight, "proj_bias": self.proj_bias}
        if self.kind == "sagesla":
            from .sagesla import sagesla_attention

            return sagesla_attention(q, k, v, pooling=self.pooling, **common)
        return sla_attention(q, k, v, pooling=self.pooling, backend=self.backend, **common)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None:
            raise ValueError("SLAProcessor is for self-attention only")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # [B, L, H, D]
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, L, D]
        out = self.attend(q, k, v).transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def set_attention(
    transformer,
    attention: str,
    *,
    topk: float = 0.1,
    proj_l: dict | None = None,
    pooling: str = "input",
    backend: str = "auto",
) -> None:
    """Swap every block's self-attention to SLA ('sla'), SageSLA ('sagesla', engine/sagesla.py) or back to
    diffusers' dense processor ('original').

    proj_l: {"blocks.N.proj_l.weight": [D, D], "blocks.N.proj_l.bias": [D]} (engine.checkpoint.load_sla_proj_l);
    SageSLA uses the same fine-tuned proj_l (upstream's SageSparseLinearAttention has the same parameters).
    pooling: how the block selection rounds (POOLING_MODES; default "input", as upstream).
    backend: SLA's sparse-branch kernels (BACKENDS; default "auto")."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    if attention not in ("original", *SPARSE_KINDS):
        raise ValueError(f"attention must be one of {['original', *SPARSE_KINDS]}, got {attention!r}")
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {list(POOLING_MODES)}, got {pooling!r}")
    proj_l = proj_l or {}
    device = next(transformer.parameters()).device
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if attention == "sla" and backend in ("auto", "triton") and device.type in _AUTO_TRITON_DEVICES:
        _triton_ready()  # import the kernels now, outside any compiled trace
    for i, block in enumerate(transformer.blocks):
        if attention == "original":
            block.attn1.set_processor(WanAttnProcessor())
            continue
        w, b = proj_l.get(f"blocks.{i}.proj_l.weight"), proj_l.get(f"blocks.{i}.proj_l.bias")
        block.attn1.set_processor(
            SLAProcessor(
                topk,
                None if w is None else w.to(device),
                None if b is None else b.to(device),
                pooling,
                attention,
                backend,
            )
        )
