"""Wan2.1 VAE decode variants (issue 17, deliverable 3): stock diffusers vs today's fast decode vs each
`engine.vae_decode.DecodeVariant`, bf16, random weights of the default AutoencoderKLWan config.

    python -m bench.vae_variants --out DIR            (GPU, one process, < 3 minutes on an H200)
    python -m bench.vae_variants --tiny --out DIR     (CPU smoke test: tiny VAE and latents, aot_eager compile)

Parts, in priority order (a part that would overrun --budget-s is skipped and listed as such):
  convs   one causal 3x3x3 conv of each decoder stage: conv3d vs conv2d (stacked) vs conv2d (shifted), TFLOP/s;
          an upsampler (nearest 2x + 3x3 conv): stock (float32 upsample) vs native dtype vs subpixel
  stock   diffusers' decode at 480p 81 frames: fp32 (the PSNR reference, one call) and bf16 (the frame reference)
  480p    each variant (chunk 2, channels_last_3d, cudnn.benchmark as in the pipeline): first call (compile,
          autotune, capture), median of 3 after it, peak memory, frames as uint8 vs stock bf16 (max level
          difference, fraction of pixels more than 1 level off), PSNR vs stock fp32 and the same level
          statistics vs stock fp32 (stock bf16's own row is the yardstick: with random weights bf16 rounding
          alone moves pixels by several levels)
  720p    stock bf16, today's fast decode and the two fastest 480p variants (chunk 1)
  extras  more variants at 480p, CPU issue time vs GPU time per chunk (does launch overhead show?), and the
          decode handed to the host per chunk synchronously (today's pipeline) vs one chunk behind (host_frames)
Everything goes to DIR/vae_variants.json after each measurement; a table is printed at the end. Each measurement
is in its own try/except: a failure is recorded (with its traceback printed) and the rest still runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
import traceback

import torch

from . import _ROOT  # noqa: F401  (sets up the turboflow namespace on a bare tree)

RES: dict = {"480p": {}, "720p": {}, "convs": {}, "extras": {}, "errors": {}, "skipped": []}
OUT = "out/vae_variants"
START = time.perf_counter()
BUDGET_S = 160.0  # the process also imports torch/diffusers and finishes its last part

# (row name, variant spec): the main list, then the extras (run if the budget allows)
MAIN = [
    ("base", "base"),
    ("upsample", "upsample"),
    ("subpixel", "subpixel"),
    ("conv2d+upsample", "conv2d+upsample"),
    ("compile_block+upsample", "compile_block+upsample"),
    ("conv2d+compile_block+upsample", "conv2d+compile_block+upsample"),
    ("conv2d+compile_block+subpixel", "conv2d+compile_block+subpixel"),  # reuses the graphs compiled above
]
EXTRAS = [
    ("conv2d+subpixel", "conv2d+subpixel"),
    ("conv2d", "conv2d"),
    ("conv2d_shifted+upsample", "conv2d_shifted+upsample"),
    ("compile_norm+upsample", "compile_norm+upsample"),
]


def log(*a):
    print(f"[vae {time.perf_counter() - START:6.1f}s]", *a, flush=True)


def _save():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "vae_variants.json"), "w") as fh:
        json.dump(RES, fh, indent=1, default=str)


def _left() -> float:
    return BUDGET_S - (time.perf_counter() - START)


def _part(name: str, need_s: float, fn, *args):
    """Run one measurement unless it would overrun the budget; record any failure and carry on."""
    if _left() < need_s:
        RES["skipped"].append(f"{name} (needs ~{need_s:.0f} s, {_left():.0f} s left)")
        log("skip", name)
        _save()
        return None
    try:
        return fn(*args)
    except Exception as e:  # keep measuring the rest
        RES["errors"][name] = f"{type(e).__name__}: {str(e)[:600]}"
        log("FAILED", name, RES["errors"][name])
        traceback.print_exc()
        return None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _save()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _seconds(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def _median_seconds(fn, reps: int, warmup: int = 1) -> float:
    if torch.cuda.is_available():
        from .timing import cuda_median_seconds

        return cuda_median_seconds(fn, reps=reps, warmup=warmup)
    for _ in range(warmup):
        fn()
    return statistics.median(_seconds(fn) for _ in range(reps))


def _env(dev) -> dict:
    import diffusers

    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


# ---- one conv per stage -------------------------------------------------------------------------------------


def convs(dev, tiny: bool):
    """One causal 3x3x3 conv (input with a two-frame cache, as in a steady chunk) per decoder stage, bf16,
    channels_last_3d, cudnn.benchmark on: conv3d (today) vs stacked conv2d vs shifted conv2d."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    from turboflow.engine.vae_decode import _causal_conv_forward, _shifted_conv, _stacked_conv

    # the kernels themselves, whatever the decode's eligibility rule (conv_out's 3 outputs stay conv3d there)
    impls = {"conv3d": _causal_conv_forward, "conv2d": _stacked_conv, "conv2d_shifted": _shifted_conv}

    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    # (stage, C_in, C_out, frames per chunk of 2 latent frames, H, W)
    shapes = (
        [("full 96ch", 8, 8, 8, 48, 80)]
        if tiny
        else [
            ("full 96ch 480x832", 96, 96, 8, 480, 832),
            ("192ch 240x416", 192, 192, 8, 240, 416),
            ("384ch 120x208", 384, 384, 4, 120, 208),
            ("conv_out 96->3 480x832", 96, 3, 8, 480, 832),
        ]
    )
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    for stage, cin, cout, frames, h, w in shapes:
        torch.manual_seed(0)
        conv = WanCausalConv3d(cin, cout, 3, padding=1).to(dev, dt).eval()
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
        x = torch.randn(1, cin, frames, h, w, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last_3d)
        cache = torch.randn(1, cin, 2, h, w, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last_3d)
        flops = 2 * cout * cin * 27 * frames * h * w
        row = {"flops": flops}
        with torch.no_grad():
            ref = _causal_conv_forward(conv, x, cache).float()
            for impl, fn in impls.items():
                try:
                    y = fn(conv, x, cache).float()
                    s = _median_seconds(lambda: fn(conv, x, cache), reps=10, warmup=2)  # noqa: B023
                    row[impl] = {
                        "ms": round(s * 1e3, 3),
                        "tflops": round(flops / s / 1e12, 1),
                        "max_abs_vs_conv3d": float((y - ref).abs().max()),
                    }
                except Exception as e:
                    row[impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    traceback.print_exc()
        RES["convs"][stage] = row
        log("conv", stage, {k: v for k, v in row.items() if k != "flops"})
        del x, cache, conv
    upsample_convs(dev, tiny, dt)
    torch.backends.cudnn.benchmark = False


def upsample_convs(dev, tiny: bool, dt):
    """An upsampler's nearest 2x upsample + 3x3 conv on one chunk's frames: stock (through float32), native dtype,
    subpixel (four 2x2 phase convs as one conv2d)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

    from turboflow.engine.vae_decode import _native_upsample_forward, _subpixel_forward

    # (stage, C, frames, h, w): the input of the upsampler (its conv halves the channels)
    shapes = (
        [("up 16ch", 16, 8, 24, 40)]
        if tiny
        else [("up 192ch 240x416", 192, 8, 240, 416), ("up 384ch 120x208", 384, 8, 120, 208)]
    )
    for stage, c, frames, h, w in shapes:
        torch.manual_seed(0)
        resample = WanResample(c, "upsample2d", upsample_out_dim=c // 2).to(dev, dt).eval().resample
        resample[1].weight.data = resample[1].weight.data.contiguous(memory_format=torch.channels_last)
        x = torch.randn(frames, c, h, w, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last)
        flops = 2 * (c // 2) * c * 9 * frames * 4 * h * w
        ways = {
            "stock": lambda: resample(x),
            "native": lambda: resample[1](_native_upsample_forward(resample[0], x)),
            "subpixel": lambda: _subpixel_forward(resample, x),
        }
        row = {"flops_stock": flops}
        with torch.no_grad():
            ref = ways["stock"]().float()
            for name, fn in ways.items():
                try:
                    y = fn().float()
                    s = _median_seconds(fn, reps=10, warmup=2)
                    row[name] = {
                        "ms": round(s * 1e3, 3),
                        "max_abs_vs_stock": float((y - ref).abs().max()),
                        "ref_abs_max": float(ref.abs().max()),
                    }
                except Exception as e:
                    row[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    traceback.print_exc()
        RES["convs"][stage] = row
        log("upsample conv", stage, {k: v for k, v in row.items() if k != "flops_stock"})
        del x, resample


# ---- whole decodes ------------------------------------------------------------------------------------------


class Decodes:
    """The VAE (fp32 for the reference, then bf16), the latents, and the references every variant is compared to."""

    def __init__(self, dev, tiny: bool):
        from diffusers import AutoencoderKLWan

        from turboflow.engine.families.wan import TINY_VAE

        self.dev, self.tiny = dev, tiny
        torch.manual_seed(0)
        with torch.device(dev):
            self.vae32 = (AutoencoderKLWan(**TINY_VAE) if tiny else AutoencoderKLWan()).eval().requires_grad_(False)
        gen = torch.Generator(device=dev).manual_seed(1)
        self.latents = {
            "480p": torch.randn(
                1, 16, 3 if tiny else 21, 6 if tiny else 60, 10 if tiny else 104, device=dev, generator=gen
            ),
            "720p": torch.randn(
                1, 16, 3 if tiny else 21, 9 if tiny else 90, 16 if tiny else 160, device=dev, generator=gen
            ),
        }
        self.vae16 = None
        self.ref32 = None  # stock fp32 video at 480p
        self.stock_u8: dict[str, torch.Tensor] = {}
        self.stock_s: dict[str, float] = {}
        self.reps = 1 if tiny else 3
        self.dt = torch.bfloat16

    def _variant(self, spec: str):
        from turboflow.engine.vae_decode import DecodeVariant

        variant = DecodeVariant.parse(spec)
        if self.dev.type != "cuda":  # no Inductor build on a CPU smoke test
            variant = DecodeVariant(**{**variant.__dict__, "compile_backend": "aot_eager"})
        return variant

    def stock_fp32(self):
        with torch.no_grad():
            z = self.latents["480p"]
            t0 = time.perf_counter()
            self.ref32 = self.vae32.decode(z, return_dict=False)[0]
            _sync()
            RES["480p"]["stock_fp32"] = {
                "first_call_s": round(time.perf_counter() - t0, 3),
                "ref_std": float(self.ref32.float().std()),
            }
        log("stock fp32", RES["480p"]["stock_fp32"])

    def make_bf16(self):
        self.vae16 = copy.deepcopy(self.vae32).to(self.dt)
        del self.vae32
        self.vae32 = None

    def layout(self, channels_last: bool):
        """Decoder weights channels_last_3d (the pipeline's fast decode) or contiguous (as stock diffusers builds
        them)."""
        from turboflow.engine.vae_decode import to_channels_last

        if channels_last:
            to_channels_last(self.vae16)
        else:
            for m in self.vae16.decoder.modules():
                if isinstance(m, torch.nn.Conv3d | torch.nn.Conv2d):
                    m.weight.data = m.weight.data.contiguous()

    def stock_bf16(self, res: str):
        from turboflow.engine.vae_decode import to_uint8_frames

        self.layout(False)
        torch.backends.cudnn.benchmark = False  # stock diffusers, as the pipeline runs it
        z = self.latents[res].to(self.dt)
        last: dict = {}

        def run():
            last.clear()  # the previous output is freed before the next decode (peak memory)
            last["out"] = self.vae16.decode(z, return_dict=False)[0]

        with torch.no_grad():
            row = self._timed(run)
            out = last.pop("out")
            row.update(self._compare(res, out))  # vs fp32: the bf16 decode's own distance, the yardstick
            self.stock_u8[res] = to_uint8_frames(out)
        self.stock_s[res] = row["median_s"]
        RES[res]["stock_bf16"] = row
        log(res, "stock bf16", row)

    def _timed(self, fn) -> dict:
        """First call (compile / cudnn search / capture), then the median of `reps`, and the decode's peak memory
        above what was allocated before it."""
        cuda = self.dev.type == "cuda"
        first = _seconds(fn)
        if cuda:
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        median = _median_seconds(fn, reps=self.reps, warmup=0)
        row = {"first_call_s": round(first, 3), "median_s": round(median, 4)}
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            row["peak_gb"] = round(peak / 1e9, 2)
            row["decode_extra_gb"] = round((peak - before) / 1e9, 2)
        return row

    def variant(self, res: str, name: str, spec: str, chunk: int | None = None):
        from turboflow.engine.vae_decode import fast_decode

        variant = self._variant(spec)
        chunk = chunk or (1 if self.tiny else None)  # tiny: chunks with steady shapes (compiled, captured) exist
        self.layout(True)
        torch.backends.cudnn.benchmark = self.dev.type == "cuda"  # as TurboVideoPipeline.decode
        z = self.latents[res].to(self.dt).contiguous(memory_format=torch.channels_last_3d)

        last: dict = {}

        def run():
            last.clear()  # the previous output is freed before the next decode (peak memory)
            last["out"] = fast_decode(self.vae16, z, chunk=chunk, channels_last=True, variant=variant)

        try:
            row = self._timed(run)
            out = last.pop("out")
            row.update(self._compare(res, out))
        finally:
            torch.backends.cudnn.benchmark = False
        stock = self.stock_s.get(res)
        base = RES[res].get("base", {}).get("median_s")
        if stock:
            row["speedup_vs_stock"] = round(stock / row["median_s"], 2)
        if base and name != "base":
            row["speedup_vs_base"] = round(base / row["median_s"], 3)
        row["variant"], row["chunk"] = variant.name, chunk
        RES[res][name] = row
        log(res, name, row)
        del out
        return row

    def _compare(self, res: str, out: torch.Tensor) -> dict:
        from turboflow.engine.vae_decode import psnr, to_uint8_frames

        row = {}
        stock = self.stock_u8.get(res)
        if stock is not None:
            diff = (to_uint8_frames(out).int() - stock.int()).abs()
            row["max_level_diff_vs_stock_bf16"] = int(diff.max())
            row["frac_pixels_off_by_more_than_1"] = float((diff > 1).float().mean())
            row["frac_pixels_differing"] = float((diff > 0).float().mean())
        if res == "480p" and self.ref32 is not None:
            row["psnr_vs_fp32"] = round(psnr(out, self.ref32), 3)
            # the same level statistics against the fp32 decode: a variant as close to it as the stock bf16
            # decode is as accurate as stock, whatever its distance to stock's own rounding
            diff = (to_uint8_frames(out).int() - to_uint8_frames(self.ref32).int()).abs()
            row["max_level_diff_vs_fp32"] = int(diff.max())
            row["frac_pixels_off_by_more_than_1_vs_fp32"] = float((diff > 1).float().mean())
        return row

    # ---- diagnostics ----

    def launch_profile(self, spec: str):
        """Per chunk: seconds the CPU takes to issue the chunk (the generator yields once the decoder call
        returned) vs seconds until the GPU finished it. Issue << total: launch overhead is hidden."""
        from turboflow.engine.vae_decode import decode_chunks

        variant = self._variant(spec)
        self.layout(True)
        torch.backends.cudnn.benchmark = self.dev.type == "cuda"
        z = self.latents["480p"].to(self.dt).contiguous(memory_format=torch.channels_last_3d)
        issue, total = [], []
        try:
            with torch.no_grad():
                pieces = decode_chunks(self.vae16, z, channels_last=True, variant=variant)
                while True:
                    _sync()
                    t0 = time.perf_counter()
                    try:
                        next(pieces)
                    except StopIteration:
                        break
                    t1 = time.perf_counter()
                    _sync()
                    issue.append(t1 - t0)
                    total.append(time.perf_counter() - t0)
        finally:
            torch.backends.cudnn.benchmark = False
        steady = slice(2, None) if len(total) > 2 else slice(None)  # the first two chunks have other shapes
        row = {
            "chunks": len(total),
            "issue_ms_median_steady": round(statistics.median(issue[steady]) * 1e3, 2),
            "chunk_ms_median_steady": round(statistics.median(total[steady]) * 1e3, 2),
            "issue_ms": [round(t * 1e3, 2) for t in issue],
            "chunk_ms": [round(t * 1e3, 2) for t in total],
        }
        RES["extras"][f"launch_profile {variant.name}"] = row
        log("launch profile", variant.name, {k: v for k, v in row.items() if "median" in k})

    def profile(self, spec: str):
        """One decode under torch.profiler (CUDA kernels only): GPU busy time vs wall time (the difference is idle
        GPU: launch overhead, syncs), busy time split into convolution kernels and the rest, the top kernels."""
        from torch.profiler import ProfilerActivity, profile

        from turboflow.engine.vae_decode import fast_decode

        variant = self._variant(spec)
        self.layout(True)
        torch.backends.cudnn.benchmark = self.dev.type == "cuda"
        z = self.latents["480p"].to(self.dt).contiguous(memory_format=torch.channels_last_3d)
        activity = ProfilerActivity.CUDA if self.dev.type == "cuda" else ProfilerActivity.CPU  # CPU: smoke test
        try:
            with torch.no_grad():
                fast_decode(self.vae16, z, channels_last=True, variant=variant)  # warm (compiled, searched)
                _sync()
                with profile(activities=[activity]) as prof:
                    wall = _seconds(lambda: fast_decode(self.vae16, z, channels_last=True, variant=variant))
        finally:
            torch.backends.cudnn.benchmark = False
        kernels = []
        for event in prof.key_averages():
            device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
            if activity == ProfilerActivity.CPU:
                device_us = event.self_cpu_time_total
            if device_us:
                kernels.append((device_us / 1e3, event.key, event.count))
        kernels.sort(reverse=True)
        conv_words = ("conv", "xmma", "cudnn", "implicit", "gemm", "cutlass", "sm90", "wgmma", "nhwc")
        conv_ms = sum(ms for ms, name, _ in kernels if any(w in name.lower() for w in conv_words))
        busy_ms = sum(ms for ms, _, _ in kernels)
        row = {
            "wall_ms": round(wall * 1e3, 1),
            "gpu_busy_ms": round(busy_ms, 1),
            "conv_like_ms": round(conv_ms, 1),
            "other_ms": round(busy_ms - conv_ms, 1),
            "kernel_launches": sum(count for _, _, count in kernels),
            "top": [[round(ms, 2), name[:120], count] for ms, name, count in kernels[:20]],
        }
        RES["extras"][f"profile {variant.name}"] = row
        log("profile", variant.name, {k: v for k, v in row.items() if k != "top"})
        for ms, name, count in row["top"][:8]:
            log(f"   {ms:8.2f} ms  x{count:<5} {name}")

    def host_handoff(self, spec: str):
        """Decoded chunks to uint8 frames on the host: synchronously per chunk (the pipeline today) vs
        host_frames (GPU conversion, pinned non-blocking copy, handed over one chunk later)."""
        from turboflow.engine.vae_decode import decode_chunks, host_frames, to_uint8_frames

        variant = self._variant(spec)
        self.layout(True)
        torch.backends.cudnn.benchmark = self.dev.type == "cuda"
        z = self.latents["480p"].to(self.dt).contiguous(memory_format=torch.channels_last_3d)

        def synchronous():
            return [
                to_uint8_frames(p).cpu().numpy()
                for p in decode_chunks(self.vae16, z, channels_last=True, variant=variant)
            ]

        def one_behind():
            return list(host_frames(decode_chunks(self.vae16, z, channels_last=True, variant=variant)))

        row = {}
        try:
            with torch.no_grad():
                a, b = synchronous(), one_behind()
                row["frames_equal"] = all((x == y).all() for x, y in zip(a, b, strict=True))
                for name, fn in (("synchronous_s", synchronous), ("host_frames_s", one_behind)):
                    row[name] = round(statistics.median(_seconds(fn) for _ in range(self.reps)), 4)
        finally:
            torch.backends.cudnn.benchmark = False
        RES["extras"][f"host_handoff {variant.name}"] = row
        log("host hand-off", variant.name, row)


def _fastest(res: str, exclude=("stock_bf16", "stock_fp32")) -> list[tuple[str, str]]:
    rows = [
        (r["median_s"], name, r["variant"]) for name, r in RES[res].items() if name not in exclude and "variant" in r
    ]
    return [(name, spec) for _, name, spec in sorted(rows)]


def _table() -> str:
    lines = []
    for res in ("480p", "720p"):
        if not RES[res]:
            continue
        lines.append(f"\n{res} 81 frames, bf16")
        lines.append(
            f"{'decode':<34} {'first s':>8} {'median s':>9} {'x stock':>8} {'x base':>7} {'peak GB':>8} "
            f"{'max lvl':>7} {'>1 lvl':>9} {'PSNR':>7} {'fp32 max':>8} {'fp32 >1':>9}"
        )
        for name, r in RES[res].items():
            if "median_s" not in r:
                continue
            frac = r.get("frac_pixels_off_by_more_than_1")
            frac32 = r.get("frac_pixels_off_by_more_than_1_vs_fp32")
            lines.append(
                f"{name:<34} {r.get('first_call_s', ''):>8} {r['median_s']:>9} {r.get('speedup_vs_stock', ''):>8} "
                f"{r.get('speedup_vs_base', ''):>7} {r.get('peak_gb', ''):>8} "
                f"{r.get('max_level_diff_vs_stock_bf16', ''):>7} {'' if frac is None else f'{frac:.2e}':>9} "
                f"{r.get('psnr_vs_fp32', ''):>7} {r.get('max_level_diff_vs_fp32', ''):>8} "
                f"{'' if frac32 is None else f'{frac32:.2e}':>9}"
            )
    if RES["convs"]:
        lines.append("\none causal 3x3x3 conv per stage (ms / TFLOP/s)")
        for stage, row in RES["convs"].items():
            impls = ("stock", "native", "subpixel") if "flops_stock" in row else ("conv3d", "conv2d", "conv2d_shifted")
            cells = [
                f"{impl} {row[impl]['ms']}" + (f" / {row[impl]['tflops']}" if "tflops" in row[impl] else "")
                if "ms" in row.get(impl, {})
                else f"{impl} error"
                for impl in impls
            ]
            lines.append(f"{stage:<26} " + " | ".join(cells))
    for name, row in RES["extras"].items():
        lines.append(f"{name}: { {k: v for k, v in row.items() if not isinstance(v, list)} }")
        for ms, kernel, count in row.get("top", [])[:6]:
            lines.append(f"    {ms:8.2f} ms x{count:<5} {kernel}")
    if RES["skipped"]:
        lines.append("skipped: " + "; ".join(RES["skipped"]))
    if RES["errors"]:
        lines.append("errors: " + "; ".join(f"{k}: {v[:120]}" for k, v in RES["errors"].items()))
    return "\n".join(lines)


def main() -> None:
    global OUT, BUDGET_S
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with the tiny VAE")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="skip parts that would run past this")
    ap.add_argument("--parts", default="convs,stock,480p,720p,extras")
    args = ap.parse_args()
    OUT, BUDGET_S = args.out, args.budget_s
    parts = set(args.parts.split(","))
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    RES["env"] = _env(dev)
    RES["budget_s"] = BUDGET_S
    log("env", RES["env"])
    tiny = args.tiny

    if "convs" in parts:
        _part("convs", 5, convs, dev, tiny)

    decodes = _part("build", 5, Decodes, dev, tiny) if parts - {"convs"} else None
    if decodes is None:
        print(_table())
        return
    if "stock" in parts or "480p" in parts:
        _part("stock fp32 480p", 10, decodes.stock_fp32)
        decodes.make_bf16()
        _part("stock bf16 480p", 10, decodes.stock_bf16, "480p")
    else:
        decodes.make_bf16()
    if "480p" in parts:
        for name, spec in MAIN:
            _part(f"480p {name}", 45 if "compile" in spec else 10, decodes.variant, "480p", name, spec)
    if "720p" in parts:
        _part("stock bf16 720p", 25, decodes.stock_bf16, "720p")
        _part("720p base", 15, decodes.variant, "720p", "base", "base")
        for name, spec in [f for f in _fastest("480p") if f[0] != "base"][:2]:
            _part(f"720p {name}", 50 if "compile" in spec else 15, decodes.variant, "720p", name, spec)
    if "extras" in parts:
        best = (_fastest("480p") or [("base", "base")])[0][1]
        _part("profile base", 8, decodes.profile, "base")
        if best != "base":
            _part(f"profile {best}", 8, decodes.profile, best)
        _part("launch profile base", 5, decodes.launch_profile, "base")
        graph_spec = "graph" if best == "base" else f"{best}+graph"
        _part(f"480p {graph_spec}", 10, decodes.variant, "480p", graph_spec, graph_spec)
        if best != "base":
            _part(f"launch profile {best}", 5, decodes.launch_profile, best)
        _part(f"host hand-off {best}", 10, decodes.host_handoff, best)
        for name, spec in EXTRAS:
            _part(f"480p {name}", 45 if "compile" in spec else 10, decodes.variant, "480p", name, spec)
        _part(f"480p {best} chunk 4", 10, decodes.variant, "480p", f"{best} chunk 4", best, 4)
    RES["wall_s"] = round(time.perf_counter() - START, 1)
    _save()
    print(_table())
    print(f"\nwall {RES['wall_s']} s; JSON: {os.path.join(OUT, 'vae_variants.json')}")


if __name__ == "__main__":
    main()
