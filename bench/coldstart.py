"""Weight-loading GB/s and cold start to `ready` of the T2V function, from a model cache on local disk.

measure(): writes a full-size Wan2.1-1.3B + umT5-xxl + Wan VAE cache with random bf16 weights (tiny: the tiny
cache), then in this process compares safetensors.torch.load_file(device="cuda") with engine.fastload from the
page cache and from cold disk (POSIX_FADV_DONTNEED on every file after a sync), and finally starts fresh
processes (`python -m bench.coldstart --child DIR`) that import the function, construct VideoFunction("t2v"),
call start() and poll ready(): process start -> imports -> module build / read+H2D / assign -> warm-up -> ready.
The manifest records sizes only (sha256 fields hold a placeholder: hashing 14 GB is not part of a cold start,
load_pipeline verifies sizes, and it would cost device time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _files(cache: Path) -> list[Path]:
    return sorted(p for sub in ("text_encoder", "transformer", "vae") for p in (cache / sub).glob("*.safetensors"))


def drop_page_cache(files) -> None:
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_page_cache(files) -> None:
    buf = bytearray(64 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def build_cache(cache: Path, tiny: bool, log) -> dict:
    import torch

    from turboflow.engine.modelcache import FileEntry, Manifest

    from .models import SPECS, build_text_encoder, build_tokenizer, build_transformer, build_vae

    if (cache / "manifest.json").is_file():
        return {"reused": True}
    t = time.perf_counter()
    if tiny:
        from turboflow.engine.tiny import build_tiny

        build_tiny(cache, "t2v")
        return {"seconds": time.perf_counter() - t, "tiny": True}
    dev, dtype = torch.device("cuda"), torch.bfloat16
    spec = SPECS["1.3b-480p"]
    cache.mkdir(parents=True, exist_ok=True)
    build_tokenizer(cache / "tokenizer")
    for role, build, cfg in (
        ("transformer", build_transformer, spec.transformer),
        ("text_encoder", build_text_encoder, spec.text),
        ("vae", build_vae, spec.vae),
    ):
        model = build(cfg, dev, dtype)
        model.save_pretrained(cache / role)
        log(f"  wrote {role}: {sum(f.stat().st_size for f in (cache / role).glob('*.safetensors')) / 1e9:.2f} GB")
        del model
        torch.cuda.empty_cache()
    entries = [
        FileEntry(str(p.relative_to(cache)), p.stat().st_size, "0" * 64)
        for sub in ("tokenizer", "text_encoder", "transformer", "vae")
        for p in sorted((cache / sub).rglob("*"))
        if p.is_file()
    ]
    comps = {r: r for r in ("tokenizer", "text_encoder", "vae", "transformer")}
    m = Manifest(
        name="bench-wan2.1-t2v-1.3b-random",
        kind="t2v",
        components=comps,
        files=entries,
        defaults={"sigma_max": 80.0, "resolution": "480p"},
        source={"bench": "random weights, sha256 not computed"},
    )
    (cache / "manifest.json").write_text(m.to_json())
    os.sync()
    return {"seconds": time.perf_counter() - t, "tiny": False}


def loader_throughput(cache: Path, tiny: bool, log) -> list[dict]:
    import torch
    from safetensors.torch import load_file

    from turboflow.engine import fastload

    dev = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    files = _files(cache)
    total = sum(fastload.read_header(f).data_size for f in files)
    rows = []

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(method, source, fn, nbytes=total):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        s = time.perf_counter() - t
        del out
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        rows.append({"method": method, "source": source, "gb": nbytes / 1e9, "seconds": s, "gbps": nbytes / s / 1e9})
        log(f"  {method:48s} {source:11s} {nbytes / 1e9:6.2f} GB {s:7.3f} s {nbytes / s / 1e9:6.2f} GB/s")

    def st_load():
        return [load_file(f, device=str(dev)) for f in files]

    warm_page_cache(files)
    settings = [(None, fastload.DEFAULT_CHUNK), (8, 64 << 20), (16, 8 << 20)] if not tiny else [(None, 1 << 16)]
    timed("safetensors.torch.load_file(device)", "page cache", st_load)
    for threads, chunk in settings:
        timed(
            f"fastload threads={threads or fastload.default_threads()} chunk={chunk >> 20}MiB",
            "page cache",
            lambda: fastload.load_safetensors(files, dev, threads=threads, chunk_bytes=chunk),
        )
    if dev.type == "cuda":
        # the two halves of the pipeline, to say what bounds it
        timed(
            "fastload to host RAM only (parallel pread)", "page cache", lambda: fastload.load_safetensors(files, "cpu")
        )
        pinned = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
        gpu = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        gpu.copy_(pinned)
        timed(
            "pinned host -> GPU copy, 1 GiB x 4",
            "memory",
            lambda: [gpu.copy_(pinned, non_blocking=True) for _ in range(4)],
            4 << 30,
        )
        del pinned, gpu
    drop_page_cache(files)
    timed("safetensors.torch.load_file(device)", "cold disk", st_load)
    drop_page_cache(files)
    timed(
        f"fastload threads={fastload.default_threads()} chunk={fastload.DEFAULT_CHUNK >> 20}MiB",
        "cold disk",
        lambda: fastload.load_safetensors(files, dev),
    )
    drop_page_cache(files)
    timed(
        "fastload threads=32 chunk=16MiB",
        "cold disk",
        lambda: fastload.load_safetensors(files, dev, threads=32, chunk_bytes=16 << 20),
    )
    return rows


def run_child(argv: list[str], label: str, env: dict, log) -> dict:
    """Start one child (`--child DIR MODE`), wait for its JSON line and turn its wall-clock marks into phases
    counted from the moment the process was launched (interpreter start included)."""
    launched = time.time()
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not line:
        log(f"  {label}: FAILED (exit status {proc.returncode})\n{proc.stderr[-2000:]}")
        # a negative status is a signal (-11: a segfault, which prints nothing unless PYTHONFAULTHANDLER is set)
        return {"label": label, "returncode": proc.returncode, "error": (proc.stderr or proc.stdout)[-2000:]}
    r = json.loads(line[-1])
    r.update(label=label, interpreter_s=r["t_child_start"] - launched, imports_s=r["t_imports"] - launched)
    if "t_ready" in r:
        r["ready_s"] = r["t_ready"] - launched
    log(f"  {label}: " + ", ".join(f"{k} {v:.2f}s" for k, v in r.items() if k.startswith("import_")))
    if "ready_s" in r:
        art = r.get("compile_artifact") or {}
        if r.get("aot_blocks"):
            log(f"  {label}: AOT block calls in the warm-up {r['aot_blocks']}")
        log(
            f"  {label}: imports {r['imports_s']:.2f}s, ready {r['ready_s']:.2f}s after process start "
            f"(read {r.get('read_s', 0):.2f}s at {r.get('gbps', 0):.1f} GB/s, warm-up {r.get('warmup_s', 0):.2f}s"
            + (
                f", artifact {art.get('artifact')} in {art.get('load_s', 0):.2f}s, "
                f"jit compiles {art.get('jit_compiles')}, saved {bool(art.get('saved'))})"
                if art
                else ")"
            )
        )
    return r


def child_env(tiny: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if tiny:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def cold_starts(cache: Path, tiny: bool, log) -> list[dict]:
    runs = []
    plan = [
        ("fastload, warm page cache #1", "fast", False),
        ("fastload, warm page cache #2", "fast", False),
        ("fastload, cold disk", "fast", True),
        ("from_pretrained (previous loader), warm page cache", "library", False),
    ]
    for label, mode, cold in plan:
        if cold:
            drop_page_cache(_files(cache))
        else:
            warm_page_cache(_files(cache))
        argv = [sys.executable, "-m", "bench.coldstart", "--child", str(cache), mode]
        runs.append(run_child(argv, label, child_env(tiny), log))
    return runs


def measure(cache: Path, tiny: bool = False, log=print) -> dict:
    log(f"cold start: model cache at {cache}")
    info = build_cache(cache, tiny, log)
    size = sum(f.stat().st_size for f in _files(cache))
    log(f"  cache {size / 1e9:.2f} GB of safetensors ({info})")
    loader = loader_throughput(cache, tiny, log)
    runs = cold_starts(cache, tiny, log)
    return {
        "loader": loader,
        "coldstart": {
            "cache_gb": size / 1e9,
            "build": info,
            "runs": runs,
            "manifest": "sizes only; sha256 placeholders (not hashed)",
        },
    }


# ---- the child process: one cold start -------------------------------------------------------------------------------
class _NullStore:
    """The function's S3 store is irrelevant to model loading; this keeps storage configuration out of it."""


# Importable in the GPU machine's image but not in the serving image: the serving-only environment
# (bench/serving_env.py) must hide them, and each child reports whether it did.
NOT_SERVED = ("jax", "flax", "peft", "tensorflow", "torchvision", "pytest", "moto")


def child(cache: str, mode: str) -> None:
    """One cold start: imports in the order the costs are attributed (torch; diffusers' Wan model classes, which
    pull in torch._dynamo; transformers' umT5; the function), then `start()` and `ready()` polled (mode `fast`),
    or the previous from_pretrained loader (`library`), or nothing after the imports (`imports`, for -X importtime).
    Mode `lean` imports only torch and the function, as a serving process does (the import diet: load_pipeline
    imports the model classes while the weights stream); its TURBOFLOW_* environment picks compile, FP8 and the
    compile cache (bench/serving_env.py's artifact phases).
    """
    t0 = time.time()
    from . import _ROOT  # noqa: F401

    marks = {}
    import torch  # noqa: F401

    marks["torch"] = time.time()
    if mode != "lean":  # lean: what a serving process imports; diffusers then loads inside start(), beside the read
        import accelerate  # noqa: F401
        from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: F401

        marks["diffusers"] = time.time()
        from transformers import AutoTokenizer, UMT5EncoderModel  # noqa: F401

        marks["transformers"] = time.time()
    from turboflow.engine import loading  # noqa: F401
    from turboflow.functions.slot import SlotState
    from turboflow.functions.video import VideoFunction

    marks["turboflow"] = time.time()
    t_imports = time.time()
    prev, split = t0, {}
    for k, v in marks.items():
        split[f"import_{k}_s"] = v - prev
        prev = v
    out = {"t_child_start": t0, "t_imports": t_imports, **split}
    if mode == "imports":
        out.update(_environment_probe())
        print(json.dumps(out), flush=True)
        return
    if mode in ("fast", "lean"):
        fn = VideoFunction("t2v", store=_NullStore())
        # the function's configuration is the mapping start() gets (func passes the environment): TURBOFLOW_*
        fn.start({**{k: v for k, v in os.environ.items() if k.startswith("TURBOFLOW_")}, "MODEL_DIR": cache})
        while True:
            ok, msg = fn.ready()
            if ok:
                break
            if fn.slot.state is SlotState.FAILED:
                raise SystemExit(f"load failed: {msg}")
            time.sleep(0.002)
        out["t_ready"] = time.time()
        out.update(fn.pipeline.load_report)
    else:  # the pre-fastload path: from_pretrained per component on the CPU, then .to(device)
        from pathlib import Path as P

        import torch

        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        t = time.time()
        from turboflow.engine.families import family
        from turboflow.engine.modelcache import read_manifest

        from .reference_loader import load_component

        spec = family(read_manifest(cache).family)
        parts = {
            r: load_component(spec, r, P(cache) / r, dtype) for r in ("tokenizer", "text_encoder", "vae", "transformer")
        }
        t_read = time.time()
        for r in ("text_encoder", "vae", "transformer"):
            parts[r].to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out["t_ready"] = time.time()
        out.update(read_s=t_read - t, h2d_s=out["t_ready"] - t_read, warmup_s=0.0)
    out.update(_environment_probe())
    print(json.dumps(out), flush=True)


def _environment_probe() -> dict:
    """What this process could import and from where, recorded after the timed part."""
    import importlib.util

    import diffusers
    import torch
    import transformers

    return {
        "importable": {name: importlib.util.find_spec(name) is not None for name in NOT_SERVED},
        "sys_path": list(sys.path),
        "isolated": bool(sys.flags.isolated and sys.flags.no_site),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def cli(argv: list[str]) -> int:
    """`turboflow ARGS` where turboflow is not installed (the serving site: bench maps the repository's packages onto
    the namespace), e.g. the AOT block packages' build in bench/serving_env.py."""
    from turboflow.cli import main  # importable: running bench.coldstart imported bench/__init__.py first

    return main(argv)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 2 and sys.argv[1] == "--cli":
        sys.exit(cli(sys.argv[2:]))
