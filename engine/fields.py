"""The request fields, defined once: what a T2V/I2V request may ask for, on the wire and on the command line.

`REQUEST_FIELDS` is the one table. Everything else derives from it: `GenerationRequest`'s fields (a test checks
they agree), the fields a model manifest may default (`MODEL_DEFAULT_FIELDS`), the request JSON Schemas
(eventing/event_schemas.py), the fields `parse_request` reads, the S3 source's metadata/sidecar fields, and the
`turboflow generate` / `turboflow submit` flags (`add_arguments`).

A field is an *engine* field when the engine generates with it (a `GenerationRequest` field); `model` and
`output_prefix` only route the request (which function, which object key), and their identifier patterns live
here so the field's definition is whole.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

MAX_PROMPT_CHARS = 4000
MAX_FRAMES = 241  # a service limit: 15 s at 16 fps; the models were trained on 81
SEED_MAX = 2**63 - 1
# Attention types a request may ask for: every one is implemented (engine/sla.py for "sla", engine/sagesla.py for
# "sagesla"); together they are upstream TurboDiffusion's --attention_type choices.
ATTENTION_TYPES = ("original", "sla", "sagesla")
# TurboDiffusion's VIDEO_RES_SIZE_INFO: (width, height)
RESOLUTIONS: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (832, 480), "9:16": (480, 832), "1:1": (640, 640), "4:3": (640, 480), "3:4": (480, 640)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (960, 960), "4:3": (960, 720), "3:4": (720, 960)},
}
ASPECT_RATIOS = sorted({a for table in RESOLUTIONS.values() for a in table})

# Identifiers of the routing fields. Conservative on purpose: they end up in object keys, which never need
# escaping and can never climb out of the tenant prefix ("..", "/", absolute paths, control characters).
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
PREFIX_SEGMENT = r"[a-z0-9][a-z0-9_-]{0,62}"  # no dots at all: "..", ".", hidden names impossible
OUTPUT_PREFIX_PATTERN = rf"^{PREFIX_SEGMENT}(/{PREFIX_SEGMENT}){{0,3}}$"
# The forms an I2V image takes on the wire: a store reference or an inline data URI.
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^\s]{1,1024}$"
FILE_URI_PATTERN = r"^file://(localhost)?/[^\s]{1,1024}$"  # a local-directory store (TURBOFLOW_STORE=local)
DATA_URI_PATTERN = r"^data:image/(png|jpeg|jpg|webp|gif|bmp);base64,"
# Inline images travel inside the event; JetStream's default message limit is 1 MB, so the schema caps the
# string at 1 MiB and the function caps the decoded bytes (TURBOFLOW_MAX_INLINE_IMAGE_BYTES, default 512 KiB).
MAX_INLINE_IMAGE_CHARS = 1 << 20

TASKS = ("t2v", "i2v")


@dataclass(frozen=True)
class RequestField:
    """One request field.

    `type`: the Python type of its value (argparse and the S3 source's string metadata convert to it).
    `schema`: its JSON Schema constraints, as published (the description is appended).
    `default`: what an absent field means once no model default applies (`None`: nothing, or the family's).
    `model_default`: a model cache's manifest may default it (e.g. a 720p checkpoint, attention "sla" for a
    checkpoint fine-tuned with SLA); a field the request sets always wins.
    `engine`: a `GenerationRequest` field (False: it only routes the request).
    `flags`: its command-line flags, the first one the canonical name (the others are kept aliases); () for a
    field the front ends take in their own way (the prompt, the image).
    """

    name: str
    type: type
    schema: dict
    description: str | None = None
    tasks: tuple[str, ...] = TASKS
    default: Any = None
    model_default: bool = False
    engine: bool = True
    flags: tuple[str, ...] = ()
    help: str | None = None

    def json_schema(self) -> dict:
        """The field's property in the request schema."""
        return {**self.schema, **({"description": self.description} if self.description else {})}


REQUEST_FIELDS: tuple[RequestField, ...] = (
    RequestField(
        "prompt",
        str,
        {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS},
        "What the video shows. umT5 reads at most 512 tokens.",
    ),
    RequestField(
        "model",
        str,
        {"type": "string", "pattern": MODEL_PATTERN},
        "Optional: the model the request was written for. The function serves one model; a "
        "different name fails with `unknown_model` instead of silently using another.",
        engine=False,
        flags=("--model",),
    ),
    RequestField(
        "resolution",
        str,
        {"type": "string", "enum": sorted(RESOLUTIONS), "default": "480p"},
        "Named resolution (TurboDiffusion table).",
        default="480p",
        model_default=True,
        flags=("--resolution",),
        help=f"{' or '.join(sorted(RESOLUTIONS))} (default: the model's, else 480p)",
    ),
    RequestField(
        "aspect_ratio",
        str,
        {"type": "string", "enum": ASPECT_RATIOS, "default": "16:9"},
        default="16:9",
        model_default=True,
        flags=("--aspect-ratio",),
        help=f"one of {', '.join(ASPECT_RATIOS)} (default: the model's, else 16:9)",
    ),
    RequestField(
        "num_frames",
        int,
        {"type": "integer", "minimum": 1, "maximum": MAX_FRAMES, "default": 81},
        "4k+1 frames (17, 49, 81, ...) at 16 fps; other values fail with `invalid_num_frames`.",
        default=81,
        flags=("--num-frames", "--frames"),
        help="4k+1 frames at 16 fps for Wan (default 81)",
    ),
    RequestField(
        "num_steps",
        int,
        {"type": "integer", "minimum": 1, "maximum": 4, "default": 4},
        "rCM steps.",
        default=4,
        flags=("--num-steps", "--steps"),
        help="rCM steps, 1-4 (default 4)",
    ),
    RequestField(
        "seed",
        int,
        {"type": "integer", "minimum": 0, "maximum": SEED_MAX},
        "The noise seed; 0 is a seed like any other (as upstream TurboDiffusion's `--seed 0`). "
        "Leave it out to let the function pick one, derived from the request id, "
        "so a redelivered request that must be generated again reproduces the same video; the "
        "seed used is in the completion.",
        flags=("--seed",),
        help="random seed (default: a random one; the seed used is printed with the timings)",
    ),
    RequestField(
        "sigma_max",
        float,
        {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 10000},
        "Initial TrigFlow sigma; default 80 (t2v) / 200 (i2v).",
        model_default=True,
        flags=("--sigma-max",),
        help="default: the model's, else 80 (t2v) / 200 (i2v)",
    ),
    RequestField(
        "attention",
        str,
        {"type": "string", "enum": list(ATTENTION_TYPES)},
        "Self-attention kernel; default the model's (`sla` for checkpoints fine-tuned "
        "with it, else `original`). `sagesla` is SLA with a quantized sparse branch "
        "(SpargeAttn's math: int8 Q·Kᵀ, fp8 P·V, 64x128 blocks on Hopper), upstream "
        "TurboDiffusion's default attention.",
        default="original",
        model_default=True,
        flags=("--attention",),
        help="default: the model's (sla for TurboDiffusion checkpoints with proj_l, else original)",
    ),
    RequestField(
        "sla_topk",
        float,
        {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.1},
        "SLA: fraction of key blocks each query block attends to exactly.",
        default=0.1,
        model_default=True,
        flags=("--sla-topk",),
        help="fraction of K blocks kept by SLA (default 0.1)",
    ),
    RequestField(
        "ode",
        bool,
        {"type": "boolean", "default": False},
        "Deterministic ODE steps instead of SDE.",
        default=False,
        flags=("--ode",),
        help="deterministic ODE steps instead of SDE",
    ),
    RequestField(
        "output_prefix",
        str,
        {"type": "string", "pattern": OUTPUT_PREFIX_PATTERN, "maxLength": 200},
        "Optional sub-folder under the tenant's prefix: the object key is "
        "`{TURBOFLOW_OUTPUT_PREFIX}/{tenant}/{output_prefix}/{yyyy}/{mm}/{dd}/"
        "{request-id}.mp4` when the request event has a `time` (its UTC date), "
        "`{TURBOFLOW_OUTPUT_PREFIX}/{tenant}/{output_prefix}/{request-id}.mp4` "
        "without one. 1-4 lowercase segments `[a-z0-9][a-z0-9_-]*`.",
        engine=False,
        flags=("--output-prefix",),
    ),
    RequestField(
        "image",
        str,
        {
            "type": "string",
            "maxLength": MAX_INLINE_IMAGE_CHARS,
            "anyOf": [{"pattern": S3_URI_PATTERN}, {"pattern": FILE_URI_PATTERN}, {"pattern": DATA_URI_PATTERN}],
        },
        "Conditioning image: `s3://bucket/{TURBOFLOW_IMAGE_PREFIX}/{tenant}/key`, the "
        "requesting tenant's upload prefix in a bucket the function may read "
        "(TURBOFLOW_INPUT_BUCKETS, default the output bucket; TURBOFLOW_IMAGE_PREFIX default "
        "`uploads`) or a prefix the deployment shares (TURBOFLOW_SHARED_IMAGE_PREFIXES); "
        "anything else fails with `image_not_allowed`. With a local-directory store "
        "(TURBOFLOW_STORE=local) the same rule applies to `file:///<store dir>/{TURBOFLOW_IMAGE_PREFIX}/"
        "{tenant}/key`. Or an inline "
        "`data:image/<png|jpeg|webp|...>;base64,...` URI (decoded size capped, default "
        "512 KiB).",
        tasks=("i2v",),
    ),
    RequestField(
        "boundary",
        float,
        {"type": "number", "minimum": 0, "maximum": 1, "default": 0.9},
        "High-noise expert while t >= boundary, low-noise expert after.",
        tasks=("i2v",),
        default=0.9,
        model_default=True,
        flags=("--boundary",),
        help="I2V: high-noise expert while t >= boundary (default: the model's, else 0.9)",
    ),
    RequestField(
        "adaptive_resolution",
        bool,
        {"type": "boolean", "default": True},
        "Keep the resolution's area, follow the image's aspect ratio.",
        tasks=("i2v",),
        default=True,
        flags=("--no-adaptive-resolution",),
        help="I2V: use the resolution's exact size instead of following the image's aspect ratio",
    ),
)
FIELDS: dict[str, RequestField] = {f.name: f for f in REQUEST_FIELDS}
WIRE_FIELDS = tuple(FIELDS)  # every field a request event's data may carry
ENGINE_FIELDS = tuple(f.name for f in REQUEST_FIELDS if f.engine)
MODEL_DEFAULT_FIELDS = tuple(f.name for f in REQUEST_FIELDS if f.model_default)
# the options a front end passes beside the prompt and the image (submit flags, S3-source metadata and sidecars)
OPTION_FIELDS = tuple(f.name for f in REQUEST_FIELDS if f.flags)


def fields_for(task: str) -> tuple[RequestField, ...]:
    """The fields a `task` request may carry, in schema order."""
    return tuple(f for f in REQUEST_FIELDS if task in f.tasks)


def add_arguments(parser, *, engine_only: bool = False) -> None:
    """One flag per option field (`flags`), its value stored under the field name; every default is None so a
    front end can tell "not given" (the model's default, then the field's, applies) from a value. A boolean
    flag stores the value that differs from the field's default (`--ode` True, `--no-adaptive-resolution`
    False). `engine_only`: skip the routing fields (`turboflow generate` serves a local model directory)."""
    for f in REQUEST_FIELDS:
        if not f.flags or (engine_only and not f.engine):
            continue
        common = dict(dest=f.name, default=None, help=f.help)
        if f.type is bool:
            parser.add_argument(*f.flags, action="store_const", const=not f.default, **common)
        else:
            metavar = "{" + ",".join(f.schema["enum"]) + "}" if "enum" in f.schema else None
            # no argparse choices: a bad value gets the same typed error (e.g. invalid_attention) as in an event
            parser.add_argument(*f.flags, type=f.type, metavar=metavar, **common)


def options_from_args(args: argparse.Namespace, *, engine_only: bool = False) -> dict:
    """The option fields `add_arguments` parsed, those given only."""
    names = (f.name for f in REQUEST_FIELDS if f.flags and (f.engine or not engine_only))
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
