"""The event log under the local broker: the ingress appends to it, the dispatcher reads it through one durable
consumer per Trigger. JetStream is the implementation (`eventing/jetstream.py`); an in-memory one backs the
dispatcher's unit tests (`tests/memory_eventlog.py`).

What the broker relies on, and nothing more:
    append      stores an event once per CloudEvents identity (source + id): a repeat with the same content is
                DUPLICATE, a repeat with other content is CONFLICT (nothing stored either way).
    consumer    a durable cursor over the whole log; each message stays pending until acked and comes back
                after `ack_wait` (or after the `nak` delay) when it is not, so nothing handed out is lost.
    messages    the stored form (CloudEvents NATS binding: `headers` + `payload`), read as-is so that a message
                which is not a readable CloudEvent can still be dead-lettered.
Every failure of the log's transport is an `EventLogUnavailable`: the ingress answers 503, the dispatcher waits
and tries again.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from typing import Protocol

from . import signing
from .triggers import attribute_text


class EventLogUnavailable(Exception):
    """The log cannot be reached or did not answer in time (transient: try again)."""


class Appended(enum.Enum):
    NEW = "new"
    DUPLICATE = "duplicate"  # same source + id, same content: already stored
    CONFLICT = "conflict"  # same source + id, other content: refused


class LoggedMessage(Protocol):
    headers: Mapping[str, str] | None
    payload: bytes

    @property
    def stored_type(self) -> str:
        """The event type the message is filed under (its subject), known even when the message is unreadable."""

    @property
    def address(self) -> str:
        """Where it is stored, e.g. `nats:turboflow.events.io...` (the dead-letter `knativeerrordest`)."""

    @property
    def position(self) -> str:
        """A stable name of this entry, e.g. `TURBOFLOW_EVENTS-17` (the id of a message that has none)."""

    async def ack(self) -> None:
        """Done with it, confirmed by the log. Raises EventLogUnavailable when unconfirmed."""

    async def nak(self, delay: float) -> None:
        """Not done: hand it out again after `delay` seconds."""

    async def in_progress(self) -> None:
        """Still working on it: restart its ack_wait."""


class Consumer(Protocol):
    async def next(self, timeout: float) -> LoggedMessage | None:
        """The next message due (new, or pending past its ack_wait/nak delay); None when none within `timeout`."""

    async def close(self) -> None: ...


class EventLog(Protocol):
    max_event_bytes: int  # the largest payload the log stores (the ingress answers 413 above it)

    async def append(self, event) -> Appended: ...

    async def consumer(self, name: str, *, ack_wait: float, max_pending: int) -> Consumer:
        """The durable consumer `name` (created on first use, resumed afterwards)."""


def content_fingerprint(event) -> tuple:
    """What two events must share to be 'the same event': every attribute and the data (canonical JSON)."""
    attrs = {k: attribute_text(v) for k, v in event.get_attributes().items() if v is not None}
    data = event.get_data()
    if isinstance(data, (bytes, bytearray, str)):
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            data = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else data
    return tuple(sorted(attrs.items())), signing.canonical_json(data)
