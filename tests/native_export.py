"""Test helper: write a model cache back as TurboDiffusion / Wan-native `.pth` files, the importer's real inputs.

The inverse of `turboflow model import` for the Wan families: the reverse key maps (diffusers / transformers ->
Wan-native) and the `-quant` quantizer. Only the tests need them, so they live here rather than in the engine; the
forward maps they invert are engine/checkpoint.py's and engine/families/wan.py's.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from turboflow.engine import checkpoint as ck
from turboflow.engine import modelcache
from turboflow.engine.families.wan import DIT_KEYS, T5_KEYS
from turboflow.engine.quant import INT8_SUFFIX, SCALE_SUFFIX, quantize_blockwise

SKIP_LAYER = "proj_l"  # SLA's linear-attention projection stays fp32 upstream


def diffusers_dit_to_wan(
    sd: dict[str, torch.Tensor],
    *,
    proj_l: dict[str, torch.Tensor] | None = None,
    linear_patch_embedding: bool = True,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """Inverse of `ck.wan_dit_to_diffusers` (TurboDiffusion layout by default)."""
    out = ck._rename(sd, DIT_KEYS.inverse, "diffusers DiT state dict")
    if linear_patch_embedding:
        pe = out["patch_embedding.weight"]
        out["patch_embedding.weight"] = pe.reshape(pe.shape[0], -1)
    for k, v in (proj_l or {}).items():
        i, leaf = int(k.split(".")[1]), k.rsplit(".", 1)[1]
        out[f"blocks.{i}.self_attn.attn_op.local_attn.proj_l.{leaf}"] = v
    return {prefix + k: v for k, v in out.items()}


_RES_INV = {v: k for k, v in ck._RES.items()}
_VAE_FIXED_INV = {v: k for k, v in ck._VAE_FIXED.items()}


def _vae_key_to_wan(key: str, num_res_blocks: int) -> str | None:
    """Inverse of `ck._vae_key_to_diffusers`: a decoder stage's flat list is [res x (R+1), resample]."""
    if key in _VAE_FIXED_INV:
        return _VAE_FIXED_INV[key]
    m = re.match(r"encoder\.down_blocks\.(\d+)\.(.+)\Z", key)
    if m:
        leaf = _RES_INV.get(m.group(2), m.group(2) if m.group(2) in ck._PASS else None)
        return None if leaf is None else f"encoder.downsamples.{m.group(1)}.{leaf}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)\Z", key)
    if m and m.group(3) in _RES_INV:
        return f"decoder.upsamples.{int(m.group(1)) * (num_res_blocks + 2) + int(m.group(2))}.{_RES_INV[m.group(3)]}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)\Z", key)
    if m and m.group(2) in ck._PASS[:4]:
        return f"decoder.upsamples.{int(m.group(1)) * (num_res_blocks + 2) + num_res_blocks + 1}.{m.group(2)}"
    return None


def diffusers_vae_to_wan(sd: dict[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    """Inverse of `ck.wan_vae_to_diffusers`."""
    cfg = ck.vae_config(config)
    return ck._rename(sd, lambda k: _vae_key_to_wan(k, cfg["num_res_blocks"]), "diffusers VAE state dict")


def transformers_t5_to_wan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `ck.wan_t5_to_transformers` (the tied `encoder.embed_tokens` folds back into `shared`)."""
    sd = dict(sd)
    emb = sd.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in sd and emb is not None:
        sd["shared.weight"] = emb
    return ck._rename(sd, T5_KEYS.inverse, "transformers umT5 state dict")


def quantize_state_dict(
    state_dict: dict[str, torch.Tensor], *, prefix: str = "blocks.", bias_dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Build a `-quant` style state dict from a Wan-native one (the inverse of `quant.dequantize_state_dict`).

    Linear layers are recognised as 2-D `.weight` tensors under `prefix` (in Wan blocks, norms are 1-D and
    modulation is 3-D); `proj_l` is skipped, as upstream does.
    """
    out: dict[str, torch.Tensor] = {}
    linears = {
        k[: -len(".weight")]
        for k, v in state_dict.items()
        if k.startswith(prefix) and k.endswith(".weight") and v.ndim == 2 and SKIP_LAYER not in k
    }
    for k, v in state_dict.items():
        layer, _, leaf = k.rpartition(".")
        if layer in linears and leaf == "weight":
            q, s = quantize_blockwise(v)
            out[layer + INT8_SUFFIX], out[layer + SCALE_SUFFIX] = q, s
        elif layer in linears and leaf == "bias":
            out[k] = v.to(bias_dtype)
        else:
            out[k] = v
    return out


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
            wan = diffusers_dit_to_wan(sd, proj_l=proj_l if proj_l is not None else ck.load_sla_proj_l(src))
            if quantize:
                wan = quantize_state_dict(wan)
            path = out / f"{manifest.name}-{role}{'-quant' if quantize else ''}.pth"
            torch.save({(ck.NET_PREFIX if net_prefix else "") + k: v for k, v in wan.items()}, path)
        elif role == "vae":
            model = AutoencoderKLWan.from_pretrained(src, local_files_only=True)
            path = out / "Wan2.1_VAE.pth"
            torch.save(diffusers_vae_to_wan(model.state_dict(), dict(model.config)), path)
        elif role == "text_encoder":
            model = UMT5EncoderModel.from_pretrained(src, local_files_only=True)
            path = out / "models_t5_umt5-xxl-enc.pth"
            torch.save(transformers_t5_to_wan(model.state_dict()), path)
        else:
            path = out / sub
            shutil.copytree(src, path, dirs_exist_ok=True)
        written[role] = path
    return written
