"""Where one DiT step's time goes: the fast path (SLA top-k 0.1 or SageSLA, FP8 linears, compiled blocks) of one
model under torch.profiler, kernels grouped by what they do (issue 17: the DiT's bound).

    python -m bench.dit_profile --out OUT                          # GPU: Wan2.1-1.3B 480p, sla and sagesla
    python -m bench.dit_profile --tiny --out OUT                   # CPU smoke test (tiny model, eager)

Random weights (bench/models.py), the inputs of bench/parallel.py (one seed). Per attention: warm-up forwards
(the compile), then the median of 5 timed forwards, then one profiled forward. OUT/dit_profile.json holds, per
attention, the forward's seconds, the GPU-busy time by category (fp8 GEMM, bf16 GEMM, attention kernels, Inductor's
fused kernels, copies, other) and the 25 longest kernels. About 2 minutes on an H200.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import torch

from . import _ROOT  # noqa: F401  (turboflow namespace on a bare tree)
from .models import SPECS, build_transformer, tiny_specs
from .parallel import _Inputs, _prepare_ours, _sync

# kernel name fragments -> category, first match wins (names as CUDA's profiler reports them on Hopper)
CATEGORIES = (
    ("attention", ("_sla_forward", "_linear_state", "_sagesla", "flex_attention", "flash", "fmha", "sdpa")),
    # Inductor's kernels before the GEMMs: its FP8 activation quantization is named after _scaled_mm
    ("inductor fused", ("triton_",)),
    # cuBLASLt's FP8 kernels on Hopper are nvjet_sm90_qq...; CUTLASS/xmma ones name e4m3
    ("fp8 gemm", ("_qq", "f8", "e4m3", "fp8")),
    ("bf16 gemm", ("gemm", "xmma", "cutlass", "sm90_", "nvjet")),
    ("copies", ("copy", "memcpy", "memset", "cat")),
)


def category(name: str) -> str:
    low = name.lower()
    for label, fragments in CATEGORIES:
        if any(f in low for f in fragments):
            return label
    return "other"


def _profile_forward(inputs, net) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if inputs.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        inputs.forward(net)
        _sync(inputs.device)
    device_events = [
        e
        for e in prof.events()
        if getattr(e, "device_type", None) is not None and e.device_type.name in ("CUDA", "CPU")
    ]
    on_gpu = inputs.device.type == "cuda"
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in device_events:
        if on_gpu and e.device_type.name != "CUDA":
            continue
        if not on_gpu and e.cpu_parent is not None:  # CPU: top-level ops only, no double counting
            continue
        by_name[e.name].append(e.device_time if on_gpu else e.cpu_time)
    totals = {name: sum(us) / 1e3 for name, us in by_name.items()}
    by_category: dict[str, float] = collections.defaultdict(float)
    for name, ms in totals.items():
        by_category[category(name)] += ms
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:25]
    return {
        "busy_ms": round(sum(totals.values()), 2),
        "by_category_ms": {k: round(v, 2) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:140], "ms": round(ms, 3), "calls": len(by_name[n])} for n, ms in top],
    }


def run(spec, attention: str, device, dtype, *, compile: bool, quant: str | None) -> dict:
    torch.manual_seed(0)
    net = build_transformer(spec.transformer, device, dtype)
    variant = dict(attention=attention, sla_topk=0.1, quant=quant, compile=compile)
    _prepare_ours(net, variant, device)
    inputs = _Inputs(spec, device, dtype)
    start = time.perf_counter()
    for _ in range(2):  # the compile, then one steady forward
        inputs.forward(net)
    _sync(device)
    warm = time.perf_counter() - start
    times = []
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        inputs.forward(net)
        _sync(device)
        times.append(time.perf_counter() - t)
    row = {"variant": variant, "warmup_s": round(warm, 2), "forward_median_s": statistics.median(times)}
    row.update(_profile_forward(inputs, net))
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dit_profile", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="1.3b-480p", choices=[k for k, s in SPECS.items() if s.kind == "t2v"])
    p.add_argument("--attention", default="sla,sagesla", help="comma list: sla, sagesla, original")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny model, eager, no FP8 (a smoke test)")
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    spec = SPECS[args.model] if on_gpu else tiny_specs()["tiny-t2v"]
    doc = {
        "model": spec.name,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if on_gpu else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": {},
    }
    for attention in [a for a in args.attention.split(",") if a]:
        try:
            doc["rows"][attention] = run(
                spec, attention, device, dtype, compile=on_gpu, quant="fp8" if on_gpu else None
            )
        except Exception as e:  # one attention failing still leaves the others measured
            doc["rows"][attention] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(attention, json.dumps(doc["rows"][attention], indent=1)[:3000], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dit_profile.json").write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
