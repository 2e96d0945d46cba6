"""Quantized DiT linears (engine/linear.py): within tolerance of the float layer, swapped into the pipeline."""

import numpy as np
import pytest
import torch
from conftest import FAST

from turboflow.engine.linear import FP8Linear, Int8Linear, check_supported, quantize_transformer
from turboflow.engine.quant import BlockInt8Linear, dequantize_blockwise, quantize_blockwise

# relative L2 error bounds on random data: e4m3 keeps 3 mantissa bits (~2-4 % per product), int8 ~1 %
TOL = {FP8Linear: 0.06, Int8Linear: 0.015, BlockInt8Linear: 0.01}


def _rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("cls", [FP8Linear, Int8Linear, BlockInt8Linear])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 384), (24, 40), (1536, 130)])  # GEMM path; fallback (K, N not /16)
def test_quantized_layer_within_tolerance(cls, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    lin = torch.nn.Linear(*shape)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))
    x = torch.randn(3, 37, shape[0], generator=g) * 2  # 111 rows: > 16 so _int_mm runs where shapes allow
    ref = lin(x)
    q = cls.from_linear(lin)
    y = q(x.to(dtype))
    assert y.shape == ref.shape and y.dtype == dtype
    assert torch.isfinite(y).all()
    err = _rel(y, ref)
    assert err < TOL[cls], err
    assert err > 0  # it really quantized


def test_fp8_gemm_equals_dequantized_math():
    """The _scaled_mm path computes exactly the product of the quantized operands (fp32 accumulation)."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = FP8Linear.from_linear(lin)
    x = torch.randn(20, 64, generator=g)
    amax = x.abs().amax(1, keepdim=True)
    xq = (x * (448 / amax)).clamp(-448, 448).to(torch.float8_e4m3fn).float() * (amax / 448)
    expect = xq @ q.dequantized_weight().t() + lin.bias
    assert torch.allclose(q(x), expect, rtol=1e-4, atol=1e-4)


def test_int8_w8a8_is_exact_integer_product():
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(32, 24, bias=False)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(40, 32, generator=g)
    s = x.abs().amax(1, keepdim=True) / 127
    xq = torch.round(x / s).clamp(-127, 127)
    expect = (xq @ q.weight_int8.float().t()) * s * q.weight_scale
    assert torch.allclose(q(x), expect, rtol=1e-5, atol=1e-5)


def test_weight_only_int8_reproduces_quant_checkpoint_codes():
    """A -quant.pth layer is stored dequantized (bf16) in the model cache; int8_weight_only re-derives its codes."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(300, 260, generator=g) * 0.02
    q, s = quantize_blockwise(w)
    lin = torch.nn.Linear(260, 300, bias=False)
    with torch.no_grad():
        lin.weight.copy_(dequantize_blockwise(q, s, torch.bfloat16).float())
    layer = BlockInt8Linear.from_linear(lin)
    agree = (layer.int8_weight == q).float().mean().item()
    assert agree > 0.99, agree
    assert (layer.int8_weight.int() - q.int()).abs().max() <= 1


def test_quantize_transformer_swaps_block_linears_only(tiny_t2v_dir):
    from diffusers import WanTransformer3DModel

    net = WanTransformer3DModel.from_pretrained(tiny_t2v_dir / "transformer")
    n_block_linears = sum(isinstance(m, torch.nn.Linear) for m in net.blocks.modules())
    n = quantize_transformer(net, "int8")
    assert n == n_block_linears > 0
    assert not any(isinstance(m, torch.nn.Linear) for m in net.blocks.modules())
    assert isinstance(net.proj_out, torch.nn.Linear)  # outside the blocks: untouched, as upstream
    assert isinstance(net.blocks[0].attn1.to_q, Int8Linear)
    with pytest.raises(ValueError, match="quant_linear"):
        quantize_transformer(net, "int4")
    with pytest.raises(ValueError, match="quant_linear"):
        check_supported("fp4", torch.device("cpu"))


@pytest.mark.parametrize("mode", ["fp8", "int8", "int8_weight_only"])
def test_pipeline_with_quantized_linears(tiny_t2v_dir, t2v_pipeline, mode):
    from turboflow.engine.loading import load_pipeline

    pipe = load_pipeline(tiny_t2v_dir, device="cpu", quant_linear=mode)
    kinds = {type(m).__name__ for m in pipe.transformer.blocks.modules()}
    assert {"FP8Linear", "Int8Linear", "BlockInt8Linear"} & kinds
    req = t2v_pipeline.request("a red fox", seed=5, **FAST)
    out, ref = pipe(req), t2v_pipeline(req)
    assert out.frames.shape == ref.frames.shape
    # random tiny weights: the whole 4-step sample stays close to the float pipeline's
    diff = np.abs(out.frames.astype(np.float64) - ref.frames.astype(np.float64)).mean()
    assert diff < 12, diff
