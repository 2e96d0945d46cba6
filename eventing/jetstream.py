"""The event log (`eventing/eventlog.py`) on NATS JetStream: the stream, publishing with Nats-Msg-Id, durable pull
consumers and acks. nats-py errors are caught here, by type, and become `EventLogUnavailable`.

Names (any NATS client can use them)
    stream   ``TURBOFLOW_EVENTS`` (file storage, duplicate window 2 h, limits retention, 7 days, 1 MiB messages)
    subjects ``turboflow.events.<type>``, e.g. ``turboflow.events.io.turboflow.video.completed`` (characters
             outside ``[A-Za-z0-9_-]`` in a type become ``_``; dots stay token separators).
    messages the CloudEvents NATS binding (`eventing/nats_binding.py`), binary mode; ``Nats-Msg-Id`` =
             ``msg_id(source, id)``, so JetStream stores an event once per CloudEvents identity.
    durables the consumer name with characters outside ``[A-Za-z0-9_-]`` as ``_``
             (the broker's: ``trigger-<namespace>-<trigger>``).
"""

from __future__ import annotations

import asyncio
import logging
import re

import nats
import nats.errors
import nats.js.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from .eventlog import Appended, EventLogUnavailable, content_fingerprint
from .nats_binding import from_nats, to_nats

log = logging.getLogger(__name__)

STREAM = "TURBOFLOW_EVENTS"
SUBJECT_PREFIX = "turboflow.events"
# Longer than a request can spend in delivery (triggers.yaml: 8 attempts x 10 min + 635 s of backoff ~ 91 min), so
# a reply or a re-sent request is still recognised at the end of it; the cluster channel uses the same 2h.
DUPLICATE_WINDOW_S = 7200.0
MAX_AGE_S = 7 * 24 * 3600.0
MAX_MSG_SIZE = 1 << 20  # JetStream's hard limit
# what "the log is away" looks like from nats-py: connection closed/reconnecting, no responders, timeouts, and the
# JetStream API's own errors (a stream or consumer being re-created); asyncio's timeout from inside fetch()
_TRANSPORT_ERRORS = (nats.errors.Error, asyncio.TimeoutError)


def subject_for(event_type: str, prefix: str = SUBJECT_PREFIX) -> str:
    """The subject an event of `event_type` is stored under."""
    tokens = [re.sub(r"[^A-Za-z0-9_-]", "_", t) or "_" for t in str(event_type).split(".")]
    return ".".join([prefix, *tokens])


def durable_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


async def ensure_stream(
    js, stream: str = STREAM, prefix: str = SUBJECT_PREFIX, duplicate_window: float = DUPLICATE_WINDOW_S
) -> None:
    """Create (or update) the events stream: file storage, explicit duplicate window, limits retention."""
    cfg = StreamConfig(
        name=stream,
        subjects=[f"{prefix}.>"],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=MAX_AGE_S,
        duplicate_window=duplicate_window,
        max_msg_size=MAX_MSG_SIZE,
        num_replicas=1,
    )
    try:
        await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(cfg)
    else:
        await js.update_stream(cfg)


async def publish_event(js, event, *, mode: str = "binary", prefix: str = SUBJECT_PREFIX, timeout: float = 5.0):
    """Store one CloudEvent in the stream (NATS binding, Nats-Msg-Id = msg_id(source, id)). Returns the PubAck
    (`.duplicate` is True when JetStream already had that source + id; `.seq` is then the stored message's)."""
    headers, payload = to_nats(event, mode)
    return await js.publish(subject_for(event.get_type(), prefix), payload, headers=headers, timeout=timeout)


class JetStreamMessage:
    """A stored message handed out by a pull consumer (`eventlog.LoggedMessage`)."""

    def __init__(self, msg, stream: str, prefix: str):
        self._msg, self._stream, self._prefix = msg, stream, prefix
        self.headers, self.payload = msg.headers, msg.data

    @property
    def stored_type(self) -> str:
        subject = self._msg.subject
        return subject[len(self._prefix) + 1 :] if subject.startswith(self._prefix + ".") else subject

    @property
    def address(self) -> str:
        return f"nats:{self._msg.subject}"

    @property
    def position(self) -> str:
        return f"{self._stream}-{self._msg.metadata.sequence.stream}"

    async def ack(self) -> None:
        try:
            await self._msg.ack_sync(timeout=2)
        except _TRANSPORT_ERRORS as e:
            raise EventLogUnavailable(f"ack: {type(e).__name__}") from e

    async def nak(self, delay: float) -> None:
        try:
            await self._msg.nak(delay=delay)
        except _TRANSPORT_ERRORS as e:
            raise EventLogUnavailable(f"nak: {type(e).__name__}") from e

    async def in_progress(self) -> None:
        try:
            await self._msg.in_progress()
        except _TRANSPORT_ERRORS as e:
            raise EventLogUnavailable(f"in_progress: {type(e).__name__}") from e


class JetStreamConsumer:
    """A durable pull consumer over the whole stream (explicit acks, redelivered without limit)."""

    def __init__(self, js, stream: str, prefix: str, name: str, config: ConsumerConfig):
        self._js, self._stream, self._prefix, self._name, self._config = js, stream, prefix, name, config
        self._psub = None

    async def next(self, timeout: float) -> JetStreamMessage | None:
        try:
            if self._psub is None:
                self._psub = await self._js.pull_subscribe(
                    f"{self._prefix}.>", durable=self._name, stream=self._stream, config=self._config
                )
            (msg,) = await self._psub.fetch(1, timeout=timeout)
        except nats.errors.TimeoutError:
            return None  # nothing new
        except nats.js.errors.APIError as e:
            # a deleted consumer answers "no responders" (ServiceUnavailableError): subscribe again, which
            # re-creates it from the same config and resumes where the stream starts
            if await self._gone():
                log.warning("consumer %s was deleted: re-creating it", self._name)
                await self._drop_subscription()
            raise EventLogUnavailable(f"fetch: {type(e).__name__}") from e
        except _TRANSPORT_ERRORS as e:
            raise EventLogUnavailable(f"fetch: {type(e).__name__}") from e
        return JetStreamMessage(msg, self._stream, self._prefix)

    async def _gone(self) -> bool:
        try:
            await self._js.consumer_info(self._stream, self._name)
        except nats.js.errors.NotFoundError:
            return True
        except _TRANSPORT_ERRORS:
            return False
        return False

    async def _drop_subscription(self) -> None:
        psub, self._psub = self._psub, None
        if psub is not None:
            try:
                await psub.unsubscribe()
            except _TRANSPORT_ERRORS:
                pass

    async def close(self) -> None:
        await self._drop_subscription()


class JetStreamLog:
    """The event log on one JetStream stream (`eventlog.EventLog`). `connect()` opens the connection, keeps
    reconnecting for ever, and makes sure the stream exists."""

    max_event_bytes = MAX_MSG_SIZE

    def __init__(self, js, *, stream: str = STREAM, prefix: str = SUBJECT_PREFIX, nc=None):
        self.js, self.nc, self.stream, self.prefix = js, nc, stream, prefix

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        client_name: str,
        stream: str = STREAM,
        prefix: str = SUBJECT_PREFIX,
        duplicate_window: float = DUPLICATE_WINDOW_S,
    ) -> JetStreamLog:
        nc = await nats.connect(
            url, max_reconnect_attempts=-1, reconnect_time_wait=0.25, connect_timeout=2, name=client_name
        )
        js = nc.jetstream()
        await ensure_stream(js, stream, prefix, duplicate_window)
        return cls(js, stream=stream, prefix=prefix, nc=nc)

    @property
    def server_name(self) -> str | None:
        """The name of the NATS server this connection reached (to check it is the intended one)."""
        info = getattr(self.nc, "_server_info", None) or {}
        return info.get("server_name")

    async def append(self, event) -> Appended:
        try:
            ack = await publish_event(self.js, event, prefix=self.prefix)
        except _TRANSPORT_ERRORS as e:
            raise EventLogUnavailable(f"publish: {type(e).__name__}") from e
        if not ack.duplicate:
            return Appended.NEW
        stored = await self._stored_event(ack.seq)
        if stored is not None and content_fingerprint(stored) != content_fingerprint(event):
            return Appended.CONFLICT
        return Appended.DUPLICATE

    async def _stored_event(self, seq: int | None):
        """The event JetStream stores at `seq` (None when it is gone or unreadable: nothing to compare)."""
        if not seq:
            return None
        try:
            raw = await self.js.get_msg(self.stream, seq)
        except nats.js.errors.NotFoundError:
            return None  # aged out of the stream
        except _TRANSPORT_ERRORS as e:
            raise EventLogUnavailable(f"get_msg: {type(e).__name__}") from e
        try:
            return from_nats(raw.headers, raw.data)
        except ValueError:
            return None  # a message only a direct publisher could have stored

    async def consumer(self, name: str, *, ack_wait: float, max_pending: int) -> JetStreamConsumer:
        durable = durable_name(name)
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait,
            max_deliver=-1,
            max_ack_pending=max_pending,
        )
        return JetStreamConsumer(self.js, self.stream, self.prefix, durable, config)

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.close(), 5)
            except _TRANSPORT_ERRORS:
                pass
