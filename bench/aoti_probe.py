"""Which AOTInductor package loader call works on this torch/GPU (issue 14 diagnosis; a one-off probe).

    python -m bench.aoti_probe MODE MODEL_DIR CACHE_DIR     MODE: direct | public | no-index | index-minus-1

Builds the tiny model's AOT block packages with `turboflow model compile-artifacts --compile aot --force`, whose
last step loads them back through engine/aot_blocks._package_loader, replaced here per MODE. Run each MODE in its
own process with -X faulthandler: a loader that segfaults says where.
"""

from __future__ import annotations

import sys

import torch

from . import _ROOT  # noqa: F401


def main() -> int:
    mode, model_dir, cache = sys.argv[1:4]
    from turboflow.engine import aot_blocks

    aot_blocks.CUDA_LOADER_VERIFIED = True  # this probe is what would verify it
    loader = torch._C._aoti.AOTIModelPackageLoader
    if mode == "public":
        from torch._inductor import aoti_load_package

        aot_blocks._package_loader = lambda path, index: aoti_load_package(path, device_index=index).loader
    elif mode == "no-index":
        aot_blocks._package_loader = lambda path, index: loader(path, "model", False)
    elif mode == "index-minus-1":
        aot_blocks._package_loader = lambda path, index: loader(path, "model", False, 1, -1)
    from turboflow.cli import main as cli

    args = ["model", "compile-artifacts", "--model-dir", model_dir, "--compile", "aot", "--force"]
    args += ["--compile-cache", cache, "--sizes", "480p:16:9:5"]
    rc = cli(args)
    print(f"PROBE {mode}: rc {rc}", flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
