"""SageSLA on the GPU (engine/sagesla.py, engine/kernels/sagesla_kernel.py): correctness of the Triton kernel against
the torch emulation and the float64 reference at 4000 tokens, the op's time and its parts at Wan2.1-1.3B 480p 81
frames (1 x 12 heads x 32,760 tokens x 128, bf16, top-k 0.1) against SLA and dense SDPA, a small launch-config sweep,
and a whole 1.3B DiT forward with SLA vs SageSLA (random weights).

    python -m bench.sagesla --out $OUT      (GPU, ~1-2 minutes; JSON in $OUT/sagesla.json and a printed table)

Every part runs in its own try/except: a failure is recorded in the JSON (with its traceback printed) and the
other parts still run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import torch
import torch.nn.functional as F

from . import _ROOT  # noqa: F401  (turboflow namespace on a bare tree)
from .timing import cuda_median_seconds

TOKENS_480P = 32760  # 21 latent frames x 30 x 52 patches
HEADS_1_3B, HEAD_DIM = 12, 128
TOPK = 0.1


def _time(fn, reps: int = 10) -> float:
    return cuda_median_seconds(fn, reps=reps, warmup=2)


def _graph_time(fn, reps: int = 20) -> float:
    """Median GPU seconds of one `fn()` replayed from a CUDA graph: the kernels alone, without the Python and launch
    overhead that an isolated eager call exposes (inside the DiT the GPU runs ahead of the CPU and hides it)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_median_seconds(graph.replay, reps=reps, warmup=2)


def _part(res: dict, name: str, fn) -> None:
    """Run one part; record its failure instead of stopping the bench."""
    start = time.perf_counter()
    try:
        fn()
    except Exception as e:
        traceback.print_exc()
        res[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:400]}"
    res[f"{name}_wall_s"] = round(time.perf_counter() - start, 2)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def _max_abs(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).abs().max())


def correctness(res: dict) -> None:
    """4000 tokens x 4 heads: kernel vs emulation (same int8/fp8 values), vs float64 exact attention over the same
    blocks, vs SLA; the GPU's fp8 cast against the software rounding; the bf16-dot fallback against fp8 dots."""
    from turboflow.engine import sagesla
    from turboflow.engine.kernels import sagesla_kernel as kernel
    from turboflow.engine.sla import _linear_branch, _project, select_blocks, sla_attention

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, 4, 4000, HEAD_DIM, device=dev, generator=g) for _ in range(3))
    k = k + 0.5  # keys share an offset in real models; smoothing takes it out
    w = torch.randn(HEAD_DIM, HEAD_DIM, device=dev, generator=g) * 0.05
    qb, kb, vb = (t.to(bf16) for t in (q, k, v))
    blk_q, blk_k = sagesla.sagesla_geometry(dev)
    res["geometry"] = [blk_q, blk_k]
    lut = select_blocks(qb, kb, TOPK, blk_q, blk_k)

    got = kernel.sagesla_forward(qb, kb, vb, lut, None, None, blk_q, blk_k)
    emulated = sagesla.sparse_emulated(qb, kb, vb, lut, blk_q, blk_k)
    exact = sagesla.masked_reference(qb, kb, vb, lut, blk_q, blk_k)  # float64 on the bf16 values
    res["kernel_vs_emulation_max_abs"] = _max_abs(got, emulated)
    res["kernel_vs_emulation_rel"] = _rel(got, emulated)
    res["kernel_vs_emulation_mismatch_frac"] = float((got != emulated).float().mean())
    res["sparse_kernel_vs_fp64_rel"] = _rel(got, exact)
    res["sparse_emulation_vs_fp64_rel"] = _rel(emulated, exact)
    res["sparse_output_max_abs"] = float(exact.abs().max())

    x = kernel.quantize(qb, kb, vb, blk_q, blk_k)
    q_int8, q_scale = sagesla.quantize_int8_per_block(qb, blk_q)
    k_int8, k_scale = sagesla.quantize_int8_per_block(kb, blk_k, kb.mean(dim=-2, keepdim=True))
    v_fp8, v_scale = sagesla.quantize_v_fp8(vb)
    res["quantized_q_equal"] = torch.equal(x.q_int8.view_as(q_int8), q_int8) and torch.equal(
        x.q_scale.view_as(q_scale), q_scale
    )
    res["quantized_k_equal"] = torch.equal(x.k_int8.view_as(k_int8), k_int8) and torch.equal(
        x.k_scale.view_as(k_scale), k_scale
    )
    v_back = x.v_fp8_t.view(1, 4, HEAD_DIM, -1).transpose(-1, -2)[:, :, :4000]
    res["quantized_v_equal"] = torch.equal(v_back.float(), v_fp8.float()) and torch.equal(
        x.v_scale.view_as(v_scale), v_scale
    )
    software = kernel.sagesla_forward(qb, kb, vb, lut, None, None, blk_q, blk_k, software_rounding=True)
    res["hw_fp8_cast_vs_software_rounding_max_abs"] = _max_abs(got, software)  # 0: the GPU's cvt is RNE too
    bf16_dots = kernel.sagesla_forward(qb, kb, vb, lut, None, None, blk_q, blk_k, fp8_dot=False)
    res["bf16_dot_fallback_vs_fp8_dot_max_abs"] = _max_abs(got, bf16_dots)

    # the whole op (sparse + proj_l(linear)) against float64 SLA math over the same blocks, and against SLA
    whole = sagesla.sagesla_attention(qb, kb, vb, topk=TOPK, proj_weight=w, backend="triton")
    linear = _project(_linear_branch(qb.double(), kb.double(), vb.double()), w.double(), None)
    res["op_vs_fp64_rel"] = _rel(whole, exact + linear)
    sla_same_blocks = sla_attention(qb, kb, vb, topk=TOPK, proj_weight=w, blk_q=blk_q, blk_k=blk_k, backend="gather")
    res["op_vs_sla_same_geometry_rel"] = _rel(whole, sla_same_blocks)
    sla_default = sla_attention(qb, kb, vb, topk=TOPK, proj_weight=w)  # SLA's 128x64 blocks: other blocks chosen
    res["op_vs_sla_default_geometry_rel"] = _rel(whole, sla_default)
    res["sla_vs_fp64_same_blocks_rel"] = _rel(sla_same_blocks, exact + linear)


def op_times(res: dict) -> None:
    """The attention op at 1.3B 480p 81 frames, its parts and a launch-config sweep."""
    from turboflow.engine import sagesla
    from turboflow.engine.kernels import sagesla_kernel as kernel
    from turboflow.engine.sla import _linear_branch, _project, select_blocks, sla_attention

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    # [B, L, H, D] seen as [B, H, L, D], the layout SLAProcessor hands over (the kernels read the strides)
    q, k, v = (
        torch.randn(1, TOKENS_480P, HEADS_1_3B, HEAD_DIM, device=dev, dtype=bf16).transpose(1, 2) for _ in range(3)
    )
    w = torch.randn(HEAD_DIM, HEAD_DIM, device=dev) * 0.05
    blk_q, blk_k = sagesla.sagesla_geometry(dev)

    _part(
        res,
        "dense_sdpa",
        lambda: res.__setitem__("dense_sdpa_s", _time(lambda: F.scaled_dot_product_attention(q, k, v))),
    )
    for backend in ("flex", "auto"):
        _part(
            res,
            f"sla_{backend}",
            lambda b=backend: res.__setitem__(
                f"sla_{b}_s", _time(lambda: sla_attention(q, k, v, topk=TOPK, proj_weight=w, backend=b))
            ),
        )
    _part(
        res,
        "sagesla_op",
        lambda: res.__setitem__(
            "sagesla_op_s",
            _time(lambda: sagesla.sagesla_attention(q, k, v, topk=TOPK, proj_weight=w, backend="triton")),
        ),
    )

    def parts() -> None:
        lut = select_blocks(q, k, TOPK, blk_q, blk_k)
        x = kernel.quantize(q, k, v, blk_q, blk_k)
        lut_sorted = kernel.sorted_lut(lut)
        out = torch.empty_like(q)
        kvw, ksum, _ = kernel.linear_operands(q, k, v, w, None)
        for key, fn in (
            ("select", lambda: select_blocks(q, k, TOPK, blk_q, blk_k)),
            ("quantize_qk", lambda: kernel.quantize_qk(q, k, blk_q, blk_k)),
            ("quantize_v", lambda: kernel.quantize_v(v, blk_k)),
            ("attention_kernel", lambda: kernel.attend_quantized(x, lut_sorted, out, blk_q, blk_k)),
            ("linear_state", lambda: kernel.linear_operands(q, k, v, w, None)),
            (
                "attention_kernel_fused_linear",
                lambda: kernel.attend_quantized(x, lut_sorted, out, blk_q, blk_k, q=q, kvw=kvw, ksum=ksum),
            ),
            ("linear_proj", lambda: _project(_linear_branch(q, k, v), w, None)),
            ("whole_op", lambda: sagesla.sagesla_attention(q, k, v, topk=TOPK, proj_weight=w, backend="triton")),
            ("sla_auto_op", lambda: sla_attention(q, k, v, topk=TOPK, proj_weight=w)),
        ):
            try:
                res[f"graph_{key}_s"] = _graph_time(fn)
            except Exception as e:
                res[f"graph_{key}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        res["part_select_s"] = _time(lambda: select_blocks(q, k, TOPK, blk_q, blk_k))
        res["part_sort_lut_s"] = _time(lambda: kernel.sorted_lut(lut))
        res["part_quantize_qk_s"] = _time(lambda: kernel.quantize_qk(q, k, blk_q, blk_k))
        res["part_quantize_v_s"] = _time(lambda: kernel.quantize_v(v, blk_k))
        res["part_attention_kernel_s"] = _time(lambda: kernel.attend_quantized(x, lut_sorted, out, blk_q, blk_k))
        res["part_linear_proj_s"] = _time(lambda: _project(_linear_branch(q, k, v), w, None))
        res["part_attention_kernel_bf16_dots_s"] = _time(
            lambda: kernel.attend_quantized(x, lut_sorted, out, blk_q, blk_k, fp8_dot=False)
        )
        # the sparse kernel's work: 2 * (QK^T + PV) flops over the selected blocks
        n_sel = lut.shape[-1]
        flops = 4 * HEADS_1_3B * lut.shape[2] * blk_q * n_sel * blk_k * HEAD_DIM
        res["attention_kernel_tflops"] = flops / res["part_attention_kernel_s"] / 1e12
        sweep = {}
        for warps in (4, 8):
            for stages in (2, 3, 4):
                try:
                    sweep[f"w{warps}s{stages}"] = _time(
                        lambda: kernel.attend_quantized(x, lut_sorted, out, blk_q, blk_k, warps, stages)
                    )
                except Exception as e:
                    sweep[f"w{warps}s{stages}"] = f"{type(e).__name__}: {str(e)[:200]}"
        res["attention_kernel_sweep_s"] = sweep
        timed = {key: t for key, t in sweep.items() if isinstance(t, float)}
        res["attention_kernel_best"] = min(timed, key=timed.get) if timed else None

    _part(res, "parts", parts)
    if "compiled" not in res.get("_wanted", ()):
        return

    def compiled() -> None:
        torch._dynamo.reset()
        fn = torch.compile(lambda q, k, v: sagesla.sagesla_attention(q, k, v, topk=TOPK, proj_weight=w), fullgraph=True)
        start = time.perf_counter()
        fn(q, k, v)
        torch.cuda.synchronize()
        res["sagesla_compiled_first_call_s"] = time.perf_counter() - start
        res["sagesla_compiled_s"] = _time(lambda: fn(q, k, v))
        eager = sagesla.sagesla_attention(q, k, v, topk=TOPK, proj_weight=w)
        res["sagesla_compiled_vs_eager_max_abs"] = _max_abs(fn(q, k, v), eager)
        sla_fn = torch.compile(lambda q, k, v: sla_attention(q, k, v, topk=TOPK, proj_weight=w))
        sla_fn(q, k, v)
        res["sla_compiled_s"] = _time(lambda: sla_fn(q, k, v))

    _part(res, "compiled", compiled)


def dit_forward(res: dict) -> None:
    """A 1.3B DiT forward (random bf16 weights, 480p 81 frames) with SLA and with SageSLA, eager."""
    from diffusers import WanTransformer3DModel

    from turboflow.engine.sla import set_attention

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    torch.set_default_dtype(bf16)
    try:
        with torch.device(dev):
            net = WanTransformer3DModel(
                num_attention_heads=HEADS_1_3B,
                attention_head_dim=HEAD_DIM,
                in_channels=16,
                out_channels=16,
                text_dim=4096,
                freq_dim=256,
                ffn_dim=8960,
                num_layers=30,
            ).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    x = torch.randn(1, 16, 21, 60, 104, device=dev, dtype=bf16)
    ctx = torch.randn(1, 512, 4096, device=dev, dtype=bf16)
    t = torch.tensor([987.0], device=dev, dtype=bf16)
    outs = {}
    with torch.no_grad():
        for mode in ("sla", "sagesla"):
            try:
                set_attention(net, mode, topk=TOPK)
                res[f"dit_forward_{mode}_s"] = _time(lambda: net(x, t, ctx, return_dict=False), reps=5)
                outs[mode] = net(x, t, ctx, return_dict=False)[0].float()
            except Exception as e:
                traceback.print_exc()
                res[f"dit_forward_{mode}_error"] = f"{type(e).__name__}: {str(e)[:400]}"
    if len(outs) == 2:
        res["dit_sagesla_vs_sla_rel"] = _rel(outs["sagesla"], outs["sla"])


def _table(res: dict) -> str:
    def ms(key):
        value = res.get(key)
        return f"{value * 1e3:8.3f} ms" if isinstance(value, float) else f"{'-':>11}"

    rows = [
        ("dense SDPA", "dense_sdpa_s"),
        ("SLA flex (eager)", "sla_flex_s"),
        ("SLA auto (eager)", "sla_auto_s"),
        ("SLA compiled", "sla_compiled_s"),
        ("SageSLA op (eager)", "sagesla_op_s"),
        ("SageSLA compiled", "sagesla_compiled_s"),
        ("  select blocks", "part_select_s"),
        ("  sort LUT", "part_sort_lut_s"),
        ("  quantize Q, K", "part_quantize_qk_s"),
        ("  quantize V", "part_quantize_v_s"),
        ("  attention kernel", "part_attention_kernel_s"),
        ("  ... with bf16 P.V", "part_attention_kernel_bf16_dots_s"),
        ("  linear + proj_l", "part_linear_proj_s"),
        ("graph: SageSLA op", "graph_whole_op_s"),
        ("graph: SLA auto op", "graph_sla_auto_op_s"),
        ("graph:  select", "graph_select_s"),
        ("graph:  quantize Q, K", "graph_quantize_qk_s"),
        ("graph:  quantize V", "graph_quantize_v_s"),
        ("graph:  attention kernel", "graph_attention_kernel_s"),
        ("graph:  linear + proj_l", "graph_linear_proj_s"),
        ("graph:  linear state", "graph_linear_state_s"),
        ("graph:  attn + fused lin", "graph_attention_kernel_fused_linear_s"),
        ("DiT forward, SLA", "dit_forward_sla_s"),
        ("DiT forward, SageSLA", "dit_forward_sagesla_s"),
    ]
    lines = [f"{name:<24}{ms(key)}" for name, key in rows]
    for key in (
        "kernel_vs_emulation_max_abs",
        "kernel_vs_emulation_mismatch_frac",
        "sparse_kernel_vs_fp64_rel",
        "op_vs_fp64_rel",
        "op_vs_sla_same_geometry_rel",
        "op_vs_sla_default_geometry_rel",
        "sla_vs_fp64_same_blocks_rel",
        "dit_sagesla_vs_sla_rel",
        "hw_fp8_cast_vs_software_rounding_max_abs",
        "bf16_dot_fallback_vs_fp8_dot_max_abs",
        "attention_kernel_tflops",
        "attention_kernel_best",
    ):
        if key in res:
            value = res[key]
            lines.append(f"{key:<44}{value:.3g}" if isinstance(value, float) else f"{key:<44}{value}")
    lines += [f"{key}: {value}" for key, value in res.items() if key.endswith("_error")]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/sagesla")
    ap.add_argument(
        "--parts", default="correctness,op,compiled,dit", help="comma-separated: correctness, op, compiled, dit"
    )
    args = ap.parse_args()
    wanted = set(args.parts.split(","))
    os.makedirs(args.out, exist_ok=True)
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import triton

        res["triton"] = triton.__version__
    except Exception as e:
        res["triton_error"] = f"{type(e).__name__}: {e}"
    res["capability"] = list(torch.cuda.get_device_capability())
    res["_wanted"] = sorted(wanted)  # op_times reads "compiled" from it
    for name, part in (("correctness", correctness), ("op", op_times), ("dit", dit_forward)):
        if name in wanted:
            _part(res, name, lambda part=part: part(res))
        torch.cuda.empty_cache()
    res.pop("_wanted")
    with open(os.path.join(args.out, "sagesla.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    print(_table(res))
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=None)[:4000])


if __name__ == "__main__":
    main()
