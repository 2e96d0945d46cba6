"""A submitted request body -> a validated `Submission` and its request CloudEvent, or a 422 listing every field
at fault. Nothing is emitted for an invalid request.

Validation is the functions' own: the JSON Schema of the task's request event (engine/fields.py is the one field
table), then `eventing.contracts.parse_request` on the very event that will be emitted (engine rules such as 4k+1
frames, the inline image's size and header). The input hash is the one the function computes from that event
(`input_sha256`), so an id reused with another input is a 409 here and an `id_conflict` there alike. On top, the
gateway's own rules: no `tenant` in the body (the key decides), I2V images only from the tenant's upload prefix
or a shared prefix (decided on the URI, before anything is read), webhook URLs http(s) and, unless allowed, not to
private addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from turboflow.engine.fields import FIELDS, TASKS, fields_for
from turboflow.errors import TurboflowError
from turboflow.eventing.contracts import parse_request, parse_s3_uri
from turboflow.eventing.event_schemas import (
    REQUEST_ID_PATTERN,
    UNAVAILABLE_ATTENTION,
    _error_code,
    full_match,
    validator,
)
from turboflow.eventing.nats_binding import ExactCloudEvent
from turboflow.eventing.types import GATEWAY_SOURCE, REQUEST_TYPES, TENANT_EXTENSION
from turboflow.settings import Settings
from turboflow.storage import keys as storage_keys

from .problems import ApiProblem

SOURCE = GATEWAY_SOURCE
WEBHOOK_EVENTS = ("queued", "started", "progress", "completed", "failed", "cancelled")
DEFAULT_WEBHOOK_EVENTS = ("completed", "failed", "cancelled")
MAX_WEBHOOK_URL_CHARS = 2048
MAX_IDEMPOTENCY_KEY_CHARS = 255
# body keys that are the gateway's, not the request event's
GATEWAY_FIELDS = ("task", "id", "webhook", "webhook_events")
# a 422 whose only error is one of these carries it as the problem's code (a policy refusal, not a typo)
HEADLINE_CODES = ("image_not_allowed", "image_bucket_not_allowed", "webhook_not_allowed")


@dataclass(frozen=True)
class Submission:
    """A validated request: what to store, emit and compare."""

    id: str
    task: str
    data: dict  # the request event's data
    webhook: dict | None  # {"url", "events", "attempts": []}
    input_sha256: str
    id_given: bool  # the client chose the id (reuse is then a replay or an id_conflict)


def error(field: str | None, code: str, message: str) -> dict:
    return {"field": field, "code": code, "message": message}


def raise_invalid(errors: list[dict]) -> None:
    """Raise the problem for `errors`: 413 for an image over its limit, else 422 (see HEADLINE_CODES)."""
    if any(e["code"] == "image_too_large" for e in errors):
        raise ApiProblem("payload_too_large", errors[0]["message"], errors=errors)
    code = errors[0]["code"] if len(errors) == 1 and errors[0]["code"] in HEADLINE_CODES else "invalid_request"
    raise ApiProblem.invalid(errors, code=code)


def request_event(task: str, request_id: str, tenant: str, data: dict, accepted_at: datetime) -> ExactCloudEvent:
    """`io.turboflow.video.<task>.requested` from the gateway: id = request id, the key's tenant, accept time."""
    return ExactCloudEvent(
        {
            "type": REQUEST_TYPES[task],
            "source": SOURCE,
            "id": request_id,
            "time": accepted_at,
            "datacontenttype": "application/json",
            TENANT_EXTENSION: tenant,
        },
        data,
    )


def image_refusal(uri: str, tenant: str, settings: Settings) -> dict | None:
    """Why `tenant` may not use the image reference `uri` (an `errors` entry), or None. Mirrors the S3 store's
    rule (storage/s3.py): a shared prefix, or the tenant's `{image_prefix}/{tenant}/` in an input bucket."""
    if uri.startswith("data:"):
        return None
    if not uri.startswith("s3://"):
        return error("image", "image_not_allowed", "the gateway takes s3:// images, data: URIs or an upload")
    try:
        bucket, key = parse_s3_uri(uri)
    except TurboflowError as e:
        return error("image", e.code, e.message)
    if not storage_keys.is_plain_key(key):
        return error("image", "invalid_image_reference", "image key is not a plain object key")
    if any(bucket == b and key.startswith(p) for b, p in settings.shared_image_prefixes):
        return None
    buckets = settings.input_buckets or ((settings.bucket,) if settings.bucket else ())
    if bucket not in buckets:
        return error("image", "image_bucket_not_allowed", f"images may only be read from {', '.join(buckets)}")
    if not storage_keys.tenant_may_read(key, tenant, settings.image_prefix, ()):
        return error(
            "image",
            "image_not_allowed",
            f"image must be under s3://<input bucket>/{settings.image_prefix}/{tenant}/ or a shared prefix",
        )
    return None


def _schema_errors(task: str, data: dict) -> list[dict]:
    """Every schema violation of the request data (the event's own schema), one per (field, code)."""
    found, seen = [], set()
    attention = data.get("attention")
    if isinstance(attention, str) and attention in UNAVAILABLE_ATTENTION:
        found.append(error("attention", "unsupported_option", UNAVAILABLE_ATTENTION[attention]))
        seen.add("attention")
    for err in validator(REQUEST_TYPES[task]).iter_errors(data):
        code, fld, message = _error_code(err)
        if fld in seen and fld is not None:
            continue
        seen.add(fld)
        found.append(error(fld, code, message))
    return sorted(found, key=lambda e: (e["field"] or "", e["code"]))


def _webhook(body: dict, errors: list[dict]) -> dict | None:
    url, events = body.get("webhook"), body.get("webhook_events")
    if url is None:
        if events is not None:
            errors.append(error("webhook_events", "invalid_webhook_events", "webhook_events needs a webhook URL"))
        return None
    if not isinstance(url, str) or not url or len(url) > MAX_WEBHOOK_URL_CHARS:
        errors.append(error("webhook", "invalid_webhook", f"webhook must be a URL of 1-{MAX_WEBHOOK_URL_CHARS} chars"))
        return None
    if events is None:
        events = list(DEFAULT_WEBHOOK_EVENTS)
    if (
        not isinstance(events, list)
        or not events
        or not all(isinstance(e, str) and e in WEBHOOK_EVENTS for e in events)
        or len(set(events)) != len(events)
    ):
        errors.append(
            error(
                "webhook_events",
                "invalid_webhook_events",
                f"webhook_events must be a non-empty list of distinct names from {', '.join(WEBHOOK_EVENTS)}",
            )
        )
        return None
    return {"url": url, "events": events, "attempts": []}


def validate(body: Any, *, tenant: str, settings: Settings, image_uri: str | None = None) -> Submission:
    """The Submission of `body` (parsed JSON) for `tenant`; ApiProblem 422/413 listing every problem.

    `image_uri`: where a multipart upload will be stored (the request must then not name an image itself)."""
    if not isinstance(body, dict):
        raise_invalid([error(None, "invalid_data", "the body must be a JSON object")])
    errors: list[dict] = []
    if "tenant" in body:
        errors.append(error("tenant", "tenant_not_allowed", "the API key decides the tenant: leave `tenant` out"))
    task = body.get("task")
    if task not in TASKS:
        errors.append(error("task", "missing_field" if task is None else "invalid_task", "task must be t2v or i2v"))
    request_id = body.get("id")
    if request_id is not None and not full_match(REQUEST_ID_PATTERN, request_id):
        message = "id must be 1-128 characters [A-Za-z0-9._-] starting with a letter or digit"
        errors.append(error("id", "invalid_request_id", message))
    webhook = _webhook(body, errors)
    data = {k: v for k, v in body.items() if k not in GATEWAY_FIELDS and k != "tenant"}
    if image_uri is not None:
        if "image" in data:
            errors.append(error("image", "invalid_image_reference", "give the image as a file part or in the JSON"))
        data["image"] = image_uri
    if task not in TASKS:
        unknown = sorted(k for k in data if k not in FIELDS)
        errors += [error(k, "unknown_field", f"unknown field {k!r} (typo? see the schema)") for k in unknown]
        raise_invalid(errors)
    if task == "t2v" and "image" in data:
        names = ", ".join(f.name for f in fields_for("t2v"))
        errors.append(error("image", "unexpected_image", f"a t2v request takes no image (fields: {names})"))
        data.pop("image")
    errors += _schema_errors(task, data)
    if not errors and task == "i2v":
        refusal = image_refusal(data["image"], tenant, settings)
        if refusal is not None:
            errors.append(refusal)
    if errors:
        raise_invalid(errors)
    request_id = request_id or uuid.uuid4().hex
    event = request_event(task, request_id, tenant, data, datetime.now(UTC))
    try:
        parsed = parse_request(event, max_inline_image_bytes=settings.max_inline_image_bytes)
    except TurboflowError as e:
        raise_invalid([error(e.field, e.code, e.message)])
    return Submission(
        id=request_id,
        task=task,
        data=data,
        webhook=webhook,
        input_sha256=parsed.input_sha256,
        id_given="id" in body,
    )


def valid_idempotency_key(value: str) -> bool:
    return 0 < len(value) <= MAX_IDEMPOTENCY_KEY_CHARS and value.isascii() and value.isprintable()


async def check_webhook_url(url: str, *, allow_private: bool) -> None:
    """ApiProblem 422 `webhook_not_allowed` unless `url` is http(s) with a host that (unless `allow_private`)
    resolves only to public addresses: a webhook must not reach into the cluster (SSRF)."""

    def refuse(reason: str):
        return ApiProblem(
            "webhook_not_allowed",
            f"webhook URL refused: {reason}",
            status=422,
            errors=[error("webhook", "webhook_not_allowed", reason)],
        )

    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise refuse("not a URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise refuse("only http:// and https:// URLs with a host are accepted")
    if parts.username or parts.password:
        raise refuse("credentials in the URL are not accepted (sign with the webhook secret instead)")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise refuse("the URL has spaces or control characters")
    if allow_private:
        return
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port or 443, proto=6), timeout=5
            )
        except (OSError, TimeoutError, UnicodeError):
            raise refuse(f"host {host[:100]!r} does not resolve") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses:
        if not address.is_global or address.is_multicast:
            raise refuse(f"host {host[:100]!r} is a private, loopback or link-local address")
