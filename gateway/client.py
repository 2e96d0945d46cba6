"""A small async client of the gateway's HTTP API (docs/gateway.openapi.json), used by `turboflow submit`,
`turboflow demo` and the tests; usable from any Python program.

    async with GatewayClient("http://127.0.0.1:8000", api_key) as gw:
        video = await gw.create("t2v", {"prompt": "a red fox", "num_frames": 5})
        async for name, video in gw.events(video["id"]):   # queued, started, progress ..., completed
            ...
        path = await gw.download(video, "out")             # sha256 checked against the completion

Every answer that is not a success becomes a `GatewayError` carrying the problem's `code` (the CLI prints it as
`error[code]: message`); an unreachable gateway is `gateway_unavailable` (retryable).
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from turboflow.errors import TurboflowError

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
EVENT_NAMES = ("queued", "started", "progress", "completed", "failed", "cancelled")


class GatewayError(TurboflowError):
    """The gateway refused or failed a call: `code`, `status` and the problem body it answered with."""

    def __init__(self, message: str, *, code: str, status: int | None = None, problem: dict | None = None):
        errors = (problem or {}).get("errors") or []
        field = errors[0].get("field") if errors and isinstance(errors[0], dict) else None
        super().__init__(message, code=code, field=field, retryable=status in (429, 502, 503, 504) or status is None)
        self.status = status
        self.problem = problem or {}
        self.retry_after = self.problem.get("retry_after")


def problem_error(response: httpx.Response) -> GatewayError:
    """A GatewayError from an error response: its problem+json `code`, `detail` and per-field `errors`."""
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        text = response.text[:200].strip() or response.reason_phrase
        return GatewayError(f"gateway answered {response.status_code}: {text}", code="gateway_error", status=None)
    code = str(problem.get("code") or f"http_{response.status_code}")
    message = str(problem.get("detail") or problem.get("title") or f"HTTP {response.status_code}")
    fields = [f"{e.get('field')}: {e.get('message')}" for e in problem.get("errors") or [] if isinstance(e, dict)]
    if fields:
        message = f"{message} ({'; '.join(fields)})"
    return GatewayError(message, code=code, status=response.status_code, problem=problem)


def is_terminal(video: dict) -> bool:
    return video.get("status") in TERMINAL_STATUSES


class GatewayClient:
    """The gateway's `/v1` API with one API key (`tf_<key_id>_<secret>`: the key decides the tenant)."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0, transport=None):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise GatewayError(
                f"gateway {self.base_url} unreachable ({type(e).__name__}: {e})", code="gateway_unavailable"
            ) from None
        if response.status_code >= 400:
            raise problem_error(response)
        return response

    # ---- the resource --------------------------------------------------------------------------------------------
    async def create(
        self,
        task: str,
        fields: dict,
        *,
        image: str | Path | bytes | None = None,
        image_name: str = "image.png",
        idempotency_key: str | None = None,
    ) -> dict:
        """POST /v1/videos: `fields` are the request fields (prompt, num_frames, ..., optional id, webhook). An
        `image` that is a local path or bytes is uploaded (multipart: a `request` part with the JSON and an
        `image` file part); an `s3://` or `data:` string goes in the JSON as `image`."""
        body = {"task": task, **{k: v for k, v in fields.items() if v is not None}}
        headers = {"idempotency-key": idempotency_key} if idempotency_key else {}
        if isinstance(image, str) and image.startswith(("s3://", "data:", "file://")):
            body["image"] = image
            image = None
        if image is None:
            response = await self._call("POST", "/v1/videos", json=body, headers=headers)
        else:
            if not isinstance(image, bytes):
                path = Path(image)
                image_name, image = path.name, path.read_bytes()
            ctype = mimetypes.guess_type(image_name)[0] or "application/octet-stream"
            response = await self._call(
                "POST",
                "/v1/videos",
                data={"request": json.dumps(body)},
                files={"image": (image_name, image, ctype)},
                headers=headers,
            )
        return response.json()

    async def get(self, video_id: str) -> dict:
        return (await self._call("GET", f"/v1/videos/{video_id}")).json()

    async def list(self, *, status: str | None = None, limit: int | None = None, cursor: str | None = None) -> dict:
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        return (await self._call("GET", "/v1/videos", params=params)).json()

    async def cancel(self, video_id: str) -> dict:
        return (await self._call("POST", f"/v1/videos/{video_id}/cancel")).json()

    async def usage(self, *, start: str | None = None, end: str | None = None) -> dict:
        params = {k: v for k, v in {"start": start, "end": end}.items() if v is not None}
        return (await self._call("GET", "/v1/usage", params=params)).json()

    # ---- following a request -------------------------------------------------------------------------------------
    async def events(self, video_id: str, *, reconnects: int = 5) -> AsyncIterator[tuple[str, dict]]:
        """(event name, Video) from GET /v1/videos/{id}/events, the current state first, until a terminal one.
        A dropped stream is reopened (the gateway sends the current state again) up to `reconnects` times."""
        from httpx_sse import SSEError, aconnect_sse

        drops = 0
        while True:
            try:
                async with aconnect_sse(
                    self._http, "GET", f"/v1/videos/{video_id}/events", timeout=httpx.Timeout(30.0, read=None)
                ) as source:
                    if source.response.status_code >= 400:
                        await source.response.aread()
                        raise problem_error(source.response)
                    async for sse in source.aiter_sse():
                        if sse.event not in EVENT_NAMES:
                            continue  # a heartbeat or an event name this client does not know
                        video = json.loads(sse.data)
                        yield sse.event, video
                        if is_terminal(video):
                            return
            except (httpx.HTTPError, SSEError) as e:
                drops += 1
                if drops > reconnects:
                    raise GatewayError(
                        f"event stream of {video_id} kept failing ({type(e).__name__}: {e})",
                        code="gateway_unavailable",
                    ) from None
                continue
            # the stream ended without a terminal event (the gateway restarted): ask again
            drops += 1
            if drops > reconnects:
                raise GatewayError(f"event stream of {video_id} ended before a result", code="gateway_unavailable")

    async def wait(self, video_id: str, on_event=None) -> dict:
        """The terminal Video, following the event stream; `on_event(name, video)` sees every event."""
        video = None
        async for name, video in self.events(video_id):
            if on_event is not None:
                on_event(name, video)
        return video

    async def download(self, video: dict, out_dir: str | Path) -> Path:
        """A completed Video's mp4 into out_dir/<id>.mp4 from its fresh presigned URL; the file's sha256 must be
        the one the completion reported (else `checksum_mismatch`, and the file is removed)."""
        output = video.get("output") or {}
        if video.get("status") != "completed" or not output.get("url"):
            raise GatewayError(f"{video.get('id')} has no video (status {video.get('status')})", code="no_output")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        target = out / f"{video['id']}.mp4"
        digest = hashlib.sha256()
        try:
            # the presigned URL carries its own credentials: no Authorization header goes to the store
            async with httpx.AsyncClient(timeout=120) as plain, plain.stream("GET", output["url"]) as r:
                r.raise_for_status()
                with open(target, "wb") as f:
                    async for chunk in r.aiter_bytes():
                        digest.update(chunk)
                        f.write(chunk)
        except httpx.HTTPError as e:
            target.unlink(missing_ok=True)
            # the URL is a credential: name the object, never the URL
            raise GatewayError(
                f"download of {output.get('uri')} failed ({type(e).__name__})", code="download_failed"
            ) from None
        if output.get("sha256") and digest.hexdigest() != output["sha256"]:
            target.unlink(missing_ok=True)
            raise GatewayError(
                f"{output.get('uri')}: sha256 {digest.hexdigest()} != the completion's {output['sha256']}",
                code="checksum_mismatch",
            )
        return target


def _seconds(value) -> str:
    return f"{float(value):.1f}s" if isinstance(value, (int, float)) else "-"


def describe_event(name: str, video: dict) -> str:
    """One line for a stream event, e.g. `progress diffusion 2/4 elapsed 1.3s eta 2.1s`; never a presigned URL."""
    if name == "queued":
        position = video.get("queue_position")
        return "queued" + (f" (position {position})" if position else "")
    if name == "started":
        s = video.get("started") or {}
        cold = f"cold start, model load {_seconds(s.get('model_load_seconds'))}" if s.get("cold_start") else "warm"
        return f"started on {s.get('pod') or '?'} ({cold}, queued {_seconds(s.get('queue_wait'))})"
    if name == "progress":
        p = video.get("progress") or {}
        return (
            f"progress {p.get('stage')} {p.get('step')}/{p.get('of')} elapsed {_seconds(p.get('elapsed'))} "
            f"eta {_seconds(p.get('eta'))}"
        )
    if name == "completed":
        o = video.get("output") or {}
        return (
            f"completed {o.get('width')}x{o.get('height')}x{o.get('num_frames')} seed={o.get('seed')} "
            f"{o.get('uri')} gpu_s={float(o.get('gpu_seconds') or 0):.2f}"
        )
    if name == "failed":
        e = video.get("error") or {}
        return f"failed {e.get('code')}: {e.get('message')}"
    return name


def public_view(video: dict) -> dict:
    """The Video without its presigned URL (a credential: printed only when asked for)."""
    output = video.get("output")
    if not isinstance(output, dict):
        return video
    return {**video, "output": {k: v for k, v in output.items() if k not in ("url", "url_expires_at")}}
