"""Does reporting progress slow the DiT down? (issue 12: at most 1 % per step)

    python -m bench.progress_overhead --out OUT [--model 1.3b-480p] [--variant turbo] [--rounds 8]
    python -m bench.progress_overhead --tiny --out OUT          # CPU smoke test (tests/test_bench_harness.py)

One process, one pipeline (full-size architecture, random weights, the variant's options: `turbo` = SLA 0.1, FP8
linears, compiled blocks, fast VAE), wired like a function: the event loop on the main thread serves a local HTTP
sink (the broker ingress stand-in), the generation runs on a worker thread (functions/slot.py's device worker).
Rounds alternate OFF (no stage_progress callback) and ON (functions/lifecycle.py's ProgressReporter feeding a
LifecycleEmitter that signs and POSTs `progress` events to the sink, exactly as a function does), so drift in GPU
clocks hits both alike. The DiT step time is the pipeline's own diffusion stage clock / steps (synchronised at the
stage boundaries only, so the callback's cost on the worker thread is inside it).

    overhead = median(ON step) / median(OFF step) - 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from . import _ROOT  # noqa: F401  (sets up the turboflow namespace on a bare tree)
from .models import SPECS, build_text_encoder, build_tokenizer, build_transformer, build_vae, tiny_specs
from .variants import VARIANTS

PROMPT = "a red fox running through fresh snow in a pine forest at sunrise, cinematic slow motion, wide shot"


def log(*parts) -> None:
    print(f"[progress-overhead {time.strftime('%H:%M:%S')}]", *parts, flush=True)


async def start_sink(host: str = "127.0.0.1") -> tuple[asyncio.AbstractServer, str, list]:
    """A minimal HTTP server answering 202 to every POST (the broker ingress stand-in); counts the requests."""
    received: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                received.append(length)
                writer.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://{host}:{port}/", received


def build_pipeline(spec, device, dtype, workdir: Path):
    from turboflow.engine.pipeline import TurboVideoPipeline

    return TurboVideoPipeline(
        kind=spec.kind,
        transformer=build_transformer(spec.transformer, device, dtype),
        transformer_2=None,
        vae=build_vae(spec.vae, device, dtype),
        text_encoder=build_text_encoder(spec.text, device, dtype),
        tokenizer=build_tokenizer(workdir / "tokenizer"),
        device=device,
        dtype=dtype,
        model_name=spec.name,
    )


async def measure(pipe, spec, variant: dict, rounds: int) -> dict:
    from turboflow.engine.request import GenerationRequest
    from turboflow.functions.lifecycle import LifecycleEmitter, stage_units

    loop = asyncio.get_running_loop()
    server, sink_url, received = await start_sink()
    emitter = LifecycleEmitter(
        sink_url, source="/turboflow/functions/t2v", signing_key=b"bench-signing-key-0123", kind="t2v", pod="bench"
    )
    await emitter.start()
    fields = dict(
        prompt=PROMPT,
        kind=spec.kind,
        resolution=spec.resolution,
        aspect_ratio=spec.aspect_ratio,
        num_frames=spec.frames,
        num_steps=spec.steps,
        seed=1,
        **variant.get("request", {}),
    )
    request = GenerationRequest(**fields).validated(pipe.family)
    ctx = {"request_id": "bench", "tenant": "bench", "kind": spec.kind, "request_source": "/bench"}
    units = stage_units(spec.steps, spec.frames, image=False)

    def run(with_progress: bool):
        reporter = emitter.reporter(ctx, units, loop) if with_progress else None
        result = pipe(request, stage_progress=reporter)
        return result.timings, reporter

    log("warm-up (compiles when the variant compiles)")
    await loop.run_in_executor(None, run, False)
    await loop.run_in_executor(None, run, True)
    steps: dict[str, list[float]] = {"off": [], "on": []}
    reports = emitted = 0
    for index in range(2 * rounds):
        mode = "on" if index % 2 else "off"
        timings, reporter = await loop.run_in_executor(None, run, mode == "on")
        steps[mode].append(timings["diffusion"] / spec.steps)
        if reporter is not None:
            reporter.close()
            reports, emitted = reports + reporter.reports, emitted + reporter.emitted
        log(f"round {index // 2 + 1} {mode}: {steps[mode][-1] * 1000:.2f} ms/step")
    await emitter.stop(drain_seconds=5)
    server.close()
    await server.wait_closed()
    off, on = statistics.median(steps["off"]), statistics.median(steps["on"])
    return {
        "step_ms_off": [s * 1000 for s in steps["off"]],
        "step_ms_on": [s * 1000 for s in steps["on"]],
        "median_step_ms_off": off * 1000,
        "median_step_ms_on": on * 1000,
        "overhead_percent": (on / off - 1) * 100,
        "progress_reports": reports,
        "progress_events_emitted": emitted,
        "events_received_by_sink": len(received),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.progress_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="1.3b-480p")
    parser.add_argument("--variant", default="turbo")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny model (a smoke test of the harness)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    spec = (tiny_specs() if args.tiny else SPECS)[args.model if not args.tiny else next(iter(tiny_specs()))]
    variant = VARIANTS["eager"] if args.tiny else VARIANTS[args.variant]
    with tempfile.TemporaryDirectory() as tmp:
        log(f"building {spec.name} ({args.variant}) on {device}")
        pipe = build_pipeline(spec, device, dtype, Path(tmp))
        if variant.get("prepare"):
            variant["prepare"](pipe)
        result = asyncio.run(measure(pipe, spec, variant, args.rounds))
    result.update(
        model=spec.name,
        variant="eager" if args.tiny else args.variant,
        frames=spec.frames,
        steps=spec.steps,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
    )
    (out / "progress-overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    log(
        f"DiT step off {result['median_step_ms_off']:.2f} ms, on {result['median_step_ms_on']:.2f} ms: "
        f"{result['overhead_percent']:+.2f} % ({result['progress_events_emitted']} events sent, "
        f"{result['events_received_by_sink']} received)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
