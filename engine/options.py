"""`load_pipeline` options from TURBOFLOW_* settings, so a Knative service (env) and the CLI (flags) configure the
same performance switches. Bad values raise ConfigError naming the variable: a pod fails to become ready with that
message instead of running with a silently ignored setting.

    TURBOFLOW_QUANT_LINEAR    none | fp8 | int8 | int8_weight_only   DiT linears (default none: weights as shipped)
    TURBOFLOW_COMPILE         0 | 1 | an inductor mode                torch.compile the DiT blocks (default 0)
    TURBOFLOW_COMPILE_CACHE   directory                               persistent Inductor/Triton cache
    TURBOFLOW_COMPILE_WARMUP  sizes, e.g. "480p:16:9:81,720p:16:9:81" compiled before ready (default: the model's
                                                                      resolution, 16:9, 81 frames)
    TURBOFLOW_FAST_VAE        1 | 0                                   chunked VAE decode (default 1)
    TURBOFLOW_VAE_CHUNK       latent frames per decoder call          (default by frame size)
    TURBOFLOW_OFFLOAD         auto | none | experts                   I2V expert placement (default auto)
"""

from __future__ import annotations

from collections.abc import Mapping

from turboflow.errors import ConfigError

from .request import MAX_FRAMES, QUANT_LINEAR_MODES, RESOLUTIONS

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OFFLOAD_POLICIES = ("auto", "none", "experts")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r}: expected 1 or 0", field=name)


def parse_sizes(raw: str, name: str = "TURBOFLOW_COMPILE_WARMUP") -> list[tuple[str, str, int]]:
    """'480p:16:9:81,720p:9:16:49' -> [(resolution, aspect_ratio, frames), ...]."""
    sizes = []
    for item in (x.strip() for x in raw.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if (
            len(parts) != 4
            or parts[0] not in RESOLUTIONS
            or f"{parts[1]}:{parts[2]}" not in RESOLUTIONS[parts[0]]
            or not parts[3].isdigit()
            or (int(parts[3]) - 1) % 4
            or not 1 <= int(parts[3]) <= MAX_FRAMES
        ):
            raise ConfigError(
                f"{name}: {item!r} is not RESOLUTION:W:H:FRAMES with a known resolution and aspect "
                f"ratio and 4k+1 frames up to {MAX_FRAMES} (e.g. 480p:16:9:81)",
                field=name,
            )
        sizes.append((parts[0], f"{parts[1]}:{parts[2]}", int(parts[3])))
    return sizes


def load_options(env: Mapping[str, str]) -> dict:
    """Keyword arguments for `load_pipeline` from the TURBOFLOW_* settings in `env`."""
    opts: dict = {}
    quant = (env.get("TURBOFLOW_QUANT_LINEAR") or "").strip().lower()
    if quant not in ("", "none", "off"):
        if quant not in QUANT_LINEAR_MODES:
            raise ConfigError(
                f"TURBOFLOW_QUANT_LINEAR={quant!r}: expected none or one of {list(QUANT_LINEAR_MODES)}",
                field="TURBOFLOW_QUANT_LINEAR",
            )
        opts["quant_linear"] = quant
    compile_raw = (env.get("TURBOFLOW_COMPILE") or "").strip()
    if compile_raw.lower() in _TRUE:
        opts["compile"] = True
    elif compile_raw in COMPILE_MODES:
        opts["compile"] = compile_raw
    elif compile_raw.lower() not in _FALSE:
        raise ConfigError(
            f"TURBOFLOW_COMPILE={compile_raw!r}: expected 0, 1 or one of {list(COMPILE_MODES)}",
            field="TURBOFLOW_COMPILE",
        )
    if env.get("TURBOFLOW_COMPILE_CACHE"):
        opts["compile_cache_dir"] = env["TURBOFLOW_COMPILE_CACHE"]
    if env.get("TURBOFLOW_COMPILE_WARMUP"):
        opts["compile_warmup"] = parse_sizes(env["TURBOFLOW_COMPILE_WARMUP"])
        if "compile" not in opts:
            raise ConfigError(
                "TURBOFLOW_COMPILE_WARMUP is set but TURBOFLOW_COMPILE is off: nothing would be "
                "compiled (set TURBOFLOW_COMPILE=1 or drop the warm-up sizes)",
                field="TURBOFLOW_COMPILE_WARMUP",
            )
    opts["fast_vae"] = _flag(env, "TURBOFLOW_FAST_VAE", True)
    chunk = (env.get("TURBOFLOW_VAE_CHUNK") or "").strip()
    if chunk:
        if not chunk.isdigit() or int(chunk) < 1:
            raise ConfigError(
                f"TURBOFLOW_VAE_CHUNK={chunk!r}: expected a positive integer", field="TURBOFLOW_VAE_CHUNK"
            )
        opts["vae_chunk"] = int(chunk)
    offload = (env.get("TURBOFLOW_OFFLOAD") or "auto").strip().lower()
    if offload not in OFFLOAD_POLICIES:
        raise ConfigError(
            f"TURBOFLOW_OFFLOAD={offload!r}: expected one of {list(OFFLOAD_POLICIES)}", field="TURBOFLOW_OFFLOAD"
        )
    opts["offload"] = offload
    return opts
