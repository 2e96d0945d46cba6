"""Dead-letter sink (`turboflow-deadletter`): an undeliverable request becomes `io.turboflow.video.failed`.

Knative sends the request CloudEvent here after the Trigger's retries with three extensions: `knativeerrorcode`
(last HTTP status, absent for timeouts/connection errors), `knativeerrordest` (the subscriber URL) and
`knativeerrordata` (base64 of the start of the last response body). The reply is `io.turboflow.video.failed` with
`code: delivery_failed`, `retryable: false` (the broker already retried), subject/request_id = the request id,
tenant and traceparent kept. Its id is derived from the request id, so repeated dead-lettering of one request
yields one event. With `K_SINK` set (SinkBinding in the cluster) the failed event is also POSTed there, since a
dead-letter sink's reply is not necessarily routed back into the broker; both copies share the id and JetStream's
duplicate window keeps one.

Events that are not turboflow requests (e.g. a completion a downstream Trigger could not deliver) are logged and
acknowledged with 202: there is nothing to report them to.
"""
from __future__ import annotations

import json
import logging
import os

import httpx
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event

from .asgi import lifespan, read_body, request_headers, respond, respond_event
from .broker import decode_error_data
from .nats_binding import is_cloudevent_http
from .types import REQUEST_TYPES

log = logging.getLogger(__name__)

SOURCE = "/turboflow/eventing/deadletter"
CODE = "delivery_failed"


def failed_for(event):
    """The `failed` event for an undeliverable request, or None for other events."""
    from .contracts import failed_event, request_context

    attrs = dict(event.get_attributes())
    if attrs.get("type") not in REQUEST_TYPES.values():
        return None
    ctx = request_context(event)
    status = attrs.get("knativeerrorcode")
    dest = attrs.get("knativeerrordest") or "the subscriber"
    detail = decode_error_data(attrs.get("knativeerrordata")).strip()
    try:  # the functions answer JSON {error, message}: show the message
        body = json.loads(detail)
        detail = body.get("message") or body.get("error") or detail
    except (ValueError, AttributeError):
        pass
    message = f"the broker could not deliver the request to {dest}"
    message += f" (last answer HTTP {status})" if status else " (timeout or connection failure)"
    if detail:
        message += f": {detail[:300]}"
    tenant = ctx.get("tenant")
    return failed_event(ctx["request_id"], CODE, message, False, source=SOURCE, tenant=tenant or None,
                        traceparent=ctx.get("traceparent"))


class DeadLetterApp:
    """ASGI app: POST / a CloudEvent -> 200 with the failed event (binary mode); GET /healthz -> 200."""

    def __init__(self, sink: str | None = None):
        self.sink = sink if sink is not None else os.environ.get("K_SINK") or None
        self.received = 0

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
        headers = request_headers(scope)
        if not is_cloudevent_http(headers):
            return await respond(send, 400, b"not a CloudEvent")
        try:
            event = from_http_event(HTTPMessage(headers=headers, body=body))
        except Exception as e:
            return await respond(send, 400, f"not a valid CloudEvent: {e}".encode())
        self.received += 1
        failed = failed_for(event)
        if failed is None:
            log.warning("dead letter: %s %s (not a turboflow request) dropped after delivery failure to %s",
                        event.get_type(), event.get_id(), event.get_attributes().get("knativeerrordest"))
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
