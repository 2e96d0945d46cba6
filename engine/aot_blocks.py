"""AOTInductor packages for the DiT blocks (`compile="aot"`): compiled ahead of time, started with no trace and no
compile.

Why: compile artifacts (engine/compile_artifacts.py) skip Inductor at start but not dynamo, whose trace of the
compiled blocks is ~7 s of an H200 pod's 8.2 s warm-up (BENCHMARKS.md run 12). An AOTInductor package is the
compiled block as a shared library: loading it is an unzip, a dlopen and (on CUDA) a cubin load per kernel, with no
torch.export, dynamo or Inductor in the process.

What is compiled. Every WanTransformerBlock of a model computes the same function of its weights,

    h' = block(W, P; h, c, e, (cos, sin))

W: the block's parameters and buffers (FP8Linear's weight_fp8 / weight_scale / bias too); P: SLA's proj_l weight and
bias, attributes of the block's attention processor rather than module tensors; h [B, L, dim] the hidden states,
c [B, Lc, dim] the text context, e [B, 6, dim] the timestep projection, (cos, sin) [1, L, 1, D] the rotary
embedding. `torch.export` traces block 0 with W and P lifted to graph inputs (torch.func.functional_call; the
processor's P swapped for the inputs while it traces), so the graph holds no weight: one package per served size runs
all 30/40 blocks (and both A14B experts), each call passing that block's own tensors. Nothing is copied and the .so
holds code only. (The other way, weights as the package's constants with `aot_inductor.package_constants_in_so=False`
and `load_constants(..., user_managed=True)` per block, works on torch 2.13's CPU too, but needs one loader per block
or a constant swap per call, and SLA's proj_l would become anonymous lifted constants.)

The SLA processor, the FP8 linears (torch._scaled_mm) and the rotary embedding trace as they are:
`torch.compiler.is_compiling()` is True under export, so engine/sla.py takes the path it takes inside torch.compile
(the Triton op `turboflow::sla_sparse_linear`, a torch.library.triton_op, on CUDA; FlexAttention traced when Triton is
out; gather + SDPA on the CPU) and engine/linear.py quantizes activations inline (no nested torch.compile).

The guard. AOTInductor does not check its inputs at run time (a wrong shape or stride gives wrong numbers or a
crash), so a package runs a block call only when: grad mode is off; the call's activations and P have the exported
shapes, strides and dtypes; the block's weights are on the device the package was loaded for; and the block's
attention processors have the exported settings (class; SLA kind, top-k, pooling, backend). The block's weights were
checked once when the package was installed on it (names, shapes, strides, dtypes). Any other call runs the block's
own forward, eager: another video size, another attention, a parallel (sharded) sequence.

The artifact: `<dir>/aoti/<key>.bin` + `.json`, the same store, key, header and atomic write as the compile
artifacts (engine/compile_artifacts.py; `compile_mode` "aot" in the key, and on the CPU the CPU capability, since a
package built with AVX-512 kernels cannot run without it). The payload is the .pt2 archives of the sizes, one after
the other; the header's info lists each one's block signature and byte count. Built by `turboflow model
compile-artifacts --compile aot`, or by the first pod that found none (when compile_require_artifacts is off: that pod
compiles at start, like the JIT path, and saves it for the next ones).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from .compile_artifacts import ArtifactReport, ArtifactStore, CorruptArtifact

log = logging.getLogger(__name__)

AOT = "aot"  # the compile mode (LoadOptions.compile, TURBOFLOW_COMPILE=aot)
FORMAT = "turboflow-aoti-blocks-1"  # the payload layout named in the header's info
SUBDIR = "aoti"  # beside compile_artifacts' "artifacts/" in each artifact directory
_SELF_ATTENTION_SETTINGS = ("kind", "topk", "pooling", "backend")  # SLAProcessor's graph-changing settings


def store_for_model(model_dir, compile_cache=None) -> ArtifactStore:
    """The AOT packages' store: the compile cache's `aoti/`, then the one beside the weights (as compile artifacts)."""
    from .compiled import compile_cache_dir

    beside_weights = Path(model_dir) / ".compile-cache" / SUBDIR
    return ArtifactStore([compile_cache_dir(model_dir, compile_cache) / SUBDIR, beside_weights])


# ---- what one block call is ------------------------------------------------------------------------------------------
def _weight_names(block: torch.nn.Module) -> list[str]:
    return [n for n, _ in block.named_parameters()] + [n for n, _ in block.named_buffers()]


def _tensor_meta(t: torch.Tensor) -> list:
    return [list(t.shape), list(t.stride()), str(t.dtype).removeprefix("torch.")]


def _projections(block) -> tuple:
    """SLA's (proj_weight, proj_bias) of the block's self-attention, (None, None) for other processors."""
    processor = block.attn1.processor
    return getattr(processor, "proj_weight", None), getattr(processor, "proj_bias", None)


def processor_settings(block) -> list:
    """What of the block's attention processors the traced graph bakes in: class, and SLA's settings."""
    settings = []
    for attention in (block.attn1, block.attn2):
        processor = attention.processor
        kind = type(processor)
        entry = [f"{kind.__module__}.{kind.__qualname__}"]
        entry += [[name, getattr(processor, name)] for name in _SELF_ATTENTION_SETTINGS if hasattr(processor, name)]
        settings.append(entry)
    return settings


def block_signature(block, args: tuple, kwargs: Mapping) -> dict:
    """JSON description of a block call: weights (name, shape, stride, dtype), SLA projections, activations (the
    call's tensors in pytree order and the tree), processor settings. Two calls with equal signatures run the same
    compiled graph."""
    state = {**dict(block.named_parameters()), **dict(block.named_buffers())}
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    if not all(isinstance(x, torch.Tensor) for x in leaves):
        raise TypeError("a DiT block call with non-tensor arguments cannot be compiled ahead of time")
    return {
        "weights": [[name, *_tensor_meta(state[name])] for name in _weight_names(block)],
        "projections": [None if p is None else _tensor_meta(p) for p in _projections(block)],
        "activations": [_tensor_meta(t) for t in leaves],
        "tree": pytree.treespec_dumps(spec),
        "processors": processor_settings(block),
    }


def _call_key(projections: Iterable, leaves: Iterable) -> tuple:
    """The per-call part of a signature, hashable: (shape, stride, dtype) of P (None where absent) and activations."""
    return tuple(
        None if t is None else (tuple(t.shape), tuple(t.stride()), str(t.dtype).removeprefix("torch."))
        for t in (*projections, *leaves)
    )


def _key_of(signature: Mapping) -> tuple:
    return tuple(
        None if m is None else (tuple(m[0]), tuple(m[1]), m[2])
        for m in (*signature["projections"], *signature["activations"])
    )


class _BlockFunction(torch.nn.Module):
    """One block as a function of a flat tensor list: W (in `weight_names` order), then the present projections,
    then the call's activation leaves. The block is held in a tuple, not as a submodule, so export lifts none of its
    tensors as the program's own parameters."""

    def __init__(self, block, weight_names: list[str], has_projection: tuple[bool, bool], tree):
        super().__init__()
        self._held = (block,)
        self.weight_names, self.has_projection, self.tree = weight_names, has_projection, tree

    def forward(self, flat: list[torch.Tensor]):
        block = self._held[0]
        count = len(self.weight_names)
        weights = dict(zip(self.weight_names, flat[:count]))
        rest = list(flat[count:])
        projections = [rest.pop(0) if present else None for present in self.has_projection]
        args, kwargs = pytree.tree_unflatten(rest, self.tree)
        processor = block.attn1.processor
        saved = _projections(block)
        if any(self.has_projection):  # P as graph inputs: the processor reads them from its attributes
            processor.proj_weight, processor.proj_bias = projections
        try:
            return torch.func.functional_call(block, weights, args, kwargs, strict=True)
        finally:
            if any(self.has_projection):
                processor.proj_weight, processor.proj_bias = saved


# ---- building (ahead of time: the CLI, or the first pod) -------------------------------------------------------------
@dataclass
class Example:
    """One captured block call: the block and its call's arguments (clones), and their signature."""

    block: torch.nn.Module
    args: tuple
    kwargs: dict
    signature: dict


def dit_inputs(pipeline, net, size: tuple[str, str, int]) -> dict:
    """Keyword arguments of `net` for one denoising step of a request of `size` (resolution, aspect, frames), with
    zero latents and the request's default attention set: the DiT call a real request makes, same shapes, strides
    and dtypes (the warm-up and the capture both use it)."""
    from .request import GenerationRequest

    resolution, aspect, frames = size
    request = GenerationRequest(
        prompt="warm up", kind=pipeline.kind, resolution=resolution, aspect_ratio=aspect, num_frames=frames
    ).validated(pipeline.family, pipeline.defaults, image_pending=True)
    pipeline.use_attention(request.request.attention, request.request.sla_topk)
    width, height = request.size
    shape = pipeline.family.latent.latent_shape(frames, width, height)
    device, dtype = pipeline.device, pipeline.dtype
    latents = torch.zeros(shape[0], net.config.in_channels, *shape[2:], device=device, dtype=dtype)  # + condition
    return {
        "hidden_states": latents,
        "timestep": (torch.ones(shape[0], device=device) * 500.0).to(dtype),
        "encoder_hidden_states": pipeline.encode_prompt("warm up"),
        "return_dict": False,
    }


def _nets_on_device(pipeline) -> list:
    """The DiTs whose weights are on the pipeline's device (an expert parked on the host is not)."""
    from .pipeline import on_device

    return [n for n in nets(pipeline) if on_device(n, pipeline.device)]


@torch.no_grad()
def capture(pipeline, sizes: Iterable[tuple[str, str, int]]) -> list[Example]:
    """The first block's call of each DiT on the device at each size (one DiT forward each, eager), one example per
    distinct signature (the A14B experts share theirs)."""
    examples: dict[str, Example] = {}
    for size in sizes:
        for net in _nets_on_device(pipeline):
            block, seen = net.blocks[0], []

            def record(module, args, kwargs, seen=seen):
                seen.append((pytree.tree_map(_clone, args), pytree.tree_map(_clone, kwargs)))

            handle = block.register_forward_pre_hook(record, with_kwargs=True)
            try:
                net(**dit_inputs(pipeline, net, size))
            finally:
                handle.remove()
            args, kwargs = seen[0]
            signature = block_signature(block, args, kwargs)
            examples.setdefault(json.dumps(signature, sort_keys=True), Example(block, args, kwargs, signature))
    return list(examples.values())


def _clone(x):
    return x.clone() if isinstance(x, torch.Tensor) else x


def _flat_inputs(example: Example) -> list[torch.Tensor]:
    state = {**dict(example.block.named_parameters()), **dict(example.block.named_buffers())}
    weights = [state[name] for name in _weight_names(example.block)]
    projections = [p for p in _projections(example.block) if p is not None]
    return [*weights, *projections, *pytree.tree_leaves((tuple(example.args), dict(example.kwargs)))]


def compile_example(example: Example, package_path: Path) -> Path:
    """torch.export the block of `example` with its weights as inputs, then AOTInductor-compile it into a .pt2."""
    from torch._inductor import aoti_compile_and_package

    block = example.block
    _, tree = pytree.tree_flatten((tuple(example.args), dict(example.kwargs)))
    has_projection = tuple(p is not None for p in _projections(block))
    function = _BlockFunction(block, _weight_names(block), has_projection, tree)
    with torch.no_grad():
        exported = torch.export.export(function, (_flat_inputs(example),))
        return Path(aoti_compile_and_package(exported, package_path=str(package_path)))


def build(pipeline, sizes: list[tuple[str, str, int]]) -> tuple[bytes, dict]:
    """(payload, info) of the AOT artifact for `sizes`: one .pt2 per distinct block signature, concatenated; the
    blocks must be eager (not installed) while this traces them."""
    examples = capture(pipeline, sizes)
    if not examples:
        raise RuntimeError(f"no DiT on {pipeline.device} to trace (sizes {list(sizes)})")
    parts, models = [], []
    with tempfile.TemporaryDirectory(prefix="turboflow-aoti-") as work:
        for i, example in enumerate(examples):
            start = time.perf_counter()
            data = compile_example(example, Path(work) / f"block{i}.pt2").read_bytes()
            seconds = time.perf_counter() - start
            log.info("AOT block package %d/%d compiled in %.1fs (%d bytes)", i + 1, len(examples), seconds, len(data))
            parts.append(data)
            models.append({"signature": example.signature, "bytes": len(data), "compile_s": round(seconds, 3)})
    return b"".join(parts), {"format": FORMAT, "models": models}


# Loading a package on CUDA crashed the process (exit -11 in AOTIModelPackageLoader on torch 2.11, run 15): until a
# GPU run shows a loader call that works (bench/aoti_probe.py sets this to try), a CUDA load is refused with a
# report, never attempted, and the DiT runs eager.
CUDA_LOADER_VERIFIED = False


# ---- loading and running ---------------------------------------------------------------------------------------------
@dataclass
class BlockPackage:
    """One loaded .pt2: the block call it was compiled for and AOTInductor's runner."""

    signature: dict
    runner: object  # torch._C._aoti.AOTIModelPackageLoader
    key: tuple = ()
    tree: object = None

    def __post_init__(self):
        self.key = _key_of(self.signature)
        self.tree = pytree.treespec_loads(self.signature["tree"])


def load_packages(payload: bytes, info: Mapping, device: torch.device) -> list[BlockPackage]:
    """Each .pt2 of the payload loaded by AOTInductor's package loader for `device` (no compile: unzip, dlopen; the
    kernels load at the first call). CorruptArtifact when the payload does not split as the header says or was
    built for another GPU; the loader's own errors pass through."""
    info = info if isinstance(info, Mapping) else {}
    models = info.get("models")
    if info.get("format") != FORMAT or not isinstance(models, list) or not models:
        raise CorruptArtifact(f"not a {FORMAT} payload (info format {info.get('format')!r})")
    if sum(int(m.get("bytes", -1)) for m in models) != len(payload):
        raise CorruptArtifact("the .pt2 sizes in the header do not add up to the payload")
    if device.type == "cuda" and not CUDA_LOADER_VERIFIED:
        raise CorruptArtifact(
            "AOT block packages are not loaded on CUDA yet: AOTInductor's package loader segfaulted there (torch "
            "2.11, H200, BENCHMARKS.md run 15), so the blocks run eager instead of risking the pod"
        )
    index = -1 if device.type != "cuda" or device.index is None else device.index
    packages, offset = [], 0
    with tempfile.TemporaryDirectory(prefix="turboflow-aoti-") as work:
        for i, model in enumerate(models):
            path = Path(work) / f"block{i}.pt2"
            path.write_bytes(payload[offset : offset + model["bytes"]])
            offset += model["bytes"]
            # the loader extracts the archive to its own directory: the .pt2 can go once it returns
            runner = _package_loader(str(path), index)
            _check_device(runner, device)
            packages.append(BlockPackage(model["signature"], runner))
    return packages


def _package_loader(path: str, device_index: int):
    """AOTInductor's C++ package loader, called directly. torch._inductor.aoti_load_package first compares the
    machine with the package's metadata through Inductor's CPU-ISA probe, which builds test programs with the C
    compiler (~2 s, and a compiler in the image); the artifact key already covers the architecture."""
    loader = torch._C._aoti.AOTIModelPackageLoader
    try:
        return loader(path, "model", False, 1, device_index)  # (path, model, single-threaded, runners, device)
    except TypeError:  # a torch whose loader takes no runner count or device index (before 2.7)
        return loader(path, "model", False)


def _check_device(runner, device: torch.device) -> None:
    """On CUDA, the package's kernels must be for this GPU's compute capability (a copied artifact, or a key
    computed elsewhere): CorruptArtifact otherwise, before any kernel launches."""
    if device.type != "cuda" or torch.version.hip is not None:  # ROCm records a gfx name: the key covers it
        return
    built_for = runner.get_metadata().get("AOTI_COMPUTE_CAPABILITY", "")
    major, minor = torch.cuda.get_device_capability(device)
    here = str(major * 10 + minor)  # as Inductor records it
    if built_for and built_for != here:
        raise CorruptArtifact(f"package built for compute capability {built_for}, this GPU is {here}")


@dataclass
class AotStats:
    """Block calls through a package and eager ones, and why the eager ones were (each reason logged once)."""

    aot_calls: int = 0
    eager_calls: int = 0
    eager_reasons: dict = field(default_factory=dict)
    last_reason: str = ""

    def eager(self, reason: str) -> None:
        self.eager_calls += 1
        self.last_reason = reason
        if reason not in self.eager_reasons:
            log.info("DiT block runs eager: %s", reason)
        self.eager_reasons[reason] = self.eager_reasons.get(reason, 0) + 1

    def to_dict(self) -> dict:
        return {"aot_calls": self.aot_calls, "eager_calls": self.eager_calls, "eager_reasons": dict(self.eager_reasons)}


class _AotForward:
    """A block's forward while a package is installed on it (set as the block's instance attribute `forward`):
    the package when the guard passes (module docstring), else the block's own forward."""

    def __init__(self, block, packages: list[BlockPackage], stats: AotStats):
        self.block, self.stats = block, stats
        self.eager_forward = type(block).forward.__get__(block)
        self.packages = {p.key: p for p in packages}
        names = _weight_names(block)
        owners = [name.rpartition(".") for name in names]
        # (module, attribute) per weight, read at each call: expert parking replaces tensors' data, never modules
        self.weights = [(block.get_submodule(prefix) if prefix else block, attr) for prefix, _, attr in owners]
        self._checked: dict[int, tuple] = {}  # id(package) -> (self-attention processor, cross-, settings equal)

    def _processors_match(self, package: BlockPackage) -> bool:
        first, second = self.block.attn1.processor, self.block.attn2.processor
        seen = self._checked.get(id(package))
        if seen is None or seen[0] is not first or seen[1] is not second:  # again only after set_attention
            equal = json.loads(json.dumps(processor_settings(self.block))) == package.signature["processors"]
            seen = self._checked[id(package)] = (first, second, equal)
        return seen[2]

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            self.stats.eager("grad mode is on (the packages are inference-only)")
            return self.eager_forward(*args, **kwargs)
        leaves, tree = pytree.tree_flatten((args, kwargs))
        projections = _projections(self.block)
        if not all(isinstance(x, torch.Tensor) for x in leaves):
            self.stats.eager("a call with non-tensor arguments")
            return self.eager_forward(*args, **kwargs)
        package = self.packages.get(_call_key(projections, leaves))
        if package is None or package.tree != tree:
            shapes = [tuple(t.shape) for t in leaves]
            self.stats.eager(f"no package for activations {shapes} (another size or call)")
            return self.eager_forward(*args, **kwargs)
        if not self._processors_match(package):
            self.stats.eager(f"attention processors {processor_settings(self.block)} differ from the package's")
            return self.eager_forward(*args, **kwargs)
        weights = [getattr(module, attr) for module, attr in self.weights]
        if weights[0].device != leaves[0].device:
            self.stats.eager(f"weights on {weights[0].device}, activations on {leaves[0].device}")
            return self.eager_forward(*args, **kwargs)
        self.stats.aot_calls += 1
        flat = [*weights, *(p for p in projections if p is not None), *leaves]
        (hidden_states,) = package.runner.run(flat)  # a block returns one tensor
        return hidden_states


def _weights_match(block, signature: Mapping) -> bool:
    state = {**dict(block.named_parameters()), **dict(block.named_buffers())}
    names = _weight_names(block)
    return [[n, *_tensor_meta(state[n])] for n in names] == signature["weights"]


def install(transformer, packages: list[BlockPackage], stats: AotStats) -> int:
    """Run `transformer`'s blocks through the packages whose weight signature each block has; how many blocks."""
    installed = 0
    for block in transformer.blocks:
        usable = [p for p in packages if _weights_match(block, p.signature)]
        if usable:
            block.forward = _AotForward(block, usable, stats)
            installed += 1
    return installed


def uninstall(transformer) -> None:
    """The blocks' own forward again (a build traces the eager block)."""
    for block in transformer.blocks:
        if isinstance(block.__dict__.get("forward"), _AotForward):
            del block.forward


def installed(transformer) -> int:
    return sum(isinstance(b.__dict__.get("forward"), _AotForward) for b in transformer.blocks)


@torch.no_grad()
def warm(pipeline, sizes: Iterable[tuple[str, str, int]]) -> float:
    """One DiT forward per size and DiT on the device at the served shapes: loads the packages' kernels (and
    cuBLAS' handles) before ready, through the packages, so no eager FP8 block compiles its fused quantization."""
    start = time.perf_counter()
    for size in sizes:
        for net in _nets_on_device(pipeline):
            net(**dit_inputs(pipeline, net, size))
    return time.perf_counter() - start


def nets(pipeline) -> list:
    return [n for n in (pipeline.transformer, pipeline.transformer_2) if n is not None]


# ---- the load, with every fallback -----------------------------------------------------------------------------------
def load(store: ArtifactStore, key: str, inputs: Mapping, device: torch.device) -> ArtifactReport:
    """Find the AOT artifact of `key` and load its packages (report.packages). Never raises: a problem is the
    report's state (missing | mismatch | corrupt), logged as a warning."""
    start = time.perf_counter()
    report, payload = store.find(key, inputs)
    report.packages = []
    if payload is not None:
        try:
            report.packages = load_packages(payload, report.info, torch.device(device))
        except Exception as e:  # noqa: BLE001  (AOTInductor's loader raises anything on a foreign package)
            detail = f"AOTInductor could not load it: {type(e).__name__}: {e}"
            report = ArtifactReport("corrupt", key, report.path, detail)
            report.packages = []
        else:
            report.info = {"kind": AOT, "models": len(report.packages)}
    report.load_s = time.perf_counter() - start
    if report.artifact == "loaded":
        log.info("AOT block packages %s loaded in %.2fs (%d)", key[:12], report.load_s, len(report.packages))
    else:
        log.warning("AOT block packages %s: %s (%s)", key[:12], report.artifact, report.detail)
    return report


def attach(pipeline, report: ArtifactReport, sizes: list, *, require: bool, save: bool) -> bool:
    """Install the loaded packages on the pipeline's DiTs. Without them: eager when `require` (no compile at start,
    ever), else build them now (the first pod), save them when `save`, and install those. Whether any block runs
    a package; every failure leaves the DiT eager with a warning, never an exception."""
    report.stats = AotStats()
    if report.artifact != "loaded":
        if require:
            log.warning(
                "no usable AOT block package (%s) and compile_require_artifacts is set: the DiT runs eager "
                "(build one with `turboflow model compile-artifacts --compile aot`)",
                report.artifact,
            )
            report.compiled = False
            return False
        try:
            report.packages = build_and_save(pipeline, report, sizes, save=save)
        except Exception as e:  # noqa: BLE001  (export or AOTInductor failing on some op: stay correct, run eager)
            log.warning("AOT block packages could not be built (%s: %s): the DiT runs eager", type(e).__name__, e)
            report.detail = f"{report.detail}; build failed: {type(e).__name__}: {e}".lstrip("; ")
            report.compiled = False
            return False
    blocks = sum(install(net, report.packages, report.stats) for net in nets(pipeline))
    report.info = {**report.info, "blocks": blocks}
    if not blocks:
        log.warning("no DiT block matches the AOT packages' weights: the DiT runs eager")
    report.compiled = blocks > 0
    return report.compiled


def build_and_save(pipeline, report: ArtifactReport, sizes: list, *, save: bool = True) -> list[BlockPackage]:
    """Build the packages for `sizes` with the blocks eager, save them as the artifact of `report.key` (atomically;
    an unwritable store is a warning) and load them; report.saved is the path written."""
    for net in nets(pipeline):
        uninstall(net)
    start = time.perf_counter()
    payload, info = build(pipeline, sizes)
    report.info = {"kind": AOT, "models": len(info["models"]), "build_s": round(time.perf_counter() - start, 3)}
    if save:
        try:
            report.saved = str(report.store.save(report.key, report.inputs, payload, info))
            log.info("AOT block packages %s saved to %s (%.1f MB)", report.key[:12], report.saved, len(payload) / 1e6)
        except OSError as e:
            log.warning("AOT block packages %s not saved: %s", report.key[:12], e)
    return load_packages(payload, info, pipeline.device)
