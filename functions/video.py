"""`VideoFunction`: func-python's function contract (start, stop, alive, ready, handle) for one task, t2v or i2v.

It only wires the parts together:

    start(cfg)  Settings from `cfg` (func-python passes the environment; `turboflow serve` builds them first and
                passes them in), the output store they select (TURBOFLOW_STORE: s3 | local), the model slot
                (functions/slot.py: background load, readiness), the lifecycle emitter (functions/lifecycle.py:
                `started` / `progress` to K_SINK), the pod clock (functions/pod.py: `pod.ready` once the model is
                loaded, `pod.stopped` at stop), the cancel watch (functions/cancel.py: TURBOFLOW_NATS_URL) and
                the video job (functions/job.py). A bad setting is never fatal to the process: readiness answers
                `not ready: invalid_config: VARIABLE: ...` forever and the log says it once.
    handle()    one request CloudEvent -> VideoJob -> functions/replies.py's table -> the HTTP answer.
    stop()      stops loading, refuses new work, lets the running job finish in the background; sends `pod.stopped`;
                queued lifecycle events get a short drain, the NATS connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Mapping

from turboflow.errors import ConfigError, RequestCancelled, TurboflowError
from turboflow.eventing.contracts import DEFAULT_SOURCES, request_context
from turboflow.settings import TASKS, Settings, prepare_process_environment

from . import metrics, replies
from .cancel import CancelWatch
from .job import VideoJob
from .lifecycle import LifecycleEmitter
from .pod import PodClock
from .slot import ModelSlot, SlotState

log = logging.getLogger(__name__)
TIME_PRESENT_KEY = "turboflow.time_present"  # ASGI scope key set by functions/app.py: did the request carry `time`?


def build_store(settings: Settings):
    """The output store and image source the settings select (TURBOFLOW_STORE)."""
    if settings.store == "local":
        from turboflow.storage.local import LocalDirectoryStore

        return LocalDirectoryStore(
            settings.local_store_dir,
            output_prefix=settings.output_prefix,
            image_prefix=settings.image_prefix,
            shared_image_prefixes=tuple(prefix for _, prefix in settings.shared_image_prefixes),
            max_image_bytes=settings.max_image_bytes,
            public_base_url=settings.local_store_url,
            url_expiry_seconds=settings.url_expiry_seconds,
        )
    from turboflow.storage.s3 import S3Store

    return S3Store.from_settings(settings)


def held_seconds(completed: Mapping) -> float:
    """Device seconds a completed request held: usage.gpu_seconds less the model load it carries when cold_start."""
    usage = completed.get("usage") or {}
    load = float(usage.get("model_load_seconds") or 0.0) if usage.get("cold_start") else 0.0
    return max(float(usage.get("gpu_seconds") or 0.0) - load, 0.0)


class VideoFunction:
    """A Knative function instance serving one model of task `kind` (t2v or i2v)."""

    def __init__(
        self,
        kind: str,
        *,
        settings: Settings | None = None,
        config: Mapping[str, str] | None = None,
        store=None,
        pipeline=None,
    ):
        """settings: already built (`turboflow serve`), else built in start() from func-python's cfg merged with
        `config` (tests). store, pipeline: injected instead of built (tests, benchmarks)."""
        if kind not in TASKS:
            raise ValueError(f"kind must be t2v or i2v, got {kind!r}")
        self.kind = kind
        self.settings = settings
        self.config_overrides = dict(config or {})
        self.store = store
        self.slot = ModelSlot(kind)
        self.job: VideoJob | None = None
        self.pod: PodClock | None = None  # built in start() with the emitter it sends through
        self._closing: asyncio.Task | None = None  # the emitter drain and NATS close scheduled by stop()
        self._injected_pipeline = pipeline
        self._config_error: str | None = None  # settings or store unusable: never ready

    @property
    def pipeline(self):
        return self.slot.pipeline

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self, cfg: Mapping[str, str] | None = None) -> None:
        prepare_process_environment()
        try:
            settings = self.settings or Settings.from_env({**dict(cfg or {}), **self.config_overrides})
            from turboflow.engine.options import LoadOptions

            options = LoadOptions.from_settings(settings)
        except ConfigError as e:
            self._config_error = f"{e.code}: {e.message}"
            self.slot.fail(self._config_error)
            return
        self.settings = settings
        self.slot.max_queue = settings.max_queue
        self.slot.model_names |= settings.model_aliases
        if self.store is None:
            try:
                self.store = build_store(settings)
            except TurboflowError as e:
                self._config_error = f"storage misconfigured: {e.message}"
                log.error("storage misconfigured: %s; the function will never become ready", e.message)
        source = settings.event_source or DEFAULT_SOURCES[self.kind]
        pod_name = settings.pod_name or socket.gethostname()
        lifecycle = LifecycleEmitter(
            settings.sink_url, source=source, signing_key=settings.event_signing_key, kind=self.kind, pod=pod_name
        )
        self.pod = PodClock(lifecycle, kind=self.kind, pod=pod_name, gpu_type=settings.gpu_type)
        try:
            self.pod.bind(asyncio.get_running_loop())  # func-python calls start() on the server's loop
        except RuntimeError:
            pass  # no loop (a direct call in tests): pod events are not sent
        self.slot.on_ready = self.pod.ready
        self.job = VideoJob(
            self.kind,
            self.slot,
            self.store,
            source=source,
            signing_key=settings.event_signing_key,
            max_inline_image_bytes=settings.max_inline_image_bytes,
            lifecycle=lifecycle,
            pod=self.pod,
            cancels=CancelWatch(
                settings.nats_url, kind=self.kind, retention_seconds=settings.request_retention_seconds
            ),
        )
        if self._injected_pipeline is not None:
            self.slot.loaded(self._injected_pipeline, 0.0)
        elif not settings.model_dir:
            self.slot.fail("MODEL_DIR is not set")
        else:
            self.slot.start_loading(settings.model_dir, settings.device, options, settings.load_retry_seconds)

    def stop(self) -> None:
        self.slot.stop()
        if self.pod is not None:
            self.pod.stopped()  # queued before the emitter's drain below
        if self.job is not None:
            try:
                loop = asyncio.get_running_loop()  # func-python calls stop() on the server's loop
            except RuntimeError:
                return
            # best effort: the server may close its loop before these finish; terminal events travel as replies
            self._closing = loop.create_task(self._close_background(self.job))

    async def wait_closed(self, timeout: float = 3.0) -> None:
        """Give the close scheduled by stop() (pod.stopped, queued lifecycle events, NATS) `timeout` seconds to
        finish: functions/app.py `run` awaits it after the server stops, before the loop is torn down."""
        if self._closing is not None and not self._closing.done():
            await asyncio.wait({self._closing}, timeout=timeout)

    @staticmethod
    async def _close_background(job: VideoJob) -> None:
        await job.lifecycle.stop()
        await job.cancels.close()

    def alive(self) -> tuple[bool, str]:
        return self.slot.alive()

    def ready(self) -> tuple[bool, str]:
        if self._config_error:
            return False, f"not ready: {self._config_error}"
        return self.slot.ready()

    # ---- requests -----------------------------------------------------------------------------------------
    async def handle(self, scope, receive, send) -> None:
        event = scope["event"]
        # the CloudEvents SDK invents a `time` for events without one; functions/app.py saw the raw request
        has_time = bool(scope.get(TIME_PRESENT_KEY, True))
        binary = any(k.lower().startswith(b"ce-") for k, _ in scope.get("headers", []))
        arrived = time.perf_counter()
        ctx = request_context(event)
        source = self.job.source if self.job else DEFAULT_SOURCES[self.kind]
        ctx["source"] = source
        try:
            if self.job is None:  # the settings were unusable: nothing to run the request with
                from .slot import NotReadyError

                raise NotReadyError(self.ready()[1])
            event_out, replayed = await self.job.run(event, ctx, arrived, has_time, ready=self.ready)
            reply = replies.completed(event_out, replayed)
            if not replayed and self.pod is not None:
                self.pod.request_done(held_seconds(event_out.get_data()))
        except Exception as e:
            if self.pod is not None and isinstance(e, RequestCancelled):
                self.pod.request_done(float(getattr(e, "gpu_seconds", 0.0) or 0.0))
            reply = replies.for_error(e, ctx, source=source, signing_key=self.job.signing_key if self.job else None)
            self._log_failure(e, reply, ctx)
        finally:
            metrics.STAGE_SECONDS.labels(self.kind, "total").observe(time.perf_counter() - arrived)
        metrics.REQUESTS.labels(self.kind, reply.outcome, reply.code).inc()
        await replies.send(reply, send, binary=binary)

    @staticmethod
    def _log_failure(error: Exception, reply: replies.Reply, ctx: dict) -> None:
        request_id = ctx.get("request_id")
        if reply.status == 500:
            log.error("request %s: unexpected error", request_id, exc_info=error)
        elif reply.status == 503:
            log.warning("request %s: %s (%s): answering 503 so the broker retries", request_id, reply.code, error)
        elif reply.outcome == "cancelled":
            log.info("request %s cancelled", request_id)
        else:
            log.info("request %s failed: %s: %s", request_id, reply.code, error)


__all__ = ["SlotState", "VideoFunction", "build_store"]
