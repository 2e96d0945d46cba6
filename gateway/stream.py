"""`GET /v1/videos/{id}/events`: a request's state changes as Server-Sent Events.

Driven by `RequestStates.watch` (a NATS KV watch on the one record), so every gateway replica streams what any
replica's consumer applied. Each SSE event is

    event: queued | started | progress | completed | failed | cancelled
    id:    1, 2, 3 ... (the order within this stream)
    data:  the Video JSON (as GET /v1/videos/{id} answers it)

The current state comes first, named after where the request is: queued, started, or its terminal status; a
request that is running and has progress opens with `started` (who runs it: pod, cold start, queue wait) and then
`progress`, so a client that joins late still sees the start. After that comes one event per lifecycle name a record
update adds, `progress` whenever progress moves, and `cancel_requested` turning true is sent under the current
name. Updates that change nothing a client follows (webhook attempts) send nothing. The stream ends after a
terminal event. A comment line (`: keep-alive`, with no blank line after it) goes out every 15 s of silence so
proxies keep the connection; a client that disconnects stops the watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from turboflow.eventing.requeststate import TERMINAL_STATUSES

from .auth import current_tenant
from .problems import ApiProblem, responses
from .webhooks import render_video

HEARTBEAT_SECONDS = 15.0
SSE_MEDIA_TYPE = "text/event-stream"


def current_name(record) -> str:
    """The event name of the state a record is in."""
    if record.status in TERMINAL_STATUSES:
        return record.status
    if record.status == "queued":
        return "queued"
    return "progress" if record.progress else "started"


def opening_names(record) -> list[str]:
    """The first events of a stream: the current state, with `started` before a running request's `progress`."""
    name = current_name(record)
    return ["started", "progress"] if name == "progress" else [name]


def update_names(previous, record) -> list[str]:
    """The SSE event names one record update produces (see the module doc); [] for an update clients ignore."""
    names = [name for name in record.events[len(previous.events) :] if name != "progress"]
    if record.progress != previous.progress and record.progress:
        names.insert(len([n for n in names if n in ("queued", "started")]), "progress")
    if not names and record.cancel_requested and not previous.cancel_requested:
        names = [current_name(record)]
    return names


def sse_event(name: str, event_id: int, data: dict) -> bytes:
    """One SSE event (data is one JSON line: no newline can break the framing)."""
    return f"event: {name}\nid: {event_id}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def record_events(records: AsyncIterator) -> AsyncIterator[tuple[str, object]]:
    """(name, record) pairs for a stream of record versions, ending after a terminal one."""
    previous = None
    try:
        async for record in records:
            names = opening_names(record) if previous is None else update_names(previous, record)
            previous = record
            for name in names:
                yield name, record
            if names and record.status in TERMINAL_STATUSES:
                return
    finally:
        await records.aclose()  # stops the KV watch now, not when the garbage collector gets to it


async def _with_heartbeats(items: AsyncIterator, interval: float) -> AsyncIterator:
    """`items`, with None whenever `interval` seconds pass without one. Stopping the iteration (the client went
    away: Starlette cancels the response task) cancels the pending read, which closes the KV watch."""
    iterator = aiter(items)
    pending: asyncio.Task | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        with contextlib.suppress(Exception):
            await iterator.aclose()


router = APIRouter(tags=["events"])


@router.get(
    "/v1/videos/{id}/events",
    summary="Follow a video request as Server-Sent Events",
    response_class=StreamingResponse,
    responses={
        200: {"description": "The event stream", "content": {SSE_MEDIA_TYPE: {"schema": {"type": "string"}}}},
        **responses(401, 404, 503),
    },
)
async def stream_events(id: str, request: Request, tenant: str = Depends(current_tenant)) -> StreamingResponse:
    from .app import get_service

    service = get_service(request)
    if await service.states.get(tenant, id) is None:
        raise ApiProblem("not_found", f"no video request {id!r}")
    base_url = service.settings.gateway_public_url or str(request.base_url)

    async def body() -> AsyncIterator[bytes]:
        sequence = 0
        events = record_events(service.states.watch(tenant, id))
        async for item in _with_heartbeats(events, HEARTBEAT_SECONDS):
            if item is None:
                # one comment line, no blank line after it: a blank line would end an "event" for decoders that
                # dispatch on it whenever a last event id is set (httpx-sse does: an empty `message` event)
                yield b": keep-alive\n"
                continue
            name, record = item
            sequence += 1
            yield sse_event(name, sequence, await render_video(service, record, base_url))

    return StreamingResponse(
        body(), media_type=SSE_MEDIA_TYPE, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
