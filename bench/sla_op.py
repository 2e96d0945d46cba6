"""SLA on the GPU at Wan2.1-1.3B 480p 81-frame shapes: correctness against the dense-mask reference, attention-op time
against dense SDPA, and a whole DiT forward with SLA vs the original attention.

    python -m bench.sla_op --out $OUT      (GPU; random weights)
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from . import _ROOT  # noqa: F401  (turboflow namespace on a bare tree)
from .timing import cuda_median_seconds


def _time(fn, reps=10):
    return cuda_median_seconds(fn, reps=reps, warmup=2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/sla")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from diffusers import WanTransformer3DModel

    from turboflow.engine.sla import set_attention, sla_attention, sla_reference

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    # 1. correctness on the GPU in bf16 vs float64 reference (moderate size)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, 4, 4000, 128, device=dev, generator=g) for _ in range(3))
    w = torch.randn(128, 128, device=dev, generator=g) * 0.05
    ref = sla_reference(q.double(), k.double(), v.double(), topk=0.1, proj_weight=w.double())
    fast = sla_attention(q.to(bf16), k.to(bf16), v.to(bf16), topk=0.1, proj_weight=w).double()
    res["bf16_vs_fp64_rel_err"] = float((fast - ref).norm() / ref.norm())
    # 2. the attention op at 1.3B 480p 81 frames: 12 heads x 32760 tokens x 128
    q, k, v = (torch.randn(1, 12, 32760, 128, device=dev, dtype=bf16) for _ in range(3))
    res["dense_sdpa_s"] = _time(lambda: F.scaled_dot_product_attention(q, k, v))
    for topk in (0.05, 0.1, 0.2):
        for backend in ("gather", "flex"):
            try:
                torch.cuda.reset_peak_memory_stats()
                res[f"sla_{backend}_topk{topk}_s"] = _time(
                    lambda: sla_attention(q, k, v, topk=topk, proj_weight=w, backend=backend)
                )
                res[f"sla_{backend}_topk{topk}_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            except Exception as e:  # report, keep measuring the rest
                res[f"sla_{backend}_topk{topk}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    # flex vs gather on the same inputs (same block selection, so only kernel rounding differs)
    try:
        qs, ks, vs = (t[:, :, :8100] for t in (q, k, v))  # not a multiple of either block size
        a = sla_attention(qs, ks, vs, topk=0.1, backend="flex").float()
        bb = sla_attention(qs, ks, vs, topk=0.1, backend="gather").float()
        res["flex_vs_gather_rel_err"] = float((a - bb).norm() / bb.norm())
    except Exception as e:
        res["flex_vs_gather_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    del q, k, v
    # 3. a DiT forward (1.3B, random bf16 weights) with each attention
    torch.set_default_dtype(bf16)
    with torch.device(dev):
        net = WanTransformer3DModel(
            num_attention_heads=12,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=8960,
            num_layers=30,
        ).eval()
    torch.set_default_dtype(torch.float32)
    x = torch.randn(1, 16, 21, 60, 104, device=dev, dtype=bf16)
    ctx = torch.randn(1, 512, 4096, device=dev, dtype=bf16)
    t = torch.tensor([987.0], device=dev, dtype=bf16)
    with torch.no_grad():
        for mode, topk in (("original", 0.0), ("sla", 0.1), ("sla", 0.05)):
            set_attention(net, mode, topk=topk)
            try:
                res[f"dit_step_{mode}{topk or ''}_s"] = _time(lambda: net(x, t, ctx, return_dict=False), reps=5)
            except Exception as e:
                res[f"dit_step_{mode}{topk or ''}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    with open(os.path.join(args.out, "sla.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
