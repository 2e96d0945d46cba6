"""The event contract: request parsing and reply builders, with the JSON Schemas of every data payload (defined in
event_schemas.py, re-exported here).

This module is the single source of truth. `eventing/schemas/*.json` and `docs/events.asyncapi.yaml` are generated
from it (`python -m turboflow.eventing.asyncapi --write`; tests/test_contracts.py fails when they are stale).

Requests
    `io.turboflow.video.t2v.requested` / `io.turboflow.video.i2v.requested`. The CloudEvent `id` is the request id
    (it names the output object). CloudEvents identity is `source` + `id`: a request id reused (by any source, in
    the same tenant and prefix) for a different input fails with `id_conflict`; the same input replays. Extension
    `tenant` selects the tenant (default "default"); `traceparent` is carried onto the reply.
Replies (the HTTP response to the request, re-published by the broker)
    `io.turboflow.video.completed`, `io.turboflow.video.failed`: `subject` = request id, extensions `tenant` and
    `traceparent` kept. Their ids are derived from the request's (source, id) with the deployment's signing key
    (eventing/signing.py; uuid5 over a public namespace without one), so the reply to a redelivered request is the
    *same* event and JetStream's Nats-Msg-Id de-duplication drops it. With a key, replies are signed
    (`turboflowsig`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

from turboflow.engine.fields import ENGINE_FIELDS
from turboflow.engine.request import GenerationRequest, ValidatedRequest
from turboflow.errors import TurboflowError

# schemas, patterns, error codes and validation live in event_schemas.py; this module re-exports them
from .event_schemas import (  # noqa: F401
    COMPLETED_SCHEMA,
    DATA_URI_PATTERN,
    DEFAULT_MAX_INLINE_IMAGE_BYTES,
    DEFAULT_SOURCES,
    ERROR_CODES,
    FAILED_SCHEMA,
    IMPLEMENTED_ATTENTION,
    MAX_INLINE_IMAGE_CHARS,
    MODEL_PATTERN,
    OUTPUT_PREFIX_PATTERN,
    PREFIX_SEGMENT,
    REQUEST_ID_PATTERN,
    S3_URI_PATTERN,
    SCHEMA_BASE,
    SCHEMA_DIALECT,
    SCHEMA_FILES,
    SCHEMAS,
    TENANT_PATTERN,
    TRACEPARENT_EXTENSION,
    TRACESTATE_EXTENSION,
    UNAVAILABLE_ATTENTION,
    ContractError,
    full_match,
    validate_data,
    validator,
)
from .signing import canonical_json, derive_id, sign_attributes
from .types import COMPLETED, DEFAULT_TENANT, FAILED, LIFECYCLE_TYPES, POD_TYPES, REQUEST_TYPES, TENANT_EXTENSION


# ---------------------------------------------------------------------------------------------------------------
# Parsing requests
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRef:
    """Where an I2V image comes from: an object in the output store (an S3 object, or a file under a local store's
    directory: fetched by the function through the store) or inline bytes."""

    scheme: str  # "s3" | "file" | "inline"
    bucket: str | None = None
    key: str | None = None
    data: bytes | None = None
    media_type: str | None = None

    @property
    def is_reference(self) -> bool:
        """True when the bytes live in a store and are fetched later (not inline)."""
        return self.scheme in REFERENCE_SCHEMES

    @property
    def uri(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}"
        if self.scheme == "file":
            return "file://" + quote(self.key or "")
        return f"inline:{len(self.data or b'')}B"


REFERENCE_SCHEMES = ("s3", "file")


@dataclass(frozen=True)
class ParsedRequest:
    request_id: str
    kind: str  # "t2v" | "i2v"
    event_type: str
    tenant: str
    output_prefix: str | None  # the request's optional sub-prefix (under the tenant)
    model: str | None  # the model the producer asked for, if any
    # the one validated request; for an s3:// or file:// image it is `image_pending` until the function fetches
    # the bytes and completes it (`generation.with_image(raw)`)
    generation: ValidatedRequest
    image: ImageRef | None
    time: datetime | None  # the request event's time (names the date folder), None when the event has none
    source: str
    traceparent: str | None = None
    tracestate: str | None = None
    data: dict = field(default_factory=dict)
    input_sha256: str = ""  # canonical hash of the input: a reused id with another input is an id_conflict


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
    source = _attr(event, "source")
    return {
        "request_id": str(_attr(event, "id") or ""),
        "tenant": tenant if isinstance(tenant, str) else None,
        "traceparent": _attr(event, TRACEPARENT_EXTENSION),
        "kind": kind,
        "source": DEFAULT_SOURCES.get(kind or "", "/turboflow/functions"),
        "request_source": source if isinstance(source, str) else "",
    }


def derived_seed(request_id: str) -> int:
    """The seed of a request that leaves `seed` out: in [1, 2^63-1], derived from the request id, so a redelivery
    that must generate again reproduces the same video."""
    digest = hashlib.sha256(f"turboflow-seed/{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63 - 2) + 1


def input_digest(*, source: str, tenant: str, kind: str, data: dict, image: ImageRef | None) -> str:
    """sha256 over the canonical JSON of what the request asks for: its source, tenant, kind and data, an inline
    image by its decoded bytes' digest (an s3:// image by its reference). Equal for a redelivery, different for
    another request reusing the id."""
    fields = dict(data)
    if image is not None and image.scheme == "inline":
        fields["image"] = "sha256:" + hashlib.sha256(image.data or b"").hexdigest()
    text = canonical_json({"source": source, "tenant": tenant, "kind": kind, "data": fields})
    return hashlib.sha256(text).hexdigest()


def parse_time(value) -> datetime | None:
    """The request's `time` attribute as an aware UTC datetime; None when absent; ContractError when garbled."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ContractError(
                f"time {value[:60]!r} is not an RFC 3339 timestamp", code="invalid_time", field="time"
            ) from None
    if not isinstance(value, datetime):
        raise ContractError("time is not an RFC 3339 timestamp", code="invalid_time", field="time")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def decode_inline_image(uri: str, max_bytes: int = DEFAULT_MAX_INLINE_IMAGE_BYTES) -> ImageRef:
    head, _, payload = uri.partition(",")
    media_type = head[len("data:") :].split(";")[0]
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise ContractError(
            f"inline image is over the {max_bytes}-byte cap: upload it and pass an s3:// URI",
            code="image_too_large",
            field="image",
        )
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ContractError("inline image is not valid base64", code="invalid_image_base64", field="image") from e
    if not raw:
        raise ContractError("inline image is empty", code="invalid_image_base64", field="image")
    if len(raw) > max_bytes:
        raise ContractError(
            f"inline image has {len(raw)} bytes; the cap is {max_bytes}: upload it and pass an s3:// URI",
            code="image_too_large",
            field="image",
        )
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
        raise ContractError("image has too many pixels to decode safely", code="image_too_large", field="image") from e
    except Exception:
        return
    if width * height > max_pixels:
        raise ContractError(
            f"image is {width}x{height}; at most {max_pixels} pixels are accepted",
            code="image_too_large",
            field="image",
        )


def parse_file_uri(uri: str) -> str:
    """The absolute path of a `file:///path` (or `file://localhost/path`) image reference, percent-decoded; a
    ContractError unless every segment is a plain name (no empty, `.` or `..` segment, no NUL). Whether the path
    lies under the local store's directory, and under the tenant's prefix there, is the store's check."""
    rest = uri[len("file://") :]
    if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]
    path = unquote(rest)
    segments = path.split("/")[1:]
    if not path.startswith("/") or not segments or any(seg in ("", ".", "..") or "\0" in seg for seg in segments):
        raise ContractError(
            f"not a usable file:///path URI: {uri[:200]!r}", code="invalid_image_reference", field="image"
        )
    return path


def parse_s3_uri(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket or not key or any(seg in ("", ".", "..") for seg in key.split("/")):
        raise ContractError(
            f"not a usable s3://bucket/key URI: {uri[:200]!r}", code="invalid_image_reference", field="image"
        )
    return bucket, key


def parse_request(
    event,
    *,
    kinds: tuple[str, ...] = ("t2v", "i2v"),
    max_inline_image_bytes: int = DEFAULT_MAX_INLINE_IMAGE_BYTES,
    model_defaults: dict | None = None,
    has_time: bool = True,
    family=None,
) -> ParsedRequest:
    """Validate a request CloudEvent completely (attributes, schema, engine rules, inline image) without I/O.

    `model_defaults`: the serving model's manifest defaults; they fill the request fields the event leaves out.
    `has_time`: False when the request carried no `time` (the CloudEvents SDK fills one in when decoding; the
    function's HTTP guard knows better): the output key then has no date folders.
    `family`: the serving model's family spec (engine/families): its frame rule and defaults apply.
    An inline image is decoded here, once (`generation.request.image` is the RGB image the pipeline uses).

    Raises ContractError / InvalidRequestError (both carry a stable `code`); the caller answers with
    `failed_event(...)`. An s3:// image is only syntax-checked here; fetching it (and the bucket allow-list) is
    the function's job.
    """
    etype = _attr(event, "type")
    kind = next((k for k, t in REQUEST_TYPES.items() if t == etype), None)
    if kind is None or kind not in kinds:
        served = ", ".join(REQUEST_TYPES[k] for k in kinds)
        raise ContractError(
            f"event type {etype!r} is not served here (expected {served})", code="unsupported_event_type"
        )
    request_id = _attr(event, "id")
    if not full_match(REQUEST_ID_PATTERN, request_id):
        raise ContractError(
            f"event id {str(request_id)[:140]!r} cannot name a request: use 1-128 characters "
            "[A-Za-z0-9._-] starting with a letter or digit (a UUID is ideal)",
            code="invalid_request_id",
        )
    tenant = _attr(event, TENANT_EXTENSION)
    if tenant is None or tenant == "":
        tenant = DEFAULT_TENANT
    if not full_match(TENANT_PATTERN, tenant):
        raise ContractError(
            f"tenant {str(tenant)[:80]!r} must be a DNS label (lowercase letters, digits, '-')",
            code="invalid_tenant",
            field=TENANT_EXTENSION,
        )
    content_type = _attr(event, "datacontenttype")
    data = _data(event)
    if content_type and "json" not in str(content_type).lower():
        raise ContractError(f"datacontenttype {content_type!r} is not JSON", code="invalid_data")
    if isinstance(data, (bytes, bytearray, str)):
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ContractError(f"data is not valid JSON: {str(e)[:200]}", code="invalid_data") from e
    if not isinstance(data, dict):
        raise ContractError(f"data must be a JSON object, got {type(data).__name__}", code="invalid_data")
    attention = data.get("attention")
    if isinstance(attention, str) and attention in UNAVAILABLE_ATTENTION:
        raise ContractError(UNAVAILABLE_ATTENTION[attention], code="unsupported_option", field="attention")
    validate_data(etype, data)
    when = parse_time(_attr(event, "time")) if has_time else None

    image_ref = None
    image = None
    if kind == "i2v":
        uri = data["image"]
        if uri.startswith("s3://"):
            bucket, key = parse_s3_uri(uri)
            image_ref = ImageRef("s3", bucket=bucket, key=key)
        elif uri.startswith("file://"):
            image_ref = ImageRef("file", key=parse_file_uri(uri))
        else:
            image_ref = decode_inline_image(uri, max_inline_image_bytes)
            check_image_header(image_ref.data)  # a header peek: the one decode is the validation's
            image = image_ref.data
    fields = {name: data[name] for name in ENGINE_FIELDS if name in data and name != "image"}
    if "seed" not in data:  # "pick one": derived from the request id, so a redelivery reproduces the video
        fields["seed"] = derived_seed(request_id)
    # the one validation step: the serving model's defaults fill what the request leaves out, its family
    # (engine/families) decides the frame rule (without one, the kind's); a store image is completed later
    generation = GenerationRequest(kind=kind, image=image, **fields).validated(
        family, model_defaults, image_pending=image_ref is not None and image_ref.is_reference
    )
    source = str(_attr(event, "source") or "")
    return ParsedRequest(
        request_id=request_id,
        kind=kind,
        event_type=etype,
        tenant=tenant,
        output_prefix=data.get("output_prefix"),
        model=data.get("model"),
        generation=generation,
        image=image_ref,
        time=when,
        source=source,
        traceparent=_attr(event, TRACEPARENT_EXTENSION),
        tracestate=_attr(event, TRACESTATE_EXTENSION),
        data=data,
        input_sha256=input_digest(source=source, tenant=tenant, kind=kind, data=data, image=image_ref),
    )


# ---------------------------------------------------------------------------------------------------------------
# Building replies
# ---------------------------------------------------------------------------------------------------------------
def _cloudevent(attributes: dict, data: dict):
    from cloudevents.core.v1.event import CloudEvent

    return CloudEvent(attributes={k: v for k, v in attributes.items() if v is not None}, data=data)


def reply_id(
    request_id: str, event_type: str, *extra: str, request_source: str = "", signing_key: bytes | None = None
) -> str:
    """Deterministic id of a reply: new (never the request's id), equal for a redelivered request. Derived from the
    request's (source, id) with the signing key, so nobody without it can predict (and pre-empt) it."""
    return derive_id(signing_key, request_source, request_id, event_type, *extra)


def _signed_cloudevent(attributes: dict, data: dict, signing_key: bytes | None):
    present = {k: v for k, v in attributes.items() if v is not None}
    return _cloudevent(sign_attributes(signing_key, present, data), data)


def completed_event(
    request_event,
    data: dict,
    *,
    source: str | None = None,
    time: datetime | None = None,
    signing_key: bytes | None = None,
):
    """`io.turboflow.video.completed` answering `request_event` (a CloudEvent or a ParsedRequest).

    The id is derived from the request's (source, id), `time` defaults to data["completed_at"]: a replayed
    completion is equal to the original. With `signing_key` the event carries the `turboflowsig` signature."""
    if isinstance(request_event, ParsedRequest):
        ctx = {
            "request_id": request_event.request_id,
            "tenant": request_event.tenant,
            "traceparent": request_event.traceparent,
            "kind": request_event.kind,
            "source": DEFAULT_SOURCES[request_event.kind],
            "request_source": request_event.source,
        }
        tracestate = request_event.tracestate
    else:
        ctx = request_context(request_event)
        tracestate = _attr(request_event, TRACESTATE_EXTENSION)
    request_id = data.get("request_id") or ctx["request_id"]
    if time is None and data.get("completed_at"):
        time = datetime.fromisoformat(str(data["completed_at"]).replace("Z", "+00:00"))
    event_id = reply_id(request_id, COMPLETED, request_source=ctx["request_source"], signing_key=signing_key)
    attrs = {
        "type": COMPLETED,
        "source": source or ctx["source"],
        "id": event_id,
        "subject": request_id,
        "datacontenttype": "application/json",
        "dataschema": SCHEMAS[COMPLETED]["$id"],
        "time": time or datetime.now(UTC),
        TENANT_EXTENSION: data.get("tenant") or ctx["tenant"],
        TRACEPARENT_EXTENSION: ctx["traceparent"],
        TRACESTATE_EXTENSION: tracestate,
    }
    return _signed_cloudevent(attrs, data, signing_key)


def failed_event(
    request_id: str,
    code: str,
    message: str,
    retryable: bool,
    *,
    source: str,
    subject: str | None = None,
    tenant: str | None = None,
    traceparent: str | None = None,
    field: str | None = None,
    request_source: str | None = None,
    signing_key: bytes | None = None,
):
    """`io.turboflow.video.failed` for `request_id` (sent by `request_source`). Same (request source, request id,
    reply source, code) -> same event id; with `signing_key` the id is unguessable and the event signed."""
    data = {"request_id": request_id or "", "code": code, "message": message, "retryable": bool(retryable)}
    if field:
        data["field"] = field
    if tenant:
        data["tenant"] = tenant
    if request_id:
        event_id = reply_id(
            request_id, FAILED, source, code, request_source=request_source or "", signing_key=signing_key
        )
    else:  # nothing identifies the request: a fresh id (there is no redelivery to de-duplicate against)
        event_id = str(uuid.uuid4())
    attrs = {
        "type": FAILED,
        "source": source,
        "id": event_id,
        "subject": subject or request_id or None,
        "datacontenttype": "application/json",
        "dataschema": SCHEMAS[FAILED]["$id"],
        "time": datetime.now(UTC),
        TENANT_EXTENSION: tenant,
        TRACEPARENT_EXTENSION: traceparent,
    }
    return _signed_cloudevent(attrs, data, signing_key)


def failed_from_error(error: BaseException, ctx: dict, *, source: str | None = None, signing_key: bytes | None = None):
    """A failed reply for a typed error (TurboflowError) or anything else (internal_error, details only in logs)."""
    if isinstance(error, TurboflowError):
        code, message, retryable, fld = error.code, error.message, error.retryable, error.field
    else:
        code, message, retryable, fld = (
            "internal_error",
            "internal error; the function's logs have details",
            False,
            None,
        )
    tenant = ctx.get("tenant")
    if tenant is not None and not full_match(TENANT_PATTERN, tenant):
        tenant = None  # never echo an invalid tenant into routing attributes
    request_id = ctx.get("request_id") or ""
    if not full_match(REQUEST_ID_PATTERN, request_id):  # echo it, but never a control character into headers
        request_id = "".join(c for c in request_id if c.isprintable())[:128]
    return failed_event(
        request_id,
        code,
        message,
        retryable,
        source=source or ctx.get("source") or "/turboflow/functions",
        tenant=tenant,
        traceparent=ctx.get("traceparent"),
        field=fld,
        request_source=ctx.get("request_source"),
        signing_key=signing_key,
    )


def lifecycle_event(
    event_type: str,
    request,
    data: dict,
    *,
    source: str,
    signing_key: bytes | None = None,
    sequence: str = "",
    time: datetime | None = None,
):
    """A lifecycle event (started, progress, cancelled; also usable for completed/failed) about `request`: a
    ParsedRequest, or a context dict with request_id, tenant, kind and optionally traceparent, request_source.

    `data` gets request_id, tenant and kind filled in from the request. The id is derived from the request's
    (source, id), the type and `sequence` (e.g. a progress event's stage/step), so a redelivered request sends
    events with the same ids and the broker drops the copies; with `signing_key` the event is signed."""
    if event_type not in LIFECYCLE_TYPES:
        raise ValueError(f"{event_type!r} is not a lifecycle event type")
    if isinstance(request, ParsedRequest):
        ctx = {
            "request_id": request.request_id,
            "tenant": request.tenant,
            "kind": request.kind,
            "traceparent": request.traceparent,
            "request_source": request.source,
        }
    else:
        ctx = dict(request)
    body = {"request_id": ctx["request_id"], "tenant": ctx["tenant"], "kind": ctx["kind"], **data}
    event_id = reply_id(
        ctx["request_id"],
        event_type,
        source,
        sequence,
        request_source=ctx.get("request_source") or "",
        signing_key=signing_key,
    )
    attrs = {
        "type": event_type,
        "source": source,
        "id": event_id,
        "subject": ctx["request_id"],
        "datacontenttype": "application/json",
        "dataschema": SCHEMAS[event_type]["$id"],
        "time": time or datetime.now(UTC),
        TENANT_EXTENSION: ctx["tenant"],
        TRACEPARENT_EXTENSION: ctx.get("traceparent"),
    }
    return _signed_cloudevent(attrs, body, signing_key)


def pod_event(
    event_type: str,
    data: dict,
    *,
    source: str,
    signing_key: bytes | None = None,
    time: datetime | None = None,
):
    """A pod event (`io.turboflow.pod.ready` / `.stopped`) about the pod `data["pod"]`, whose process started at
    `data["process_started_at"]`. The id is derived from (source, pod, process start, type): a re-send from the
    same process has the same id (the broker drops the copy), while a restarted container (same pod name, new
    process) reports a new load under a new id. No tenant: a pod serves every tenant."""
    if event_type not in POD_TYPES:
        raise ValueError(f"{event_type!r} is not a pod event type")
    pod = str(data.get("pod") or "")
    if not pod:
        raise ValueError("a pod event needs data['pod']")
    event_id = derive_id(signing_key, "pod", source, pod, str(data.get("process_started_at") or ""), event_type)
    attrs = {
        "type": event_type,
        "source": source,
        "id": event_id,
        "subject": pod,
        "datacontenttype": "application/json",
        "dataschema": SCHEMAS[event_type]["$id"],
        "time": time or datetime.now(UTC),
    }
    return _signed_cloudevent(attrs, data, signing_key)
