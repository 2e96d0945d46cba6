"""Who pays which GPU-second: pure functions from ledger facts to charges (docs/billing.md).

A completed event reports `usage.gpu_seconds = held + load`, where `held` is the wall time the request held the
device and `load = usage.model_load_seconds` is added only when `usage.cold_start` (the pod's first request).
The rule splits that sum:

    held_s            = gpu_seconds - (model_load_seconds if cold_start else 0)       always the request's
    waited            = cold_start and timings.queue_wait > wait_threshold_s
    request_load_s    = model_load_seconds   if cold_start and charged to the request, else 0
    platform_load_s   = model_load_seconds   if cold_start and not charged to the request, else 0
    billed_s          = held_s + request_load_s

`charge_load_to` chooses who pays a load: "waited" (the default, the documented rule: the request pays it only
when it waited for it), "request" (always: what the function's own gpu_seconds says) or "platform" (never).

Why `queue_wait` is the evidence: the pod's first request has nothing ahead of it on the device, so any time it
spent queued in the pod was the load still running. Approximation until `io.turboflow.pod.ready` events exist: a
request buffered by Knative's activator until the pod turned ready waited too, but outside the pod's clock
(queue_wait near 0), so under "waited" that load is billed to the platform. Once pod.ready events carry the ready
time, `waited` becomes `arrival (completed_at - timings.total) < ready_at`.

Failed and cancelled requests pay the GPU time they report (`usage.gpu_seconds`; a cancelled event's top-level
`gpu_seconds`; 0 when absent) by the same rule.
Other facts (started, pod.ready, pod.stopped) produce no charge yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from turboflow.eventing.types import CANCELLED, COMPLETED, FAILED

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

    @property
    def billed_s(self) -> float:
        return self.held_s + self.request_load_s


def charge(
    fact: Fact, *, charge_load_to: str = "waited", wait_threshold_s: float = DEFAULT_WAIT_THRESHOLD_S
) -> Charge | None:
    """The charge of one fact under the rule (module docstring); None for facts that bill nobody."""
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
    )


def charges(facts, **rule) -> list[Charge]:
    """`charge` over many facts, dropping those that bill nobody. Order-independent: each fact stands alone."""
    return [c for c in (charge(f, **rule) for f in facts) if c is not None]


def _seconds(value) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else 0.0
