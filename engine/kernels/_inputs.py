"""What every attention kernel here accepts: the checks shared by SLA's and SageSLA's Triton kernels (each adds its
own block-size rules). Plain torch: importing this module imports no Triton."""

from __future__ import annotations

import torch

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_attention_inputs(q, k, v, lut, proj_weight, proj_bias, blk_q: int) -> None:
    """ValueError naming the first of q, k, v [B, H, L, D], the block table lut [B, H, ceil(L / blk_q), n_sel] and
    proj_l's weight [D, D] / bias [D] that the kernels do not support."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must be [B, H, L, D] of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, length, d = q.shape
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim must be one of {SUPPORTED_HEAD_DIMS}, got {d}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    n_q_blocks = -(-length // blk_q)
    if lut.dim() != 4 or tuple(lut.shape[:3]) != (b, h, n_q_blocks) or lut.shape[3] < 1:
        raise ValueError(f"lut must be [B, H, n_q_blocks={n_q_blocks}, n_sel >= 1], got {tuple(lut.shape)}")
    if proj_weight is None and proj_bias is not None:
        raise ValueError("proj_bias without proj_weight")
    if proj_weight is not None and tuple(proj_weight.shape) != (d, d):
        raise ValueError(f"proj_weight must be [{d}, {d}], got {tuple(proj_weight.shape)}")
    if proj_bias is not None and tuple(proj_bias.shape) != (d,):
        raise ValueError(f"proj_bias must be [{d}], got {tuple(proj_bias.shape)}")
