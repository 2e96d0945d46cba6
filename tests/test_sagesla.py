"""SageSLA (engine/sagesla.py): the quantizers, the torch emulation against exact attention over the same blocks
(inside the proved int8/fp8 error bound), against SLA, its wiring into the DiT processors, and the Triton kernel
run by Triton's CPU interpreter against the emulation."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import FAST

from turboflow.engine import sagesla
from turboflow.engine.sagesla import (
    LOG2E,
    S_FP8_OFFSET,
    V_FP8_RANGE,
    masked_reference,
    quantize_int8_per_block,
    quantize_v_fp8,
    sagesla_attention,
    sagesla_geometry,
    sparse_emulated,
)
from turboflow.engine.sla import SLAProcessor, select_blocks, set_attention, sla_attention

BLK_Q, BLK_K = 64, 128  # Hopper's geometry, the CPU default
E4M3_REL = 2.0**-4  # half the spacing of e4m3 normals relative to the value: 3 mantissa bits
E4M3_SUBNORMAL_ABS = 2.0**-10  # half the subnormal spacing 2^-9


def _qkv(b=1, h=2, length=300, d=64, seed=0, dtype=torch.float32, k_shift=0.5):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g) for _ in range(3))
    # a common offset on K, as real keys have: smoothing removes it before the int8 quantization
    return q.to(dtype), (k + k_shift).to(dtype), v.to(dtype)


def _rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def _block_mask(lut, length, blk_q=BLK_Q, blk_k=BLK_K):
    block = torch.zeros(*lut.shape[:3], -(-length // blk_k), dtype=torch.bool)
    block.scatter_(-1, lut, True)
    return block.repeat_interleave(blk_q, dim=2)[:, :, :length].repeat_interleave(blk_k, dim=3)[..., :length]


# ---- the quantizers --------------------------------------------------------------------------------------------
def test_int8_quantizer_is_spargeattn_per_block_rounding_half_away_from_zero():
    x = torch.randn(1, 2, 300, 64, generator=torch.Generator().manual_seed(3)) * 3
    x_int8, scale = quantize_int8_per_block(x, BLK_Q)
    assert x_int8.dtype == torch.int8 and x_int8.shape == x.shape and scale.shape == (1, 2, 5)
    for blk in range(5):  # the last block has 44 real rows; padding counts as 0
        rows = x[:, :, blk * BLK_Q : (blk + 1) * BLK_Q]
        want_scale = rows.abs().amax(dim=(-2, -1)) / 127 + 1e-7
        assert torch.equal(scale[..., blk], want_scale.float())
        y = (rows / want_scale[..., None, None]).double()
        want = torch.sign(y) * torch.floor(y.abs() + 0.5)  # round half away from zero
        assert torch.equal(x_int8[:, :, blk * BLK_Q : (blk + 1) * BLK_Q].double(), want)
    assert x_int8.abs().max() == 127  # each block's largest element maps to +-127
    dequant = x_int8.float() * scale.repeat_interleave(BLK_Q, dim=-1)[..., :300, None]
    half_step = scale.repeat_interleave(BLK_Q, dim=-1)[..., :300, None] / 2
    assert ((dequant - x).abs() <= half_step * (1 + 1e-6)).all()


def test_k_is_smoothed_by_its_token_mean_in_the_input_dtype_first():
    _, k, _ = _qkv(dtype=torch.bfloat16, k_shift=8.0)
    mean = k.mean(dim=-2, keepdim=True)
    k_int8, k_scale = quantize_int8_per_block(k, BLK_K, mean)
    want_int8, want_scale = quantize_int8_per_block(k - mean, BLK_K)  # bf16 subtraction, then quantized
    assert torch.equal(k_int8, want_int8) and torch.equal(k_scale, want_scale)
    unsmoothed_scale = quantize_int8_per_block(k, BLK_K)[1]
    assert (k_scale < unsmoothed_scale / 2).all()  # the offset no longer eats the int8 range


def test_v_fp8_quantizer_per_channel_round_trip():
    _, _, v = _qkv(length=300)
    v[0, 1, :, 5] = 0.0  # an all-zero channel quantizes to zeros, not NaN
    v_fp8, v_scale = quantize_v_fp8(v)
    assert v_fp8.dtype == torch.float8_e4m3fn and v_scale.shape == (1, 2, 64)
    amax = v.abs().amax(dim=-2)
    assert torch.equal(v_scale, amax / V_FP8_RANGE)
    values = v_fp8.float()
    assert torch.isfinite(values).all() and values.abs().max() == V_FP8_RANGE  # the channel maximum maps to 2.25
    assert (values[0, 1, :, 5] == 0).all()
    scaled = v * (V_FP8_RANGE / amax.clamp_min(1e-30))[..., None, :]
    normal = scaled.abs() >= 2.0**-6  # e4m3's smallest normal; below it the spacing is 2^-9
    err = (values - scaled).abs()
    assert (err[normal] <= E4M3_REL * scaled.abs()[normal] * (1 + 1e-6)).all()
    assert (err[~normal] <= E4M3_SUBNORMAL_ABS * (1 + 1e-6)).all()
    assert torch.equal(values, scaled.to(torch.float8_e4m3fn).float())  # round to nearest even, as the GPU's cvt.rn


# ---- the emulation ---------------------------------------------------------------------------------------------
def _closed_form_sparse(q, k, v, lut, blk_q=BLK_Q, blk_k=BLK_K):
    """The online softmax unrolled: block t of the ascending LUT is exponentiated against the running max m_t after
    it (what the kernel rounds to fp8) and rescaled once by 2^(m_t - m_last)."""
    b, h, length, d = q.shape
    q_int8, q_scale = quantize_int8_per_block(q, blk_q)
    k_int8, k_scale = quantize_int8_per_block(k, blk_k, k.mean(dim=-2, keepdim=True))
    v_fp8, v_scale = quantize_v_fp8(v)
    lut = torch.sort(lut, dim=-1).values
    out = torch.zeros(b, h, length, d, dtype=torch.float64)
    sm = torch.tensor(LOG2E / math.sqrt(d), dtype=torch.float32)
    for bi in range(b):
        for hi in range(h):
            for qb in range(lut.shape[2]):
                rows = slice(qb * blk_q, min(length, (qb + 1) * blk_q))
                scores, values = [], []
                for kb in lut[bi, hi, qb].tolist():
                    cols = slice(kb * blk_k, min(length, (kb + 1) * blk_k))
                    s_int = q_int8[bi, hi, rows].double() @ k_int8[bi, hi, cols].double().T
                    scale = q_scale[bi, hi, qb] * k_scale[bi, hi, kb] * sm
                    scores.append(s_int.float() * scale)
                    values.append(v_fp8[bi, hi, cols].double())
                running = torch.cummax(torch.stack([s.amax(dim=-1) for s in scores]), dim=0).values
                num = torch.zeros(rows.stop - rows.start, d, dtype=torch.float64)
                den = torch.zeros(rows.stop - rows.start, dtype=torch.float64)
                for s, vals, m in zip(scores, values, running):
                    p = torch.exp2((s - m[:, None]) + torch.tensor(S_FP8_OFFSET, dtype=torch.float32))
                    rescale = torch.exp2((m - running[-1]).double())
                    num += (p.to(torch.float8_e4m3fn).double() @ vals) * rescale[:, None]
                    den += p.double().sum(dim=-1) * rescale
                out[bi, hi, rows] = num / den[:, None] * v_scale[bi, hi].double()
    return out


@pytest.mark.parametrize("length,topk", [(300, 0.5), (700, 0.25)])
def test_emulation_rounds_p_against_the_running_max_like_the_kernel(length, topk):
    q, k, v = _qkv(length=length, seed=length)
    # a growing bias makes later key blocks win the row max, so the running max really moves between blocks
    k = k + torch.linspace(0, 3, length)[:, None] * q.mean(dim=-2, keepdim=True).sign()
    lut = select_blocks(q, k, topk, BLK_Q, BLK_K)
    got = sparse_emulated(q, k, v, lut, BLK_Q, BLK_K)
    want = _closed_form_sparse(q, k, v, lut)
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)


def _quantization_bound(q, k, v, lut, blk_q=BLK_Q, blk_k=BLK_K) -> float:
    """The proved bound on |emulated - exact| (module docstring): delta = the largest score error int8 makes on an
    attended (query, key) pair; softmax weights then move by a factor within e^(+-2 delta); V's and P's e4m3
    rounding add 2^-4 relative plus the subnormal terms."""
    length, d = q.shape[-2:]
    q_int8, q_scale = quantize_int8_per_block(q, blk_q)
    mean = k.mean(dim=-2, keepdim=True)
    k_int8, k_scale = quantize_int8_per_block(k, blk_k, mean)
    q_hat = q_int8.double() * q_scale.repeat_interleave(blk_q, dim=-1)[..., :length, None].double()
    k_hat = k_int8.double() * k_scale.repeat_interleave(blk_k, dim=-1)[..., :length, None].double()
    exact = q.double() @ (k.double() - mean.double()).transpose(-1, -2) / math.sqrt(d)
    quantized = q_hat @ k_hat.transpose(-1, -2) / math.sqrt(d)
    delta = (exact - quantized).abs()[_block_mask(lut, length, blk_q, blk_k)].max().item() + 1e-6
    v_fp8, v_scale = quantize_v_fp8(v)
    v_hat_max = (v_fp8.double() * v_scale.double()[..., None, :]).abs().max().item()
    v_max = v.double().abs().max().item()
    n_keys = lut.shape[-1] * blk_k
    return (
        (math.exp(2 * delta) - 1) * v_max
        + E4M3_REL * v_max
        + E4M3_SUBNORMAL_ABS * v_scale.max().item()
        + (E4M3_REL + n_keys * E4M3_SUBNORMAL_ABS / 2.0**S_FP8_OFFSET) * v_hat_max
        + 1e-5 * v_max  # fp32 scores and exponentials
    )


@pytest.mark.parametrize(
    "length,d,topk,dtype",
    [
        (300, 64, 0.5, torch.float32),
        (1000, 128, 0.1, torch.float32),
        (500, 16, 1.0, torch.float32),
        (700, 64, 0.3, torch.bfloat16),
    ],
)
def test_emulation_is_exact_attention_over_the_same_blocks_within_the_quantization_bound(length, d, topk, dtype):
    q, k, v = _qkv(length=length, d=d, seed=length + d, dtype=dtype)
    lut = select_blocks(q, k, topk, BLK_Q, BLK_K)
    got = sparse_emulated(q, k, v, lut, BLK_Q, BLK_K)
    want = masked_reference(q, k, v, lut, BLK_Q, BLK_K)
    assert got.dtype == dtype
    error = (got.double() - want).abs().max().item()
    bound = _quantization_bound(q, k, v, lut)
    assert error <= bound, (error, bound)
    # the bound is a worst case (every rounding at its extreme, all in one direction); the typical error is e4m3's
    # relative rounding of V (~2^-4 / sqrt(3) RMS on Gaussian values) plus a little from int8 and P
    assert _rel_rms(got, want) < 0.05


def test_sagesla_against_sla_on_the_same_inputs():
    q, k, v = _qkv(length=800, d=64, seed=8)
    g = torch.Generator().manual_seed(9)
    w, b = torch.randn(64, 64, generator=g) * 0.1, torch.randn(64, generator=g) * 0.1
    sage = sagesla_attention(q, k, v, topk=0.25, proj_weight=w, proj_bias=b, backend="torch")
    # SLA with SageSLA's geometry selects the same blocks: the difference is the quantization alone
    sla_same_blocks = sla_attention(q, k, v, topk=0.25, proj_weight=w, proj_bias=b, blk_q=BLK_Q, blk_k=BLK_K)
    assert _rel_rms(sage, sla_same_blocks) < 0.05
    # SLA's own 128x64 geometry picks other blocks; with every block kept both are dense attention + linear
    dense_sage = sagesla_attention(q, k, v, topk=1.0, proj_weight=w, proj_bias=b, backend="torch")
    dense_sla = sla_attention(q, k, v, topk=1.0, proj_weight=w, proj_bias=b)
    assert _rel_rms(dense_sage, dense_sla) < 0.05
    assert not torch.allclose(sage, sla_same_blocks, atol=1e-3)  # quantized: never bit-equal to SLA


def test_selection_geometry_linear_branch_and_proj_l_are_slas():
    assert sagesla_geometry("cpu") == (64, 128)  # Hopper's, the deployment GPU
    q, k, v = _qkv(length=400, d=32, seed=4)
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(32, 32, generator=g) * 0.2, torch.randn(32, generator=g) * 0.1
    with_proj = sagesla_attention(q, k, v, topk=0.4, proj_weight=w, proj_bias=b, backend="torch")
    without = sagesla_attention(q, k, v, topk=0.4, backend="torch")
    lut = select_blocks(q, k, 0.4, BLK_Q, BLK_K)
    assert torch.equal(without, sparse_emulated(q, k, v, lut, BLK_Q, BLK_K))  # proj_l None: no linear branch
    linear_only = sla_attention(q, k, v, topk=1.0, proj_weight=w, proj_bias=b) - sla_attention(q, k, v, topk=1.0)
    assert torch.allclose(with_proj - without, linear_only, atol=1e-5)


def test_heads_are_independent_so_a_head_split_gives_the_same_output():
    q, k, v = _qkv(h=4, length=300, d=32, seed=6)
    full = sagesla_attention(q, k, v, topk=0.5, backend="torch")
    part = sagesla_attention(q[:, 1:3], k[:, 1:3], v[:, 1:3], topk=0.5, backend="torch")
    assert torch.equal(full[:, 1:3], part)  # Ulysses hands each rank whole heads (engine/parallel.py)


def test_bad_arguments_are_refused():
    q, k, v = _qkv(length=128, d=32)
    with pytest.raises(ValueError, match="backend"):
        sagesla_attention(q, k, v, topk=0.5, backend="cuda")
    with pytest.raises(ValueError, match="pooling"):
        sagesla_attention(q, k, v, topk=0.5, pooling="fp16")
    with pytest.raises(ValueError, match="kind"):
        SLAProcessor(0.1, kind="flash")


# ---- wiring ----------------------------------------------------------------------------------------------------
def test_set_attention_installs_the_sagesla_kind_with_proj_l():
    from diffusers import WanTransformer3DModel

    from turboflow.engine.families.wan import TINY_TRANSFORMER

    # a DiT of its own: the session pipeline tracks which processors its DiT holds
    torch.manual_seed(0)
    net = WanTransformer3DModel(in_channels=16, **TINY_TRANSFORMER).eval()
    d = TINY_TRANSFORMER["attention_head_dim"]
    proj_l = {"blocks.1.proj_l.weight": torch.eye(d), "blocks.1.proj_l.bias": torch.zeros(d)}
    set_attention(net, "sagesla", topk=0.2, proj_l=proj_l)
    processors = [b.attn1.processor for b in net.blocks]
    assert [(p.kind, p.topk) for p in processors] == [("sagesla", 0.2)] * len(processors)
    assert processors[0].proj_weight is None and torch.equal(processors[1].proj_weight, torch.eye(d))
    with pytest.raises(ValueError, match="attention must be one of"):
        set_attention(net, "flash9")


def test_pipeline_runs_sagesla_per_request(t2v_pipeline):
    quantized = t2v_pipeline(t2v_pipeline.request("a fox", seed=4, attention="sagesla", sla_topk=0.3, **FAST))
    assert {b.attn1.processor.kind for b in t2v_pipeline.transformer.blocks} == {"sagesla"}
    sparse = t2v_pipeline(t2v_pipeline.request("a fox", seed=4, attention="sla", sla_topk=0.3, **FAST))
    assert {b.attn1.processor.kind for b in t2v_pipeline.transformer.blocks} == {"sla"}  # swapped per request
    assert quantized.frames.shape == sparse.frames.shape
    assert not np.array_equal(quantized.frames, sparse.frames)


# ---- the Triton kernel in the interpreter ----------------------------------------------------------------------
_INTERPRETER_CHECK = textwrap.dedent(
    """
    import json, sys
    import torch
    import triton
    import triton.language as tl

    from turboflow.engine import sagesla
    from turboflow.engine.kernels import sagesla_kernel as kernel
    from turboflow.engine.sla import _linear_branch, _project, select_blocks

    out = {"triton": triton.__version__, "cases": []}
    for length, d, topk, dtype, blk_q, blk_k in [(300, 64, 0.5, torch.float32, 64, 128),
                                                 (300, 64, 0.5, torch.bfloat16, 64, 128),
                                                 (130, 128, 1.0, torch.float32, 64, 128),
                                                 (200, 64, 0.5, torch.float32, 128, 64)]:  # other GPUs' geometry
        g = torch.Generator().manual_seed(length + d)
        # [B, L, H, D] tensors seen as [B, H, L, D], as SLAProcessor passes them: the kernels take any strides
        q, k, v = (torch.randn(1, length, 2, d, generator=g).to(dtype).transpose(1, 2) for _ in range(3))
        k = (k + 0.5).transpose(1, 2).contiguous().transpose(1, 2)
        lut = select_blocks(q, k, topk, blk_q, blk_k)
        got = torch.ops.turboflow.sagesla(q, k, v, lut, None, None, blk_q, blk_k)
        want = sagesla.sparse_emulated(q, k, v, lut, blk_q, blk_k)
        # with proj_l (fp32 inputs only: the interpreter's "tf32" dots, which sparse_attention.linear_state uses for
        # bf16, return garbage): the linear branch fused into the kernel's store against sla's torch linear branch
        fused_err = None
        if dtype == torch.float32:
            w = torch.randn(d, d, generator=g) * 0.1
            b = torch.randn(d, generator=g) * 0.1
            fused = torch.ops.turboflow.sagesla(q, k, v, lut, w, b, blk_q, blk_k)
            linear = _project(_linear_branch(q, k, v), w, b)
            fused_err = (fused.double() - (want.double() + linear.double())).abs().max().item()
        q_int8, q_scale, k_int8, k_scale = kernel.quantize_qk(q, k, blk_q, blk_k)
        want_q, want_qs = sagesla.quantize_int8_per_block(q, blk_q)
        want_k, want_ks = sagesla.quantize_int8_per_block(k, blk_k, k.mean(dim=-2, keepdim=True))
        v_fp8_t, v_scale = kernel.quantize_v(v, blk_k)
        want_v, want_vs = sagesla.quantize_v_fp8(v)
        v_back = v_fp8_t.view(1, 2, d, -1).transpose(-1, -2)
        out["cases"].append({
            "case": [length, d, topk, str(dtype), blk_q, blk_k],
            "dtype_ok": got.dtype == dtype and got.shape == q.shape and got.stride() == q.stride(),
            "max_abs_err": (got.double() - want.double()).abs().max().item(),
            "fused_linear_max_abs_err": fused_err,
            "max_abs": want.double().abs().max().item(),
            "q_int8_equal": torch.equal(q_int8.view_as(want_q), want_q)
            and torch.equal(q_scale.view_as(want_qs), want_qs),
            "k_int8_equal": torch.equal(k_int8.view_as(want_k), want_k)
            and torch.equal(k_scale.view_as(want_ks), want_ks),
            "v_fp8_equal": torch.equal(v_back[:, :, :length].float(), want_v.float())
            and torch.equal(v_scale.view_as(want_vs), want_vs) and bool((v_back[:, :, length:].float() == 0).all()),
        })

    @triton.jit
    def _round(X, OUT, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(OUT + offs, kernel._round_to_e4m3(tl.load(X + offs)))

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[torch.isfinite(codes)]
    positive = torch.sort(codes[codes >= 0]).values
    ties = (positive[1:] + positive[:-1]) / 2
    x = torch.cat([codes, ties, -ties, torch.nextafter(ties, torch.zeros_like(ties)),
                   torch.nextafter(ties, torch.full_like(ties, 1e9)), torch.rand(2000) * 460,
                   torch.rand(500) * 0.02, torch.tensor([0.0, 448.0, 449.0, 463.9, 1e-12])])
    n = 1 << (len(x) - 1).bit_length()
    x = torch.cat([x, torch.zeros(n - len(x))])
    rounded = torch.empty(n)
    _round[(1,)](x, rounded, n)
    out["e4m3_mismatches"] = int((rounded != x.clamp(-448, 448).to(torch.float8_e4m3fn).float()).sum())
    json.dump(out, sys.stdout)
    """
)


def test_triton_kernel_in_the_interpreter_matches_the_emulation():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the dev extra adds it)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # before triton is imported: in a child process, never here
    run = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert len(result["cases"]) == 4
    for case in result["cases"]:
        assert case["dtype_ok"] and case["q_int8_equal"] and case["k_int8_equal"] and case["v_fp8_equal"], case
        # same int8/fp8 values, same fp32 scores and P (so the same fp8 rounding); only the fp32 sums of the dots
        # and the output rounding differ: 1e-6 of the output in fp32; in bf16 a value near a rounding midpoint may
        # land on the other side, one ulp (<= 2^-7 of the value: 7 mantissa bits) away
        tolerance = 2.0**-7 if "bfloat16" in case["case"][3] else 1e-6
        assert case["max_abs_err"] <= tolerance * max(1.0, case["max_abs"]), case
        if case["fused_linear_max_abs_err"] is not None:  # fp32: the linear products are IEEE fp32 here too
            assert case["fused_linear_max_abs_err"] <= 1e-5 * max(1.0, case["max_abs"]), case
    assert sum(case["fused_linear_max_abs_err"] is not None for case in result["cases"]) == 3
    assert result["e4m3_mismatches"] == 0
    # not checkable here: the op's fake (FakeTensorMode) run. torch's wrap_triton passes interpreted kernels through
    # unwrapped, so under the interpreter they would launch on fake tensors; bench/sagesla.py compiles the op on CUDA


def test_engine_import_does_not_import_triton():
    code = "import sys, turboflow.engine.sagesla, turboflow.engine.sla; print('triton' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"


def test_module_constants_are_upstreams():
    assert (sagesla.BLK_Q_HOPPER, sagesla.BLK_K_HOPPER) == (64, 128)
    assert 447 < 2**S_FP8_OFFSET < 448  # P's largest value fills e4m3's range without saturating
    assert V_FP8_RANGE == 2.25
