"""SLA block selection: pooling/scoring in the input dtype (bf16, as upstream; the default) vs in fp32.

    python -m bench.sla_pooling [--reps 20] [--no-compile]      (one CUDA GPU; prints JSON; well under 3 minutes)

At Wan2.1-1.3B 480p 81-frame shapes (12 heads x 32,760 tokens x 128, bf16 random inputs, fixed seeds), top-k 0.1,
TurboDiffusion's blocks (Q 128, K 64), it reports
  * differ_fraction: the fraction of (head, query block) pairs whose set of selected key blocks differs between the
    two poolings (per seed and the mean), and the fraction of selected key blocks that differ;
  * the SLA op time (selection + FlexAttention sparse branch + linear branch through proj_l) and the selection
    alone, in ms, per pooling: eager, and the op compiled as one graph (skipped with --no-compile or when the
    eager part already took too long). CUDA events, warm-up, median of --reps.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from . import _ROOT  # noqa: F401  (turboflow namespace on a bare tree)
from .timing import cuda_median_seconds

HEADS, TOKENS, HEAD_DIM, TOPK = 12, 32760, 128, 0.1
SEEDS = (0, 1, 2)
COMPILE_BUDGET_S = 100  # start compiling only if the eager part left this much of the 3-minute budget


def _median_ms(fn, reps: int, warmup: int = 3) -> float:
    return 1000 * cuda_median_seconds(fn, reps=reps, warmup=warmup)


def _inputs(seed: int, device: torch.device):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(1, HEADS, TOKENS, HEAD_DIM, device=device, generator=g, dtype=torch.bfloat16) for _ in range(3)]


def _selection_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(fraction of query blocks with a different key-block set, fraction of selected key blocks that differ)."""
    a, b = a.sort(dim=-1).values, b.sort(dim=-1).values
    per_block = (a != b).any(dim=-1).float().mean().item()
    n_k = int(max(a.max(), b.max())) + 1
    ma = torch.zeros(*a.shape[:-1], n_k, dtype=torch.bool, device=a.device).scatter_(-1, a, True)
    mb = torch.zeros_like(ma).scatter_(-1, b, True)
    per_key = ((ma & ~mb).sum() / ma.sum()).item()
    return per_block, per_key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement (median reported)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled-op timings")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.sla_pooling needs a CUDA GPU")
    from turboflow.engine.sla import POOLING_MODES, select_blocks, sla_attention

    started = time.perf_counter()
    dev = torch.device("cuda")
    res: dict = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": [1, HEADS, TOKENS, HEAD_DIM],
        "dtype": "bfloat16",
        "topk": TOPK,
        "blocks": [128, 64],
        "reps": args.reps,
        "seeds": list(SEEDS),
        "modes": list(POOLING_MODES),
    }
    per_block, per_key = [], []
    for seed in SEEDS:
        q, k, _ = _inputs(seed, dev)
        blocks, keys = _selection_difference(
            select_blocks(q, k, TOPK, pooling="input"), select_blocks(q, k, TOPK, pooling="fp32")
        )
        per_block.append(blocks)
        per_key.append(keys)
    res["differ_fraction_query_blocks"] = per_block
    res["differ_fraction_query_blocks_mean"] = sum(per_block) / len(per_block)
    res["differ_fraction_selected_key_blocks_mean"] = sum(per_key) / len(per_key)

    q, k, v = _inputs(SEEDS[0], dev)
    w = torch.randn(HEAD_DIM, HEAD_DIM, device=dev, generator=torch.Generator(device=dev).manual_seed(9)) * 0.05
    for mode in POOLING_MODES:
        res[f"select_{mode}_ms"] = _median_ms(lambda: select_blocks(q, k, TOPK, pooling=mode), args.reps)
        res[f"sla_op_{mode}_eager_ms"] = _median_ms(
            lambda: sla_attention(q, k, v, topk=TOPK, proj_weight=w, pooling=mode), args.reps
        )
    res["eager_part_s"] = time.perf_counter() - started
    if args.no_compile:
        res["compiled"] = "skipped (--no-compile)"
    elif res["eager_part_s"] > 180 - COMPILE_BUDGET_S:
        res["compiled"] = f"skipped (eager part took {res['eager_part_s']:.0f} s)"
    else:
        for mode in POOLING_MODES:
            try:
                op = torch.compile(
                    lambda q, k, v, mode=mode: sla_attention(q, k, v, topk=TOPK, proj_weight=w, pooling=mode),
                    dynamic=False,
                )
                first = time.perf_counter()
                op(q, k, v)
                torch.cuda.synchronize()
                res[f"sla_op_{mode}_compile_first_call_s"] = time.perf_counter() - first
                res[f"sla_op_{mode}_compiled_ms"] = _median_ms(lambda: op(q, k, v), args.reps)
            except Exception as e:  # report, keep the rest of the measurements
                res[f"sla_op_{mode}_compiled_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    res["total_s"] = time.perf_counter() - started
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
