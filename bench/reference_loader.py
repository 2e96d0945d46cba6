"""The library way to load a model-cache component: `from_pretrained` on the CPU, then `.to(device)` by the caller.

What engine/fastload.py replaced. Kept for comparison only: bench/coldstart.py times it against fastload and
tests/test_bench_fastload.py proves fastload builds the same modules.
"""

from __future__ import annotations

from pathlib import Path

import torch

from turboflow.engine.families import FamilySpec
from turboflow.engine.loading import load_tokenizer
from turboflow.errors import CheckpointError, ModelCacheError


def _key_differences(model, path: Path) -> dict:
    """diffusers only warns about key mismatches; compare the files' keys with the model's ourselves."""
    from safetensors import safe_open

    stored: set[str] = set()
    for f in path.glob("*.safetensors"):
        with safe_open(f, framework="pt") as fh:
            stored.update(fh.keys())
    expected = set(model.state_dict())
    return {"missing_keys": expected - stored, "unexpected_keys": stored - expected}


def _check_loading_info(role: str, info: dict) -> None:
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        detail = "; ".join(f"{k}: {sorted(map(str, v))[:5]}{' ...' if len(v) > 5 else ''}" for k, v in problems.items())
        raise CheckpointError(f"{role} weights do not match its config ({detail})")


def load_component(spec: FamilySpec, role: str, path: Path, dtype: torch.dtype):
    """One component of a `spec` family model cache, built by its library's from_pretrained on the CPU."""
    from diffusers import ModelMixin

    if role == "tokenizer":
        return load_tokenizer(path, spec)
    if not path.is_dir():
        raise ModelCacheError(f"component {role!r} missing: {path}", code="model_cache_incomplete")
    cls = spec.components[role].load_class()
    try:
        if issubclass(cls, ModelMixin):
            model = cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
            info = _key_differences(model, path)
        else:
            model, info = cls.from_pretrained(path, dtype=dtype, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise ModelCacheError(f"cannot load {role} from {path}: {e}", code="model_cache_invalid") from e
    _check_loading_info(role, info)
    return model
