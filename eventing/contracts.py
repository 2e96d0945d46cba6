"""The event contract: JSON Schemas of every data payload, request parsing, reply builders.

This module is the single source of truth. `eventing/schemas/*.json` and `docs/events.asyncapi.yaml` are generated
from it (`python -m turboflow.eventing.asyncapi --write`; tests/test_contracts.py fails when they are stale).

Requests
    `io.turboflow.video.t2v.requested` / `io.turboflow.video.i2v.requested`. The CloudEvent `id` is the request id
    (it names the output object, so producers must not reuse ids). Extension `tenant` selects the tenant
    (default "default"); `traceparent` is carried onto the reply.
Replies (the HTTP response to the request, re-published by the broker)
    `io.turboflow.video.completed`, `io.turboflow.video.failed`: `subject` = request id, extensions `tenant` and
    `traceparent` kept. Their ids are derived from the request id (uuid5), so the reply to a redelivered request is
    the *same* event and JetStream's Nats-Msg-Id de-duplication drops it.
"""
from __future__ import annotations

import base64
import binascii
import copy
import io
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from turboflow.engine.errors import InvalidRequestError, TurboflowError
from turboflow.engine.request import (ATTENTION_TYPES, MAX_FRAMES, MAX_PROMPT_CHARS, RESOLUTIONS, SEED_MAX,
                                      GenerationRequest, model_request_defaults)

from .types import (COMPLETED, DEFAULT_TENANT, FAILED, I2V_REQUESTED, REQUEST_TYPES, T2V_REQUESTED,
                    TENANT_EXTENSION)

SCHEMA_BASE = "https://turboflow.io/schemas/events"
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
TRACEPARENT_EXTENSION = "traceparent"
TRACESTATE_EXTENSION = "tracestate"
DEFAULT_SOURCES = {"t2v": "/turboflow/functions/t2v", "i2v": "/turboflow/functions/i2v"}
_ID_NAMESPACE = uuid.UUID("6f1c6d4e-2b0a-5c1e-9d7a-7475726266c6")  # uuid5 namespace for reply ids

# Identifiers that end up in object keys. Conservative on purpose: keys never need escaping and can never
# climb out of the tenant prefix ("..", "/", absolute paths, control characters are all impossible).
TENANT_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
PREFIX_SEGMENT = r"[a-z0-9][a-z0-9_-]{0,62}"  # no dots at all: "..", ".", hidden names impossible
OUTPUT_PREFIX_PATTERN = rf"^{PREFIX_SEGMENT}(/{PREFIX_SEGMENT}){{0,3}}$"
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^\s]{1,1024}$"
DATA_URI_PATTERN = r"^data:image/(png|jpeg|jpg|webp|gif|bmp);base64,"
# Inline images travel inside the event; JetStream's default message limit is 1 MB, so the schema caps the
# string at 1 MiB and the function caps the decoded bytes (TURBOFLOW_MAX_INLINE_IMAGE_BYTES, default 512 KiB).
MAX_INLINE_IMAGE_CHARS = 1 << 20
DEFAULT_MAX_INLINE_IMAGE_BYTES = 512 << 10


class ContractError(InvalidRequestError):
    """The event violates the contract. Always answered with a `failed` reply, never retried."""
    code = "invalid_request"


# ---------------------------------------------------------------------------------------------------------------
# Schemas (data payloads)
# ---------------------------------------------------------------------------------------------------------------
_ASPECTS = sorted({a for table in RESOLUTIONS.values() for a in table})

_COMMON_REQUEST_PROPERTIES: dict[str, dict] = {
    "prompt": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS,
               "description": "What the video shows. umT5 reads at most 512 tokens."},
    "model": {"type": "string", "pattern": MODEL_PATTERN,
              "description": "Optional: the model the request was written for. The function serves one model; a "
                             "different name fails with `unknown_model` instead of silently using another."},
    "resolution": {"type": "string", "enum": sorted(RESOLUTIONS), "default": "480p",
                   "description": "Named resolution (TurboDiffusion table)."},
    "aspect_ratio": {"type": "string", "enum": _ASPECTS, "default": "16:9"},
    "num_frames": {"type": "integer", "minimum": 1, "maximum": MAX_FRAMES, "default": 81,
                   "description": "4k+1 frames (17, 49, 81, ...) at 16 fps; other values fail with "
                                  "`invalid_num_frames`."},
    "num_steps": {"type": "integer", "minimum": 1, "maximum": 4, "default": 4, "description": "rCM steps."},
    "seed": {"type": "integer", "minimum": 0, "maximum": SEED_MAX, "default": 0,
             "description": "0 picks a seed (derived from the request id, so a redelivered request that must be "
                            "generated again reproduces the same video); the seed used is in the completion."},
    "sigma_max": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 10000,
                  "description": "Initial TrigFlow sigma; default 80 (t2v) / 200 (i2v)."},
    "attention": {"type": "string", "enum": list(ATTENTION_TYPES), "default": "original",
                  "description": "Self-attention kernel; kinds this build lacks fail with `unsupported_option`."},
    "sla_topk": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.1,
                 "description": "SLA: fraction of key blocks each query block attends to exactly."},
    "ode": {"type": "boolean", "default": False, "description": "Deterministic ODE steps instead of SDE."},
    "output_prefix": {"type": "string", "pattern": OUTPUT_PREFIX_PATTERN, "maxLength": 200,
                      "description": "Optional sub-folder under the tenant's prefix: the object key is "
                                     "`{TURBOFLOW_OUTPUT_PREFIX}/{tenant}/{output_prefix}/{yyyy}/{mm}/{dd}/"
                                     "{request-id}.mp4`. 1-4 lowercase segments `[a-z0-9][a-z0-9_-]*`."},
}

_I2V_PROPERTIES: dict[str, dict] = {
    "image": {"type": "string", "maxLength": MAX_INLINE_IMAGE_CHARS,
              "anyOf": [{"pattern": S3_URI_PATTERN}, {"pattern": DATA_URI_PATTERN}],
              "description": "Conditioning image: `s3://bucket/key` in a bucket the function is allowed to read "
                             "(TURBOFLOW_INPUT_BUCKETS, default the output bucket) or an inline "
                             "`data:image/<png|jpeg|webp|...>;base64,...` URI (decoded size capped, default "
                             "512 KiB)."},
    "boundary": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.9,
                 "description": "High-noise expert while t >= boundary, low-noise expert after."},
    "adaptive_resolution": {"type": "boolean", "default": True,
                            "description": "Keep the resolution's area, follow the image's aspect ratio."},
}


def _request_schema(kind: str) -> dict:
    props = copy.deepcopy(_COMMON_REQUEST_PROPERTIES)
    required = ["prompt"]
    if kind == "i2v":
        props.update(copy.deepcopy(_I2V_PROPERTIES))
        required.append("image")
    title = {"t2v": "Text-to-video request", "i2v": "Image-to-video request"}[kind]
    return {"$schema": SCHEMA_DIALECT, "$id": f"{SCHEMA_BASE}/{kind}.requested.json", "title": title,
            "description": f"data of `{REQUEST_TYPES[kind]}`. Unknown fields are rejected (`unknown_field`).",
            "type": "object", "additionalProperties": False, "required": required, "properties": props}


_NUM = {"type": "number", "minimum": 0}
COMPLETED_SCHEMA: dict = {
    "$schema": SCHEMA_DIALECT, "$id": f"{SCHEMA_BASE}/completed.json", "title": "Video completed",
    "description": f"data of `{COMPLETED}`. A redelivered request gets an equal event (same id and data) "
                   "without generating again; `video.url` is re-signed only once less than half its lifetime is "
                   "left.",
    "type": "object", "additionalProperties": False,
    "required": ["request_id", "tenant", "kind", "model", "video", "width", "height", "num_frames", "fps",
                 "duration", "seed", "num_steps", "sigma_max", "timings", "usage", "completed_at"],
    "properties": {
        "request_id": {"type": "string", "pattern": REQUEST_ID_PATTERN},
        "tenant": {"type": "string", "pattern": TENANT_PATTERN},
        "kind": {"type": "string", "enum": ["t2v", "i2v"]},
        "model": {"type": "string"},
        "video": {
            "type": "object", "additionalProperties": False,
            "required": ["uri", "url", "url_expires_at", "bucket", "key", "content_type", "bytes", "sha256"],
            "properties": {
                "uri": {"type": "string", "pattern": "^s3://", "description": "s3://bucket/key"},
                "url": {"type": "string", "format": "uri", "description": "Presigned GET URL."},
                "url_expires_at": {"type": "string", "format": "date-time"},
                "bucket": {"type": "string"}, "key": {"type": "string"},
                "content_type": {"const": "video/mp4"},
                "bytes": {"type": "integer", "minimum": 1},
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            }},
        "width": {"type": "integer", "minimum": 1}, "height": {"type": "integer", "minimum": 1},
        "num_frames": {"type": "integer", "minimum": 1}, "fps": _NUM, "duration": _NUM,
        "seed": {"type": "integer", "minimum": 0}, "num_steps": {"type": "integer", "minimum": 1, "maximum": 4},
        "sigma_max": _NUM,
        "attention": {"enum": list(ATTENTION_TYPES), "description": "The attention the video was made with (the "
                      "request's, else the model's default: `sla` for checkpoints fine-tuned with SLA)."},
        "sla_topk": {**_NUM, "description": "Fraction of key blocks SLA kept; present when attention is sparse."},
        "timings": {"type": "object", "additionalProperties": _NUM,
                    "description": "Seconds per stage: queue_wait, image_fetch, text_encode, vae_encode, "
                                   "diffusion, vae_decode, mp4_encode (the part not overlapped with the decode), "
                                   "mp4_encode_total, upload, total."},
        "usage": {
            "type": "object", "additionalProperties": False,
            "required": ["gpu_seconds", "cold_start", "model_load_seconds", "device"],
            "properties": {
                "gpu_seconds": {**_NUM, "description": "Wall time this request held the device, plus the model "
                                                       "load when it was the pod's first request."},
                "cold_start": {"type": "boolean"},
                "model_load_seconds": {**_NUM, "description": "Included in gpu_seconds only when cold_start."},
                "device": {"type": "string"},
            }},
        "completed_at": {"type": "string", "format": "date-time"},
    },
}

FAILED_SCHEMA: dict = {
    "$schema": SCHEMA_DIALECT, "$id": f"{SCHEMA_BASE}/failed.json", "title": "Video failed",
    "description": f"data of `{FAILED}`. `code` is stable (see the list); `retryable` says whether sending the "
                   "same request again later can succeed.",
    "type": "object", "additionalProperties": False, "required": ["request_id", "code", "message", "retryable"],
    "properties": {
        "request_id": {"type": "string"},
        "code": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
        "message": {"type": "string"},
        "retryable": {"type": "boolean"},
        "field": {"type": "string", "description": "The request field at fault, when there is one."},
        "tenant": {"type": "string"},
    },
}

SCHEMAS: dict[str, dict] = {
    T2V_REQUESTED: _request_schema("t2v"),
    I2V_REQUESTED: _request_schema("i2v"),
    COMPLETED: COMPLETED_SCHEMA,
    FAILED: FAILED_SCHEMA,
}
SCHEMA_FILES: dict[str, str] = {T2V_REQUESTED: "t2v.requested.json", I2V_REQUESTED: "i2v.requested.json",
                                COMPLETED: "completed.json", FAILED: "failed.json"}

# Stable failure codes (documented in the AsyncAPI document).
ERROR_CODES: dict[str, str] = {
    "invalid_data": "data is missing, not JSON, or not a JSON object",
    "unsupported_event_type": "the event type is not one this function serves",
    "invalid_request_id": "the CloudEvent id is not usable as a request id ([A-Za-z0-9._-], <= 128)",
    "invalid_tenant": "the tenant extension is not a DNS label",
    "missing_field": "a required field is absent",
    "unknown_field": "a field the schema does not define",
    "invalid_prompt": "prompt is empty or not a string", "prompt_too_long": "prompt exceeds the limit",
    "invalid_model": "model is not a valid name", "unknown_model": "this function does not serve that model",
    "invalid_resolution": "", "invalid_aspect_ratio": "", "invalid_num_frames": "not 4k+1 or out of range",
    "invalid_num_steps": "not 1-4", "invalid_seed": "", "invalid_sigma_max": "", "invalid_attention": "",
    "invalid_sla_topk": "", "invalid_ode": "", "invalid_boundary": "", "invalid_adaptive_resolution": "",
    "invalid_output_prefix": "not 1-4 lowercase segments (no dots, no leading slash)",
    "unsupported_option": "a recognised option this build cannot honour",
    "invalid_image_reference": "image is neither an s3:// URI nor a data:image/...;base64 URI",
    "invalid_image_base64": "the inline image is not valid base64", "image_too_large": "image over the size cap",
    "image_bucket_not_allowed": "the s3:// image is in a bucket the function may not read",
    "image_not_found": "the s3:// image does not exist", "invalid_image": "the bytes are not a decodable image",
    "out_of_memory": "the device ran out of memory for this request (a smaller one may fit)",
    "internal_error": "unexpected failure",
}


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------
_VALIDATORS: dict[str, Any] = {}


def validator(event_type: str):
    """A cached jsonschema validator for the data of `event_type`."""
    if event_type not in _VALIDATORS:
        from jsonschema import Draft202012Validator

        schema = SCHEMAS[event_type]
        Draft202012Validator.check_schema(schema)
        _VALIDATORS[event_type] = Draft202012Validator(schema)
    return _VALIDATORS[event_type]


def _error_code(err) -> tuple[str, str | None, str]:
    """(code, field, message) for a jsonschema ValidationError."""
    path = list(err.absolute_path)
    fld = str(path[0]) if path else None
    if err.validator == "required":
        missing = [p for p in err.validator_value if isinstance(err.instance, dict) and p not in err.instance]
        name = missing[0] if missing else None
        return "missing_field", name, f"required field {name!r} is missing"
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        name = extra[0] if extra else None
        return "unknown_field", name, f"unknown field {name!r} (typo? see the schema)"
    if fld is None:
        return "invalid_data", None, f"data: {err.message}"
    shown = err.message if len(err.message) <= 200 else err.message[:200] + "..."
    if fld == "prompt" and err.validator == "maxLength":
        return "prompt_too_long", fld, f"prompt has {len(err.instance)} characters; the limit is {MAX_PROMPT_CHARS}"
    if fld == "image":
        if err.validator == "maxLength":
            return "image_too_large", fld, f"inline image is {len(err.instance)} characters; the event limit is " \
                                          f"{MAX_INLINE_IMAGE_CHARS}: upload it and pass an s3:// URI"
        if err.validator in ("anyOf", "pattern"):
            return "invalid_image_reference", fld, \
                "image must be an s3://bucket/key URI or a data:image/<type>;base64,... URI"
    if fld == "output_prefix":
        return "invalid_output_prefix", fld, \
            "output_prefix must be 1-4 segments of [a-z0-9][a-z0-9_-]* separated by '/' (no dots, no leading '/')"
    return f"invalid_{fld}", fld, f"{fld}: {shown}"


def validate_data(event_type: str, data: Any) -> None:
    """Raise ContractError (with the most relevant schema violation's code) unless `data` fits the schema."""
    from jsonschema.exceptions import best_match

    err = best_match(validator(event_type).iter_errors(data))
    if err is not None:
        code, fld, message = _error_code(err)
        raise ContractError(message, code=code, field=fld)


# ---------------------------------------------------------------------------------------------------------------
# Parsing requests
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRef:
    """Where an I2V image comes from: an S3 object (fetched by the function) or inline bytes."""
    scheme: str  # "s3" | "inline"
    bucket: str | None = None
    key: str | None = None
    data: bytes | None = None
    media_type: str | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.scheme == "s3" else f"inline:{len(self.data or b'')}B"


@dataclass(frozen=True)
class ParsedRequest:
    request_id: str
    kind: str  # "t2v" | "i2v"
    event_type: str
    tenant: str
    output_prefix: str | None  # the request's optional sub-prefix (under the tenant)
    model: str | None  # the model the producer asked for, if any
    generation: GenerationRequest  # validated; for an s3:// image, `image` is None until fetched
    image: ImageRef | None
    time: datetime  # the request event's time (names the date folder; redelivery maps to the same key)
    source: str
    traceparent: str | None = None
    tracestate: str | None = None
    data: dict = field(default_factory=dict)


def _attr(event, name: str):
    try:
        return event.get_attributes().get(name)
    except AttributeError:  # dict-like events (tests, other SDKs)
        return event.get(name)


def _data(event) -> Any:
    try:
        return event.get_data()
    except AttributeError:
        return event.get("data")


def request_context(event) -> dict:
    """Best-effort (request_id, tenant, traceparent, source, kind) of any event, for failure replies even when
    parsing fails."""
    etype = _attr(event, "type")
    kind = next((k for k, t in REQUEST_TYPES.items() if t == etype), None)
    tenant = _attr(event, TENANT_EXTENSION)
    return {"request_id": str(_attr(event, "id") or ""), "tenant": tenant if isinstance(tenant, str) else None,
            "traceparent": _attr(event, TRACEPARENT_EXTENSION), "kind": kind,
            "source": DEFAULT_SOURCES.get(kind or "", "/turboflow/functions")}


def decode_inline_image(uri: str, max_bytes: int = DEFAULT_MAX_INLINE_IMAGE_BYTES) -> ImageRef:
    head, _, payload = uri.partition(",")
    media_type = head[len("data:"):].split(";")[0]
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise ContractError(f"inline image is over the {max_bytes}-byte cap: upload it and pass an s3:// URI",
                            code="image_too_large", field="image")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ContractError(f"inline image is not valid base64: {e}", code="invalid_image_base64",
                            field="image") from e
    if not raw:
        raise ContractError("inline image is empty", code="invalid_image_base64", field="image")
    if len(raw) > max_bytes:
        raise ContractError(f"inline image has {len(raw)} bytes; the cap is {max_bytes}: upload it and pass an "
                            "s3:// URI", code="image_too_large", field="image")
    return ImageRef("inline", data=raw, media_type=media_type)


MAX_IMAGE_PIXELS = 4096 * 4096


def check_image_header(raw: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Reject an image whose header announces more than `max_pixels` before anything decodes it (a small PNG
    can expand to gigabytes). Undecodable headers are left to the engine's `invalid_image`."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:
                width, height = img.size
    except Image.DecompressionBombError as e:
        raise ContractError(f"image is too large to decode safely: {e}", code="image_too_large",
                            field="image") from e
    except Exception:
        return
    if width * height > max_pixels:
        raise ContractError(f"image is {width}x{height}; at most {max_pixels} pixels are accepted",
                            code="image_too_large", field="image")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket or not key or any(seg in ("", ".", "..") for seg in key.split("/")):
        raise ContractError(f"not a usable s3://bucket/key URI: {uri[:200]!r}", code="invalid_image_reference",
                            field="image")
    return bucket, key


_PLACEHOLDER_IMAGE = None


def _placeholder_image():
    """Stand-in for an s3:// image so every other field is validated before anything is fetched."""
    global _PLACEHOLDER_IMAGE
    if _PLACEHOLDER_IMAGE is None:
        from PIL import Image
        _PLACEHOLDER_IMAGE = Image.new("RGB", (64, 64))
    return _PLACEHOLDER_IMAGE


def parse_request(event, *, kinds: tuple[str, ...] = ("t2v", "i2v"),
                  max_inline_image_bytes: int = DEFAULT_MAX_INLINE_IMAGE_BYTES,
                  model_defaults: dict | None = None) -> ParsedRequest:
    """Validate a request CloudEvent completely (attributes, schema, engine rules, inline image) without I/O.

    `model_defaults`: the serving model's manifest defaults; they fill the request fields the event leaves out.

    Raises ContractError / InvalidRequestError (both carry a stable `code`); the caller answers with
    `failed_event(...)`. An s3:// image is only syntax-checked here; fetching it (and the bucket allow-list) is
    the function's job.
    """
    etype = _attr(event, "type")
    kind = next((k for k, t in REQUEST_TYPES.items() if t == etype), None)
    if kind is None or kind not in kinds:
        served = ", ".join(REQUEST_TYPES[k] for k in kinds)
        raise ContractError(f"event type {etype!r} is not served here (expected {served})",
                            code="unsupported_event_type")
    request_id = _attr(event, "id")
    if not isinstance(request_id, str) or not re.match(REQUEST_ID_PATTERN, request_id):
        raise ContractError(f"event id {str(request_id)[:140]!r} cannot name a request: use 1-128 characters "
                            "[A-Za-z0-9._-] starting with a letter or digit (a UUID is ideal)",
                            code="invalid_request_id")
    tenant = _attr(event, TENANT_EXTENSION)
    if tenant is None or tenant == "":
        tenant = DEFAULT_TENANT
    if not isinstance(tenant, str) or not re.match(TENANT_PATTERN, tenant):
        raise ContractError(f"tenant {str(tenant)[:80]!r} must be a DNS label (lowercase letters, digits, '-')",
                            code="invalid_tenant", field=TENANT_EXTENSION)
    content_type = _attr(event, "datacontenttype")
    data = _data(event)
    if content_type and "json" not in str(content_type).lower():
        raise ContractError(f"datacontenttype {content_type!r} is not JSON", code="invalid_data")
    if isinstance(data, (bytes, bytearray, str)):
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ContractError(f"data is not valid JSON: {e}", code="invalid_data") from e
    if not isinstance(data, dict):
        raise ContractError(f"data must be a JSON object, got {type(data).__name__}", code="invalid_data")
    validate_data(etype, data)

    image_ref = None
    gen_image = None
    if kind == "i2v":
        uri = data["image"]
        if uri.startswith("s3://"):
            bucket, key = parse_s3_uri(uri)
            image_ref = ImageRef("s3", bucket=bucket, key=key)
            gen_image = _placeholder_image()
        else:
            image_ref = decode_inline_image(uri, max_inline_image_bytes)
            check_image_header(image_ref.data)
            gen_image = image_ref.data
    fields = {k: data[k] for k in ("prompt", "resolution", "aspect_ratio", "num_frames", "num_steps", "seed",
                                   "sigma_max", "attention", "sla_topk", "ode", "boundary",
                                   "adaptive_resolution") if k in data}
    fields = {**model_request_defaults(model_defaults), **fields}  # what the request leaves out, the model decides
    generation = GenerationRequest(kind=kind, image=gen_image, **fields).validated()
    if image_ref is not None and image_ref.scheme == "s3":
        generation = generation.replace(image=None)
    elif image_ref is not None:
        # keep the decoded bytes; the engine re-opens them (validated() already proved they decode)
        generation = generation.replace(image=image_ref.data)

    when = _attr(event, "time")
    if isinstance(when, str):
        try:
            when = datetime.fromisoformat(when.replace("Z", "+00:00"))
        except ValueError:
            when = None
    if not isinstance(when, datetime):
        when = datetime.now(timezone.utc)  # documented: without `time`, the date folder is the day it arrived
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return ParsedRequest(request_id=request_id, kind=kind, event_type=etype, tenant=tenant,
                         output_prefix=data.get("output_prefix"), model=data.get("model"), generation=generation,
                         image=image_ref, time=when.astimezone(timezone.utc), source=str(_attr(event, "source")),
                         traceparent=_attr(event, TRACEPARENT_EXTENSION),
                         tracestate=_attr(event, TRACESTATE_EXTENSION), data=data)


# ---------------------------------------------------------------------------------------------------------------
# Building replies
# ---------------------------------------------------------------------------------------------------------------
def _cloudevent(attributes: dict, data: dict):
    from cloudevents.core.v1.event import CloudEvent

    return CloudEvent(attributes={k: v for k, v in attributes.items() if v is not None}, data=data)


def reply_id(request_id: str, event_type: str, *extra: str) -> str:
    """Deterministic id of a reply: new (never the request's id), equal for a redelivered request."""
    return str(uuid.uuid5(_ID_NAMESPACE, "/".join((request_id, event_type, *extra))))


def completed_event(request_event, data: dict, *, source: str | None = None, time: datetime | None = None):
    """`io.turboflow.video.completed` answering `request_event` (a CloudEvent or a ParsedRequest).

    The id is derived from the request id, `time` defaults to data["completed_at"]: a replayed completion is
    equal to the original."""
    if isinstance(request_event, ParsedRequest):
        ctx = {"request_id": request_event.request_id, "tenant": request_event.tenant,
               "traceparent": request_event.traceparent, "kind": request_event.kind,
               "source": DEFAULT_SOURCES[request_event.kind]}
        tracestate = request_event.tracestate
    else:
        ctx = request_context(request_event)
        tracestate = _attr(request_event, TRACESTATE_EXTENSION)
    request_id = data.get("request_id") or ctx["request_id"]
    if time is None and data.get("completed_at"):
        time = datetime.fromisoformat(str(data["completed_at"]).replace("Z", "+00:00"))
    attrs = {"type": COMPLETED, "source": source or ctx["source"], "id": reply_id(request_id, COMPLETED),
             "subject": request_id, "datacontenttype": "application/json",
             "dataschema": SCHEMAS[COMPLETED]["$id"], "time": time or datetime.now(timezone.utc),
             TENANT_EXTENSION: data.get("tenant") or ctx["tenant"],
             TRACEPARENT_EXTENSION: ctx["traceparent"], TRACESTATE_EXTENSION: tracestate}
    return _cloudevent(attrs, data)


def failed_event(request_id: str, code: str, message: str, retryable: bool, *, source: str,
                 subject: str | None = None, tenant: str | None = None, traceparent: str | None = None,
                 field: str | None = None):
    """`io.turboflow.video.failed` for `request_id`. Same (source, request, code) -> same event id."""
    data = {"request_id": request_id or "", "code": code, "message": message, "retryable": bool(retryable)}
    if field:
        data["field"] = field
    if tenant:
        data["tenant"] = tenant
    attrs = {"type": FAILED, "source": source, "id": reply_id(request_id or str(uuid.uuid4()), FAILED, source, code),
             "subject": subject or request_id or None, "datacontenttype": "application/json",
             "dataschema": SCHEMAS[FAILED]["$id"], "time": datetime.now(timezone.utc),
             TENANT_EXTENSION: tenant, TRACEPARENT_EXTENSION: traceparent}
    return _cloudevent(attrs, data)


def failed_from_error(error: BaseException, ctx: dict, *, source: str | None = None):
    """A failed reply for a typed error (TurboflowError) or anything else (internal_error)."""
    if isinstance(error, TurboflowError):
        code, message, retryable, fld = error.code, error.message, error.retryable, error.field
    else:
        code, message, retryable, fld = "internal_error", f"{type(error).__name__}: {error}", False, None
    tenant = ctx.get("tenant")
    if tenant is not None and not re.match(TENANT_PATTERN, str(tenant)):
        tenant = None  # never echo an invalid tenant into routing attributes
    return failed_event(ctx.get("request_id") or "", code, message, retryable,
                        source=source or ctx.get("source") or "/turboflow/functions", tenant=tenant,
                        traceparent=ctx.get("traceparent"), field=fld)
