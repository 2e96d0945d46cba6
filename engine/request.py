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
from .fields import (  # noqa: F401  (the limits are part of this module's surface)
    ATTENTION_TYPES,
    FIELDS,
    MAX_FRAMES,
    MAX_PROMPT_CHARS,
    MODEL_DEFAULT_FIELDS,
    RESOLUTIONS,
    SEED_MAX,
)
from .prompt import clean_prompt

# Upstream attention types this build does not offer, with the reason a request naming one is refused
# (`unsupported_option`, not `invalid_attention`: the name is known, the build cannot honour it). Empty: every
# upstream type (original, sla, sagesla) is implemented; the front ends keep the check for a future one.
UNAVAILABLE_ATTENTION: dict[str, str] = {}
QUANT_LINEAR_MODES = ("fp8", "int8", "int8_weight_only")  # engine/linear.py
# Image formats an I2V request may use (Pillow format names). Nothing else is ever handed to a decoder: Pillow's
# EPS/PS plugins would start Ghostscript where it is installed, and exotic formats widen the attack surface.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


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
    """One video to generate, as a front end received it (wire fields: engine/fields.py), not yet checked.

    `validated(family, defaults)` is the one validation step: it returns a `ValidatedRequest` or raises a typed
    error. A field left None takes the model's default (its manifest's `defaults`), else the field's default
    (`sigma_max`: the family's). The family (engine/families) supplies the frame rule and the default sigma_max;
    without one, the family the kind implies (wan2.1 for t2v, wan2.2 for i2v) does, which is what a request
    checked before any model is loaded is checked against."""

    prompt: str
    kind: Literal["t2v", "i2v"] = "t2v"
    resolution: str | None = None  # None: the model's, else 480p
    aspect_ratio: str | None = None  # None: the model's, else 16:9
    num_frames: int = 81
    num_steps: int = 4
    seed: int | None = None  # None: pick a random seed (the one used is in the result); 0 is seed 0, as upstream
    sigma_max: float | None = None  # None: the model's, else the family's (80 for Wan2.1 T2V, 200 for Wan2.2 I2V)
    attention: str | None = None  # None: the model's, else "original"
    sla_topk: float | None = None  # None: the model's, else 0.1
    ode: bool = False
    boundary: float | None = None  # I2V: high-noise expert while t >= boundary; None: the model's, else 0.9
    adaptive_resolution: bool = True  # I2V: keep target area, follow the image's aspect
    image: Any = None  # I2V: PIL image, bytes or path

    def replace(self, **changes) -> GenerationRequest:
        return dataclasses.replace(self, **changes)

    def validated(
        self, family: FamilySpec | None = None, defaults: dict | None = None, *, image_pending: bool = False
    ) -> ValidatedRequest:
        """Check every field, fill the defaults, decode the image (once) and size the video.

        `defaults`: the serving model's manifest defaults (only MODEL_DEFAULT_FIELDS are read).
        `image_pending`: an I2V image that is fetched later (an s3:// or file:// reference): every other field is
        checked now, and `ValidatedRequest.with_image(raw)` completes the request once the bytes are here."""

        def bad(msg: str, code: str, fld: str):
            raise InvalidRequestError(msg, code=code, field=fld)

        if self.kind not in ("t2v", "i2v"):
            bad(f"unknown kind {self.kind!r}; expected t2v or i2v", "invalid_kind", "kind")
        spec = family or family_for_kind(self.kind)
        # what the request leaves out, the model decides, then the field (sigma_max: the family)
        model = model_request_defaults(defaults)
        filled = {
            name: model.get(name, FIELDS[name].default) for name in MODEL_DEFAULT_FIELDS if getattr(self, name) is None
        }
        req = dataclasses.replace(self, **filled)
        if req.sigma_max is None:
            req = req.replace(sigma_max=spec.default_sigma_max)
        if not isinstance(req.prompt, str) or not req.prompt.strip():
            bad("prompt must be a non-empty string", "invalid_prompt", "prompt")
        if len(req.prompt) > MAX_PROMPT_CHARS:
            bad(
                f"prompt has {len(req.prompt)} characters; the limit is {MAX_PROMPT_CHARS}",
                "prompt_too_long",
                "prompt",
            )
        if not clean_prompt(req.prompt):
            bad(
                "prompt is empty once cleaned (HTML entities unescaped, whitespace collapsed)",
                "invalid_prompt",
                "prompt",
            )
        frame_size(req.resolution, req.aspect_ratio)
        if not _is_int(req.num_frames) or not spec.latent.valid_num_frames(req.num_frames):
            step = spec.latent.stride[0]
            bad(
                f"num_frames must be {step}k+1 (e.g. {step * 4 + 1}, {step * 12 + 1}, {step * 20 + 1}), "
                f"got {req.num_frames!r}",
                "invalid_num_frames",
                "num_frames",
            )
        if req.num_frames > MAX_FRAMES:
            bad(f"num_frames {req.num_frames} exceeds the limit of {MAX_FRAMES}", "invalid_num_frames", "num_frames")
        if not _is_int(req.num_steps) or not 1 <= req.num_steps <= 4:
            bad(f"num_steps must be 1, 2, 3 or 4 (rCM), got {req.num_steps!r}", "invalid_num_steps", "num_steps")
        if req.seed is not None and (not _is_int(req.seed) or not 0 <= req.seed <= SEED_MAX):
            bad(
                f"seed must be an integer in [0, 2^63-1] (or omitted for a random one), got {req.seed!r}",
                "invalid_seed",
                "seed",
            )
        sigma_max = req.sigma_max
        if not _is_number(sigma_max) or not 0 < sigma_max <= 10000 or not math.isfinite(sigma_max):
            bad(f"sigma_max must be a number in (0, 10000], got {sigma_max!r}", "invalid_sigma_max", "sigma_max")
        if isinstance(req.attention, str) and req.attention in UNAVAILABLE_ATTENTION:
            raise UnsupportedOptionError(UNAVAILABLE_ATTENTION[req.attention], field="attention")
        if req.attention not in ATTENTION_TYPES:
            bad(
                f"unknown attention {req.attention!r}; expected one of {list(ATTENTION_TYPES)}",
                "invalid_attention",
                "attention",
            )
        if not _is_number(req.sla_topk) or not 0 < req.sla_topk <= 1:
            bad(f"sla_topk must be in (0, 1], got {req.sla_topk!r}", "invalid_sla_topk", "sla_topk")
        if not isinstance(req.ode, bool):
            bad("ode must be a boolean", "invalid_ode", "ode")
        if not _is_number(req.boundary) or not 0 <= req.boundary <= 1:
            bad(f"boundary must be in [0, 1], got {req.boundary!r}", "invalid_boundary", "boundary")
        if not isinstance(req.adaptive_resolution, bool):
            bad("adaptive_resolution must be a boolean", "invalid_adaptive_resolution", "adaptive_resolution")
        if req.kind == "t2v" and req.image is not None:
            bad("t2v takes no image", "unexpected_image", "image")
        if req.kind == "i2v" and req.image is None and not image_pending:
            raise ImageError("i2v needs an image", field="image")
        pending = ValidatedRequest(
            request=dataclasses.replace(req, sigma_max=float(sigma_max), image=None), family=spec, width=0, height=0
        )
        return pending if req.kind == "i2v" and image_pending else pending.with_image(req.image)


@dataclass(frozen=True)
class ValidatedRequest:
    """A request that passed `GenerationRequest.validated`: every field checked, the defaults filled, the I2V image
    decoded once to an RGB PIL image and the output size resolved. The pipeline accepts only this type.

    `image_pending`: an I2V request whose image (a store reference) is not fetched yet; `with_image(raw)` decodes
    it and sizes the video. `request` is the filled-in GenerationRequest (its `image` the decoded PIL image)."""

    request: GenerationRequest
    family: FamilySpec  # the family the request was checked against (frame rule, sigma_max, pixel multiple)
    width: int  # 0 while the image is pending
    height: int

    @property
    def image_pending(self) -> bool:
        return self.request.kind == "i2v" and self.request.image is None

    def with_image(self, data: Any) -> ValidatedRequest:
        """The request with its image: decoded here (the one full decode) and the video sized from it. For t2v
        (`data` None) only the size is resolved."""
        req = self.request
        image = load_image(data) if req.kind == "i2v" else None
        width, height = frame_size(req.resolution, req.aspect_ratio)
        if image is not None and req.adaptive_resolution:
            width, height = adaptive_frame_size((width, height), image.size, self.family.latent.pixel_multiple)
        return dataclasses.replace(self, request=req.replace(image=image), width=width, height=height)

    def with_seed(self, seed: int) -> ValidatedRequest:
        """The same request with this seed (checked like any other)."""
        if not _is_int(seed) or not 0 <= seed <= SEED_MAX:
            raise InvalidRequestError(f"seed must be an integer in [0, 2^63-1], got {seed!r}", code="invalid_seed")
        return dataclasses.replace(self, request=self.request.replace(seed=seed))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the output video."""
        return self.width, self.height


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
