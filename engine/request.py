"""What a generation is asked to do, and what it returns. Validated once, here, for every front end."""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from turboflow.errors import ImageError, InvalidRequestError, UnsupportedOptionError

from .families import FamilySpec, family_for_kind
from .prompt import clean_prompt

MAX_PROMPT_CHARS = 4000
MAX_FRAMES = 241  # a service limit: 15 s at 16 fps; the models were trained on 81
# Attention types a request may ask for: every one is implemented (engine/sla.py for "sla").
ATTENTION_TYPES = ("original", "sla")
# Upstream attention types this build does not offer, with the reason a request naming one is refused
# (`unsupported_option`, not `invalid_attention`: the name is known, the build cannot honour it).
UNAVAILABLE_ATTENTION = {
    "sagesla": "attention 'sagesla' is not available in turboflow: upstream's SageSLA runs SpargeAttn's quantized "
    "kernels (int8 Q·Kᵀ, fp8 P·V, 64x128 blocks on Hopper), which this build does not ship. 'sla' is "
    "TurboDiffusion's sparse-linear attention (bf16, the attention its checkpoints were fine-tuned with; "
    "its output differs slightly from SageSLA's); 'original' is dense attention",
}
QUANT_LINEAR_MODES = ("fp8", "int8", "int8_weight_only")  # engine/linear.py
# Image formats an I2V request may use (Pillow format names). Nothing else is ever handed to a decoder: Pillow's
# EPS/PS plugins would start Ghostscript where it is installed, and exotic formats widen the attack surface.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

# TurboDiffusion's VIDEO_RES_SIZE_INFO: (width, height)
RESOLUTIONS: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (832, 480), "9:16": (480, 832), "1:1": (640, 640), "4:3": (640, 480), "3:4": (480, 640)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (960, 960), "4:3": (960, 720), "3:4": (720, 960)},
}
SEED_MAX = 2**63 - 1
# request fields a model cache's manifest may default (e.g. a 720p checkpoint, or attention "sla" for a checkpoint
# fine-tuned with SLA); a field the request sets always wins
MODEL_DEFAULT_FIELDS = ("resolution", "aspect_ratio", "attention", "sla_topk", "sigma_max", "boundary")


def model_request_defaults(defaults: dict | None) -> dict:
    """The request fields among a manifest's `defaults` (other keys, e.g. aliases, are not request fields)."""
    return {k: v for k, v in (defaults or {}).items() if k in MODEL_DEFAULT_FIELDS and v is not None}


def frame_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(width, height) for a named resolution and aspect ratio, or a typed error."""
    if resolution not in RESOLUTIONS:
        raise InvalidRequestError(
            f"unknown resolution {resolution!r}; expected one of {sorted(RESOLUTIONS)}",
            code="invalid_resolution",
            field="resolution",
        )
    table = RESOLUTIONS[resolution]
    if aspect_ratio not in table:
        raise InvalidRequestError(
            f"unknown aspect_ratio {aspect_ratio!r}; expected one of {list(table)}",
            code="invalid_aspect_ratio",
            field="aspect_ratio",
        )
    return table[aspect_ratio]


def adaptive_frame_size(base: tuple[int, int], image_size: tuple[int, int], stride: int = 16) -> tuple[int, int]:
    """Keep the base area and the image's aspect ratio, each side a multiple of `stride` (TurboDiffusion I2V):
    with A = w0 * h0 and a = h / w of the image, w = round(sqrt(A / a) / stride) * stride and
    h = round(sqrt(A * a) / stride) * stride. `stride` is the family's `latent.pixel_multiple` (16 for Wan)."""
    area = base[0] * base[1]
    img_w, img_h = image_size
    aspect = img_h / img_w
    ideal_w = math.sqrt(area / aspect)
    ideal_h = math.sqrt(area * aspect)
    w = max(1, round(ideal_w / stride)) * stride
    h = max(1, round(ideal_h / stride)) * stride
    return w, h


def load_image(data: Any):
    """A PIL RGB image from bytes, a path, or a PIL image; ImageError otherwise.

    Only IMAGE_FORMATS are ever decoded: Pillow is told which plugins it may try, so bytes in any other format
    (EPS, TIFF, ICO, ...) never reach a decoder and are refused with the list of accepted formats."""
    from PIL import Image, UnidentifiedImageError

    accepted = ", ".join(IMAGE_FORMATS)
    try:
        if isinstance(data, Image.Image):
            img = data
            # an opened but not yet loaded image decodes on load(): its format must be allowed too
            if img.format is not None and img.format not in IMAGE_FORMATS:
                raise ImageError(
                    f"image format {img.format} is not accepted; accepted formats: {accepted}", field="image"
                )
        elif isinstance(data, (bytes, bytearray)):
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        else:
            img = Image.open(data, formats=IMAGE_FORMATS)
        img.load()
    except FileNotFoundError as e:
        raise ImageError(f"image not found: {data}", field="image") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"image is not in an accepted format ({accepted}) or is not an image", field="image") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"image could not be decoded: {e}", field="image") from e
    if img.width < 16 or img.height < 16:
        raise ImageError(f"image is {img.width}x{img.height}; at least 16x16 is needed", field="image")
    return img.convert("RGB")


@dataclass(frozen=True)
class GenerationRequest:
    """One video to generate. `validated(family)` returns a copy with defaults resolved or raises a typed error.

    The family (engine/families) supplies the frame rule and the default sigma_max; without one, the family the
    kind implies (wan2.1 for t2v, wan2.2 for i2v) does, which is what a request checked before any model is
    loaded (the event contract, the CLI) is checked against."""

    prompt: str
    kind: Literal["t2v", "i2v"] = "t2v"
    resolution: str = "480p"
    aspect_ratio: str = "16:9"
    num_frames: int = 81
    num_steps: int = 4
    seed: int | None = None  # None: pick a random seed (the one used is in the result); 0 is seed 0, as upstream
    sigma_max: float | None = None  # None: the family's (80 for Wan2.1 T2V, 200 for Wan2.2 I2V)
    attention: str = "original"
    sla_topk: float = 0.1
    ode: bool = False
    boundary: float = 0.9  # I2V: high-noise expert while t >= boundary
    adaptive_resolution: bool = True  # I2V: keep target area, follow the image's aspect
    image: Any = None  # I2V: PIL image, bytes or path

    def replace(self, **changes) -> GenerationRequest:
        return dataclasses.replace(self, **changes)

    def validated(self, family: FamilySpec | None = None) -> GenerationRequest:
        def bad(msg: str, code: str, fld: str):
            raise InvalidRequestError(msg, code=code, field=fld)

        if self.kind not in ("t2v", "i2v"):
            bad(f"unknown kind {self.kind!r}; expected t2v or i2v", "invalid_kind", "kind")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            bad("prompt must be a non-empty string", "invalid_prompt", "prompt")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            bad(
                f"prompt has {len(self.prompt)} characters; the limit is {MAX_PROMPT_CHARS}",
                "prompt_too_long",
                "prompt",
            )
        if not clean_prompt(self.prompt):
            bad(
                "prompt is empty once cleaned (HTML entities unescaped, whitespace collapsed)",
                "invalid_prompt",
                "prompt",
            )
        spec = family or family_for_kind(self.kind)
        frame_size(self.resolution, self.aspect_ratio)
        if not _is_int(self.num_frames) or not spec.latent.valid_num_frames(self.num_frames):
            step = spec.latent.stride[0]
            bad(
                f"num_frames must be {step}k+1 (e.g. {step * 4 + 1}, {step * 12 + 1}, {step * 20 + 1}), "
                f"got {self.num_frames!r}",
                "invalid_num_frames",
                "num_frames",
            )
        if self.num_frames > MAX_FRAMES:
            bad(f"num_frames {self.num_frames} exceeds the limit of {MAX_FRAMES}", "invalid_num_frames", "num_frames")
        if not _is_int(self.num_steps) or not 1 <= self.num_steps <= 4:
            bad(f"num_steps must be 1, 2, 3 or 4 (rCM), got {self.num_steps!r}", "invalid_num_steps", "num_steps")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= SEED_MAX):
            bad(
                f"seed must be an integer in [0, 2^63-1] (or omitted for a random one), got {self.seed!r}",
                "invalid_seed",
                "seed",
            )
        sigma_max = spec.default_sigma_max if self.sigma_max is None else self.sigma_max
        if not _is_number(sigma_max) or not 0 < sigma_max <= 10000 or not math.isfinite(sigma_max):
            bad(f"sigma_max must be a number in (0, 10000], got {sigma_max!r}", "invalid_sigma_max", "sigma_max")
        if isinstance(self.attention, str) and self.attention in UNAVAILABLE_ATTENTION:
            raise UnsupportedOptionError(UNAVAILABLE_ATTENTION[self.attention], field="attention")
        if self.attention not in ATTENTION_TYPES:
            bad(
                f"unknown attention {self.attention!r}; expected one of {list(ATTENTION_TYPES)}",
                "invalid_attention",
                "attention",
            )
        if not _is_number(self.sla_topk) or not 0 < self.sla_topk <= 1:
            bad(f"sla_topk must be in (0, 1], got {self.sla_topk!r}", "invalid_sla_topk", "sla_topk")
        if not isinstance(self.ode, bool):
            bad("ode must be a boolean", "invalid_ode", "ode")
        if not _is_number(self.boundary) or not 0 <= self.boundary <= 1:
            bad(f"boundary must be in [0, 1], got {self.boundary!r}", "invalid_boundary", "boundary")
        image = self.image
        if self.kind == "i2v":
            if image is None:
                raise ImageError("i2v needs an image", field="image")
            image = load_image(image)
        elif image is not None:
            bad("t2v takes no image", "unexpected_image", "image")
        return dataclasses.replace(self, sigma_max=float(sigma_max), image=image)

    def size(self, family: FamilySpec | None = None) -> tuple[int, int]:
        """(width, height) of the output video, after adaptive resolution for I2V (sides a multiple of the
        family's pixel multiple; default family as in `validated`)."""
        base = frame_size(self.resolution, self.aspect_ratio)
        if self.kind == "i2v" and self.adaptive_resolution and self.image is not None:
            stride = (family or family_for_kind(self.kind)).latent.pixel_multiple
            return adaptive_frame_size(base, load_image(self.image).size, stride)
        return base


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class GenerationResult:
    """Frames plus everything needed to reproduce and account for them."""

    frames: np.ndarray  # uint8 [F, H, W, 3]
    seed: int
    width: int
    height: int
    num_frames: int
    num_steps: int
    sigma_max: float
    model: str
    fps: int  # the family's frame rate
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    experts: list[str] = field(default_factory=list)  # which network ran each step ("high"/"low"/"dit")
    attention: str = "original"
    sla_topk: float | None = None  # None unless attention is sparse

    def summary(self) -> dict:
        return {
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "num_frames": self.num_frames,
            "num_steps": self.num_steps,
            "sigma_max": self.sigma_max,
            "model": self.model,
            "fps": self.fps,
            "timings": dict(self.timings),
            "experts": list(self.experts),
            "attention": self.attention,
            "sla_topk": self.sla_topk,
        }
