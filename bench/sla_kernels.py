"""SLA with the Triton kernels (engine/kernels) against FlexAttention SLA and dense SDPA, on one CUDA GPU.

    python -m bench.sla_kernels --out DIR [--reps 20]      (writes DIR/sla_kernels.json; ~2-3 minutes on an H200)

At Wan2.1-1.3B 480p 81-frame shapes (1 x 12 heads x 32,760 tokens x 128, bf16 random inputs), TurboDiffusion's
blocks (Q 128, K 64), top-k 0.05 / 0.1 / 0.2, it measures (CUDA events, warm-up, median of --reps, ms):
  * dense SDPA; the block selection alone;
  * the SLA op as it was: backend "flex", eager and compiled as one graph (top-k 0.1 only: each top-k recompiles);
  * the Triton sparse branch alone (no proj_l), the linear state alone (KV W^T and ksum), and sparse + linear +
    proj_l, on a precomputed block table;
  * the whole SLA op with backend "triton" (selection in torch + the kernels), eager and compiled (fullgraph);
  * a sweep of the sparse kernel's tiles (BLOCK_M 64/128, num_warps 4/8, num_stages 2/3/4; and the epilogue in bf16)
    at top-k 0.1, sparse + linear, the best reported (each config's output is checked against the default's);
  * correctness at 4,000 tokens (a short last block): the kernels on bf16 and fp32 inputs vs a float64 dense-mask
    reference on the same inputs and the same block table (max abs, max abs / max |ref|, relative L2); flex beside;
  * the 14B head count (40 heads) at 480p (32,760 tokens) and 720p (75,600 tokens) with the best tile config.
Every part records its own error in the JSON and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import time
import traceback

import torch
import torch.nn.functional as F

from . import _ROOT  # noqa: F401  (turboflow namespace on a bare tree)
from .timing import cuda_median_seconds

HEADS, TOKENS, HEAD_DIM = 12, 32760, 128
HEADS_14B, TOKENS_720P = 40, 75600
TOPKS = (0.05, 0.1, 0.2)
BLK_Q, BLK_K = 128, 64
CHECK_TOKENS = 4000
OPTIONAL_PARTS_BUDGET_S = 150  # the 14B shapes and extra compiles run only while the run is under this


def _ms(fn, reps: int, warmup: int = 3) -> float:
    return 1000 * cuda_median_seconds(fn, reps=reps, warmup=warmup)


def _direct_launches():
    """Launch the kernels as the op does: outside the op, wrap_triton would route every launch through its
    higher-order op (tens of microseconds of Python per launch), which is not what the op pays."""
    from torch._library import triton as library_triton

    setter = getattr(library_triton, "set_wrap_triton_enabled", None)
    return setter(False) if setter is not None else contextlib.nullcontext()


def _reference_from_lut(q, k, v, lut, proj_weight, proj_bias, blk_q: int, blk_k: int) -> torch.Tensor:
    """sla.sla_reference's math in float64 for a given block table (the kernels' rounding only, not the selection's)."""
    from turboflow.engine.sla import _linear_branch, _project

    q, k, v = (t.double() for t in (q, k, v))
    length = q.shape[-2]
    block_mask = torch.zeros(*lut.shape[:3], -(-length // blk_k), dtype=torch.bool, device=q.device)
    block_mask.scatter_(-1, lut.long(), True)
    mask = block_mask.repeat_interleave(blk_q, dim=2)[:, :, :length].repeat_interleave(blk_k, dim=3)[..., :length]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    o_s = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v
    w = None if proj_weight is None else proj_weight.double()
    b = None if proj_bias is None else proj_bias.double()
    return o_s + _project(_linear_branch(q, k, v), w, b)


def _errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (out.double() - ref).abs()
    return {
        "max_abs": float(diff.max()),
        "max_abs_over_max_ref": float(diff.max() / ref.abs().max()),
        "rel_l2": float((out.double() - ref).norm() / ref.norm()),
    }


def _sparse_tflops(heads: int, tokens: int, n_sel: int, ms: float) -> float:
    """Useful-work rate of the sparse branch: 4 L (n_sel blk_k) D per head (QK^T and PV), padded keys counted."""
    return 4 * heads * tokens * n_sel * BLK_K * HEAD_DIM / (ms * 1e-3) / 1e12


class _Run:
    """Runs named parts; an exception is recorded under errors[name] (traceback printed) and the run goes on."""

    def __init__(self, res: dict):
        self.res, self.started = res, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def part(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            self.res["errors"][name] = f"{type(e).__name__}: {str(e)[:500]}"
        self.res["part_seconds"][name] = round(time.perf_counter() - t0, 1)


def _tile_fields(row: dict) -> dict:
    """The TileConfig fields of a sweep row (which also holds its timings)."""
    from turboflow.engine.kernels import sparse_attention as sa

    return {f.name: row[f.name] for f in dataclasses.fields(sa.TileConfig) if f.name in row}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for sla_kernels.json")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement (median reported)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.sla_kernels needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    import triton

    from turboflow.engine.kernels import sparse_attention as sa
    from turboflow.engine.sla import select_blocks, sla_attention

    dev, bf16, reps = torch.device("cuda"), torch.bfloat16, args.reps
    res: dict = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": [1, HEADS, TOKENS, HEAD_DIM],
        "dtype": "bfloat16",
        "blocks": [BLK_Q, BLK_K],
        "reps": reps,
        "default_tiles": vars(sa.DEFAULT_TILES),
        "ms": {},
        "errors": {},
        "part_seconds": {},
    }
    run = _Run(res)
    ms = res["ms"]
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, TOKENS, HEAD_DIM, device=dev, generator=g, dtype=bf16) for _ in range(3))
    w = torch.randn(HEAD_DIM, HEAD_DIM, device=dev, generator=g) * 0.05  # fp32, as proj_l in the checkpoints
    bias = torch.randn(HEAD_DIM, device=dev, generator=g) * 0.05
    luts = {topk: select_blocks(q, k, topk, BLK_Q, BLK_K) for topk in TOPKS}
    res["n_sel"] = {str(topk): luts[topk].shape[-1] for topk in TOPKS}

    def correctness():
        out = {}
        gc = torch.Generator(device=dev).manual_seed(1)
        x = [torch.randn(1, HEADS, CHECK_TOKENS, HEAD_DIM, device=dev, generator=gc) for _ in range(3)]
        for dtype in (bf16, torch.float32):
            qc, kc, vc = (t.to(dtype) for t in x)
            for topk in (0.1, 1.0):
                lut = select_blocks(qc, kc, topk, BLK_Q, BLK_K)
                ref = _reference_from_lut(qc, kc, vc, lut, w, bias, BLK_Q, BLK_K)
                name = f"{str(dtype).removeprefix('torch.')}_topk{topk}"
                out[f"triton_{name}"] = _errors(sa.sla_sparse_linear(qc, kc, vc, lut, w, bias, BLK_Q, BLK_K), ref)
                if dtype == bf16 and topk == 0.1:
                    flex = sla_attention(qc, kc, vc, topk=topk, proj_weight=w, proj_bias=bias, backend="flex")
                    out[f"flex_{name}"] = _errors(flex, ref)
        # the whole op: the same selection in both backends, so only the kernels' rounding differs
        qc, kc, vc = (t.to(bf16) for t in x)
        a = sla_attention(qc, kc, vc, topk=0.1, proj_weight=w, proj_bias=bias, backend="triton").float()
        b = sla_attention(qc, kc, vc, topk=0.1, proj_weight=w, proj_bias=bias, backend="flex").float()
        out["triton_vs_flex_op_rel_l2"] = float((a - b).norm() / b.norm())
        res["correctness"] = out

    run.part("correctness", correctness)
    run.part(
        "dense_sdpa", lambda: ms.__setitem__("dense_sdpa", _ms(lambda: F.scaled_dot_product_attention(q, k, v), reps))
    )

    def per_topk(topk):
        lut = luts[topk]
        key = f"topk{topk}"
        ms[f"selection_{key}"] = _ms(lambda: select_blocks(q, k, topk, BLK_Q, BLK_K), reps)
        ms[f"flex_op_eager_{key}"] = _ms(
            lambda: sla_attention(q, k, v, topk=topk, proj_weight=w, proj_bias=bias, backend="flex"), reps
        )
        ms[f"triton_sparse_only_{key}"] = _ms(
            lambda: sa.sla_sparse_linear(q, k, v, lut, None, None, BLK_Q, BLK_K), reps
        )
        if topk == 0.1:
            with _direct_launches():
                ms["triton_linear_state"] = _ms(lambda: sa.linear_state(k, v, w, torch.float32), reps)
        ms[f"triton_sparse_linear_{key}"] = _ms(lambda: sa.sla_sparse_linear(q, k, v, lut, w, bias, BLK_Q, BLK_K), reps)
        ms[f"triton_op_eager_{key}"] = _ms(
            lambda: sla_attention(q, k, v, topk=topk, proj_weight=w, proj_bias=bias, backend="triton"), reps
        )
        res.setdefault("sparse_tflops", {})[key] = _sparse_tflops(
            HEADS, TOKENS, lut.shape[-1], ms[f"triton_sparse_only_{key}"]
        )

    for topk in TOPKS:
        run.part(f"eager_topk{topk}", lambda topk=topk: per_topk(topk))

    def compiled(backend, topk):
        fn = torch.compile(
            lambda q, k, v: sla_attention(q, k, v, topk=topk, proj_weight=w, proj_bias=bias, backend=backend),
            fullgraph=backend == "triton",
            dynamic=False,
        )
        t0 = time.perf_counter()
        fn(q, k, v)
        torch.cuda.synchronize()
        res.setdefault("compile_seconds", {})[f"{backend}_topk{topk}"] = round(time.perf_counter() - t0, 1)
        ms[f"{backend}_op_compiled_topk{topk}"] = _ms(lambda: fn(q, k, v), reps)

    run.part("compiled_triton_topk0.1", lambda: compiled("triton", 0.1))
    run.part("compiled_flex_topk0.1", lambda: compiled("flex", 0.1))

    def sweep():
        lut = luts[0.1]
        reference = sa.sla_sparse_linear(q, k, v, lut, w, bias, BLK_Q, BLK_K).float()
        rows = []
        configs = [sa.TileConfig(m, w_, s_) for m in (64, 128) for w_ in (4, 8) for s_ in (2, 3, 4)]
        configs += [sa.TileConfig(128, 8, s_, epilogue_fp32=False) for s_ in (2, 3, 4)]  # epilogue in bf16
        # two selected K blocks per softmax step (128-wide products)
        for m, w_ in ((128, 8), (128, 4), (64, 4)):
            configs += [sa.TileConfig(m, w_, s_, keys_per_step=2) for s_ in (2, 3)]
        for tiles in configs:
            row = vars(tiles).copy()
            try:
                fn = lambda: sa.sla_sparse_linear_forward(q, k, v, lut, w, bias, BLK_Q, BLK_K, tiles)
                with _direct_launches():
                    row["max_abs_vs_default"] = float((fn().float() - reference).abs().max())
                    row["ms"] = _ms(fn, reps)
            except Exception as e:  # e.g. out of shared memory at 4 stages
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
        res["sweep_topk0.1"] = rows
        ok = [r for r in rows if "ms" in r and r["max_abs_vs_default"] < 1e-2]
        # one pass is noisy (+-10-20 %): the five fastest and the default again, round-robin, median of 3 rounds
        finalists = sorted(ok, key=lambda r: r["ms"])[:5]
        default = next((r for r in ok if sa.TileConfig(**_tile_fields(r)) == sa.DEFAULT_TILES), None)
        if default is not None and default not in finalists:
            finalists.append(default)
        rounds: dict[int, list[float]] = {id(r): [] for r in finalists}
        for _ in range(3):
            for r in finalists:
                tiles = sa.TileConfig(**_tile_fields(r))
                with _direct_launches():
                    rounds[id(r)].append(
                        _ms(lambda: sa.sla_sparse_linear_forward(q, k, v, lut, w, bias, BLK_Q, BLK_K, tiles), reps)
                    )
        for r in finalists:
            r["ms_confirmed"] = statistics.median(rounds[id(r)])
        res["best_tiles"] = min(finalists, key=lambda r: r["ms_confirmed"]) if finalists else None

    run.part("sweep", sweep)

    def heads_14b():
        best = res.get("best_tiles")
        tiles = sa.TileConfig(**_tile_fields(best)) if best else sa.DEFAULT_TILES
        for label, tokens in (("480p", TOKENS), ("720p", TOKENS_720P)):
            if run.elapsed() > OPTIONAL_PARTS_BUDGET_S:
                res["errors"][f"14b_{label}"] = "skipped: time budget"
                continue
            g4 = torch.Generator(device=dev).manual_seed(2)
            qb, kb, vb = (
                torch.randn(1, HEADS_14B, tokens, HEAD_DIM, device=dev, generator=g4, dtype=bf16) for _ in range(3)
            )
            lut = select_blocks(qb, kb, 0.1, BLK_Q, BLK_K)
            key = f"14b_{label}_topk0.1"
            r = 5 if label == "720p" else 10
            ms[f"selection_{key}"] = _ms(lambda: select_blocks(qb, kb, 0.1, BLK_Q, BLK_K), r)
            with _direct_launches():
                ms[f"triton_sparse_linear_{key}"] = _ms(
                    lambda: sa.sla_sparse_linear_forward(qb, kb, vb, lut, w, bias, BLK_Q, BLK_K, tiles), r
                )
            ms[f"flex_op_eager_{key}"] = _ms(
                lambda: sla_attention(qb, kb, vb, topk=0.1, proj_weight=w, proj_bias=bias, backend="flex"), r
            )
            ms[f"dense_sdpa_14b_{label}"] = _ms(lambda: F.scaled_dot_product_attention(qb, kb, vb), 3, warmup=1)
            del qb, kb, vb, lut

    run.part("14b_heads", heads_14b)
    res["total_seconds"] = round(run.elapsed(), 1)
    with open(os.path.join(args.out, "sla_kernels.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    _print_summary(res)


def _print_summary(res: dict) -> None:
    ms = res["ms"]
    print(f"{res['gpu']}  torch {res['torch']}  triton {res['triton']}  1x{HEADS}x{TOKENS}x{HEAD_DIM} bf16")
    print(f"dense SDPA {ms.get('dense_sdpa', math.nan):.3f} ms   n_sel {res.get('n_sel')}")
    cols = (
        ("selection", "selection"),
        ("flex op eager", "flex_op_eager"),
        ("flex op compiled", "flex_op_compiled"),
        ("triton sparse", "triton_sparse_only"),
        ("triton sparse+lin", "triton_sparse_linear"),
        ("triton op eager", "triton_op_eager"),
        ("triton op compiled", "triton_op_compiled"),
    )
    print(f"{'ms':<20}" + "".join(f"{'topk ' + str(t):>12}" for t in TOPKS))
    for label, prefix in cols:
        print(f"{label:<20}" + "".join(f"{ms.get(f'{prefix}_topk{t}', math.nan):>12.3f}" for t in TOPKS))
    print(f"triton linear state (partials + finalize) {ms.get('triton_linear_state', math.nan):.3f} ms")
    print("sparse TFLOP/s", {k: round(v, 1) for k, v in res.get("sparse_tflops", {}).items()})
    print("best tiles (top-k 0.1, sparse+linear):", res.get("best_tiles"))
    for key in sorted(k for k in ms if "14b" in k):
        print(f"  {key}: {ms[key]:.3f} ms")
    for name, errs in res.get("correctness", {}).items():
        print(f"  {name}: {errs}")
    if res["errors"]:
        print("errors:", json.dumps(res["errors"], indent=1))
    print(f"total {res['total_seconds']} s")


if __name__ == "__main__":
    main()
