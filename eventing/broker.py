"""The local broker: Knative Broker semantics on a real nats-server with JetStream, driven by the Trigger YAML.

Names (any NATS client can use them)
    stream   ``TURBOFLOW_EVENTS`` (file storage, duplicate window 2 h, limits retention, 7 days)
    subjects ``turboflow.events.<type>``, e.g. ``turboflow.events.io.turboflow.video.completed``,
             ``turboflow.events.io.turboflow.video.failed``, ``turboflow.events.io.turboflow.video.t2v.requested``
             (characters outside ``[A-Za-z0-9_-]`` in a type become ``_``; dots stay token separators).
    messages the CloudEvents NATS binding (`eventing/nats_binding.py`): the broker stores binary mode, i.e.
             ``ce-*`` headers and the data (JSON) as payload; ``Nats-Msg-Id`` = ``msg_id(source, id)`` (hex
             SHA-256 of ``[source, id]``: CloudEvents identity is source + id, so another producer reusing an id
             is not mistaken for a duplicate). Producers may publish either mode directly to a subject under
             ``turboflow.events.`` (set Nats-Msg-Id with ``nats_binding.msg_id``).
    durables ``trigger-<namespace>-<trigger>`` (one JetStream pull consumer per Trigger).

Ingress (shaped like Knative's broker ingress)
    ``POST /{namespace}/{broker}`` a CloudEvent (binary or structured) -> 202 once JetStream has stored it
    (PubAck; an identical re-send is 202 too), 400 for a body that is not a CloudEvent (missing `id` or
    `specversion`, a header that is not UTF-8, JSON data that does not parse or nests deeper than 64 levels, a
    `tenant` extension that is not a string), 403 for a turboflow reply type (`io.turboflow.*` other than
    `*.requested`) without a valid `turboflowsig` when a signing key is configured, 404 for another broker,
    409 for an id that this source already used for different content, 503 if NATS cannot store it.
    Nothing is added: an event without `time` is stored without one. ``GET /healthz`` -> 200.

Dispatcher (what eventing-natss's dispatcher does for a Trigger)
    For each Trigger in the YAML: a durable pull consumer over the whole stream, explicit acks, AckWait longer
    than the delivery timeout, in-progress acks while a delivery (or backoff) is under way. Events matching the
    Trigger's filters are POSTed (binary mode) to the subscriber; 2xx ends the delivery and a CloudEvent in the
    response is published back into the stream (its own id, so a repeated reply is de-duplicated); 5xx, 408,
    429, timeouts and connection errors are retried `retry` times with the Trigger's backoff; other 4xx and
    exhausted retries go to the dead-letter sink with the extensions `knativeerrorcode`, `knativeerrordest`,
    `knativeerrordata` (base64 of the first KiB of the last response body), and its reply is published too.
    A message is acked only once all that is finished, so a broker or function killed mid-delivery loses
    nothing: JetStream redelivers it after AckWait (or the dispatcher's retry hits the restarted function).
    A stored message that is not a readable CloudEvent (published straight to NATS: no id, data that is not
    JSON, JSON nested too deep) is never dropped: the Trigger its type (header or subject) matches - else the
    first Trigger - sends what can be recovered of it (id, type, source, tenant) to its dead-letter sink with
    the extension `turboflowerror` (`undecodable_event` or `invalid_data`), and the sink answers a `failed`
    event linked to the request id.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass

import httpx
from cloudevents.core.bindings.http import to_binary_event

from . import signing
from .asgi import HeaderEncodingError, lifespan, read_body, request_headers, respond
from .nats_binding import (
    CE_PREFIX,
    ExactCloudEvent,
    from_nats,
    is_cloudevent_http,
    parse_http,
    recover_attributes,
    to_nats,
)
from .triggers import Trigger, attribute_text
from .types import TENANT_EXTENSION

log = logging.getLogger(__name__)

STREAM = "TURBOFLOW_EVENTS"
SUBJECT_PREFIX = "turboflow.events"
# Longer than a request can spend in delivery (triggers.yaml: 8 attempts x 10 min + 635 s of backoff ~ 91 min), so
# a reply or a re-sent request is still recognised at the end of it; the cluster channel uses the same 2h.
DUPLICATE_WINDOW_S = 7200.0
MAX_AGE_S = 7 * 24 * 3600.0
MAX_MSG_SIZE = 1 << 20  # JetStream's hard limit
DEFAULT_TIMEOUT_S = 30.0  # Knative's default when a Trigger sets none
RETRYABLE_STATUS = {408, 429}
ERROR_DATA_LIMIT = 1024
ERROR_EXTENSION = "turboflowerror"  # why the broker itself dead-lettered a stored message
UNDECODABLE = "undecodable_event"
INVALID_DATA = "invalid_data"
REPLY_TYPE_PREFIX = "io.turboflow."


class IngressRejection(Exception):
    """An ingress request answered with a 4xx (status + a body saying why)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def is_reply_type(event_type: str) -> bool:
    """turboflow's own output types (completed, failed, anything io.turboflow.* that is not a request)."""
    return str(event_type).startswith(REPLY_TYPE_PREFIX) and not str(event_type).endswith(".requested")


def _is_json_type(content_type) -> bool:
    media = str(content_type or "").split(";")[0].strip().lower()
    return media in ("application/json", "text/json") or media.endswith("+json")


def undecodable_json_data(headers: Mapping[str, str], body: bytes) -> str | None:
    """Why a binary-mode JSON body does not parse (None when it does, or when it is not JSON/binary)."""
    low = {k.lower(): v for k, v in headers.items()}
    if not any(k.startswith(CE_PREFIX) for k in low) or not body or not _is_json_type(low.get("content-type")):
        return None
    try:
        json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return f"data is not valid JSON ({type(e).__name__}: {str(e)[:120]})"
    return None


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


def subject_for(event_type: str, prefix: str = SUBJECT_PREFIX) -> str:
    """The subject an event of `event_type` is stored under."""
    tokens = [re.sub(r"[^A-Za-z0-9_-]", "_", t) or "_" for t in str(event_type).split(".")]
    return ".".join([prefix, *tokens])


def durable_name(trigger: Trigger) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"trigger-{trigger.namespace}-{trigger.name}")


async def ensure_stream(
    js, stream: str = STREAM, prefix: str = SUBJECT_PREFIX, duplicate_window: float = DUPLICATE_WINDOW_S
) -> None:
    """Create (or update) the events stream: file storage, explicit duplicate window, limits retention."""
    from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
    from nats.js.errors import NotFoundError

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
    except NotFoundError:
        await js.add_stream(cfg)
    else:
        await js.update_stream(cfg)


async def publish_event(js, event, *, mode: str = "binary", prefix: str = SUBJECT_PREFIX, timeout: float = 5.0):
    """Store one CloudEvent in the stream (NATS binding, Nats-Msg-Id = msg_id(source, id)). Returns the PubAck
    (`.duplicate` is True when JetStream already had that source + id; `.seq` is then the stored message's)."""
    headers, payload = to_nats(event, mode)
    return await js.publish(subject_for(event.get_type(), prefix), payload, headers=headers, timeout=timeout)


def _attributes(event) -> dict:
    return dict(event.get_attributes())


class Undeliverable(Exception):
    def __init__(self, status: int | None, body: bytes, dest: str, reason: str):
        super().__init__(reason)
        self.status, self.body, self.dest, self.reason = status, body, dest, reason


@dataclass
class DeliveryStats:
    delivered: int = 0
    retries: int = 0
    dead_lettered: int = 0
    replies: int = 0


class Broker:
    """Ingress + dispatcher for one broker (`namespace/name`) on a NATS server.

    addresses: maps a Destination ref (`kind/namespace/name` or `name`) to a base URL.
    gates: optional URL -> readiness URL; before each attempt the dispatcher waits (up to the delivery timeout)
        until the readiness URL answers 200, like Knative's activator holding a request for a pod that is not
        ready yet. Without a gate, a subscriber that is down is simply retried.
    signing_key: the deployment's TURBOFLOW_EVENT_SIGNING_KEY; with it the ingress refuses turboflow reply types
        that do not carry a valid `turboflowsig` (nobody else may post a completion).
    """

    def __init__(
        self,
        nats_url: str,
        triggers: list[Trigger],
        addresses: Mapping[str, str],
        *,
        namespace: str = "turboflow",
        name: str = "default",
        gates: Mapping[str, str] | None = None,
        stream: str = STREAM,
        prefix: str = SUBJECT_PREFIX,
        max_inflight: int = 2,
        duplicate_window: float = DUPLICATE_WINDOW_S,
        ack_margin: float = 30.0,
        signing_key: bytes | None = None,
    ):
        self.signing_key = signing_key
        self.nats_url, self.namespace, self.name = nats_url, namespace, name
        self.triggers = [t for t in triggers if t.broker == name and t.namespace == namespace]
        if not self.triggers:
            log.warning("no Trigger for broker %s/%s: events are stored but not delivered", namespace, name)
        self.addresses, self.gates = dict(addresses), dict(gates or {})
        self.stream, self.prefix, self.max_inflight = stream, prefix, max_inflight
        self.duplicate_window, self.ack_margin = duplicate_window, ack_margin
        self.stats = DeliveryStats()
        self.nc = self.js = None
        self._tasks: list[asyncio.Task] = []
        self._inflight: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()
        self._http: httpx.AsyncClient | None = None
        # resolve every destination now: a Trigger the broker cannot route fails at start, not per event
        self._targets = {
            t.name: (
                t.subscriber.resolve(self.addresses),
                t.delivery.dead_letter.resolve(self.addresses) if t.delivery.dead_letter else None,
            )
            for t in self.triggers
        }

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        import nats

        self.nc = await nats.connect(
            self.nats_url,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            connect_timeout=2,
            name=f"turboflow-broker-{self.namespace}-{self.name}",
        )
        self.js = self.nc.jetstream()
        await ensure_stream(self.js, self.stream, self.prefix, self.duplicate_window)
        self._http = httpx.AsyncClient(limits=httpx.Limits(max_connections=64))
        for trigger in self.triggers:
            self._tasks.append(asyncio.create_task(self._consume(trigger), name=f"trigger:{trigger.name}"))
        log.info(
            "broker %s/%s: stream %s, subjects %s.>, triggers %s",
            self.namespace,
            self.name,
            self.stream,
            self.prefix,
            ", ".join(f"{t.name}->{self._targets[t.name][0]}" for t in self.triggers) or "none",
        )

    async def stop(self) -> None:
        self._stopping.set()
        for task in [*self._tasks, *self._inflight]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._inflight, return_exceptions=True)
        self._tasks.clear()
        if self._http:
            await self._http.aclose()
        if self.nc and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.close(), 5)
            except Exception:  # already gone
                pass

    # -- ingress -----------------------------------------------------------------------------------------------
    async def accept(self, event) -> bool:
        """Store an event; True if new, False if JetStream already had it (same source + id, same content).
        Raises IngressRejection(409) when that source + id is stored with different content."""
        ack = await publish_event(self.js, event, prefix=self.prefix)
        if not ack.duplicate:
            return True
        stored = await self._stored_event(ack.seq)
        if stored is not None and content_fingerprint(stored) != content_fingerprint(event):
            raise IngressRejection(
                409,
                f"duplicate event id {event.get_id()!r} from source {event.get_source()!r} "
                "with different content: an event id names one event; use a new id",
            )
        return False

    async def _stored_event(self, seq: int | None):
        """The event JetStream stores at `seq` (None when it is gone or unreadable: nothing to compare)."""
        if not seq:
            return None
        try:
            raw = await self.js.get_msg(self.stream, seq)
            return from_nats(raw.headers, raw.data)
        except Exception as e:  # aged out, or a message only a direct publisher could have stored
            log.debug("ingress: cannot read stored message %s: %s", seq, e)
            return None

    def _parse_ingress(self, headers: dict[str, str], body: bytes):
        """The CloudEvent of an ingress request, or IngressRejection (400/403) saying what is wrong."""
        if not is_cloudevent_http(headers):
            raise IngressRejection(
                400,
                "not a CloudEvent: need ce-* headers (binary) or "
                "Content-Type: application/cloudevents+json (structured)",
            )
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
                f"event {event.get_id()!r}: the {TENANT_EXTENSION!r} extension must be a "
                f"string, got {type(tenant).__name__}",
            )
        if (
            self.signing_key is not None
            and is_reply_type(event.get_type())
            and not signing.verify_event(event, self.signing_key)
        ):
            raise IngressRejection(
                403,
                f"{event.get_type()} is emitted by turboflow only: this event has no valid "
                f"{signing.SIGNATURE_EXTENSION} signature",
            )
        return event

    async def asgi(self, scope, receive, send) -> None:
        """The HTTP ingress (ASGI)."""
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["type"] != "http":
            return
        path, method = scope["path"].rstrip("/"), scope["method"]
        if path == "/healthz":
            return await respond(send, 200, b"ok")
        if path != f"/{self.namespace}/{self.name}":
            return await respond(send, 404, f"no broker at {path!r}; POST to /{self.namespace}/{self.name}".encode())
        if method != "POST":
            return await respond(send, 405, b"POST a CloudEvent", [(b"allow", b"POST")])
        body = await read_body(receive, MAX_MSG_SIZE)
        if body is None:
            return await respond(send, 413, b"event larger than 1 MiB (JetStream's limit)")
        try:
            event = self._parse_ingress(request_headers(scope), body)
        except HeaderEncodingError as e:
            return await respond(send, 400, f"not a valid CloudEvent: {e}".encode())
        except IngressRejection as e:
            return await respond(send, e.status, e.message.encode())
        try:
            await self.accept(event)
        except IngressRejection as e:
            return await respond(send, e.status, e.message.encode())
        except Exception as e:
            log.warning("ingress: cannot store event %s: %s", event.get_id(), e)
            return await respond(
                send, 503, f"cannot store the event now: {type(e).__name__}".encode(), [(b"retry-after", b"1")]
            )
        await respond(send, 202, b"")

    # -- dispatcher --------------------------------------------------------------------------------------------
    def _ack_wait(self, trigger: Trigger) -> float:
        return (trigger.delivery.timeout or DEFAULT_TIMEOUT_S) + self.ack_margin

    async def _consume(self, trigger: Trigger) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        durable = durable_name(trigger)
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self._ack_wait(trigger),
            max_deliver=-1,
            max_ack_pending=max(self.max_inflight * 4, 16),
        )
        slots = asyncio.Semaphore(self.max_inflight)
        psub = None
        while not self._stopping.is_set():
            try:
                if psub is None:
                    psub = await self.js.pull_subscribe(
                        f"{self.prefix}.>", durable=durable, stream=self.stream, config=config
                    )
                await slots.acquire()
                try:
                    msgs = await psub.fetch(1, timeout=1.0)
                except BaseException:
                    slots.release()
                    raise
                for msg in msgs:
                    task = asyncio.create_task(self._handle(trigger, msg))
                    self._inflight.add(task)
                    task.add_done_callback(lambda t: (self._inflight.discard(t), slots.release()))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # fetch timeouts, NATS restarting: keep going
                from nats.errors import TimeoutError as NatsTimeout

                if not isinstance(e, (NatsTimeout, asyncio.TimeoutError)):
                    log.debug("trigger %s: consumer: %s: %s", trigger.name, type(e).__name__, e)
                    await asyncio.sleep(0.25)
                    if "consumer" in str(e).lower() and "not found" in str(e).lower():
                        psub = None

    async def _keepalive(self, msg, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await msg.in_progress()
            except Exception:  # NATS briefly away: AckWait is generous
                pass

    def _owns_poison(self, trigger: Trigger, attrs: Mapping[str, str]) -> bool:
        """Exactly one Trigger dead-letters an unreadable message: the one its type matches, else the first."""
        if trigger.matches(attrs):
            return True
        return trigger is self.triggers[0] and not any(t.matches(attrs) for t in self.triggers)

    def _poison_event(self, msg, code: str, reason: str):
        """A stand-in CloudEvent for an unreadable stored message: what could be recovered of it, plus why."""
        attrs = recover_attributes(msg.headers, msg.data)
        attrs.setdefault(
            "type", msg.subject[len(self.prefix) + 1 :] if msg.subject.startswith(self.prefix + ".") else msg.subject
        )
        seq = getattr(getattr(msg, "metadata", None), "sequence", None)
        attrs.setdefault("id", f"{self.stream}-{getattr(seq, 'stream', 0)}")
        attrs.setdefault("source", f"/turboflow/broker/{self.namespace}/{self.name}")
        attrs.update(
            {
                ERROR_EXTENSION: code,
                "knativeerrordest": f"nats:{msg.subject}",
                "knativeerrordata": base64.b64encode(reason.encode()[:ERROR_DATA_LIMIT]).decode(),
            }
        )
        return ExactCloudEvent(attrs)

    def _unreadable(self, msg) -> tuple[str, str] | None:
        """(code, reason) when a stored message cannot be delivered as a CloudEvent; None when it can."""
        try:
            from_nats(msg.headers, msg.data)
        except ValueError as e:
            return UNDECODABLE, str(e)
        reason = undecodable_json_data(msg.headers or {}, msg.data)
        return (INVALID_DATA, reason) if reason else None

    async def _handle_poison(self, trigger: Trigger, msg, code: str, reason: str) -> None:
        stand_in = self._poison_event(msg, code, reason)
        if not self._owns_poison(trigger, _attributes(stand_in)):
            await _quiet(msg.ack())
            return
        log.warning(
            "trigger %s: stored message %s is not deliverable (%s): dead-lettering it",
            trigger.name,
            stand_in.get_id(),
            reason,
        )
        _, dead_letter = self._targets[trigger.name]
        keepalive = asyncio.create_task(self._keepalive(msg, max(self._ack_wait(trigger) / 4, 0.2)))
        try:
            if dead_letter is None:
                log.error(
                    "trigger %s: no dead-letter sink: message %s is acknowledged without a failed event",
                    trigger.name,
                    stand_in.get_id(),
                )
            else:
                reply = await self._send_with_retries(trigger, dead_letter, stand_in)
                self.stats.dead_lettered += 1
                if reply is not None:
                    await self._publish_reply(reply)
            await self._ack(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the dead-letter sink is down: keep the message, try again later
            log.warning(
                "trigger %s: dead-lettering %s failed (%s): redelivering later", trigger.name, stand_in.get_id(), e
            )
            await _quiet(msg.nak(delay=max(trigger.delivery.backoff_delay, 1.0)))
        finally:
            keepalive.cancel()

    async def _handle(self, trigger: Trigger, msg) -> None:
        unreadable = self._unreadable(msg)
        if unreadable is not None:
            return await self._handle_poison(trigger, msg, *unreadable)
        event = from_nats(msg.headers, msg.data)
        if not trigger.matches(_attributes(event)):
            await _quiet(msg.ack())
            return
        keepalive = asyncio.create_task(self._keepalive(msg, max(self._ack_wait(trigger) / 4, 0.2)))
        try:
            outcome = await self._deliver(trigger, event)
            log.debug("trigger %s: event %s %s", trigger.name, event.get_id(), outcome)
            await self._ack(msg)
        except asyncio.CancelledError:
            raise  # broker stopping: no ack, JetStream redelivers after AckWait
        except Exception as e:
            log.warning("trigger %s: event %s not finished (%s): redelivering later", trigger.name, event.get_id(), e)
            await _quiet(msg.nak(delay=max(trigger.delivery.backoff_delay, 1.0)))
        finally:
            keepalive.cancel()

    async def _ack(self, msg) -> None:
        for _ in range(50):
            try:
                await msg.ack_sync(timeout=2)
                return
            except Exception:
                await asyncio.sleep(0.2)
        log.warning("could not ack a finished delivery; JetStream will redeliver it (replies are de-duplicated)")

    async def _deliver(self, trigger: Trigger, event) -> str:
        url, dead_letter = self._targets[trigger.name]
        try:
            reply = await self._send_with_retries(trigger, url, event)
            self.stats.delivered += 1
            if reply is not None:
                await self._publish_reply(reply)
            return "delivered"
        except Undeliverable as failure:
            log.warning(
                "trigger %s: event %s undeliverable to %s: %s", trigger.name, event.get_id(), url, failure.reason
            )
            if dead_letter is None:
                return "dropped"
            attrs = _attributes(event)
            attrs["knativeerrordest"] = failure.dest
            if failure.status is not None:
                attrs["knativeerrorcode"] = str(failure.status)
            if failure.body:
                attrs["knativeerrordata"] = base64.b64encode(failure.body[:ERROR_DATA_LIMIT]).decode()
            dlq_event = type(event)(attributes=attrs, data=event.get_data())
            reply = await self._send_with_retries(trigger, dead_letter, dlq_event)  # Undeliverable -> nak later
            self.stats.dead_lettered += 1
            if reply is not None:
                await self._publish_reply(reply)
            return "dead_lettered"

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

    async def _send_with_retries(self, trigger: Trigger, url: str, event):
        d = trigger.delivery
        timeout = d.timeout or DEFAULT_TIMEOUT_S
        msg = to_binary_event(event)
        body = msg.body if isinstance(msg.body, (bytes, bytearray)) else (msg.body or b"")
        status, last_body, reason = None, b"", ""
        for attempt in range(d.retry + 1):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(d.backoff(attempt))
            await self._wait_ready(url, timeout)
            try:
                resp = await self._http.post(url, headers=dict(msg.headers), content=bytes(body), timeout=timeout)
            except httpx.TimeoutException:
                status, last_body, reason = None, b"", f"no answer within {timeout:g}s"
                continue
            except httpx.HTTPError as e:
                status, last_body, reason = None, b"", f"{type(e).__name__}: {e}"
                continue
            status, last_body = resp.status_code, resp.content
            if 200 <= status < 300:
                return _reply_event(resp)
            reason = f"HTTP {status}"
            if not (status >= 500 or status in RETRYABLE_STATUS):
                break  # other 4xx: terminal, straight to the dead-letter sink
        raise Undeliverable(status, last_body, url, reason)

    async def _publish_reply(self, reply) -> None:
        deadline = time.monotonic() + 300
        while True:
            try:
                ack = await publish_event(self.js, reply, prefix=self.prefix)
                self.stats.replies += 0 if ack.duplicate else 1
                return
            except Exception as e:
                if time.monotonic() > deadline:
                    raise
                log.debug("publishing reply %s: %s; retrying", reply.get_id(), e)
                await asyncio.sleep(0.25)


def _reply_event(resp: httpx.Response):
    headers = {k.lower(): v for k, v in resp.headers.items()}
    if not resp.content and "ce-id" not in headers:
        return None
    if not is_cloudevent_http(headers):
        return None  # a plain 2xx body is not an event: nothing to publish
    try:
        return parse_http(headers, resp.content)
    except ValueError as e:
        log.warning("subscriber replied with an invalid CloudEvent (%s): ignored", e)
        return None


async def _quiet(aw: Awaitable) -> None:
    try:
        await aw
    except Exception:
        pass


async def serve_asgi(app, host: str, port: int, stop: asyncio.Event, sock=None) -> None:
    """Run an ASGI app under hypercorn until `stop` is set; on `sock` (a listening socket the caller bound, so
    "ready" means this process owns the port) when given, else on host:port."""
    import hypercorn.asyncio
    import hypercorn.config

    cfg = hypercorn.config.Config()
    # hypercorn owns (and closes) an fd:// socket: hand the descriptor over instead of sharing it
    cfg.bind = [f"fd://{sock.detach()}"] if sock is not None else [f"{host}:{port}"]
    cfg.graceful_timeout = 2
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    await hypercorn.asyncio.serve(app, cfg, shutdown_trigger=stop.wait)


def decode_error_data(value: str | None) -> str:
    """`knativeerrordata` as text (base64 as Knative sends it; raw text tolerated)."""
    if not value:
        return ""
    try:
        raw = base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        return value
    return raw.decode("utf-8", "replace")
