"""Quantized Linear layers for the DiT (`load_pipeline(..., quant_linear=...)`), pure PyTorch (no torchao needed).

Modes (every nn.Linear inside the transformer's `blocks`, as TurboDiffusion quantizes them; SLA's proj_l is not a
module of the diffusers model and stays fp32):

* ``"fp8"``   W8A8 in float8 e4m3: weights per output row (scale = amax/448), activations per token, dynamically;
  one `torch._scaled_mm` with row-wise scales and the bias fused into the GEMM epilogue. Needs SM89+ on CUDA
  (H100/Ada); also runs on CPU (slowly), which the tests use.
* ``"int8"``  W8A8 in int8: weights per output row, activations per token (symmetric, amax/127), `torch._int_mm`
  (int32 accumulation) and a rescale. On Hopper the fp8 path is the faster one (the int32 result makes an extra
  pass over the output that fp8's epilogue avoids); int8 is for memory and for GPUs without fp8.
* ``"int8_weight_only"``  TurboDiffusion's `-quant.pth` format itself (int8 with 128x128 block-wise fp32 scales,
  `engine.quant.BlockInt8Linear`): half the weight memory, the same numbers as the dequantized weights, no speed-up.

A checkpoint imported from a `-quant.pth` is stored dequantized in the model cache (w = q * scale, exact in fp32,
then bf16); ``"int8_weight_only"`` re-derives the int8 tiles from it (the same codes except where bf16 rounding moved
a value across a rounding boundary), the W8A8 modes re-quantize per row. Imported with `--keep-int8`, the file's
int8 tiles load straight into `BlockInt8Linear` (no re-derivation); the W8A8 modes re-quantize those too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from turboflow.errors import ConfigError

from .quant import BlockInt8Linear
from .request import QUANT_LINEAR_MODES

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
INT8_MAX = 127.0
MODES = QUANT_LINEAR_MODES


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _quant_fp8(x2: torch.Tensor):
    amax = x2.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
    inv = FP8_MAX / amax  # [M, 1]
    return (x2.float() * inv).clamp(-FP8_MAX, FP8_MAX).to(FP8), 1.0 / inv


def _quant_int8(x2: torch.Tensor):
    x_scale = x2.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / INT8_MAX  # [M, 1]
    return torch.round(x2.float() / x_scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), x_scale


def _rescale_int8(acc: torch.Tensor, x_scale, w_scale, bias, dtype):
    y = acc.float() * (x_scale * w_scale)
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


_FUSED: dict = {}


def _fused(fn, x: torch.Tensor):
    """On CUDA outside a compiled region, the per-token quantization / rescale as one fused kernel (a small
    torch.compile'd function, dynamic in the token count); eager elsewhere (CPU, or already being compiled)."""
    if not x.is_cuda or torch.compiler.is_compiling():
        return fn
    if fn not in _FUSED:
        _FUSED[fn] = torch.compile(fn, dynamic=True)
    return _FUSED[fn]


class FP8Linear(torch.nn.Module):
    """y = x W^T + b with W and x in float8 e4m3 (row-wise scales), accumulation in fp32, output in x's dtype."""

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).to(torch.float32))  # [1, out]
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> FP8Linear:
        w = linear.weight.detach().float()
        amax = w.abs().amax(dim=1).clamp_min(1e-12)
        scale = amax / FP8_MAX
        q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale, bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_fp8.float() * self.weight_scale.reshape(-1, 1)

    def _gemm_ok(self, x2: torch.Tensor) -> bool:
        return self.in_features % 16 == 0 and self.out_features % 16 == 0 and x2.shape[0] > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = _rows_2d(x)
        xq, x_scale = _fused(_quant_fp8, x2)(x2)
        bias = None if self.bias is None else self.bias.to(dtype)
        out_dtype = dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        if self._gemm_ok(x2):
            y = torch._scaled_mm(
                xq,
                self.weight_fp8.t(),
                scale_a=x_scale,
                scale_b=self.weight_scale,
                bias=bias if out_dtype != torch.float32 else None,
                out_dtype=out_dtype,
            )
            if bias is not None and out_dtype == torch.float32:
                y = y + bias
        else:  # shapes cuBLASLt's fp8 GEMM does not take: same quantized operands, dequantized matmul
            y = F.linear(xq.float() * x_scale, self.dequantized_weight(), None if bias is None else bias.float())
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 row-wise"


class Int8Linear(torch.nn.Module):
    """W8A8 int8: y = (q_x q_W^T) * s_x * s_W + b, int32 accumulation (torch._int_mm)."""

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).to(torch.float32))  # [1, out]
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / INT8_MAX
        q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale, bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale.reshape(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = _rows_2d(x)
        xq, x_scale = _fused(_quant_int8, x2)(x2)
        m = x2.shape[0]
        if m > 16 and self.in_features % 8 == 0 and self.out_features % 8 == 0:
            acc = torch._int_mm(xq, self.weight_int8.t())
        else:  # _int_mm's CUDA kernel needs M > 16 and K, N multiples of 8; exact in fp32 for these sizes
            acc = xq.float() @ self.weight_int8.float().t()
        y = _fused(_rescale_int8, acc)(acc, x_scale, self.weight_scale, self.bias, dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 W8A8 row-wise"


_FACTORY = {
    "fp8": FP8Linear.from_linear,
    "int8": Int8Linear.from_linear,
    "int8_weight_only": BlockInt8Linear.from_linear,
}


def quantize_transformer(
    transformer: torch.nn.Module, mode: str, *, under: str = "blocks", skip: tuple[str, ...] = ("proj_l",)
) -> int:
    """Swap every nn.Linear under `transformer.<under>` for the `mode` layer, in place; returns how many.

    The bf16 weight of each layer is freed as soon as its replacement exists, so the peak is one layer's copy."""
    if mode not in _FACTORY:
        raise ConfigError(f"quant_linear must be one of {MODES} or None, got {mode!r}", field="quant_linear")
    root = transformer.get_submodule(under) if under else transformer
    # layers a `--keep-int8` cache loaded as BlockInt8Linear are re-quantized too (from their dequantized weight)
    kinds = torch.nn.Linear if mode == "int8_weight_only" else (torch.nn.Linear, BlockInt8Linear)
    names = [n for n, m in root.named_modules() if isinstance(m, kinds) and not any(s in n for s in skip)]
    make = _FACTORY[mode]
    for name in names:  # names, not modules: no list keeps the replaced layers' tensors alive
        old = root.get_submodule(name)
        with torch.no_grad():
            root.set_submodule(name, make(old))
        # drop the old tensors now (the caller may still hold the old module)
        if isinstance(old, torch.nn.Linear):
            old.weight = None
        else:
            old._buffers.clear()
    return len(names)


def check_supported(mode: str | None, device: torch.device) -> None:
    """Raise a clear error when `mode` cannot run fast on `device` (fp8 needs compute capability 8.9+)."""
    if mode is None:
        return
    if mode not in MODES:
        raise ConfigError(f"quant_linear must be one of {MODES} or None, got {mode!r}", field="quant_linear")
    if mode == "fp8" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ConfigError(
                f"quant_linear='fp8' needs an fp8 GPU (compute capability 8.9+, e.g. Ada or H100); "
                f"this one is {major}.{minor}: use 'int8' or 'int8_weight_only'"
            )
