"""The metering consumer: the broker's event stream -> the usage ledger, each event stored exactly once.

    turboflow billing consume --nats nats://... [--ledger URL]        (a Deployment beside the broker's NATS)

A durable JetStream pull consumer (`turboflow-billing`) on the events stream, filtered to the types the ledger
records (billing/ledger.py RECORDED_TYPES). A message is acknowledged only after its row is committed (or found
already there), so a crash in between redelivers it and the ledger's UNIQUE (source, id) stores it once; the rows
are independent, so arrival order does not matter.

Trust: the functions sign what they emit (`turboflowsig`, eventing/signing.py). With a signing key configured, an
event of a recorded type without a valid signature is not a fact: it is acknowledged, counted as `unsigned` and
logged, never stored (a producer on the broker cannot bill another tenant, nor erase a bill with a fake). A message
that is not a CloudEvent, or a fact the ledger refuses (no usage, data not an object), is counted and dropped the
same way: retrying it cannot help. A ledger that cannot be reached is retried: the message is nak'ed with a delay.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

import sqlalchemy as sa

from turboflow.eventing import signing
from turboflow.eventing.jetstream import STREAM, SUBJECT_PREFIX, subject_for
from turboflow.eventing.nats_binding import from_nats, to_nats

from .errors import InvalidUsageEventError, LedgerUnavailableError
from .ledger import RECORDED_TYPES, Ledger

log = logging.getLogger(__name__)
DURABLE = "turboflow-billing"
RETRY_DELAY_S = 5.0


@dataclass
class ConsumeStats:
    stored: int = 0
    repeated: int = 0  # already in the ledger (a redelivery)
    unsigned: int = 0
    rejected: int = 0  # not a CloudEvent, or a fact the ledger refuses
    retried: int = 0  # the ledger was unavailable: nak'ed for later
    reasons: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"stored {self.stored}, already there {self.repeated}, unsigned {self.unsigned}, "
            f"rejected {self.rejected}, retried {self.retried}"
        )


def structured(event) -> dict:
    """The structured-mode JSON object of a CloudEvent (what Ledger.record takes)."""
    return json.loads(to_nats(event, "structured")[1])


class LedgerConsumer:
    """Feeds `ledger` from the events stream on `nats_url`; `signing_key` None accepts unsigned facts (dev only)."""

    def __init__(
        self,
        nats_url: str,
        ledger: Ledger,
        *,
        signing_key: bytes | None,
        durable: str = DURABLE,
        stream: str = STREAM,
        prefix: str = SUBJECT_PREFIX,
        batch: int = 64,
    ):
        self.nats_url, self.ledger, self.signing_key = nats_url, ledger, signing_key
        self.durable, self.stream, self.prefix, self.batch = durable, stream, prefix, batch
        self.stats = ConsumeStats()
        self._nc = self._sub = None

    async def connect(self) -> None:
        import nats
        from nats.js.api import AckPolicy, ConsumerConfig

        async def quiet(error: Exception) -> None:  # nats-py prints a traceback per failed attempt by default
            log.debug("NATS: %s", error)

        self._nc = await nats.connect(
            self.nats_url, name="turboflow-billing", connect_timeout=5, max_reconnect_attempts=-1, error_cb=quiet
        )
        js = self._nc.jetstream()
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=60,
            max_ack_pending=self.batch * 4,
            filter_subjects=[subject_for(t, self.prefix) for t in RECORDED_TYPES],
        )
        await js.add_consumer(self.stream, config)  # idempotent for an equal config
        self._sub = await js.pull_subscribe_bind(durable=self.durable, stream=self.stream)

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()
            self._nc = None

    async def consume_available(self, timeout: float = 1.0) -> ConsumeStats:
        """Handle messages until none arrives within `timeout` seconds; the stats so far."""
        import nats.errors

        while True:
            try:
                messages = await self._sub.fetch(self.batch, timeout=timeout)
            except (TimeoutError, nats.errors.TimeoutError):
                return self.stats
            for msg in messages:
                await self.handle(msg)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set (the CLI's loop)."""
        while not stop.is_set():
            await self.consume_available(timeout=1.0)
            log.debug("billing consumer: %s", self.stats.line())

    async def handle(self, msg) -> None:
        """Store one message's fact, then acknowledge it (see the module docstring for every outcome)."""
        try:
            event = from_nats(msg.headers, msg.data)
        except ValueError as e:
            self._drop(f"not a CloudEvent on {msg.subject}: {e}", "rejected")
            await msg.ack()
            return
        if event.get_type() not in RECORDED_TYPES:
            await msg.ack()
            return
        if self.signing_key is not None and not signing.verify_event(event, self.signing_key):
            self._drop(f"{event.get_type()} {event.get_id()} from {event.get_source()} is not signed", "unsigned")
            await msg.ack()
            return
        try:
            stored = await asyncio.to_thread(self.ledger.record, structured(event))
        except InvalidUsageEventError as e:
            self._drop(f"{event.get_type()} {event.get_id()}: {e.message}", "rejected")
            await msg.ack()
            return
        except (LedgerUnavailableError, sa.exc.OperationalError, sa.exc.InterfaceError) as e:
            log.warning("ledger unavailable (%s); the event will be redelivered", getattr(e, "message", e))
            self.stats.retried += 1
            await msg.nak(delay=RETRY_DELAY_S)
            return
        if stored:
            self.stats.stored += 1
        else:
            self.stats.repeated += 1
        await msg.ack()

    def _drop(self, reason: str, counter: str) -> None:
        log.warning("billing consumer: dropped %s", reason)
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self.stats.reasons.append(reason)
