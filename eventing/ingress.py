"""The broker's HTTP ingress (ASGI), shaped like Knative's broker ingress, appending to an event log
(`eventing/eventlog.py`).

    POST /{namespace}/{broker}   a CloudEvent, binary or structured mode:
        202  stored (an identical re-send is 202 too: stored once)
        400  not a CloudEvent: missing `id` or `specversion`, a header that is not UTF-8, JSON data that does not
             parse or nests deeper than 64 levels, a `tenant` extension that is not a string
        403  a turboflow reply type (`io.turboflow.*` other than `*.requested`) without a valid `turboflowsig`,
             when a signing key is configured (nobody else may post a completion)
        404  another broker's path; 405 another method
        409  an id this source already used for different content
        413  larger than the log stores (JetStream: 1 MiB)
        503  the log cannot store it now (Retry-After: 1)
    GET /healthz                 200

Nothing is added to an event: one without `time` is stored without one.
"""

from __future__ import annotations

import logging

from . import signing
from .asgi import HeaderEncodingError, lifespan, read_body, request_headers, respond
from .eventlog import Appended, EventLog, EventLogUnavailable
from .nats_binding import parse_http, undecodable_json_data
from .types import TENANT_EXTENSION

log = logging.getLogger(__name__)

REPLY_TYPE_PREFIX = "io.turboflow."


class IngressRejection(Exception):
    """An ingress request answered with a 4xx (status + a body saying why)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def is_reply_type(event_type: str) -> bool:
    """turboflow's own output types (completed, failed, anything io.turboflow.* that is not a request)."""
    return str(event_type).startswith(REPLY_TYPE_PREFIX) and not str(event_type).endswith(".requested")


def parse_ingress_event(headers: dict[str, str], body: bytes, signing_key: bytes | None = None):
    """The CloudEvent of an ingress request; IngressRejection (400/403) when it may not enter the broker."""
    try:
        event = parse_http(headers, body)
    except ValueError as e:
        raise IngressRejection(400, f"not a valid CloudEvent: {e}") from None
    bad_data = undecodable_json_data(headers, body)
    if bad_data:
        raise IngressRejection(400, f"event {event.get_id()!r}: {bad_data}")
    tenant = event.get_attributes().get(TENANT_EXTENSION)
    if tenant is not None and not isinstance(tenant, str):
        raise IngressRejection(
            400,
            f"event {event.get_id()!r}: the {TENANT_EXTENSION!r} extension must be a string, got "
            f"{type(tenant).__name__}",
        )
    if signing_key is not None and is_reply_type(event.get_type()) and not signing.verify_event(event, signing_key):
        raise IngressRejection(
            403,
            f"{event.get_type()} is emitted by turboflow only: this event has no valid "
            f"{signing.SIGNATURE_EXTENSION} signature",
        )
    return event


class Ingress:
    """The ASGI app of broker `namespace/name` (see the module doc)."""

    def __init__(
        self,
        event_log: EventLog,
        *,
        namespace: str = "turboflow",
        name: str = "default",
        signing_key: bytes | None = None,
    ):
        self.log, self.namespace, self.name, self.signing_key = event_log, namespace, name, signing_key
        self.path = f"/{namespace}/{name}"

    async def accept(self, event) -> bool:
        """Store an event; True if new, False if the log already had it (same source + id, same content).
        Raises IngressRejection(409) when that source + id is stored with different content, EventLogUnavailable
        when the log cannot store it now."""
        appended = await self.log.append(event)
        if appended is Appended.CONFLICT:
            raise IngressRejection(
                409,
                f"duplicate event id {event.get_id()!r} from source {event.get_source()!r} "
                "with different content: an event id names one event; use a new id",
            )
        return appended is Appended.NEW

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["type"] != "http":
            return
        path, method = scope["path"].rstrip("/"), scope["method"]
        if path == "/healthz":
            return await respond(send, 200, b"ok")
        if path != self.path:
            return await respond(send, 404, f"no broker at {path!r}; POST to {self.path}".encode())
        if method != "POST":
            return await respond(send, 405, b"POST a CloudEvent", [(b"allow", b"POST")])
        limit = self.log.max_event_bytes
        body = await read_body(receive, limit)
        if body is None:
            return await respond(send, 413, f"event larger than {_size(limit)} (the event log's limit)".encode())
        try:
            event = parse_ingress_event(request_headers(scope), body, self.signing_key)
            await self.accept(event)
        except HeaderEncodingError as e:
            return await respond(send, 400, f"not a valid CloudEvent: {e}".encode())
        except IngressRejection as e:
            return await respond(send, e.status, e.message.encode())
        except EventLogUnavailable as e:
            log.warning("ingress: cannot store event %s: %s", event.get_id(), e)
            return await respond(send, 503, f"cannot store the event now: {e}".encode(), [(b"retry-after", b"1")])
        await respond(send, 202, b"")


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n} bytes"
