"""RequestRecord -> the Video resource the API answers with (and its OpenAPI models).

The record keeps no presigned URL (it would go stale, and it is a credential): `output.url` is signed fresh on
every read from the output's key. Links in `urls` are absolute, under the gateway's public URL.
"""

from __future__ import annotations

import logging
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

Status = Literal["queued", "running", "completed", "failed", "cancelled"]
OUTPUT_FIELDS = ("width", "height", "num_frames", "fps", "duration", "seed", "timings")


class Progress(BaseModel):
    stage: str | None = None
    step: int | None = None
    of: int | None = None
    elapsed: float | None = None
    eta: float | None = None


class Output(BaseModel):
    url: str | None = Field(None, description="Presigned GET URL, signed at this read.")
    url_expires_at: str | None = None
    uri: str
    bytes: int | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    fps: float | None = None
    duration: float | None = None
    seed: int | None = None
    timings: dict[str, float] | None = None
    gpu_seconds: float | None = None


class VideoError(BaseModel):
    code: str
    message: str
    field: str | None = None


class Webhook(BaseModel):
    url: str
    events: list[str]
    attempts: list[dict[str, Any]] = []


class Links(BaseModel):
    get: str
    cancel: str
    stream: str


class Video(BaseModel):
    """A video request and, once there, its result."""

    id: str
    task: Literal["t2v", "i2v"] | None
    status: Status
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    queue_position: int | None = Field(None, description="1 = next; present while queued.")
    cancel_requested: bool = False
    input: dict[str, Any] | None = Field(None, description="The request fields as submitted; an image as its URI.")
    progress: Progress | None = None
    started: dict[str, Any] | None = Field(None, description="pod, cold_start, queue_wait, model_load_seconds")
    output: Output | None = None
    error: VideoError | None = None
    webhook: Webhook | None = None
    urls: Links


class VideoList(BaseModel):
    data: list[Video]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last.")


def links(base_url: str, request_id: str) -> dict:
    video = f"{base_url}/v1/videos/{quote(request_id, safe='')}"
    return {"get": video, "cancel": f"{video}/cancel", "stream": f"{video}/events"}


def output_of(result: dict | None, store) -> dict | None:
    """The `output` of a completed record's result, with a fresh presigned URL when the store can sign it."""
    if not result:
        return None
    video = result.get("video") or {}
    output = {
        "url": None,
        "url_expires_at": None,
        "uri": video.get("uri", ""),
        "bytes": video.get("bytes"),
        "sha256": video.get("sha256"),
        **{name: result.get(name) for name in OUTPUT_FIELDS},
        "gpu_seconds": (result.get("usage") or {}).get("gpu_seconds"),
    }
    bucket = getattr(getattr(store, "cfg", None), "bucket", None)
    if store is not None and video.get("key") and video.get("bucket", bucket) == bucket:
        try:
            output["url"], output["url_expires_at"] = store.presign(video["key"])
        except Exception as e:  # a signing failure must not hide the rest of the record
            log.warning("cannot presign %s: %s", video.get("key"), e)
    return output


def video_resource(record, *, base_url: str, store=None, queue_position: int | None = None) -> dict:
    """The Video JSON of `record` (an eventing.requeststate.RequestRecord)."""
    progress = record.progress
    error = record.error
    webhook = record.webhook
    return {
        "id": record.id,
        "task": record.task,
        "status": record.status,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "queue_position": queue_position if record.status == "queued" else None,
        "cancel_requested": bool(record.cancel_requested),
        "input": record.request,
        "progress": {k: progress.get(k) for k in ("stage", "step", "of", "elapsed", "eta")} if progress else None,
        "started": record.started,
        "output": output_of(record.result, store) if record.status == "completed" else None,
        "error": {k: error.get(k) for k in ("code", "message", "field")} if error else None,
        "webhook": (
            {"url": webhook.get("url"), "events": webhook.get("events", []), "attempts": webhook.get("attempts", [])}
            if webhook
            else None
        ),
        "urls": links(base_url, record.id),
    }
