"""Model families: what one architecture brings to the generic engine, registered by name.

A family spec names its component classes, checkpoint key maps, latent geometry, frame rate and frame rule, the
DiT's input channels and experts, the conditioning builder and the tiny test configuration. The model-cache
manifest records the family next to the task `kind` (t2v | i2v); loading looks the spec up by that name, so the
pipeline, the loader, the importer and the tiny builder hold no architecture facts of their own.

    from turboflow.engine.families import family, families, register
    family("wan2.2").in_channels        # 36
    families()                          # ("wan2.1", "wan2.2")

Adding a family: a module here that builds a `FamilySpec` and calls `register(spec)`, imported at the bottom of
this file. Nothing here imports torch: the request validation (and the event contract above it) reads frame rules
from these specs without loading a deep-learning stack.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from turboflow.errors import ModelCacheError

from ..keymap import KeyMap

TASKS = ("t2v", "i2v")


class UnknownFamilyError(ModelCacheError):
    """A model family name no spec is registered under (a manifest, `--family`, a test)."""

    code = "unknown_family"


@dataclass(frozen=True)
class LatentGeometry:
    """How the VAE and the DiT tile a video: `stride` = VAE compression (time, height, width), `patch` = DiT patch."""

    channels: int
    stride: tuple[int, int, int]
    patch: tuple[int, int, int]

    def latent_frames(self, num_frames: int) -> int:
        """T' = (F - 1) / s_t + 1: a causal VAE keeps the first frame alone and packs every s_t after it."""
        return (num_frames - 1) // self.stride[0] + 1

    def valid_num_frames(self, num_frames: int) -> bool:
        """F = s_t * k + 1 (k >= 0): the frame counts the causal VAE maps to a whole number of latent frames."""
        return num_frames >= 1 and (num_frames - 1) % self.stride[0] == 0

    @property
    def pixel_multiple(self) -> int:
        """s_h * p_h: a frame side divisible by it gives a whole number of DiT patches (16 for Wan)."""
        return self.stride[1] * self.patch[1]

    def latent_shape(self, num_frames: int, width: int, height: int) -> tuple[int, int, int, int, int]:
        """(1, C, T', H / s_h, W / s_w) for one video."""
        return (1, self.channels, self.latent_frames(num_frames), height // self.stride[1], width // self.stride[2])


@dataclass(frozen=True)
class Component:
    """A component's class, named (library, class) so that naming it imports nothing."""

    library: str  # "diffusers" | "transformers"
    class_name: str

    def load_class(self) -> type:
        return getattr(importlib.import_module(self.library), self.class_name)


@dataclass(frozen=True)
class TinyConfig:
    """Narrow, shallow configs of the real classes: `turboflow model tiny`, the tests and the demo build these."""

    name: str  # the tiny cache's model name
    transformer: Mapping[str, Any]  # the DiT's config without in_channels (the family's)
    vae: Mapping[str, Any]
    text_encoder: Mapping[str, Any]  # the text encoder's config class kwargs (vocab_size: the tiny tokenizer's)


# (pipeline, PIL image, width, height, num_frames) -> the condition tensor concatenated to the DiT's input
ConditioningBuilder = Callable[[Any, Any, int, int, int], Any]


@dataclass(frozen=True)
class FamilySpec:
    """One model family. `experts[i]` runs on `transformer_roles[i]`; with two, the first (high-noise) runs while
    t >= boundary and the second after (`expert_for`)."""

    name: str
    description: str
    tasks: tuple[str, ...]  # the request kinds its checkpoints serve
    components: Mapping[str, Component]  # role (model-cache subdirectory) -> class; the DiT roles included
    transformer_roles: tuple[str, ...]
    experts: tuple[str, ...]  # names reported per step in GenerationResult.experts
    latent: LatentGeometry
    conditioning_channels: int  # DiT input channels beyond the noisy latent (mask + image latent for Wan2.2 I2V)
    fps: int
    text_len: int  # the text encoder's context length (prompts are padded / cut to it)
    default_sigma_max: float  # rCM's starting noise level the checkpoints were distilled for
    default_resolution: str  # the importer's default (the published checkpoints' resolution)
    checkpoint_keys: Mapping[str, KeyMap]  # role -> native checkpoint keys <-> library keys (engine/checkpoint.py)
    tiny: TinyConfig
    conditioning: ConditioningBuilder | None = None  # None: text-only

    @property
    def in_channels(self) -> int:
        """DiT input channels = latent channels + conditioning channels (Wan2.2 I2V: 16 + 4 + 16 = 36)."""
        return self.latent.channels + self.conditioning_channels

    def expert_for(self, t: float, boundary: float) -> str:
        """The expert for rectified-flow time t: the only one, or high-noise while t >= boundary, else low-noise."""
        if len(self.experts) == 1:
            return self.experts[0]
        return self.experts[0] if t >= boundary else self.experts[1]

    def role_of(self, expert: str) -> str:
        """The model-cache role (transformer, transformer_2) holding an expert."""
        return self.transformer_roles[self.experts.index(expert)]


_REGISTRY: dict[str, FamilySpec] = {}
# Manifests written before families were recorded name only the task; each task had exactly one family.
_FAMILY_OF_LEGACY_KIND = {"t2v": "wan2.1", "i2v": "wan2.2"}


def register(spec: FamilySpec) -> FamilySpec:
    """Make `spec` loadable by its name. Registering the same spec again is a no-op; another under a taken name
    is a ValueError (two families must never answer to one manifest)."""
    if not set(spec.tasks) <= set(TASKS) or not spec.tasks:
        raise ValueError(f"family {spec.name!r}: tasks {spec.tasks} must be among {TASKS}")
    if len(spec.experts) != len(spec.transformer_roles) or not 1 <= len(spec.experts) <= 2:
        raise ValueError(f"family {spec.name!r}: one or two experts, one transformer role each")
    if not {"tokenizer", "text_encoder", "vae", *spec.transformer_roles} <= set(spec.components):
        raise ValueError(f"family {spec.name!r}: components lack a tokenizer, text encoder, VAE or DiT role")
    known = _REGISTRY.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(f"a different model family is already registered as {spec.name!r}")
    _REGISTRY[spec.name] = spec
    return spec


def family(name: str) -> FamilySpec:
    """The registered spec called `name`, or UnknownFamilyError listing the registered ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownFamilyError(
            f"unknown model family {name!r}; registered families: {', '.join(families())}", field="family"
        ) from None


def families() -> tuple[str, ...]:
    """Names of the registered families, sorted."""
    return tuple(sorted(_REGISTRY))


def family_for_kind(kind: str) -> FamilySpec:
    """The family a task meant before manifests recorded one (wan2.1 for t2v, wan2.2 for i2v): old manifests,
    and the default of `turboflow model tiny|import --kind K` without `--family`."""
    if kind not in _FAMILY_OF_LEGACY_KIND:
        raise ModelCacheError(f"unknown model kind {kind!r}; expected one of {TASKS}", code="model_cache_invalid")
    return family(_FAMILY_OF_LEGACY_KIND[kind])


from . import wan as _wan  # noqa: E402,F401  (registers wan2.1 and wan2.2)
