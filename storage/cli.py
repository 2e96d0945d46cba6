"""`turboflow model-cache warm DIR...`: read a model cache into the node's page cache so cold starts load from memory.

A scale-to-zero pod's cold start is dominated by reading weights: ~5 GB/s from the page cache versus ~1.5 GB/s (or
far less on network storage) from disk. The optional warm DaemonSet (infra/model-cache/warm/) runs this on every
GPU node: it reads every file listed in each cache's manifest.json with large sequential reads into one reused
buffer (nothing is kept in the process) and reports the throughput; the kernel keeps the pages. Files are read in
manifest order and checked against the manifest sizes, so a cache the pull Job has not finished is reported as
incomplete rather than half-warmed silently.

Note for Kubernetes: page cache is charged to the memory cgroup of the pod that first reads it, so the warming pod
must not have a small memory limit (the kernel would evict its own pages as it goes); see the DaemonSet.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from turboflow.engine import modelcache
from turboflow.errors import ModelCacheError, TurboflowError

log = logging.getLogger(__name__)


@dataclass
class WarmReport:
    model_dir: str
    name: str
    files: int
    bytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    def line(self) -> str:
        return (
            f"warm: {self.name} ({self.model_dir}): {self.files} files, {self.bytes / 1e9:.2f} GB in "
            f"{self.seconds:.2f} s ({self.gb_per_s:.2f} GB/s)"
        )


def warm(model_dir: str | os.PathLike, *, block_bytes: int = 16 << 20) -> WarmReport:
    """Read every file in `model_dir`'s manifest once, sequentially. Raises ModelCacheError if the cache is
    incomplete (no manifest, a file missing or of the wrong size)."""
    if block_bytes < 4096:
        raise ModelCacheError(f"block size {block_bytes} is too small (minimum 4096 bytes)")
    root = Path(model_dir)
    manifest = modelcache.verify(root)  # presence and sizes (no hashing): cheap
    buf = bytearray(block_bytes)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for entry in manifest.files:
        path = root / entry.path
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            got = 0
            while True:
                n = os.readv(fd, [view])
                if n == 0:
                    break
                got += n
        finally:
            os.close(fd)
        if got != entry.size:
            raise ModelCacheError(
                f"read {got} bytes of {entry.path}, manifest says {entry.size}", code="model_cache_incomplete"
            )
        total += got
    return WarmReport(str(root), manifest.name, len(manifest.files), total, time.perf_counter() - start)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")  # fullmatch: no trailing newline


def parse_duration(text: str) -> float:
    """`90`, `90s`, `30m`, `6h`, `250ms` -> seconds."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 90, 30m, 6h)")
    return float(m.group(1)) * {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model-cache", help="model cache utilities for the cluster (page-cache warming)")
    msub = p.add_subparsers(dest="model_cache_command", metavar="ACTION")
    msub.required = True
    w = msub.add_parser("warm", help="read model caches into the page cache and report GB/s")
    w.add_argument("dirs", nargs="+", metavar="DIR", help="model cache directories (each with manifest.json)")
    w.add_argument("--block-mb", type=int, default=16, help="read size in MiB (default 16)")
    w.add_argument(
        "--every",
        type=parse_duration,
        default=0.0,
        help="repeat after this long (e.g. 6h) so evicted pages come back; default: once",
    )
    w.add_argument("--rounds", type=int, default=0, help="with --every: stop after this many rounds (0: never)")
    w.set_defaults(func=_warm)


def _warm(args) -> int:
    block = args.block_mb << 20
    rounds = 0
    while True:
        rounds += 1
        failures = 0
        for d in args.dirs:
            try:
                print(warm(d, block_bytes=block).line(), flush=True)
            except TurboflowError as e:
                if not args.every:
                    raise
                failures += 1  # the pull Job may still be running: report, try again next round
                print(f"warm: {d}: not warmed: error[{e.code}]: {e.message}", flush=True)
        if not args.every or (args.rounds and rounds >= args.rounds):
            return 0
        # an incomplete cache is retried soon; a warmed one after the full period
        time.sleep(min(args.every, 60.0) if failures else args.every)


__all__ = ["warm", "WarmReport", "register", "parse_duration"]
