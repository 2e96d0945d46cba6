"""torch.compile for the DiT (`load_pipeline(..., compile=True | "<mode>")`) with a persistent compile cache.

Regional compilation: each WanTransformerBlock is compiled (diffusers' `compile_repeated_blocks`); the 30/40 blocks
share one graph, so a cold compile costs one block's worth, not the whole model's. SLA's processor runs inside the
compiled block (FlexAttention traced by dynamo, fused with the block selection and the linear branch).

Inductor's and Triton's caches go to `compile_cache_dir(...)` so a second process (a new pod with the same cache
volume) reuses the compiled kernels instead of paying the compile again. The model cache volume is mounted read-only
in deployment, so the default is a writable sibling: TURBOFLOW_COMPILE_CACHE, else `<model_dir>/.compile-cache`
when writable, else ~/.cache/turboflow/compile/<model name>. (The override is LoadOptions.compile_cache_dir, from
TURBOFLOW_COMPILE_CACHE in a function: the engine reads no environment variable.)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
DEFAULT_MODE = "default"  # "max-autotune-no-cudagraphs" tunes GEMMs too: minutes more on a cold start


def compile_cache_dir(model_dir: str | os.PathLike, override: str | os.PathLike | None = None) -> Path:
    if override:
        return Path(override)
    model_dir = Path(model_dir)
    if os.access(model_dir, os.W_OK):
        return model_dir / ".compile-cache"
    return Path.home() / ".cache" / "turboflow" / "compile" / model_dir.name


def point_kernel_caches(path: Path) -> None:
    """Point Inductor's and Triton's on-disk caches at `path`. The one place the engine writes the process
    environment: torch and Triton read these variables when they compile, so kernels a pod compiles on its first
    use (SLA's Triton kernels, the FP8 quantizer, even with the DiT uncompiled) are found there by the next pod
    when `path` persists. Imports nothing (a pod with compile off does not import Inductor for it)."""
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(path / "triton")


def use_cache_dir(path: Path) -> None:
    """point_kernel_caches, and Inductor's persistent caches turned on (called by load_pipeline when it compiles,
    never at import)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    point_kernel_caches(path)
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True


def compile_transformer(transformer, mode: str | None = None, *, backend: str = "inductor") -> None:
    """Compile each repeated block of a WanTransformer3DModel in place (static shapes: one graph per video size)."""
    import torch

    mode = mode or DEFAULT_MODE
    kwargs = {"dynamic": False, "backend": backend}
    if backend == "inductor":
        kwargs["mode"] = mode
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(**kwargs)
    else:
        for block in transformer.blocks:
            block.compile(**kwargs)
    # 30-40 identical blocks reuse one graph; each new video size adds one more
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    log.info("DiT blocks compiled lazily (mode=%s, backend=%s)", mode, backend)
