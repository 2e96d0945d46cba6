"""CloudEvents NATS protocol binding (the SDK has none): CloudEvent <-> NATS message headers + payload.

Binary content mode: every attribute except `datacontenttype` becomes a NATS header `ce-<name>` (values encoded as
in the HTTP binding: percent-encoded, RFC 3339 time), `datacontenttype` becomes `Content-Type`, the payload is the
event data. Structured content mode: `Content-Type: application/cloudevents+json`, the payload is the JSON event
format. A message without `ce-` headers is read as structured JSON (the binding's v1.0 form, from servers or
clients without header support). Every message also carries `Nats-Msg-Id: <event id>`, so JetStream drops an event
that is published again within the stream's duplicate window (the same header eventing-natss sets).
"""
from __future__ import annotations

from typing import Mapping

from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event, to_structured_event

MSG_ID_HEADER = "Nats-Msg-Id"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
CE_PREFIX = "ce-"


def _nats_headers(http_headers: Mapping[str, str], event_id: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in http_headers.items():
        low = name.lower()
        out["Content-Type" if low == "content-type" else low] = value
    out[MSG_ID_HEADER] = event_id
    return out


def to_nats(event, mode: str = "binary") -> tuple[dict[str, str], bytes]:
    """(headers, payload) of `event` in `binary` or `structured` content mode."""
    if mode not in ("binary", "structured"):
        raise ValueError(f"mode must be binary or structured, got {mode!r}")
    msg = to_binary_event(event) if mode == "binary" else to_structured_event(event)
    body = msg.body if isinstance(msg.body, (bytes, bytearray)) else (msg.body or b"")
    return _nats_headers(msg.headers, str(event.get_id())), bytes(body)


def from_nats(headers: Mapping[str, str] | None, payload: bytes):
    """The CloudEvent in a NATS message (binary or structured). Raises ValueError when it is none."""
    hdrs = {k.lower(): v for k, v in (headers or {}).items() if k.lower() != MSG_ID_HEADER.lower()}
    if not any(k.startswith(CE_PREFIX) for k in hdrs):
        hdrs["content-type"] = STRUCTURED_CONTENT_TYPE  # structured (headers are optional in the binding)
    try:
        return from_http_event(HTTPMessage(headers=hdrs, body=payload or b""))
    except Exception as e:  # the SDK raises several types for malformed input
        raise ValueError(f"not a CloudEvent: {type(e).__name__}: {e}") from e


def is_cloudevent_http(headers: Mapping[str, str]) -> bool:
    low = {k.lower(): v for k, v in headers.items()}
    return "ce-specversion" in low or low.get("content-type", "").startswith(STRUCTURED_CONTENT_TYPE)
