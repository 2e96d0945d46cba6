"""The Wan families: Wan2.1 T2V (1.3B / 14B) and Wan2.2 I2V A14B (two experts), as TurboDiffusion distilled them.

What both share: diffusers' WanTransformer3DModel and AutoencoderKLWan, transformers' UMT5EncoderModel with a
512-token context, 16 latent channels, a causal VAE compressing 4x8x8 (so 4k+1 frames), DiT patches of 1x2x2,
16 fps, and the Wan-native checkpoint key maps (engine/checkpoint.py converts with them). Wan2.2 I2V adds a
conditioning of 4 mask channels + the VAE latent of [image, zeros...] (no CLIP image tokens), 36 input channels
in all, and a low-noise expert that takes over once t < boundary.
"""

from __future__ import annotations

from ..keymap import KeyMap
from . import Component, FamilySpec, LatentGeometry, TinyConfig, register

WAN_LATENT = LatentGeometry(channels=16, stride=(4, 8, 8), patch=(1, 2, 2))
WAN_FPS = 16
UMT5_TEXT_LEN = 512  # umT5 context length Wan was trained with
I2V_MASK_CHANNELS = WAN_LATENT.stride[0]  # one mask channel per frame a latent frame packs

COMPONENTS = {
    "tokenizer": Component("transformers", "AutoTokenizer"),
    "text_encoder": Component("transformers", "UMT5EncoderModel"),
    "vae": Component("diffusers", "AutoencoderKLWan"),
    "transformer": Component("diffusers", "WanTransformer3DModel"),
}

# ---- checkpoint key maps: Wan-native (TurboDiffusion) names <-> diffusers / transformers names ----------------
_DIT_RULES: list[tuple[str, str]] = [
    ("patch_embedding.{p}", "patch_embedding.{p}"),
    ("text_embedding.0.{p}", "condition_embedder.text_embedder.linear_1.{p}"),
    ("text_embedding.2.{p}", "condition_embedder.text_embedder.linear_2.{p}"),
    ("time_embedding.0.{p}", "condition_embedder.time_embedder.linear_1.{p}"),
    ("time_embedding.2.{p}", "condition_embedder.time_embedder.linear_2.{p}"),
    ("time_projection.1.{p}", "condition_embedder.time_proj.{p}"),
    ("img_emb.proj.0.{p}", "condition_embedder.image_embedder.norm1.{p}"),
    ("img_emb.proj.1.{p}", "condition_embedder.image_embedder.ff.net.0.proj.{p}"),
    ("img_emb.proj.3.{p}", "condition_embedder.image_embedder.ff.net.2.{p}"),
    ("img_emb.proj.4.{p}", "condition_embedder.image_embedder.norm2.{p}"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("head.head.{p}", "proj_out.{p}"),
    ("head.modulation", "scale_shift_table"),
    ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
    # Wan norm3 is the (affine) cross-attention norm = diffusers norm2; Wan norm1/norm2 have no parameters
    ("blocks.{i}.norm3.{p}", "blocks.{i}.norm2.{p}"),
    ("blocks.{i}.ffn.0.{p}", "blocks.{i}.ffn.net.0.proj.{p}"),
    ("blocks.{i}.ffn.2.{p}", "blocks.{i}.ffn.net.2.{p}"),
    *[
        (f"blocks.{{i}}.{wan}.{a}.{{p}}", f"blocks.{{i}}.{dif}.{b}.{{p}}")
        for wan, dif in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for a, b in (
            ("q", "to_q"),
            ("k", "to_k"),
            ("v", "to_v"),
            ("o", "to_out.0"),
            ("norm_q", "norm_q"),
            ("norm_k", "norm_k"),
        )
    ],
    ("blocks.{i}.cross_attn.k_img.{p}", "blocks.{i}.attn2.add_k_proj.{p}"),
    ("blocks.{i}.cross_attn.v_img.{p}", "blocks.{i}.attn2.add_v_proj.{p}"),
    ("blocks.{i}.cross_attn.norm_k_img.{p}", "blocks.{i}.attn2.norm_added_k.{p}"),
]
DIT_KEYS = KeyMap(_DIT_RULES)

_T5_RULES: list[tuple[str, str]] = [
    ("token_embedding.weight", "shared.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
    ("blocks.{i}.norm1.weight", "encoder.block.{i}.layer.0.layer_norm.weight"),
    ("blocks.{i}.norm2.weight", "encoder.block.{i}.layer.1.layer_norm.weight"),
    *[(f"blocks.{{i}}.attn.{x}.weight", f"encoder.block.{{i}}.layer.0.SelfAttention.{x}.weight") for x in "qkvo"],
    (
        "blocks.{i}.pos_embedding.embedding.weight",
        "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    ("blocks.{i}.ffn.gate.0.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight"),  # gelu(tanh) branch
    ("blocks.{i}.ffn.fc1.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight"),
    ("blocks.{i}.ffn.fc2.weight", "encoder.block.{i}.layer.1.DenseReluDense.wo.weight"),
]
T5_KEYS = KeyMap(_T5_RULES)

# ---- tiny configs (same classes, narrow and shallow) --------------------------------------------------------
TINY_TEXT_DIM = 32
TINY_TRANSFORMER = dict(
    patch_size=WAN_LATENT.patch,
    num_attention_heads=2,
    attention_head_dim=12,
    out_channels=WAN_LATENT.channels,
    text_dim=TINY_TEXT_DIM,
    freq_dim=32,
    ffn_dim=48,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
# decoder stages of 16, 16, 8 and 4 channels up to the full frame (4 at 640x480): a CPU decode costs per channel at
# the full-size stages (base_dim 8 took twice as long per frame); 4 channels keep the RMS norms well conditioned
# (with 2, near-zero channel vectors make fast and stock decode differ by 5e-3)
TINY_VAE = dict(
    base_dim=4,
    z_dim=WAN_LATENT.channels,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],  # 2 of 3 halvings in time, 3 in space: the 4x8x8 stride
)
TINY_T5 = dict(
    d_model=TINY_TEXT_DIM,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


# ---- conditioning -------------------------------------------------------------------------------------------
def image_condition(pipeline, image, width: int, height: int, num_frames: int):
    """Wan2.2 I2V condition [1, 4 + 16, T', H', W'] (TurboDiffusion wan2.2_i2v_infer): a first-frame mask (4
    channels, 1 on the first latent frame) and the normalised VAE latent of [image, zeros x (F-1)], pixels
    x = rgb / 127.5 - 1 in [-1, 1], latent z = (mode(E(x)) - mean) / std."""
    import numpy as np
    import torch
    from PIL import Image

    resized = image.resize((width, height), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 127.5 - 1.0)  # [H, W, 3] in [-1, 1]
    pixels = pixels.permute(2, 0, 1)[None, :, None]  # [1, 3, 1, H, W]
    video = torch.cat([pixels, pixels.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
    video = video.to(pipeline.device, pipeline.vae_dtype)
    latent = pipeline.vae.encode(video).latent_dist.mode().float()
    latent = (latent - pipeline.latents_mean.to(latent.device)) / pipeline.latents_std.to(latent.device)
    mask = torch.zeros_like(latent[:, :I2V_MASK_CHANNELS])
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latent], dim=1).to(pipeline.dtype)


# ---- the two registered families ----------------------------------------------------------------------------
_SHARED = dict(
    latent=WAN_LATENT,
    fps=WAN_FPS,
    text_len=UMT5_TEXT_LEN,
    checkpoint_keys={"transformer": DIT_KEYS, "text_encoder": T5_KEYS},
)

register(
    FamilySpec(
        name="wan2.1",
        description="Wan2.1 text-to-video (TurboWan2.1-T2V 1.3B / 14B): one DiT, text-only conditioning",
        tasks=("t2v",),
        components=COMPONENTS,
        transformer_roles=("transformer",),
        experts=("dit",),
        conditioning_channels=0,
        default_sigma_max=80.0,
        default_resolution="480p",
        tiny=TinyConfig("tiny-wan2.1-t2v", TINY_TRANSFORMER, TINY_VAE, TINY_T5),
        **_SHARED,
    )
)

register(
    FamilySpec(
        name="wan2.2",
        description="Wan2.2 image-to-video A14B (TurboWan2.2-I2V): high- and low-noise experts split at a "
        "boundary, conditioned on a first-frame mask and the image's VAE latent",
        tasks=("i2v",),
        components={**COMPONENTS, "transformer_2": COMPONENTS["transformer"]},
        transformer_roles=("transformer", "transformer_2"),
        experts=("high", "low"),
        conditioning_channels=I2V_MASK_CHANNELS + WAN_LATENT.channels,
        default_sigma_max=200.0,
        default_resolution="720p",
        tiny=TinyConfig("tiny-wan2.2-i2v-a14b", TINY_TRANSFORMER, TINY_VAE, TINY_T5),
        conditioning=image_condition,
        **_SHARED,
    )
)
