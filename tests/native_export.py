"""Test helper: write a model cache back as TurboDiffusion / Wan-native `.pth` files, the importer's real inputs.

The inverse of `turboflow model import` for the Wan families (engine/checkpoint.py's reverse key maps); only the
tests need it, so it lives here rather than in the engine.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from turboflow.engine import checkpoint as ck
from turboflow.engine import modelcache
from turboflow.engine.quant import quantize_state_dict


def export_native(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    net_prefix: bool = True,
    quantize: bool = False,
    proj_l: dict | None = None,
) -> dict[str, Path]:
    """Write a cache's components back as TurboDiffusion/Wan-native .pth files (the inverse of import).

    DiTs get TurboDiffusion's layout (Linear patch embedding, `net.` prefix unless disabled, proj_l from
    `transformer/sla/` or `proj_l`, int8 + scales when `quantize`). Builds realistic importer inputs from the
    tiny models.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    root, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = modelcache.read_manifest(root)
    written: dict[str, Path] = {}
    for role, sub in manifest.components.items():
        src = root / sub
        if role.startswith("transformer"):
            sd = WanTransformer3DModel.from_pretrained(src, local_files_only=True).state_dict()
            wan = ck.diffusers_dit_to_wan(sd, proj_l=proj_l if proj_l is not None else ck.load_sla_proj_l(src))
            if quantize:
                wan = quantize_state_dict(wan)
            path = out / f"{manifest.name}-{role}{'-quant' if quantize else ''}.pth"
            torch.save({(ck.NET_PREFIX if net_prefix else "") + k: v for k, v in wan.items()}, path)
        elif role == "vae":
            model = AutoencoderKLWan.from_pretrained(src, local_files_only=True)
            path = out / "Wan2.1_VAE.pth"
            torch.save(ck.diffusers_vae_to_wan(model.state_dict(), dict(model.config)), path)
        elif role == "text_encoder":
            model = UMT5EncoderModel.from_pretrained(src, local_files_only=True)
            path = out / "models_t5_umt5-xxl-enc.pth"
            torch.save(ck.transformers_t5_to_wan(model.state_dict()), path)
        else:
            path = out / sub
            shutil.copytree(src, path, dirs_exist_ok=True)
        written[role] = path
    return written
