"""Discrete-event model of Knative's KPA autoscaler, the activator and GPU pods with containerConcurrency 1.

One `ServiceModel` per Knative Service (one model each: a Service loads one MODEL_DIR); they share one event heap.
Rules, each from knative/serving (the commit read: 98e5ef90, 2026-08):

* Metric (pkg/autoscaler/metrics/collector.go `record`, pkg/autoscaler/aggregation/bucketing.go): concurrency =
  requests in flight + requests buffered in the activator (with target-burst-capacity -1 every request goes through
  the activator, which reports what it holds), averaged over the stable window (60 s) and the panic window (10 % of
  it). Averages are exact time integrals here (upstream: 1 s buckets of scraped averages). After a window with no data
  the average restarts over a partial window, as `TimedFloat64Buckets` does after its firstWrite reset.
* Decision every 2 s (pkg/autoscaler/scaling/multiscaler.go `tickInterval`) and at once when a request arrives
  while the last decision was 0 (`MultiScaler.Poke`, the activator's stat), in pkg/autoscaler/scaling/autoscaler.go
  `Scale`: desired = ceil(average / target) for both windows, clamped to [floor(ready/max-scale-down-rate),
  ceil(max-scale-up-rate * ready)] with ready >= 1; panic starts when ceil(panic average / target) / ready >=
  panic threshold (200 %), keeps the pod count from falling, and ends a stable window after the last such tick;
  scale-down-delay keeps the maximum desired count of its window (`delayWindow`).
* Bounds and scale to zero (pkg/reconciler/autoscaling/kpa/scaler.go `scale`, `applyBounds`, `handleScaleToZero`):
  desired is clamped to [min-scale, max-scale]; a desired 0 first marks the PodAutoscaler inactive (once it has been
  active a stable window; before that it holds 1 pod), then the last pod goes when it has been inactive for the pod
  retention period, or, without retention, for the scale-to-zero grace period unless the activator is already in
  the path (target-burst-capacity -1, our setting), in which case it goes at once.
* Activator (pkg/activator/handler, net/throttler.go): requests wait FIFO while no pod has a free slot and go to a
  pod as soon as one is ready or free; containerConcurrency 1 means one request per pod.
* Initial scale: the simulation starts after the revision was deployed, with max(initial-scale, min-scale) pods
  already warm (their deployment-time cold start is not charged).

Simplified: pod deletion on scale-down picks starting pods, then idle, then busy ones (which drain: finish their
request, then stop); Kubernetes does not know which pod is busy. No request timeout (requests over the revision
timeout are counted, not failed), no activator capacity limit, no GPU node provisioning unless the cold start includes
it, instantaneous network.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

from .knative import ScalingConfig
from .profiles import ModelProfile
from .traces import Request

TICK_S = 2.0  # multiscaler.go tickInterval
PRECISION = 6  # bucketing.go rounds window averages to 6 digits

_ARRIVAL, _POD_READY, _DONE, _TICK = range(4)


@dataclass
class Pod:
    id: int
    created: float
    ready_at: float
    warm_start: bool = False
    state: str = "starting"  # starting | idle | busy | gone
    draining: bool = False
    busy_s: float = 0.0
    ended: float | None = None


@dataclass
class RequestRecord:
    arrival: float
    model: str
    service_s: float
    start: float = math.nan
    end: float = math.nan
    cold: bool = False  # it waited for a pod that was not ready when it arrived

    @property
    def latency(self) -> float:
        return self.end - self.arrival

    @property
    def wait(self) -> float:
        return self.start - self.arrival


@dataclass
class ServiceResult:
    model: str
    config: ScalingConfig
    requests: list[RequestRecord]
    pods: list[Pod]
    end_s: float
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (t, live pods, requests in system)


class _Concurrency:
    """Requests in the system over time, with its running integral so window averages are exact."""

    def __init__(self, keep_s: float):
        self.keep_s = keep_s
        self.n = 0
        self.history: deque = deque([(0.0, 0.0, 0)])  # (t, integral up to t, n from t on)

    def change(self, now: float, delta: int) -> None:
        t, area, n = self.history[-1]
        self.n += delta
        self.history.append((now, area + n * (now - t), self.n))
        while len(self.history) > 2 and self.history[1][0] <= now - self.keep_s:
            self.history.popleft()

    def integral(self, x: float) -> float:
        for t, area, n in reversed(self.history):
            if t <= x:
                return area + n * (x - t)
        return self.history[0][1]

    def average(self, now: float, window: float) -> float:
        if window <= 0:
            return float(self.n)
        return round((self.integral(now) - self.integral(now - window)) / window, PRECISION)


class ServiceModel:
    """One Knative Service: its KPA decider, its activator queue and its pods."""

    def __init__(self, sim: Simulation, index: int, profile: ModelProfile, config: ScalingConfig, rng: random.Random):
        self.sim, self.index, self.profile, self.config, self.rng = sim, index, profile, config, rng
        self.pods: list[Pod] = []
        self.queue: deque[RequestRecord] = deque()
        self.requests: list[RequestRecord] = []
        self.concurrency = _Concurrency(keep_s=config.stable_window_s + 2 * TICK_S)
        self.ticking = False
        self.fixed = config.max_scale > 0 and config.min_scale == config.max_scale  # nothing to decide
        self.last_desired = 0
        self.panic_since: float | None = None
        self.max_panic_pods = 0
        self.delay_window: deque = deque()
        self.active_since: float | None = None
        self.inactive_since: float | None = None
        self.epoch = {"stable": None, "panic": None}  # bucketing.go firstWrite, per window
        self.last_data: float | None = None
        self.timeline: list[tuple[float, int, int]] = []

    # -- pods ---------------------------------------------------------------------------------------------------
    def live_pods(self) -> list[Pod]:
        return [p for p in self.pods if p.state != "gone" and not p.draining]

    def ready_count(self) -> int:
        return sum(1 for p in self.pods if p.state in ("idle", "busy") and not p.draining)

    def start_warm(self, count: int) -> None:
        for _ in range(count):
            pod = Pod(len(self.pods), 0.0, 0.0, warm_start=True, state="idle")
            self.pods.append(pod)
        if count:
            self.active_since = 0.0
            self.last_desired = count
        self._record(0.0)

    def _start_pod(self, now: float) -> None:
        pod = Pod(len(self.pods), now, now + self.profile.sample_cold_start(self.rng))
        self.pods.append(pod)
        self.sim.push(pod.ready_at, _POD_READY, self.index, pod)

    def _stop(self, pod: Pod, now: float) -> None:
        pod.state, pod.ended = "gone", now

    def scale_to(self, target: int, now: float) -> None:
        live = self.live_pods()
        if target > len(live):
            for _ in range(target - len(live)):
                self._start_pod(now)
        elif target < len(live):
            rank = {"starting": 0, "idle": 1, "busy": 2}
            victims = sorted(live, key=lambda p: (rank[p.state], -p.created, -p.id))[: len(live) - target]
            for pod in victims:
                if pod.state == "busy":
                    pod.draining = True  # queue-proxy drains: the request in flight finishes first
                else:
                    self._stop(pod, now)
        self._record(now)

    def _record(self, now: float) -> None:
        self.timeline.append((now, len(self.live_pods()), self.concurrency.n))

    # -- requests -----------------------------------------------------------------------------------------------
    def arrive(self, record: RequestRecord, now: float) -> None:
        self.requests.append(record)
        self.queue.append(record)
        self.concurrency.change(now, +1)
        if not self.fixed:
            if self.last_desired == 0:  # MultiScaler.Poke: the activator's stat wakes the decider at once
                self.decide(now, poked=True)
            self._ensure_ticking(now)
        self.dispatch(now)

    def dispatch(self, now: float) -> None:
        while self.queue:
            idle = next((p for p in self.pods if p.state == "idle" and not p.draining), None)
            if idle is None:
                return
            record = self.queue.popleft()
            record.start = now
            record.cold = idle.ready_at > record.arrival
            idle.state = "busy"
            self.sim.push(now + record.service_s, _DONE, self.index, (idle, record))

    def pod_ready(self, pod: Pod, now: float) -> None:
        if pod.state != "starting":
            return  # deleted while it was starting
        pod.state = "idle"
        if self.active_since is None:
            self.active_since = now
        self.dispatch(now)
        self._record(now)

    def done(self, pod: Pod, record: RequestRecord, now: float) -> None:
        record.end = now
        pod.busy_s += record.service_s
        self.concurrency.change(now, -1)
        if pod.draining:
            self._stop(pod, now)
        else:
            pod.state = "idle"
        self.dispatch(now)
        self._record(now)

    # -- the decider --------------------------------------------------------------------------------------------
    def _ensure_ticking(self, now: float) -> None:
        if not self.ticking:
            self.ticking = True
            self.sim.push((math.floor(now / TICK_S) + 1) * TICK_S, _TICK, self.index, None)

    def tick(self, now: float) -> None:
        self.decide(now)
        if any(p.state != "gone" for p in self.pods) or self.concurrency.n:
            self.sim.push(now + TICK_S, _TICK, self.index, None)
        else:
            self.ticking = False  # nothing to scale and nothing to observe until the next arrival

    def _window_average(self, name: str, window: float, now: float) -> float:
        # bucketing.go: after a window without data the average restarts over the data seen since (firstWrite)
        if self.last_data is None or now - self.last_data >= window or self.epoch[name] is None:
            self.epoch[name] = now
        span = min(window, max(now - self.epoch[name], 1.0))
        return self.concurrency.average(now, span)

    def decide(self, now: float, poked: bool = False) -> None:
        c = self.config
        has_data = self.concurrency.n > 0 or any(p.state != "gone" for p in self.pods)
        stable = self._window_average("stable", c.stable_window_s, now)
        panic = self._window_average("panic", c.panic_window_s, now)
        if has_data:
            self.last_data = now
        desired = self._autoscaler_desired(stable, panic, now)
        if poked:  # the activator's stat carries the requests it holds right now
            desired = max(desired, math.ceil(self.concurrency.n / c.target_value))
        self.last_desired = desired
        target = self._bounded(desired)
        apply, target = self._scale_to_zero(target, now)
        if apply and target != len(self.live_pods()):
            self.scale_to(target, now)

    def _autoscaler_desired(self, stable: float, panic: float, now: float) -> int:
        """autoscaler.go Scale, for the concurrency metric."""
        c = self.config
        ready = max(1, self.ready_count())
        max_up = math.ceil(c.max_scale_up_rate * ready)
        max_down = math.floor(ready / c.max_scale_down_rate)
        dspc = math.ceil(stable / c.target_value)
        dppc = math.ceil(panic / c.target_value)
        desired_stable = int(min(max(dspc, max_down), max_up))
        desired_panic = int(min(max(dppc, max_down), max_up))
        over_threshold = dppc / ready >= c.panic_threshold_pct / 100.0
        if over_threshold:
            self.panic_since = now  # begin panicking, or extend the panic
        elif self.panic_since is not None and self.panic_since + c.stable_window_s < now:
            self.panic_since, self.max_panic_pods = None, 0
        desired = desired_stable
        if self.panic_since is not None:  # in panic only increases apply
            self.max_panic_pods = max(self.max_panic_pods, desired_stable, desired_panic)
            desired = self.max_panic_pods
        if c.scale_down_delay_s > 0:  # delayWindow: the largest desired count of the last scale-down-delay
            self.delay_window.append((now, desired))
            while self.delay_window and self.delay_window[0][0] <= now - c.scale_down_delay_s:
                self.delay_window.popleft()
            desired = max(d for _, d in self.delay_window)
        return desired

    def _bounded(self, desired: int) -> int:
        c = self.config
        if desired < c.min_scale:
            return c.min_scale
        if c.max_scale and desired > c.max_scale:
            return c.max_scale
        return desired

    def _scale_to_zero(self, target: int, now: float) -> tuple[bool, int]:
        """kpa/scaler.go handleScaleToZero: (apply?, scale)."""
        c = self.config
        if target != 0:
            if self.inactive_since is not None:
                self.inactive_since, self.active_since = None, now  # the PodAutoscaler turns active again
            return True, target
        if not c.enable_scale_to_zero:
            return True, 1
        if not self.live_pods():
            return True, 0
        if self.inactive_since is None:
            if self.active_since is not None and now - self.active_since >= c.stable_window_s:
                self.inactive_since = now  # marked inactive; scale not applied yet
                return self._scale_to_zero(0, now)
            return True, 1  # hold one pod for the rest of the window
        hold = c.retention_s if c.target_burst_capacity == -1 else max(c.retention_s, c.scale_to_zero_grace_s)
        if now - self.inactive_since >= hold:
            self.active_since = None
            return True, 0
        return False, 0


class Simulation:
    """Replays `requests` through one ServiceModel per model; deterministic for a given seed."""

    def __init__(
        self,
        requests: list[Request],
        profiles: dict[str, ModelProfile],
        configs: dict[str, ScalingConfig],
        *,
        seed: int = 0,
        duration_s: float | None = None,
    ):
        self.heap: list = []
        self.seq = 0
        models = sorted({r.model for r in requests} | set(configs))
        self.services = {}
        for index, key in enumerate(models):
            rng = random.Random(f"{seed}:{key}:cold-start")
            self.services[key] = ServiceModel(self, index, profiles[key], configs[key], rng)
        self.by_index = {s.index: s for s in self.services.values()}
        service_rngs = {key: random.Random(f"{seed}:{key}:service") for key in models}
        self.records = [
            RequestRecord(r.arrival_s, r.model, profiles[r.model].sample_service(service_rngs[r.model]))
            for r in requests
        ]
        last = max((r.arrival_s for r in requests), default=0.0)
        self.duration_s = max(duration_s or 0.0, last)

    def push(self, t: float, kind: int, service: int, payload) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, service, payload))

    def run(self) -> dict[str, ServiceResult]:
        for service in self.services.values():
            c = service.config
            service.start_warm(max(c.initial_scale, c.min_scale) if not service.fixed else c.min_scale)
        for record in self.records:
            self.push(record.arrival, _ARRIVAL, self.services[record.model].index, record)
        pending = len(self.records)
        last_done = 0.0
        while self.heap:
            now, _, kind, index, payload = heapq.heappop(self.heap)
            if pending == 0 and now > self.duration_s:
                break  # every request finished and the trace is over
            service = self.by_index[index]
            if kind == _ARRIVAL:
                service.arrive(payload, now)
            elif kind == _POD_READY:
                service.pod_ready(payload, now)
            elif kind == _DONE:
                service.done(*payload, now)
                pending -= 1
                last_done = now
            else:
                service.tick(now)
        end = max(self.duration_s, last_done)
        return {
            key: ServiceResult(key, s.config, s.requests, s.pods, end, s.timeline) for key, s in self.services.items()
        }
