"""Load TurboDiffusion / Wan-native checkpoint files and convert them to diffusers / transformers state dicts.

Files handled (all read with `torch.load(..., map_location="cpu", weights_only=True)`; never unpickling code):

* DiT checkpoints `TurboWan2.1-T2V-*.pth`, `TurboWan2.2-I2V-A14B-{high,low}-720P.pth` and their `-quant.pth`
  variants: Wan-native keys (optionally under `net.` and/or a top-level `state_dict`), `patch_embedding.weight` stored
  as Linear [dim, C*1*2*2] (upstream patchifies `(c kt kh kw)`, the Conv3d flattening order, so a reshape is exact),
  and SLA's `blocks.N.self_attn.attn_op.local_attn.proj_l.{weight,bias}`. -> `WanTransformer3DModel` keys.
* `Wan2.1_VAE.pth` -> `AutoencoderKLWan` keys.
* `models_t5_umt5-xxl-enc-bf16.pth` (Wan's own T5 encoder module: `token_embedding`, `blocks.N.{norm1,attn.q/k/v/o,
  norm2,ffn.gate.0,ffn.fc1,ffn.fc2,pos_embedding.embedding}`, `norm`) -> transformers `UMT5EncoderModel` keys.

SLA projections: diffusers' WanTransformer3DModel has no place for `proj_l`, so it is returned separately
(`ConvertedDiT.sla_proj_l`, keys `blocks.N.proj_l.{weight,bias}`, fp32 as stored) and the importer writes it to
`transformer/sla/proj_l.safetensors` -- a subdirectory, so diffusers' loader and the cache's key check (which look at
`transformer/*.safetensors` only) never see it, while the manifest still hashes it. `load_sla_proj_l()` reads it back.

The DiT and umT5 key maps are the Wan family's (engine/families/wan.py); the VAE's depend on its config and live
here. Key mapping is explicit and strict: any key no rule accounts for, any key the target model
expects that the file lacks and any shape mismatch raise CheckpointError with counts and a short sample.
The DiT and VAE rules agree with diffusers' own `convert_wan_transformer_to_diffusers` /
`convert_wan_vae_to_diffusers` (tests check this) and handle VAE configs other than the stock one. The reverse
direction (diffusers -> Wan), which only the tests need to build importer inputs, is in tests/native_export.py.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from turboflow.errors import CheckpointError

from .families.wan import DIT_KEYS, T5_KEYS, WAN_LATENT
from .quant import INT8_STORAGE, INT8_SUFFIX, SCALE_SUFFIX, dequantize_state_dict, is_quantized

log = logging.getLogger(__name__)

NET_PREFIX = "net."
PATCH = WAN_LATENT.patch
SLA_FILE = "sla/proj_l.safetensors"  # relative to the transformer component directory
_SAMPLE = 8


# ---------------------------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------------------------
def load_torch_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True (memory-mapped when the file format allows) -> flat tensor dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped; anything else is a real error
            raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: {e}") from e
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError (non-tensor content), EOFError (truncated), ...
        raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: {e}") from e
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Accept a plain state dict or a training-style {"state_dict"|"model": {...}} wrapper."""
    for _ in range(2):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, dict):
            inner = next((obj[k] for k in ("state_dict", "model", "module") if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
                continue
        break
    kind = type(obj).__name__
    sample = list(obj)[:_SAMPLE] if isinstance(obj, dict) else []
    raise CheckpointError(f"{what} is not a state dict of tensors (got {kind}, keys {sample})")


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str = NET_PREFIX) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        new = k[len(prefix) :] if k.startswith(prefix) else k
        if new in out:
            raise CheckpointError(f"key {new!r} appears both with and without the {prefix!r} prefix")
        out[new] = v
    return out


# ---------------------------------------------------------------------------------------------------------------
# renaming with the Wan family's key maps (engine/families/wan.py: DIT_KEYS, T5_KEYS; the VAE's are below)
# ---------------------------------------------------------------------------------------------------------------
def _rename(sd: dict, fn, what: str) -> dict:
    out, unmatched = {}, []
    for k, v in sd.items():
        new = fn(k)
        if new is None:
            unmatched.append(k)
        elif new in out:
            raise CheckpointError(f"{what}: two keys map to {new!r}")
        else:
            out[new] = v
    if unmatched:
        raise CheckpointError(
            f"{what}: {len(unmatched)} unexpected keys no conversion rule accounts for, e.g. "
            f"{sorted(unmatched)[:_SAMPLE]}"
        )
    return out


_PROJ_L = re.compile(r"blocks\.(\d+)\.self_attn\.attn_op\.local_attn\.proj_l\.(weight|bias)\Z")


# ---------------------------------------------------------------------------------------------------------------
# strict comparison with the target architecture
# ---------------------------------------------------------------------------------------------------------------
def expected_shapes(cls, config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer shapes of `cls(**config)` (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        model = cls(**config) if not hasattr(cls, "config_class") else cls(cls.config_class(**config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(
    what: str, sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], ignore_missing: tuple[str, ...] = ()
) -> None:
    missing = sorted(k for k in expected.keys() - sd.keys() if k not in ignore_missing)
    unexpected = sorted(sd.keys() - expected.keys())
    mismatched = sorted(
        f"{k}: file {tuple(sd[k].shape)} vs model {expected[k]}"
        for k in sd.keys() & expected.keys()
        if tuple(sd[k].shape) != expected[k]
    )
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {missing[:_SAMPLE]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:_SAMPLE]}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches, e.g. {mismatched[:_SAMPLE]}")
    if parts:
        raise CheckpointError(f"{what} does not match its architecture: " + "; ".join(parts))


def _cast(sd: dict, dtype: torch.dtype | None) -> dict:
    if dtype is None:
        return sd
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------------------
# DiT
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ConvertedDiT:
    state_dict: dict[str, torch.Tensor]  # WanTransformer3DModel keys
    config: dict  # WanTransformer3DModel(**config)
    sla_proj_l: dict[str, torch.Tensor] = field(default_factory=dict)  # blocks.N.proj_l.{weight,bias}
    info: dict = field(default_factory=dict)  # what was done: prefix stripped, dequantized, patch reshape


# Known Wan dims -> heads (head_dim 128 for every released Wan2.1/2.2 DiT).
_KNOWN_HEADS = {1536: 12, 5120: 40}


def infer_dit_config(sd: dict[str, torch.Tensor], overrides: dict | None = None) -> dict:
    """WanTransformer3DModel config from a Wan-native (prefix-stripped, dequantized) state dict's shapes.

    Head count is not visible in q/k/v shapes: it comes from `proj_l` ([head_dim, head_dim]) when present, else from
    the known Wan sizes (head_dim 128), else it must be given in `overrides`.
    """
    overrides = dict(overrides or {})
    try:
        pe = sd["patch_embedding.weight"]
        dim = pe.shape[0]
        n_patch = PATCH[0] * PATCH[1] * PATCH[2]
        in_channels = pe.shape[1] if pe.ndim == 5 else pe.shape[1] // n_patch
        out_channels = sd["head.head.weight"].shape[0] // n_patch
        layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
        ffn_dim = sd["blocks.0.ffn.0.weight"].shape[0]
        text_dim = sd["text_embedding.0.weight"].shape[1]
        freq_dim = sd["time_embedding.0.weight"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"not a Wan DiT checkpoint: key {e} missing (has e.g. {sorted(sd)[:_SAMPLE]})") from e
    if layers != list(range(len(layers))):
        raise CheckpointError(f"DiT block indices are not contiguous: {layers[:10]}...")
    head_dim = None
    proj_l = next((v for k, v in sd.items() if _PROJ_L.match(k) and k.endswith("weight")), None)
    if proj_l is not None:
        head_dim = proj_l.shape[0]
    elif dim in _KNOWN_HEADS:
        head_dim = dim // _KNOWN_HEADS[dim]
    config = dict(
        patch_size=PATCH,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=text_dim,
        freq_dim=freq_dim,
        ffn_dim=ffn_dim,
        num_layers=len(layers),
        cross_attn_norm="blocks.0.norm3.weight" in sd,
        qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in sd else None,
        eps=1e-6,
        rope_max_seq_len=1024,
    )
    if head_dim is not None:
        config.update(num_attention_heads=dim // head_dim, attention_head_dim=head_dim)
    if "img_emb.proj.0.weight" in sd:  # Wan2.1 I2V/FLF2V with CLIP image tokens (Wan2.2 A14B has none)
        config.update(image_dim=sd["img_emb.proj.0.weight"].shape[0], added_kv_proj_dim=dim)
        if "img_emb.emb_pos" in sd:
            config["pos_embed_seq_len"] = sd["img_emb.emb_pos"].shape[1]
    config.update(overrides)
    if "num_attention_heads" not in config or "attention_head_dim" not in config:
        raise CheckpointError(
            f"cannot infer the attention head count of a DiT with dim {dim} (no proj_l keys, not a "
            f"known Wan size): pass num_attention_heads and attention_head_dim in the config"
        )
    if config["num_attention_heads"] * config["attention_head_dim"] != dim:
        raise CheckpointError(
            f"config heads {config['num_attention_heads']} x head_dim {config['attention_head_dim']} != model dim {dim}"
        )
    return config


def wan_dit_to_diffusers(
    sd: dict[str, torch.Tensor],
    config: dict | None = None,
    *,
    dtype: torch.dtype | None = None,
    what: str = "DiT checkpoint",
    keep_int8: bool = False,
) -> ConvertedDiT:
    """Wan-native DiT state dict (any of: `net.` prefix, Linear patch embedding, proj_l, int8) -> diffusers.

    keep_int8: a `-quant` checkpoint's layers stay int8 + 128x128 scales (`<layer>.int8_weight`, `<layer>.scale`
    under diffusers names) instead of being dequantized; they load into `BlockInt8Linear` (engine/quant.py)."""
    info = {"net_prefix": any(k.startswith(NET_PREFIX) for k in sd)}
    sd = strip_prefix(sd)
    info["quantized"] = is_quantized(sd)
    int8_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if info["quantized"]:
        if keep_int8:
            int8_pairs = {
                k[: -len(INT8_SUFFIX)]: (v, sd[k[: -len(INT8_SUFFIX)] + SCALE_SUFFIX])
                for k, v in sd.items()
                if k.endswith(INT8_SUFFIX)
            }
        sd = dequantize_state_dict(sd, dtype or torch.bfloat16)  # also validates the pairs
    cfg = infer_dit_config(sd, config)
    proj_l, rest = {}, {}
    for k, v in sd.items():
        m = _PROJ_L.match(k)
        if m:
            proj_l[f"blocks.{m.group(1)}.proj_l.{m.group(2)}"] = v
        else:
            rest[k] = v
    if proj_l:
        blocks = {int(k.split(".")[1]) for k in proj_l}
        want = {f"blocks.{i}.proj_l.{p}" for i in range(cfg["num_layers"]) for p in ("weight", "bias")}
        if set(proj_l) != want:
            raise CheckpointError(
                f"{what}: SLA proj_l present for blocks {sorted(blocks)[:8]} but not all "
                f"{cfg['num_layers']} blocks (missing {sorted(want - set(proj_l))[:_SAMPLE]})"
            )
    pe = rest.get("patch_embedding.weight")
    if pe is not None and pe.ndim == 2:
        dim, c = pe.shape[0], cfg["in_channels"]
        rest["patch_embedding.weight"] = pe.reshape(dim, c, *cfg["patch_size"])
        info["patch_embedding"] = "linear->conv3d"
    out = _rename(rest, DIT_KEYS.forward, what)
    out = _cast(out, dtype)
    from diffusers import WanTransformer3DModel

    check_state_dict(what, out, expected_shapes(WanTransformer3DModel, cfg))
    info["sla_proj_l"] = bool(proj_l)
    if int8_pairs:
        for layer, (q, scale) in int8_pairs.items():
            name = DIT_KEYS.forward(layer + ".weight")[: -len(".weight")]
            del out[name + ".weight"]
            out[name + INT8_SUFFIX], out[name + SCALE_SUFFIX] = q.contiguous(), scale.to(torch.float32).contiguous()
        info["stored"] = INT8_STORAGE
    return ConvertedDiT(out, cfg, proj_l, info)


def load_dit_checkpoint(
    path: str | os.PathLike, config: dict | None = None, *, dtype: torch.dtype | None = None, keep_int8: bool = False
) -> ConvertedDiT:
    converted = wan_dit_to_diffusers(
        load_torch_file(path), config, dtype=dtype, what=f"DiT checkpoint {path}", keep_int8=keep_int8
    )
    converted.info["file"] = Path(path).name
    return converted


def load_sla_proj_l(transformer_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The SLA proj_l tensors the importer stored next to a transformer ({} if the checkpoint had none)."""
    from safetensors.torch import load_file

    path = Path(transformer_dir) / SLA_FILE
    return load_file(path) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------------
_RES = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_PASS = (
    "resample.1.weight",
    "resample.1.bias",
    "time_conv.weight",
    "time_conv.bias",
    "norm.gamma",
    "to_qkv.weight",
    "to_qkv.bias",
    "proj.weight",
    "proj.bias",
)
_VAE_FIXED = {
    "conv1.weight": "quant_conv.weight",
    "conv1.bias": "quant_conv.bias",
    "conv2.weight": "post_quant_conv.weight",
    "conv2.bias": "post_quant_conv.bias",
}
for _side in ("encoder", "decoder"):
    _VAE_FIXED.update({f"{_side}.conv1.{p}": f"{_side}.conv_in.{p}" for p in ("weight", "bias")})
    _VAE_FIXED.update(
        {
            f"{_side}.head.0.gamma": f"{_side}.norm_out.gamma",
            f"{_side}.head.2.weight": f"{_side}.conv_out.weight",
            f"{_side}.head.2.bias": f"{_side}.conv_out.bias",
        }
    )
    for _wan, _dif in (("0", "resnets.0"), ("2", "resnets.1")):
        _VAE_FIXED.update({f"{_side}.middle.{_wan}.{a}": f"{_side}.mid_block.{_dif}.{b}" for a, b in _RES.items()})
    _VAE_FIXED.update({f"{_side}.middle.1.{x}": f"{_side}.mid_block.attentions.0.{x}" for x in _PASS[4:]})


def _vae_key_to_diffusers(key: str, num_res_blocks: int) -> str | None:
    if key in _VAE_FIXED:
        return _VAE_FIXED[key]
    m = re.match(r"encoder\.downsamples\.(\d+)\.(.+)\Z", key)
    if m:  # the encoder's flat list has the same order in both implementations
        leaf = _RES.get(m.group(2), m.group(2) if m.group(2) in _PASS else None)
        return None if leaf is None else f"encoder.down_blocks.{m.group(1)}.{leaf}"
    m = re.match(r"decoder\.upsamples\.(\d+)\.(.+)\Z", key)
    if m:  # flat [res x (R+1), resample] per stage  ->  up_blocks[s].resnets[j] / up_blocks[s].upsamplers[0]
        stage, j = divmod(int(m.group(1)), num_res_blocks + 2)
        if j <= num_res_blocks and m.group(2) in _RES:
            return f"decoder.up_blocks.{stage}.resnets.{j}.{_RES[m.group(2)]}"
        if j == num_res_blocks + 1 and m.group(2) in _PASS[:4]:
            return f"decoder.up_blocks.{stage}.upsamplers.0.{m.group(2)}"
    return None


def vae_config(overrides: dict | None = None) -> dict:
    """AutoencoderKLWan's defaults are the Wan2.1 VAE; overrides for other (tiny) variants."""
    import inspect

    from diffusers import AutoencoderKLWan

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    cfg = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
    overrides = {k: v for k, v in (overrides or {}).items() if not k.startswith("_")}  # _class_name & co.
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise CheckpointError(f"unknown AutoencoderKLWan config keys {unknown}")
    cfg.update(overrides)
    return cfg


def wan_vae_to_diffusers(
    sd: dict[str, torch.Tensor],
    config: dict | None = None,
    *,
    dtype: torch.dtype | None = None,
    what: str = "VAE checkpoint",
) -> tuple[dict[str, torch.Tensor], dict]:
    from diffusers import AutoencoderKLWan

    cfg = vae_config(config)
    sd = strip_prefix(sd)
    out = _cast(_rename(sd, lambda k: _vae_key_to_diffusers(k, cfg["num_res_blocks"]), what), dtype)
    check_state_dict(what, out, expected_shapes(AutoencoderKLWan, cfg))
    return out, cfg


def load_vae_checkpoint(
    path: str | os.PathLike, config: dict | None = None, *, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    return wan_vae_to_diffusers(load_torch_file(path), config, dtype=dtype, what=f"VAE checkpoint {path}")


# ---------------------------------------------------------------------------------------------------------------
# umT5 text encoder
# ---------------------------------------------------------------------------------------------------------------
def infer_t5_config(sd: dict[str, torch.Tensor], overrides: dict | None = None) -> dict:
    """UMT5Config kwargs from Wan-native T5 encoder shapes (umt5-xxl: 256384 x 4096, 24 layers, 64 heads)."""
    try:
        vocab, d_model = sd["token_embedding.weight"].shape
        buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
        d_ff = sd["blocks.0.ffn.fc1.weight"].shape[0]
        inner = sd["blocks.0.attn.q.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(
            f"not a Wan umT5 encoder checkpoint: key {e} missing (has e.g. {sorted(sd)[:_SAMPLE]})"
        ) from e
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    cfg = dict(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    cfg.update(overrides or {})
    return cfg


def wan_t5_to_transformers(
    sd: dict[str, torch.Tensor],
    config: dict | None = None,
    *,
    dtype: torch.dtype | None = None,
    what: str = "umT5 checkpoint",
) -> tuple[dict[str, torch.Tensor], dict]:
    from transformers import UMT5EncoderModel

    sd = strip_prefix(sd)
    cfg = infer_t5_config(sd, config)
    out = _cast(_rename(sd, T5_KEYS.forward, what), dtype)
    out["encoder.embed_tokens.weight"] = out["shared.weight"]  # the same embedding, referenced twice
    check_state_dict(what, out, expected_shapes(UMT5EncoderModel, cfg))
    return out, cfg


def load_t5_checkpoint(
    path: str | os.PathLike, config: dict | None = None, *, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    return wan_t5_to_transformers(load_torch_file(path), config, dtype=dtype, what=f"umT5 checkpoint {path}")
