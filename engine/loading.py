"""Build a pipeline from a model cache directory (engine/modelcache.py layout). Never touches a hub.

The manifest names the model family (engine/families); its spec says which components to load with which classes,
how many DiT experts there are and what the pipeline's latent geometry and conditioning are.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from pathlib import Path

import torch

from turboflow.errors import ConfigError, DeviceUnavailableError, ModelCacheError

from . import compile_artifacts, fastload, modelcache
from .checkpoint import load_sla_proj_l
from .families import FamilySpec, family
from .options import AOT_COMPILE, LoadOptions
from .pipeline import TurboVideoPipeline, on_device
from .quant import INT8_STORAGE

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DEVICE_NAMES = "cpu, cuda, cuda:N or mps"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device to load onto (None: CUDA if present, else CPU), checked to exist in this torch build and
    on this host: DeviceUnavailableError otherwise, before anything is loaded (torch would only fail at the first
    allocation, deep inside loading, with an assertion)."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise DeviceUnavailableError(f"{device!r} is not a device name; expected {DEVICE_NAMES}", field="device") from e
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA support"
                if torch.version.cuda is None
                else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)"
            )
            raise DeviceUnavailableError(
                f"device {str(device)!r} is unavailable: {why} (cpu works everywhere)", field="device"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise DeviceUnavailableError(
                f"device {str(device)!r} is unavailable: this host has {count} CUDA "
                f"device(s), cuda:0..cuda:{count - 1}",
                field="device",
            )
        return resolved
    if resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceUnavailableError(
                f"device {str(device)!r} is unavailable: MPS needs Apple silicon and a torch build with MPS",
                field="device",
            )
        return resolved
    raise DeviceUnavailableError(
        f"device type {resolved.type!r} is not supported; expected {DEVICE_NAMES}", field="device"
    )


def load_tokenizer(path: Path, spec: FamilySpec):
    """The family's tokenizer from its model-cache directory, offline."""
    if not path.is_dir():
        raise ModelCacheError(f"component 'tokenizer' missing: {path}", code="model_cache_incomplete")
    try:
        return spec.components["tokenizer"].load_class().from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelCacheError(f"cannot load tokenizer from {path}: {e}", code="model_cache_invalid") from e


def _weight_bytes(path: Path, dtype: torch.dtype) -> int:
    """Bytes a component takes once loaded in `dtype` (from the safetensors headers, nothing read)."""
    total = 0
    for f in fastload.weight_files(path):
        for t in fastload.read_header(f).tensors:
            numel = 1
            for d in t.shape:
                numel *= d
            size = dtype.itemsize if t.dtype.is_floating_point else t.dtype.itemsize
            total += numel * size
    return total


def load_pipeline(
    model_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype | None = None,
    verify_checksums: bool = False,
    options: LoadOptions | None = None,
    **option_overrides,
) -> TurboVideoPipeline:
    """Load every component named in the manifest onto `device` (default: CUDA if present).

    dtype defaults to bfloat16 on CUDA and float32 on CPU. offload="auto" keeps both I2V experts resident when
    the device has room for them (weights plus headroom), else swaps them per step like upstream.

    Performance options (engine/linear.py, engine/compiled.py, engine/vae_decode.py):
    quant_linear: None | "fp8" | "int8" | "int8_weight_only" -- the DiT blocks' Linear layers (default None: the
      fine-tuned bf16 weights as they are; fp8 is the fast choice on H100/Ada, int8_weight_only halves memory).
    compile: False | True | an inductor mode -- torch.compile each DiT block (default off: the first request at a
      new video size pays the compile; the cache in `compile_cache_dir` makes later processes reuse it); "aot" --
      AOTInductor packages of the blocks built ahead of time (engine/aot_blocks.py): loaded, no trace or compile.
      compile_warmup: (resolution, aspect_ratio, frames) sizes to compile before returning, on CUDA (default: the
      model's resolution, 16:9, 81 frames) -- one 1-step request each, so the first real request runs compiled.
    fast_vae: chunked VAE decode, equal to diffusers' decode up to rounding (default on); vae_chunk latent frames
      per decoder call (default by frame size); vae_decode: how it runs ("auto": vae_decode.AUTO_VARIANTS by device
      and whether the DiT is compiled, or a DecodeVariant spec).
    prompt_cache: text embeddings kept on the device for repeated prompts (an LRU of that many prompts).
    sla_pooling: "input" (default) rounds SLA's block selection in the model dtype as upstream; "fp32" keeps it in
      fp32 (selects different blocks for a few % of query blocks in bf16; for comparisons, bench/sla_pooling.py).
    sla_backend: SLA's sparse-branch kernels (engine/sla.py BACKENDS): "auto" = the Triton kernels on CUDA, else
      FlexAttention, else gather + SDPA; pin "flex" or "gather" to leave the Triton kernels out.
    load_threads: safetensors reader threads (default by CPU count); warmup: one tiny generation on CUDA.
    All of these are the fields of `options` (engine/options.py LoadOptions, checked when built; the functions build
    it from their Settings); keyword arguments named like its fields override them (`quant_linear="fp8"`).
    """
    opts = (options or LoadOptions()).replace(**option_overrides)
    quant_linear, compile, vae_chunk, fast_vae = opts.quant_linear, opts.compile, opts.vae_chunk, opts.fast_vae
    aot = compile == AOT_COMPILE
    from .linear import check_supported, quantize_transformer

    root = Path(model_dir)
    manifest = modelcache.verify(root, checksums=verify_checksums)
    spec = family(manifest.family)
    device = resolve_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    start = time.perf_counter()
    required = {"tokenizer", "text_encoder", "vae", *spec.transformer_roles}
    missing = required - manifest.components.keys()
    if missing:
        raise ModelCacheError(f"manifest of {root} lacks components {sorted(missing)}", code="model_cache_invalid")
    networks = {role: root / sub for role, sub in manifest.components.items() if role != "tokenizer"}
    for role, path in networks.items():
        if not path.is_dir():
            raise ModelCacheError(f"component {role!r} missing: {path}", code="model_cache_incomplete")
    check_supported(quant_linear, device)
    if opts.sla_backend in ("triton", "flex") and device.type != "cuda":
        raise ConfigError(
            f"sla_backend {opts.sla_backend!r} runs on CUDA only (this load is on {device.type}): use 'auto' or "
            "'gather'",
            field="sla_backend",
        )
    _check_request_defaults(root, manifest)
    sizes = {r: _weight_bytes(p, dtype) for r, p in networks.items()}
    if quant_linear in ("fp8", "int8", "int8_weight_only"):
        for r in spec.transformer_roles:
            stored_int8 = (manifest.source.get(r) or {}).get("stored") == INT8_STORAGE  # already 1 byte on disk
            if r in sizes and not stored_int8:  # the blocks' linears are ~all of a DiT's weights; 1 byte, not 2
                sizes[r] = sizes[r] * 55 // 100
    policy = _offload_policy(opts.offload, spec, sizes, device)
    devices = {role: device for role in networks}
    if policy == "experts":  # the experts after the first start parked on the host
        for role in spec.transformer_roles[1:]:
            devices[role] = torch.device("cpu")
    # every network streams from safetensors straight onto its device, text encoder and DiT concurrently
    report = fastload.LoadReport()
    # import diet: the weights start streaming at once; the model classes (diffusers, ~2.5 s with torch._dynamo)
    # are imported meanwhile on one background thread, then the compile artifact is loaded there (dynamo/inductor
    # imports, cache files written). One thread does all of these imports, in order: never two importers at once.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="load-prepare") as pool:
        classes = _LazyClasses(pool.submit(lambda: {role: spec.components[role].load_class() for role in networks}))
        load_artifact = _load_aot_blocks if aot else _load_compile_artifact
        artifact_future = pool.submit(load_artifact, root, manifest, spec, device, dtype, opts) if compile else None
        parts = fastload.load_models(
            networks, dtype, devices, classes=classes, report=report, threads=opts.load_threads
        )
        artifact = artifact_future.result() if artifact_future is not None else None
    parts["tokenizer"] = load_tokenizer(root / manifest.components["tokenizer"], spec)
    if vae_dtype is not None:
        parts["vae"].to(vae_dtype)
    if fast_vae and device.type == "cuda":
        from .vae_decode import to_channels_last

        to_channels_last(parts["vae"])  # cuDNN's preferred conv layout for the fast decode (8% on H100)
    if quant_linear:
        for role in spec.transformer_roles:
            if role in parts:
                n = quantize_transformer(parts[role], quant_linear)
                log.info("%s: %d linears -> %s", role, n, quant_linear)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if artifact is not None and not aot:
        compile = _compile_dit(artifact, spec, opts, parts)  # False: artifacts required and absent, DiT runs eager
    from .vae_decode import choose_variant

    # chosen after _compile_dit: where the DiT may not compile at start, neither does the VAE
    vae_variant = choose_variant(
        opts.vae_decode, device_type=device.type, compiled=bool(compile), compile_backend=opts.compile_backend
    )
    log.info(
        "loaded %s (%s, %s) on %s in %.2fs, offload=%s",
        manifest.name,
        manifest.kind,
        spec.name,
        device,
        time.perf_counter() - start,
        policy,
    )
    pipeline = TurboVideoPipeline(
        kind=manifest.kind,
        family=spec,
        transformer=parts["transformer"],
        transformer_2=parts.get("transformer_2"),
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        device=device,
        dtype=dtype,
        vae_dtype=vae_dtype,
        model_name=manifest.name,
        defaults=manifest.defaults,
        offload=policy,
        fast_vae=fast_vae,
        vae_chunk=vae_chunk,
        vae_variant=vae_variant,
        prompt_cache=opts.prompt_cache,
        sla_pooling=opts.sla_pooling,
        sla_backend=opts.sla_backend,
        sla_proj_l={
            role: load_sla_proj_l(root / manifest.components[role])
            for role in spec.transformer_roles
            if role in networks
        },
    )
    pipeline.compile_artifact = artifact  # ArtifactReport | None (save_compile_artifacts, the load report)
    if aot:
        compile = _attach_aot_blocks(pipeline, artifact, root, manifest, opts)  # False: the DiT runs eager
    if device.type == "cuda":
        from .compiled import compile_cache_dir, point_kernel_caches

        # the kernels compiled on first use, compiled DiT or not, go to the compile cache folder (the one a
        # compile's artifact load already pointed them at); where that folder persists (TURBOFLOW_COMPILE_CACHE on
        # a volume), the next pod loads them from disk. Best effort: an uncompiled load never failed for want of
        # a writable cache folder, and does not start to now.
        try:
            point_kernel_caches(compile_cache_dir(root, opts.compile_cache_dir))
        except OSError as e:
            log.warning("kernel caches stay where they were: %s", e)
    warmup_s = 0.0
    if device.type == "cuda" and opts.warmup and aot:
        warm = time.perf_counter()
        misses = compile_artifacts.fx_graph_cache_misses()
        warmup(pipeline, dit=not compile)  # a compiled DiT is warmed at the served sizes, through its packages
        if compile:
            from . import aot_blocks

            aot_blocks.warm(pipeline, warmup_sizes(opts, manifest))
        artifact.jit_compiles = compile_artifacts.fx_graph_cache_misses() - misses
        warmup_s = time.perf_counter() - warm
        log.info("warm-up in %.2fs", warmup_s)
    elif device.type == "cuda" and opts.warmup:
        warm = time.perf_counter()
        warmup(pipeline)
        if compile:
            misses = compile_artifacts.fx_graph_cache_misses()
            warm_compiled(pipeline, warmup_sizes(opts, manifest))  # [] = none (the CLI's request compiles its size)
            artifact.jit_compiles = compile_artifacts.fx_graph_cache_misses() - misses
            if artifact.jit_compiles and opts.compile_save_artifacts:
                save_compile_artifacts(pipeline)  # the first pod that compiled spares the next ones
        warmup_s = time.perf_counter() - warm
        log.info("warm-up in %.2fs", warmup_s)
    # where the load time went (bench/coldstart.py and the function's metrics read this)
    pipeline.load_report = {
        "bytes": report.bytes,
        "build_s": report.build_seconds,
        "read_s": report.read_seconds,
        "gbps": report.gbps,
        "assign_s": report.assign_seconds,
        "warmup_s": warmup_s,
        "total_s": time.perf_counter() - start,
        # {"artifact": loaded|missing|mismatch|corrupt, "key": ..., "load_s", "jit_compiles", ...}; None: no compile
        "compile_artifact": None if artifact is None else artifact.to_dict(),
        "compile_artifact_load_s": 0.0 if artifact is None else artifact.load_s,
        # compile "aot": block calls through the packages and eager ones so far (the warm-up's, on CUDA)
        "aot_blocks": artifact.stats.to_dict() if aot else None,
    }
    return pipeline


def warmup_sizes(opts: LoadOptions, manifest) -> list[tuple[str, str, int]]:
    """The sizes compiled before ready: LoadOptions.compile_warmup, else the model's resolution at 16:9, 81 frames."""
    if opts.compile_warmup is None:
        return [(manifest.defaults.get("resolution", "480p"), "16:9", 81)]
    return list(opts.compile_warmup)


def compile_artifact_inputs(root: Path, manifest, spec: FamilySpec, device, dtype, opts: LoadOptions) -> dict:
    """What the compile artifact of this load is keyed by (engine/compile_artifacts.py key_inputs): the platform,
    the model, the warm-up sizes, and the options that change the compiled graph, the attention and SLA top-k
    being the model's defaults (what the warm-up requests use)."""
    from .compiled import DEFAULT_MODE
    from .request import GenerationRequest
    from .vae_decode import choose_variant

    warm = GenerationRequest(prompt="warm up", kind=manifest.kind)
    warm = warm.validated(spec, manifest.defaults, image_pending=True)
    return compile_artifacts.key_inputs(
        platform=compile_artifacts.platform_inputs(device),
        model_name=manifest.name,
        manifest_sha256=compile_artifacts.manifest_digest(root),
        sizes=warmup_sizes(opts, manifest),
        quant_linear=opts.quant_linear,
        attention=warm.request.attention,
        sla_topk=warm.request.sla_topk,
        sla_pooling=opts.sla_pooling,
        sla_backend=opts.sla_backend,
        vae_decode=choose_variant(
            opts.vae_decode, device_type=torch.device(device).type, compiled=True, compile_backend=opts.compile_backend
        ).name,
        compile_mode=DEFAULT_MODE if opts.compile is True else str(opts.compile),
        backend=opts.compile_backend,
        dtype=str(dtype).removeprefix("torch."),
    )


class _LazyClasses(dict):
    """role -> model class, from a future: fastload looks the classes up after its read threads started, so the
    import that yields them overlaps the weight read."""

    def __init__(self, pending: concurrent.futures.Future):
        super().__init__()
        self.pending = pending

    def __missing__(self, role: str) -> type:
        self.update(self.pending.result())
        return dict.__getitem__(self, role)


def _load_compile_artifact(root: Path, manifest, spec: FamilySpec, device, dtype, opts: LoadOptions):
    """Point torch at the compile cache and load the matching compile artifact into it, BEFORE anything compiles
    (runs beside the weight read: it imports dynamo/inductor and writes the cache files). The ArtifactReport, with
    its store and inputs kept on it for save_compile_artifacts."""
    from .compiled import compile_cache_dir, use_cache_dir

    use_cache_dir(compile_cache_dir(root, opts.compile_cache_dir))
    inputs = compile_artifact_inputs(root, manifest, spec, device, dtype, opts)
    key = compile_artifacts.artifact_key(inputs)
    store = compile_artifacts.ArtifactStore.for_model(root, opts.compile_cache_dir)
    report = compile_artifacts.load(store, key, inputs)
    report.store, report.inputs = store, inputs  # not part of to_dict(): for saving after the warm-up
    return report


def aot_artifact_inputs(root: Path, manifest, spec: FamilySpec, device, dtype, opts: LoadOptions) -> dict:
    """The AOT block packages' key inputs: the compile artifacts' (compile_mode "aot"), and on the CPU its
    capability (Inductor's CPU kernels are built for the ISA of the machine that compiled them)."""
    inputs = compile_artifact_inputs(root, manifest, spec, device, dtype, opts)
    if torch.device(device).type == "cpu":
        inputs["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return inputs


def _load_aot_blocks(root: Path, manifest, spec: FamilySpec, device, dtype, opts: LoadOptions):
    """Find and load the AOT block packages of this load (engine/aot_blocks.py), beside the weight read: no
    compile, no dynamo. The ArtifactReport with its packages, store and inputs."""
    from . import aot_blocks

    inputs = aot_artifact_inputs(root, manifest, spec, device, dtype, opts)
    store = aot_blocks.store_for_model(root, opts.compile_cache_dir)
    report = aot_blocks.load(store, compile_artifacts.artifact_key(inputs), inputs, device)
    report.store, report.inputs = store, inputs
    return report


def _attach_aot_blocks(pipeline: TurboVideoPipeline, report, root: Path, manifest, opts: LoadOptions) -> bool:
    """Run the DiT blocks through the loaded packages; without them eager (compile_require_artifacts), or build them
    now like a first pod (in the compile cache's Inductor directory). Whether the blocks run packages."""
    from . import aot_blocks
    from .compiled import compile_cache_dir, use_cache_dir

    if report.artifact != "loaded" and not opts.compile_require_artifacts:
        use_cache_dir(compile_cache_dir(root, opts.compile_cache_dir))  # the build compiles: Inductor's files there
    return aot_blocks.attach(
        pipeline,
        report,
        warmup_sizes(opts, manifest),
        require=opts.compile_require_artifacts,
        save=opts.compile_save_artifacts,
    )


def _compile_dit(report, spec: FamilySpec, opts: LoadOptions, parts: dict) -> bool:
    """Mark the DiT blocks for compilation; with `compile_require_artifacts` and no usable artifact leave them eager
    (no compile at start, ever) and say so. Whether the DiT is compiled."""
    from .compiled import compile_transformer

    if report.artifact != "loaded" and opts.compile_require_artifacts:
        log.warning(
            "no usable compile artifact (%s) and compile_require_artifacts is set: the DiT runs eager, not compiled "
            "(build one with `turboflow model compile-artifacts`)",
            report.artifact,
        )
        report.compiled = False
        return False
    mode = None if opts.compile is True else str(opts.compile)
    for role in spec.transformer_roles:
        if role in parts:
            compile_transformer(parts[role], mode, backend=opts.compile_backend)
    return True


def save_compile_artifacts(pipeline: TurboVideoPipeline) -> str | None:
    """Save what this process compiled as the compile artifact of its load (atomically, into the first writable
    artifact directory); the path, or None (nothing recorded, no compile, or the store unwritable: a warning)."""
    report = getattr(pipeline, "compile_artifact", None)
    if report is None or not report.compiled:
        return None
    if hasattr(report, "packages"):  # compile "aot": its packages are saved where they are built (aot_blocks.attach)
        return report.saved
    try:
        path = compile_artifacts.save(report.store, report.key, report.inputs)
    except OSError as e:
        log.warning("compile artifact %s not saved: %s", report.key[:12], e)
        return None
    report.saved = None if path is None else str(path)
    return report.saved


def _check_request_defaults(root: Path, manifest) -> None:
    """The manifest's request defaults must make a valid request, or every event would fail blaming its sender."""
    from turboflow.errors import TurboflowError

    from .request import GenerationRequest

    try:  # the image is not the manifest's concern: left pending
        GenerationRequest(prompt="x", kind=manifest.kind).validated(
            family(manifest.family), manifest.defaults, image_pending=True
        )
    except TurboflowError as e:
        raise ModelCacheError(
            f"manifest of {root} has an unusable request default: {e.message}", code="model_cache_invalid"
        ) from e


def warm_compiled(pipeline: TurboVideoPipeline, sizes: list[tuple[str, str, int]]) -> list[float]:
    """One 1-step request per (resolution, aspect_ratio, frames), with the model's default attention: compiles the
    DiT graph for each size (or loads it from the compile cache) before the function reports ready. Seconds each."""
    from PIL import Image

    seconds = []
    for resolution, aspect_ratio, frames in sizes:
        start = time.perf_counter()
        fields: dict = {"num_steps": 1}
        if pipeline.kind == "i2v":
            fields.update(image=Image.new("RGB", (64, 64)), adaptive_resolution=False)
        if len(pipeline.family.experts) == 2:  # 2 steps with boundary 0.95 (t = 0.995, 0.934): one on each expert
            fields.update(num_steps=2, boundary=0.95)
        pipeline(
            pipeline.request(
                "warm up", resolution=resolution, aspect_ratio=aspect_ratio, num_frames=frames, seed=1, **fields
            )
        )
        seconds.append(time.perf_counter() - start)
        log.info("compiled for %s %s x %d frames in %.1fs", resolution, aspect_ratio, frames, seconds[-1])
    return seconds


@torch.no_grad()
def warmup(pipeline: TurboVideoPipeline, *, dit: bool = True) -> None:
    """Tiny forward passes through every network so CUDA context, cuBLAS/cuDNN handles and kernels are loaded
    before the pod reports ready (the first real request then runs at steady-state speed). No compile.
    dit=False leaves the DiTs out (compile "aot" warms them at the served sizes, engine/aot_blocks.warm)."""
    dev = pipeline.device
    pipeline.encode_prompt("warm up")
    c = pipeline.latent_channels
    ctx = torch.zeros(1, 8, pipeline.text_encoder.config.d_model, device=dev, dtype=pipeline.dtype)
    for net in (pipeline.transformer, pipeline.transformer_2) if dit else ():
        if net is None or not on_device(net, dev):  # an expert parked on the host is warmed when it is brought
            continue
        x = torch.randn(1, net.config.in_channels, 1, 4, 4, device=dev, dtype=pipeline.dtype)
        net(
            hidden_states=x,
            timestep=torch.ones(1, device=dev, dtype=pipeline.dtype) * 500,
            encoder_hidden_states=ctx,
            return_dict=False,
        )
    pipeline.decode(torch.randn(1, c, 1, 4, 4, device=dev))
    if pipeline.family.conditioning is not None:
        from PIL import Image

        pipeline.encode_image(Image.new("RGB", (32, 32)), 32, 32, 1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _offload_policy(offload: str, spec: FamilySpec, weight_bytes: dict, device: torch.device) -> str:
    """ "auto": keep every expert resident when weights + activation headroom fit the free device memory, else park
    the idle expert on the host ("experts"); a one-expert family has nothing to park."""
    if offload in ("none", "experts"):
        return offload
    if offload != "auto":
        raise ConfigError(f"offload must be auto, none or experts, got {offload!r}", field="offload")
    if len(spec.experts) < 2 or device.type != "cuda":
        return "none"
    weights = sum(weight_bytes.values())
    free, _ = torch.cuda.mem_get_info(device)
    headroom = 30 << 30  # 720p activations of a 14B expert measured at ~25 GB
    return "none" if weights + headroom <= free else "experts"
