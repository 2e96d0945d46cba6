"""Build a pipeline from a model cache directory (storage.modelcache layout). Never touches a hub."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from turboflow.storage import modelcache

from .errors import CheckpointError, ModelCacheError
from .pipeline import TurboVideoPipeline

log = logging.getLogger(__name__)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: every load below is local


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_loading_info(role: str, info: dict) -> None:
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        detail = "; ".join(f"{k}: {sorted(map(str, v))[:5]}{' ...' if len(v) > 5 else ''}"
                           for k, v in problems.items())
        raise CheckpointError(f"{role} weights do not match its config ({detail})")


def _key_differences(model, path: Path) -> dict:
    """diffusers only warns about key mismatches; compare the files' keys with the model's ourselves."""
    from safetensors import safe_open

    stored: set[str] = set()
    for f in path.glob("*.safetensors"):
        with safe_open(f, framework="pt") as fh:
            stored.update(fh.keys())
    expected = set(model.state_dict())
    return {"missing_keys": expected - stored, "unexpected_keys": stored - expected}


def _load_component(role: str, path: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    if not path.is_dir():
        raise ModelCacheError(f"component {role!r} missing: {path}", code="model_cache_incomplete")
    try:
        if role == "tokenizer":
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        if role == "text_encoder":
            model, info = UMT5EncoderModel.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                           output_loading_info=True)
        else:
            cls = AutoencoderKLWan if role == "vae" else WanTransformer3DModel
            model = cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
            info = _key_differences(model, path)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelCacheError(f"cannot load {role} from {path}: {e}", code="model_cache_invalid") from e
    _check_loading_info(role, info)
    return model


def load_pipeline(model_dir: str | os.PathLike, *, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, vae_dtype: torch.dtype | None = None,
                  verify_checksums: bool = False, offload: str = "auto") -> TurboVideoPipeline:
    """Load every component named in the manifest onto `device` (default: CUDA if present).

    dtype defaults to bfloat16 on CUDA and float32 on CPU. offload="auto" keeps both I2V experts resident when
    the device has room for them (weights plus headroom), else swaps them per step like upstream.
    """
    root = Path(model_dir)
    manifest = modelcache.verify(root, checksums=verify_checksums)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    start = time.perf_counter()
    parts = {role: _load_component(role, root / sub, dtype) for role, sub in manifest.components.items()}
    required = {"tokenizer", "text_encoder", "vae", "transformer"} | ({"transformer_2"} if manifest.kind == "i2v"
                                                                       else set())
    missing = required - parts.keys()
    if missing:
        raise ModelCacheError(f"manifest of {root} lacks components {sorted(missing)}", code="model_cache_invalid")
    if vae_dtype is not None:
        parts["vae"].to(vae_dtype)
    policy = _offload_policy(offload, manifest.kind, parts, device)
    for role in ("text_encoder", "vae", "transformer"):
        parts[role].to(device)
    if "transformer_2" in parts and policy == "none":
        parts["transformer_2"].to(device)
    log.info("loaded %s (%s) on %s in %.2fs, offload=%s", manifest.name, manifest.kind, device,
             time.perf_counter() - start, policy)
    return TurboVideoPipeline(kind=manifest.kind, transformer=parts["transformer"],
                              transformer_2=parts.get("transformer_2"), vae=parts["vae"],
                              text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], device=device,
                              dtype=dtype, vae_dtype=vae_dtype, model_name=manifest.name,
                              defaults=manifest.defaults, offload=policy)


def _offload_policy(offload: str, kind: str, parts: dict, device: torch.device) -> str:
    if offload in ("none", "experts"):
        return offload
    if offload != "auto":
        raise ValueError(f"offload must be auto, none or experts, got {offload!r}")
    if kind != "i2v" or device.type != "cuda":
        return "none"
    weights = sum(p.numel() * p.element_size() for m in parts.values() if hasattr(m, "parameters")
                  for p in m.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    headroom = 30 << 30  # 720p activations of a 14B expert measured at ~25 GB
    return "none" if weights + headroom <= free else "experts"
