"""The video job: one request CloudEvent -> the completion data, or a typed error (functions/replies.py answers).

    parse + validate (eventing/contracts.py) -> cancelled while queued? (functions/cancel.py: reply `cancelled`,
    no device) -> ready? model served here? -> replay a stored completion, or join the same request already
    running here -> generate on the slot's device worker while the mp4 is encoded (`started` and
    `progress` events to K_SINK, functions/lifecycle.py; a cancel stops it at the next step boundary) ->
    re-check for a completion written by another replica -> upload video, presign -> write the completion sidecar

Idempotency: the output key comes from the request alone (tenant, output_prefix, id, time), and the sidecar is
written last, so a redelivery replays it; the same id with a different input is `id_conflict`. Decoding the image,
mp4 encoding and store transfers run in threads that do not hold the device.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from datetime import UTC, datetime

from turboflow.errors import InvalidRequestError, RequestCancelled
from turboflow.eventing.contracts import (
    ParsedRequest,
    check_image_header,
    completed_event,
    parse_request,
)

from . import metrics
from .cancel import CancelWatch
from .lifecycle import LifecycleEmitter, stage_units
from .replies import cancelled_event
from .slot import ModelSlot, NotReadyError

log = logging.getLogger(__name__)


class IdConflictError(InvalidRequestError):
    """The request id was already used (in this tenant and prefix) for a different input."""

    code = "id_conflict"


def id_conflict(req: ParsedRequest) -> IdConflictError:
    return IdConflictError(
        f"request id {req.request_id!r} was already used for a different request (another "
        "source or different input); send this request with a new id"
    )


def same_input(req: ParsedRequest, stored: dict) -> bool:
    """Whether a stored completion answers this request's input. Sidecars written before inputs were hashed have
    no hash and are trusted (the old behaviour)."""
    digest = stored.get("input_sha256")
    return digest is None or digest == req.input_sha256


def _rfc3339(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _now_rfc3339() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class VideoJob:
    """The request use case of one function: a slot (model + device worker) and an output store."""

    def __init__(
        self,
        kind: str,
        slot: ModelSlot,
        store,
        *,
        source: str,
        signing_key: bytes | None,
        max_inline_image_bytes: int,
        lifecycle: LifecycleEmitter | None = None,
        cancels: CancelWatch | None = None,
        pod=None,
    ):
        """lifecycle: where `started` / `progress` go (default: nowhere); cancels: the request-state view
        (default: no cancel checks)."""
        self.kind, self.slot, self.store = kind, slot, store
        self.source, self.signing_key = source, signing_key
        self.max_inline_image_bytes = max_inline_image_bytes
        self.lifecycle = lifecycle or LifecycleEmitter(None, source=source, signing_key=signing_key, kind=kind)
        self.cancels = cancels or CancelWatch(None, kind=kind)
        self.pod = pod  # functions/pod.py PodClock: names the pod and GPU type in usage (None in bare tests)
        # video key -> (input hash, completion data future) of the job generating it
        self._running: dict[str, tuple[str, asyncio.Future]] = {}

    async def run(self, event, ctx: dict, arrived: float, has_time: bool = True, ready=None):
        """The completed event for `event` and whether it was replayed; raises TurboflowError (or a bug).
        `ready()` says whether the function can serve (settings and slot); default the slot's."""
        # in a thread: an inline image is decoded here, and the loop must keep answering health checks
        pipeline = self.slot.pipeline  # the model whose defaults fill the request must be the one that serves it
        req = await asyncio.to_thread(
            parse_request,
            event,
            kinds=(self.kind,),
            max_inline_image_bytes=self.max_inline_image_bytes,
            model_defaults=getattr(pipeline, "defaults", None),
            has_time=has_time,
            family=getattr(pipeline, "family", None),
        )
        ctx["tenant"] = req.tenant
        # before readiness: a cancelled request is answered even by a pod still loading its model (no retries)
        if await self.cancels.cancelled_before_start(req.tenant, req.request_id):
            log.info("request %s was cancelled before it ran; answering cancelled (no device used)", req.request_id)
            raise self._cancelled(req, "queued", 0.0)
        is_ready, message = (ready or self.slot.ready)()
        if not is_ready:
            raise NotReadyError(message)
        if self.slot.pipeline is not pipeline:  # the model finished loading while this request was parsed
            raise NotReadyError("the model became ready while this request was read; retry")
        if req.model and req.model.lower() not in self.slot.model_names:
            raise InvalidRequestError(
                f"model {req.model!r} is not served here; this function serves {pipeline.model_name!r}",
                code="unknown_model",
                field="model",
            )
        key = self.store.video_key(req.tenant, req.request_id, req.time, req.output_prefix)
        existing = await asyncio.to_thread(self.store.find_completion, key)
        if existing is not None:
            if not same_input(req, existing):
                raise id_conflict(req)
            data = await asyncio.to_thread(self.store.refresh_url, existing)
            data.setdefault("input_sha256", req.input_sha256)
            log.info("request %s already completed (%s); replaying the completion", req.request_id, key)
            return self._completed(req, data), True

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
            return self._completed(req, data), True
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
        return self._completed(req, data), False

    def _completed(self, req: ParsedRequest, data: dict):
        return completed_event(req, data, source=self.source, signing_key=self.signing_key)

    def _cancelled(self, req: ParsedRequest, while_: str, gpu_seconds: float) -> RequestCancelled:
        """The RequestCancelled this request ends with, carrying its reply event (functions/replies.py)."""
        error = RequestCancelled(f"request {req.request_id!r} was cancelled while {while_}")
        error.while_, error.gpu_seconds = while_, gpu_seconds
        error.event = cancelled_event(
            req,
            while_=while_,
            gpu_seconds=gpu_seconds,
            source=self.source,
            signing_key=self.signing_key,
            input_sha256=req.input_sha256,
        )
        if gpu_seconds:
            metrics.GPU_SECONDS.labels(self.kind).inc(gpu_seconds)  # device time used is billed, cancelled or not
        return error

    def _progress_callbacks(self, req: ParsedRequest, cancel_flag):
        """(stage_progress, on_start, reporter) for one generation. Both callbacks run on the device worker: they
        only read a flag, store a tuple and hand off to the loop (call_soon_threadsafe), never wait."""
        loop = asyncio.get_running_loop()
        request = req.generation.request
        units = stage_units(request.num_steps, request.num_frames, image=req.kind == "i2v")
        reporter = self.lifecycle.reporter(req, units, loop)

        def stage_progress(stage: str, done: int, total: int) -> None:
            if cancel_flag.is_set():  # a step boundary: stop here, nothing more runs on the device
                raise RequestCancelled(f"request {req.request_id!r} was cancelled while running")
            reporter(stage, done, total)

        def on_start(queue_wait: float, cold_start: bool) -> None:
            if cancel_flag.is_set():  # cancelled while it waited for the device: it never starts
                cancelled = RequestCancelled(f"request {req.request_id!r} was cancelled while queued")
                cancelled.gpu_seconds, cancelled.while_ = 0.0, "queued"
                raise cancelled
            if self.lifecycle.enabled:
                loop.call_soon_threadsafe(
                    lambda: self.lifecycle.started(
                        req, cold_start=cold_start, model_load_seconds=self.slot.load_seconds, queue_wait=queue_wait
                    )
                )

        return stage_progress, on_start, reporter

    async def _generate_and_publish(self, req: ParsedRequest, key: str, arrived: float) -> dict:
        async with self.cancels.watching(req.tenant, req.request_id) as cancel_flag:
            callbacks = self._progress_callbacks(req, cancel_flag)
            try:
                return await self._generate_and_publish_watched(req, key, arrived, cancel_flag, callbacks)
            finally:
                callbacks[2].close()  # stage finals still pending go out; nothing after the request ended

    async def _generate_and_publish_watched(
        self, req: ParsedRequest, key: str, arrived: float, cancel_flag, callbacks
    ) -> dict:
        from turboflow.engine.video import Mp4Stream

        stage_progress, on_start, reporter = callbacks

        store, pipeline = self.store, self.slot.pipeline
        timings: dict[str, float] = {}
        generation = req.generation  # validated once by parse_request; used as is
        if generation.image_pending:  # s3:// or file://, read through the store
            t = time.perf_counter()
            raw = await asyncio.to_thread(store.read_image, req.image.bucket, req.image.key, req.tenant)
            timings["image_fetch"] = time.perf_counter() - t
            await asyncio.to_thread(check_image_header, raw)
            generation = await asyncio.to_thread(generation.with_image, raw)  # the one decode
        with tempfile.TemporaryDirectory(prefix="turboflow-") as tmp:
            path = os.path.join(tmp, f"{req.request_id}.mp4")
            width, height = generation.size
            # frames are encoded on another thread as each VAE chunk is decoded, overlapping decode and encode
            mp4 = Mp4Stream(path, width, height, fps=pipeline.fps, background=True)
            try:
                result, held, queue_wait = await self.slot.generate(
                    generation, mp4.put, stage_progress=stage_progress, on_start=on_start
                )
                if cancel_flag.is_set():  # asked after the last step: still nothing is uploaded
                    late = RequestCancelled("cancelled after the last step")
                    late.gpu_seconds = held
                    raise late
            except BaseException as e:
                # joins the encoder thread: off the event loop, and not skipped by a second cancellation
                await asyncio.shield(asyncio.to_thread(mp4.abort))
                if isinstance(e, RequestCancelled):
                    where = getattr(e, "while_", "running")
                    raise self._cancelled(req, where, getattr(e, "gpu_seconds", 0.0)) from None
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
                if not same_input(req, other):
                    raise id_conflict(req)
                log.info("request %s was completed elsewhere meanwhile; replaying that completion", req.request_id)
                return await asyncio.to_thread(store.refresh_url, other)
            if cancel_flag.is_set():  # the last cancel check: asked while the mp4 was finished, nothing uploaded
                raise self._cancelled(req, "running", held)
            reporter("upload", 0, 1)
            uploaded = await asyncio.to_thread(store.put_video, path, key, meta)
            url, expires_at = await asyncio.to_thread(store.presign, key)
            reporter("upload", 1, 1)  # progress only: once uploaded, the request completes
            timings["upload"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - arrived
        cold = self.slot.take_cold_start()
        gpu_seconds = held + (self.slot.load_seconds if cold else 0.0)
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
                "model_load_seconds": round(self.slot.load_seconds, 6),
                "device": str(self.slot.pipeline.device),
                **({"gpu_type": self.pod.gpu_type, "pod": self.pod.pod} if self.pod and self.pod.gpu_type else {}),
                # when the request was made (its event's time): billing compares it with the pod's ready time
                **({"requested_at": _rfc3339(req.time)} if req.time is not None else {}),
            },
            "completed_at": _now_rfc3339(),
        }
        try:
            await asyncio.to_thread(store.put_completion, key, data)
        except BaseException:
            if cold:
                self.slot.give_back_cold_start()
            raise
        for stage, seconds in timings.items():
            if stage != "total":
                metrics.STAGE_SECONDS.labels(self.kind, stage).observe(seconds)
        metrics.GPU_SECONDS.labels(self.kind).inc(gpu_seconds)
        log.info(
            "request %s completed: %s (%d bytes, gpu %.2fs%s)",
            req.request_id,
            key,
            uploaded["bytes"],
            gpu_seconds,
            ", cold start" if cold else "",
        )
        return data
