"""Context-parallel DiT on two GPUs against one GPU and against plain diffusers' context parallelism, in one run;
with --request, the whole request (text -> mp4 in S3) on one GPU and on N.

    python -m bench.parallel --out OUT                   # 2 GPUs (NCCL): Wan2.1-T2V-14B 720p, 81 frames, 4 steps
    python -m bench.parallel --out OUT --variant plain   # ours without SLA/FP8/compile (the attention kernels alone)
    python -m bench.parallel --tiny --out OUT            # CPU, gloo, tiny model: the same JSON (a smoke test)
    python -m bench.parallel --request --model 14b-720p,i2v-a14b-720p --out OUT   # whole requests, both models
    python -m bench.parallel --tiny --request --model 14b-720p,i2v-a14b-720p --out OUT   # CPU smoke (tiny models)

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

--request (OUT/parallel_request.json, OUT/parallel_request.md), per model in --model (a comma list; T2V or I2V):
every rank builds the whole pipeline as bench/run.py does (bench.run.build_pipeline after torch.manual_seed(0), so
every rank holds the same text encoder, VAE and DiT or both A14B experts; each DiT quantised as built) and prepares
it as bench.run's `turbo` variant does (--variant fast: SLA top-k 0.1 per request, FP8 linears, compiled blocks, the
fast VAE decode a compiled load picks). Two rows, each one warm-up request (Spec.warmup_steps: it pays the compiles)
and one timed request of --steps steps through bench.run.run_ours (text encode -> rCM DiT -> VAE decode -> mp4 by
the project's writer overlapping the decode -> S3Store.put_video to a moto ThreadedMotoServer; stages from rank 0's
stopwatch, exactly as bench.run reports them):
  1gpu   rank 0 alone in the same process, the pipeline unsharded (the other ranks wait; --skip-1gpu leaves it out)
  cp     every rank: engine/parallel.py's _shard_pipeline on each, rank 0 with ParallelPipeline's stage broadcasts,
         the workers running the same requests with the decode skipped (as _worker_main does)
Each model is built once per rank and reused by both rows (the 1gpu row compiles the unsharded blocks, the cp
warm-up the sharded ones); `frames_*_abs_diff` compares the two rows' frames (uint8 levels).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import socket
import statistics
import tempfile
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
        dtype = torch.float32 if args.tiny else torch.bfloat16
        variant = dict(VARIANTS[args.variant])
        if args.tiny:
            variant.update(quant=None)  # FP8 needs a GPU
        if args.request:
            _request_main(rank, world, args, device, dtype, variant)
            return
        spec = tiny_specs()["tiny-t2v"] if args.tiny else SPECS[args.model]
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


# ---- --request: the whole request on one GPU and on N -------------------------------------------------------------
REQUEST_SEED = 0  # torch's seed before each model is built: every rank builds the same weights
# issue 16's goals on 2x H200 (seconds), shown beside the N-rank row
REQUEST_GOALS = {"14b-720p": {"diffusion_s": 3.5, "total_s": 6.0}, "i2v-a14b-720p": {"total_s": 10.0}}


def _request_spec(key: str, args):
    """The spec a --request model runs: the full-size one (the tiny one of its kind with --tiny), timing --steps."""
    spec = tiny_specs()[f"tiny-{SPECS[key].kind}"] if args.tiny else SPECS[key]
    return dataclasses.replace(spec, steps=args.steps)


def _request_fields(variant: dict) -> dict:
    """The variant as bench.run's variants give it to run_ours: the attention is a request field."""
    if variant["attention"] == "original":
        return {"request": {"attention": "original"}}
    return {"request": {"attention": variant["attention"], "sla_topk": variant["sla_topk"]}}


def _prepare_request_pipeline(pipe, variant: dict, device) -> None:
    """What bench.run's `turbo` variant (bench/variants.py fp8_compiled) does to a pipeline whose DiT was quantised
    as built: the fast VAE decode (the decode variant a load with or without compile picks) and, with compile, each
    DiT's blocks compiled (aot_eager on the CPU, where Inductor would need a C++ toolchain and minutes)."""
    from turboflow.engine.compiled import compile_transformer

    from .variants import fast_vae

    fast_vae(pipe, compiled=variant["compile"])
    if variant["compile"]:
        for net in (pipe.transformer, pipe.transformer_2):
            if net is not None:
                compile_transformer(net, backend="inductor" if device.type == "cuda" else "aot_eager")


class _Rank0Pipeline:
    """Rank 0's pipeline as bench.run.run_ours calls it (`pipe(request, progress, frame_sink=...)`), keeping the last
    result (its frames are compared between the rows). `leading`: also pass engine/parallel.py's rank-0
    stage_progress, as ParallelPipeline does: at every agreed stage boundary one broadcast tells the workers to go on,
    so the N-rank row pays what a served request pays."""

    def __init__(self, pipe, *, leading: bool):
        self.pipe, self.leading, self.result = pipe, leading, None

    def __call__(self, request, progress=None, frame_sink=None):
        from turboflow.engine.parallel import _leading

        report = _leading(None, self.pipe.device) if self.leading else None
        self.result = self.pipe(request, progress, frame_sink=frame_sink, stage_progress=report)
        return self.result

    def __getattr__(self, name):  # family, fps, device, ...: the pipeline's
        if name.startswith("_") or name in ("pipe", "leading", "result"):
            raise AttributeError(name)
        return getattr(self.pipe, name)


def _frames_diff(a, b) -> dict:
    """Mean and max absolute difference of two uint8 videos, in levels (None when their shapes differ)."""
    if a is None or b is None or a.shape != b.shape:
        return dict(frames_mean_abs_diff=None, frames_max_abs_diff=None)
    diff = torch.from_numpy(a).to(torch.int16).sub_(torch.from_numpy(b).to(torch.int16)).abs_()
    return dict(frames_mean_abs_diff=float(diff.float().mean()), frames_max_abs_diff=int(diff.max()))


def _request_model(rank, world, key, spec, variant, device, dtype, s3, workdir: Path, one_gpu: bool) -> dict | None:
    """One model's two rows on every rank (see the module docstring); rank 0 returns its entry, the others None."""
    from turboflow.engine.parallel import _following_rank0, _no_decode, _shard_pipeline

    from .run import Clock, build_pipeline, ours_request, run_ours

    started = time.perf_counter()
    log(rank, f"{key}: building {spec.name} with random weights on {device}")
    torch.manual_seed(REQUEST_SEED)
    pipe, build_s, offload, weights_gb = build_pipeline(key, spec, device, dtype, workdir, variant["quant"])
    _prepare_request_pipeline(pipe, variant, device)
    fields, clock = _request_fields(variant), Clock(device)
    rows, single = {}, None
    if rank == 0:
        if one_gpu:
            log(rank, f"{key}: one GPU, the pipeline unsharded ({spec.warmup_steps} + {spec.steps} steps)")
            single = _Rank0Pipeline(pipe, leading=False)
            rows["1gpu"] = dict(gpus=1, **run_ours(single, spec, fields, clock, s3, workdir))
        else:
            rows["1gpu"] = dict(gpus=1, skipped="--skip-1gpu")
    _barrier(device)  # the other ranks waited here while rank 0 ran alone
    shards = _shard_pipeline(pipe)
    _barrier(device)
    log(rank, f"{key}: context parallel x{world} ({spec.warmup_steps} + {spec.steps} steps)")
    if rank == 0:
        parallel = _Rank0Pipeline(pipe, leading=True)
        rows["cp"] = dict(gpus=world, **run_ours(parallel, spec, fields, clock, s3, workdir))
    else:  # a worker: the same two requests, following rank 0's stage decisions, no decode (as _worker_main)
        pipe.decode = _no_decode
        follow = _following_rank0(device)
        for steps in (spec.warmup_steps, spec.steps):
            pipe(ours_request(pipe, spec, fields, steps), stage_progress=follow)
    entry = None
    if rank == 0:
        entry = dict(
            key=key,
            model=spec.name,
            kind=spec.kind,
            resolution=spec.resolution,
            frames=spec.frames,
            steps=spec.steps,
            warmup_steps=spec.warmup_steps,
            build_s=build_s,
            offload=offload,
            quantized_at_build=variant["quant"],
            built_dit_weights_gb=weights_gb,
            rows=rows,
            **_frames_diff(single and single.result.frames, parallel.result.frames),
            goals=None if spec.tiny else REQUEST_GOALS.get(key),
        )
        del single, parallel
    for shard in shards:
        shard.remove()
    del pipe, shards
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _barrier(device)
    if entry is not None:
        entry["wall_s"] = time.perf_counter() - started  # build, both rows with their warm-ups, clean-up
    return entry


def _request_main(rank, world, args, device, dtype, variant: dict) -> None:
    from .run import S3

    workdir = Path(tempfile.mkdtemp(prefix=f"turboflow-parallel-r{rank}-"))  # tokenizer, mp4s: one per rank
    if variant["compile"]:  # one Inductor cache per rank for the whole run: a later model reuses the kernels
        from turboflow.engine.compiled import use_cache_dir

        use_cache_dir(workdir / "compile")
    s3 = None
    if rank == 0:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        s3 = S3()
    started = time.perf_counter()
    entries = []
    try:
        for key in args.model.split(","):
            spec = _request_spec(key, args)
            entry = _request_model(rank, world, key, spec, variant, device, dtype, s3, workdir, not args.skip_1gpu)
            if rank == 0:
                entries.append(entry)
                # after every model: a later model's failure (or the device's time limit) keeps the earlier rows
                _write_request(args, variant, world, entries, s3, time.perf_counter() - started)
    finally:
        if s3 is not None:
            s3.stop()


_REQUEST_STAGES = (  # (label, key in run_ours' row, format)
    ("text encode", "text_encode_s", "{:.3f}"),
    ("VAE encode (I2V)", "vae_encode_s", "{:.3f}"),
    ("DiT step (median)", "step_median_s", "{:.3f}"),
    ("DiT, all steps", "diffusion_s", "{:.3f}"),
    ("VAE decode (rank 0)", "vae_decode_s", "{:.3f}"),
    ("mp4 encode (left after the overlap)", "mp4_encode_s", "{:.3f}"),
    ("S3 upload (moto, loopback)", "s3_upload_s", "{:.3f}"),
    ("**request total**", "total_s", "{:.3f}"),
    ("peak GPU memory, rank 0 (GB)", "peak_gpu_gb", "{:.1f}"),
)


def _request_table(entry: dict, world: int) -> list[str]:
    one, cp = entry["rows"].get("1gpu", {}), entry["rows"]["cp"]
    goals = entry.get("goals") or {}
    lines = [
        f"### {entry['model']} {entry['resolution']}, {entry['frames']} frames, {entry['steps']} steps "
        f"(experts {', '.join(cp['experts'])})",
        "",
        f"| stage | 1 GPU | {world} GPUs | 1 GPU / {world} GPUs | goal ({world}x H200, issue 16) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, key, fmt in _REQUEST_STAGES:
        a, b = one.get(key), cp.get(key)
        if a is None and b is None:
            continue
        ratio = f"{a / b:.2f}x" if a and b and key != "peak_gpu_gb" else ""
        goal = f"<= {goals[key]}" if key in goals else ""
        lines.append(
            f"| {label} | {'' if a is None else fmt.format(a)} | {'' if b is None else fmt.format(b)} | {ratio} "
            f"| {goal} |"
        )
    if "skipped" in one:
        lines.append(f"\n1 GPU row skipped ({one['skipped']}).")
    if entry["frames_mean_abs_diff"] is not None:
        lines.append(
            f"\nframes, {world} GPUs vs 1 GPU: mean |diff| {entry['frames_mean_abs_diff']:.3f} levels, "
            f"max {entry['frames_max_abs_diff']}"
        )
    lines.append(f"\nbuild {entry['build_s']:.1f} s, whole model (build, both rows, warm-ups) {entry['wall_s']:.0f} s")
    return lines


def _write_request(args, variant, world, entries, s3, wall_s: float) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "torch": torch.__version__}
    for mod in ("diffusers", "transformers"):
        env[mod] = __import__(mod).__version__
    if torch.cuda.is_available() and not args.tiny:
        env["gpu"] = torch.cuda.get_device_name(0)
    doc = dict(
        environment=env,
        world_size=world,
        variant=args.variant,
        variant_settings=variant,
        steps=args.steps,
        s3_error=s3.error if s3 is not None else None,
        wall_s=wall_s,
        models=entries,
    )
    (out / "parallel_request.json").write_text(json.dumps(doc, indent=2))
    lines = [
        f"Whole request (text -> mp4 in S3), variant {args.variant}, {world} ranks, {env.get('gpu', 'CPU')}; "
        f"stages from rank 0's stopwatch as bench.run reports them",
        "",
    ]
    for entry in entries:
        lines += [*_request_table(entry, world), ""]
    (out / "parallel_request.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(prog="python -m bench.parallel", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument(
        "--model",
        default="14b-720p",
        help=f"DiT rows: one of {', '.join(k for k, s in SPECS.items() if s.kind == 't2v')}; --request: a comma "
        f"list of {', '.join(SPECS)} (with --tiny, each becomes the tiny model of its kind)",
    )
    p.add_argument("--request", action="store_true", help="whole requests (text -> mp4 in S3), one GPU and N")
    p.add_argument("--skip-1gpu", action="store_true", help="--request: only the N-rank row")
    p.add_argument("--variant", default="fast", choices=list(VARIANTS))
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, choices=(1, 2, 3, 4))
    p.add_argument("--plain-forwards", type=int, default=1, help="timed one-GPU diffusers forwards (slow: ~11 s)")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CPU + gloo + the tiny model (smoke test)")
    args = p.parse_args(argv)
    models = [m for m in args.model.split(",") if m]
    allowed = list(SPECS) if args.request else [k for k, s in SPECS.items() if s.kind == "t2v"]
    if not models or [m for m in models if m not in allowed] or (not args.request and len(models) != 1):
        p.error(f"--model {args.model!r}: give {'a comma list of' if args.request else 'one of'} {allowed}")
    if not args.tiny and torch.cuda.device_count() < args.world_size:
        p.error(f"needs {args.world_size} CUDA GPUs, found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(args.world_size, port, args), nprocs=args.world_size, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
