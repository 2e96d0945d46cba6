"""Benchmark every stage of turboflow against plain diffusers on the same GPU, in the same run.

    python -m bench.run --out OUT [--models 1.3b-480p,14b-480p,14b-720p,i2v-a14b-720p] [--coldstart]
    python -m bench.run --tiny --out OUT          # CPU, tiny models: same JSON/markdown structure (tests)

Per model (full-size architectures, random weights created on the GPU): text encode, each DiT step, VAE
encode (I2V) and decode, mp4 encode, S3 upload (moto on 127.0.0.1), total and peak GPU memory for OUR pipeline
(TurboVideoPipeline, rCM sampling), and for plain diffusers on the same modules and shapes, called the way
WanPipeline calls them: `_get_t5_prompt_embeds` (512 tokens), `transformer(hidden_states, timestep,
encoder_hidden_states)` + UniPC scheduler step with guidance OFF (one forward per step, like rCM: the ratio is
per step; stock Wan with CFG does 2 forwards x 50 steps), `vae.decode` + `VideoProcessor.postprocess_video`.
Heavy models run fewer timed steps (Spec.steps) after a warm-up run; `projected_total_4_steps_s` extrapolates
with the median step. Results: OUT/bench.json and OUT/bench.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from . import _ROOT  # noqa: F401  (sets up the turboflow namespace on a bare tree)
from .baseline import run_baseline
from .models import SPECS, Spec, build_text_encoder, build_tokenizer, build_transformer, build_vae, tiny_specs
from .report import markdown, speedups, write
from .variants import VARIANTS

PROMPT = "a red fox running through fresh snow in a pine forest at sunrise, cinematic slow motion, wide shot"


def log(*a):
    print(f"[bench {time.strftime('%H:%M:%S')}]", *a, flush=True)


class Clock:
    def __init__(self, device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn, *a, **kw):
        self.sync()
        t = time.perf_counter()
        out = fn(*a, **kw)
        self.sync()
        return out, time.perf_counter() - t


def environment(args) -> dict:
    env = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host_cpus": os.cpu_count(),
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
    }
    for mod in ("diffusers", "transformers", "safetensors", "av"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            env[mod] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1e9, 1), cuda=torch.version.cuda)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except Exception:  # noqa: BLE001
            env["driver"] = None
    else:
        env.update(gpu=None, driver=None)
    return env


# ---- S3 ---------------------------------------------------------------------------------------------------------
class S3:
    """moto's ThreadedMotoServer on loopback + the real turboflow S3Store; None when moto is unavailable."""

    def __init__(self):
        self.store, self.server, self.error = None, None, None
        try:
            from moto.server import ThreadedMotoServer

            from turboflow.storage.s3 import S3Store

            os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self.server.start()
            host, port = self.server.get_host_and_port()
            env = {
                "S3_ENDPOINT_URL": f"http://{host}:{port}",
                "TURBOFLOW_BUCKET": "bench",
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_REGION": "us-east-1",
            }
            store = S3Store.from_env(env)
            store.client.create_bucket(Bucket="bench")
            self.store = store
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {e}"
            log("S3 skipped:", self.error)

    def upload(self, path, key) -> float | None:
        if self.store is None:
            return None
        t = time.perf_counter()
        try:
            self.store.put_video(path, key, {"bench": "1"})
        except Exception as e:  # noqa: BLE001  (an S3 problem must not hide the GPU numbers)
            self.error = f"{type(e).__name__}: {e}"
            log("S3 upload failed:", self.error)
            return None
        return time.perf_counter() - t

    def stop(self):
        if self.server is not None:
            self.server.stop()


# ---- one model ----------------------------------------------------------------------------------------------------
def _image(width, height):
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _median(xs):
    return statistics.median(xs) if xs else None


def _size(spec: Spec) -> tuple[int, int]:
    from turboflow.engine.request import GenerationRequest

    return GenerationRequest(prompt="x", resolution=spec.resolution, aspect_ratio=spec.aspect_ratio).validated().size


def ours_request(pipe, spec: Spec, variant: dict, num_steps: int):
    """The request run_ours sends (seed 1, the spec's size, frames, sigma_max and boundary, the variant's fields;
    I2V: the seeded random image), validated without the manifest's defaults: the spec and the variant decide every
    field. The image is decoded here, outside any timed run."""
    from turboflow.engine.request import GenerationRequest

    base = dict(
        prompt=PROMPT,
        kind=spec.kind,
        resolution=spec.resolution,
        aspect_ratio=spec.aspect_ratio,
        num_frames=spec.frames,
        seed=1,
        sigma_max=spec.sigma_max,
        boundary=spec.boundary,
        adaptive_resolution=False,
        **variant.get("request", {}),
    )
    if spec.kind == "i2v":
        base["image"] = _image(*_size(spec))
    return GenerationRequest(num_steps=num_steps, **base).validated(pipe.family)


def run_ours(pipe, spec: Spec, variant: dict, clock: Clock, s3: S3, workdir: Path) -> dict:
    from turboflow.engine.video import Mp4Stream

    w, h = _size(spec)
    log(f"  ours: warm-up ({spec.warmup_steps} step(s))")
    pipe(ours_request(pipe, spec, variant, spec.warmup_steps))
    timed = ours_request(pipe, spec, variant, spec.steps)
    if clock.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(clock.device)
    marks = []

    def progress(i, n):
        clock.sync()
        marks.append(time.perf_counter())

    log(f"  ours: timed run ({spec.steps} step(s))")
    # as the functions do: each decoded chunk is encoded on a thread while the next one decodes
    mp4 = workdir / f"{spec.kind}-{spec.resolution}.mp4"
    stream = Mp4Stream(mp4, w, h, fps=pipe.fps, background=True)
    clock.sync()
    t0 = time.perf_counter()
    try:
        result = pipe(timed, progress, frame_sink=stream.put)
    except BaseException:
        stream.abort()
        raise
    t_gen = time.perf_counter() - t0
    t_mp4 = time.perf_counter()
    info = stream.finish()
    mp4_left = time.perf_counter() - t_mp4  # the encode the overlap did not hide
    peak = torch.cuda.max_memory_allocated(clock.device) / 1e9 if clock.device.type == "cuda" else None
    tm = result.timings
    before_steps = tm["text_encode"] + tm.get("vae_encode", 0.0)
    starts = [t0 + before_steps] + marks[:-1]  # diffusion begins right after the encoders (stage clock syncs)
    steps = [b - a for a, b in zip(starts, marks)]
    steps[0] = tm["diffusion"] - sum(steps[1:])  # exact: the first step absorbs the initial-noise draw
    upload = s3.upload(mp4, f"bench/{mp4.name}")
    total = t_gen + mp4_left + (upload or 0.0)
    med = _median(steps)
    rest = tm["text_encode"] + tm.get("vae_encode", 0.0) + tm["vae_decode"] + mp4_left + (upload or 0.0)
    return {
        "text_encode_s": tm["text_encode"],
        "vae_encode_s": tm.get("vae_encode"),
        "steps_s": steps,
        "step_median_s": med,
        "diffusion_s": tm["diffusion"],
        "vae_decode_s": tm["vae_decode"],
        "mp4_encode_s": mp4_left,
        "mp4_encode_total_s": info.encode_seconds,
        "mp4_bytes": info.bytes,
        "s3_upload_s": upload,
        "total_s": total,
        "projected_total_4_steps_s": rest + 4 * med,
        "projected_dit_4_steps_s": 4 * med,
        "experts": result.experts,
        "peak_gpu_gb": peak,
        "frames": list(result.frames.shape),
    }


def build_pipeline(key: str, spec: Spec, device, dtype, workdir: Path, quant_at_build: str | None = None):
    """The whole TurboVideoPipeline of `spec` with random weights built on `device` (text encoder, VAE, the DiT or
    both I2V experts, always in that order: seed torch first and every process builds the same weights), each DiT
    quantised to `quant_at_build` as soon as it exists; I2V decides its offload as load_pipeline's "auto" does.
    Returns (pipeline, build seconds, offload, DiT weights GB as built)."""
    from turboflow.engine.pipeline import TurboVideoPipeline

    clock = Clock(device)
    t = time.perf_counter()
    te = build_text_encoder(spec.text, device, dtype)
    vae = build_vae(spec.vae, device, dtype)

    def transformer():
        net = build_transformer(spec.transformer, device, dtype)
        if quant_at_build:
            from turboflow.engine.linear import quantize_transformer

            quantize_transformer(net, quant_at_build)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return net

    tr = transformer()
    tr2, offload = None, "none"
    if spec.kind == "i2v":
        tr2 = transformer()
        if device.type == "cuda":  # what load_pipeline's offload="auto" decides
            params = sum(p.numel() * p.element_size() for m in (te, vae, tr, tr2) for p in m.parameters())
            free, _ = torch.cuda.mem_get_info(device)
            offload = "none" if free >= (30 << 30) else "experts"
            if offload == "experts":
                tr2.to("cpu")
            log(f"  weights {params / 1e9:.1f} GB, free {free / 1e9:.1f} GB -> offload={offload}")
    clock.sync()
    build_s = time.perf_counter() - t
    built_weights_gb = dit_weights_gb(SimpleNamespace(transformer=tr, transformer_2=tr2))
    tok = build_tokenizer(workdir / "tokenizer")
    pipe = TurboVideoPipeline(
        kind=spec.kind,
        transformer=tr,
        transformer_2=tr2,
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        device=device,
        dtype=dtype,
        model_name=key,
        offload=offload,
    )
    return pipe, build_s, offload, built_weights_gb


def bench_model(
    key: str, spec: Spec, variants: list[str], device, dtype, s3: S3, workdir: Path, baseline: bool
) -> list[dict]:
    clock = Clock(device)
    log(f"{key}: building {spec.name} with random weights on {device}")
    # I2V with only quantising variants: quantise each expert as soon as it exists, so both fit on the GPU at once
    # (T2V quantises in the variant's prepare, after the bf16 baseline)
    quants = {VARIANTS[v].get("quant") for v in variants}
    quant_at_build = quants.pop() if len(quants) == 1 and spec.kind == "i2v" else None
    pipe, build_s, offload, built_weights_gb = build_pipeline(key, spec, device, dtype, workdir, quant_at_build)
    rows = []
    base = None
    if baseline and quant_at_build:
        base = {
            "error": f"skipped: the weights were quantised to {quant_at_build} at build (plain diffusers runs "
            "the bf16 weights)"
        }
    elif baseline:  # first, while the modules are as built (later variants compile and quantise in place)
        try:
            log(f"  diffusers baseline ({spec.steps} timed step(s))")
            base = run_baseline(pipe, spec, clock, PROMPT)
        except Exception as e:  # noqa: BLE001
            base = {"error": f"{type(e).__name__}: {e}"}
            log(traceback.format_exc())
    for vname in variants:
        variant = VARIANTS[vname]
        row = {
            "key": key,
            "model": spec.name,
            "variant": vname,
            "kind": spec.kind,
            "resolution": spec.resolution,
            "aspect_ratio": spec.aspect_ratio,
            "frames": spec.frames,
            "timed_steps": spec.steps,
            "warmup_steps": spec.warmup_steps,
            "offload": offload,
            "build_s": build_s,
            "quantized_at_build": quant_at_build,
            "built_dit_weights_gb": built_weights_gb,
            "published_5090_s": spec.published_s,
            "note": variant.get("note", ""),
        }
        try:
            if variant.get("prepare"):
                variant["prepare"](pipe)
            row["dit_weights_gb"] = dit_weights_gb(pipe)
            row["ours"] = run_ours(pipe, spec, variant, clock, s3, workdir)
        except Exception as e:  # noqa: BLE001
            row["ours_error"] = f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
        finally:
            if variant.get("restore"):
                variant["restore"](pipe)
        rows.append(row)
        log(
            f"  {vname}: "
            + ", ".join(f"{k}={v:.3f}" for k, v in (row.get("ours") or {}).items() if isinstance(v, float))
        )
    for row in rows:
        row["baseline"] = base
        row["speedup"] = speedups(row.get("ours"), base)
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def dit_weights_gb(pipe) -> float:
    """Bytes of the DiT weights (both experts for I2V), whatever their dtype or device."""
    nets = [n for n in (pipe.transformer, pipe.transformer_2) if n is not None]
    return sum(t.numel() * t.element_size() for n in nets for t in (*n.parameters(), *n.buffers())) / 1e9


def attention_op(device, tiny: bool, out: Path) -> dict:
    """SLA vs dense SDPA at Wan2.1-1.3B 480p 81-frame shapes (12 heads x 32,760 tokens x 128), bench.perf_opts' op."""
    from . import perf_opts

    out.mkdir(parents=True, exist_ok=True)
    perf_opts.OUT, perf_opts.RES = str(out), {}
    try:
        perf_opts.attention_op(device, tiny)
    except Exception as e:  # noqa: BLE001
        perf_opts.RES["error"] = f"{type(e).__name__}: {e}"
        log(traceback.format_exc())
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(perf_opts.RES)


# ---- main ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=os.environ.get("OUT") or "out/bench", help="directory for bench.json/bench.md")
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (CI; same output structure)")
    ap.add_argument("--models", default=None, help=f"comma list of {','.join(SPECS)} (default: all; none: '')")
    ap.add_argument("--variants", default="eager", help=f"comma list of {','.join(VARIANTS)}")
    ap.add_argument(
        "--plan",
        default=None,
        help="per-model variants, e.g. '1.3b-480p=eager,sla;14b-480p=turbo' "
        "(overrides --models/--variants; models run in the order given)",
    )
    ap.add_argument("--no-baseline", action="store_true", help="skip plain diffusers")
    ap.add_argument("--frames", type=int, default=None, help="override frames (e.g. 81)")
    ap.add_argument("--steps", type=int, default=None, help="override timed steps for every model")
    ap.add_argument("--attn-op", action="store_true", help="also time the SLA attention op against dense SDPA")
    ap.add_argument("--coldstart", action="store_true", help="also the loader GB/s and cold-start measurements")
    ap.add_argument("--cache-dir", default=None, help="where --coldstart writes the full-size model cache")
    args = ap.parse_args(argv)

    out = Path(args.out)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    specs = tiny_specs() if args.tiny else SPECS
    keys = list(specs) if args.models is None else [k for k in args.models.split(",") if k]
    plan = {k: [v for v in args.variants.split(",") if v] for k in keys}
    if args.plan:
        plan = {
            k.strip(): [v for v in vs.split(",") if v]
            for k, _, vs in (item.partition("=") for item in args.plan.split(";") if item.strip())
        }
        keys = list(plan)
        empty = [k for k, vs in plan.items() if not vs]
        if empty:
            ap.error(f"--plan: give each model its variants as MODEL=VARIANT[,VARIANT...]: {empty}")
    unknown = [k for k in keys if k not in specs] + [v for vs in plan.values() for v in vs if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown models/variants: {unknown}")
    result = {
        "environment": environment(args),
        "device": str(device),
        "dtype": str(dtype),
        "models": [],
        "notes": NOTES,
    }
    if not args.tiny and device.type == "cpu":
        result["notes"] = result["notes"] + ["no CUDA device: full-size models on the CPU are not meaningful"]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    s3 = S3()
    if s3.error:
        result["notes"] = result["notes"] + [f"S3 upload skipped: {s3.error}"]
    work = Path(tempfile.mkdtemp(prefix="turboflow-bench-"))
    try:
        if args.coldstart:
            from .coldstart import measure

            try:
                result.update(
                    measure(Path(args.cache_dir) if args.cache_dir else work / "cache", tiny=args.tiny, log=log)
                )
            except Exception as e:  # noqa: BLE001
                result["coldstart_error"] = f"{type(e).__name__}: {e}"
                log(traceback.format_exc())
            write(result, out)
        if args.attn_op:
            result["attention_op"] = attention_op(device, args.tiny, out)
            write(result, out)
        for key in keys:
            spec = specs[key]
            if args.frames:
                spec.frames = args.frames
            if args.steps:
                spec.steps = args.steps
            try:
                result["models"] += bench_model(
                    key, spec, plan[key], device, dtype, s3, work, baseline=not args.no_baseline
                )
            except Exception as e:  # noqa: BLE001
                result["models"].append(
                    {
                        "key": key,
                        "model": spec.name,
                        "variant": ",".join(plan[key]),
                        "kind": spec.kind,
                        "resolution": spec.resolution,
                        "aspect_ratio": spec.aspect_ratio,
                        "frames": spec.frames,
                        "timed_steps": spec.steps,
                        "warmup_steps": spec.warmup_steps,
                        "offload": "?",
                        "ours_error": f"{type(e).__name__}: {e}",
                    }
                )
                log(traceback.format_exc())
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            write(result, out)
    finally:
        s3.stop()
    write(result, out)
    print(markdown(result))
    return 0


NOTES = [
    "Random weights at full size (speed does not depend on values); bf16 on GPU, diffusers' keep-in-fp32 modules "
    "(norms, time embedder, modulation, rope) in fp32 as from_pretrained leaves them.",
    "Plain diffusers = the same modules called as WanPipeline does (SDPA, bf16), classifier-free guidance OFF so "
    "both sides do one DiT forward per step; stock Wan 2.1 uses CFG (2 forwards) x 50 steps.",
    "TurboDiffusion's published RTX 5090 times exclude text encoding and VAE decoding: compare them with the "
    "'DiT 4 steps' row, not the total.",
    "The tokenizer is a small offline word-level one (the encoder always runs all 512 positions, so timing is "
    "unaffected).",
]

if __name__ == "__main__":
    sys.exit(main())
