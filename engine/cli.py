"""Engine verbs: `turboflow generate t2v|i2v ...` and `turboflow model tiny|verify|import|pull`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .families import families
from .fields import add_arguments, options_from_args
from .options import OFFLOAD_POLICIES
from .request import QUANT_LINEAR_MODES as QUANT_MODES

# progress labels per pipeline stage (engine.pipeline.StageProgress), with the unit each counts
_STAGES = {
    "text_encode": ("text encode", "prompt"),
    "vae_encode": ("image encode", "image"),
    "diffusion": ("rCM steps", "step"),
    "vae_decode": ("VAE decode", "frame"),
}


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate one video locally from a model cache directory")
    gen.add_argument("kind", choices=("t2v", "i2v"))
    gen.add_argument("--model", required=True, help="model cache directory (see `turboflow model`)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--image", help="I2V conditioning image (path)")
    # the request options, from the one field table (engine/fields.py): --resolution, --frames/--num-frames, ...
    add_arguments(gen, engine_only=True)
    perf = gen.add_argument_group("performance (see BENCHMARKS.md)")
    perf.add_argument(
        "--quant-linear",
        default=None,
        choices=QUANT_MODES,
        help="quantise the DiT's linears: fp8 (H100/Ada, W8A8), int8 (W8A8), int8_weight_only",
    )
    perf.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        metavar="MODE",
        help="torch.compile the DiT blocks (optional inductor MODE); the first run at a size compiles",
    )
    perf.add_argument(
        "--compile-cache",
        default=None,
        help="compile cache dir (default $TURBOFLOW_COMPILE_CACHE, else MODEL/.compile-cache)",
    )
    perf.add_argument("--no-fast-vae", dest="fast_vae", action="store_false", help="diffusers' stock VAE decode")
    perf.add_argument("--vae-chunk", type=_positive_int, default=None, help="latent frames per VAE decoder call")
    perf.add_argument(
        "--offload",
        default="auto",
        choices=OFFLOAD_POLICIES,
        help="I2V: keep both experts on the GPU (none) or park the idle one in pinned memory",
    )
    gen.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    gen.add_argument("--out", default="out/video.mp4")
    gen.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress display (it is off anyway when stderr is not a terminal)",
    )
    gen.set_defaults(func=_generate)

    model = sub.add_parser("model", help="model cache: build tiny models, verify, import real checkpoints")
    msub = model.add_subparsers(dest="model_command", metavar="ACTION")
    msub.required = True
    tiny = msub.add_parser("tiny", help="write a tiny random model of the real architecture (offline)")
    tiny.add_argument("dir")
    tiny.add_argument("--kind", choices=("t2v", "i2v"), default="t2v", help="the task (default t2v)")
    tiny.add_argument(
        "--family", choices=families(), default=None, help="model family (default: wan2.1 for t2v, wan2.2 for i2v)"
    )
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_tiny)
    verify = msub.add_parser("verify", help="check a model cache against its manifest")
    verify.add_argument("dir")
    verify.add_argument("--checksums", action="store_true", help="also hash every file (slow for real weights)")
    verify.set_defaults(func=_verify)
    from .model_cli import add_model_parsers

    add_model_parsers(msub)


class _StageBars:
    """One progress bar per pipeline stage on stderr, the VAE decode counted in frames as its chunks finish.
    Silent when stderr is not a terminal (logs, CI, pipes) or when asked to be."""

    def __init__(self, enabled: bool):
        self.enabled, self.bars = enabled, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage not in self.bars:
            label, unit = _STAGES.get(stage, (stage, "it"))
            self.bars[stage] = tqdm(total=total, desc=label, unit=unit, file=sys.stderr, leave=True)
        bar = self.bars[stage]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _generate(args) -> int:
    from .families import family
    from .loading import load_pipeline, resolve_device
    from .modelcache import read_manifest
    from .request import GenerationRequest
    from .video import Mp4Stream

    manifest = read_manifest(args.model)
    # the one validation step, before loading: model defaults filled, the image decoded, the size resolved
    request = GenerationRequest(
        prompt=args.prompt, kind=args.kind, image=args.image, **options_from_args(args, engine_only=True)
    ).validated(family(manifest.family), manifest.defaults)
    device = resolve_device(args.device)  # a missing GPU is a typed error here, not a traceback mid-load
    pipeline = load_pipeline(
        args.model,
        device=device,
        quant_linear=args.quant_linear,
        compile=args.compile or False,  # "default" is an inductor mode like the others
        compile_cache_dir=args.compile_cache,
        fast_vae=args.fast_vae,
        vae_chunk=args.vae_chunk,
        offload=args.offload,
        compile_warmup=[],
    )
    width, height = request.size
    mp4 = Mp4Stream(args.out, width, height, fps=pipeline.fps, background=True)  # encodes while the VAE decodes
    bars = _StageBars(enabled=not args.quiet and sys.stderr.isatty())
    try:
        result = pipeline(request, frame_sink=mp4.put, stage_progress=bars)
    except BaseException:
        mp4.abort()
        raise
    finally:
        bars.close()
    start = time.perf_counter()
    video = mp4.finish()
    # the seed used sits beside the timings: `--seed <it>` reproduces this video
    record = {**result.summary(), "video": video.to_dict()}
    record["timings"]["mp4_encode"] = time.perf_counter() - start
    print(json.dumps(record, indent=2))
    return 0


def _tiny(args) -> int:
    from .tiny import build_tiny

    manifest = build_tiny(args.dir, kind=args.kind, seed=args.seed, family=args.family)
    print(
        f"wrote {manifest.name} ({manifest.kind}, {len(manifest.files)} files, "
        f"{manifest.total_bytes / 1e6:.1f} MB) to {Path(args.dir).resolve()}"
    )
    return 0


def _verify(args) -> int:
    from .modelcache import verify

    manifest = verify(args.dir, checksums=args.checksums)
    what = "sizes and sha256" if args.checksums else "sizes"
    print(
        f"ok: {manifest.name} ({manifest.kind}), {len(manifest.files)} files, "
        f"{manifest.total_bytes / 1e9:.2f} GB, {what} match"
    )
    return 0
