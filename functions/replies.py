"""The one table from an outcome to the HTTP answer (eventing/contracts.py defines the events themselves):

    outcome                                             status  body                                     broker
    completed (or a replayed completion)                200     io.turboflow.video.completed             publishes
    cancelled (RequestCancelled: before the device, or  200     io.turboflow.video.cancelled             publishes
      at a step boundary while running; terminal)
    TurboflowError, not retryable, or out_of_memory     200     io.turboflow.video.failed                publishes
    TurboflowError, retryable (not_ready, device_busy,  503     JSON {error, message, retryable,         retries
      storage_unavailable, storage_misconfigured)               request_id} + Retry-After
    any other exception (a bug)                         500     JSON {error: internal_error, ...}        retries
    not a valid CloudEvent (functions/app.py guard)     400     JSON {error: invalid_cloudevent, ...}    drops

Bodies say nothing internal (paths, URLs, exception text): a 5xx body can end up in a dead-letter `failed` event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from turboflow.errors import OutOfMemoryError, RequestCancelled, TurboflowError
from turboflow.eventing.contracts import failed_from_error, lifecycle_event
from turboflow.eventing.types import CANCELLED

RETRY_AFTER_SECONDS = 5


@dataclass(frozen=True)
class Reply:
    status: int
    event: object | None = None  # a CloudEvent, sent in the request's mode
    body: dict | None = None  # a JSON body instead of an event
    retry_after: int | None = None
    outcome: str = "completed"  # the metrics label: completed | replayed | failed | cancelled | retry
    code: str = ""


def completed(event, replayed: bool = False) -> Reply:
    return Reply(200, event=event, outcome="replayed" if replayed else "completed")


def retries(error: TurboflowError) -> bool:
    """Whether the broker should deliver this request again later (503) rather than get a `failed` reply.
    out_of_memory is retryable for the sender (a smaller request may fit) but this request will not."""
    return error.retryable and not isinstance(error, OutOfMemoryError)


def cancelled_event(
    request, *, while_: str, gpu_seconds: float, source: str, signing_key: bytes | None, input_sha256: str = ""
):
    """The signed `io.turboflow.video.cancelled` event about `request` (a ParsedRequest or a request context).
    One id per request (sequence ""): a redelivery cancelled again answers the same event."""
    data = {
        "while": while_,
        "gpu_seconds": round(max(gpu_seconds, 0.0), 6),
        "cancelled_at": datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
    }
    if input_sha256:
        data["input_sha256"] = input_sha256
    return lifecycle_event(CANCELLED, request, data, source=source, signing_key=signing_key)


def cancelled(error: RequestCancelled, ctx: dict, *, source: str, signing_key: bytes | None) -> Reply:
    """The reply to a cancelled request: the event the job attached, or one built from the request context."""
    event = getattr(error, "event", None)
    if event is None:
        event = cancelled_event(
            ctx,
            while_=getattr(error, "while_", "queued"),
            gpu_seconds=getattr(error, "gpu_seconds", 0.0),
            source=source,
            signing_key=signing_key,
        )
    return Reply(200, event=event, outcome="cancelled")


def for_error(error: BaseException, ctx: dict, *, source: str, signing_key: bytes | None) -> Reply:
    """The reply to a request that raised `error` (ctx: request_context of the event)."""
    if isinstance(error, RequestCancelled):
        return cancelled(error, ctx, source=source, signing_key=signing_key)
    if isinstance(error, TurboflowError):
        if retries(error):
            request_id = ctx.get("request_id")
            body = {"error": error.code, "message": error.message, "retryable": True, "request_id": request_id}
            return Reply(503, body=body, retry_after=RETRY_AFTER_SECONDS, outcome="retry", code=error.code)
        event = failed_from_error(error, ctx, source=source, signing_key=signing_key)
        return Reply(200, event=event, outcome="failed", code=error.code)
    body = {
        "error": "internal_error",
        "message": "internal error; the function's logs have details",
        "request_id": ctx.get("request_id"),
    }
    return Reply(500, body=body, outcome="retry", code="internal_error")


def bad_request(message: str) -> Reply:
    return Reply(400, body={"error": "invalid_cloudevent", "message": message}, outcome="rejected")


async def send(reply: Reply, send, *, binary: bool = False) -> None:
    """Answer with `reply` on func-python's CloudEventSender (events) or a raw ASGI `send` (JSON bodies)."""
    if reply.event is not None:
        await (send.binary(reply.event, reply.status) if binary else send.structured(reply.event, reply.status))
        return
    payload = json.dumps(reply.body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if reply.retry_after:
        headers.append((b"retry-after", str(reply.retry_after).encode()))
    raw = getattr(send, "http", send)  # func-python's CloudEventSender passes raw ASGI messages through
    await raw({"type": "http.response.start", "status": reply.status, "headers": headers})
    await raw({"type": "http.response.body", "body": payload})
