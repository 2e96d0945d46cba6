"""Who pays which GPU-second: pure functions from ledger facts to charges (docs/billing.md).

A completed event reports `usage.gpu_seconds = held + load`, where `held` is the wall time the request held the
device and `load = usage.model_load_seconds` is added only when `usage.cold_start` (the pod's first request).
The rule splits that sum:

    held_s            = gpu_seconds - (model_load_seconds if cold_start else 0)       always the request's
    arrival           = usage.requested_at (the request event's time), else completed_at - timings.total
    waited            = cold_start and arrival < ready_at            with the pod's io.turboflow.pod.ready fact
                      = cold_start and timings.queue_wait > wait_threshold_s          without it (older history)
    request_load_s    = model_load_seconds   if cold_start and charged to the request, else 0
    platform_load_s   = model_load_seconds   if cold_start and not charged to the request, else 0
    billed_s          = held_s + request_load_s

`charge_load_to` chooses who pays a load: "waited" (the default, the documented rule: the request pays it only
when it waited for it), "request" (always: what the function's own gpu_seconds says) or "platform" (never).

The pod.ready fact is found through the completion's `usage.pod`: the latest ready of that pod at or before the
completion. Without it (history from before pods reported themselves) the evidence is `queue_wait`: the pod's first
request has nothing ahead of it on the device, so any time it spent queued in the pod was the load still running.
That fallback misses a request that Knative's activator buffered until the pod turned ready (it waited outside the
pod's clock, queue_wait near 0): it bills that load to the platform.

Failed and cancelled requests pay the GPU time they report (`usage.gpu_seconds`; a cancelled event's top-level
`gpu_seconds`; 0 when absent) by the same rule.

Platform overhead (`platform_overhead`), per model and GPU type, is what no request pays:

    platform_load_s = Σ load_seconds of pod.ready facts whose load no request was charged
                    + Σ platform_load_s of cold-start charges that name no known pod.ready
    warm_idle_s     = Σ warm_idle_seconds of pod.stopped facts (ready, not holding the device)
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from turboflow.eventing.types import CANCELLED, COMPLETED, FAILED, POD_READY, POD_STOPPED

from .errors import ConfigError
from .ledger import Fact

LOAD_RULES = ("waited", "request", "platform")
DEFAULT_WAIT_THRESHOLD_S = 0.5  # below this a queue wait is scheduling noise, not a load being waited for
CHARGED_TYPES = (COMPLETED, FAILED, CANCELLED)


@dataclass(frozen=True)
class Charge:
    """The GPU-seconds one request pays (`billed_s`) and the load it left to the platform."""

    event_id: str
    request_id: str | None
    tenant: str | None
    model: str
    day: date
    outcome: str  # completed | failed | cancelled
    held_s: float
    request_load_s: float
    platform_load_s: float
    gpu_type: str = "unknown"  # usage.gpu_type (completions from before it was reported: unknown)
    ready_event_id: str | None = None  # the pod.ready fact a cold start was judged against

    @property
    def billed_s(self) -> float:
        return self.held_s + self.request_load_s


def charge(
    fact: Fact,
    *,
    charge_load_to: str = "waited",
    wait_threshold_s: float = DEFAULT_WAIT_THRESHOLD_S,
    ready: Fact | None = None,
) -> Charge | None:
    """The charge of one fact under the rule (module docstring); None for facts that bill nobody. `ready`: the
    pod.ready fact of the pod that served it (`charges` finds it), else the queue_wait evidence decides."""
    if charge_load_to not in LOAD_RULES:
        raise ConfigError(f"charge_load_to {charge_load_to!r} is not one of {', '.join(LOAD_RULES)}")
    if fact.type not in CHARGED_TYPES:
        return None
    usage = fact.data.get("usage") if isinstance(fact.data.get("usage"), dict) else {}
    # a cancelled event reports the device time it used at the top level (it has no usage section)
    gpu_seconds = _seconds(usage.get("gpu_seconds") if usage else fact.data.get("gpu_seconds"))
    cold = usage.get("cold_start") is True
    load = _seconds(usage.get("model_load_seconds")) if cold else 0.0
    timings = fact.data.get("timings") if isinstance(fact.data.get("timings"), dict) else {}
    ready_at = _moment(ready.data.get("ready_at")) if ready is not None else None
    arrival = _arrival(fact)
    if cold and ready_at is not None and arrival is not None:
        waited = arrival < ready_at
    else:
        ready = None
        waited = cold and _seconds(timings.get("queue_wait")) > wait_threshold_s
    to_request = cold and (charge_load_to == "request" or (charge_load_to == "waited" and waited))
    return Charge(
        event_id=fact.event_id,
        request_id=fact.data.get("request_id"),
        tenant=fact.tenant,
        model=fact.model or "unknown",
        day=fact.occurred_at.date(),
        outcome=fact.type.rsplit(".", 1)[-1],
        held_s=max(gpu_seconds - load, 0.0),
        request_load_s=load if to_request else 0.0,
        platform_load_s=load if cold and not to_request else 0.0,
        gpu_type=str(usage.get("gpu_type") or "unknown") if usage else "unknown",
        ready_event_id=ready.event_id if ready is not None else None,
    )


def charges(facts, *, pod_facts=(), **rule) -> list[Charge]:
    """`charge` over many facts, dropping those that bill nobody; a cold start is judged against its pod's
    pod.ready found among `facts` and `pod_facts` (a tenant's report passes the pod facts separately: they have no
    tenant). Order-independent: nothing depends on the order facts come in."""
    readies = ready_index([*facts, *pod_facts])
    return [c for c in (charge(f, ready=find_ready(f, readies), **rule) for f in facts) if c is not None]


def ready_index(facts) -> dict[str, list[tuple[datetime, str, Fact]]]:
    """pod name -> its pod.ready facts as (ready_at, event id, fact), sorted."""
    index: dict[str, list[tuple[datetime, str, Fact]]] = defaultdict(list)
    for fact in facts:
        if fact.type == POD_READY and fact.data.get("pod"):
            at = _moment(fact.data.get("ready_at"))
            if at is not None:
                index[str(fact.data["pod"])].append((at, fact.event_id, fact))
    for entries in index.values():
        entries.sort(key=lambda entry: entry[:2])
    return index


def find_ready(fact: Fact, index) -> Fact | None:
    """The pod.ready a completion's cold start belongs to: its pod's latest ready at or before it completed."""
    usage = fact.data.get("usage") if isinstance(fact.data.get("usage"), dict) else {}
    if fact.type != COMPLETED or usage.get("cold_start") is not True or not usage.get("pod"):
        return None
    entries = index.get(str(usage["pod"]), [])
    done = _moment(fact.data.get("completed_at"))
    if not entries or done is None:
        return None
    position = bisect.bisect_right([at for at, _, _ in entries], done)
    return entries[position - 1][2] if position else None


@dataclass(frozen=True)
class Overhead:
    """GPU-seconds of one model on one GPU type that no request pays."""

    model: str
    gpu_type: str
    pods: int  # pod.ready facts (cold starts) seen
    platform_load_s: float
    warm_idle_s: float

    @property
    def overhead_s(self) -> float:
        return self.platform_load_s + self.warm_idle_s


def platform_overhead(facts, request_charges: list[Charge]) -> list[Overhead]:
    """Platform overhead per (model, GPU type), sorted (module docstring): loads no request paid, warm idle."""
    pods: dict[tuple[str, str], int] = defaultdict(int)
    load: dict[tuple[str, str], float] = defaultdict(float)
    idle: dict[tuple[str, str], float] = defaultdict(float)
    charged_readies = {c.ready_event_id for c in request_charges if c.ready_event_id and c.request_load_s > 0}
    for fact in facts:
        key = (fact.model or "unknown", str(fact.data.get("gpu_type") or "unknown"))
        if fact.type == POD_READY:
            pods[key] += 1
            if fact.event_id not in charged_readies:
                load[key] += _seconds(fact.data.get("load_seconds"))
        elif fact.type == POD_STOPPED:
            idle[key] += _seconds(fact.data.get("warm_idle_seconds"))
    for c in request_charges:
        if c.ready_event_id is None and c.platform_load_s:
            load[(c.model, c.gpu_type)] += c.platform_load_s
    keys = sorted({*pods, *load, *idle})
    return [Overhead(m, g, pods.get((m, g), 0), load.get((m, g), 0.0), idle.get((m, g), 0.0)) for m, g in keys]


def _arrival(fact: Fact) -> datetime | None:
    """When a completed request was made: usage.requested_at, else when it reached its pod (completed_at -
    timings.total, which is after ready for a request the pod answered 503 while loading), naive UTC."""
    usage = fact.data.get("usage") if isinstance(fact.data.get("usage"), dict) else {}
    requested = _moment(usage.get("requested_at"))
    if requested is not None:
        return requested
    timings = fact.data.get("timings") if isinstance(fact.data.get("timings"), dict) else {}
    done = _moment(fact.data.get("completed_at"))
    if done is None or not isinstance(timings.get("total"), int | float):
        return None
    return done - timedelta(seconds=_seconds(timings.get("total")))


def _moment(text) -> datetime | None:
    """An RFC 3339 time as naive UTC (the ledger's convention), None when absent or unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def _seconds(value) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else 0.0
