"""SageSLA's quantized sparse branch in Triton (engine/sagesla.py states the math and its upstream sources).

Three kernels, launched by `sagesla` (the torch custom op `torch.ops.turboflow.sagesla`), plus the linear-state
kernels of engine/kernels/sparse_attention.py (`linear_state`) when proj_l is given:
  * `_quantize_int8_kernel`, one program per (block of BLOCK tokens, batch*head): Q, or K minus its token mean
    rounded to the input dtype ("smooth K"), to int8 with one scale per block,
        scale = max|x| / 127 + 1e-7,   x_int8 = trunc(x / scale + 0.5 sign(x / scale))   (round half away from 0),
    exactly SpargeAttn's `qk_quantize` (IEEE division: `div_rn`, so the int8 values equal the torch emulation's);
  * `_quantize_v_kernel`, one program per (block of tokens, batch*head): V times the per-channel factor
    2.25 / max_tokens|v| (computed by the wrapper) rounded to fp8 e4m3, stored transposed [B*H, D, L_pad] so that
    V^T tiles are K-major for Hopper's fp8 wgmma (the layout SageAttention's own V kernels write); tokens >= L are 0;
  * `_sagesla_attention_kernel`, one program per (query block, batch*head), BLOCK_M = blk_q, BLOCK_N = blk_k: walks
    the K blocks of its LUT row in ascending order (SpargeAttn's delta-coded LUT order), with
        s   = int32(Q_int8 K_int8^T) * (q_scale * k_scale * log2(e) / sqrt(D))     (int8 tl.dot, int32 exact)
        m'  = max(m, rowmax s),  alpha = 2^(m - m'),  p = 2^(s - m' + 8.807)   (p <= 2^8.807 ~ 448 = e4m3 max)
        l   = l alpha + rowsum p                                         (denominator from the fp32 p)
        acc = acc alpha + fp8(p) . V_fp8                                  (fp8 tl.dot, fp32 accumulation per block)
    then o = acc / l * v_scale, plus SLA's linear branch through proj_l when given (the epilogue of
    sparse_attention.py: (phi(q) / (1e-5 + phi(q) . ksum)) KVW + b), stored once in the output dtype (upstream
    rounds o_s and proj_l(o_l) to bf16 separately before adding them: up to one bf16 ulp apart). Keys >= L get
    s = -inf; query rows >= L are not stored.

fp8 dots need sm_89+ (Ada, Hopper). On older GPUs `FP8_DOT=False` converts the fp8 operands to bf16 first: every
e4m3 value is exact in bf16, so the products and the fp32 sums are the same numbers, only slower.

`SOFTWARE_FP8_ROUND`, `SOFTWARE_BF16_ROUND`: Triton's interpreter (the CPU tests) converts fp32 to e4m3 with ties
away from zero and truncated subnormals, and fp32 to bf16 by truncation, unlike the GPU's round-to-nearest-even
`cvt` instructions and torch's casts. With the flags the kernels first round in fp32 arithmetic (`_round_to_e4m3`,
`_round_to_bf16`: exact, ties to even), after which the cast is exact in either. The wrapper sets them only when
TRITON_INTERPRET=1.

This module imports Triton at import time: import it lazily (engine.kernels does).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..sagesla import LOG2E, S_FP8_OFFSET, V_FP8_RANGE
from ._inputs import check_attention_inputs

_P_OFFSET = tl.constexpr(S_FP8_OFFSET)  # a kernel reads module constants only as constexpr
_V_BLOCK_L = 64  # tokens per V-quantization program (divides every blk_k the op accepts)


@triton.jit
def _round_to_e4m3(x):
    """x (fp32) rounded to the nearest float8 e4m3fn value (ties to even, saturating at +-448), as fp32.

    For |x| in [2^e, 2^(e+1)) e4m3 keeps 3 mantissa bits, so its spacing is 2^(max(e, -6) - 3) (subnormals below
    2^-6 share the spacing 2^-9). Adding c = spacing * 2^23 pushes |x| into a binade whose fp32 ulp is that
    spacing, so the fp32 addition itself rounds to it, ties to even; subtracting c again is exact."""
    ax = tl.abs(x)
    exponent = ((ax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    spacing_exp = tl.maximum(exponent, -6) - 3
    magic = ((spacing_exp + 23 + 127) << 23).to(tl.float32, bitcast=True)
    rounded = tl.minimum((ax + magic) - magic, 448.0)
    return tl.where(x < 0, -rounded, rounded)


@triton.jit
def _round_to_bf16(x):
    """x (fp32) rounded to the nearest bfloat16 (ties to even), as fp32: round the 16 low bits away."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 = 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _quantize_int8_kernel(
    X,  # [B, H, L, D], any strides
    MEAN,  # [B*H, D] contiguous: the token mean subtracted first (SMOOTH), in X's dtype
    X_INT8,  # [B*H, L, D] int8
    SCALE,  # [B*H, n_blocks] fp32
    stride_b,
    stride_h,
    stride_l,
    stride_d,
    n_heads,
    seq_len,
    n_blocks,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    SMOOTH: tl.constexpr,
    SOFTWARE_BF16_ROUND: tl.constexpr,
):
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = rows[:, None] < seq_len
    x_base = X + (bh // n_heads) * stride_b + (bh % n_heads) * stride_h
    x = tl.load(x_base + rows[:, None] * stride_l + offs_d[None, :] * stride_d, mask=valid, other=0.0)
    ptrs = bh * seq_len * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
    if SMOOTH:
        mean = tl.load(MEAN + bh * HEAD_DIM + offs_d)
        # k - mean(k) rounded to the input dtype, as torch computes it (and SpargeAttn's `x -= x_mean`)
        diff = x.to(tl.float32) - mean.to(tl.float32)[None, :]
        if SOFTWARE_BF16_ROUND:
            diff = _round_to_bf16(diff)
        x = diff.to(X.dtype.element_ty)
        x = tl.where(valid, x, 0.0)
    xf = x.to(tl.float32)
    scale = tl.math.div_rn(tl.max(tl.abs(xf)), 127.0) + 1e-7
    y = tl.math.div_rn(xf, tl.zeros_like(xf) + scale)
    y = y + tl.where(y >= 0, 0.5, -0.5)
    tl.store(X_INT8 + ptrs, y.to(tl.int8), mask=valid)  # fp32 -> int8 truncates toward zero
    tl.store(SCALE + bh * n_blocks + blk, scale)


@triton.jit
def _quantize_v_kernel(
    V,  # [B, H, L, D], any strides
    V_RECIP,  # [B*H, D] fp32: 2.25 / max|v| per channel (0 for an all-zero channel)
    V_FP8_T,  # [B*H, D, L_pad] float8 e4m3
    stride_b,
    stride_h,
    stride_l,
    stride_d,
    n_heads,
    seq_len,
    padded_len,
    HEAD_DIM: tl.constexpr,
    BLOCK_L: tl.constexpr,
    SOFTWARE_FP8_ROUND: tl.constexpr,
):
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = blk * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, HEAD_DIM)
    v_base = V + (bh // n_heads) * stride_b + (bh % n_heads) * stride_h
    v = tl.load(v_base + rows[:, None] * stride_l + offs_d[None, :] * stride_d, mask=rows[:, None] < seq_len, other=0.0)
    recip = tl.load(V_RECIP + bh * HEAD_DIM + offs_d)
    x = v.to(tl.float32) * recip[None, :]
    if SOFTWARE_FP8_ROUND:
        x = _round_to_e4m3(x)
    out = V_FP8_T + bh * HEAD_DIM * padded_len + offs_d[None, :] * padded_len + rows[:, None]
    tl.store(out, x.to(tl.float8e4nv), mask=rows[:, None] < padded_len)


@triton.jit
def _sagesla_attention_kernel(
    Q,  # [B, H, L, D], any strides: phi(q) for the linear branch (HAS_LINEAR)
    KVW,  # [B*H, D, D]: (sum phi(k)^T v) proj_l.W^T (HAS_LINEAR)
    KSUM,  # [B*H, D] fp32: sum phi(k) (HAS_LINEAR)
    BIAS,  # [D] proj_l.b (HAS_BIAS)
    Q_INT8,  # [B*H, L, D] int8
    K_INT8,  # [B*H, L, D] int8
    V_FP8_T,  # [B*H, D, L_pad] e4m3
    Q_SCALE,  # [B*H, n_q_blocks] fp32
    K_SCALE,  # [B*H, n_k_blocks] fp32
    V_SCALE,  # [B*H, D] fp32
    LUT,  # [B*H, n_q_blocks, n_sel] int32, ascending
    OUT,  # [B, H, L, D], any strides
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_od,
    n_heads,
    seq_len,
    padded_len,
    n_q_blocks,
    n_k_blocks,
    n_sel,
    SM_SCALE_LOG2: tl.constexpr,  # log2(e) / sqrt(D); constexpr: a float argument may arrive as fp64 from inductor
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # = blk_q
    BLOCK_N: tl.constexpr,  # = blk_k
    FP8_DOT: tl.constexpr,
    SOFTWARE_FP8_ROUND: tl.constexpr,
    HAS_LINEAR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LINEAR_DOT_PRECISION: tl.constexpr,
):
    q_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < seq_len
    head_base = bh * seq_len * HEAD_DIM
    q = tl.load(Q_INT8 + head_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_valid[:, None], other=0)
    q_scale = tl.load(Q_SCALE + bh * n_q_blocks + q_block)
    lut_row = LUT + (bh * n_q_blocks + q_block) * n_sel
    v_base = V_FP8_T + bh * HEAD_DIM * padded_len

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max of the log2-domain scores
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of p (unrounded)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for sel in range(n_sel):
        key_block = tl.load(lut_row + sel)
        keys = key_block * BLOCK_N + offs_n
        key_valid = keys < seq_len
        k = tl.load(K_INT8 + head_base + keys[:, None] * HEAD_DIM + offs_d[None, :], mask=key_valid[:, None], other=0)
        s_int = tl.dot(q, tl.trans(k), out_dtype=tl.int32)  # |sum| <= 127^2 D < 2^24: exact, and exact in fp32
        k_scale = tl.load(K_SCALE + bh * n_k_blocks + key_block)
        s = s_int.to(tl.float32) * (q_scale * k_scale * SM_SCALE_LOG2)
        s = tl.where(key_valid[None, :], s, float("-inf"))
        # every selected block holds a key < L, so m_new is finite and alpha = 0 on the first step
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None] + _P_OFFSET)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if SOFTWARE_FP8_ROUND:
            p = _round_to_e4m3(p)
        p8 = p.to(tl.float8e4nv)
        v_t = tl.load(v_base + offs_d[:, None] * padded_len + keys[None, :])  # [D, BLOCK_N]; padded keys are 0
        if FP8_DOT:
            pv = tl.dot(p8, tl.trans(v_t))
        else:  # e4m3 values are exact in bf16: same products, no fp8 tensor cores needed
            pv = tl.dot(p8.to(tl.bfloat16), tl.trans(v_t).to(tl.bfloat16))
        acc = acc * alpha[:, None] + pv  # a fresh fp32 accumulator per block, as SageAttention's RO_temp
        m_i = m_new
    v_scale = tl.load(V_SCALE + bh * HEAD_DIM + offs_d)
    o = acc / l_i[:, None] * v_scale[None, :]
    if HAS_LINEAR:
        # SLA's linear branch through proj_l, added before the single store (engine/kernels/sparse_attention.py's
        # epilogue): proj_l(o_l) = (phi(q) / (1e-5 + phi(q) . ksum)) KVW + b, phi = softmax over the D features
        q_base = Q + (bh // n_heads) * stride_qb + (bh % n_heads) * stride_qh
        qf = tl.load(
            q_base + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd, mask=row_valid[:, None], other=0.0
        ).to(tl.float32)
        qf = tl.exp(qf - tl.max(qf, axis=1)[:, None])
        phi_q = qf / tl.sum(qf, axis=1)[:, None]
        ksum = tl.load(KSUM + bh * HEAD_DIM + offs_d)
        den = 1e-5 + tl.sum(phi_q * ksum[None, :], axis=1)  # sla._linear_branch's 1e-5
        kvw = tl.load(KVW + bh * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :])
        o = tl.dot((phi_q / den[:, None]).to(kvw.dtype), kvw, o, input_precision=LINEAR_DOT_PRECISION)
        if HAS_BIAS:
            o += tl.load(BIAS + offs_d).to(tl.float32)[None, :]
    out_base = OUT + (bh // n_heads) * stride_ob + (bh % n_heads) * stride_oh
    out_ptrs = out_base + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od
    tl.store(out_ptrs, o.to(OUT.dtype.element_ty), mask=row_valid[:, None])


def _interpreting() -> bool:
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1 before Triton was imported: the CPU tests); read from
    the kernels themselves, as engine/kernels/sparse_attention.py does: the engine reads no environment."""
    from .sparse_attention import INTERPRETED

    return INTERPRETED


def fp8_dot_supported(device: torch.device) -> bool:
    """fp8 tensor-core dots: CUDA compute capability 8.9 (Ada) or newer; the interpreter emulates them."""
    if _interpreting() or device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def check_inputs(q, k, v, lut, blk_q: int, blk_k: int, proj_weight=None, proj_bias=None) -> None:
    """ValueError naming the first argument the kernels do not support."""
    check_attention_inputs(q, k, v, lut, proj_weight, proj_bias, blk_q)
    for name, blk in (("blk_q", blk_q), ("blk_k", blk_k)):
        if blk < _V_BLOCK_L or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= {_V_BLOCK_L}, got {blk}")


class Quantized(NamedTuple):
    """SageSLA's quantized operands (engine/sagesla.py has the same numbers as torch tensors)."""

    q_int8: torch.Tensor  # [B*H, L, D] int8
    q_scale: torch.Tensor  # [B*H, n_q_blocks] fp32
    k_int8: torch.Tensor  # [B*H, L, D] int8, K minus its token mean
    k_scale: torch.Tensor  # [B*H, n_k_blocks] fp32
    v_fp8_t: torch.Tensor  # [B*H, D, L_pad] e4m3, L_pad a multiple of blk_k, zero past L
    v_scale: torch.Tensor  # [B*H, D] fp32


def quantize_qk(q: torch.Tensor, k: torch.Tensor, blk_q: int, blk_k: int):
    """(q_int8, q_scale [B*H, n_q_blocks], k_int8, k_scale [B*H, n_k_blocks]) for q, k [B, H, L, D] (any strides)."""
    b, h, length, d = q.shape
    k_mean = k.mean(dim=-2)  # [B, H, D] in k's dtype, as upstream's `km`
    out = []
    for x, blk, mean in ((q, blk_q, None), (k, blk_k, k_mean)):
        n_blocks = -(-length // blk)
        x_int8 = torch.empty(b * h, length, d, device=x.device, dtype=torch.int8)
        scale = torch.empty(b * h, n_blocks, device=x.device, dtype=torch.float32)
        wrap_triton(_quantize_int8_kernel)[(n_blocks, b * h)](
            x,
            x if mean is None else mean.contiguous(),
            x_int8,
            scale,
            *x.stride(),
            h,
            length,
            n_blocks,
            HEAD_DIM=d,
            BLOCK=blk,
            SMOOTH=mean is not None,
            SOFTWARE_BF16_ROUND=_interpreting() and x.dtype == torch.bfloat16,
            num_warps=4,
        )
        out += [x_int8, scale]
    return tuple(out)


def quantize_v(v: torch.Tensor, blk_k: int, software_rounding: bool | None = None):
    """(v_fp8 transposed [B*H, D, L_pad] with L_pad a multiple of blk_k, v_scale [B*H, D] = max|v| / 2.25).
    software_rounding: None = only under the interpreter (the module docstring says why)."""
    b, h, length, d = v.shape
    padded_len = -(-length // blk_k) * blk_k
    amax = torch.linalg.vector_norm(v, ord=float("inf"), dim=-2).float().reshape(b * h, d)  # one read of v
    v_recip = torch.where(amax > 0, torch.full_like(amax, V_FP8_RANGE) / amax, torch.zeros_like(amax))
    v_scale = amax / torch.full_like(amax, V_FP8_RANGE)
    v_fp8_t = torch.empty(b * h, d, padded_len, device=v.device, dtype=torch.float8_e4m3fn)
    wrap_triton(_quantize_v_kernel)[(padded_len // _V_BLOCK_L, b * h)](
        v,
        v_recip,
        v_fp8_t,
        *v.stride(),
        h,
        length,
        padded_len,
        HEAD_DIM=d,
        BLOCK_L=_V_BLOCK_L,
        SOFTWARE_FP8_ROUND=_interpreting() if software_rounding is None else software_rounding,
        num_warps=4,
    )
    return v_fp8_t, v_scale


def quantize(q, k, v, blk_q: int, blk_k: int, software_rounding: bool | None = None) -> Quantized:
    """All of SageSLA's quantized operands for q, k, v [B, H, L, D]."""
    return Quantized(*quantize_qk(q, k, blk_q, blk_k), *quantize_v(v, blk_k, software_rounding))


def sorted_lut(lut: torch.Tensor) -> torch.Tensor:
    """The LUT in ascending K-block order (SpargeAttn's order: P is rounded against the same running max), int32."""
    return torch.sort(lut.to(torch.int32), dim=-1).values.contiguous()


def linear_operands(q, k, v, proj_weight, proj_bias):
    """(KVW, ksum, bias) for the fused linear branch (engine/kernels/sparse_attention.linear_state), or Nones without
    proj_l (upstream initialises it to zero: the branch adds nothing)."""
    if proj_weight is None:
        return None, None, None
    from .sparse_attention import linear_state

    kvw_dtype = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32
    kvw, ksum = linear_state(k, v, proj_weight, kvw_dtype)
    return kvw, ksum, proj_bias


def attend_quantized(
    x: Quantized,
    lut: torch.Tensor,
    out: torch.Tensor,
    blk_q: int,
    blk_k: int,
    num_warps: int = 4,
    num_stages: int = 3,
    fp8_dot: bool | None = None,
    software_rounding: bool | None = None,
    q: torch.Tensor | None = None,
    kvw: torch.Tensor | None = None,
    ksum: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention kernel on quantized operands, written into `out` [B, H, L, D] (any strides); lut ascending
    int32 (`sorted_lut`). With q, kvw, ksum (`linear_operands`) it adds the linear branch through proj_l before the
    store. fp8_dot None: when the device has fp8 dots; software_rounding None: under the interpreter only."""
    b, h, length, d = out.shape
    n_q_blocks, n_k_blocks = -(-length // blk_q), -(-length // blk_k)
    has_linear = kvw is not None
    wrap_triton(_sagesla_attention_kernel)[(n_q_blocks, b * h)](
        q if has_linear else out,
        kvw if has_linear else out,
        ksum if has_linear else out,
        bias if bias is not None else out,
        x.q_int8,
        x.k_int8,
        x.v_fp8_t,
        x.q_scale,
        x.k_scale,
        x.v_scale,
        lut,
        out,
        *(q if has_linear else out).stride(),
        *out.stride(),
        h,
        length,
        x.v_fp8_t.shape[-1],
        n_q_blocks,
        n_k_blocks,
        lut.shape[-1],
        SM_SCALE_LOG2=LOG2E / math.sqrt(d),
        HEAD_DIM=d,
        BLOCK_M=blk_q,
        BLOCK_N=blk_k,
        FP8_DOT=fp8_dot_supported(out.device) if fp8_dot is None else fp8_dot,
        SOFTWARE_FP8_ROUND=_interpreting() if software_rounding is None else software_rounding,
        HAS_LINEAR=has_linear,
        HAS_BIAS=has_linear and bias is not None,
        LINEAR_DOT_PRECISION="ieee" if out.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def sagesla_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
    blk_q: int,
    blk_k: int,
    num_warps: int = 4,
    num_stages: int = 3,
    fp8_dot: bool | None = None,
    software_rounding: bool | None = None,
) -> torch.Tensor:
    """The op's body with explicit launch settings (the bench calls it directly). lut: any order; sorted here.
    The output has q's strides (for SLAProcessor's [B, L, H, D] views the caller's transpose back is free)."""
    check_inputs(q, k, v, lut, blk_q, blk_k, proj_weight, proj_bias)
    x = quantize(q, k, v, blk_q, blk_k, software_rounding)
    kvw, ksum, bias = linear_operands(q, k, v, proj_weight, proj_bias)
    out = torch.empty_like(q)
    return attend_quantized(
        x, sorted_lut(lut), out, blk_q, blk_k, num_warps, num_stages, fp8_dot, software_rounding, q, kvw, ksum, bias
    )


@triton_op("turboflow::sagesla", mutates_args=())
def sagesla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
    blk_q: int,
    blk_k: int,
) -> torch.Tensor:
    """SageSLA: the quantized sparse branch over the K blocks in `lut` plus proj_l(linear branch), one write:
    [B, H, L, D], q's dtype and strides. proj_weight None: the linear branch adds nothing."""
    return sagesla_forward(q, k, v, lut, proj_weight, proj_bias, blk_q, blk_k)
