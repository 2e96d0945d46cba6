"""Dead-letter sink (`turboflow-deadletter`): an undeliverable request becomes `io.turboflow.video.failed`.

Knative sends the request CloudEvent here after the Trigger's retries with three extensions: `knativeerrorcode`
(last HTTP status, absent for timeouts/connection errors), `knativeerrordest` (the subscriber URL) and
`knativeerrordata` (base64 of the start of the last response body). The reply is `io.turboflow.video.failed` with
`code: delivery_failed`, subject/request_id = the request id, tenant and traceparent kept, and `cause`: the last
answer's error `code` (the functions answer JSON `{error, message, retryable}`), HTTP `status` and `retryable`.
`retryable` (also at the top level) is the cause's: true when the function said so (e.g. `storage_unavailable`
during an S3 outage longer than the retry budget) or, without a JSON answer, for timeouts, connection failures,
5xx, 408 and 429; false for other 4xx. Sending the same request again later can then succeed.

The local broker also sends stored messages it cannot read as a CloudEvent here, as a stand-in event with what it
recovered (id, type, source, tenant) and the extension `turboflowerror` (`undecodable_event` or `invalid_data`):
the reply is a `failed` with that code, linked to the recovered request id.

With TURBOFLOW_EVENT_SIGNING_KEY set the failed event is signed (`turboflowsig`) and its id derived with the key,
so repeated dead-lettering of one request yields one event and nobody else can pre-empt it. With `K_SINK` set
(SinkBinding in the cluster) the failed event is also POSTed there, since a dead-letter sink's reply is not
necessarily routed back into the broker; both copies share the id and JetStream's duplicate window keeps one.

Events that are not turboflow requests (e.g. a completion a downstream Trigger could not deliver) are logged and
acknowledged with 202: there is nothing to report them to.
"""

from __future__ import annotations

import json
import logging
import os
import re

import httpx
from cloudevents.core.bindings.http import to_binary_event

from . import signing
from .asgi import HeaderEncodingError, lifespan, read_body, request_headers, respond, respond_event
from .dispatcher import ERROR_EXTENSION, INVALID_DATA, RETRYABLE_STATUS, UNDECODABLE, decode_error_data
from .nats_binding import is_cloudevent_http, parse_http
from .types import REQUEST_TYPES

log = logging.getLogger(__name__)

SOURCE = "/turboflow/eventing/deadletter"
CODE = "delivery_failed"
BROKER_CODES = (UNDECODABLE, INVALID_DATA)
_CODE_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")


def last_cause(status_text: str | None, body_text: str) -> tuple[dict, str]:
    """(`cause` object, human detail) of the last answer the broker got: status, the function's error code and
    whether that cause is transient."""
    status = int(status_text) if status_text and str(status_text).isdigit() else None
    cause: dict = {"retryable": status is None or status >= 500 or status in RETRYABLE_STATUS}
    if status is not None and 100 <= status <= 599:
        cause["status"] = status
    detail = body_text.strip()
    try:
        body = json.loads(detail)
    except ValueError:
        body = None
    if isinstance(body, dict):
        code = body.get("error")
        if isinstance(code, str) and _CODE_PATTERN.fullmatch(code):
            cause["code"] = code
        if isinstance(body.get("retryable"), bool):
            cause["retryable"] = body["retryable"]
        message = body.get("message") or body.get("error")
        detail = message if isinstance(message, str) else detail
    return cause, detail


def _with_cause(failed, cause: dict, signing_key: bytes | None):
    """`failed` with data.cause added (re-signed: the signature covers the data)."""
    from cloudevents.core.v1.event import CloudEvent

    data = {**failed.get_data(), "cause": cause}
    attributes = signing.sign_attributes(signing_key, dict(failed.get_attributes()), data)
    return CloudEvent(attributes=attributes, data=data)


def _broker_failure(event, ctx: dict, signing_key: bytes | None):
    """The failed event for a stored message the broker could not read (its code is the broker's)."""
    from .contracts import failed_event

    attrs = dict(event.get_attributes())
    code = attrs[ERROR_EXTENSION]
    reason = decode_error_data(attrs.get("knativeerrordata")).strip()
    what = "data that is not valid JSON" if code == INVALID_DATA else "a message that is not a readable CloudEvent"
    message = f"the broker stored {what} and cannot deliver it"
    if reason:
        message += f": {reason[:300]}"
    return failed_event(
        ctx["request_id"],
        code,
        message,
        False,
        source=SOURCE,
        tenant=ctx.get("tenant"),
        traceparent=ctx.get("traceparent"),
        request_source=ctx.get("request_source"),
        signing_key=signing_key,
    )


OBSERVER_PATHS = ("/internal/events",)  # the gateway's Trigger: it watches requests, it does not serve them


def _to_an_observer(destination: object) -> bool:
    """Whether a dead-lettered delivery went to an observer of requests (the gateway) rather than their function:
    the request reached its function through its own Trigger, so it has not failed (a `failed` would race its
    genuine `completed`, and the first terminal event wins)."""
    from urllib.parse import urlsplit

    return isinstance(destination, str) and urlsplit(destination).path.rstrip("/").endswith(OBSERVER_PATHS)


def failed_for(event, signing_key: bytes | None = None):
    """The `failed` event for an undeliverable request (or unreadable stored message), or None for other events."""
    from .contracts import TENANT_PATTERN, failed_event, full_match, request_context

    attrs = dict(event.get_attributes())
    ctx = request_context(event)
    if ctx.get("tenant") and not full_match(TENANT_PATTERN, ctx["tenant"]):
        ctx["tenant"] = None  # never echo an invalid tenant into routing attributes
    if attrs.get(ERROR_EXTENSION) in BROKER_CODES:
        return _broker_failure(event, ctx, signing_key)
    if attrs.get("type") not in REQUEST_TYPES.values():
        return None
    if _to_an_observer(attrs.get("knativeerrordest")):
        log.warning(
            "request %s could not be delivered to %s (an observer, not its function): not failed",
            ctx.get("request_id"),
            attrs.get("knativeerrordest"),
        )
        return None
    status = attrs.get("knativeerrorcode")
    dest = attrs.get("knativeerrordest") or "the subscriber"
    cause, detail = last_cause(status, decode_error_data(attrs.get("knativeerrordata")))
    message = f"the broker could not deliver the request to {dest}"
    message += f" (last answer HTTP {status}" if status else " (timeout or connection failure"
    message += f", {cause['code']})" if cause.get("code") else ")"
    if detail:
        message += f": {detail[:300]}"
    failed = failed_event(
        ctx["request_id"],
        CODE,
        message,
        cause["retryable"],
        source=SOURCE,
        tenant=ctx.get("tenant"),
        traceparent=ctx.get("traceparent"),
        request_source=ctx.get("request_source"),
        signing_key=signing_key,
    )
    return _with_cause(failed, cause, signing_key)


class DeadLetterApp:
    """ASGI app: POST / a CloudEvent -> 200 with the failed event (binary mode); GET /healthz -> 200.

    signing_key: defaults to TURBOFLOW_EVENT_SIGNING_KEY (None: unsigned events)."""

    def __init__(self, sink: str | None = None, signing_key: bytes | None = None):
        self.sink = sink if sink is not None else os.environ.get("K_SINK") or None
        self.signing_key = signing_key if signing_key is not None else signing.signing_key()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["type"] != "http":
            return
        if scope["path"].startswith("/health"):
            return await respond(send, 200, b"ok")
        if scope["method"] != "POST":
            return await respond(send, 405, b"POST a CloudEvent")
        body = await read_body(receive)
        try:
            headers = request_headers(scope)
        except HeaderEncodingError as e:
            return await respond(send, 400, f"not a valid CloudEvent: {e}".encode())
        if not is_cloudevent_http(headers):
            return await respond(send, 400, b"not a CloudEvent")
        try:
            event = parse_http(headers, body)
        except ValueError as e:
            return await respond(send, 400, f"not a valid CloudEvent: {e}".encode())
        failed = failed_for(event, self.signing_key)
        if failed is None:
            log.warning(
                "dead letter: %s %s (not a turboflow request) dropped after delivery failure to %s",
                event.get_type(),
                event.get_id(),
                event.get_attributes().get("knativeerrordest"),
            )
            return await respond(send, 202, b"")
        log.warning("dead letter: request %s -> %s %s", event.get_id(), failed.get_type(), failed.get_id())
        out = to_binary_event(failed)
        if self.sink:
            try:  # a failure here is not fatal: the reply below carries the same event
                async with httpx.AsyncClient(timeout=10) as client:
                    r = await client.post(self.sink, headers=dict(out.headers), content=out.body)
                    r.raise_for_status()
            except httpx.HTTPError as e:
                log.warning("dead letter: posting %s to K_SINK %s failed: %s", failed.get_id(), self.sink, e)
        await respond_event(send, 200, out)
