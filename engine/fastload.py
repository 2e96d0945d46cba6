"""Fast weight loading from the model cache: safetensors straight to the device, no pickle, no CPU init.

Why: a scale-to-zero pod is only useful if it becomes ready in seconds. `from_pretrained` + `.to(device)` reads
each file through mmap on one thread, builds the module on the CPU and copies tensor by tensor from pageable
memory (~5 GB/s from page cache on an H100 host). Here:

* every safetensors file is parsed by hand (8-byte header length, JSON header, one data blob) and its data blob
  is read with several threads (`os.preadv`, which drops the GIL) into small **pinned** staging buffers, each
  thread copying its chunk to one preallocated device buffer on its own CUDA stream while it reads the next one
  (double buffering). The host never holds more than threads x 2 x chunk bytes. On the CPU the blob is read in
  parallel straight into the destination tensor.
* tensors are views into that one device buffer (bit-identical to `safetensors.torch.load_file`).
* the module is built with parameters on the `meta` device (no random init, no memory) exactly the way
  diffusers / transformers build it inside from_pretrained (same default dtype, so non-persistent buffers such
  as Wan's rotary tables are created identically on the CPU and only moved), then filled with
  `load_state_dict(assign=True)`. The library's dtype rules (diffusers' `_keep_in_fp32_modules`, transformers'
  fp16-only rule and `_keep_in_fp32_modules_strict`) and tied weights (umT5's `encoder.embed_tokens`) are applied
  so the result equals from_pretrained's, parameter for parameter and dtype for dtype.
* `load_models` starts reading every component's files at once (text encoder and DiT concurrently) while the
  main thread builds the empty modules.

No torch.compile happens here, so none is paid at cold start.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from turboflow.errors import CheckpointError, ModelCacheError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}
DEFAULT_CHUNK = 32 << 20


def default_threads() -> int:
    """Reader threads when the caller names none (LoadOptions.load_threads): the CPU count, clamped to 2..16."""
    return max(2, min(16, os.cpu_count() or 4))


# ---- safetensors, by hand --------------------------------------------------------------------------------------
@dataclass
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offsets inside the data blob
    end: int


@dataclass
class SafetensorsFile:
    path: Path
    data_offset: int  # where the data blob starts in the file
    data_size: int
    tensors: list[TensorSpec] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


def read_header(path: str | os.PathLike) -> SafetensorsFile:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(fh.read(n))
        size = path.stat().st_size
    except (OSError, ValueError) as e:
        raise ModelCacheError(f"{path} is not a readable safetensors file: {e}", code="model_cache_invalid") from e
    meta = header.pop("__metadata__", {}) or {}
    specs, data_size = [], 0
    for name, info in header.items():
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelCacheError(
                f"{path}: tensor {name} has unsupported dtype {info['dtype']}", code="model_cache_invalid"
            )
        begin, end = info["data_offsets"]
        specs.append(TensorSpec(name, dtype, tuple(info["shape"]), begin, end))
        data_size = max(data_size, end)
    if 8 + n + data_size > size:
        raise ModelCacheError(
            f"{path} is truncated: header promises {8 + n + data_size} bytes, file has {size}",
            code="model_cache_incomplete",
        )
    return SafetensorsFile(path, 8 + n, data_size, specs, meta)


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"short read at offset {offset + done}")
        done += got


def _chunks(size: int, chunk: int) -> list[tuple[int, int]]:
    return [(o, min(chunk, size - o)) for o in range(0, size, chunk)]


class _Staging(threading.local):
    """Per-thread pinned double buffers and a CUDA stream (reused across files)."""

    slots: list | None = None


_staging = _Staging()


def _read_blob_cuda(files: list[SafetensorsFile], device: torch.device, threads: int, chunk: int) -> list:
    """Each file's data blob into one device uint8 buffer; chunks spread over `threads` threads."""
    blobs = [torch.empty(f.data_size, dtype=torch.uint8, device=device) for f in files]
    fds = [os.open(f.path, os.O_RDONLY) for f in files]
    work = [(i, off, n) for i, f in enumerate(files) for off, n in _chunks(f.data_size, chunk)]
    try:

        def run(mine):
            if _staging.slots is None or _staging.slots[0][0].numel() < chunk:
                _staging.slots = [
                    (torch.empty(chunk, dtype=torch.uint8, pin_memory=True), torch.cuda.Event()) for _ in range(2)
                ]
                _staging.stream = torch.cuda.Stream(device)
            stream, used = _staging.stream, [False, False]
            for k, (i, off, n) in enumerate(mine):
                buf, event = _staging.slots[k % 2]
                if used[k % 2]:
                    event.synchronize()  # the copy out of this slot is done; refill it
                _pread_into(fds[i], memoryview(buf.numpy())[:n], files[i].data_offset + off)
                with torch.cuda.stream(stream):
                    blobs[i][off : off + n].copy_(buf[:n], non_blocking=True)
                    event.record(stream)
                used[k % 2] = True
            stream.synchronize()

        # round-robin so every thread has work from the start to the end
        per = [work[t::threads] for t in range(threads)]
        with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="fastload") as pool:
            for fut in [pool.submit(run, p) for p in per if p]:
                fut.result()
    finally:
        for fd in fds:
            os.close(fd)
    return blobs


def _read_blob_cpu(files: list[SafetensorsFile], threads: int, chunk: int) -> list:
    # Same address modulo 64 as safetensors' mmap of the file (page-aligned base + offset): CPU BLAS picks
    # alignment-dependent code paths, so this keeps results bit-identical to from_pretrained's mmap'd weights.
    blobs = []
    for f in files:
        shift = f.data_offset % 64
        blobs.append(torch.empty(f.data_size + 64, dtype=torch.uint8)[shift : shift + f.data_size])
    fds = [os.open(f.path, os.O_RDONLY) for f in files]
    try:

        def run(i, off, n):
            _pread_into(fds[i], memoryview(blobs[i].numpy())[off : off + n], files[i].data_offset + off)

        with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="fastload") as pool:
            futs = [pool.submit(run, i, off, n) for i, f in enumerate(files) for off, n in _chunks(f.data_size, chunk)]
            for fut in futs:
                fut.result()
    finally:
        for fd in fds:
            os.close(fd)
    return blobs


def _views(f: SafetensorsFile, blob: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for s in f.tensors:
        raw = blob[s.begin : s.end]
        item = torch.empty((), dtype=s.dtype).element_size()
        if raw.data_ptr() % item or (raw.is_cuda and raw.data_ptr() % 16):
            # misaligned for its dtype, or for vectorised GPU kernels: give it its own allocation
            raw = raw.clone()
        out[s.name] = raw.view(s.dtype).view(s.shape)
    return out


def load_safetensors(
    paths, device: str | torch.device = "cpu", *, threads: int | None = None, chunk_bytes: int = DEFAULT_CHUNK
) -> dict[str, torch.Tensor]:
    """Like safetensors.torch.load_file for one or several files, but parallel and straight to `device`."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    device = torch.device(device)
    files = [read_header(p) for p in paths]
    threads = threads or default_threads()
    if device.type == "cuda":
        blobs = _read_blob_cuda(files, device, threads, chunk_bytes)
    elif device.type == "cpu":
        blobs = _read_blob_cpu(files, threads, chunk_bytes)
    else:  # other accelerators: read on the host, then one copy each
        blobs = [b.to(device) for b in _read_blob_cpu(files, threads, chunk_bytes)]
    state: dict[str, torch.Tensor] = {}
    for f, blob in zip(files, blobs):
        state.update(_views(f, blob))
    return state


def weight_files(directory: str | os.PathLike) -> list[Path]:
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ModelCacheError(
            f"no *.safetensors weights in {directory} (the model cache holds safetensors only)",
            code="model_cache_invalid",
        )
    return files


# ---- building modules without initialising them --------------------------------------------------------------------
@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _is_diffusers(cls) -> bool:
    """diffusers models load by config dict and have their own fp32 rules; transformers models by config object."""
    from diffusers import ModelMixin

    return issubclass(cls, ModelMixin)


def empty_model(cls, role: str, path: Path, dtype: torch.dtype):
    """A `cls` (diffusers or transformers model class, the family's for `role`) with parameters on `meta` and real
    (CPU) buffers, as from_pretrained builds it."""
    import accelerate

    try:
        if _is_diffusers(cls):
            from diffusers.models.modeling_utils import no_init_weights

            config = cls.load_config(path, local_files_only=True)
            with _default_dtype(dtype), no_init_weights(), accelerate.init_empty_weights(include_buffers=False):
                model = cls.from_config(config)
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path, local_files_only=True)
            try:
                from transformers.initialization import no_init_weights as hf_no_init
            except ImportError:  # transformers 4.x
                from transformers.modeling_utils import no_init_weights as hf_no_init
            with _default_dtype(dtype), hf_no_init(), accelerate.init_empty_weights(include_buffers=False):
                model = cls(config)
    except (OSError, ValueError, TypeError) as e:
        raise ModelCacheError(f"cannot build {role} from {path}: {e}", code="model_cache_invalid") from e
    return model


def _target_dtype(model, name: str, dtype: torch.dtype) -> torch.dtype:
    parts = name.split(".")
    if _is_diffusers(type(model)):
        keep = type(model)._keep_in_fp32_modules or []
        return torch.float32 if any(m in parts for m in keep) else dtype
    keep = (
        set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
        if dtype in (torch.float16, torch.bfloat16)
        else set()
    )
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return torch.float32 if any(m in parts for m in keep) else dtype


def _get(model, name: str):
    obj = model
    for p in name.split("."):
        obj = getattr(obj, p)
    return obj


def _set_param(model, name: str, tensor: torch.Tensor):
    owner, _, leaf = name.rpartition(".")
    module = _get(model, owner) if owner else model
    module._parameters[leaf] = (
        tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(tensor, requires_grad=False)
    )


def _is_int8_scale(model, name: str) -> bool:
    """The fp32 block scales of a stored int8 layer keep their dtype (the weight dtype would round them)."""
    from .quant import SCALE_SUFFIX, BlockInt8Linear

    return name.endswith(SCALE_SUFFIX) and isinstance(_get(model, name[: -len(SCALE_SUFFIX)]), BlockInt8Linear)


def fill_model(model, role: str, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device):
    """Assign the loaded tensors (cast per the library's dtype rules); tie, check keys, move buffers."""
    expected = model.state_dict(keep_vars=True)
    cast = {}
    for name, t in state.items():
        if name in expected and t.is_floating_point() and not _is_int8_scale(model, name):
            t = t.to(_target_dtype(model, name, dtype))
        cast[name] = t
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if not isinstance(tied, dict):
        tied = {}
    missing = set(expected) - set(cast) - {k for k, v in tied.items() if v in cast}
    unexpected = set(cast) - set(expected)
    if missing or unexpected:
        detail = "; ".join(
            f"{k}: {sorted(v)[:5]}{' ...' if len(v) > 5 else ''}"
            for k, v in (("missing_keys", missing), ("unexpected_keys", unexpected))
            if v
        )
        raise CheckpointError(f"{role} weights do not match its config ({detail})")
    for name, t in cast.items():
        if tuple(expected[name].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{role} weights do not match its config (mismatched_keys: {name} is "
                f"{tuple(t.shape)}, model wants {tuple(expected[name].shape)})"
            )
    model.load_state_dict(cast, strict=False, assign=True)
    for target, source in tied.items():
        if target not in cast and source in cast:
            _set_param(model, target, _get(model, source))
    model.to(device)  # non-persistent buffers (rotary tables) still live on the CPU
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise CheckpointError(f"{role}: tensors left uninitialised after loading: {leftovers[:5]}")
    model.eval().requires_grad_(False)
    return model


# ---- several components at once -------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    bytes: int = 0
    read_seconds: float = 0.0  # wall time of the parallel read + host->device copy of all components
    build_seconds: float = 0.0  # building the empty modules (overlaps the read)
    assign_seconds: float = 0.0

    @property
    def gbps(self) -> float:
        return self.bytes / self.read_seconds / 1e9 if self.read_seconds else 0.0


def load_models(
    components: dict[str, Path],
    dtype: torch.dtype,
    devices: dict[str, torch.device],
    *,
    classes: dict[str, type],
    threads: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK,
    report: LoadReport | None = None,
) -> dict:
    """Load several networks (role -> directory, built as classes[role]: the family's component classes)
    concurrently; returns role -> module on devices[role]."""
    report = report if report is not None else LoadReport()
    threads = threads or default_threads()
    roles = list(components)
    for role in roles:
        if not Path(components[role]).is_dir():
            raise ModelCacheError(f"component {role!r} missing: {components[role]}", code="model_cache_incomplete")
    files = {role: weight_files(components[role]) for role in roles}
    headers = {role: [read_header(p) for p in fs] for role, fs in files.items()}
    report.bytes = sum(h.data_size for hs in headers.values() for h in hs)
    # one parallel read per target device over the chunks of ALL its components' files, interleaved, so the
    # text encoder and the DiT stream side by side; the main thread builds the empty modules meanwhile
    groups: dict[torch.device, list[str]] = {}
    for role in roles:
        groups.setdefault(torch.device(devices[role]), []).append(role)
    read_started = time.perf_counter()
    read_done: dict[str, float] = {}

    def read(device, group):
        hs = [h for role in group for h in headers[role]]
        blobs = (
            _read_blob_cuda(hs, device, threads, chunk_bytes)
            if device.type == "cuda"
            else _read_blob_cpu(hs, threads, chunk_bytes)
        )
        now = time.perf_counter()
        out, k = {}, 0
        for role in group:
            state = {}
            for h in headers[role]:
                state.update(_views(h, blobs[k] if device.type in ("cuda", "cpu") else blobs[k].to(device)))
                k += 1
            out[role] = state
            read_done[role] = now
        return out

    with concurrent.futures.ThreadPoolExecutor(len(groups), thread_name_prefix="fastload-g") as pool:
        futures = [pool.submit(read, dev, group) for dev, group in groups.items()]
        t = time.perf_counter()
        empties = {role: empty_model(classes[role], role, Path(components[role]), dtype) for role in roles}
        report.build_seconds = time.perf_counter() - t
        states = {}
        for fut in futures:
            states.update(fut.result())
    report.read_seconds = max(read_done.values()) - read_started
    t = time.perf_counter()
    from .quant import use_stored_int8

    for role in roles:  # a DiT imported with --keep-int8: its int8 layers load as they are (no-op elsewhere)
        use_stored_int8(empties[role], states[role])
    models = {role: fill_model(empties[role], role, states[role], dtype, devices[role]) for role in roles}
    for dev in {d for d in devices.values() if d.type == "cuda"}:
        torch.cuda.synchronize(dev)
    report.assign_seconds = time.perf_counter() - t
    return models
