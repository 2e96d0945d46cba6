"""The video function shared by T2V and I2V: parse event -> engine -> S3 -> reply CloudEvent.

Lifecycle (func-python calls these):
    start(cfg)  synchronous at ASGI lifespan start. Reads the configuration, then loads the model from MODEL_DIR in
                a background thread so the server comes up at once; an incomplete cache is retried every
                TURBOFLOW_LOAD_RETRY_SECONDS (default 15) so a pod started before the pull job finished recovers.
    ready()     (False, "loading ..." / "model cache incomplete: ..." / "storage misconfigured: ...") until the
                weights are on the device and storage is configured.
    alive()     True while the process can serve; False only when the GPU worker thread died.
    handle()    one request CloudEvent -> one reply.
    stop()      stops loading, refuses new work, lets the running job finish in the background.

Concurrency: all device work runs in ONE worker thread (a single-thread executor), so the asyncio loop keeps
answering health checks and /metrics during a long generation. Decoding the image, mp4 encoding and S3 transfers
run in other threads and do not hold the device. The cluster sends one request at a time (containerConcurrency
1); if more arrive anyway they wait in FIFO order behind the running one, up to TURBOFLOW_MAX_QUEUE waiting
requests (default 2). Beyond that the function answers 503 (`device_busy`, retryable) so the broker retries
later instead of piling work onto the pod.

Replies (see eventing/contracts.py):
    200 + completed                  success, or a redelivered request whose video already exists (no GPU used)
    200 + failed (retryable false)   invalid input of any kind, out_of_memory, unknown model, id_conflict (the
                                     request id was already used for a different input)
    503 (JSON body, Retry-After)     model not loaded yet, device busy, S3 unreachable/throttling/misconfigured
    500                              an unexpected bug (the broker retries a bounded number of times); the body
                                     says nothing internal, the log has the traceback
    400                              a body that is not a valid CloudEvent (functions/app.py, func-python)

With TURBOFLOW_EVENT_SIGNING_KEY set, replies are signed and their ids derived with the key (eventing/signing.py);
an unusable key keeps the pod not ready.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from turboflow.engine.options import load_options
from turboflow.errors import ConfigError, InvalidRequestError, ModelCacheError, OutOfMemoryError, TurboflowError
from turboflow.eventing import signing
from turboflow.eventing.contracts import (
    DEFAULT_MAX_INLINE_IMAGE_BYTES,
    DEFAULT_SOURCES,
    ParsedRequest,
    check_image_header,
    completed_event,
    derived_seed,
    failed_from_error,
    parse_request,
    request_context,
)

from . import metrics

log = logging.getLogger(__name__)


class DeviceBusyError(TurboflowError):
    code = "device_busy"
    retryable = True


class NotReadyError(TurboflowError):
    code = "not_ready"
    retryable = True


class IdConflictError(InvalidRequestError):
    """The request id was already used (in this tenant and prefix) for a different input."""

    code = "id_conflict"


def id_conflict(req: ParsedRequest) -> IdConflictError:
    return IdConflictError(
        f"request id {req.request_id!r} was already used for a different request (another "
        "source or different input); send this request with a new id"
    )


def _same_input(req: ParsedRequest, stored: dict) -> bool:
    """Whether a stored completion answers this request's input. Sidecars written before inputs were hashed have
    no hash and are trusted (the old behaviour)."""
    digest = stored.get("input_sha256")
    return digest is None or digest == req.input_sha256


def _now_rfc3339() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class VideoFunction:
    """A Knative function instance serving one model (kind t2v or i2v)."""

    def __init__(self, kind: str, *, store=None, pipeline=None, config: Mapping[str, str] | None = None):
        if kind not in ("t2v", "i2v"):
            raise ValueError(f"kind must be t2v or i2v, got {kind!r}")
        self.kind = kind
        self.source = DEFAULT_SOURCES[kind]
        self.store = store
        self.pipeline = pipeline  # injected (tests) or loaded by start()
        self.config_overrides = dict(config or {})  # merged over start()'s cfg (tests, `turboflow serve`)
        self.model_dir: str | None = None
        self.model_aliases: set[str] = set()
        self.max_queue = 2
        self.max_inline_image_bytes = DEFAULT_MAX_INLINE_IMAGE_BYTES
        self.load_seconds = 0.0
        self._cold_start_pending = False
        self._state = "not started"
        self._load_error: str | None = None
        self._config_error: str | None = None
        self._stop = threading.Event()
        self._loader: threading.Thread | None = None
        self._gpu: concurrent.futures.ThreadPoolExecutor | None = None
        self._inflight = 0
        self._lock = threading.Lock()
        # video key -> (input hash, completion data future) of the job generating it
        self._running: dict[str, tuple[str, asyncio.Future]] = {}
        self.signing_key: bytes | None = None
        self._started_at = time.monotonic()

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self, cfg: Mapping[str, str]) -> None:
        cfg = {**dict(cfg or {}), **self.config_overrides}
        self.source = cfg.get("TURBOFLOW_EVENT_SOURCE") or DEFAULT_SOURCES[self.kind]
        self.max_queue = int(cfg.get("TURBOFLOW_MAX_QUEUE") or 2)
        self.max_inline_image_bytes = int(cfg.get("TURBOFLOW_MAX_INLINE_IMAGE_BYTES") or DEFAULT_MAX_INLINE_IMAGE_BYTES)
        self.model_aliases = {
            a.strip().lower() for a in (cfg.get("TURBOFLOW_MODEL_ALIASES") or "").split(",") if a.strip()
        }
        try:
            self.signing_key = signing.signing_key(cfg)
        except signing.SigningKeyError as e:
            self._config_error = f"invalid_config: {e}"
            log.error("invalid configuration: %s; the function will never become ready", e)
        self._gpu = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.kind}-gpu")
        if self.store is None:
            try:
                from turboflow.storage.s3 import S3Store

                self.store = S3Store.from_env(cfg)
            except TurboflowError as e:
                self._config_error = self._config_error or f"storage misconfigured: {e.message}"
                log.error("storage misconfigured: %s", e.message)
        if self.pipeline is not None:
            self._on_loaded(self.pipeline, 0.0)
            return
        self.model_dir = cfg.get("MODEL_DIR") or ""
        if not self.model_dir:
            self._load_error = "MODEL_DIR is not set"
            self._state = "failed"
            log.error("MODEL_DIR is not set; the function will never become ready")
            return
        device = cfg.get("TURBOFLOW_DEVICE") or None
        retry = float(cfg.get("TURBOFLOW_LOAD_RETRY_SECONDS") or 15)
        try:
            options = load_options(cfg)  # quantisation, compile, VAE decode, offload (engine/options.py)
        except ConfigError as e:
            self._load_error = f"{e.code}: {e.message}"
            self._state = "failed"
            log.error("invalid configuration: %s; the function will never become ready", e.message)
            return
        self._state = "loading"
        self._loader = threading.Thread(
            target=self._load_loop,
            args=(self.model_dir, device, retry, options),
            name=f"{self.kind}-loader",
            daemon=True,
        )
        self._loader.start()

    def _load_loop(self, model_dir: str, device: str | None, retry: float, options: dict) -> None:
        from turboflow.engine.loading import load_pipeline

        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                pipeline = load_pipeline(model_dir, device=device, **options)
            except ModelCacheError as e:
                self._load_error = f"{e.code}: {e.message}"
                self._state = "waiting for model cache"
                log.warning("model cache not usable (%s); retrying in %.0fs", self._load_error, retry)
                self._stop.wait(retry)
                continue
            except Exception as e:  # wrong weights, CUDA init failure: retrying will not help
                self._load_error = f"{getattr(e, 'code', type(e).__name__)}: {e}"
                self._state = "failed"
                log.exception("model load failed")
                return
            if pipeline.kind != self.kind:
                self._load_error = (
                    f"wrong_model_kind: {model_dir} holds a {pipeline.kind} model; this is the {self.kind} function"
                )
                self._state = "failed"
                log.error(self._load_error)
                return
            self._on_loaded(pipeline, time.perf_counter() - start)
            return

    def _on_loaded(self, pipeline, seconds: float) -> None:
        self.pipeline = pipeline
        self.load_seconds = seconds
        names = {str(pipeline.model_name).lower()}
        for alias in (getattr(pipeline, "defaults", {}) or {}).get("aliases", []) or []:
            names.add(str(alias).lower())
        self.model_aliases |= names
        self._cold_start_pending = True
        self._load_error = None
        self._state = "ready"
        metrics.MODEL_READY.labels(self.kind).set(1)
        metrics.MODEL_LOAD_SECONDS.labels(self.kind).set(seconds)
        metrics.record_gpu_memory(self.kind, pipeline.device)
        log.info("%s model %s ready on %s (load %.2fs)", self.kind, pipeline.model_name, pipeline.device, seconds)

    def stop(self) -> None:
        self._stop.set()
        self._state = "stopping"
        if self._gpu is not None:
            self._gpu.shutdown(wait=False, cancel_futures=True)
        metrics.MODEL_READY.labels(self.kind).set(0)

    def alive(self):
        if self._loader is not None and self._state == "loading" and not self._loader.is_alive():
            return False, "model loader thread died"
        return True, f"alive: {self._state}"

    def ready(self):
        if self._config_error:
            return False, f"not ready: {self._config_error}"
        if self._state == "ready" and self.pipeline is not None:
            return True, f"ready: {self.pipeline.model_name} on {self.pipeline.device}"
        if self._state == "loading":
            waited = time.monotonic() - self._started_at
            return False, f"not ready: loading model from {self.model_dir} ({waited:.0f}s)"
        if self._load_error:
            return False, f"not ready: {self._state}: {self._load_error}"
        return False, f"not ready: {self._state}"

    # ---- request handling ------------------------------------------------------------------------------------
    async def handle(self, scope, receive, send) -> None:
        event = scope["event"]
        # the CloudEvents SDK invents a `time` for events without one; functions/app.py saw the raw request
        has_time = bool(scope.get("turboflow.time_present", True))
        binary = any(k.lower().startswith(b"ce-") for k, _ in scope.get("headers", []))
        arrived = time.perf_counter()
        ctx = request_context(event)
        ctx["source"] = self.source
        try:
            reply = await self._process(event, ctx, arrived, has_time)
        except (DeviceBusyError, NotReadyError) as e:
            return await self._retry_later(send, e, ctx, 503)
        except TurboflowError as e:
            if e.retryable and not isinstance(e, OutOfMemoryError):
                return await self._retry_later(send, e, ctx, 503)
            metrics.REQUESTS.labels(self.kind, "failed", e.code).inc()
            log.info("request %s failed: %s: %s", ctx["request_id"], e.code, e.message)
            reply = failed_from_error(e, ctx, source=self.source, signing_key=self.signing_key)
        except Exception:  # a bug: let the broker retry a bounded number of times, keep serving
            log.exception("request %s: unexpected error", ctx["request_id"])
            metrics.REQUESTS.labels(self.kind, "retry", "internal_error").inc()
            # nothing internal (paths, URLs, exception text) in the body: it can end up in a `failed` event
            return await self._plain(
                send,
                500,
                {
                    "error": "internal_error",
                    "message": "internal error; the function's logs have details",
                    "request_id": ctx["request_id"],
                },
            )
        finally:
            metrics.STAGE_SECONDS.labels(self.kind, "total").observe(time.perf_counter() - arrived)
        await (send.binary(reply) if binary else send.structured(reply))

    async def _process(self, event, ctx: dict, arrived: float, has_time: bool = True):
        # in a thread: an inline image is decoded here, and the loop must keep answering health checks
        pipeline = self.pipeline  # the model whose defaults fill the request must be the one that serves it
        req = await asyncio.to_thread(
            parse_request,
            event,
            kinds=(self.kind,),
            max_inline_image_bytes=self.max_inline_image_bytes,
            model_defaults=getattr(pipeline, "defaults", None),
            has_time=has_time,
        )
        ctx["tenant"] = req.tenant
        ready, message = self.ready()
        if not ready:
            raise NotReadyError(message)
        if self.pipeline is not pipeline:  # the model finished loading while this request was parsed
            raise NotReadyError("the model became ready while this request was read; retry")
        if req.model and req.model.lower() not in self.model_aliases:
            raise InvalidRequestError(
                f"model {req.model!r} is not served here; this function serves {self.pipeline.model_name!r}",
                code="unknown_model",
                field="model",
            )
        store = self.store
        key = store.video_key(req.tenant, req.request_id, req.time, req.output_prefix)
        existing = await asyncio.to_thread(store.find_completion, key)
        if existing is not None:
            if not _same_input(req, existing):
                raise id_conflict(req)
            data = await asyncio.to_thread(store.refresh_url, existing)
            data.setdefault("input_sha256", req.input_sha256)
            metrics.REQUESTS.labels(self.kind, "replayed", "").inc()
            log.info("request %s already completed (%s); replaying the completion", req.request_id, key)
            return self._completed(req, data)

        # The same request may arrive again while it is still being generated here (the broker's ack deadline
        # is shorter than a long generation): join the running job instead of generating twice.
        running_entry = self._running.get(key)
        if running_entry is not None:
            running_digest, running = running_entry
            if running_digest != req.input_sha256:
                raise id_conflict(req)
            log.info("request %s is already being generated here; waiting for that result", req.request_id)
            try:
                data = await asyncio.shield(running)
            except asyncio.CancelledError:
                if running.cancelled():  # the first delivery was abandoned (client gone): let the broker retry
                    raise NotReadyError("an earlier delivery of this request was abandoned; retry") from None
                raise
            metrics.REQUESTS.labels(self.kind, "replayed", "").inc()
            return self._completed(req, data)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception not retrieved"
        self._running[key] = (req.input_sha256, future)
        try:
            data = await self._generate_and_publish(req, key, arrived)
        except Exception as e:
            future.set_exception(e)
            raise
        except BaseException:
            future.cancel()
            raise
        else:
            future.set_result(data)
        finally:
            self._running.pop(key, None)
        return self._completed(req, data)

    def _completed(self, req: ParsedRequest, data: dict):
        return completed_event(req, data, source=self.source, signing_key=self.signing_key)

    async def _generate_and_publish(self, req: ParsedRequest, key: str, arrived: float) -> dict:
        store = self.store
        timings: dict[str, float] = {}
        generation = req.generation
        if req.image is not None and req.image.scheme == "s3":
            t = time.perf_counter()
            raw = await asyncio.to_thread(store.read_image, req.image.bucket, req.image.key, req.tenant)
            timings["image_fetch"] = time.perf_counter() - t
            await asyncio.to_thread(check_image_header, raw)
            generation = await asyncio.to_thread(generation.replace(image=raw).validated)

        if generation.seed is None:
            # "pick one", but derived from the request id: a redelivery that has to generate again (e.g. the
            # first attempt died before publishing) reproduces the same video. (parse_request resolves an omitted
            # seed already; this covers a request built elsewhere.) 0 is a real seed, as upstream.
            generation = generation.replace(seed=derived_seed(req.request_id))
        with tempfile.TemporaryDirectory(prefix="turboflow-") as tmp:
            from turboflow.engine.request import FPS
            from turboflow.engine.video import Mp4Stream

            path = os.path.join(tmp, f"{req.request_id}.mp4")
            width, height = await asyncio.to_thread(generation.size)
            # frames are encoded on another thread as each VAE chunk is decoded, overlapping decode and encode
            mp4 = Mp4Stream(path, width, height, fps=FPS, background=True)
            try:
                result, held, queue_wait = await self._run_exclusive(generation, arrived, mp4.put)
            except BaseException:
                # joins the encoder thread: off the event loop, and not skipped by a second cancellation
                await asyncio.shield(asyncio.to_thread(mp4.abort))
                raise
            timings["queue_wait"] = queue_wait
            timings.update(result.timings)
            t = time.perf_counter()
            video = await asyncio.to_thread(mp4.finish)
            timings["mp4_encode"] = time.perf_counter() - t  # what the overlap left after the decode
            timings["mp4_encode_total"] = video.encode_seconds
            t = time.perf_counter()
            meta = {
                "request-id": req.request_id,
                "tenant": req.tenant,
                "model": result.model,
                "seed": result.seed,
                "steps": result.num_steps,
                "kind": self.kind,
                "sha256": video.sha256,
            }
            other = await asyncio.to_thread(store.find_completion, key)
            if other is not None:  # another replica finished the same request meanwhile: keep its result
                if not _same_input(req, other):
                    raise id_conflict(req)
                log.info("request %s was completed elsewhere meanwhile; replaying that completion", req.request_id)
                return await asyncio.to_thread(store.refresh_url, other)
            uploaded = await asyncio.to_thread(store.put_video, path, key, meta)
            url, expires_at = await asyncio.to_thread(store.presign, key)
            timings["upload"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - arrived
        cold = self._take_cold_start()
        gpu_seconds = held + (self.load_seconds if cold else 0.0)
        data = {
            "request_id": req.request_id,
            "input_sha256": req.input_sha256,
            "tenant": req.tenant,
            "kind": self.kind,
            "model": result.model,
            "video": {
                "uri": store.uri(key),
                "url": url,
                "url_expires_at": expires_at,
                "bucket": uploaded["bucket"],
                "key": key,
                "content_type": "video/mp4",
                "bytes": uploaded["bytes"],
                "sha256": video.sha256,
            },
            "width": video.width,
            "height": video.height,
            "num_frames": video.num_frames,
            "fps": video.fps,
            "duration": video.duration,
            "seed": result.seed,
            "num_steps": result.num_steps,
            "sigma_max": result.sigma_max,
            "attention": result.attention,
            **({"sla_topk": result.sla_topk} if result.sla_topk is not None else {}),
            "timings": {k: round(v, 6) for k, v in timings.items()},
            "usage": {
                "gpu_seconds": round(gpu_seconds, 6),
                "cold_start": cold,
                "model_load_seconds": round(self.load_seconds, 6),
                "device": str(self.pipeline.device),
            },
            "completed_at": _now_rfc3339(),
        }
        try:
            await asyncio.to_thread(store.put_completion, key, data)
        except BaseException:
            if cold:
                self._cold_start_pending = True  # the retry that completes carries the load
            raise
        for stage, seconds in timings.items():
            if stage != "total":
                metrics.STAGE_SECONDS.labels(self.kind, stage).observe(seconds)
        metrics.GPU_SECONDS.labels(self.kind).inc(gpu_seconds)
        metrics.REQUESTS.labels(self.kind, "completed", "").inc()
        log.info(
            "request %s completed: %s (%d bytes, gpu %.2fs%s)",
            req.request_id,
            key,
            uploaded["bytes"],
            gpu_seconds,
            ", cold start" if cold else "",
        )
        return data

    async def _run_exclusive(self, generation, arrived: float, frame_sink=None):
        """Run the generation on the single GPU worker; (result, seconds holding the device, queue_wait)."""
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
                return await loop.run_in_executor(self._gpu, self._gpu_job, generation, submitted, arrived, frame_sink)
            except RuntimeError as e:  # executor shut down (pod stopping)
                if "shutdown" in str(e):
                    raise NotReadyError("function is stopping") from e
                raise
        finally:
            with self._lock:
                self._inflight -= 1
                metrics.INFLIGHT.labels(self.kind).set(self._inflight)

    def _gpu_job(self, generation, submitted: float, arrived: float, frame_sink=None):
        """Runs on the GPU worker thread: the only place device work happens."""
        started = time.perf_counter()
        queue_wait = started - submitted
        metrics.QUEUE_WAIT.labels(self.kind).observe(queue_wait)
        device = self.pipeline.device
        try:
            import torch

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        except Exception:
            pass
        try:
            result = self.pipeline(generation, frame_sink=frame_sink)
        finally:
            metrics.record_gpu_memory(self.kind, device)
        return result, time.perf_counter() - started, queue_wait

    def _take_cold_start(self) -> bool:
        """True for the first request of the pod to complete: it is billed the model load."""
        with self._lock:
            cold, self._cold_start_pending = self._cold_start_pending, False
            return cold

    async def _retry_later(self, send, error: TurboflowError, ctx: dict, status: int) -> None:
        metrics.REQUESTS.labels(self.kind, "retry", error.code).inc()
        log.warning(
            "request %s: %s (%s): answering %d so the broker retries",
            ctx.get("request_id"),
            error.code,
            error.message,
            status,
        )
        await self._plain(
            send,
            status,
            {"error": error.code, "message": error.message, "retryable": True, "request_id": ctx.get("request_id")},
            retry_after=5,
        )

    @staticmethod
    async def _plain(send, status: int, body: dict, retry_after: int | None = None) -> None:
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if retry_after:
            headers.append((b"retry-after", str(retry_after).encode()))
        raw = getattr(send, "http", send)  # func-python's CloudEventSender passes raw ASGI messages through
        await raw({"type": "http.response.start", "status": status, "headers": headers})
        await raw({"type": "http.response.body", "body": payload})
