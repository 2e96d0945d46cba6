"""Compile artifacts prepared ahead of time: torch.compile's portable cache, keyed, stored beside the weights.

A cold pod that compiles its DiT blocks pays 30 s (1.3B) to 122 s (A14B) before it is ready. Instead, the graphs
and kernels compiled once (by `turboflow model compile-artifacts` in the model-cache job, or by the first pod that
had to compile) are saved with `torch.compiler.save_cache_artifacts()` and loaded with
`torch.compiler.load_cache_artifacts()` into Inductor's cache before any compile, so the warm-up only traces.

Layout: `<dir>/artifacts/<key>.bin` (the bytes, framed with their header) + `<key>.json` (the same header, for
people and for explaining a mismatch). The key is sha256 over the canonical JSON of everything that makes a compiled
graph unusable elsewhere (`key_inputs`): the engine's source digest, GPU architecture (or "cpu"), torch/CUDA/triton
versions, Python minor, model name + manifest digest, the warm-up sizes and the graph-changing options. The .bin
is self-describing: a reader trusts only its embedded header (key, inputs, payload sha256), so a sidecar from
another writer can never pair with the wrong bytes.

Writes are atomic (temp file in the same directory, fsync, os.replace): concurrent writers are fine, the last rename
wins and a reader sees either the old file or the new one, never a torn one. Every failure to find or use an
artifact is an `ArtifactReport` (loaded | missing | mismatch | corrupt) and a warning, never an exception: the
caller then compiles just in time, or runs eager when artifacts are required (LoadOptions.compile_require_artifacts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"TURBOFLOW-COMPILE-ARTIFACT-1\n"
_LENGTH = struct.Struct(">Q")  # header length, then the JSON header, then the payload
STATES = ("loaded", "missing", "mismatch", "corrupt")


@dataclass
class ArtifactReport:
    """What happened to the compile artifact of one load: `artifact` is loaded | missing | mismatch | corrupt
    (a function turns it into a metric label); `saved` is the path written after a just-in-time compile."""

    artifact: str
    key: str
    path: str | None = None
    detail: str = ""
    load_s: float = 0.0
    saved: str | None = None
    jit_compiles: int | None = None  # Inductor FX-graph cache misses during the warm-up: 0 = nothing compiled
    compiled: bool = True  # False: artifacts were required and absent, the DiT runs eager
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the key ---------------------------------------------------------------------------------------------------------
def engine_code_digest(root: Path | None = None) -> str:
    """sha256 over the engine's Python sources (path and bytes of each, sorted): the code dynamo traces. Another
    release's blocks, attention or kernels give other graphs, which a saved artifact does not hold; without this an
    upgraded pod would load a matching artifact and still compile at start."""
    root = root or Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def platform_inputs(device) -> dict:
    """The parts of the key a compiled kernel depends on outside the model: accelerator architecture, library
    versions, Python minor. Kernels built for sm_90 run on any sm_90 GPU, so the architecture, not the name."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        accelerator = f"cuda:sm_{major}{minor}"
    else:
        accelerator = device.type
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "engine_code": engine_code_digest(),
        "accelerator": accelerator,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def manifest_digest(model_dir: str | os.PathLike) -> str:
    """sha256 of the model cache's manifest.json (it lists every weight file's sha256 and size)."""
    return hashlib.sha256((Path(model_dir) / "manifest.json").read_bytes()).hexdigest()


def key_inputs(
    *,
    platform: Mapping,
    model_name: str,
    manifest_sha256: str,
    sizes: Iterable[Sequence],
    quant_linear: str | None,
    attention: str,
    sla_topk: float | None,
    sla_pooling: str,
    compile_mode: str,
    sla_backend: str = "auto",
    vae_decode: str = "base",
    backend: str,
    dtype: str,
) -> dict:
    """Everything the key covers, as plain JSON values; sizes as [resolution, aspect, frames] in the order given
    (the warm-up compiles them in that order)."""
    return {
        **dict(platform),
        "model": model_name,
        "manifest_sha256": manifest_sha256,
        "sizes": [[str(r), str(a), int(f)] for r, a, f in sizes],
        "quant_linear": quant_linear,
        "attention": attention,
        "sla_topk": sla_topk,
        "sla_pooling": sla_pooling,
        "sla_backend": sla_backend,
        "vae_decode": vae_decode,
        "compile_mode": compile_mode,
        "backend": backend,
        "dtype": dtype,
    }


def artifact_key(inputs: Mapping) -> str:
    """sha256 hex of the canonical JSON of `inputs` (sorted keys, no whitespace): equal inputs, equal key."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---- the file format -------------------------------------------------------------------------------------------------
class CorruptArtifact(ValueError):
    """The bytes of an artifact file are not a whole, intact artifact."""


def encode(header: Mapping, payload: bytes) -> bytes:
    """MAGIC | u64 big-endian header length | header JSON | payload; header gets the payload's sha256 and size."""
    head = {**header, "payload_sha256": hashlib.sha256(payload).hexdigest(), "payload_bytes": len(payload)}
    raw = json.dumps(head, sort_keys=True).encode()
    return MAGIC + _LENGTH.pack(len(raw)) + raw + payload


def decode(data: bytes) -> tuple[dict, bytes]:
    """(header, payload) of `encode`'s output; CorruptArtifact when the frame, the JSON or the checksum is off."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _LENGTH.size:
        raise CorruptArtifact("not a turboflow compile artifact (bad magic or truncated)")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    if start + length > len(data):
        raise CorruptArtifact("truncated header")
    try:
        header = json.loads(data[start : start + length])
    except ValueError as e:
        raise CorruptArtifact(f"unreadable header: {e}") from e
    payload = data[start + length :]
    if not isinstance(header, dict) or header.get("payload_bytes") != len(payload):
        raise CorruptArtifact("payload size differs from the header's")
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise CorruptArtifact("payload checksum differs from the header's")
    return header, payload


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one: a temp file in the same
    directory (same filesystem, so the rename is atomic), fsync'd, then os.replace; the directory fsync'd after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # some filesystems refuse a directory fsync; the rename itself is still atomic
        pass
    finally:
        os.close(dir_fd)


# ---- the store -------------------------------------------------------------------------------------------------------
class ArtifactStore:
    """Artifact directories searched in order; writes go to the first. In deployment the first is the writable
    compile cache and a later one the read-only `<model_dir>/.compile-cache/artifacts` the model-cache job filled."""

    def __init__(self, directories: Iterable[str | os.PathLike]):
        unique: dict[Path, None] = {}
        for d in directories:
            unique.setdefault(Path(d), None)
        self.directories = list(unique)
        if not self.directories:
            raise ValueError("an artifact store needs at least one directory")

    @classmethod
    def for_model(cls, model_dir: str | os.PathLike, compile_cache: str | os.PathLike | None = None) -> ArtifactStore:
        """The compile cache's `artifacts/` (engine/compiled.py compile_cache_dir), then the one beside the weights."""
        from .compiled import compile_cache_dir

        beside_weights = Path(model_dir) / ".compile-cache" / "artifacts"
        return cls([compile_cache_dir(model_dir, compile_cache) / "artifacts", beside_weights])

    @staticmethod
    def bin_name(key: str) -> str:
        return f"{key}.bin"

    def save(self, key: str, inputs: Mapping, payload: bytes, info: Mapping | None = None) -> Path:
        """Write the artifact of `key` into the first directory, atomically: the .bin (the one that counts), then
        its sidecar."""
        header = {
            "key": key,
            "inputs": dict(inputs),
            "info": dict(info or {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        data = encode(header, payload)
        target = self.directories[0] / self.bin_name(key)
        write_atomic(target, data)
        sidecar = {k: v for k, v in decode(data)[0].items()}
        write_atomic(target.with_suffix(".json"), json.dumps(sidecar, indent=1, sort_keys=True).encode())
        return target

    def find(self, key: str, inputs: Mapping) -> tuple[ArtifactReport, bytes | None]:
        """(report, payload): the first intact artifact of `key` whose embedded inputs equal `inputs`; else the
        first problem seen (corrupt, mismatch), else `mismatch` if artifacts of the same model exist for other
        inputs (the detail names the inputs that differ), else `missing`."""
        problem: ArtifactReport | None = None
        for d in self.directories:
            path = d / self.bin_name(key)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as e:
                problem = problem or ArtifactReport("corrupt", key, str(path), f"unreadable: {e}")
                continue
            try:
                header, payload = decode(data)
            except CorruptArtifact as e:
                problem = problem or ArtifactReport("corrupt", key, str(path), str(e))
                continue
            if header.get("key") != key or header.get("inputs") != dict(inputs):
                detail = "built for other inputs: " + _differences(header.get("inputs"), inputs)
                problem = problem or ArtifactReport("mismatch", key, str(path), detail)
                continue
            return ArtifactReport("loaded", key, str(path), info=header.get("info") or {}), payload
        if problem is not None:
            return problem, None
        others = list(self._others(key, inputs))
        if others:
            path, other = others[0]
            detail = f"{len(others)} artifact(s) of this model for other inputs, e.g. {path.name}: "
            return ArtifactReport("mismatch", key, None, detail + _differences(other, inputs)), None
        searched = [str(d) for d in self.directories]
        return ArtifactReport("missing", key, None, f"no {self.bin_name(key)} in {searched}"), None

    def _others(self, key: str, inputs: Mapping):
        """(sidecar path, its inputs) of artifacts of the same model under other keys: explains a mismatch."""
        for d in self.directories:
            try:
                sidecars = sorted(d.glob("*.json"))
            except OSError:
                continue
            for p in sidecars:
                try:
                    other = json.loads(p.read_text()).get("inputs") or {}
                except (OSError, ValueError, AttributeError):
                    continue
                if p.stem != key and other.get("model") == inputs.get("model"):
                    yield p, other


def _differences(found, wanted: Mapping) -> str:
    if not isinstance(found, Mapping):
        return "no inputs recorded"
    names = sorted(k for k in {*found, *wanted} if found.get(k) != wanted.get(k))
    return ", ".join(f"{k}={found.get(k)!r} (here {wanted.get(k)!r})" for k in names) or "none"


# ---- torch's side ----------------------------------------------------------------------------------------------------
def load(store: ArtifactStore, key: str, inputs: Mapping) -> ArtifactReport:
    """Find the artifact of `key` and hand it to torch (`torch.compiler.load_cache_artifacts`, which fills
    Inductor's and AOTAutograd's local caches). Call after compiled.use_cache_dir and before any compile. Never
    raises: a problem is the report's state, logged as a warning."""
    start = time.perf_counter()
    report, payload = store.find(key, inputs)
    if payload is not None:
        import torch

        try:
            info = torch.compiler.load_cache_artifacts(payload)
        except Exception as e:  # noqa: BLE001  (torch's deserialiser raises anything on foreign bytes)
            report = ArtifactReport("corrupt", key, report.path, f"torch could not load it: {type(e).__name__}: {e}")
        else:
            if info is None:  # torch logged why (un-pickling failed)
                report = ArtifactReport("corrupt", key, report.path, "torch could not deserialise the payload")
            else:
                report.info = {kind: len(keys) for kind, keys in info.artifacts.items()}
    report.load_s = time.perf_counter() - start
    if report.artifact == "loaded":
        log.info("compile artifact %s loaded in %.2fs (%s)", key[:12], report.load_s, report.info)
    else:
        log.warning("compile artifact %s: %s (%s)", key[:12], report.artifact, report.detail)
    return report


def save(store: ArtifactStore, key: str, inputs: Mapping) -> Path | None:
    """Save what torch compiled (or loaded from its caches) in this process as the artifact of `key`; None when
    torch recorded nothing (e.g. a backend without Inductor's caches). Raises OSError when the store is unwritable."""
    import torch

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        log.warning("compile artifact %s: torch recorded nothing to save", key[:12])
        return None
    payload, info = saved
    path = store.save(key, inputs, payload, {kind: len(keys) for kind, keys in info.artifacts.items()})
    log.info("compile artifact %s saved to %s (%.1f MB)", key[:12], path, len(payload) / 1e6)
    return path


def fx_graph_cache_misses() -> int:
    """Inductor FX-graph cache misses so far in this process: each is one just-in-time Inductor compile."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"])
