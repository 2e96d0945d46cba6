"""TurboDiffusion `-quant.pth` weights: int8 with 128x128 block-wise fp32 scales.

Format (read from upstream `turbodiffusion/ops/core.py` `Int8Linear` and `ops/quant/quant.hpp`, not copied):
every `nn.Linear` inside `blocks` except SLA's `proj_l` is stored as

    <name>.int8_weight  int8  [out, in]
    <name>.scale        fp32  [ceil(out/128), ceil(in/128)]
    <name>.bias         bf16  [out]            (when the layer has a bias)

Per 128x128 tile: amax = max(|w|) over the tile's in-bounds elements (at least 1e-8), q = round-half-even(w * 128/amax)
saturated to [-128, 127], scale = amax/128. Edge tiles are simply smaller (out-of-bounds elements never contribute).
The upstream GEMM multiplies the int32 accumulator by scale_x * scale_w, so the weight the network computes with is
exactly `q * scale` -- dequantization multiplies, tile by tile.

This module provides the exact dequantization (required: the default runtime path), the block quantizer and an
optional weight-only int8 module (`BlockInt8Linear`) that keeps int8 storage and dequantizes per forward. The W8A8 /
FP8 linears are in engine/linear.py; tests/native_export.py builds `-quant` style files with the quantizer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from turboflow.errors import CheckpointError

BLOCK = 128
INT8_SUFFIX = ".int8_weight"
SCALE_SUFFIX = ".scale"
INT8_STORAGE = "int8-block128"  # manifest/source tag of a cache that stores `-quant` layers as int8


def scale_shape(out_features: int, in_features: int, block: int = BLOCK) -> tuple[int, int]:
    return math.ceil(out_features / block), math.ceil(in_features / block)


def quantize_blockwise(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (int8 [out, in], fp32 scale [ceil(out/block), ceil(in/block)])."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D Linear weight, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    rb, cb = scale_shape(out_f, in_f, block)
    w = weight.detach().to(torch.float32)
    padded = F.pad(w, (0, cb * block - in_f, 0, rb * block - out_f))  # zeros never raise a tile's amax
    tiles = padded.view(rb, block, cb, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-8)  # [rb, cb]
    factor = (128.0 / amax)[:, None, :, None]
    q = torch.round(tiles * factor).clamp_(-128, 127).to(torch.int8)
    q = q.view(rb * block, cb * block)[:out_f, :in_f].contiguous()
    return q, (amax / 128.0).to(torch.float32)


def dequantize_blockwise(
    int8_weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16, block: int = BLOCK
) -> torch.Tensor:
    """Exact inverse of the storage format: w = q * scale[tile] (computed in fp32, then cast to `dtype`)."""
    if int8_weight.dtype != torch.int8 or int8_weight.ndim != 2:
        raise CheckpointError(
            f"int8_weight must be a 2-D int8 tensor, got {int8_weight.dtype} {tuple(int8_weight.shape)}"
        )
    expected = scale_shape(*int8_weight.shape, block)
    if tuple(scale.shape) != expected:
        raise CheckpointError(
            f"scale has shape {tuple(scale.shape)}, expected {expected} for an int8 weight of "
            f"shape {tuple(int8_weight.shape)} with {block}x{block} blocks"
        )
    out_f, in_f = int8_weight.shape
    full = scale.to(torch.float32).repeat_interleave(block, 0).repeat_interleave(block, 1)[:out_f, :in_f]
    return (int8_weight.to(torch.float32) * full).to(dtype)


def is_quantized(state_dict: dict) -> bool:
    return any(k.endswith(INT8_SUFFIX) for k in state_dict)


def dequantize_state_dict(
    state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Replace every `X.int8_weight` + `X.scale` pair by `X.weight` (dtype); other tensors pass through.

    A lone int8_weight or scale, or a layer that also carries a float `weight`, raises CheckpointError.
    """
    out: dict[str, torch.Tensor] = {}
    prefixes = {k[: -len(INT8_SUFFIX)] for k in state_dict if k.endswith(INT8_SUFFIX)}
    orphans = sorted(
        k
        for k in state_dict
        if k.endswith(SCALE_SUFFIX)
        and k[: -len(SCALE_SUFFIX)] not in prefixes
        and state_dict[k].dtype == torch.float32
        and state_dict[k].ndim == 2
    )
    problems = []
    for p in sorted(prefixes):
        if p + SCALE_SUFFIX not in state_dict:
            problems.append(f"{p}{INT8_SUFFIX} has no {p}{SCALE_SUFFIX}")
        if p + ".weight" in state_dict:
            problems.append(f"{p} has both a float weight and an int8_weight")
    problems += [f"{k} has no matching int8_weight" for k in orphans]
    if problems:
        raise CheckpointError(f"malformed int8 checkpoint ({len(problems)} problems): {problems[:5]}")
    for k, v in state_dict.items():
        if k.endswith(INT8_SUFFIX):
            p = k[: -len(INT8_SUFFIX)]
            out[p + ".weight"] = dequantize_blockwise(v, state_dict[p + SCALE_SUFFIX], dtype)
        elif k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] in prefixes:
            continue
        else:
            out[k] = v
    return out


class BlockInt8Linear(torch.nn.Module):
    """Optional weight-only int8 Linear: int8 storage (half of bf16), dequantized per call.

    Numerically identical to running the dequantized bf16/fp32 weight; it saves memory, not time.
    """

    def __init__(self, int8_weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = int8_weight.shape
        self.register_buffer("int8_weight", int8_weight)
        self.register_buffer("scale", scale.to(torch.float32))
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> BlockInt8Linear:
        q, s = quantize_blockwise(linear.weight)
        return cls(q, s, None if linear.bias is None else linear.bias.detach().clone())

    @classmethod
    def placeholder(cls, out_features: int, in_features: int, bias: bool) -> BlockInt8Linear:
        """Shapes only (meta tensors), for a loader that assigns the stored tensors afterwards."""
        meta = torch.device("meta")
        return cls(
            torch.empty(out_features, in_features, dtype=torch.int8, device=meta),
            torch.empty(*scale_shape(out_features, in_features), device=meta),
            torch.empty(out_features, device=meta) if bias else None,
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (what the layer computes with), e.g. for re-quantizing to FP8/W8A8."""
        dtype = self.bias.dtype if self.bias is not None else torch.bfloat16
        return dequantize_blockwise(self.int8_weight, self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_blockwise(self.int8_weight, self.scale, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def use_stored_int8(model: torch.nn.Module, keys) -> int:
    """Before loading a cache stored with int8 layers: swap each nn.Linear whose `<name>.int8_weight` is among
    `keys` for a BlockInt8Linear placeholder, so the stored int8 tensors and scales load as they are."""
    layers = [k[: -len(INT8_SUFFIX)] for k in keys if k.endswith(INT8_SUFFIX)]
    for name in layers:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, torch.nn.Linear):
            raise CheckpointError(f"{name}{INT8_SUFFIX}: {name} is not a Linear layer of this model")
        model.set_submodule(name, BlockInt8Linear.placeholder(lin.out_features, lin.in_features, lin.bias is not None))
    return len(layers)
