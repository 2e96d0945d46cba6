"""An in-memory event log (`turboflow.eventing.eventlog.EventLog`): the second implementation next to JetStream, so
the dispatcher's delivery rules are tested without NATS. Same semantics where the dispatcher relies on them:
identity = source + id (duplicate / conflict), durable consumers with their own cursor, a message handed out again
after ack_wait or after a nak's delay until it is acked. It records every ack and nak for assertions."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from turboflow.eventing.eventlog import Appended, content_fingerprint
from turboflow.eventing.nats_binding import from_nats, msg_id, to_nats


@dataclass
class Entry:
    seq: int
    stored_type: str
    headers: dict | None
    payload: bytes


class MemoryMessage:
    def __init__(self, consumer: MemoryConsumer, entry: Entry):
        self._consumer, self._entry = consumer, entry
        self.headers, self.payload = entry.headers, entry.payload
        self.stored_type = entry.stored_type
        self.address = f"memory:{entry.stored_type}"
        self.position = f"memory-{entry.seq}"

    async def ack(self) -> None:
        self._consumer.acked.append(self._entry.seq)
        self._consumer.pending.pop(self._entry.seq, None)

    async def nak(self, delay: float) -> None:
        self._consumer.naks.append(self._entry.seq)
        self._consumer.pending[self._entry.seq] = time.monotonic() + delay

    async def in_progress(self) -> None:
        if self._entry.seq in self._consumer.pending:
            self._consumer.pending[self._entry.seq] = time.monotonic() + self._consumer.ack_wait


@dataclass
class MemoryConsumer:
    log: MemoryEventLog
    ack_wait: float
    cursor: int = 0
    pending: dict[int, float] = field(default_factory=dict)  # seq -> when it is due again
    acked: list[int] = field(default_factory=list)
    naks: list[int] = field(default_factory=list)

    def _due(self) -> Entry | None:
        now = time.monotonic()
        for seq, due in sorted(self.pending.items()):
            if due <= now:
                self.pending[seq] = now + self.ack_wait
                return self.log.entries[seq - 1]
        if self.cursor < len(self.log.entries):
            entry = self.log.entries[self.cursor]
            self.cursor += 1
            self.pending[entry.seq] = now + self.ack_wait
            return entry
        return None

    async def next(self, timeout: float) -> MemoryMessage | None:
        deadline = time.monotonic() + timeout
        while True:
            entry = self._due()
            if entry is not None:
                return MemoryMessage(self, entry)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        pass


class MemoryEventLog:
    max_event_bytes = 1 << 20

    def __init__(self):
        self.entries: list[Entry] = []
        self.consumers: dict[str, MemoryConsumer] = {}
        self._ids: dict[str, int] = {}

    async def append(self, event) -> Appended:
        headers, payload = to_nats(event)
        key = msg_id(event.get_source(), event.get_id())
        if key in self._ids:
            entry = self.entries[self._ids[key] - 1]
            same = content_fingerprint(from_nats(entry.headers, entry.payload)) == content_fingerprint(event)
            return Appended.DUPLICATE if same else Appended.CONFLICT
        self._ids[key] = self.append_raw(event.get_type(), headers, payload)
        return Appended.NEW

    def append_raw(self, stored_type: str, headers: dict | None, payload: bytes) -> int:
        """Store a message as-is (what a producer writing straight to the log could store)."""
        self.entries.append(Entry(len(self.entries) + 1, stored_type, headers, payload))
        return len(self.entries)

    async def consumer(self, name: str, *, ack_wait: float, max_pending: int) -> MemoryConsumer:
        if name not in self.consumers:
            self.consumers[name] = MemoryConsumer(self, ack_wait)
        return self.consumers[name]

    def events(self, event_type: str | None = None) -> list:
        """The readable events stored, optionally of one type."""
        out = []
        for entry in self.entries:
            try:
                event = from_nats(entry.headers, entry.payload)
            except ValueError:
                continue
            if event_type is None or event.get_type() == event_type:
                out.append(event)
        return out
