"""Lifecycle events of a running request (`started`, `progress`), sent to K_SINK without ever holding up the GPU.

    device worker thread                    event loop                              K_SINK (broker ingress)
    ProgressReporter(stage, done, total) ─▶ coalesce: ≤ 1 per MIN_INTERVAL  ─▶ queue ─▶ one sender task ─▶ POST
      a tuple store + call_soon_threadsafe   per request, latest wins, the
                                             last step of every stage always

The GPU thread never waits on I/O or on a lock held by I/O: `ProgressReporter.__call__` stores the latest
(stage, step) as one tuple and, once per wake-up, schedules the loop with `call_soon_threadsafe`. Everything else
(building and signing events, the rate limit, HTTP) happens on the event loop. `emit` never blocks and never
raises: a full queue or a sink that stays down drops the event with a warning and a metric
(`turboflow_lifecycle_events_total{kind,type,outcome}`). These events are advisory: the terminal ones (completed,
failed, cancelled) travel as the function's reply, so a lost progress event costs a progress bar tick, nothing more.

Without K_SINK the emitter is a no-op. Event ids come from `contracts.lifecycle_event` with a per-event sequence
(`stage/step` for progress), so a redelivered request re-sends the same ids and the broker drops the copies.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from turboflow.eventing.contracts import lifecycle_event
from turboflow.eventing.types import PROGRESS, PROGRESS_STAGES, STARTED

from . import metrics

log = logging.getLogger(__name__)

MIN_INTERVAL = 0.5  # seconds between two progress events of one request (the final step of a stage excepted)
QUEUE_SIZE = 256
POST_TIMEOUT = 2.0  # seconds per attempt
RETRY_DELAYS = (0.1, 0.4)  # two quick retries, then the event is dropped


def rfc3339_now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def input_sha256_of(request) -> str | None:
    """The request's input hash (a ParsedRequest's, or a context dict's), None when it has none."""
    value = request.get("input_sha256") if isinstance(request, Mapping) else getattr(request, "input_sha256", "")
    return value or None


def eta_seconds(
    stage: str,
    step: int,
    of: int,
    stage_elapsed: float,
    units: Mapping[str, int],
    rates: Mapping[str, float],
) -> float | None:
    """Seconds until the request finishes, or None when a stage still ahead has no rate to go by.

        eta = (of - step) · r_stage  +  Σ_{s after stage} units_s · r_s

    where r_stage = stage_elapsed / step once a step of the current stage is done (the rate measured right now:
    for diffusion, the DiT step rate) and otherwise the pod's learned seconds per unit `rates[stage]`; `units` is
    the request's size of each stage (1 for text_encode / vae_encode / upload, num_steps for diffusion,
    num_frames for vae_decode), only the stages this request goes through; r_s for the later stages are the pod's
    learned rates from earlier requests."""
    current = stage_elapsed / step if step > 0 else rates.get(stage)
    if current is None:
        return None
    total = max(of - step, 0) * current
    order = list(PROGRESS_STAGES)
    position = order.index(stage) if stage in order else len(order)
    for later in order[position + 1 :]:
        count = units.get(later, 0)
        if count <= 0:
            continue
        rate = rates.get(later)
        if rate is None:
            return None
        total += count * rate
    return max(total, 0.0)


class StageRates:
    """Seconds per unit of each stage, learned on this pod from finished stages (an exponential average, so a
    change of request size or a warm cache moves it within a few requests). Touched on the event loop only."""

    def __init__(self, weight: float = 0.5):
        self.weight = weight
        self.rates: dict[str, float] = {}

    def observe(self, stage: str, seconds: float, units: int) -> None:
        if units <= 0 or seconds < 0 or not math.isfinite(seconds):
            return
        rate = seconds / units
        old = self.rates.get(stage)
        self.rates[stage] = rate if old is None else old + self.weight * (rate - old)


class LifecycleEmitter:
    """Sends lifecycle CloudEvents to `sink_url` (K_SINK) in the background; a no-op when `sink_url` is None."""

    def __init__(
        self,
        sink_url: str | None,
        *,
        source: str,
        signing_key: bytes | None,
        kind: str = "",
        pod: str = "",
        min_interval: float = MIN_INTERVAL,
        queue_size: int = QUEUE_SIZE,
    ):
        self.sink_url, self.source, self.signing_key = sink_url, source, signing_key
        self.kind, self.pod = kind, pod
        self.min_interval = min_interval
        self.rates = StageRates()
        self._queue_size = queue_size
        self._queue: asyncio.Queue | None = None
        self._sender: asyncio.Task | None = None
        self._client = None
        self._warned_down = False

    @property
    def enabled(self) -> bool:
        return self.sink_url is not None

    # ---- lifecycle --------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the sender task on the running loop (emit() also starts it on first use)."""
        self._ensure_sender()

    def _ensure_sender(self) -> bool:
        if not self.enabled:
            return False
        if self._sender is None or self._sender.done():
            import httpx

            self._queue = asyncio.Queue(self._queue_size)
            self._client = httpx.AsyncClient(timeout=POST_TIMEOUT)
            self._sender = asyncio.get_running_loop().create_task(self._send_all(), name="lifecycle-sender")
        return True

    async def stop(self, drain_seconds: float = 2.0) -> None:
        """Send what is queued (for at most `drain_seconds`), then stop."""
        if self._sender is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), drain_seconds)
        except TimeoutError:
            log.warning("lifecycle events still queued at shutdown were dropped: %d", self._queue.qsize())
        self._sender.cancel()
        await asyncio.gather(self._sender, return_exceptions=True)
        await self._client.aclose()
        self._sender = self._client = None

    # ---- emitting ---------------------------------------------------------------------------------------------
    def emit(self, event) -> None:
        """Queue `event` for sending; never blocks, never raises (a full queue drops it: counted and logged)."""
        try:
            if not self._ensure_sender():
                return
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._dropped(event, "queue full")
        except Exception:  # never let an advisory event break a request
            log.exception("lifecycle event not queued")

    def started(self, request, *, cold_start: bool, model_load_seconds: float, queue_wait: float) -> None:
        """`started`: the request got the device (called on the event loop)."""
        if not self.enabled:
            return
        data = {
            "input_sha256": input_sha256_of(request),
            "pod": self.pod,
            "cold_start": bool(cold_start),
            "model_load_seconds": round(max(model_load_seconds, 0.0), 6),
            "queue_wait": round(max(queue_wait, 0.0), 6),
            "started_at": rfc3339_now(),
        }
        self._emit_new(STARTED, request, data, sequence="")

    def reporter(self, request, units: Mapping[str, int], loop: asyncio.AbstractEventLoop) -> ProgressReporter:
        """A StageProgress callback for one request (engine/pipeline.py calls it on the device worker)."""
        return ProgressReporter(self, request, units, loop)

    def _emit_new(self, event_type: str, request, data: dict, sequence: str) -> None:
        """Build, sign and queue one event; a failure to build it is logged, never raised into a request."""
        data = {k: v for k, v in data.items() if v is not None or k == "eta"}
        try:
            event = lifecycle_event(
                event_type, request, data, source=self.source, signing_key=self.signing_key, sequence=sequence
            )
        except Exception:
            log.exception("lifecycle event %s not built", event_type)
            return
        self.emit(event)

    # ---- sending ----------------------------------------------------------------------------------------------
    async def _send_all(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._send(event)
            except Exception:
                log.exception("lifecycle event not sent")
            finally:
                self._queue.task_done()

    async def _send(self, event) -> None:
        import httpx
        from cloudevents.core.bindings.http import to_binary_event

        message = to_binary_event(event)
        problem = ""
        for delay in (0.0, *RETRY_DELAYS):
            if delay:
                await asyncio.sleep(delay)
            try:
                response = await self._client.post(self.sink_url, headers=message.headers, content=message.body)
            except httpx.HTTPError as e:
                problem = f"{type(e).__name__}: {e}"
                continue
            if response.status_code < 300:
                self._count(event, "sent")
                self._warned_down = False
                return
            problem = f"HTTP {response.status_code}"
            if response.status_code < 500 and response.status_code != 429:
                break  # the sink refuses it: sending again will not help
        self._dropped(event, problem)

    def _dropped(self, event, why: str) -> None:
        self._count(event, "dropped")
        if not self._warned_down:  # once per outage, not once per progress tick
            log.warning("lifecycle event %s for %s dropped: %s", event.get_type(), event.get_subject(), why)
            self._warned_down = True

    def _count(self, event, outcome: str) -> None:
        short = event.get_type().rsplit(".", 1)[-1]
        metrics.LIFECYCLE_EVENTS.labels(self.kind, short, outcome).inc()


class ProgressReporter:
    """The per-request StageProgress callback: stores the latest step from the device worker and lets the event
    loop turn it into at most one `progress` event per `min_interval` (the last step of each stage always).

    Hot path (device worker, every rCM step and decoded chunk): a clock read, one tuple store, and at most one
    `call_soon_threadsafe` per loop wake-up. Also safe to call from the event loop itself (the upload stage)."""

    def __init__(self, emitter: LifecycleEmitter, request, units: Mapping[str, int], loop):
        self.emitter, self.request, self.loop = emitter, request, loop
        self.units = dict(units)
        self.started = time.perf_counter()
        self.reports = 0  # how many times the engine reported (emitted <= reports)
        self.emitted = 0
        # written by the reporting thread only; read by the loop (a tuple store and deque ops are atomic)
        self._latest: tuple | None = None  # (seq, stage, done, total, at, stage_started_at)
        self._finals: collections.deque = collections.deque()  # last steps of stages: never coalesced away
        self._seq = 0
        self._stage = ""
        self._stage_started = self.started
        self._wake_pending = False
        # the loop's side
        self._sent_seq = 0
        self._last_sent_at = -math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.emitter.enabled:
            return
        now = time.perf_counter()
        self.reports += 1
        if stage != self._stage:
            self._stage, self._stage_started = stage, now
        self._seq += 1
        report = (self._seq, stage, done, total, now, self._stage_started)
        if done >= total:
            self._finals.append(report)
        self._latest = report
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self.loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # the loop is closed (shutdown): nothing to send to
                pass

    def close(self) -> None:
        """The request is over: send the stage finals still pending, nothing after (called on the loop)."""
        if self._closed:
            return
        self._flush(final=True)
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- on the event loop ------------------------------------------------------------------------------------
    def _on_timer(self) -> None:
        self._timer = None
        self._flush()

    def _flush(self, final: bool = False) -> None:
        """Send the pending stage finals, then the latest step if the rate allows (else a timer tries again).
        `latest` is read BEFORE the finals are drained: a final reported meanwhile is then newer than it, so no
        final can be skipped as older than something already sent."""
        if self._closed:
            return
        self._wake_pending = False
        latest = self._latest
        while self._finals:
            report = self._finals.popleft()
            if report[0] > self._sent_seq:
                self._send(report)
        if final or latest is None or latest[0] <= self._sent_seq:
            return
        wait = self._last_sent_at + self.emitter.min_interval - time.perf_counter()
        if wait <= 0:
            self._send(latest)
        elif self._timer is None:
            self._timer = self.loop.call_later(wait, self._on_timer)

    def _send(self, report: tuple) -> None:
        seq, stage, done, total, at, stage_started = report
        self._sent_seq, self._last_sent_at = seq, time.perf_counter()
        if done >= total and total > 0:
            self.emitter.rates.observe(stage, at - stage_started, total)
        eta = eta_seconds(stage, done, total, at - stage_started, self.units, self.emitter.rates.rates)
        data = {
            "input_sha256": input_sha256_of(self.request),
            "stage": stage,
            "step": int(done),
            "of": int(total),
            "elapsed": round(max(at - self.started, 0.0), 6),
            "eta": None if eta is None else round(eta, 3),
        }
        self.emitted += 1
        self.emitter._emit_new(PROGRESS, self.request, data, sequence=f"{stage}/{done}")


def stage_units(num_steps: int, num_frames: int, *, image: bool) -> dict[str, int]:
    """The size of each stage one request goes through: 1 for the single-shot stages, its rCM steps, its frames
    (vae_encode only when an image conditions the video)."""
    units = {"text_encode": 1, "vae_encode": 1, "diffusion": num_steps, "vae_decode": num_frames, "upload": 1}
    if not image:
        del units["vae_encode"]
    return units
