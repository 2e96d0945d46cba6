"""Tiny, randomly initialised pipelines of the real architectures, built fully offline.

Same classes as a registered model family's real models (its spec's components, e.g. WanTransformer3DModel,
AutoencoderKLWan, UMT5EncoderModel), narrow and shallow per the spec's `tiny` configs, plus a small word-level
fast tokenizer, written in the model-cache layout so tests and the demo go through the exact loading path real
weights use.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch

from . import families
from .families import FamilySpec
from .modelcache import Manifest, write_manifest

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


def _build(spec: FamilySpec, role: str, config: dict):
    cls = spec.components[role].load_class()
    config_class = getattr(cls, "config_class", None)  # transformers models take a config object
    return cls(config_class(**config)) if config_class is not None else cls(**config)


def build_tiny(
    model_dir: str | os.PathLike, kind: str = "t2v", seed: int = 0, *, family: str | None = None
) -> Manifest:
    """Write a complete tiny model cache of `family` (default: the kind's, wan2.1 for t2v and wan2.2 for i2v,
    the two-expert A14B layout) serving the task `kind`."""
    if kind not in ("t2v", "i2v"):
        raise ValueError(f"kind must be t2v or i2v, got {kind!r}")
    spec = families.family(family) if family is not None else families.family_for_kind(kind)
    if kind not in spec.tasks:
        raise ValueError(f"family {spec.name} serves {'/'.join(spec.tasks)}, not {kind}")
    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # the build order below is part of what the seed reproduces
    vocab_size = _tokenizer(root / "tokenizer")
    _build(spec, "text_encoder", {"vocab_size": vocab_size, **spec.tiny.text_encoder}).save_pretrained(
        root / "text_encoder"
    )
    _build(spec, "vae", dict(spec.tiny.vae)).save_pretrained(root / "vae")
    components = {"tokenizer": "tokenizer", "text_encoder": "text_encoder", "vae": "vae"}
    for role in spec.transformer_roles:
        model = _build(spec, role, {"in_channels": spec.in_channels, **spec.tiny.transformer})
        # diffusers zero-inits nothing here, but make the output projection visibly non-trivial so
        # sampler behaviour (seeds, ODE vs SDE, experts) shows in the frames.
        torch.nn.init.normal_(model.proj_out.weight, std=0.5)
        model.save_pretrained(root / role)
        components[role] = role
    defaults = {"sigma_max": spec.default_sigma_max, "resolution": "480p", "boundary": 0.9}
    return write_manifest(
        root,
        name=spec.tiny.name,
        kind=kind,
        family=spec.name,
        components=components,
        defaults=defaults,
        source={"tiny": True, "seed": seed},
    )
