"""`/v1/videos`: create, read, list and cancel video requests (tenant-scoped), and `/healthz`.

Create, in order: authenticate (the key's tenant) -> read JSON or multipart -> validate (422, nothing emitted) ->
webhook URL check -> Idempotency-Key claim / client id reuse (200 replay or 409) -> per-tenant limit (429) ->
store an uploaded image -> create the queued record -> emit the request event (a failed emit marks the record
failed and answers 503, so no request is left that nobody will run) -> 201.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import json
import logging
from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse

from turboflow.engine.fields import FIELDS, TASKS, fields_for
from turboflow.eventing.contracts import lifecycle_event
from turboflow.eventing.event_schemas import REQUEST_ID_PATTERN, full_match
from turboflow.eventing.requeststate import RequestRecord, now_rfc3339, submitted_fields
from turboflow.eventing.types import CANCELLED

from . import requests as submissions
from . import uploads
from .app import GatewayService, get_service
from .auth import current_tenant
from .emit import BrokerUnavailable
from .problems import ApiProblem, responses
from .resources import Video, VideoList, video_resource

log = logging.getLogger(__name__)

MAX_JSON_BODY_BYTES = 2 << 20  # an inline image is at most 1 MiB of base64 (engine/fields.py)
MAX_FORM_OVERHEAD_BYTES = 2 << 20
RETRY_AFTER_SECONDS = 10

router = APIRouter(prefix="/v1/videos", tags=["videos"])
health_router = APIRouter(tags=["operations"])


def _request_body_schema() -> dict:
    """The JSON body: the gateway's fields plus every request field of either task (engine/fields.py)."""
    properties = {
        "task": {"type": "string", "enum": list(TASKS), "description": "t2v (text-to-video) or i2v (image-to-video)"},
        "id": {
            "type": "string",
            "pattern": REQUEST_ID_PATTERN,
            "description": "Optional request id (default: generated). Reusing one with the same input returns the "
            "existing request (200); with another input it is a 409 `id_conflict`.",
        },
        **{f.name: copy.deepcopy(f.json_schema()) for f in FIELDS.values()},
        "webhook": {
            "type": "string",
            "format": "uri",
            "maxLength": submissions.MAX_WEBHOOK_URL_CHARS,
            "description": "http(s) URL that receives signed Standard Webhooks for this request.",
        },
        "webhook_events": {
            "type": "array",
            "items": {"type": "string", "enum": list(submissions.WEBHOOK_EVENTS)},
            "uniqueItems": True,
            "minItems": 1,
            "description": "Which changes are sent (default: completed, failed, cancelled).",
        },
    }
    i2v_only = [f.name for f in fields_for("i2v") if "t2v" not in f.tasks]
    properties["image"]["description"] = f"I2V only. {properties['image'].get('description', '')}"
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["task", "prompt"],
        "properties": properties,
        "description": f"Fields only an i2v request takes: {', '.join(i2v_only)}. The tenant is the API key's.",
    }


CREATE_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": _request_body_schema()},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["request", "image"],
                "properties": {
                    "request": {"type": "string", "description": "The JSON body above, as text (task i2v)."},
                    "image": {"type": "string", "format": "binary", "description": "PNG, JPEG, WebP, GIF or BMP."},
                },
            }
        },
    },
}


def _base_url(service: GatewayService, request: Request) -> str:
    return service.public_url(request)


async def _resource(service: GatewayService, request: Request, record: RequestRecord) -> dict:
    position = await service.states.queue_position(record) if record.status == "queued" else None
    return video_resource(record, base_url=_base_url(service, request), store=service.store, queue_position=position)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiProblem("payload_too_large", f"the body is over the {limit}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiProblem("payload_too_large", f"the body is over the {limit}-byte limit")
    return bytes(body)


def _json(raw: bytes | str) -> object:
    try:
        value = json.loads(raw)
        # JSON may spell a lone surrogate (\ud800), which no UTF-8 text holds: refuse it here, not in a hash later
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        raise ApiProblem("invalid_json", "the body is not valid JSON (UTF-8)", status=400) from None
    return value


async def _read_submission(request: Request, service: GatewayService, tenant: str):
    """(Submission, UploadedImage | None) of a JSON or multipart body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    settings = service.settings
    if content_type == "application/json" or content_type.endswith("+json"):
        body = _json(await _read_body(request, MAX_JSON_BODY_BYTES))
        return submissions.validate(body, tenant=tenant, settings=settings), None
    if content_type == "multipart/form-data":
        limit = settings.max_image_bytes + MAX_FORM_OVERHEAD_BYTES
        declared = request.headers.get("content-length")
        # the form parser spools file parts without a cap: only a declared length (which the HTTP server holds the
        # body to) bounds an upload before it is read
        if not (declared and declared.isdigit()):
            raise ApiProblem("length_required", "a multipart upload needs a Content-Length header")
        if int(declared) > limit:
            raise ApiProblem("payload_too_large", f"the body is over the {limit}-byte limit")
        try:
            form = await request.form(max_files=1, max_fields=4)
        except Exception as e:  # starlette raises its own errors for malformed multipart bodies
            message = f"the multipart body cannot be read: {getattr(e, 'detail', None) or str(e)[:200]}"
            raise ApiProblem.invalid([submissions.error(None, "invalid_multipart", message)]) from None
        try:
            part, image_part = form.get("request"), form.get("image")
            if not isinstance(part, str):
                message = "a `request` form field with the JSON request is required"
                raise ApiProblem.invalid([submissions.error("request", "missing_field", message)])
            if image_part is None or isinstance(image_part, str):
                message = "an `image` file part is required"
                raise ApiProblem.invalid([submissions.error("image", "missing_field", message)])
            image = await uploads.read_upload(image_part, settings.max_image_bytes)
        finally:
            await form.close()
        uri = uploads.upload_uri(settings, tenant, image)
        return submissions.validate(_json(part), tenant=tenant, settings=settings, image_uri=uri), image
    raise ApiProblem(
        "unsupported_media_type", f"send application/json or multipart/form-data, not {content_type or 'nothing'!r}"
    )


async def _existing(service, request, tenant, request_id, submission, conflict_code) -> JSONResponse | None:
    """200 with the existing request when it has the same input; 409 when another (or one the gateway did not
    take: a record made from a producer's event has no input hash to compare); None when there is none. A record
    stored but not yet handed to the broker (its first submission failed or is still in flight) is sent again."""
    found = await service.states.get(tenant, request_id)
    if found is None:
        return None
    record = found[0]
    if record.input_sha256 != submission.input_sha256:
        what = "this Idempotency-Key's request" if conflict_code == "idempotency_conflict" else f"id {request_id!r}"
        raise ApiProblem(conflict_code, f"{what} was already used for a different input; use a new one")
    if not record.accepted:
        await _hand_to_broker(service, record, submission)
    return JSONResponse(await _resource(service, request, record), status_code=200)


async def _check_concurrency(service, tenant: str, request_id: str) -> None:
    """429 when, with this one, the tenant has more unfinished requests submitted here than it may (producers on
    the broker are not counted: they are not this gateway's to limit). This one is then discarded."""
    active = await service.states.count_active(tenant, source=submissions.SOURCE)
    limit = service.settings.tenant_max_active
    if active > limit:
        await service.states.discard(tenant, request_id)
        raise ApiProblem(
            "too_many_requests",
            f"{active - 1} requests of this tenant are unfinished (the limit is {limit}); retry when one finishes",
            retry_after=RETRY_AFTER_SECONDS,
            limit="concurrent_requests",
        )


async def _check_monthly_budget(service, tenant: str) -> None:
    """429 when the tenant has spent its monthly GPU-second budget (billing/quotas.py, from the ledger): the
    problem says which limit and when it renews."""
    from turboflow.billing.quotas import check_monthly

    budgets = dict(service.settings.tenant_monthly_gpu_seconds)
    if not budgets or service.ledger is None:
        return
    now = datetime.now(UTC)
    verdict = await asyncio.to_thread(check_monthly, service.ledger, tenant, budgets, now)
    if verdict is not None and verdict.exceeded:
        resets = verdict.resets_at.isoformat().replace("+00:00", "Z")
        raise ApiProblem(
            "quota_exceeded",
            f"this month's GPU-second budget is spent: {verdict.used:.1f} of {verdict.budget:.1f} s used; "
            f"it renews at {resets}",
            retry_after=verdict.seconds_until_reset(now),
            limit=verdict.limit,
            resets_at=resets,
        )


@router.post(
    "",
    status_code=201,
    response_model=Video,
    summary="Create a video request",
    openapi_extra={"requestBody": CREATE_BODY},
    responses={
        200: {"model": Video, "description": "The same id or Idempotency-Key with the same input: the existing one"},
        **responses(400, 409, 413, 415, 429, 503),
    },
)
async def create_video(
    request: Request,
    tenant: str = Depends(current_tenant),
    service: GatewayService = Depends(get_service),
    idempotency_key: str | None = Header(
        None,
        alias="Idempotency-Key",
        max_length=submissions.MAX_IDEMPOTENCY_KEY_CHARS,
        description="Retries with the same key and input return the first request; another input is a 409.",
    ),
):
    submission, image = await _read_submission(request, service, tenant)
    if submission.webhook:
        await submissions.check_webhook_url(
            submission.webhook["url"], allow_private=service.settings.webhook_allow_private
        )
    request_id = submission.id
    if idempotency_key is not None:
        if not submissions.valid_idempotency_key(idempotency_key):
            raise ApiProblem.invalid(
                [submissions.error("Idempotency-Key", "invalid_idempotency_key", "1-255 printable ASCII characters")]
            )
        claimed_id, claimed_sha = await service.states.claim_idempotency(
            tenant, idempotency_key, request_id, submission.input_sha256
        )
        if claimed_sha != submission.input_sha256:
            raise ApiProblem("idempotency_conflict", "this Idempotency-Key was already used for a different input")
        if claimed_id != request_id:
            if submission.id_given:
                raise ApiProblem("idempotency_conflict", "this Idempotency-Key was already used for another id")
            request_id = claimed_id
    replay = await _existing(service, request, tenant, request_id, submission, "id_conflict")
    if replay is not None:
        return replay
    await _check_monthly_budget(service, tenant)
    if image is not None:
        if service.store is None:
            raise ApiProblem("storage_unavailable", "this gateway has no object store for uploads")
        await uploads.store_upload(service.store, submission.data["image"], image, request_id)

    now = now_rfc3339()
    record = RequestRecord(
        id=request_id,
        tenant=tenant,
        task=submission.task,
        created_at=now,
        updated_at=now,
        input_sha256=submission.input_sha256,
        request=submitted_fields(submission.data),
        source=submissions.SOURCE,
        webhook=submission.webhook,
        events=["queued"],
        accepted=False,  # until the broker has it (below)
        base_url=_base_url(service, request),
    )
    if not await service.states.create(record):  # a concurrent submission of the same id got there first
        replay = await _existing(service, request, tenant, request_id, submission, "id_conflict")
        if replay is not None:
            return replay
    # counted after the record exists, so concurrent submissions cannot all slip under the limit
    await _check_concurrency(service, tenant, request_id)
    await _hand_to_broker(service, record, submission)
    await service.changed(record, ["queued"])
    return JSONResponse(await _resource(service, request, record), status_code=201)


async def _hand_to_broker(service: GatewayService, record: RequestRecord, submission) -> None:
    """Emit the request event, then mark the record accepted. A refusal discards the record (503: nothing was
    accepted, a retry submits it again); the event's time is the record's, so a re-sent event is the same event."""
    when = datetime.fromisoformat(record.created_at.replace("Z", "+00:00"))
    event = submissions.request_event(submission.task, record.id, record.tenant, submission.data, when)
    try:
        await service.emitter.emit(event)
    except BrokerUnavailable as e:
        await service.states.discard(record.tenant, record.id)
        raise ApiProblem("broker_unavailable", f"the request was not accepted: {e}; try again") from e
    await service.states.update(record.tenant, record.id, _mark_accepted)
    record.accepted = True


def _mark_accepted(record: RequestRecord) -> RequestRecord | None:
    if record.accepted:
        return None
    record.accepted = True
    return record


def _not_found(request_id: str) -> ApiProblem:
    return ApiProblem("not_found", f"no video request {request_id[:140]!r}")


async def _record(service: GatewayService, tenant: str, request_id: str) -> RequestRecord:
    found = await service.states.get(tenant, request_id) if full_match(REQUEST_ID_PATTERN, request_id) else None
    if found is None:
        raise _not_found(request_id)
    return found[0]


@router.get("/{id}", response_model=Video, summary="Get a video request", responses=responses(404, 503))
async def get_video(
    id: str,  # noqa: A002 - the path's name for it (gw-design.md)
    request: Request,
    tenant: str = Depends(current_tenant),
    service: GatewayService = Depends(get_service),
):
    record = await _record(service, tenant, id)
    return JSONResponse(await _resource(service, request, record))


def encode_cursor(record: RequestRecord) -> str:
    raw = json.dumps([record.created_at, record.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    """(created_at, id) of the last item of the previous page; ApiProblem 422 `invalid_cursor` otherwise."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, request_id = json.loads(raw)
        if isinstance(created_at, str) and full_match(REQUEST_ID_PATTERN, request_id):
            return created_at, request_id
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        pass
    raise ApiProblem(
        "invalid_cursor",
        "cursor is not one this API returned",
        status=422,
        errors=[submissions.error("cursor", "invalid_cursor", "pass a next_cursor value unchanged")],
    )


@router.get("", response_model=VideoList, summary="List video requests (newest first)", responses=responses(503))
async def list_videos(
    request: Request,
    status: Literal["queued", "running", "completed", "failed", "cancelled"] | None = Query(None),
    cursor: str | None = Query(None, max_length=400, description="`next_cursor` of the previous page"),
    limit: int = Query(20, ge=1, le=100),
    tenant: str = Depends(current_tenant),
    service: GatewayService = Depends(get_service),
):
    after = decode_cursor(cursor) if cursor is not None else None
    records = await service.states.list(tenant, status)
    if after is not None:
        records = [r for r in records if (r.created_at, r.id) < after]
    page = records[:limit]
    positions = await service.states.queue_positions(page)  # one scan for the page, not one per queued item
    base_url, store = _base_url(service, request), service.store
    data = [video_resource(r, base_url=base_url, store=store, queue_position=p) for r, p in zip(page, positions)]
    next_cursor = encode_cursor(page[-1]) if len(records) > limit else None
    return JSONResponse({"data": data, "next_cursor": next_cursor})


@router.post(
    "/{id}/cancel",
    status_code=202,
    response_model=Video,
    summary="Cancel a video request",
    description="Queued: cancelled at once. Running: `cancel_requested`, cancelled at the next step boundary. "
    "Already cancelled: 200. Completed or failed: 409 `not_cancellable`.",
    responses={200: {"model": Video, "description": "Already cancelled"}, **responses(404, 409, 503)},
)
async def cancel_video(
    id: str,  # noqa: A002 - the path's name for it (gw-design.md)
    request: Request,
    tenant: str = Depends(current_tenant),
    service: GatewayService = Depends(get_service),
):
    record = await _record(service, tenant, id)
    if record.status == "cancelled":
        return JSONResponse(await _resource(service, request, record), status_code=200)
    if record.terminal:
        raise ApiProblem("not_cancellable", f"the request already {record.status}")
    record, changes = await service.states.request_cancel(tenant, id)
    if record is None:
        raise _not_found(id)
    if record.status in ("completed", "failed"):  # it finished while we asked
        raise ApiProblem("not_cancellable", f"the request already {record.status}")
    if changes:
        await _announce_cancel(service, record)
        await service.changed(record, changes)
    return JSONResponse(await _resource(service, request, record), status_code=202)


async def _announce_cancel(service: GatewayService, record: RequestRecord) -> None:
    """Put the gateway-side cancel on the broker (signed `cancelled`), for every other consumer; best effort: the
    request state already says cancelled, and the function checks it at delivery."""
    if record.task is None:  # a record that only ever saw replies: nothing names the event's kind
        return
    cancelled = record.cancelled or {}
    event = lifecycle_event(
        CANCELLED,
        {"request_id": record.id, "tenant": record.tenant, "kind": record.task, "request_source": record.source},
        {
            "while": "queued",
            "gpu_seconds": 0.0,
            "cancelled_at": cancelled.get("cancelled_at") or record.finished_at or now_rfc3339(),
        },
        source=submissions.SOURCE,
        signing_key=service.settings.event_signing_key,
    )
    try:
        await service.emitter.emit(event)
    except BrokerUnavailable as e:
        log.warning("cancel of %s not announced on the broker: %s", record.id, e)


@health_router.get("/healthz", summary="Liveness and readiness", responses=responses(503))
async def healthz(service: GatewayService = Depends(get_service)):
    if service.states is None or service.keys is None:
        raise ApiProblem("state_unavailable", "the gateway is not started", status=503)
    return {"status": "ok"}
