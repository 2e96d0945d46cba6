"""Triton kernels for the engine, loaded on first use: importing this package imports no Triton (engine cold start).

triton_available()  -> whether Triton imports here (a kernel may still fail to build: no C compiler, old GPU)
sla_sparse_linear(q, k, v, lut, proj_weight, proj_bias, blk_q, blk_k) -> SLA's sparse + projected linear branch
    (the torch custom op `torch.ops.turboflow.sla_sparse_linear`; engine/kernels/sparse_attention.py)
sagesla(q, k, v, lut, proj_weight, proj_bias, blk_q, blk_k) -> SageSLA: int8 Q.K^T / fp8 P.V sparse branch + projected
    linear branch (the torch custom op `torch.ops.turboflow.sagesla`; engine/kernels/sagesla_kernel.py)
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

import torch

log = logging.getLogger(__name__)
_unimportable: set[str] = set()  # kernel modules whose import failed once: not tried again in this process


def triton_available() -> bool:
    """True when the `triton` package is installed (found without importing it)."""
    return importlib.util.find_spec("triton") is not None


def kernels_ready(module: str, fallback: str) -> bool:
    """Import engine/kernels/<module> (Triton, and the torch op it registers) on first use, never at engine import;
    False when it cannot be imported (Triton not installed, or an installation that does not import), said once in a
    warning naming the `fallback` the caller takes, and not tried again."""
    if module in _unimportable:
        return False
    try:
        importlib.import_module(f"{__name__}.{module}")
    except Exception as e:
        _unimportable.add(module)
        log.warning("Triton unavailable (%s: %s); %s", type(e).__name__, e, fallback)
        return False
    return True


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
    """q, k, v [B, H, L, D] (D 64 or 128; bf16, fp16 or fp32), lut [B, H, ceil(L/blk_q), n_sel] -> [B, H, L, D]."""
    from . import sparse_attention  # imports Triton and registers the op

    return sparse_attention.sla_sparse_linear(q, k, v, lut, proj_weight, proj_bias, blk_q, blk_k)


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
    """q, k, v [B, H, L, D] (D 64 or 128), lut [B, H, ceil(L/blk_q), n_sel] -> SageSLA [B, H, L, D]."""
    from . import sagesla_kernel  # imports Triton and registers the op

    return sagesla_kernel.sagesla(q, k, v, lut, proj_weight, proj_bias, blk_q, blk_k)
