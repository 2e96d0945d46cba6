"""CloudEvents NATS protocol binding (the SDK has none): CloudEvent <-> NATS message headers + payload.

Binary content mode: every attribute except `datacontenttype` becomes a NATS header `ce-<name>` (values encoded as
in the HTTP binding: percent-encoded, RFC 3339 time), `datacontenttype` becomes `Content-Type`, the payload is the
event data. Structured content mode: `Content-Type: application/cloudevents+json`, the payload is the JSON event
format. A message without `ce-` headers is read as structured JSON (the binding's v1.0 form, from servers or
clients without header support).

Identity: CloudEvents identify an event by `source` + `id` (two producers may use the same id). Every message
carries `Nats-Msg-Id: <msg_id(source, id)>` = hex SHA-256 of the JSON array `[source, id]`, so JetStream drops an
event that is published again within the stream's duplicate window, and only that producer's event. Producers that
publish straight to NATS set the same header (`msg_id`); the event id itself is in `ce-id`.

Parsing never invents attributes: the SDK fills a missing `id`, `specversion` and `time` in; here a message without
`id` or `specversion` is not a CloudEvent, and an event without `time` stays without one (the output date folder
must follow the producer's event, not the moment a broker happened to parse it).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from cloudevents.core.bindings.http import HTTPMessage, from_http, to_binary_event, to_structured_event
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

MSG_ID_HEADER = "Nats-Msg-Id"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
CE_PREFIX = "ce-"
MAX_JSON_DEPTH = 64  # far beyond any turboflow payload; Python's json recursion breaks near 1000


class ExactCloudEvent(CloudEvent):
    """A v1.0 CloudEvent with exactly the attributes it was given, except `specversion` and `id` for producers
    that leave them out: the SDK's class would also stamp `time` = now, which the contract forbids."""

    def __init__(self, attributes: dict[str, Any], data: Any = None) -> None:
        attributes = dict(attributes)
        untimed = attributes.get("time") is None
        super().__init__(attributes, data)
        if untimed:
            self._attributes.pop("time", None)  # the SDK's constructor stamps it; a producer did not


def _strict_event(attributes: dict[str, Any], data: Any) -> ExactCloudEvent:
    """Event factory for parsing: what the message lacks stays lacking (missing id/specversion is an error)."""
    missing = [name for name in ("id", "specversion") if not attributes.get(name)]
    if missing:
        raise ValueError(f"missing required attributes {missing}")
    return ExactCloudEvent(attributes, data)


def msg_id(source: Any, event_id: Any) -> str:
    """The Nats-Msg-Id of the event (source, id): CloudEvents identity, unambiguous for any two strings."""
    return hashlib.sha256(json.dumps([str(source), str(event_id)]).encode("utf-8")).hexdigest()


# a JSON string (unrolled loop: fast on a megabyte of base64) or one bracket
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def json_depth_exceeds(text: bytes | str, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when the JSON text nests arrays/objects deeper than `limit`. A linear scan (no recursion to blow):
    brackets inside strings do not count; malformed JSON is left to the parser, which reports it as such."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    depth = 0
    for token in _JSON_TOKEN.finditer(raw):
        char = token.group()[:1]
        if char in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif char in (b"]", b"}"):
            depth -= 1
    return False


def _nats_headers(http_headers: Mapping[str, str], source: Any, event_id: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in http_headers.items():
        low = name.lower()
        out["Content-Type" if low == "content-type" else low] = value
    out[MSG_ID_HEADER] = msg_id(source, event_id)
    return out


def to_nats(event, mode: str = "binary") -> tuple[dict[str, str], bytes]:
    """(headers, payload) of `event` in `binary` or `structured` content mode."""
    if mode not in ("binary", "structured"):
        raise ValueError(f"mode must be binary or structured, got {mode!r}")
    msg = to_binary_event(event) if mode == "binary" else to_structured_event(event)
    body = msg.body if isinstance(msg.body, (bytes, bytearray)) else (msg.body or b"")
    return _nats_headers(msg.headers, event.get_source(), event.get_id()), bytes(body)


def _is_json_type(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json") or media == "text/json"


def parse_http(headers: Mapping[str, str], body: bytes):
    """The CloudEvent in HTTP-shaped headers + body, strictly (see the module doc). Raises ValueError."""
    low = {k.lower(): v for k, v in headers.items()}
    structured = not any(k.startswith(CE_PREFIX) for k in low)
    if (structured or _is_json_type(low.get("content-type"))) and json_depth_exceeds(body or b""):
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return from_http(HTTPMessage(headers=low, body=body or b""), JSONFormat(), _strict_event)
    except Exception as e:  # the SDK raises several types for malformed input
        raise ValueError(f"not a CloudEvent: {type(e).__name__}: {e}") from e


def from_nats(headers: Mapping[str, str] | None, payload: bytes):
    """The CloudEvent in a NATS message (binary or structured). Raises ValueError when it is none."""
    hdrs = {k.lower(): v for k, v in (headers or {}).items() if k.lower() != MSG_ID_HEADER.lower()}
    if not any(k.startswith(CE_PREFIX) for k in hdrs):
        hdrs["content-type"] = STRUCTURED_CONTENT_TYPE  # structured (headers are optional in the binding)
    return parse_http(hdrs, payload)


def recover_attributes(headers: Mapping[str, str] | None, payload: bytes) -> dict[str, str]:
    """Best effort: the string attributes (id, type, source, tenant, ...) of a message that does not parse as a
    CloudEvent, so its failure can still be linked to the request. Never raises."""
    hdrs = {k.lower(): v for k, v in (headers or {}).items()}
    found: dict[str, Any] = {}
    if any(k.startswith(CE_PREFIX) for k in hdrs):
        found = {k[len(CE_PREFIX) :]: unquote(v) for k, v in hdrs.items() if k.startswith(CE_PREFIX)}
    elif payload and not json_depth_exceeds(payload):
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            doc = None
        found = doc if isinstance(doc, dict) else {}
    return {
        k: v
        for k, v in found.items()
        if k in ("id", "type", "source", "subject", "tenant", "traceparent") and isinstance(v, str) and v
    }


def undecodable_json_data(headers: Mapping[str, str] | None, body: bytes) -> str | None:
    """Why the data of a binary-mode event with a JSON content type does not parse; None when it does, or when
    the message is structured or not JSON (the SDK's parse accepts such data as raw bytes, a consumer would not)."""
    low = {k.lower(): v for k, v in (headers or {}).items()}
    if not any(k.startswith(CE_PREFIX) for k in low) or not body or not _is_json_type(low.get("content-type")):
        return None
    try:
        json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return f"data is not valid JSON ({type(e).__name__}: {str(e)[:120]})"
    return None


def is_cloudevent_http(headers: Mapping[str, str]) -> bool:
    low = {k.lower(): v for k, v in headers.items()}
    return "ce-specversion" in low or low.get("content-type", "").startswith(STRUCTURED_CONTENT_TYPE)
