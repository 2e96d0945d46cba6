"""Tiny, randomly initialised pipelines of the real architectures, built fully offline.

Same classes as the real Wan2.1 / Wan2.2 models (WanTransformer3DModel, AutoencoderKLWan, UMT5EncoderModel and a
fast tokenizer), just narrow and shallow, written in the model-cache layout so tests and the demo go through the
exact loading path real weights use.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch

from turboflow.engine.modelcache import Manifest, write_manifest

TEXT_DIM = 32
TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    out_channels=16,
    text_dim=TEXT_DIM,
    freq_dim=32,
    ffn_dim=48,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
TINY_VAE = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
)
TINY_T5 = dict(
    d_model=TEXT_DIM,
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
_WORDS = (
    "a an the of in on at with and cat dog fox bird fish city street night day sun moon sea river forest "
    "mountain snow rain car boat robot person woman man child running walking flying swimming red blue "
    "green golden slow motion cinematic shot close wide camera pans over under above"
).split()


def _tokenizer(directory: Path) -> int:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in [*_WORDS, *string.ascii_lowercase, *string.digits]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    fast.save_pretrained(directory)
    return len(vocab)


def build_tiny(model_dir: str | os.PathLike, kind: str = "t2v", seed: int = 0) -> Manifest:
    """Write a complete tiny T2V (Wan2.1-like) or I2V (Wan2.2-A14B-like, two experts) model cache."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if kind not in ("t2v", "i2v"):
        raise ValueError(f"kind must be t2v or i2v, got {kind!r}")
    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vocab_size = _tokenizer(root / "tokenizer")
    UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **TINY_T5)).save_pretrained(root / "text_encoder")
    AutoencoderKLWan(**TINY_VAE).save_pretrained(root / "vae")
    in_channels = 16 if kind == "t2v" else 36  # I2V: 16 noise + 4 mask + 16 image latent, no CLIP
    components = {"tokenizer": "tokenizer", "text_encoder": "text_encoder", "vae": "vae", "transformer": "transformer"}
    for role in ("transformer", "transformer_2") if kind == "i2v" else ("transformer",):
        model = WanTransformer3DModel(in_channels=in_channels, **TINY_TRANSFORMER)
        # diffusers zero-inits nothing here, but make the output projection visibly non-trivial so
        # sampler behaviour (seeds, ODE vs SDE, experts) shows in the frames.
        torch.nn.init.normal_(model.proj_out.weight, std=0.5)
        model.save_pretrained(root / role)
        components[role] = role
    defaults = {"sigma_max": 80.0 if kind == "t2v" else 200.0, "resolution": "480p", "boundary": 0.9}
    name = "tiny-wan2.1-t2v" if kind == "t2v" else "tiny-wan2.2-i2v-a14b"
    return write_manifest(
        root, name=name, kind=kind, components=components, defaults=defaults, source={"tiny": True, "seed": seed}
    )
