"""Full-size (and tiny) architectures with random weights, built directly on the target device."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

WAN_COMMON = dict(
    patch_size=(1, 2, 2),
    attention_head_dim=128,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
WAN_1_3B = dict(WAN_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16)
WAN_14B = dict(WAN_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=16)
WAN_A14B_I2V = dict(WAN_14B, in_channels=36)  # Wan2.2 I2V experts: 16 noise + 4 mask + 16 image latent, no CLIP
# google/umt5-xxl (encoder only is used)
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


@dataclass
class Spec:
    """One benchmark configuration: a model at one resolution."""

    name: str
    kind: str  # t2v | i2v
    transformer: dict
    resolution: str
    aspect_ratio: str = "16:9"
    frames: int = 81
    steps: int = 4  # steps the timed run does (heavy models: fewer, then projected to 4)
    warmup_steps: int = 1
    sigma_max: float = 80.0
    boundary: float = 0.9
    published_s: float | None = None  # TurboDiffusion RTX 5090, excluding text encoding and VAE decoding
    tiny: bool = False
    text: dict = field(default_factory=lambda: dict(UMT5_XXL))
    vae: dict = field(default_factory=dict)


SPECS = {
    "1.3b-480p": Spec("Wan2.1-T2V-1.3B 480p", "t2v", WAN_1_3B, "480p", steps=4, warmup_steps=4, published_s=1.9),
    "14b-480p": Spec("Wan2.1-T2V-14B 480p", "t2v", WAN_14B, "480p", steps=2, published_s=9.9),
    "14b-720p": Spec("Wan2.1-T2V-14B 720p", "t2v", WAN_14B, "720p", steps=1, published_s=24.0),
    # boundary 0.95 makes a 2-step run use both experts (t = 0.995 high, 0.934 low)
    "i2v-a14b-720p": Spec(
        "Wan2.2-I2V-A14B 720p",
        "i2v",
        WAN_A14B_I2V,
        "720p",
        steps=2,
        warmup_steps=2,
        sigma_max=200.0,
        boundary=0.95,
        published_s=38.0,
    ),
}


def tiny_specs() -> dict[str, Spec]:
    from turboflow.engine.families.wan import TINY_T5, TINY_TRANSFORMER, TINY_VAE

    common = dict(
        resolution="480p",
        aspect_ratio="4:3",
        frames=1,
        steps=2,
        warmup_steps=1,
        tiny=True,
        text=dict(TINY_T5),
        vae=dict(TINY_VAE),
    )
    return {
        "tiny-t2v": Spec("tiny T2V (CPU)", "t2v", dict(TINY_TRANSFORMER, in_channels=16), published_s=1.9, **common),
        "tiny-i2v": Spec(
            "tiny I2V two experts (CPU)",
            "i2v",
            dict(TINY_TRANSFORMER, in_channels=36),
            sigma_max=200.0,
            boundary=0.95,
            published_s=38.0,
            **common,
        ),
    }


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _on(device, dtype):
    return contextlib.ExitStack() if device.type == "cpu" and dtype == torch.float32 else _both(device, dtype)


@contextlib.contextmanager
def _both(device, dtype):
    with torch.device(device), default_dtype(dtype):
        yield


def build_transformer(cfg: dict, device: torch.device, dtype: torch.dtype):
    """Random-init WanTransformer3DModel created directly on `device` in `dtype`, with diffusers' keep-in-fp32
    modules (norms, time embedder, modulation tables, rope) in fp32 as from_pretrained would leave them."""
    from diffusers import WanTransformer3DModel

    with _on(device, dtype):
        model = WanTransformer3DModel(**cfg)
    keep = WanTransformer3DModel._keep_in_fp32_modules or []
    if dtype != torch.float32:
        for name, param in model.named_parameters():
            if any(k in name.split(".") for k in keep):
                param.data = param.data.float()
    return model.eval().requires_grad_(False)


def build_text_encoder(cfg: dict, device: torch.device, dtype: torch.dtype):
    from transformers import UMT5Config, UMT5EncoderModel

    with _on(device, dtype):
        model = UMT5EncoderModel(UMT5Config(**cfg))
    return model.to(device, dtype).eval().requires_grad_(False)


def build_vae(cfg: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan

    with _on(device, dtype):
        model = AutoencoderKLWan(**cfg)
    return model.to(device, dtype).eval().requires_grad_(False)


def build_tokenizer(directory):
    """The tiny offline word-level tokenizer (the real umT5 SentencePiece model is not needed for timing: the
    encoder always runs on 512 positions)."""
    from transformers import AutoTokenizer

    from turboflow.engine.tiny import _tokenizer

    _tokenizer(directory)
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)
