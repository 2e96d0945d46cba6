"""How big the serving image's Python packages are, and what a slimmer image could drop (issue 14, deliverable 4).

    python -m bench.image_size --out DIR [--wheels DIR]
    python -m bench.image_size --out DIR --wheel-files WHEEL...     # sizes of wheel files only (no install)

Run it where the serving packages are installed (the GPU machine: torch with its CUDA wheels system-wide, the
carried wheels in `--wheels`, installed here with pip's bytecode compilation as the image does). Five parts, each
recorded in `DIR/image-size.json` even when another fails (with its traceback):

1. **inventory**: the closure of what `infra/Containerfile` installs (`bench.serving_env`: pyproject's
   dependencies plus the image's extras, `Requires-Dist` followed), every file of every distribution's RECORD:
   apparent bytes (what a layer's tar holds) and disk bytes (`du`), by category (tests directories, bytecode, shared
   libraries, static libraries, headers, Python source, the rest), per distribution and per top-level directory
   (`nvidia/<library>` for the nvidia-* wheels, `triton/backends/<name>` for triton's backends);
2. **compressed**: every file through zlib level 6 (the gzip level docker and buildah compress layers with) in
   parallel, for the registry size, and the inflate rate measured on the same data (a proxy for the unpack that
   follows each layer's download);
3. **loaded**: a child process of this interpreter records `/proc/self/maps` after each stage: `import torch`; the
   serving imports (the function, the diffusers and transformers model classes the loader uses); a bf16 matmul,
   conv3d and SDPA and, where the GPU has FP8, a scaled FP8 matmul; on CUDA a tiny T2V generation through the engine
   with SLA, FP8 linears and compiled blocks. Which of the image's shared libraries are ever mapped, and when. It
   also times compiling the standard-library modules those imports load (what every process pays when, as in the
   python:*-slim base images, the standard library ships without bytecode);
4. **slimming**: bytes in tests directories, static libraries (`.a`: never loaded at run time), debug sections of
   shared libraries (ELF `.debug_*`: `strip --strip-debug`), triton's backends, and shared libraries never mapped
   with the deployed role that uses them where one is known;
5. **pull**: seconds to pull the packages at stated registry bandwidths,
   `compressed / bandwidth + apparent / inflate rate` (download, then unpack: containerd unpacks a layer after it
   has downloaded it, and the torch layer holds nearly all the bytes).

The standard library, the Debian packages and the base image are not measured here (docs/scale-from-zero.md
counts them); the project's own packages are (the directories the Containerfile copies).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import site as site_module
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from .serving_env import REPO, closure, distributions, serving_roots

SHARED_LIB = re.compile(r"\.so(\.\d+)*$")
HEADER_SUFFIXES = (".h", ".hpp", ".hxx", ".cuh", ".inl")
TEST_DIRS = frozenset({"tests", "test"})
# docker, buildah and containerd compress layers with gzip at the default level
GZIP_LEVEL = 6
CHUNK = 8 << 20
# registry -> node bandwidths the pull estimate is given for (bytes/s): 1 Gbit/s, 5 Gbit/s, 10 Gbit/s
BANDWIDTHS = {"1 Gbit/s": 125e6, "5 Gbit/s": 625e6, "10 Gbit/s": 1.25e9}
# shared libraries a single-GPU T2V probe may never map although a deployed role uses them (path substring -> user)
KNOWN_USERS = {
    "nccl": "multi-GPU pods: NCCL collectives (infra/overlays/gpu-2x, engine/parallel.py)",
    "triton": "compiled kernels (TURBOFLOW_COMPILE, SLA's FlexAttention) and Triton's own tools",
    # the image's other roles and the request path past the probe's stages
    "av.libs": "the mp4 encoder (every request; the generation stage maps it)",
    "av/": "the mp4 encoder (every request; the generation stage maps it)",
    "hf_xet": "the pull Jobs' Hugging Face downloads (turboflow model pull)",
    "psycopg": "the gateway's and the billing ledger's PostgreSQL driver",
    "sqlalchemy": "the usage ledger (billing/ledger.py)",
    "pydantic": "the gateway (FastAPI)",
}


# ---------------------------------------------------------------------------------------------------------------
# 1. inventory
# ---------------------------------------------------------------------------------------------------------------
def category(relpath: str) -> str:
    """What a file of a distribution is, from its path relative to the site directory."""
    parts = relpath.split("/")
    if not parts[0].endswith((".dist-info", ".data")) and TEST_DIRS.intersection(parts[:-1]):
        return "tests"
    name = parts[-1]
    if "__pycache__" in parts or name.endswith(".pyc"):
        return "bytecode"
    if SHARED_LIB.search(name):
        return "shared_libs"
    if name.endswith(".a"):
        return "static_libs"
    if "include" in parts[:-1] or name.endswith(HEADER_SUFFIXES):
        return "headers"
    if name.endswith((".py", ".pyi")):
        return "python_source"
    return "other"


def group(relpath: str) -> str:
    """The top-level directory a file is reported under: `nvidia/<library>` inside the nvidia-* namespace,
    `triton/backends/<name>` for triton's backends, else the first path component."""
    parts = relpath.split("/")
    if parts[0] == "nvidia" and len(parts) > 2:
        return "/".join(parts[:2])
    if parts[:2] == ["triton", "backends"] and len(parts) > 3:
        return "/".join(parts[:3])
    return parts[0] if len(parts) > 1 else "(top-level files)"


@dataclass(frozen=True)
class InstalledFile:
    distribution: str
    relpath: str
    path: str  # real path: what /proc/self/maps names
    size: int
    disk: int


def distribution_files(name: str, dist: importlib.metadata.Distribution) -> list[InstalledFile]:
    """The files of one installed distribution (its RECORD), symlinks and files outside the site skipped."""
    root = Path(dist.locate_file("")).resolve()
    out = []
    for f in dist.files or ():
        rel = f.as_posix()
        if rel.startswith(("/", "..")):
            continue
        path = root / rel
        try:
            st = path.lstat()
        except OSError:
            continue  # RECORD names a file that is gone (often a .pyc)
        if not path.is_file() or path.is_symlink():
            continue
        out.append(InstalledFile(name, rel, str(path.resolve()), st.st_size, st.st_blocks * 512))
    return out


def project_files(containerfile: str, repo: Path = REPO) -> list[InstalledFile]:
    """The project's own package directories, as the Containerfile copies them (`COPY engine/ engine/`)."""
    out = []
    for d in re.findall(r"^COPY (\w+)/ \1/$", containerfile, re.M):
        for p in sorted((repo / d).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                st = p.stat()
                out.append(
                    InstalledFile(
                        "turboflow (this project)",
                        f"{d}/{p.relative_to(repo / d)}",
                        str(p),
                        st.st_size,
                        st.st_blocks * 512,
                    )
                )
    return out


def summarise(files: Iterable[InstalledFile], key: Callable[[InstalledFile], str]) -> dict[str, dict]:
    """{key: {bytes, disk_bytes, files, by category}} sorted by bytes, largest first."""
    rows: dict[str, dict] = {}
    for f in files:
        row = rows.setdefault(key(f), {"bytes": 0, "disk_bytes": 0, "files": 0, "by_category": {}})
        row["bytes"] += f.size
        row["disk_bytes"] += f.disk
        row["files"] += 1
        cat = category(f.relpath)
        row["by_category"][cat] = row["by_category"].get(cat, 0) + f.size
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["bytes"]))


def inventory(sources: list[Path], containerfile: str) -> tuple[dict, list[InstalledFile]]:
    roots, extras = serving_roots()
    available = distributions(sources)
    selected, missing, conflicts = closure(roots, available)
    files: list[InstalledFile] = []
    seen: set[str] = set()
    versions = {}
    for name, dist in sorted(selected.items()):
        versions[name] = dist.version
        for f in distribution_files(name, dist):
            if f.path not in seen:  # a namespace __init__ shared by several wheels counts once
                seen.add(f.path)
                files.append(f)
    files += project_files(containerfile)
    total = sum(f.size for f in files)
    result = {
        "roots": roots,
        "extras": extras,
        "sources": [str(s) for s in sources],
        "missing": missing,
        "version_conflicts": conflicts,
        "distributions": {
            name: {"version": versions.get(name), **row}
            for name, row in summarise(files, lambda f: f.distribution).items()
        },
        "top_level": summarise(files, lambda f: group(f.relpath)),
        "by_category": {k: v for k, v in summarise(files, lambda f: category(f.relpath)).items()},
        "total_bytes": total,
        "total_disk_bytes": sum(f.disk for f in files),
        "files": len(files),
    }
    return result, files


# ---------------------------------------------------------------------------------------------------------------
# 2. compressed size
# ---------------------------------------------------------------------------------------------------------------
def _gzip_file(path: str) -> tuple[int, int, float, float]:
    """(bytes read, deflated bytes, deflate seconds, inflate seconds) of one file at GZIP_LEVEL, streamed."""
    deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    inflate = zlib.decompressobj(31)
    read = out = 0
    t_deflate = t_inflate = 0.0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            read += len(chunk)
            t = time.perf_counter()
            packed = deflate.compress(chunk)
            t_deflate += time.perf_counter() - t
            out += len(packed)
            t = time.perf_counter()
            inflate.decompress(packed)
            t_inflate += time.perf_counter() - t
    t = time.perf_counter()
    tail = deflate.flush()
    t_deflate += time.perf_counter() - t
    inflate.decompress(tail)
    return read, out + len(tail), t_deflate, t_inflate


def compressed_sizes(files: list[InstalledFile], budget_s: float, workers: int | None = None) -> dict:
    """Deflate every file (largest first) until `budget_s` runs out; per distribution and in total, the files not
    reached extrapolated at the ratio of those that were."""
    start = time.perf_counter()
    order = sorted(files, key=lambda f: -f.size)
    per_dist: dict[str, list[int]] = {}
    done_bytes = packed_bytes = 0
    inflate_s = deflate_s = 0.0
    reached: set[str] = set()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = {}
        it = iter(order)
        limit = (workers or os.cpu_count() or 1) * 2
        while True:
            while len(pending) < limit and time.perf_counter() - start < budget_s:
                f = next(it, None)
                if f is None:
                    break
                pending[pool.submit(_gzip_file, f.path)] = f
            if not pending:
                break
            fut = next(as_completed(pending))
            f = pending.pop(fut)
            try:
                read, packed, t_def, t_inf = fut.result()
            except OSError:
                continue
            reached.add(f.path)
            done_bytes += read
            packed_bytes += packed
            deflate_s += t_def
            inflate_s += t_inf
            row = per_dist.setdefault(f.distribution, [0, 0])
            row[0] += read
            row[1] += packed
    ratio = packed_bytes / done_bytes if done_bytes else 1.0
    total = sum(f.size for f in files)
    unreached = total - sum(f.size for f in files if f.path in reached)
    return {
        "gzip_level": GZIP_LEVEL,
        "ratio": ratio,
        "measured_bytes": done_bytes,
        "measured_compressed_bytes": packed_bytes,
        "complete": unreached == 0,
        "estimated_compressed_bytes": int(packed_bytes + unreached * ratio),
        "per_distribution": {
            d: {"bytes": b, "compressed_bytes": c} for d, (b, c) in sorted(per_dist.items(), key=lambda kv: -kv[1][1])
        },
        # one core's rates (summed over the workers' files): deflate is the build, inflate the node's unpack
        "deflate_bytes_per_s_one_core": done_bytes / deflate_s if deflate_s else None,
        "inflate_bytes_per_s_one_core": done_bytes / inflate_s if inflate_s else None,
        "seconds": time.perf_counter() - start,
    }


def pull_estimate(compressed: int, apparent: int, inflate_rate: float | None) -> dict:
    """Seconds to bring the layers onto a node: download at each bandwidth, then unpack at one core's inflate rate
    (containerd's default unpack of a gzip layer is one stream; nearly all bytes are in the torch layer)."""
    unpack = apparent / inflate_rate if inflate_rate else None
    return {
        "compressed_bytes": compressed,
        "apparent_bytes": apparent,
        "unpack_seconds": unpack,
        "by_bandwidth": {
            label: {
                "download_seconds": compressed / rate,
                "total_seconds": compressed / rate + (unpack or 0.0),
            }
            for label, rate in BANDWIDTHS.items()
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# 3. which shared libraries are ever mapped (child process)
# ---------------------------------------------------------------------------------------------------------------
def mapped_files() -> list[str]:
    """The files mapped into this process (the path column of /proc/self/maps)."""
    out: set[str] = set()
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    out.add(fields[5].strip().removesuffix(" (deleted)"))
    except OSError:
        pass
    return sorted(out)


def stdlib_compile_cost() -> dict:
    """Seconds this interpreter takes to compile the standard-library modules loaded so far from source: what every
    process pays when the standard library has no bytecode and none can be written (read-only image)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    purelib = sysconfig.get_paths()["purelib"]
    paths = sorted(
        {
            f
            for m in list(sys.modules.values())
            if (f := getattr(m, "__file__", None))
            and f.endswith(".py")
            and f.startswith(stdlib)
            and not f.startswith(purelib)
            and "site-packages" not in f
        }
    )
    nbytes = 0
    have_bytecode = 0
    t = time.perf_counter()
    for p in paths:
        src = Path(p).read_bytes()
        nbytes += len(src)
        compile(src, p, "exec", dont_inherit=True)
    seconds = time.perf_counter() - t
    for p in paths:
        if Path(importlib.util.cache_from_source(p)).exists():
            have_bytecode += 1
    return {
        "modules": len(paths),
        "source_bytes": nbytes,
        "compile_seconds": seconds,
        "with_bytecode_here": have_bytecode,
    }


def _stage_ops(device: str) -> dict:
    import torch
    import torch.nn.functional as F

    info: dict = {"device": device}
    dtype = torch.bfloat16
    a = torch.randn(256, 256, device=device, dtype=dtype)
    (a @ a).sum().item()
    x = torch.randn(1, 16, 5, 32, 32, device=device, dtype=dtype)
    w = torch.randn(16, 16, 3, 3, 3, device=device, dtype=dtype)
    F.conv3d(x, w, padding=1).sum().item()
    q = torch.randn(1, 4, 128, 64, device=device, dtype=dtype)
    F.scaled_dot_product_attention(q, q, q).sum().item()
    F.layer_norm(a.float(), (256,)).sum().item()
    if device == "cuda" and torch.cuda.get_device_capability() >= (8, 9):
        fp8 = torch.randn(256, 256, device=device).to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        torch._scaled_mm(fp8, fp8.t(), scale_a=one, scale_b=one, out_dtype=dtype).sum().item()
        info["fp8"] = True
    return info


def _stage_generate(device: str, work: Path) -> dict:
    """A tiny T2V video through the engine (the CLI the function's engine shares): on CUDA with SLA, FP8 linears
    where the GPU has FP8, and compiled blocks, so what those paths load is mapped."""
    import torch

    from turboflow.cli import main

    model = work / "tiny-t2v"
    if main(["model", "tiny", str(model), "--kind", "t2v"]) != 0:
        raise RuntimeError("turboflow model tiny failed")
    argv = ["generate", "t2v", "--model", str(model), "--prompt", "a red fox in the snow", "--num-frames", "5"]
    argv += ["--num-steps", "1", "--seed", "1", "--device", device, "--out", str(work / "probe.mp4"), "-q"]
    if device == "cuda":
        argv += ["--attention", "sla", "--compile", "--compile-cache", str(work / "compile-cache")]
        if torch.cuda.get_device_capability() >= (8, 9):
            argv += ["--quant-linear", "fp8"]
    status = main(argv)
    out = {"argv": argv, "exit_status": status}
    if status != 0 and "--quant-linear" in argv:  # FP8 may refuse the tiny model's shapes: the rest still counts
        argv = argv[: argv.index("--quant-linear")]
        out["retry_without_fp8"] = {"argv": argv, "exit_status": main(argv)}
    return out


def child_probe(out: Path, generate: bool) -> None:
    """Record /proc/self/maps after each stage into `out` (written after every stage: a timeout keeps what ran)."""
    result: dict = {"stages": [], "python": sys.version}

    def stage(name: str, fn: Callable[[], dict | None]) -> None:
        t = time.perf_counter()
        row: dict = {"name": name}
        try:
            row["info"] = fn() or {}
        except Exception:  # noqa: BLE001  (one stage failing must not hide what the others loaded)
            row["error"] = traceback.format_exc()
        row["seconds"] = time.perf_counter() - t
        row["mapped"] = mapped_files()
        result["stages"].append(row)
        out.write_text(json.dumps(result))

    def import_torch() -> dict:
        import torch

        return {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}

    def serving_imports() -> dict:
        from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: F401
        from transformers import AutoTokenizer, UMT5EncoderModel  # noqa: F401

        import turboflow.functions.app  # noqa: F401

        return {}

    stage("import torch", import_torch)
    stage("serving imports", serving_imports)
    try:
        result["stdlib_bytecode"] = stdlib_compile_cost()
    except Exception:  # noqa: BLE001
        result["stdlib_bytecode"] = {"error": traceback.format_exc()}
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    stage("ops", lambda: _stage_ops(device))
    if generate:
        with tempfile.TemporaryDirectory(prefix="image-size-probe-") as work:
            stage("tiny generation", lambda: _stage_generate(device, Path(work)))
    out.write_text(json.dumps(result))


def loaded_libraries(files: list[InstalledFile], generate: bool, timeout_s: float, env: dict) -> dict:
    """Run the probe child; classify every shared library of the inventory by the first stage that mapped it."""
    with tempfile.TemporaryDirectory(prefix="image-size-") as tmp:
        out = Path(tmp) / "probe.json"
        argv = [sys.executable, "-m", "bench.image_size", "--child-probe", str(out)]
        if generate:
            argv.append("--generate")
        t = time.perf_counter()
        try:
            proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
            status, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
        except subprocess.TimeoutExpired as e:
            status, tail = "timeout", str(e.stderr or "")[-4000:]
        try:
            probe = json.loads(out.read_text())
        except (OSError, ValueError):  # never written, or cut off by the timeout mid-write
            probe = {"stages": []}
    first_seen: dict[str, str] = {}
    for row in probe["stages"]:
        for path in row.pop("mapped", []):
            first_seen.setdefault(path, row["name"])
    libs = [f for f in files if category(f.relpath) == "shared_libs"]
    loaded = [f for f in libs if f.path in first_seen]
    never = [f for f in libs if f.path not in first_seen]
    by_stage: dict[str, int] = {}
    for f in loaded:
        by_stage[first_seen[f.path]] = by_stage.get(first_seen[f.path], 0) + f.size
    return {
        "child_status": status,
        "child_seconds": time.perf_counter() - t,
        "child_output_tail": tail,
        "stages": probe["stages"],
        "stdlib_bytecode": probe.get("stdlib_bytecode"),
        "shared_libs_bytes": sum(f.size for f in libs),
        "loaded_bytes": sum(f.size for f in loaded),
        "loaded_bytes_by_first_stage": by_stage,
        "never_loaded_bytes": sum(f.size for f in never),
        "loaded": [
            {"path": f.relpath, "distribution": f.distribution, "bytes": f.size, "stage": first_seen[f.path]}
            for f in sorted(loaded, key=lambda f: -f.size)
        ],
        "never_loaded": [
            {
                "path": f.relpath,
                "distribution": f.distribution,
                "bytes": f.size,
                "used_by": known_user(f.relpath),
            }
            for f in sorted(never, key=lambda f: -f.size)
        ],
        # mapped files outside the inventory: the driver's libcuda, the system's libraries, the interpreter
        "mapped_outside": sorted(p for p in first_seen if p not in {f.path for f in files}),
    }


def known_user(relpath: str) -> str | None:
    low = relpath.lower()
    return next((why for key, why in KNOWN_USERS.items() if key in low), None)


# ---------------------------------------------------------------------------------------------------------------
# 4. slimming
# ---------------------------------------------------------------------------------------------------------------
def elf_sections(path: str) -> dict[str, int] | None:
    """{section name: size} of a 64-bit little-endian ELF file; None for anything else."""
    with open(path, "rb") as fh:
        head = fh.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return None
        shoff = int.from_bytes(head[0x28:0x30], "little")
        shentsize = int.from_bytes(head[0x3A:0x3C], "little")
        shnum = int.from_bytes(head[0x3C:0x3E], "little")
        shstrndx = int.from_bytes(head[0x3E:0x40], "little")
        if not shoff or shentsize < 64 or not shnum or shstrndx >= shnum:
            return None  # no section table, or the extended numbering this reader does not follow
        fh.seek(shoff)
        table = fh.read(shentsize * shnum)
        headers = []
        for i in range(shnum):
            h = table[i * shentsize : i * shentsize + 64]
            headers.append(
                (
                    int.from_bytes(h[0:4], "little"),  # sh_name
                    int.from_bytes(h[0x18:0x20], "little"),  # sh_offset
                    int.from_bytes(h[0x20:0x28], "little"),  # sh_size
                    int.from_bytes(h[4:8], "little"),  # sh_type (8 = NOBITS: no bytes in the file)
                )
            )
        _, stroff, strsize, _ = headers[shstrndx]
        fh.seek(stroff)
        names = fh.read(strsize)
    out = {}
    for name_at, _, size, kind in headers:
        end = names.find(b"\0", name_at)
        name = names[name_at : end if end >= 0 else len(names)].decode("ascii", "replace")
        if kind != 8:
            out[name] = out.get(name, 0) + size
    return out


def slimming(files: list[InstalledFile], loaded: dict | None) -> dict:
    """What could leave the image, by kind, with the evidence for each."""
    tests: dict[str, int] = {}
    for f in files:
        parts = f.relpath.split("/")
        if category(f.relpath) == "tests":
            i = next(i for i, p in enumerate(parts[:-1]) if p in TEST_DIRS)
            d = "/".join(parts[: i + 1])
            tests[d] = tests.get(d, 0) + f.size
    debug: list[tuple[int, int, str]] = []
    for f in files:
        if category(f.relpath) != "shared_libs":
            continue
        try:
            sections = elf_sections(f.path)
        except OSError:
            sections = None
        if sections:
            dbg = sum(v for k, v in sections.items() if k.startswith((".debug", ".zdebug")))
            sym = sections.get(".symtab", 0) + sections.get(".strtab", 0)
            if dbg or sym:
                debug.append((dbg, sym, f.relpath))
    backends: dict[str, int] = {}
    for f in files:
        g = group(f.relpath)
        if g.startswith("triton/backends/"):
            backends[g] = backends.get(g, 0) + f.size
    out = {
        "tests_dirs_bytes": sum(tests.values()),
        "tests_dirs_largest": dict(sorted(tests.items(), key=lambda kv: -kv[1])[:15]),
        "static_libs_bytes": sum(f.size for f in files if category(f.relpath) == "static_libs"),
        "static_libs": {
            f.relpath: f.size for f in sorted(files, key=lambda f: -f.size) if category(f.relpath) == "static_libs"
        },
        "debug_sections_bytes": sum(d for d, _, _ in debug),
        "symtab_bytes": sum(s for _, s, _ in debug),
        "debug_sections_largest": {p: d for d, _, p in sorted(debug, reverse=True)[:10] if d},
        "triton_backends_bytes": dict(sorted(backends.items(), key=lambda kv: -kv[1])),
        "bytecode_bytes": sum(f.size for f in files if category(f.relpath) == "bytecode"),
        "headers_bytes": sum(f.size for f in files if category(f.relpath) == "headers"),
    }
    if loaded is not None:
        never = loaded["never_loaded"]
        out["never_loaded_bytes"] = sum(r["bytes"] for r in never)
        out["never_loaded_without_known_user_bytes"] = sum(r["bytes"] for r in never if not r["used_by"])
        by_group: dict[str, int] = {}
        for r in never:
            by_group[group(r["path"])] = by_group.get(group(r["path"]), 0) + r["bytes"]
        out["never_loaded_by_directory"] = dict(sorted(by_group.items(), key=lambda kv: -kv[1]))
    return out


def wheel_inventory(wheels: Iterable[Path]) -> dict:
    """Sizes of wheel files without installing them (a wheel is a zip: its directory lists each file's size):
    per wheel the download (zip) bytes, the installed bytes by category, and the bytes the Containerfile's removal
    of test directories and static libraries takes out. Bytecode is not in a wheel: pip adds it at install time
    (this venv's ratio of bytecode to source is reported to scale it)."""
    import zipfile

    rows = {}
    for wheel in sorted(wheels):
        with zipfile.ZipFile(wheel) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
        by_cat: dict[str, int] = {}
        for i in infos:
            rel = re.sub(r"^[^/]+\.data/(purelib|platlib)/", "", i.filename)
            c = category(rel)
            by_cat[c] = by_cat.get(c, 0) + i.file_size
        rows[Path(wheel).name] = {
            "download_bytes": Path(wheel).stat().st_size,
            "installed_bytes": sum(i.file_size for i in infos),
            "by_category": by_cat,
            "removed_by_containerfile_bytes": by_cat.get("tests", 0) + by_cat.get("static_libs", 0),
        }
    total = {k: sum(r[k] for r in rows.values()) for k in ("download_bytes", "installed_bytes")}
    total["removed_by_containerfile_bytes"] = sum(r["removed_by_containerfile_bytes"] for r in rows.values())
    total["python_source_bytes"] = sum(r["by_category"].get("python_source", 0) for r in rows.values())
    return {"wheels": dict(sorted(rows.items(), key=lambda kv: -kv[1]["installed_bytes"])), "total": total}


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------
def _part(result: dict, name: str, fn: Callable[[], object], log) -> object:
    """Run one part; its result or its traceback goes into `result[name]`; never raises."""
    t = time.perf_counter()
    try:
        value = fn()
        result[name] = value
        return value
    except Exception:  # noqa: BLE001  (a failed part is recorded; the other parts still run)
        result[name] = {"error": traceback.format_exc()}
        log(f"{name}: FAILED\n{result[name]['error']}")
        return None
    finally:
        log(f"{name}: {time.perf_counter() - t:.1f} s")


def install_wheels(wheels: Path, target: Path) -> None:
    """The carried wheels into `target`, with bytecode compiled as the image's pip install does."""
    whls = sorted(str(w) for w in wheels.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target), *whls]
    subprocess.run(cmd, check=True)


def package_dirs() -> list[Path]:
    """Where this interpreter finds distributions, in import order: sys.path entries holding *.dist-info (PYTHONPATH
    targets such as the carried wheels' /tmp/site come first), then the site directories."""
    dirs = [Path(p) for p in sys.path if p and Path(p).is_dir() and any(Path(p).glob("*.dist-info"))]
    dirs += [Path(d) for d in [*site_module.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(d).is_dir()]
    out: list[Path] = []
    for d in dirs:
        if d.resolve() not in {o.resolve() for o in out}:
            out.append(d)
    return out


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def summary_lines(result: dict) -> list[str]:
    lines = []
    inv = result.get("inventory") or {}
    if "total_bytes" in inv:
        lines.append(
            f"packages: {_gb(inv['total_bytes'])} in {inv['files']} files ({len(inv['distributions'])} entries), "
            f"du {_gb(inv['total_disk_bytes'])}; missing {inv['missing']}"
        )
        for name, row in list(inv["top_level"].items())[:12]:
            lines.append(f"  {name:38s} {_gb(row['bytes'])}")
    comp = result.get("compressed") or {}
    if "estimated_compressed_bytes" in comp:
        lines.append(
            f"gzip -{comp['gzip_level']}: {_gb(comp['estimated_compressed_bytes'])} (ratio {comp['ratio']:.2f}, "
            f"{'complete' if comp['complete'] else 'extrapolated'}); inflate "
            f"{(comp['inflate_bytes_per_s_one_core'] or 0) / 1e6:.0f} MB/s on one core"
        )
    pull = result.get("pull") or {}
    for label, row in (pull.get("by_bandwidth") or {}).items():
        lines.append(
            f"  pull at {label:9s}: {row['download_seconds']:6.1f} s download + unpack = {row['total_seconds']:6.1f} s"
        )
    loaded = result.get("loaded") or {}
    if "shared_libs_bytes" in loaded:
        lines.append(
            f"shared libraries {_gb(loaded['shared_libs_bytes'])}: mapped {_gb(loaded['loaded_bytes'])}, never "
            f"{_gb(loaded['never_loaded_bytes'])} (child {loaded['child_status']}, {loaded['child_seconds']:.0f} s)"
        )
        for stage in loaded["stages"]:
            lines.append(
                f"  stage {stage['name']:16s} {stage['seconds']:6.1f} s{'  ERROR' if 'error' in stage else ''}"
            )
        std = loaded.get("stdlib_bytecode") or {}
        if std:
            lines.append(
                f"  stdlib compiled from source: {std['modules']} modules in {std['compile_seconds']:.2f} s "
                f"({std['with_bytecode_here']} have bytecode here)"
            )
    slim = result.get("slimming") or {}
    if "tests_dirs_bytes" in slim:
        lines.append(
            f"slimming: tests {_gb(slim['tests_dirs_bytes'])}, static libs {_gb(slim['static_libs_bytes'])}, debug "
            f"sections {_gb(slim['debug_sections_bytes'])}, never-loaded libs without a known user "
            f"{_gb(slim.get('never_loaded_without_known_user_bytes'))}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.image_size", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="directory for image-size.json")
    ap.add_argument("--wheels", type=Path, help="carried wheels (installed into a temporary target first)")
    ap.add_argument("--compress-budget", type=float, default=60.0, help="seconds for the gzip estimate (default 60)")
    ap.add_argument("--no-compress", action="store_true", help="skip the compressed-size estimate")
    ap.add_argument("--no-probe", action="store_true", help="skip the loaded-libraries probe")
    ap.add_argument(
        "--generate",
        choices=("auto", "yes", "no"),
        default="auto",
        help="the probe's tiny generation: auto = on CUDA only (default)",
    )
    ap.add_argument("--probe-timeout", type=float, default=240.0, help="seconds for the probe child (default 240)")
    ap.add_argument(
        "--wheel-files",
        type=Path,
        nargs="+",
        help="only size these wheel files (no install, no probe): e.g. the output of `pip download` for the image",
    )
    ap.add_argument("--child-probe", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_probe:
        child_probe(args.child_probe, args.generate == "yes")
        return 0
    if args.out is None:
        ap.error("--out is required")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"date": time.strftime("%Y-%m-%d"), "python": sys.version, "command": sys.argv}
    if args.wheel_files:
        wheels = wheel_inventory(args.wheel_files)
        (args.out / "wheel-sizes.json").write_text(json.dumps(wheels, indent=1))
        for name, row in wheels["wheels"].items():
            print(f"{name[:70]:70s} download {_gb(row['download_bytes'])}  installed {_gb(row['installed_bytes'])}")
        t = wheels["total"]
        print(
            f"total: download {_gb(t['download_bytes'])}, installed {_gb(t['installed_bytes'])} (+ bytecode), "
            f"removed by the Containerfile {_gb(t['removed_by_containerfile_bytes'])}"
        )
        print(f"wrote {args.out / 'wheel-sizes.json'}")
        return 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    sources: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="image-size-wheels-") as staged:
        if args.wheels is not None:
            _part(result, "wheels", lambda: install_wheels(args.wheels, Path(staged)) or {"target": staged}, log)
            sources.append(Path(staged))
            env["PYTHONPATH"] = os.pathsep.join(p for p in (staged, env.get("PYTHONPATH", "")) if p)
        for d in package_dirs():
            if d.resolve() not in {s.resolve() for s in sources}:
                sources.append(d)
        containerfile = (REPO / "infra" / "Containerfile").read_text()
        inv = _part(result, "inventory", lambda: inventory(sources, containerfile), log)
        files = inv[1] if inv else []
        if inv:
            result["inventory"] = inv[0]
        if files and not args.no_compress:
            _part(result, "compressed", lambda: compressed_sizes(files, args.compress_budget), log)
        comp = result.get("compressed") or {}
        if inv and "estimated_compressed_bytes" in comp:
            _part(
                result,
                "pull",
                lambda: pull_estimate(
                    comp["estimated_compressed_bytes"], inv[0]["total_bytes"], comp["inflate_bytes_per_s_one_core"]
                ),
                log,
            )
        loaded = None
        if files and not args.no_probe:
            generate = {"yes": True, "no": False}.get(args.generate)
            if generate is None:
                generate = _cuda_available(env)
            loaded = _part(result, "loaded", lambda: loaded_libraries(files, generate, args.probe_timeout, env), log)
        if files:
            _part(result, "slimming", lambda: slimming(files, loaded if isinstance(loaded, dict) else None), log)
    path = args.out / "image-size.json"
    path.write_text(json.dumps(result, indent=1))
    print("\n".join(summary_lines(result)))
    print(f"wrote {path}")
    return 0


def _cuda_available(env: dict) -> bool:
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


if __name__ == "__main__":
    sys.exit(main())
