"""Context-parallel DiT on two GPUs against one GPU and against plain diffusers' context parallelism, in one run.

    python -m bench.parallel --out OUT                   # 2 GPUs (NCCL): Wan2.1-T2V-14B 720p, 81 frames, 4 steps
    python -m bench.parallel --out OUT --variant plain   # ours without SLA/FP8/compile (the attention kernels alone)
    python -m bench.parallel --tiny --out OUT            # CPU, gloo, tiny model: the same JSON (a smoke test)

Random weights built on each GPU from one seed (bench/models.py, as bench/run.py), so every rank holds the same
model. Rows (OUT/parallel.json, OUT/parallel.md):
  diffusers_1gpu   plain diffusers WanTransformer3DModel, bf16, SDPA: warm-up + timed forwards on rank 0
  diffusers_cp     the same module with `enable_parallelism(ContextParallelConfig(ulysses_degree=N))` on N GPUs
  ours_1gpu        our DiT (--variant: SLA top-k 0.1 + FP8 linears + compiled blocks by default) through the rCM
                   sampler, 4 steps, rank 0 alone
  ours_cp          the same on N GPUs (engine/parallel.py: Ulysses all-to-all around SLA)
Per row: seconds per forward (median), the 4-step DiT (measured for ours, 4 x forward for diffusers), peak memory;
`equal` compares each parallel result with its one-GPU twin (relative max error of the output).
Runs well under 10 minutes on 2x H200 (each model is built twice: diffusers' hooks cannot be removed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import time
import traceback
from pathlib import Path

import torch

from . import _ROOT  # noqa: F401  (sets up the turboflow namespace on a bare tree)
from .models import SPECS, build_transformer, tiny_specs

VARIANTS = {
    "fast": dict(attention="sla", sla_topk=0.1, quant="fp8", compile=True),
    "sla": dict(attention="sla", sla_topk=0.1, quant=None, compile=False),
    "plain": dict(attention="original", sla_topk=0.0, quant=None, compile=False),
}


def log(rank, *a):
    print(f"[bench.parallel {time.strftime('%H:%M:%S')} r{rank}]", *a, flush=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device, fn):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t


def _peak_gb(device):
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


class _Inputs:
    """The DiT inputs of one spec, identical on every rank (seeded on the host, then moved)."""

    def __init__(self, spec, device, dtype):
        from turboflow.engine import families
        from turboflow.engine.request import GenerationRequest

        req = GenerationRequest(prompt="x", resolution=spec.resolution, aspect_ratio=spec.aspect_ratio)
        width, height = req.validated().size
        family = families.family_for_kind("t2v")
        self.shape = family.latent.latent_shape(spec.frames, width, height)
        self.tokens = self.shape[2] * (self.shape[3] // 2) * (self.shape[4] // 2)
        g = torch.Generator().manual_seed(7)
        self.latent = torch.randn(*self.shape, generator=g).to(device, dtype)
        text_dim = spec.transformer["text_dim"]
        self.context = (torch.randn(1, 512, text_dim, generator=g) * 0.1).to(device, dtype)
        self.timestep = torch.full((1,), 999.0, device=device, dtype=dtype)
        self.device, self.dtype = device, dtype

    def forward(self, net):
        with torch.no_grad():
            return net(
                hidden_states=self.latent,
                timestep=self.timestep,
                encoder_hidden_states=self.context,
                return_dict=False,
            )[0]

    def sample(self, net, steps: int):
        """`steps` rCM steps as TurboVideoPipeline runs them (seed 1, SDE), per-step seconds."""
        from turboflow.engine.sampler import rcm_sample

        marks = []

        def denoise(x, t, step):
            ts = (torch.ones(1, device=self.device) * (t * 1000.0)).to(self.dtype)
            model_in = x.to(self.dtype)
            return net(hidden_states=model_in, timestep=ts, encoder_hidden_states=self.context, return_dict=False)[0]

        def progress(i, n):
            _sync(self.device)
            marks.append(time.perf_counter())

        generator = torch.Generator(device=self.device).manual_seed(1)
        _sync(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = rcm_sample(
                denoise,
                self.shape,
                num_steps=steps,
                sigma_max=80.0,
                generator=generator,
                device=self.device,
                progress=progress,
            )
        seconds = [b - a for a, b in zip([start, *marks[:-1]], marks)]
        return out, seconds


def _barrier(device):
    import torch.distributed as dist

    dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def _diffusers_rows(rank, world, spec, inputs, device, dtype, forwards: int) -> dict:
    from diffusers import ContextParallelConfig

    rows = {}
    torch.manual_seed(0)
    net = build_transformer(spec.transformer, device, dtype)
    reference = None
    if rank == 0:
        log(rank, "diffusers, 1 GPU")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        reference, warm = _timed(device, lambda: inputs.forward(net))
        times = [_timed(device, lambda: inputs.forward(net))[1] for _ in range(forwards)]
        med = statistics.median(times)
        rows["diffusers_1gpu"] = dict(
            gpus=1,
            warmup_s=warm,
            forward_s=times,
            forward_median_s=med,
            dit_4_steps_s=4 * med,
            peak_gb=_peak_gb(device),
        )
    _barrier(device)
    log(rank, f"diffusers, context parallel x{world}")
    try:
        net.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _barrier(device)
        out, warm = _timed(device, lambda: inputs.forward(net))
        times = []
        for _ in range(4):
            _barrier(device)
            times.append(_timed(device, lambda: inputs.forward(net))[1])
        med = statistics.median(times)
        rows["diffusers_cp"] = dict(
            gpus=world,
            warmup_s=warm,
            forward_s=times,
            forward_median_s=med,
            dit_4_steps_s=sum(times),
            peak_gb=_peak_gb(device),
            equal=None if reference is None else _rel(out, reference),
        )
    except Exception as e:  # noqa: BLE001  (diffusers' experimental API must not hide our numbers)
        rows["diffusers_cp"] = dict(gpus=world, error=f"{type(e).__name__}: {e}")
        log(rank, traceback.format_exc())
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _prepare_ours(net, variant: dict, device):
    from turboflow.engine.sla import set_attention

    if variant["quant"]:
        from turboflow.engine.linear import quantize_transformer

        quantize_transformer(net, variant["quant"])
    set_attention(net, variant["attention"], topk=variant["sla_topk"] or 0.1)
    if variant["compile"]:
        from turboflow.engine.compiled import compile_transformer

        compile_transformer(net, backend="inductor" if device.type == "cuda" else "aot_eager")


def _ours_rows(rank, world, spec, inputs, device, dtype, variant: dict, steps: int) -> dict:
    from turboflow.engine.parallel import enable_context_parallel

    rows = {}
    torch.manual_seed(0)
    net = build_transformer(spec.transformer, device, dtype)
    _prepare_ours(net, variant, device)
    reference = None
    if rank == 0:
        log(rank, f"ours, 1 GPU ({variant})")
        _, warm = _timed(device, lambda: inputs.sample(net, 1))  # the compile, when on
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        (reference, seconds), total = _timed(device, lambda: inputs.sample(net, steps))
        rows["ours_1gpu"] = dict(
            gpus=1,
            warmup_s=warm,
            forward_s=seconds,
            forward_median_s=statistics.median(seconds),
            dit_4_steps_s=total * 4 / steps,
            peak_gb=_peak_gb(device),
        )
    _barrier(device)
    log(rank, f"ours, context parallel x{world}")
    enable_context_parallel(net)
    _barrier(device)
    _, warm = _timed(device, lambda: inputs.sample(net, 1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _barrier(device)
    (out, seconds), total = _timed(device, lambda: inputs.sample(net, steps))
    rows["ours_cp"] = dict(
        gpus=world,
        warmup_s=warm,
        forward_s=seconds,
        forward_median_s=statistics.median(seconds),
        dit_4_steps_s=total * 4 / steps,
        peak_gb=_peak_gb(device),
        equal=None if reference is None else _rel(out, reference),
    )
    return rows


def _rank_main(rank, world, port, args):
    import torch.distributed as dist

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (the cluster overlay does the same)
    device = torch.device(f"cuda:{rank}") if not args.tiny else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=dt.timedelta(minutes=20),  # rank 1 waits while rank 0 runs the one-GPU rows
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    try:
        spec = tiny_specs()["tiny-t2v"] if args.tiny else SPECS[args.model]
        dtype = torch.float32 if args.tiny else torch.bfloat16
        variant = dict(VARIANTS[args.variant])
        if args.tiny:
            variant.update(quant=None)  # FP8 needs a GPU
        inputs = _Inputs(spec, device, dtype)
        rows = {}
        if not args.skip_diffusers:
            rows.update(_diffusers_rows(rank, world, spec, inputs, device, dtype, args.plain_forwards))
        rows.update(_ours_rows(rank, world, spec, inputs, device, dtype, variant, args.steps))
        if rank == 0:
            _write(args, spec, inputs, variant, world, rows)
    finally:
        dist.destroy_process_group()


def _write(args, spec, inputs, variant, world, rows):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "torch": torch.__version__}
    for mod in ("diffusers",):
        env[mod] = __import__(mod).__version__
    if torch.cuda.is_available() and not args.tiny:
        env["gpu"] = torch.cuda.get_device_name(0)
    doc = dict(
        environment=env,
        model=spec.name,
        resolution=spec.resolution,
        frames=spec.frames,
        tokens=inputs.tokens,
        steps=args.steps,
        world_size=world,
        variant=args.variant,
        variant_settings=variant,
        rows=rows,
    )
    ours, plain = rows.get("ours_cp", {}), rows.get("diffusers_cp", {})
    if ours.get("dit_4_steps_s") and plain.get("dit_4_steps_s"):
        doc["ours_cp_vs_diffusers_cp"] = plain["dit_4_steps_s"] / ours["dit_4_steps_s"]
    if ours.get("dit_4_steps_s") and rows.get("ours_1gpu", {}).get("dit_4_steps_s"):
        doc["ours_cp_vs_ours_1gpu"] = rows["ours_1gpu"]["dit_4_steps_s"] / ours["dit_4_steps_s"]
    (out / "parallel.json").write_text(json.dumps(doc, indent=2))
    lines = [
        f"{spec.name} {spec.resolution} {spec.frames} frames ({inputs.tokens} tokens), variant {args.variant}, "
        f"{world} ranks, {env.get('gpu', 'CPU')}",
        "",
        "| row | GPUs | forward (median) s | 4-step DiT s | peak GB | rel. error vs 1 GPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | {row['gpus']} | error: {row['error']} | | | |")
            continue
        peak = "" if row.get("peak_gb") is None else f"{row['peak_gb']:.1f}"
        eq = "" if row.get("equal") is None else f"{row['equal']:.1e}"
        lines.append(
            f"| {name} | {row['gpus']} | {row['forward_median_s']:.3f} | {row['dit_4_steps_s']:.3f} | {peak} | {eq} |"
        )
    for key in ("ours_cp_vs_diffusers_cp", "ours_cp_vs_ours_1gpu"):
        if key in doc:
            lines.append(f"\n{key}: {doc[key]:.2f}x")
    (out / "parallel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(prog="python -m bench.parallel", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="14b-720p", choices=[k for k, s in SPECS.items() if s.kind == "t2v"])
    p.add_argument("--variant", default="fast", choices=list(VARIANTS))
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, choices=(1, 2, 3, 4))
    p.add_argument("--plain-forwards", type=int, default=1, help="timed one-GPU diffusers forwards (slow: ~11 s)")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CPU + gloo + the tiny model (smoke test)")
    args = p.parse_args(argv)
    if not args.tiny and torch.cuda.device_count() < args.world_size:
        p.error(f"needs {args.world_size} CUDA GPUs, found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(args.world_size, port, args), nprocs=args.world_size, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
