"""The gateway's consumer of lifecycle events: `POST /internal/events`, where the Trigger `turboflow-gateway`
delivers every `io.turboflow.video.*` CloudEvent (binary or structured mode; locally the dev dispatcher does).

For one event, in this order (each step idempotent, so a redelivery after a failure anywhere is harmless):

1. parse (as the broker ingress does; not a CloudEvent -> 400, which the broker does not retry);
2. trust: started/progress/completed/failed/cancelled must carry a valid `turboflowsig` made with
   TURBOFLOW_EVENT_SIGNING_KEY, or they are ignored (202 + a log line: nobody can forge progress or a completion);
   `*.requested` events need no signature but can only create a queued record; other types are ignored (202);
3. the usage ledger: completed/failed/cancelled are recorded (once per CloudEvents source + id);
4. the request state: `RequestStates.apply_event` (monotone, first terminal wins, creates the record if this is
   the first news of the request);
5. on the transition to terminal: `turboflow_gateway_request_seconds{task,status}` observes accepted -> terminal,
   and the per-tenant counters count the outcome and the GPU-seconds the event bills (billing/attribution.py);
6. webhooks: a job per produced change the request's webhook subscribes to. A redelivered terminal event produces
   no change but enqueues its terminal name again: the outbox's Nats-Msg-Id drops it unless the first enqueue was
   lost (the gateway stopped between steps 4 and 6).

The answer has no body (200 applied, 202 ignored or nothing new), so the broker publishes no reply. A store that
is away answers 503 and the broker redelivers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime

from cloudevents.core.formats.json import JSONFormat
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from turboflow.billing.errors import InvalidUsageEventError
from turboflow.eventing import signing
from turboflow.eventing.asgi import HeaderEncodingError, request_headers
from turboflow.eventing.ingress import IngressRejection, parse_ingress_event
from turboflow.eventing.jetstream import MAX_MSG_SIZE
from turboflow.eventing.types import CANCELLED, COMPLETED, FAILED, LIFECYCLE_TYPES, REQUEST_TYPES, TERMINAL_TYPES

from . import metrics
from .problems import ApiProblem

log = logging.getLogger(__name__)

REQUESTED_TYPES = frozenset(REQUEST_TYPES.values())
LEDGER_TYPES = (COMPLETED, FAILED, CANCELLED)
TERMINAL_NAME = {COMPLETED: "completed", FAILED: "failed", CANCELLED: "cancelled"}


@dataclass
class Outcome:
    """What became of one event: `applied` (the record changed), `unchanged`, `ignored_unsigned`,
    `ignored_type`; the lifecycle names produced; whether the ledger stored it now."""

    outcome: str
    changes: list[str] = field(default_factory=list)
    ledger_new: bool = False
    record: object = None


def parse_rfc3339(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def accepted_to_terminal_seconds(record) -> float | None:
    """finished_at - created_at of a terminal record, in seconds (None when either is missing)."""
    created, finished = parse_rfc3339(record.created_at), parse_rfc3339(record.finished_at)
    if created is None or finished is None or (created.tzinfo is None) != (finished.tzinfo is None):
        return None
    return (finished - created).total_seconds()


def billed_gpu_seconds(event) -> float:
    """GPU-seconds a terminal event bills its tenant by the default rule; 0 when it carries nothing billable."""
    from turboflow.billing.attribution import charge
    from turboflow.billing.ledger import fact_of

    try:
        billed = charge(fact_of(structured(event)))
    except InvalidUsageEventError:
        return 0.0
    return billed.billed_s if billed is not None else 0.0


def structured(event) -> dict:
    """The event in the JSON event format, as a dict (what the ledger stores)."""
    return json.loads(JSONFormat().write(event))


class LifecycleConsumer:
    """Steps 2-6 of the module doc for one parsed CloudEvent, against a GatewayService (`settings`, `states`,
    `ledger`, and optionally `webhooks`, a gateway.webhooks.WebhookWorker)."""

    def __init__(self, service):
        self.service = service

    @property
    def signing_key(self) -> bytes | None:
        return self.service.settings.event_signing_key

    def trusted(self, event) -> bool:
        """Lifecycle events need a valid signature once the deployment has a key (without one nothing is signed,
        as at the broker ingress)."""
        key = self.signing_key
        return key is None or signing.verify_event(event, key)

    async def handle(self, event, *, base_url: str | None = None) -> Outcome:
        event_type = event.get_type()
        if event_type not in LIFECYCLE_TYPES and event_type not in REQUESTED_TYPES:
            return self._count(event_type, Outcome("ignored_type"))
        if event_type in LIFECYCLE_TYPES and not self.trusted(event):
            log.warning(
                "ignoring %s %s from %s: no valid %s signature",
                event_type, event.get_id(), event.get_source(), signing.SIGNATURE_EXTENSION,
            )  # fmt: skip
            return self._count(event_type, Outcome("ignored_unsigned"))
        ledger_new = False
        if event_type in LEDGER_TYPES:
            ledger_new = await self._record_usage(event)
        record, changes = await self.service.states.apply_event(event)
        outcome = Outcome("applied" if changes else "unchanged", changes, ledger_new, record)
        if record is None:
            return self._count(event_type, outcome)
        terminal_now = [name for name in changes if name in TERMINAL_NAME.values()]
        if terminal_now:
            seconds = accepted_to_terminal_seconds(record)
            if seconds is not None:
                metrics.observe_request_seconds(record.task, record.status, seconds)
            if event_type in TERMINAL_TYPES and record.status == TERMINAL_NAME[event_type]:
                metrics.count_terminal(record.tenant, record.status, billed_gpu_seconds(event))
        names = list(changes)
        if not names and event_type in TERMINAL_TYPES and record.status == TERMINAL_NAME[event_type]:
            names = [record.status]  # redelivery: re-enqueue; the outbox drops it unless the first one was lost
        if names:
            # links in webhooks: the configured public URL, else the one the client used to submit (not the
            # cluster-internal name the Trigger called)
            links = self.service.settings.gateway_public_url or record.base_url or base_url
            await self._tell(record, names, links)
        return self._count(event_type, outcome)

    async def _tell(self, record, names: list[str], base_url: str | None) -> None:
        """Webhooks first, directly: a failure to enqueue answers 503 and the broker redelivers. Then the
        service's other change hooks (their failures are only logged, as for the gateway's own changes)."""
        webhooks = getattr(self.service, "webhooks", None)
        if webhooks is not None and record.webhook:
            await webhooks.enqueue(record, names, base_url=base_url)
        for hook in list(getattr(self.service, "change_hooks", ())):
            if webhooks is not None and hook == webhooks.on_change:
                continue
            try:
                await hook(record, names)
            except Exception:
                log.exception("change hook %r failed for %s", hook, record.id)

    async def _record_usage(self, event) -> bool:
        ledger = getattr(self.service, "ledger", None)
        if ledger is None:
            return False
        try:
            return await run_in_threadpool(ledger.record, structured(event))
        except InvalidUsageEventError as e:  # e.g. a completion without usage: the state still moves on
            log.warning("ledger: not recording %s %s: %s", event.get_type(), event.get_id(), e.message)
            return False

    @staticmethod
    def _count(event_type: str, outcome: Outcome) -> Outcome:
        known = event_type in LIFECYCLE_TYPES or event_type in REQUESTED_TYPES
        # anyone may post any type: a label per unknown type would grow /metrics without bound
        metrics.LIFECYCLE_EVENTS.labels(event_type if known else "other", outcome.outcome).inc()
        return outcome


router = APIRouter()
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


def internal_host(host_header: str | None) -> bool:
    """Whether a request was addressed to the gateway by a cluster-internal name: the broker calls the Trigger's
    subscriber at `<service>.<namespace>.svc.cluster.local` (or `.svc`), the dev dispatcher at a loopback address.
    Knative's external ingress routes only the public domain to the gateway, so /internal/events is not reachable
    from outside whatever the path (a NetworkPolicy cannot tell paths apart; the Host can)."""
    host = (host_header or "").strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host.split("]")[0] + "]"
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    host = host.rstrip(".")
    return host in _LOOPBACK_HOSTS or host.endswith((".svc", ".svc.cluster.local"))


@router.post("/internal/events", include_in_schema=False, status_code=202)
async def receive_event(request: Request) -> Response:
    """A CloudEvent from the Trigger (module doc). No body in the answer: the broker publishes no reply."""
    from .app import get_service

    if not internal_host(request.headers.get("host")):
        raise ApiProblem("not_found", "no such route", status=404)
    service = get_service(request)
    body = await request.body()
    if len(body) > MAX_MSG_SIZE:
        raise ApiProblem("payload_too_large", f"an event is at most {MAX_MSG_SIZE} bytes", status=413)
    try:
        event = parse_ingress_event(request_headers(request.scope), body)
    except (IngressRejection, HeaderEncodingError) as e:
        metrics.LIFECYCLE_EVENTS.labels("unknown", "malformed").inc()
        raise ApiProblem("invalid_event", str(e), status=400) from None
    base_url = service.settings.gateway_public_url or str(request.base_url)
    outcome = await LifecycleConsumer(service).handle(event, base_url=base_url)
    return Response(status_code=200 if outcome.outcome == "applied" else 202)
