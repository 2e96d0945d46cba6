"""`LoadOptions`: how `load_pipeline` loads and speeds up a model, one typed, checked, frozen object.

The functions build it from the process's `Settings` (`LoadOptions.from_settings`: the TURBOFLOW_* variables of
turboflow/settings.py), the CLI from its flags (`LoadOptions(...)`): the same switches either way. The engine reads
no environment variable; a bad value is a ConfigError naming the variable or option.

    quant_linear       None | fp8 | int8 | int8_weight_only   DiT linears (None: weights as shipped)
    compile            False | True | an inductor mode | aot   torch.compile the DiT blocks; aot: AOTInductor
                                                                packages built ahead (engine/aot_blocks.py)
    compile_cache_dir  directory                                persistent Inductor/Triton cache (engine/compiled.py)
    compile_warmup     ((resolution, aspect, frames), ...)      compiled before ready (None: the model's resolution,
                                                                16:9, 81 frames; (): none)
    compile_require_artifacts  bool                             no compile at start: without a matching compile
                                                                artifact (engine/compile_artifacts.py) run eager
    compile_save_artifacts     bool                             save the artifact after a start that compiled
    compile_backend    inductor | aot_eager                     torch.compile backend (aot_eager: CPU tests)
    fast_vae           bool                                     chunked VAE decode (default on)
    vae_chunk          latent frames per decoder call           (None: by frame size)
    vae_decode         auto | base | DecodeVariant tokens       how the fast decode runs (engine/vae_decode.py)
    prompt_cache       text embeddings kept, by prompt          (0: encode every request's prompt)
    offload            auto | none | experts                    I2V expert placement
    sla_pooling        input | fp32                             SLA block selection precision (engine/sla.py)
    sla_backend        auto | triton | flex | gather            SLA's sparse-branch kernels (engine/sla.py)
    load_threads       threads reading safetensors              (None: CPU count, 2..16)
    warmup             bool                                     one tiny generation on CUDA before returning
    gpus               devices one pipeline spans (1..8)        > 1: engine/parallel.py ParallelPipeline, one
                                                                worker process per extra device
    collective_timeout_s  seconds                               the longest any collective (or a worker's answer)
                                                                may take before the pipeline counts it lost
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from turboflow.errors import ConfigError
from turboflow.settings import (
    AOT_COMPILE,
    COMPILE_MODES,
    OFFLOAD_POLICIES,
    QUANT_LINEAR_MODES,
    SLA_BACKENDS,
    Settings,
)

from .request import MAX_FRAMES, RESOLUTIONS

__all__ = ["AOT_COMPILE", "COMPILE_MODES", "OFFLOAD_POLICIES", "LoadOptions", "check_sizes"]

WarmupSizes = tuple[tuple[str, str, int], ...]
MAX_GPUS = 8  # one host's GPUs (TURBOFLOW_GPUS allows the same range)
COMPILE_BACKENDS = ("inductor", "aot_eager")  # aot_eager: dynamo + AOTAutograd without a compiler (CPU tests)


@dataclass(frozen=True)
class LoadOptions:
    quant_linear: str | None = None
    compile: bool | str = False
    compile_cache_dir: str | None = None
    compile_warmup: WarmupSizes | None = None
    compile_require_artifacts: bool = False
    compile_save_artifacts: bool = True
    compile_backend: str = "inductor"
    fast_vae: bool = True
    vae_chunk: int | None = None
    vae_decode: str = "auto"
    prompt_cache: int = 32
    offload: str = "auto"
    sla_pooling: str = "input"
    sla_backend: str = "auto"
    load_threads: int | None = None
    warmup: bool = True
    gpus: int = 1
    collective_timeout_s: float = 300.0

    def __post_init__(self):
        from .sla import POOLING_MODES

        if self.quant_linear is not None and self.quant_linear not in QUANT_LINEAR_MODES:
            raise ConfigError(
                f"quant_linear must be None or one of {list(QUANT_LINEAR_MODES)}, got {self.quant_linear!r}",
                field="quant_linear",
            )
        if isinstance(self.compile, str) and self.compile not in (*COMPILE_MODES, AOT_COMPILE):
            raise ConfigError(
                f"compile mode must be one of {[*COMPILE_MODES, AOT_COMPILE]}, got {self.compile!r}", field="compile"
            )
        if self.compile == AOT_COMPILE and self.gpus > 1:
            raise ConfigError(
                "compile 'aot' packages one GPU's blocks; with gpus > 1 the sequence is sharded across devices and no "
                "package would match: use compile=True (torch.compile) with several GPUs",
                field="compile",
            )
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ConfigError(
                f"compile_backend must be one of {list(COMPILE_BACKENDS)}, got {self.compile_backend!r}",
                field="compile_backend",
            )
        if self.offload not in OFFLOAD_POLICIES:
            raise ConfigError(f"offload must be one of {list(OFFLOAD_POLICIES)}, got {self.offload!r}", field="offload")
        if self.sla_pooling not in POOLING_MODES:
            raise ConfigError(
                f"sla_pooling must be one of {list(POOLING_MODES)}, got {self.sla_pooling!r}", field="sla_pooling"
            )
        if self.sla_backend not in SLA_BACKENDS:
            raise ConfigError(
                f"sla_backend must be one of {list(SLA_BACKENDS)}, got {self.sla_backend!r}", field="sla_backend"
            )
        if self.vae_chunk is not None and (not isinstance(self.vae_chunk, int) or self.vae_chunk < 1):
            raise ConfigError(
                f"vae_chunk must be a positive number of latent frames, got {self.vae_chunk!r}", field="vae_chunk"
            )
        if self.vae_decode != "auto":
            from .vae_decode import DecodeVariant

            DecodeVariant.parse(self.vae_decode)  # ConfigError(field="vae_variant") naming the bad token
        if isinstance(self.prompt_cache, bool) or not isinstance(self.prompt_cache, int) or self.prompt_cache < 0:
            raise ConfigError(
                f"prompt_cache must be a whole number of prompts, got {self.prompt_cache!r}", field="prompt_cache"
            )
        if self.load_threads is not None and (not isinstance(self.load_threads, int) or self.load_threads < 1):
            raise ConfigError(
                f"load_threads must be a positive integer, got {self.load_threads!r}", field="load_threads"
            )
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or not 1 <= self.gpus <= MAX_GPUS:
            raise ConfigError(f"gpus must be an integer from 1 to {MAX_GPUS}, got {self.gpus!r}", field="gpus")
        if not isinstance(self.collective_timeout_s, (int, float)) or not self.collective_timeout_s > 0:
            raise ConfigError(
                f"collective_timeout_s must be a positive number of seconds, got {self.collective_timeout_s!r}",
                field="collective_timeout_s",
            )
        if self.compile_warmup is not None:
            object.__setattr__(self, "compile_warmup", check_sizes(self.compile_warmup, "compile_warmup"))

    @classmethod
    def from_settings(cls, settings: Settings) -> LoadOptions:
        """The load options of a function process (TURBOFLOW_QUANT_LINEAR, _COMPILE, ... in turboflow/settings.py)."""
        sizes = settings.compile_warmup
        return cls(
            quant_linear=settings.quant_linear,
            compile=settings.compile,
            compile_cache_dir=settings.compile_cache,
            compile_warmup=None if sizes is None else check_sizes(sizes, "TURBOFLOW_COMPILE_WARMUP"),
            fast_vae=settings.fast_vae,
            vae_chunk=settings.vae_chunk,
            vae_decode=settings.vae_decode,
            prompt_cache=settings.prompt_cache,
            sla_backend=settings.sla_backend,
            offload=settings.offload,
            load_threads=settings.load_threads,
            warmup=settings.warmup,
            compile_require_artifacts=settings.compile_require_artifacts,
            compile_save_artifacts=settings.compile_save_artifacts,
            gpus=settings.gpus,
            collective_timeout_s=settings.collective_timeout_seconds,
        )

    def replace(self, **changes) -> LoadOptions:
        return dataclasses.replace(self, **changes)


def check_sizes(sizes, name: str) -> WarmupSizes:
    """Warm-up sizes as a tuple of (resolution, aspect_ratio, frames), each a size this engine can generate
    (a known resolution and aspect ratio, 4k+1 frames up to MAX_FRAMES); ConfigError naming `name` otherwise."""
    checked = []
    for size in sizes:
        resolution, aspect, frames = size
        if (
            resolution not in RESOLUTIONS
            or aspect not in RESOLUTIONS[resolution]
            or not isinstance(frames, int)
            or (frames - 1) % 4
            or not 1 <= frames <= MAX_FRAMES
        ):
            raise ConfigError(
                f"{name}: {resolution}:{aspect}:{frames} is not a known resolution and aspect ratio with 4k+1 frames "
                f"up to {MAX_FRAMES} (e.g. 480p:16:9:81)",
                field=name,
            )
        checked.append((resolution, aspect, frames))
    return tuple(checked)
