"""`turboflow model import|pull|compile-artifacts ...` (engine/cli.py calls add_model_parsers)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from turboflow.errors import ModelCacheError
from turboflow.settings import AOT_COMPILE, COMPILE_MODES, QUANT_LINEAR_MODES, SLA_BACKENDS, warmup_sizes

from . import modelcache
from .families import families
from .options import COMPILE_BACKENDS, check_sizes

# model_import.DTYPES' names (tests/test_model_import.py keeps them equal): model_import imports torch, which every
# `turboflow` verb would otherwise pay (~1.3 s) just to list --dtype's choices
DTYPE_CHOICES = ("bf16", "bfloat16", "float32", "fp16", "fp32", "keep")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output model cache directory")
    p.add_argument("--kind", choices=modelcache.KINDS, required=True, help="the task the model serves")
    p.add_argument(
        "--family", choices=families(), default=None, help="model family (default: wan2.1 for t2v, wan2.2 for i2v)"
    )
    p.add_argument("--name", help="model name recorded in the manifest (default: from the DiT file name)")
    p.add_argument("--sigma-max", type=float, help="default sigma_max (default 80 t2v / 200 i2v)")
    p.add_argument("--boundary", type=float, help="I2V expert switch (default 0.9)")
    p.add_argument("--resolution", choices=("480p", "720p"), help="default resolution")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep", help="store weights as (default: as in file)")
    p.add_argument(
        "--keep-int8",
        action="store_true",
        help="-quant.pth DiTs: store their int8 layers and block "
        "scales as they are (half the cache and GPU memory; weight-only int8 at run time) instead of "
        "dequantizing them",
    )
    p.add_argument("--dit-config", type=json.loads, help="JSON overrides for WanTransformer3DModel's config")
    p.add_argument("--vae-config", type=json.loads, help="JSON AutoencoderKLWan config (default: Wan2.1 VAE)")
    p.add_argument("--t5-config", type=json.loads, help="JSON UMT5Config overrides (default: inferred)")
    p.add_argument("--force", action="store_true", help="replace an existing cache in DIR")


def add_model_parsers(msub: argparse._SubParsersAction) -> None:
    imp = msub.add_parser("import", help="convert downloaded TurboDiffusion/Wan files into a model cache")
    _common(imp)
    imp.add_argument(
        "--dit",
        help="DiT: TurboDiffusion .pth (or -quant.pth) or a diffusers transformer directory; "
        "I2V: the high-noise expert",
    )
    imp.add_argument("--dit-low", help="I2V low-noise expert (.pth or directory)")
    imp.add_argument("--vae", help="Wan2.1_VAE.pth or a diffusers vae directory")
    imp.add_argument("--text-encoder", help="models_t5_umt5-xxl-enc-bf16.pth or a transformers directory")
    imp.add_argument("--tokenizer", dest="tokenizer_dir", help="local umT5 tokenizer directory")
    imp.add_argument(
        "--diffusers", dest="diffusers_dir", help="diffusers pipeline directory supplying any component not given above"
    )
    imp.set_defaults(func=_cmd_import)

    pull = msub.add_parser("pull", help="download TurboDiffusion files from the Hugging Face hub, import, verify")
    _common(pull)
    pull.add_argument("--repo", help="default repository for --file NAME")
    pull.add_argument(
        "--file",
        dest="files",
        action="append",
        required=True,
        help="NAME or OWNER/REPO:NAME; repeat for the DiT(s), the VAE and the umT5 encoder",
    )
    pull.add_argument("--revision")
    tok = pull.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", dest="tokenizer_dir", help="local umT5 tokenizer directory")
    tok.add_argument("--tokenizer-repo", help="repository to fetch tokenizer files from (e.g. google/umt5-xxl)")
    pull.add_argument("--download-dir", help="where downloads go (default: DIR.download next to DIR)")
    pull.add_argument("--delete-downloads", action="store_true")
    pull.set_defaults(func=_cmd_pull)

    art = msub.add_parser(
        "compile-artifacts",
        help="compile the DiT for the served sizes and store torch.compile's artifacts beside the weights",
        description="Loads the model with compile on, runs one 1-step request per size (the warm-up a pod runs), "
        "and saves the compiled graphs and kernels atomically as <compile cache>/artifacts/<key>.bin + .json, "
        "keyed like a serving pod with the same options looks them up (engine/compile_artifacts.py). Run it on a "
        "node with the serving GPU architecture. With --compile aot: AOTInductor packages of the DiT blocks "
        "(engine/aot_blocks.py) as <compile cache>/aoti/<key>.bin + .json, built only when no intact one exists "
        "(--force: always).",
    )
    art.add_argument("--model-dir", required=True, help="the model cache directory")
    art.add_argument(
        "--sizes",
        default=None,
        help="comma list RESOLUTION:W:H:FRAMES, as TURBOFLOW_COMPILE_WARMUP (default: the model's resolution:16:9:81)",
    )
    art.add_argument("--quant-linear", default=None, choices=QUANT_LINEAR_MODES, help="as TURBOFLOW_QUANT_LINEAR")
    art.add_argument(
        "--compile",
        default="default",
        choices=(*COMPILE_MODES, AOT_COMPILE),
        help="inductor mode, or aot (TURBOFLOW_COMPILE)",
    )
    art.add_argument("--force", action="store_true", help="aot: build even when an intact package exists")
    art.add_argument(
        "--sla-backend", default="auto", choices=SLA_BACKENDS, help="as TURBOFLOW_SLA_BACKEND (in the key)"
    )
    art.add_argument(
        "--compile-cache",
        default=None,
        help="compile cache dir, artifacts go to its artifacts/ (default: MODEL_DIR/.compile-cache when writable)",
    )
    art.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    art.add_argument("--backend", default="inductor", choices=COMPILE_BACKENDS, help=argparse.SUPPRESS)
    art.set_defaults(func=_cmd_compile_artifacts)


def _import_kwargs(args) -> dict:
    return dict(
        kind=args.kind,
        family=args.family,
        name=args.name,
        sigma_max=args.sigma_max,
        boundary=args.boundary,
        resolution=args.resolution,
        dtype=args.dtype,
        keep_int8=args.keep_int8,
        dit_config=args.dit_config,
        vae_config=args.vae_config,
        t5_config=args.t5_config,
        force=args.force,
        progress=lambda m: print(m, flush=True),
    )


def _report(manifest: modelcache.Manifest, root) -> int:
    print(
        f"ok: {manifest.name} ({manifest.kind}), {len(manifest.files)} files, "
        f"{manifest.total_bytes / 1e9:.2f} GB in {Path(root).resolve()}"
    )
    return 0


def _cmd_import(args) -> int:
    from .model_import import import_model

    manifest = import_model(
        args.dir,
        dit=args.dit,
        dit_low=args.dit_low,
        vae=args.vae,
        text_encoder=args.text_encoder,
        tokenizer_dir=args.tokenizer_dir,
        diffusers_dir=args.diffusers_dir,
        **_import_kwargs(args),
    )
    return _report(manifest, args.dir)


def _cmd_pull(args) -> int:
    from .model_import import pull_model

    manifest = pull_model(
        args.dir,
        files=args.files,
        repo=args.repo,
        tokenizer_dir=args.tokenizer_dir,
        tokenizer_repo=args.tokenizer_repo,
        revision=args.revision,
        download_dir=args.download_dir,
        keep_downloads=not args.delete_downloads,
        **_import_kwargs(args),
    )
    return _report(manifest, args.dir)


def _cmd_compile_artifacts(args) -> int:
    from .loading import load_pipeline, save_compile_artifacts, warm_compiled

    try:
        sizes = None if args.sizes is None else check_sizes(warmup_sizes(args.sizes), "--sizes")
    except ValueError as e:
        raise ModelCacheError(f"--sizes: {e}", code="invalid_sizes") from e
    if args.compile == AOT_COMPILE:
        return _build_aot_blocks(args, sizes)
    pipeline = load_pipeline(
        args.model_dir,
        device=args.device,
        quant_linear=args.quant_linear,
        sla_backend=args.sla_backend,
        compile=args.compile,
        compile_backend=args.backend,
        compile_cache_dir=args.compile_cache,
        compile_warmup=sizes,
        warmup=False,  # the sizes below are the warm-up
        compile_save_artifacts=False,
    )
    report = pipeline.compile_artifact
    # exactly the sizes the key covers (a pod with the same TURBOFLOW_COMPILE_WARMUP computes the same key)
    seconds = warm_compiled(pipeline, [(r, a, f) for r, a, f in report.inputs["sizes"]])
    path = save_compile_artifacts(pipeline)
    if path is None:
        raise ModelCacheError(
            f"no compile artifact written for key {report.key} (nothing compiled, or the store is not writable)",
            code="compile_artifact_not_saved",
        )
    print(
        json.dumps(
            {"key": report.key, "path": path, "before": report.artifact, "compile_s": seconds, "inputs": report.inputs}
        )
    )
    return 0


def _build_aot_blocks(args, sizes) -> int:
    """--compile aot: load eager (no build at load), then build, save and check the packages unless an intact one
    for the same key is there already."""
    import time

    from . import aot_blocks
    from .compiled import compile_cache_dir, use_cache_dir
    from .loading import load_pipeline

    pipeline = load_pipeline(
        args.model_dir,
        device=args.device,
        quant_linear=args.quant_linear,
        sla_backend=args.sla_backend,
        compile=AOT_COMPILE,
        compile_cache_dir=args.compile_cache,
        compile_warmup=sizes,
        compile_require_artifacts=True,  # the build below, not one inside the load
        warmup=False,
    )
    report = pipeline.compile_artifact
    result = {"key": report.key, "before": report.artifact, "inputs": report.inputs}
    if report.artifact == "loaded" and not args.force:
        print(json.dumps({**result, "path": report.path, "built": False}))
        return 0
    use_cache_dir(compile_cache_dir(args.model_dir, args.compile_cache))
    sizes = [(r, a, f) for r, a, f in report.inputs["sizes"]]
    start = time.perf_counter()
    try:
        aot_blocks.build_and_save(pipeline, report, sizes)
    except Exception as e:  # noqa: BLE001  (export or AOTInductor failing: a typed error naming the cause)
        raise ModelCacheError(
            f"AOT block packages for key {report.key} could not be built: {type(e).__name__}: {e}",
            code="compile_artifact_not_saved",
        ) from e
    if report.saved is None:
        raise ModelCacheError(
            f"AOT block packages for key {report.key} built but not written (is the store writable?)",
            code="compile_artifact_not_saved",
        )
    print(json.dumps({**result, "path": report.saved, "built": True, "build_s": time.perf_counter() - start}))
    return 0
