"""Pipeline configurations the harness can time side by side (`--variants eager,sla,...`).

Each entry: request (extra GenerationRequest fields, e.g. attention="sla", sla_topk=0.1), prepare(pipeline) run
before timing (quantise linears, compile, swap the VAE decode), restore(pipeline) run after, note (shown in the
table), quant (the linear mode a variant needs: the harness then quantises each DiT as soon as it is built, so
both I2V experts fit on the GPU at once, and skips the bf16 baseline for that model; T2V quantises in prepare).

The issue-7 presets are cumulative: run them in the order listed (eager, sla, sla-vae, sla-vae-compile, turbo) and
each row adds one optimisation to the row before it; compiling and quantising cannot be undone inside one process.
"""

from __future__ import annotations

import tempfile

import torch

VARIANTS: dict[str, dict] = {
    "eager": {
        "request": {},
        "note": "TurboVideoPipeline as shipped by diffusers modules: SDPA, bf16, eager, stock VAE decode.",
    },
}


def register(
    name: str, *, request: dict | None = None, prepare=None, restore=None, note: str = "", quant: str | None = None
) -> None:
    VARIANTS[name] = {
        "request": dict(request or {}),
        "prepare": prepare,
        "restore": restore,
        "note": note,
        "quant": quant,
    }


def _nets(pipe):
    return [n for n in (pipe.transformer, pipe.transformer_2) if n is not None]


def fast_vae(pipe, *, compiled: bool = False, variant: str = "auto") -> None:
    """The fast decode as load_pipeline sets it up: channels_last and the decode variant `variant` ("auto": what a
    load with (compiled) picks, engine/vae_decode.py AUTO_VARIANTS)."""
    from turboflow.engine.vae_decode import choose_variant, to_channels_last

    pipe.fast_vae = True  # the pipeline turns cudnn.benchmark on around this decode only
    pipe.vae_variant = choose_variant(variant, device_type=pipe.device.type, compiled=compiled)
    if pipe.device.type == "cuda":
        to_channels_last(pipe.vae)


def compiled(pipe, *, vae: str = "auto") -> None:
    from turboflow.engine.compiled import compile_transformer, use_cache_dir

    fast_vae(pipe, compiled=True, variant=vae)
    if getattr(pipe, "_bench_compiled", False):
        return
    use_cache_dir(__import__("pathlib").Path(tempfile.mkdtemp(prefix="turboflow-compile-")))  # a cold cache
    for net in _nets(pipe):
        compile_transformer(net)
    pipe._bench_compiled = True


def fp8_compiled(pipe, *, vae: str = "auto") -> None:
    from turboflow.engine.linear import quantize_transformer

    for net in _nets(pipe):
        quantize_transformer(net, "fp8")  # a no-op when the harness already quantised at build
    if pipe.device.type == "cuda":
        torch.cuda.empty_cache()
    compiled(pipe, vae=vae)


SLA = {"attention": "sla", "sla_topk": 0.1}
register("sla", request=SLA, note="+ SLA sparse-linear attention, top-k 0.1 (FlexAttention on CUDA).")
register(
    "sla-vae",
    request=SLA,
    prepare=fast_vae,
    note="+ fast chunked VAE decode (channels_last, bf16, the variant a load without compile picks).",
)
register(
    "sla-vae-compile",
    request=SLA,
    prepare=compiled,
    note="+ DiT blocks torch.compile'd (regional, static shapes; the warm-up run pays the compile).",
)
register(
    "turbo",
    request=SLA,
    prepare=fp8_compiled,
    quant="fp8",
    note="+ FP8 W8A8 linears in the DiT blocks: everything on (SLA 0.1, fast VAE, compiled, FP8).",
)
register(
    "turbo-vae-base",
    request=SLA,
    prepare=lambda pipe: fp8_compiled(pipe, vae="base"),
    quant="fp8",
    note="turbo with the base fast decode (before the decode variants: run it before `turbo` for a before/after).",
)
