"""The pod's own clock: `io.turboflow.pod.ready` when the model is loaded and `io.turboflow.pod.stopped` at stop.

The model load is the pod's cold start, reported once here (issue 14), not only folded into whichever request the
pod completes first; billing decides who pays it (docs/billing.md). At stop the pod reports how its ready time was
spent:

    ready_seconds      = stopped - ready                              (monotonic clock)
    busy_seconds       = Σ device seconds of the requests it served   (completed: held; cancelled: what it used)
    warm_idle_seconds  = max(ready_seconds - busy_seconds, 0)         platform overhead per model and GPU type

so `load + busy + warm idle` is the pod's whole GPU time after process start (a request that failed on the device
bills nobody and counts as idle: the platform pays for failures).

`PodClock.ready` is called on the loader thread (functions/slot.py's `on_ready` hook) and hands off to the event
loop with `call_soon_threadsafe`; the events go through the LifecycleEmitter (K_SINK), signed, with ids derived from
(pod, process start, type), so a re-send is dropped by the broker. Without K_SINK nothing is sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from datetime import UTC, datetime

from turboflow.eventing.contracts import pod_event
from turboflow.eventing.types import POD_READY, POD_STOPPED

from . import metrics
from .lifecycle import LifecycleEmitter

log = logging.getLogger(__name__)

_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct"}


def gpu_type_from_name(device_name: str) -> str:
    """The GPU model priced from a CUDA device name: vendor words dropped, the first model word kept, its
    form-factor suffix cut ("NVIDIA H200" -> "H200", "NVIDIA A100-SXM4-80GB" -> "A100", "NVIDIA H100 80GB HBM3" ->
    "H100"); "RTX"/"GTX" keep their number ("NVIDIA GeForce RTX 5090" -> "RTX5090"). "unknown" when nothing is left."""
    words = [w for w in re.split(r"\s+", device_name.strip()) if w and w.lower() not in _VENDOR_WORDS]
    if not words:
        return "unknown"
    if words[0].upper() in ("RTX", "GTX") and len(words) > 1:
        return (words[0] + words[1]).upper().split("-")[0]
    return words[0].split("-")[0]


def gpu_type_of(device: object, configured: str | None = None) -> str:
    """TURBOFLOW_GPU_TYPE when set, else "cpu" for a CPU device, else the CUDA device's name shortened."""
    if configured:
        return configured
    text = str(device)
    if not text.startswith("cuda"):
        return text.split(":")[0] or "unknown"
    from turboflow.engine.device_memory import device_name

    name = device_name(text)
    return gpu_type_from_name(name) if name else "unknown"


def process_started_at() -> float:
    """This process's start (Unix seconds) from /proc; the import of this module where /proc is absent."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


_IMPORTED_AT = time.time()


def _rfc3339(unix_seconds: float) -> str:
    return datetime.fromtimestamp(unix_seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class PodClock:
    """Tracks one function process: when it turned ready, how long requests held the device, how many it served."""

    def __init__(
        self,
        emitter: LifecycleEmitter,
        *,
        kind: str,
        pod: str,
        gpu_type: str | None = None,
        started_at: float | None = None,
    ):
        """gpu_type: TURBOFLOW_GPU_TYPE (None: derived from the device at ready). started_at: process start."""
        self.emitter, self.kind, self.pod = emitter, kind, pod
        self.configured_gpu_type = gpu_type
        self.started_at = process_started_at() if started_at is None else started_at
        self.loop: asyncio.AbstractEventLoop | None = None
        self.model = ""
        self.device = ""
        self.gpu_type = gpu_type or ""
        self.load_seconds = 0.0
        self.ready_wall: float | None = None  # Unix seconds
        self._ready_monotonic: float | None = None
        self.busy_seconds = 0.0
        self.requests_served = 0
        self._lock = threading.Lock()  # ready() runs on the loader thread, the rest on the loop
        self._stopped = False

    def bind(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """The event loop the events are sent from (VideoFunction.start runs on it)."""
        self.loop = loop

    # ---- facts ------------------------------------------------------------------------------------------------
    def ready(self, pipeline, load_seconds: float) -> None:
        """The model is on the device (functions/slot.py `on_ready`, any thread): record it, send pod.ready."""
        with self._lock:
            self.model = str(getattr(pipeline, "model_name", "") or "")
            self.device = str(getattr(pipeline, "device", "") or "")
            self.gpu_type = gpu_type_of(self.device, self.configured_gpu_type)
            self.load_seconds = max(float(load_seconds), 0.0)
            self.ready_wall, self._ready_monotonic = time.time(), time.monotonic()
        metrics.POD_START_TO_READY.labels(self.kind).set(max(self.ready_wall - self.started_at, 0.0))
        self._on_loop(self._send, POD_READY, self.ready_data())

    def request_done(self, device_seconds: float) -> None:
        """A request held the device for `device_seconds` (completed or cancelled while running)."""
        if device_seconds <= 0:
            return
        with self._lock:
            self.busy_seconds += float(device_seconds)
            self.requests_served += 1
        metrics.POD_BUSY_SECONDS.labels(self.kind).inc(device_seconds)

    def stopped(self) -> None:
        """The function stops (on the loop): send pod.stopped once, if the pod ever turned ready."""
        if self._stopped or self.ready_wall is None:
            return
        self._stopped = True
        self._send(POD_STOPPED, self.stopped_data())

    # ---- event data -------------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        return {
            "pod": self.pod,
            "kind": self.kind,
            "model": self.model,
            "gpu_type": self.gpu_type,
            "device": self.device,
            "process_started_at": _rfc3339(self.started_at),
        }

    def ready_data(self) -> dict:
        return {
            **self._identity(),
            "load_seconds": round(self.load_seconds, 6),
            "start_to_ready_seconds": round(max(self.ready_wall - self.started_at, 0.0), 6),
            "ready_at": _rfc3339(self.ready_wall),
        }

    def stopped_data(self, now_monotonic: float | None = None) -> dict:
        now = time.monotonic() if now_monotonic is None else now_monotonic
        with self._lock:
            ready_s = max(now - self._ready_monotonic, 0.0)
            busy = min(self.busy_seconds, ready_s)
            served = self.requests_served
        return {
            **self._identity(),
            "ready_seconds": round(ready_s, 6),
            "busy_seconds": round(busy, 6),
            "warm_idle_seconds": round(max(ready_s - busy, 0.0), 6),
            "requests_served": served,
            "ready_at": _rfc3339(self.ready_wall),
            "stopped_at": _rfc3339(time.time()),
        }

    # ---- sending ----------------------------------------------------------------------------------------------
    def _on_loop(self, fn, *args) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            log.debug("no event loop bound: %s not sent", args[0] if args else fn)
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed meanwhile (shutdown)
            pass

    def _send(self, event_type: str, data: dict) -> None:
        if not self.emitter.enabled:
            return
        try:
            event = pod_event(event_type, data, source=self.emitter.source, signing_key=self.emitter.signing_key)
        except Exception:  # an advisory event never breaks the pod
            log.exception("pod event %s not built", event_type)
            return
        self.emitter.emit(event)  # counted in turboflow_lifecycle_events_total{type=ready|stopped}
