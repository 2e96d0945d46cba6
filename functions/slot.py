"""The model slot: one model on one device, loaded in the background, and the single worker that uses the device.

States (SlotState) and what the health endpoints say:

    NOT_STARTED -> LOADING -> READY                      ready: "<model> on <device>"
                     |  ^
                     v  |  (cache incomplete: retried every TURBOFLOW_LOAD_RETRY_SECONDS)
               WAITING_FOR_CACHE
    LOADING -> FAILED      wrong weights, wrong task, CUDA failure: final (readiness says why)
    any     -> STOPPING    stop(): no new work, the running job finishes in the background

With TURBOFLOW_GPUS > 1 the model is a ParallelPipeline (engine/parallel.py): this process is rank 0 and drives one
worker process per extra GPU. A worker that dies or stops answering ends the running request in WorkerLostError
(device_unavailable, 503: the broker retries it elsewhere) within the collective timeout, and the pipeline never
recovers: readiness says "device_unavailable: <why>", liveness fails once no job holds the device (Kubernetes
restarts the container), and stop() closes the workers after the running job (no orphan processes).

Liveness is false only when the loader thread died while LOADING or a multi-device pipeline lost a worker. All
device work runs in ONE worker thread
(a single-thread executor), so the event loop keeps answering health checks and /metrics during a generation; at
most `max_queue` jobs wait behind the running one, beyond that DeviceBusyError (503, the broker retries later).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import threading
import time
from collections.abc import Callable

from turboflow.engine.options import LoadOptions
from turboflow.errors import ConfigError, ModelCacheError, RequestCancelled, TurboflowError

from . import metrics

log = logging.getLogger(__name__)


class DeviceBusyError(TurboflowError):
    code = "device_busy"
    retryable = True


class NotReadyError(TurboflowError):
    code = "not_ready"
    retryable = True


class SlotState(enum.Enum):
    NOT_STARTED = "not started"
    LOADING = "loading"
    WAITING_FOR_CACHE = "waiting for model cache"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"


def parallel_devices(device: str | None, gpus: int) -> list[str] | None:
    """The devices of a `gpus`-device pipeline for TURBOFLOW_DEVICE `device`: None (ParallelPipeline's default,
    cuda:0..N-1 when CUDA is present, else CPU) when unset or "cuda", N times "cpu" for "cpu" (tests on gloo).
    One indexed device ("cuda:1") cannot hold N ranks: ConfigError."""
    if device in (None, "", "cuda"):
        return None
    if device == "cpu":
        return ["cpu"] * gpus
    raise ConfigError(
        f"TURBOFLOW_DEVICE={device} names one device; with TURBOFLOW_GPUS={gpus} set it to cuda (or leave it unset) "
        f"and the pod's devices cuda:0..{gpus - 1} are used",
        field="TURBOFLOW_DEVICE",
    )


def _load(model_dir: str, device: str | None, options: LoadOptions):
    """One pipeline for the slot: on one device, or with `options.gpus` > 1 across that many (one worker process
    per extra device, engine/parallel.py), which rank 0 (this process) calls like the single-device one."""
    if options.gpus > 1:
        from turboflow.engine.parallel import ParallelPipeline

        return ParallelPipeline(
            model_dir,
            world_size=options.gpus,
            devices=parallel_devices(device, options.gpus),
            timeout_s=options.collective_timeout_s,
            options=options,
        )
    from turboflow.engine.loading import load_pipeline

    return load_pipeline(model_dir, device=device, options=options)


class ModelSlot:
    """Loads the model of one task (`kind`) and runs jobs on its device, one at a time."""

    def __init__(self, kind: str, *, max_queue: int = 2, loader: Callable = _load):
        self.kind = kind
        self.max_queue = max_queue
        self.state = SlotState.NOT_STARTED
        self.pipeline = None
        self.model_dir: str | None = None
        self.model_names: set[str] = set()  # lower-case names a request's `model` may use
        self.load_seconds = 0.0
        self.problem: str | None = None  # why it is not ready (a setting, the cache, the load)
        self._loader_fn = loader
        self._loader: threading.Thread | None = None
        self._stop = threading.Event()
        self._cold_start_pending = False
        self._inflight = 0
        self._lock = threading.Lock()
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{kind}-gpu")
        self._started_at = time.monotonic()
        self.on_ready: Callable | None = None  # called with (pipeline, load seconds) once the model is ready
        self._unhealthy_since: float | None = None  # when a multi-device pipeline was first seen unhealthy
        self._closer: threading.Thread | None = None

    # ---- loading ------------------------------------------------------------------------------------------
    def fail(self, problem: str) -> None:
        """Never become ready, saying why (a bad setting, a missing MODEL_DIR); logged once."""
        self.problem, self.state = problem, SlotState.FAILED
        log.error("%s function will never become ready: %s", self.kind, problem)

    def start_loading(self, model_dir: str, device: str | None, options: LoadOptions, retry_seconds: float) -> None:
        self.model_dir, self.state = model_dir, SlotState.LOADING
        self._loader = threading.Thread(
            target=self._load_loop,
            args=(model_dir, device, options, retry_seconds),
            name=f"{self.kind}-loader",
            daemon=True,
        )
        self._loader.start()

    def _load_loop(self, model_dir: str, device: str | None, options: LoadOptions, retry: float) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                pipeline = self._loader_fn(model_dir, device, options)
            except ModelCacheError as e:
                self.problem, self.state = f"{e.code}: {e.message}", SlotState.WAITING_FOR_CACHE
                log.warning("model cache not usable (%s); retrying in %.0fs", self.problem, retry)
                self._stop.wait(retry)
                continue
            except Exception as e:  # wrong weights, CUDA init failure: retrying will not help
                self.problem, self.state = f"{getattr(e, 'code', type(e).__name__)}: {e}", SlotState.FAILED
                log.exception("model load failed")
                return
            if self._stop.is_set() and hasattr(pipeline, "close"):  # stopped while loading: no worker outlives it
                pipeline.close()
                return
            if pipeline.kind != self.kind:
                held = f"{model_dir} holds a {pipeline.kind} model"
                if hasattr(pipeline, "close"):
                    pipeline.close()
                self.fail(f"wrong_model_kind: {held}; this is the {self.kind} function")
                return
            self.loaded(pipeline, time.perf_counter() - start)
            return

    def loaded(self, pipeline, seconds: float) -> None:
        """The model is on the device (from the loader, or injected by tests and benchmarks)."""
        from turboflow.engine.device_memory import memory_bytes

        self.pipeline, self.load_seconds = pipeline, seconds
        self.model_names |= {str(pipeline.model_name).lower()}
        self.model_names |= {str(a).lower() for a in (getattr(pipeline, "defaults", {}) or {}).get("aliases", [])}
        self._cold_start_pending = True
        self.problem, self.state = None, SlotState.READY
        metrics.MODEL_READY.labels(self.kind).set(1)
        metrics.MODEL_LOAD_SECONDS.labels(self.kind).set(seconds)
        metrics.record_gpu_memory(self.kind, memory_bytes(pipeline.device))
        log.info("%s model %s ready on %s (load %.2fs)", self.kind, pipeline.model_name, pipeline.device, seconds)
        if self.on_ready is not None:  # functions/pod.py: pod.ready (hands off to the loop, never waits)
            self.on_ready(pipeline, seconds)

    def stop(self) -> None:
        self._stop.set()
        self.state = SlotState.STOPPING
        self._worker.shutdown(wait=False, cancel_futures=True)
        metrics.MODEL_READY.labels(self.kind).set(0)
        if hasattr(self.pipeline, "close"):  # a multi-device pipeline: its worker processes go with the function
            # after the running job (if any) has finished on the device worker; not a daemon thread, so the
            # interpreter waits for it at exit and no worker process outlives the function
            self._closer = threading.Thread(target=self._close_pipeline, name=f"{self.kind}-close", daemon=False)
            self._closer.start()

    def _close_pipeline(self) -> None:
        self._worker.shutdown(wait=True)
        try:
            self.pipeline.close()
        except Exception:  # noqa: BLE001  (stopping anyway: say why in the log)
            log.exception("stopping the multi-device pipeline's workers failed")

    # ---- health -------------------------------------------------------------------------------------------
    def _lost_devices(self) -> str | None:
        """Why the loaded pipeline can no longer serve (a multi-device pipeline whose worker died or stuck), else
        None. Such a pipeline never recovers: readiness says so and, once no job holds it, liveness fails too so
        that Kubernetes restarts the container."""
        pipeline = self.pipeline
        if pipeline is None or getattr(pipeline, "healthy", True):
            return None
        if self._unhealthy_since is None:
            self._unhealthy_since = time.monotonic()
            metrics.MODEL_READY.labels(self.kind).set(0)
            log.error("%s function lost a device worker: %s", self.kind, pipeline.problem)
        return str(getattr(pipeline, "problem", None) or "a device worker was lost")

    def alive(self) -> tuple[bool, str]:
        if self._loader is not None and self.state is SlotState.LOADING and not self._loader.is_alive():
            return False, "model loader thread died"
        lost = self._lost_devices() if self.state is SlotState.READY else None
        if lost is not None:
            # the running job ends within the collective timeout (it answers 503 first); then restart
            bound = float(getattr(self.pipeline, "timeout_s", 300.0)) + 30.0
            if self._inflight == 0 or time.monotonic() - self._unhealthy_since > bound:
                return False, f"device_unavailable: {lost}"
        return True, f"alive: {self.state.value}"

    def ready(self) -> tuple[bool, str]:
        if self.state is SlotState.READY and self.pipeline is not None:
            lost = self._lost_devices()
            if lost is not None:
                return False, f"not ready: device_unavailable: {lost}"
            return True, f"ready: {self.pipeline.model_name} on {self.pipeline.device}"
        if self.state is SlotState.LOADING:
            waited = time.monotonic() - self._started_at
            return False, f"not ready: loading model from {self.model_dir} ({waited:.0f}s)"
        if self.problem:
            return False, f"not ready: {self.state.value}: {self.problem}"
        return False, f"not ready: {self.state.value}"

    # ---- the device worker --------------------------------------------------------------------------------
    async def generate(self, generation, frame_sink=None, stage_progress=None, on_start=None):
        """Run `generation` on the single device worker: (result, seconds holding the device, queue_wait).

        `frame_sink` and `stage_progress` go to the pipeline (engine/pipeline.py: decoded frames; every stage step,
        where a RequestCancelled raised by the callback stops the generation at that step boundary).
        `on_start(queue_wait, cold_start)` is called on the worker when the job gets the device: it must only hand
        off (call_soon_threadsafe), never wait. A cancelled job raises RequestCancelled carrying `gpu_seconds`
        (the device time it used); it is not a failure."""
        with self._lock:
            if self._inflight > self.max_queue:  # one running + max_queue waiting
                raise DeviceBusyError(
                    f"device busy: {self._inflight} requests in flight (1 running, {self.max_queue} may wait)"
                )
            self._inflight += 1
            metrics.INFLIGHT.labels(self.kind).set(self._inflight)
        submitted = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(
                    self._worker, self._gpu_job, generation, submitted, frame_sink, stage_progress, on_start
                )
            except RuntimeError as e:  # executor shut down (pod stopping)
                if "shutdown" in str(e):
                    raise NotReadyError("function is stopping") from e
                raise
        finally:
            with self._lock:
                self._inflight -= 1
                metrics.INFLIGHT.labels(self.kind).set(self._inflight)

    def _gpu_job(self, generation, submitted: float, frame_sink=None, stage_progress=None, on_start=None):
        """Runs on the device worker thread: the only place device work happens."""
        from turboflow.engine.device_memory import memory_bytes, reset_peak

        started = time.perf_counter()
        queue_wait = started - submitted
        metrics.QUEUE_WAIT.labels(self.kind).observe(queue_wait)
        if on_start is not None:
            on_start(queue_wait, self._cold_start_pending)
        device = self.pipeline.device
        reset_peak(device)
        try:
            result = self.pipeline(generation, frame_sink=frame_sink, stage_progress=stage_progress)
        except RequestCancelled as e:
            e.gpu_seconds = time.perf_counter() - started  # billed like any device time
            raise
        finally:
            metrics.record_gpu_memory(self.kind, memory_bytes(device))
        return result, time.perf_counter() - started, queue_wait

    # ---- cold-start billing -------------------------------------------------------------------------------
    def take_cold_start(self) -> bool:
        """True for the first request of the pod to complete: it is billed the model load."""
        with self._lock:
            cold, self._cold_start_pending = self._cold_start_pending, False
            return cold

    def give_back_cold_start(self) -> None:
        """The request that took the cold start did not complete: the retry that completes carries the load."""
        self._cold_start_pending = True
