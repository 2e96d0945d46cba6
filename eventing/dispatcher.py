"""Knative delivery for each Trigger, over an event log (`eventing/eventlog.py`): what eventing-natss's dispatcher
does. No NATS here: the log is JetStream in the broker and in-memory in the unit tests.

Per Trigger: one durable consumer over the whole log, at most `max_inflight` deliveries at a time, AckWait =
delivery timeout + `ack_margin`, and `in_progress` every AckWait/4 while a delivery (or its backoff) is under way.

Delivery rules
    filters     an event the Trigger's filters do not match is acked and not sent.
    send        binary-mode HTTP POST to the subscriber, within the Trigger's `timeout` (Knative's 30 s when
                unset); with a readiness gate for that URL, the attempt first waits (up to the timeout) for it to
                answer 200, like Knative's activator holding a request for a pod that is not ready yet.
    retry       5xx, 408, 429, timeouts and connection errors are retried `retry` times, attempt n after
                `delivery.backoff(n)` (linear: delay * n, exponential: delay * 2^(n-1)); other 4xx are terminal.
    reply       a CloudEvent in a 2xx response is appended to the log (its own id, so a repeat is a duplicate).
    dead letter exhausted or terminal: the event goes to the Trigger's dead-letter sink with `knativeerrorcode`
                (last status, absent after a timeout), `knativeerrordest` (the subscriber URL) and
                `knativeerrordata` (base64 of the first KiB of the last response body); its reply is appended
                too. Without a sink the event is dropped (logged).
    poison      a stored message that is not a readable CloudEvent (no id, data that is not JSON, JSON nested
                too deep) is never dropped: the Trigger its type matches - else the first Trigger - sends what can
                be recovered of it (id, type, source, tenant) to its dead-letter sink with `turboflowerror` =
                `undecodable_event` | `invalid_data`, `knativeerrordest` = where it is stored and
                `knativeerrordata` = why.
    ack         only once all of that finished; when the dead-letter sink is down too (or the log fails), the
                message is nak'ed with the backoff delay and tried again later. A broker killed mid-delivery
                loses nothing: the log hands the message out again after AckWait.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass

import httpx
from cloudevents.core.bindings.http import to_binary_event

from .eventlog import Appended, EventLog, EventLogUnavailable, LoggedMessage
from .nats_binding import (
    ExactCloudEvent,
    from_nats,
    is_cloudevent_http,
    parse_http,
    recover_attributes,
    undecodable_json_data,
)
from .triggers import Trigger

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0  # Knative's default when a Trigger sets none
RETRYABLE_STATUS = {408, 429}  # besides every 5xx
ERROR_DATA_LIMIT = 1024
ERROR_EXTENSION = "turboflowerror"  # why the broker itself dead-lettered a stored message
UNDECODABLE = "undecodable_event"
INVALID_DATA = "invalid_data"
ACK_ATTEMPTS, ACK_PAUSE_S = 50, 0.2  # ~10 s of retrying an unconfirmed ack before leaving it to redelivery
REPLY_DEADLINE_S = 300.0  # how long a reply is retried into a log that is away


def is_retryable(status: int) -> bool:
    """Knative's rule: 5xx, 408 (timeout) and 429 (too many requests) are worth another attempt."""
    return status >= 500 or status in RETRYABLE_STATUS


def encode_error_data(body: bytes) -> str:
    """`knativeerrordata`: base64 of the first ERROR_DATA_LIMIT bytes of the last response body."""
    return base64.b64encode(body[:ERROR_DATA_LIMIT]).decode()


def decode_error_data(value: str | None) -> str:
    """`knativeerrordata` as text (base64 as Knative sends it; raw text tolerated)."""
    if not value:
        return ""
    try:
        raw = base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        return value
    return raw.decode("utf-8", "replace")


def consumer_name(trigger: Trigger) -> str:
    return f"trigger-{trigger.namespace}-{trigger.name}"


class Undeliverable(Exception):
    """Every attempt failed (or one was terminal): the last status (None: no answer), body, URL and why."""

    def __init__(self, status: int | None, body: bytes, dest: str, reason: str):
        super().__init__(reason)
        self.status, self.body, self.dest, self.reason = status, body, dest, reason


@dataclass
class DeliveryStats:
    delivered: int = 0
    retries: int = 0
    dead_lettered: int = 0
    replies: int = 0


class Dispatcher:
    """Delivers the log's events to the Triggers' subscribers (see the module doc).

    targets: Trigger name -> (subscriber URL, dead-letter URL or None), resolved by the caller.
    gates: optional subscriber URL -> readiness URL (see `send` in the module doc).
    source: the CloudEvents source of the stand-in events for poison messages.
    """

    def __init__(
        self,
        event_log: EventLog,
        triggers: list[Trigger],
        targets: Mapping[str, tuple[str, str | None]],
        *,
        gates: Mapping[str, str] | None = None,
        max_inflight: int = 2,
        ack_margin: float = 30.0,
        source: str = "/turboflow/broker",
    ):
        self.log, self.triggers, self.targets = event_log, list(triggers), dict(targets)
        self.gates, self.max_inflight, self.ack_margin = dict(gates or {}), max_inflight, ack_margin
        self.source = source
        self.stats = DeliveryStats()
        self._tasks: list[asyncio.Task] = []
        self._inflight: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()
        self._http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._http = httpx.AsyncClient(limits=httpx.Limits(max_connections=64))
        for trigger in self.triggers:
            self._tasks.append(asyncio.create_task(self._consume(trigger), name=f"trigger:{trigger.name}"))

    async def stop(self) -> None:
        self._stopping.set()
        for task in [*self._tasks, *self._inflight]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._inflight, return_exceptions=True)
        self._tasks.clear()
        if self._http:
            await self._http.aclose()

    def ack_wait(self, trigger: Trigger) -> float:
        return (trigger.delivery.timeout or DEFAULT_TIMEOUT_S) + self.ack_margin

    # -- consuming -----------------------------------------------------------------------------------------------
    async def _consume(self, trigger: Trigger) -> None:
        consumer = await self.log.consumer(
            consumer_name(trigger), ack_wait=self.ack_wait(trigger), max_pending=max(self.max_inflight * 4, 16)
        )
        slots = asyncio.Semaphore(self.max_inflight)
        try:
            while not self._stopping.is_set():
                await slots.acquire()
                try:
                    msg = await consumer.next(timeout=1.0)
                except EventLogUnavailable as e:  # NATS restarting, consumer being re-created: keep going
                    slots.release()
                    log.debug("trigger %s: consumer: %s", trigger.name, e)
                    await asyncio.sleep(0.25)
                    continue
                except BaseException:
                    slots.release()
                    raise
                if msg is None:
                    slots.release()
                    continue
                task = asyncio.create_task(self._handle(trigger, msg))
                self._inflight.add(task)
                task.add_done_callback(lambda t: (self._inflight.discard(t), slots.release()))
        finally:
            await consumer.close()

    async def _keepalive(self, msg: LoggedMessage, trigger: Trigger) -> None:
        every = max(self.ack_wait(trigger) / 4, 0.2)
        while True:
            await asyncio.sleep(every)
            try:
                await msg.in_progress()
            except EventLogUnavailable:  # briefly away: AckWait is generous
                pass

    async def _handle(self, trigger: Trigger, msg: LoggedMessage) -> None:
        unreadable = _unreadable(msg)
        if unreadable is not None:
            event, deliver = self._poison_event(msg, *unreadable), self._dead_letter_poison
            if not self._owns_poison(trigger, dict(event.get_attributes())):
                return await _quiet(msg.ack())
        else:
            event, deliver = from_nats(msg.headers, msg.payload), self._deliver
            if not trigger.matches(dict(event.get_attributes())):
                return await _quiet(msg.ack())
        keepalive = asyncio.create_task(self._keepalive(msg, trigger))
        try:
            outcome = await deliver(trigger, event)
            log.debug("trigger %s: event %s %s", trigger.name, event.get_id(), outcome)
            await self._ack(msg)
        except asyncio.CancelledError:
            raise  # stopping: no ack, the log hands it out again after AckWait
        except (Undeliverable, EventLogUnavailable) as e:  # the dead-letter sink or the log is down too
            log.warning("trigger %s: event %s not finished (%s): redelivering later", trigger.name, event.get_id(), e)
            await _quiet(msg.nak(delay=max(trigger.delivery.backoff_delay, 1.0)))
        finally:
            keepalive.cancel()

    async def _ack(self, msg: LoggedMessage) -> None:
        for _ in range(ACK_ATTEMPTS):
            try:
                return await msg.ack()
            except EventLogUnavailable:
                await asyncio.sleep(ACK_PAUSE_S)
        log.warning("could not ack a finished delivery; it will be redelivered (replies are de-duplicated)")

    # -- delivery rules ------------------------------------------------------------------------------------------
    async def _deliver(self, trigger: Trigger, event) -> str:
        url, dead_letter = self.targets[trigger.name]
        try:
            await self._send_and_reply(trigger, url, event)
            self.stats.delivered += 1
            return "delivered"
        except Undeliverable as failure:
            log.warning(
                "trigger %s: event %s undeliverable to %s: %s", trigger.name, event.get_id(), url, failure.reason
            )
            if dead_letter is None:
                return "dropped"
            await self._send_and_reply(trigger, dead_letter, dead_letter_event(event, failure))
            self.stats.dead_lettered += 1
            return "dead_lettered"

    async def _dead_letter_poison(self, trigger: Trigger, stand_in) -> str:
        log.warning(
            "trigger %s: stored message %s is not deliverable (%s): dead-lettering it",
            trigger.name,
            stand_in.get_id(),
            decode_error_data(stand_in.get_attributes().get("knativeerrordata")),
        )
        _, dead_letter = self.targets[trigger.name]
        if dead_letter is None:
            log.error("trigger %s: no dead-letter sink: %s is acked without a failed event", trigger.name, stand_in)
            return "dropped"
        await self._send_and_reply(trigger, dead_letter, stand_in)
        self.stats.dead_lettered += 1
        return "dead_lettered"

    def _owns_poison(self, trigger: Trigger, attrs: Mapping[str, str]) -> bool:
        """Exactly one Trigger dead-letters an unreadable message: the one its type matches, else the first."""
        if trigger.matches(attrs):
            return True
        return trigger is self.triggers[0] and not any(t.matches(attrs) for t in self.triggers)

    def _poison_event(self, msg: LoggedMessage, code: str, reason: str) -> ExactCloudEvent:
        """A stand-in CloudEvent for an unreadable stored message: what could be recovered of it, plus why."""
        attrs = recover_attributes(msg.headers, msg.payload)
        attrs.setdefault("type", msg.stored_type)
        attrs.setdefault("id", msg.position)
        attrs.setdefault("source", self.source)
        attrs.update(
            {
                ERROR_EXTENSION: code,
                "knativeerrordest": msg.address,
                "knativeerrordata": encode_error_data(reason.encode()),
            }
        )
        return ExactCloudEvent(attrs)

    async def _send_and_reply(self, trigger: Trigger, url: str, event) -> None:
        reply = await self._send_with_retries(trigger, url, event)
        if reply is not None:
            await self._append_reply(reply)

    async def _send_with_retries(self, trigger: Trigger, url: str, event):
        """The reply event of the first 2xx answer (None when it has none); Undeliverable after the last try."""
        d = trigger.delivery
        timeout = d.timeout or DEFAULT_TIMEOUT_S
        msg = to_binary_event(event)
        body = bytes(msg.body or b"")
        status, last_body, reason = None, b"", ""
        for attempt in range(d.retry + 1):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(d.backoff(attempt))
            await self._wait_ready(url, timeout)
            try:
                resp = await self._http.post(url, headers=dict(msg.headers), content=body, timeout=timeout)
            except httpx.TimeoutException:
                status, last_body, reason = None, b"", f"no answer within {timeout:g}s"
                continue
            except httpx.HTTPError as e:
                status, last_body, reason = None, b"", f"{type(e).__name__}: {e}"
                continue
            status, last_body = resp.status_code, resp.content
            if 200 <= status < 300:
                return reply_event(resp)
            reason = f"HTTP {status}"
            if not is_retryable(status):
                break  # other 4xx: terminal, straight to the dead-letter sink
        raise Undeliverable(status, last_body, url, reason)

    async def _wait_ready(self, url: str, limit: float) -> None:
        gate = self.gates.get(url)
        if not gate:
            return
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                if (await self._http.get(gate, timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)

    async def _append_reply(self, reply) -> None:
        deadline = time.monotonic() + REPLY_DEADLINE_S
        while True:
            try:
                appended = await self.log.append(reply)
                break
            except EventLogUnavailable as e:
                if time.monotonic() > deadline:
                    raise
                log.debug("appending reply %s: %s; retrying", reply.get_id(), e)
                await asyncio.sleep(0.25)
        if appended is Appended.NEW:
            self.stats.replies += 1
        elif appended is Appended.CONFLICT:
            log.warning("reply %s reuses the id of another stored event: not stored", reply.get_id())


def dead_letter_event(event, failure: Undeliverable):
    """The event as the dead-letter sink gets it: the original plus Knative's error extensions."""
    attrs = dict(event.get_attributes())
    attrs["knativeerrordest"] = failure.dest
    if failure.status is not None:
        attrs["knativeerrorcode"] = str(failure.status)
    if failure.body:
        attrs["knativeerrordata"] = encode_error_data(failure.body)
    return type(event)(attributes=attrs, data=event.get_data())


def reply_event(resp: httpx.Response):
    """The CloudEvent in a subscriber's 2xx response; None for an empty or plain body, or an invalid event."""
    headers = {k.lower(): v for k, v in resp.headers.items()}
    if not resp.content and "ce-id" not in headers:
        return None
    if not is_cloudevent_http(headers):
        return None
    try:
        return parse_http(headers, resp.content)
    except ValueError as e:
        log.warning("subscriber replied with an invalid CloudEvent (%s): ignored", e)
        return None


def _unreadable(msg: LoggedMessage) -> tuple[str, str] | None:
    """(code, reason) when a stored message cannot be delivered as a CloudEvent; None when it can."""
    try:
        from_nats(msg.headers, msg.payload)
    except ValueError as e:
        return UNDECODABLE, str(e)
    reason = undecodable_json_data(msg.headers, msg.payload)
    return (INVALID_DATA, reason) if reason else None


async def _quiet(aw: Awaitable) -> None:
    try:
        await aw
    except EventLogUnavailable:  # an ack of a skipped message: it comes back after AckWait and is skipped again
        pass
