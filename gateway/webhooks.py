"""Signed webhooks (Standard Webhooks) with a durable outbox on JetStream.

Why an outbox: a lifecycle event is applied to the request state once, but its webhook may need many tries over
minutes; the gateway can restart in between. So the consumer only *enqueues* a job and a worker delivers it.

    stream    ``TURBOFLOW_WEBHOOKS`` (work queue: a job is removed once acked), subject ``turboflow.webhooks.out``
    job id    ``Nats-Msg-Id = <tenant>/<request id>/<event name>/<n>`` with n = ``0`` for the once-only events and
              ``<stage>.<step>`` for progress: a redelivered lifecycle event, or the same event reached by two paths
              (a gateway-side cancel and the function's cancelled reply), enqueues one job inside the duplicate
              window (2 h)
    worker    a durable pull consumer ``gateway-webhooks`` shared by every gateway replica; each job is delivered in
              its own task (at most `concurrency` at once), so a slow receiver blocks nobody else
    delivery  ``POST url`` with body ``{"type": "video.<event>", "timestamp", "data": <Video>}`` (the body is fixed
              at enqueue time, so every try sends the same bytes) and the headers ``webhook-id`` (stable across
              tries), ``webhook-timestamp`` (this try) and ``webhook-signature: v1,<base64 HMAC-SHA256>`` made by
              `standardwebhooks.Webhook(TURBOFLOW_WEBHOOK_SECRET)`
    retries   2xx -> ack. Otherwise ``nak(delay)`` with delay(n) = min(initial * 2^(n-1), maximum) after the n-th try
              (5 s, 10 s, 20 s ... capped at 10 min), up to `max_attempts` (8) tries; then the job is dropped and
              the last attempt says so. A URL that resolves to a loopback/private/link-local/reserved address is
              refused at delivery time (DNS can change after the request was accepted) unless
              TURBOFLOW_WEBHOOK_ALLOW_PRIVATE.
    record    every try is appended to the request record's ``webhook.attempts`` (the last 20 kept):
              ``{"event", "at", "attempt", "status", "ok", "error"}``, so GET /v1/videos/{id} shows them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import json
import logging
import socket
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import nats
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from standardwebhooks import Webhook

from . import metrics

log = logging.getLogger(__name__)

STREAM = "TURBOFLOW_WEBHOOKS"
SUBJECT = "turboflow.webhooks.out"
DURABLE = "gateway-webhooks"
DUPLICATE_WINDOW_S = 7200.0
MAX_AGE_S = 7 * 24 * 3600.0
MAX_ATTEMPTS_KEPT = 20
ONCE_ONLY = "0"  # the <n> of every event name but progress


def backoff_seconds(attempt: int, initial: float = 5.0, maximum: float = 600.0) -> float:
    """Delay before try `attempt + 1` after try `attempt` (1-based) failed: min(initial * 2^(attempt-1), maximum)."""
    return min(initial * 2.0 ** max(attempt - 1, 0), maximum)


def job_msg_id(tenant: str, request_id: str, event_name: str, n: str = ONCE_ONLY) -> str:
    """The outbox Nats-Msg-Id of one webhook (see the module doc)."""
    return f"{tenant}/{request_id}/{event_name}/{n}"


def webhook_id(msg_id: str) -> str:
    """The `webhook-id` header: stable for one job across tries, opaque (no tenant or request id in it)."""
    return "msg_" + hashlib.sha256(msg_id.encode("utf-8")).hexdigest()[:32]


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
DNS_TIMEOUT_S = 5.0


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries and routes to: v4-mapped, 6to4, NAT64, Teredo's client, or the
    deprecated v4-compatible ::a.b.c.d (Python's `is_global` judges those by their v6 prefix, not their target)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in network for network in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:  # ::a.b.c.d (not :: or ::1, which are judged as they are)
        return ipaddress.IPv4Address(int(ip))
    return None


def is_public_address(address: str) -> bool:
    """True only for globally routable unicast addresses: loopback, private, carrier-grade NAT, link-local
    (cloud metadata), multicast, reserved and unspecified ones are not (v4, v6, and v4 carried inside v6)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        ip = embedded_ipv4(ip) or ip
    return ip.is_global and not ip.is_multicast


async def resolve_destination(url: str, allow_private: bool) -> tuple[str | None, str | None]:
    """(why `url` may not be called now, or None; the address to connect to, or None to let the client resolve).

    Every address the host resolves to must be public, and the delivery then connects to the address checked here
    (a second lookup could answer differently: DNS rebinding)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "the webhook URL is not an http(s) URL", None
    if allow_private:
        return None, None
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(
                parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
            ),
            DNS_TIMEOUT_S,
        )
    except TimeoutError:
        return f"cannot resolve {parts.hostname}: no answer within {DNS_TIMEOUT_S:.0f} s", None
    except OSError as e:
        return f"cannot resolve {parts.hostname}: {e.strerror or e}", None
    addresses = [info[4][0] for info in infos]
    private = sorted({a for a in addresses if not is_public_address(a)})
    if private:
        return f"{parts.hostname} resolves to a non-public address ({', '.join(private)}); refused", None
    return (None, addresses[0]) if addresses else (f"cannot resolve {parts.hostname}", None)


async def refused_destination(url: str, allow_private: bool) -> str | None:
    """Why `url` may not be called now (None: it may)."""
    return (await resolve_destination(url, allow_private))[0]


def pinned_request(url: str, address: str | None) -> tuple[str, dict, dict]:
    """(URL, extra headers, request extensions) that reach `url`'s host at `address`: the URL names the address,
    `Host` and the TLS server name (SNI, and the certificate check) stay the original host's."""
    if address is None:
        return url, {}, {}
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    pinned = parts._replace(netloc=netloc).geturl()
    original = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return pinned, {"host": original}, extensions


def with_attempt(record, attempt: dict):
    """`record` with `attempt` appended to webhook.attempts (the last MAX_ATTEMPTS_KEPT kept)."""
    webhook = dict(record.webhook or {})
    webhook["attempts"] = [*(webhook.get("attempts") or []), attempt][-MAX_ATTEMPTS_KEPT:]
    return dataclasses.replace(record, webhook=webhook)


async def render_video(service, record, base_url: str | None) -> dict:
    """The Video JSON of `record`, exactly as GET /v1/videos/{id} answers it (gateway/resources.py)."""
    from .resources import video_resource

    position = await service.states.queue_position(record) if record.status == "queued" else None
    return video_resource(record, base_url=(base_url or "").rstrip("/"), store=service.store, queue_position=position)


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class WebhookWorker:
    """Enqueues webhook jobs and delivers them (module doc). `service` is the GatewayService (its settings, its
    `states` for recording attempts, its Video rendering). Constructor knobs exist for tests (short backoff)."""

    def __init__(
        self,
        service=None,
        *,
        secret: str | None = None,
        allow_private: bool | None = None,
        nats_url: str | None = None,
        timeout: float = 10.0,
        backoff_initial: float = 5.0,
        backoff_max: float = 600.0,
        max_attempts: int = 8,
        concurrency: int = 16,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.service = service
        self._secret, self._allow_private, self._nats_url = secret, allow_private, nats_url
        self.timeout, self.backoff_initial, self.backoff_max = timeout, backoff_initial, backoff_max
        self.max_attempts, self.concurrency, self._transport = max_attempts, concurrency, transport
        self._nc = self._js = self._http = self._task = None
        self._inflight: set[asyncio.Task] = set()

    # -- configuration from the service's settings unless given
    @property
    def settings(self):
        return self.service.settings

    @property
    def secret(self) -> str | None:
        return self._secret if self._secret is not None else self.settings.webhook_secret

    @property
    def allow_private(self) -> bool:
        return self._allow_private if self._allow_private is not None else bool(self.settings.webhook_allow_private)

    # -- lifecycle
    async def start(self, service=None) -> WebhookWorker:
        """Connect, make sure the outbox stream exists and start delivering. Idempotent."""
        if service is not None:
            self.service = service
        if self._task is not None:
            return self
        url = self._nats_url or self.settings.nats_url
        if not url:
            raise RuntimeError("webhooks need TURBOFLOW_NATS_URL (the outbox is a JetStream stream)")
        self._nc = await nats.connect(
            url, max_reconnect_attempts=-1, reconnect_time_wait=0.25, connect_timeout=2, name="turboflow-webhooks"
        )
        self._js = self._nc.jetstream()
        await self._ensure_stream()
        self._http = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False, transport=self._transport)
        self._task = asyncio.create_task(self._run(), name="turboflow-webhooks")
        hooks = getattr(self.service, "change_hooks", None)
        if hooks is not None and self.on_change not in hooks:
            hooks.append(self.on_change)  # changes the gateway makes itself (a cancel while queued)
        return self

    async def stop(self) -> None:
        hooks = getattr(self.service, "change_hooks", None)
        if hooks is not None and self.on_change in hooks:
            hooks.remove(self.on_change)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for inflight in list(self._inflight):
            inflight.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._nc is not None and not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._nc.close(), 5)
            except (nats.errors.Error, TimeoutError):
                pass
        self._nc = self._js = None

    async def _ensure_stream(self) -> None:
        config = StreamConfig(
            name=STREAM,
            subjects=[SUBJECT],
            storage=StorageType.FILE,
            retention=RetentionPolicy.WORK_QUEUE,
            max_age=MAX_AGE_S,
            duplicate_window=DUPLICATE_WINDOW_S,
            num_replicas=1,
        )
        try:
            await self._js.stream_info(STREAM)
        except nats.js.errors.NotFoundError:
            await self._js.add_stream(config)

    # -- enqueue
    async def on_change(self, record, changes: list[str]) -> None:
        """GatewayService change hook: enqueue the webhooks of changes the gateway made itself."""
        if record is not None and record.webhook:
            await self.enqueue(record, changes, base_url=self.settings.gateway_public_url)

    async def enqueue(self, record, names: Iterable[str], *, base_url: str | None = None) -> int:
        """Queue one job per name in `names` that the record's webhook subscribes to; returns how many were new."""
        webhook = record.webhook or {}
        wanted = [name for name in names if webhook.get("url") and name in (webhook.get("events") or ())]
        if not wanted:
            return 0
        if not self.secret:
            # unsigned webhooks are not Standard Webhooks: say so where the caller looks, do not send them
            for name in wanted:
                attempt = self._attempt(name, 0, None, "TURBOFLOW_WEBHOOK_SECRET is not set: webhooks are not sent")
                await self._record(record.tenant, record.id, attempt)
            return 0
        new = 0
        for name in wanted:
            n = ONCE_ONLY
            if name == "progress" and record.progress:
                n = f"{record.progress.get('stage')}.{record.progress.get('step')}"
            msg_id = job_msg_id(record.tenant, record.id, name, n)
            video = await render_video(self.service, record, base_url)
            body = json.dumps(
                {"type": f"video.{name}", "timestamp": _iso(_now()), "data": video},
                separators=(",", ":"),
                ensure_ascii=False,
            )
            job = {"tenant": record.tenant, "id": record.id, "event": name, "url": webhook["url"],
                   "webhook_id": webhook_id(msg_id), "body": body}  # fmt: skip
            ack = await self._js.publish(
                SUBJECT, json.dumps(job).encode("utf-8"), headers={"Nats-Msg-Id": msg_id}, timeout=5
            )
            new += not ack.duplicate
        return new

    # -- delivery
    async def _run(self) -> None:
        config = ConsumerConfig(
            durable_name=DURABLE,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.timeout + 30.0,
            max_deliver=self.max_attempts + 2,  # a job that keeps failing unexpectedly is not retried for ever
            max_ack_pending=max(self.concurrency * 4, 64),
        )
        slots = asyncio.Semaphore(self.concurrency)
        psub = None
        while True:
            await slots.acquire()
            try:
                if psub is None:
                    psub = await self._js.pull_subscribe(SUBJECT, durable=DURABLE, stream=STREAM, config=config)
                (msg,) = await psub.fetch(1, timeout=1)
            except (nats.errors.TimeoutError, TimeoutError):
                slots.release()
                continue
            except nats.errors.Error as e:
                slots.release()
                log.warning("webhooks: fetch failed (%s); retrying", type(e).__name__)
                psub = None
                await asyncio.sleep(0.5)
                continue
            task = asyncio.create_task(self._handle(msg))
            self._inflight.add(task)
            task.add_done_callback(lambda t: (self._inflight.discard(t), slots.release()))

    async def _handle(self, msg) -> None:
        try:
            job = json.loads(msg.data)
            attempt_number = msg.metadata.num_delivered
        except (ValueError, AttributeError) as e:
            log.warning("webhooks: dropping an unreadable job: %s", e)
            await msg.ack()
            return
        try:
            attempt, retry = await self.deliver(job, attempt_number)
            await self._record(job["tenant"], job["id"], attempt)
            if retry:
                await msg.nak(delay=backoff_seconds(attempt_number, self.backoff_initial, self.backoff_max))
            else:
                await msg.ack()
        except asyncio.CancelledError:
            raise
        except Exception:  # a job must never kill the worker; JetStream redelivers it after ack_wait
            log.exception("webhooks: job %s failed unexpectedly", job.get("webhook_id"))

    async def deliver(self, job: dict, attempt_number: int) -> tuple[dict, bool]:
        """One try of `job`: (the attempt to record, whether to try again)."""
        name = job["event"]
        refused, address = await resolve_destination(job["url"], self.allow_private)
        if refused:
            metrics.WEBHOOK_ATTEMPTS.labels(name, "refused").inc()
            return self._attempt(name, attempt_number, None, refused), False
        sent_at = _now()
        headers = {
            "content-type": "application/json",
            "user-agent": "turboflow-webhooks/1",
            "webhook-id": job["webhook_id"],
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": Webhook(self.secret).sign(job["webhook_id"], sent_at, job["body"]),
        }
        status, error = None, None
        try:
            url, host, extensions = pinned_request(job["url"], address)
            response = await self._http.post(
                url, content=job["body"].encode("utf-8"), headers={**headers, **host}, extensions=extensions
            )
            status = response.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if error is None:
            metrics.WEBHOOK_ATTEMPTS.labels(name, "delivered").inc()
            return self._attempt(name, attempt_number, status, None), False
        if attempt_number >= self.max_attempts:
            metrics.WEBHOOK_ATTEMPTS.labels(name, "gave_up").inc()
            return self._attempt(name, attempt_number, status, f"{error}; gave up after {attempt_number} tries"), False
        metrics.WEBHOOK_ATTEMPTS.labels(name, "failed").inc()
        return self._attempt(name, attempt_number, status, error), True

    @staticmethod
    def _attempt(name: str, number: int, status: int | None, error: str | None) -> dict[str, Any]:
        return {"event": name, "at": _iso(_now()), "attempt": number, "status": status, "ok": error is None,
                "error": error}  # fmt: skip

    async def _record(self, tenant: str, request_id: str, attempt: dict) -> None:
        try:
            await self.service.states.update(tenant, request_id, lambda record: with_attempt(record, attempt))
        except Exception as e:  # the record may have expired; the attempt is still logged
            log.warning("webhooks: cannot record attempt on %s/%s: %s", tenant, request_id, e)
        log.info("webhook %s %s/%s try %s: %s", attempt["event"], tenant, request_id, attempt["attempt"],
                 "ok" if attempt["ok"] else attempt["error"])  # fmt: skip
