"""SLA's sparse and linear branches in Triton: one output write per token (engine/sla.py states the math).

For q, k, v [B, H, L, D] and the block table lut [B, H, n_q_blocks, n_sel] (sla.select_blocks: the K blocks each
block of `blk_q` queries attends to), the op computes, per (batch, head),

    o = o_s + proj_l(o_l)
    o_s[i]  = sum_{j in sel(i)} softmax_j(q_i . k_j / sqrt(D)) v_j      (j over the keys of the selected blocks)
    o_l[i]  = phi(q_i) KV / (1e-5 + phi(q_i) . ksum),  KV = sum_j phi(k_j)^T v_j [D, D],  ksum = sum_j phi(k_j) [D]
    proj_l(x) = x W^T + b,  phi(x) = softmax(x) over the D features.

Three kernels:
  * `_linear_state_partials_kernel`: programs (batch*head, split of the L tokens, block of V's columns); each sums
    phi(k)^T v and phi(k) over its tokens with fp32 accumulators (a token >= L contributes nothing);
  * `_linear_state_finalize_kernel`: programs (batch*head, 16 rows of KV) add the splits in a fixed order
    (deterministic, no atomics) and fold proj_l's weight in: KVW = KV W^T. The row scale 1/(1e-5 + phi(q) . ksum)
    commutes with the right product, so proj_l(o_l) = (phi(q) / (1e-5 + phi(q) . ksum)) KVW + b: the epilogue needs
    one D x D product per tile instead of two;
  * `_sla_forward_kernel`: one program per (query tile, batch*head). It walks only the K blocks listed in its LUT row
    with the online softmax (running max m and sum l in fp32; exp2 with log2(e) folded into the scale:
    exp(s / sqrt(D)) = 2^(s * log2(e) / sqrt(D))), then adds the projected linear branch and stores the tile once.
    Keys >= L (the short last block) are masked; query rows >= L are computed on zeros and never stored.

Tiles match the selection geometry: BLOCK_N = blk_k x keys_per_step (one or two selected K blocks per loop step:
two make the products 128 keys wide and halve the online-softmax rescales), BLOCK_M = blk_q or blk_q / 2 (then
two programs read the same LUT row). Precision for bf16/fp16 inputs: tensor-core products with fp32 accumulation;
P (softmax weights) and phi(k) are rounded to the input dtype before their products, as FlashAttention does with P;
KVW and the epilogue's product are fp32/TF32 (TileConfig.epilogue_fp32; or the input dtype). float32 inputs use IEEE
fp32 products throughout (the CPU tests run this path in Triton's interpreter).

This module imports Triton at import time: import it lazily (engine.kernels does).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from ._inputs import check_attention_inputs

_LOG2E = math.log2(math.e)
_LINEAR_BLOCK_L = 64  # tokens per step of the linear-state reduction
_MIN_TOKENS_PER_SPLIT = 512  # below this the partial sums ([D, D] fp32 per split) cost more than they spread
_TARGET_LINEAR_PROGRAMS = 528  # ~4 programs per SM on a 132-SM H100/H200
_FINALIZE_ROWS = 16  # rows of KV W^T per finalize program


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of the sparse kernel: block_m query rows per program (blk_q or blk_q / 2), warps, pipeline
    stages, selected K blocks per step; epilogue_fp32: the linear branch's last product in fp32 (TF32 on the GPU)
    instead of the input dtype (fp32 inputs always use fp32)."""

    block_m: int = 128
    num_warps: int = 8
    num_stages: int = 3
    epilogue_fp32: bool = True
    keys_per_step: int = 1  # selected K blocks per online-softmax step (1 or 2)


DEFAULT_TILES = TileConfig()


@triton.jit
def _linear_state_partials_kernel(
    K,
    V,
    KV_PARTIAL,  # [B*H, n_splits, D, D] fp32
    KSUM_PARTIAL,  # [B*H, n_splits, D] fp32
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_vd,
    n_heads,
    seq_len,
    tokens_per_split,
    n_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_DV: tl.constexpr,  # columns of V (of KV) per program: a [D, D] fp32 accumulator would spill registers
    DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    column_block = tl.program_id(2)
    batch = (bh // n_heads).to(tl.int64)
    head = (bh % n_heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = column_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_l = tl.arange(0, BLOCK_L)
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh

    # KV^T[dv, :] = sum_l v_l[dv]^T phi(k_l): V^T [BLOCK_DV, BLOCK_L] is read transposed from memory, so phi(k)
    # [BLOCK_L, D] is the right operand as computed (no transpose in registers)
    kv_t = tl.zeros([BLOCK_DV, HEAD_DIM], dtype=tl.float32)
    ksum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)
    for token0 in range(start, end, BLOCK_L):
        rows = token0 + offs_l
        valid = rows < end
        k = tl.load(k_base + rows[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=valid[:, None], other=0.0)
        v_t = tl.load(v_base + rows[None, :] * stride_vl + offs_dv[:, None] * stride_vd, mask=valid[None, :], other=0.0)
        # phi(k) = softmax over the D features, max-subtracted; a padded row would be uniform, so it is zeroed
        e = tl.exp(k.to(tl.float32) - tl.max(k, axis=1).to(tl.float32)[:, None])
        phi_k = tl.where(valid[:, None], e / tl.sum(e, axis=1)[:, None], 0.0)
        ksum += tl.sum(phi_k, axis=0)
        # in the input dtype on tensor cores (as P in P.V), fp32 accumulation; fp32 inputs stay fp32
        kv_t = tl.dot(v_t, phi_k.to(v_t.dtype), kv_t, input_precision=DOT_PRECISION)

    part = bh.to(tl.int64) * n_splits + split
    # stored transposed back: KV_PARTIAL[part, i, j] = KV[i, j] = kv_t[j, i]
    tl.store(KV_PARTIAL + part * HEAD_DIM * HEAD_DIM + offs_d[None, :] * HEAD_DIM + offs_dv[:, None], kv_t)
    if column_block == 0:
        tl.store(KSUM_PARTIAL + part * HEAD_DIM + offs_d, ksum)


@triton.jit
def _linear_state_finalize_kernel(
    KV_PARTIAL,
    KSUM_PARTIAL,
    W,  # proj_l weight [D_out, D_in]
    KVW,  # [B*H, D, D]: (sum of KV partials) W^T, stored in KVW's dtype
    KSUM,  # [B*H, D] fp32
    stride_w_out,
    stride_w_in,
    n_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,  # rows of KV per program
    DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    row_block = tl.program_id(1)
    offs_r = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_r[:, None] * HEAD_DIM + offs_d[None, :]
    kv = tl.zeros([BLOCK_ROWS, HEAD_DIM], dtype=tl.float32)
    for split in range(n_splits):  # a fixed order, no atomics: the same inputs give the same bits
        kv += tl.load(KV_PARTIAL + (bh * n_splits + split) * HEAD_DIM * HEAD_DIM + rows)
    # w_t[j, o] = W[o, j], so (kv @ w_t)[i, o] = sum_j KV[i, j] W[o, j] = (KV W^T)[i, o]
    w_t = tl.load(W + offs_d[None, :] * stride_w_out + offs_d[:, None] * stride_w_in).to(tl.float32)
    kvw = tl.dot(kv, w_t, input_precision=DOT_PRECISION)
    tl.store(KVW + bh * HEAD_DIM * HEAD_DIM + rows, kvw.to(KVW.dtype.element_ty))
    if row_block == 0:
        ksum = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for split in range(n_splits):
            ksum += tl.load(KSUM_PARTIAL + (bh * n_splits + split) * HEAD_DIM + offs_d)
        tl.store(KSUM + bh * HEAD_DIM + offs_d, ksum)


@triton.jit
def _sla_forward_kernel(
    Q,
    K,
    V,
    LUT,  # [B, H, n_q_blocks, n_sel] int32: K block indices
    KVW,  # [B*H, D, D] (KV W^T; unused without the linear branch)
    KSUM,  # [B*H, D] fp32 (idem)
    BIAS,  # [D] proj_l bias (unused without it)
    OUT,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_od,
    stride_lut_b,
    stride_lut_h,
    stride_lut_q,
    stride_lut_s,
    n_heads,
    seq_len,
    n_sel,
    QK_SCALE_LOG2: tl.constexpr,  # log2(e) / sqrt(D): a constant, so the scores stay fp32 under every launcher
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # = BLK_K * KEYS_PER_STEP: the keys of the selected blocks one loop step reads
    BLK_Q: tl.constexpr,
    BLK_K: tl.constexpr,
    KEYS_PER_STEP: tl.constexpr,  # selected K blocks per step, 1 or 2
    KEYS_EVEN: tl.constexpr,  # L % blk_k == 0 and n_sel % KEYS_PER_STEP == 0: no key is masked
    HAS_LINEAR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs; bf16/fp16 products ignore it
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    batch = (bh // n_heads).to(tl.int64)
    head = (bh % n_heads).to(tl.int64)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < seq_len

    q_base = Q + batch * stride_qb + head * stride_qh
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd, mask=row_valid[:, None], other=0.0)
    # the LUT row of this tile's query block (with BLOCK_M = BLK_Q / 2, two tiles share it)
    lut_row = LUT + batch * stride_lut_b + head * stride_lut_h + ((tile * BLOCK_M) // BLK_Q) * stride_lut_q

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max of the log2-scaled scores
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for slot in range(0, n_sel, KEYS_PER_STEP):
        if KEYS_PER_STEP == 1:
            offs_key = tl.load(lut_row + slot * stride_lut_s) * BLK_K + offs_n
            key_valid = offs_key < seq_len
        else:
            # column n holds key n % BLK_K of the step's (n // BLK_K)-th block; past the last selected block (odd
            # n_sel) the columns are masked like keys >= L
            sub = slot + offs_n // BLK_K
            block = tl.load(lut_row + sub * stride_lut_s, mask=sub < n_sel, other=0)
            offs_key = block * BLK_K + offs_n % BLK_K
            key_valid = (offs_key < seq_len) & (sub < n_sel)
        k_ptrs = k_base + offs_key[None, :] * stride_kl + offs_d[:, None] * stride_kd  # K^T tile [D, BLOCK_N]
        v_ptrs = v_base + offs_key[:, None] * stride_vl + offs_d[None, :] * stride_vd
        if KEYS_EVEN:
            k_t = tl.load(k_ptrs)
        else:
            k_t = tl.load(k_ptrs, mask=key_valid[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * QK_SCALE_LOG2
        if not KEYS_EVEN:
            s = tl.where(key_valid[None, :], s, float("-inf"))
        # every selected block holds at least one key < L, so m_new is finite and alpha = 2^-inf = 0 on the first step
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if KEYS_EVEN:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=key_valid[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]

    if HAS_LINEAR:
        # proj_l(o_l) = (phi(q) / (1e-5 + phi(q) . ksum)) KVW + b, accumulated into the sparse output; the product
        # runs in KVW's dtype (the input dtype on tensor cores, fp32 for fp32 inputs)
        qf = q.to(tl.float32)
        qf = tl.exp(qf - tl.max(qf, axis=1)[:, None])
        phi_q = qf / tl.sum(qf, axis=1)[:, None]
        ksum = tl.load(KSUM + bh.to(tl.int64) * HEAD_DIM + offs_d)
        den = 1e-5 + tl.sum(phi_q * ksum[None, :], axis=1)  # sla._linear_branch's 1e-5
        kvw = tl.load(KVW + bh.to(tl.int64) * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :])
        acc = tl.dot((phi_q / den[:, None]).to(kvw.dtype), kvw, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_d).to(tl.float32)[None, :]

    out_ptrs = OUT + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=row_valid[:, None])


# TRITON_INTERPRET=1 (set before Triton was imported) makes @triton.jit return an interpreted function: the kernels
# run on CPU tensors in numpy (the CPU tests); the flag is read from the kernel, never from the environment
INTERPRETED = not isinstance(_sla_forward_kernel, triton.runtime.jit.JITFunction)


def check_inputs(
    q, k, v, lut, proj_weight, proj_bias, blk_q: int, blk_k: int, block_m: int, keys_per_step: int = 1
) -> None:
    """ValueError naming the first argument the kernels do not support."""
    check_attention_inputs(q, k, v, lut, proj_weight, proj_bias, blk_q)
    if blk_k < 16 or blk_k & (blk_k - 1):
        raise ValueError(f"blk_k must be a power of two >= 16, got {blk_k}")
    if block_m < 16 or block_m & (block_m - 1) or blk_q % block_m:
        raise ValueError(f"block_m must be a power of two >= 16 dividing blk_q={blk_q}, got {block_m}")
    if keys_per_step not in (1, 2):
        raise ValueError(f"keys_per_step must be 1 or 2, got {keys_per_step}")


def _linear_splits(batch_heads: int, length: int) -> tuple[int, int]:
    """(n_splits, tokens_per_split) for the linear-state reduction: enough programs to fill the GPU, each summing at
    least _MIN_TOKENS_PER_SPLIT tokens (a multiple of _LINEAR_BLOCK_L)."""
    n_splits = max(1, min(-(-length // _MIN_TOKENS_PER_SPLIT), -(-_TARGET_LINEAR_PROGRAMS // batch_heads)))
    tokens = -(-length // n_splits)
    tokens = -(-tokens // _LINEAR_BLOCK_L) * _LINEAR_BLOCK_L
    return -(-length // tokens), tokens


def linear_state(
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    kvw_dtype: torch.dtype,
    block_l: int = _LINEAR_BLOCK_L,
    block_dv: int = 128,
    num_warps: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KVW = (sum phi(k)^T v) W^T [B*H, D, D] in kvw_dtype, ksum = sum phi(k) [B*H, D] fp32), sums in fp32."""
    b, h, length, d = k.shape
    n_splits, tokens_per_split = _linear_splits(b * h, length)
    kv_partial = torch.empty(b * h, n_splits, d, d, device=k.device, dtype=torch.float32)
    ksum_partial = torch.empty(b * h, n_splits, d, device=k.device, dtype=torch.float32)
    kvw = torch.empty(b * h, d, d, device=k.device, dtype=kvw_dtype)
    ksum = torch.empty(b * h, d, device=k.device, dtype=torch.float32)
    if INTERPRETED and is_fake(k):
        return kvw, ksum
    dot_precision = "ieee" if k.dtype == torch.float32 else "tf32"
    block_dv = min(block_dv, d)
    wrap_triton(_linear_state_partials_kernel)[(b * h, n_splits, d // block_dv)](
        k,
        v,
        kv_partial,
        ksum_partial,
        *k.stride(),
        *v.stride(),
        h,
        length,
        tokens_per_split,
        n_splits,
        HEAD_DIM=d,
        BLOCK_L=block_l,
        BLOCK_DV=block_dv,
        DOT_PRECISION=dot_precision,
        num_warps=num_warps,
        num_stages=3,
    )
    wrap_triton(_linear_state_finalize_kernel)[(b * h, d // _FINALIZE_ROWS)](
        kv_partial,
        ksum_partial,
        proj_weight,
        kvw,
        ksum,
        *proj_weight.stride(),
        n_splits,
        HEAD_DIM=d,
        BLOCK_ROWS=_FINALIZE_ROWS,
        DOT_PRECISION=dot_precision,
        num_warps=4,
    )
    return kvw, ksum


def sla_sparse_linear_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
    blk_q: int,
    blk_k: int,
    tiles: TileConfig = DEFAULT_TILES,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The op's body with an explicit tile config (bench sweeps call it directly; the op uses DEFAULT_TILES);
    state: linear_state's result when the caller already has it (bench), else computed here.

    It is also the op's fake implementation (triton_op registers it): under FakeTensorMode wrap_triton records the
    launches instead of running them. Triton's interpreter bypasses wrap_triton, so there the launches are skipped
    for fake tensors (shapes, dtypes and strides of the result are all a fake call needs)."""
    check_inputs(q, k, v, lut, proj_weight, proj_bias, blk_q, blk_k, tiles.block_m, tiles.keys_per_step)
    b, h, length, d = q.shape
    fp32_inputs = q.dtype == torch.float32
    lut = lut.to(torch.int32)
    n_sel = lut.shape[-1]
    # same strides as q: for SLAProcessor's [B, L, H, D] views the caller's transpose back is then free
    out = torch.empty_like(q)
    if INTERPRETED and is_fake(q):
        if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FUNCTIONAL) is not None:
            # AOTAutograd would record a graph without the launches: refuse rather than return garbage
            raise RuntimeError("Triton's interpreter cannot be traced by AOTAutograd: compile with backend='eager'")
        return out
    has_linear = proj_weight is not None
    if has_linear:
        kvw_dtype = torch.float32 if fp32_inputs or tiles.epilogue_fp32 else q.dtype
        kvw, ksum = state if state is not None else linear_state(k, v, proj_weight, kvw_dtype)
    else:
        kvw = ksum = out  # placeholders: the kernel never reads them without HAS_LINEAR
    wrap_triton(_sla_forward_kernel)[(triton.cdiv(length, tiles.block_m), b * h)](
        q,
        k,
        v,
        lut,
        kvw,
        ksum,
        proj_bias if proj_bias is not None else out,
        out,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *lut.stride(),
        h,
        length,
        n_sel,
        QK_SCALE_LOG2=_LOG2E / math.sqrt(d),
        HEAD_DIM=d,
        BLOCK_M=tiles.block_m,
        BLOCK_N=blk_k * tiles.keys_per_step,
        BLK_Q=blk_q,
        BLK_K=blk_k,
        KEYS_PER_STEP=tiles.keys_per_step,
        KEYS_EVEN=length % blk_k == 0 and n_sel % tiles.keys_per_step == 0,
        HAS_LINEAR=has_linear,
        HAS_BIAS=proj_bias is not None,
        DOT_PRECISION="ieee" if fp32_inputs else "tf32",
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out


@triton_op("turboflow::sla_sparse_linear", mutates_args=())
def sla_sparse_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
    blk_q: int,
    blk_k: int,
) -> torch.Tensor:
    """SLA's sparse branch over the K blocks in `lut` plus proj_l(linear branch), one write: [B, H, L, D], q's
    dtype and strides. proj_weight None: the linear branch adds nothing (sla._project)."""
    tiles = DEFAULT_TILES
    if blk_q % tiles.block_m:
        tiles = dataclasses.replace(tiles, block_m=blk_q)
    return sla_sparse_linear_forward(q, k, v, lut, proj_weight, proj_bias, blk_q, blk_k, tiles)
