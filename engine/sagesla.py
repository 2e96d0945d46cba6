"""SageSLA: SLA with SpargeAttn's quantized block-sparse kernel as its sparse branch (upstream's default attention).

What upstream computes (read from the sources, not from papers: github.com/thu-ml/TurboDiffusion at aaecff5,
github.com/thu-ml/SpargeAttn at bfd980b):
  * TurboDiffusion `turbodiffusion/SLA/core.py` `SageSparseLinearAttention.forward`: the block map comes from the
    same `get_block_map` as SLA (mean-pooled Q blocks x smoothed, mean-pooled K blocks, top `int(topk * n_k)` per
    Q block; see engine/sla.py), with BLKQ=64, BLKK=128 when the GPU is sm90 (Hopper) and 128, 64 otherwise.
    q, k, v are cast to bf16; `km = k.mean(dim=-2)` (bf16); `get_vanilla_qk_quant(q, k, km, 64, 128)` on sm90;
    `block_map_lut_triton(sparse_map)` turns the map into per-Q-block lists of K blocks in ascending order;
    softmax scale 1/sqrt(D), D in {64, 128}. On sm90 V is transposed and padded to a multiple of 128 tokens
    (`fused.transpose_pad_permute_cuda`), quantized by `fused.scale_fuse_quant_cuda(v_t, v_fp8, v_scale, L, 2.25)`
    and `qattn.qk_int8_sv_f8_accum_f32_block_sparse_attn_inst_buf_fuse_v_scale_sm90(...)` runs with
    qk_quant_gran=1 (per block). sm80 runs fp16 P.V (`qk_int8_sv_f16_accum_f16...`); sm89 the fp8 kernel with
    128x64 blocks. The linear branch and proj_l are SLA's (phi = softmax over D, then proj_l under bf16 autocast);
    the output is o_s (bf16) + proj_l(o_l).
  * SpargeAttn `spas_sage_attn/utils.py` `qk_quantize` (Triton), for Q (no mean) and K (minus km, `x -= x_mean` in
    bf16): one fp32 scale per block of BLKQ / BLKK tokens (padded rows count as 0),
        scale = max|x| / 127 + 1e-7,   x_int8 = trunc(x / scale + 0.5 sign(x / scale))   (half away from zero).
    Subtracting the token mean of K adds the same q . km to every score of a query row: softmax is unchanged.
  * SpargeAttn `csrc/fused/fused.cu` `MeanScaleKernel<sub_mean=false>`: per (batch, head, channel) over the tokens,
        v_scale = max|v| / 2.25,   v_fp8 = e4m3_rn_satfinite(v * (2.25 / max|v|))
    (2.25 presumably keeps 448 * 2.25 * 64 below fp16's max for the fp16-accumulating kernels; sm90 reuses it).
  * SpargeAttn `csrc/qattn/qk_int_sv_f8_cuda_sm90.cuh` `qk_int8_sv_f8_attn_kernel` and `attn_utils.cuh`: one CTA
    of 64 queries walks its LUT; per K block of 128 keys: S = Q_int8 K_int8^T by `wgmma_s8s8s32` (int32, exact),
    converted to fp32 and scaled by q_scale * k_scale * sm_scale * log2(e) (log2 domain); `update_mdo` keeps the
    running max m and rescales O and the denominator d by 2^(m_old - m_new); P = 2^(s - m + S_FP8_OFFSET) with
    S_FP8_OFFSET = 8.807 (so P <= 2^8.807 ~ 448, e4m3's max: the fp8 range is used fully; the factor cancels in
    O / d); d accumulates the fp32 P (before rounding); `RS_32_to_8` rounds P to e4m3 (cvt.rn.satfinite);
    `wgmma_f8f8f32` computes P_fp8 . V_fp8 into a fresh fp32 tile added to O (the "inst_buf"); keys >= L are
    masked on the last (highest) block only; finally O / d * v_scale (fuse_v_scale), stored in bf16.
  SageAttention2's per-thread/per-warp Q/K granularity and its V smoothing are not used by this path
  (qk_quant_gran=1 = kPerBlock; scale_fuse_quant, not mean_scale_fuse_quant).

This module implements exactly that, portably:
  * `sparse_emulated`: torch on any device, block by block over the ascending LUT with the same online softmax, so
    P is rounded to fp8 against the same running max as on the GPU. int8 values, scales and fp8 values are the
    kernel's bit for bit (IEEE fp32 divisions, torch's round-to-nearest-even e4m3 cast); the int32 products are
    exact in float64; scores, max and P follow the kernel's fp32 operations in order; the P.V products and sums
    are float64 (the GPU's fp32/wgmma accumulation differs in the last bits).
  * engine/kernels/sagesla_kernel.py: the Triton kernels (CUDA), int8 and fp8 tl.dot, with SLA's linear branch and
    proj_l fused into the store (one rounding of o_s + proj_l(o_l), where upstream and the emulation path round
    each to bf16 first).
Differences from upstream, all below the quantization error: exp2 is exact here (ex2.approx on the GPU); the last
block's scale is applied in the same order as the others (upstream multiplies before, not after, the fmaf); the
selection keeps at least one K block (upstream keeps int(topk * n_k), 0 for tiny inputs, and then writes no
output); an all-zero V channel quantizes to 0 (upstream divides by 0); inputs keep their dtype (upstream casts
to bf16: the DiT's q, k, v are bf16 already).

Geometry: `sagesla_geometry` follows upstream per GPU (64x128 on sm90, 128x64 elsewhere) and uses Hopper's
64x128 on the CPU, the deployment GPU's computation.

Error against exact (float64, unquantized) attention over the same blocks, per output element (proved in
tests/test_sagesla.py, which evaluates it): |o_hat - o| <= (e^(2 delta) - 1) max|v| + 2^-4 max|v| + 2^-10 max s_v
+ (2^-4 + n 2^-10 / 2^8.807) max|v_hat|, where delta = the largest score error from int8 Q and K (natural-log
units), 2^-4 the relative rounding of an e4m3 normal (3 mantissa bits), 2^-10 half its subnormal spacing in the
scaled domain, n the number of keys attended and 2^8.807 the least possible denominator. On Gaussian random data
the RMS error is ~3.7 % of the output's RMS, mostly V's e4m3 rounding (2^-4 / sqrt(3) relative); an H200 run of
bench/sagesla.py measured 3.77 % for the kernel and the emulation alike (the worst case above is ~10x larger).
"""

from __future__ import annotations

import logging
import math

import torch

from .sla import POOLING_MODES, _linear_branch, _pad_to, _project, select_blocks

log = logging.getLogger(__name__)

BLK_Q_HOPPER, BLK_K_HOPPER = 64, 128  # upstream's block map and kernel tiles on sm90
BLK_Q_OTHER, BLK_K_OTHER = 128, 64  # upstream's elsewhere (SLA's geometry)
S_FP8_OFFSET = 8.807  # SageAttention's S_FP8_OFFSET: P = 2^(s - m + 8.807) <= 448
V_FP8_RANGE = 2.25  # SpargeAttn's scale_max for V: |V_fp8| <= 2.25
INT8_MAX = 127.0
SCALE_EPS = 1e-7  # added to every int8 scale (qk_quantize)
LOG2E = math.log2(math.e)
BACKENDS = ("auto", "triton", "torch")
# elements of one gathered K tile batch in the emulation ([B, h, n_q_blocks, blk_k, D]); heads are chunked below it
_EMULATION_CHUNK_ELEMENTS = 1 << 25

_triton_broken = False


def sagesla_geometry(device: torch.device | str) -> tuple[int, int]:
    """(blk_q, blk_k) as upstream picks them for this device: 64x128 on sm90 and on the CPU, 128x64 on other GPUs."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) != (9, 0):
        return BLK_Q_OTHER, BLK_K_OTHER
    return BLK_Q_HOPPER, BLK_K_HOPPER


def _divide(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x / divisor as an IEEE fp32 division on every device (CUDA turns a division by a scalar into a product with
    its reciprocal, which rounds differently from the kernels' `div_rn`)."""
    return x / torch.full_like(x, divisor)


def quantize_int8_per_block(x: torch.Tensor, blk: int, mean: torch.Tensor | None = None):
    """SpargeAttn's `qk_quantize`: ([B, H, L, D] int8, [B, H, ceil(L/blk)] fp32 scales), one scale per block of
    `blk` tokens: scale = max|x| / 127 + 1e-7, x_int8 = trunc(x / scale + 0.5 sign). `mean` [B, H, 1, D] is
    subtracted first in x's dtype (smoothing K)."""
    length = x.shape[-2]
    if mean is not None:
        x = x - mean
    blocks = _pad_to(x.float(), blk).unflatten(-2, (-1, blk))  # [B, H, nb, blk, D], padded rows 0
    scale = _divide(blocks.abs().amax(dim=(-2, -1)), INT8_MAX) + SCALE_EPS
    y = blocks / scale[..., None, None]
    y = y + torch.where(y >= 0, 0.5, -0.5)
    return y.to(torch.int8).flatten(2, 3)[:, :, :length], scale  # float -> int8 truncates toward zero


def quantize_v_fp8(v: torch.Tensor):
    """SpargeAttn's V quantization: ([B, H, L, D] float8_e4m3fn, [B, H, D] fp32 scale = max|v| / 2.25 per channel),
    v_fp8 = e4m3(v * (2.25 / max|v|)) rounded to nearest even."""
    amax = v.abs().amax(dim=-2).float()
    recip = torch.where(amax > 0, torch.full_like(amax, V_FP8_RANGE) / amax, torch.zeros_like(amax))
    return (v.float() * recip[..., None, :]).to(torch.float8_e4m3fn), _divide(amax, V_FP8_RANGE)


def _gather_blocks(blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """blocks [B, H, n_blocks, blk, D], index [B, H, M] -> [B, H, M, blk, D]."""
    blk, d = blocks.shape[-2:]
    return torch.gather(blocks, 2, index[..., None, None].expand(-1, -1, -1, blk, d))


def _sparse_emulated_heads(q, k, v, lut, blk_q: int, blk_k: int) -> torch.Tensor:
    b, h, length, d = q.shape
    q_int8, q_scale = quantize_int8_per_block(q, blk_q)
    k_int8, k_scale = quantize_int8_per_block(k, blk_k, k.mean(dim=-2, keepdim=True))
    v_fp8, v_scale = quantize_v_fp8(v)
    q_blocks = _pad_to(q_int8.double(), blk_q).unflatten(-2, (-1, blk_q))  # [B, H, Mq, blk_q, D]
    k_blocks = _pad_to(k_int8.double(), blk_k).unflatten(-2, (-1, blk_k))  # [B, H, Nk, blk_k, D]
    v_blocks = _pad_to(v_fp8.double(), blk_k).unflatten(-2, (-1, blk_k))
    sm_scale_log2 = torch.tensor(LOG2E / math.sqrt(d), dtype=torch.float32, device=q.device)
    offset = torch.tensor(S_FP8_OFFSET, dtype=torch.float32, device=q.device)
    key_offsets = torch.arange(blk_k, device=q.device)
    lut = torch.sort(lut, dim=-1).values  # ascending, as SpargeAttn's LUT
    row_max = torch.full(q_blocks.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    denominator = torch.zeros(q_blocks.shape[:-1], dtype=torch.float64, device=q.device)
    acc = torch.zeros(q_blocks.shape, dtype=torch.float64, device=q.device)
    for sel in range(lut.shape[-1]):
        index = lut[..., sel]  # [B, H, Mq]
        # int8 x int8 summed over D: |sum| <= 127^2 D, exact in float64 (and in fp32, as the kernel converts it)
        s_int = q_blocks @ _gather_blocks(k_blocks, index).transpose(-1, -2)
        scale = q_scale * torch.gather(k_scale, 2, index) * sm_scale_log2  # fp32, the kernel's order
        s = s_int.float() * scale[..., None, None]
        valid = (index[..., None] * blk_k + key_offsets) < length  # [B, H, Mq, blk_k]
        s = s.masked_fill(~valid[..., None, :], float("-inf"))
        new_max = torch.maximum(row_max, s.amax(dim=-1))
        alpha = torch.exp2(row_max - new_max)
        p = torch.exp2((s - new_max[..., None]) + offset)
        denominator = denominator * alpha.double() + p.double().sum(dim=-1)
        p_fp8 = p.to(torch.float8_e4m3fn).double()
        acc = acc * alpha.double()[..., None] + p_fp8 @ _gather_blocks(v_blocks, index)
        row_max = new_max
    out = acc / denominator[..., None] * v_scale.double()[:, :, None, None, :]
    return out.flatten(2, 3)[:, :, :length].to(q.dtype)


def sparse_emulated(q, k, v, lut, blk_q: int = BLK_Q_HOPPER, blk_k: int = BLK_K_HOPPER) -> torch.Tensor:
    """SageSLA's quantized sparse branch in torch, any device: q, k, v [B, H, L, D], lut [B, H, ceil(L/blk_q), S]
    (sla.select_blocks) -> [B, H, L, D] in q's dtype. Heads are processed in chunks to bound the gathered tiles."""
    b, h, length, d = q.shape
    per_head = b * -(-length // blk_q) * blk_k * d
    chunk = max(1, min(h, _EMULATION_CHUNK_ELEMENTS // max(1, per_head)))
    parts = [
        _sparse_emulated_heads(*(t[:, i : i + chunk] for t in (q, k, v, lut)), blk_q, blk_k) for i in range(0, h, chunk)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def masked_reference(q, k, v, lut, blk_q: int, blk_k: int) -> torch.Tensor:
    """Exact softmax attention (float64, unquantized) of each query over the keys of its selected blocks."""
    length = q.shape[-2]
    q, k, v = q.double(), k.double(), v.double()
    block_mask = torch.zeros(*lut.shape[:3], -(-length // blk_k), dtype=torch.bool, device=q.device)
    block_mask.scatter_(-1, lut, True)
    mask = block_mask.repeat_interleave(blk_q, dim=2)[:, :, :length].repeat_interleave(blk_k, dim=3)[..., :length]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def _kernel_ready() -> bool:
    """Whether the Triton kernel can be tried: Triton imports and no earlier launch failed. Imports the kernel module
    (registering the op) on first use, never at engine import. Not called while torch.compile traces: inductor on
    CUDA needs Triton itself."""
    from .kernels import kernels_ready

    # sagesla_kernel registers torch.ops.turboflow.sagesla
    return not _triton_broken and kernels_ready("sagesla_kernel", "SageSLA uses its torch emulation")


def _kernel_supports(q: torch.Tensor, blk_q: int, blk_k: int) -> bool:
    """Shapes the kernel takes (engine/kernels/sagesla_kernel.check_inputs); others use the emulation quietly."""
    return (
        q.shape[-1] in (64, 128)
        and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and all(blk >= 64 and blk & (blk - 1) == 0 for blk in (blk_q, blk_k))
    )


def _sagesla_triton(q, k, v, lut, proj_weight, proj_bias, blk_q: int, blk_k: int) -> torch.Tensor:
    from .kernels import sagesla

    return sagesla(q, k, v, lut, proj_weight, proj_bias, blk_q, blk_k)


def sagesla_attention(
    q,
    k,
    v,
    *,
    topk: float,
    proj_weight=None,
    proj_bias=None,
    blk_q: int | None = None,
    blk_k: int | None = None,
    backend: str = "auto",
    pooling: str = "input",
) -> torch.Tensor:
    """q, k, v [B, H, L, D] -> [B, H, L, D]: SageSLA's quantized sparse branch + SLA's linear branch through proj_l.

    blk_q, blk_k: the block geometry (None: `sagesla_geometry(q.device)`); backend: "triton" (CUDA kernel),
    "torch" (the emulation, any device) or "auto" (the kernel on CUDA when it builds, else the emulation);
    pooling: the block selection's rounding (sla.POOLING_MODES)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {list(POOLING_MODES)}, got {pooling!r}")
    if blk_q is None or blk_k is None:
        blk_q, blk_k = sagesla_geometry(q.device)
    lut = select_blocks(q, k, topk, blk_q, blk_k, pooling)
    global _triton_broken
    kernel_args = (q, k, v, lut, proj_weight, proj_bias, blk_q, blk_k)
    if backend == "triton":
        return _sagesla_triton(*kernel_args)
    if backend == "auto" and q.is_cuda and _kernel_supports(q, blk_q, blk_k) and not _triton_broken:
        if torch.compiler.is_compiling():  # the custom op composes with torch.compile; a failure surfaces there
            return _sagesla_triton(*kernel_args)
    if backend == "auto" and q.is_cuda and _kernel_supports(q, blk_q, blk_k) and _kernel_ready():
        try:
            return _sagesla_triton(*kernel_args)
        except torch.OutOfMemoryError:
            raise  # the emulation would not fit either; the caller reports it
        except Exception as e:  # e.g. no C compiler for Triton's launcher: stay correct, get (much) slower
            _triton_broken = True
            log.warning("SageSLA Triton kernel unavailable (%s: %s); using the torch emulation", type(e).__name__, e)
    return sparse_emulated(q, k, v, lut, blk_q, blk_k) + _project(_linear_branch(q, k, v), proj_weight, proj_bias)


def sagesla_reference(
    q,
    k,
    v,
    *,
    topk: float,
    proj_weight=None,
    proj_bias=None,
    blk_q: int = BLK_Q_HOPPER,
    blk_k: int = BLK_K_HOPPER,
    pooling: str = "input",
) -> torch.Tensor:
    """The unquantized float64 function SageSLA approximates: SLA with SageSLA's geometry and block choice (selected
    on the inputs as given), exact softmax over the selected blocks, plus the linear branch."""
    lut = select_blocks(q, k, topk, blk_q, blk_k, pooling)
    o_s = masked_reference(q, k, v, lut, blk_q, blk_k)
    w = None if proj_weight is None else proj_weight.double()
    b = None if proj_bias is None else proj_bias.double()
    return o_s + _project(_linear_branch(q.double(), k.double(), v.double()), w, b)
