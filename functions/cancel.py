"""Seeing a cancel: the request-state KV (eventing/requeststate.py) asked at delivery and watched while running.

    at delivery      CancelWatch.cancelled_before_start(tenant, id): the record says `cancelled`, or
                     `cancel_requested` on an unfinished request -> the job replies `cancelled` without the device
    while running    CancelWatch.watching(tenant, id) -> a threading.Event, set when `cancel_requested` (or
                     `cancelled`) appears; the job's stage_progress callback checks it at every rCM step and
                     decoded chunk and raises RequestCancelled there (engine/pipeline.py's step boundaries)

One NATS connection per process, opened lazily on the first request (TURBOFLOW_NATS_URL; unset: no cancel checks
at all). The KV being unreachable never fails a request: the check answers "not cancelled", the problem is logged
once, and the connection is tried again at most every RECONNECT_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from . import metrics

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3.0  # seconds: a request waits at most this long for a first connection
LOOKUP_TIMEOUT = 2.0  # seconds for one record look-up
RECONNECT_SECONDS = 15.0  # after a failure, requests go unchecked this long before the next connection attempt


def wants_cancel(record) -> bool:
    """Whether a request in this state must not (or no longer) run: cancelled, or a cancel was asked while it
    was still unfinished (a finished record with a late cancel flag is finished, not cancelled)."""
    if record is None:
        return False
    if record.status == "cancelled":
        return True
    return bool(record.cancel_requested) and record.status in ("queued", "running")


class CancelWatch:
    """The function's view of cancels. A no-op (never cancelled) when `nats_url` is None."""

    def __init__(self, nats_url: str | None, *, kind: str = "", retention_seconds: float = 30 * 86400.0):
        self.nats_url, self.kind, self.retention_seconds = nats_url, kind, retention_seconds
        self._states = None
        self._connecting: asyncio.Future | None = None
        self._retry_at = 0.0
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.nats_url is not None

    async def _store(self):
        """The connected RequestStates, or None while the KV is unreachable (one attempt per RECONNECT_SECONDS;
        concurrent requests share the attempt)."""
        if not self.enabled:
            return None
        if self._states is not None:
            return self._states
        if self._connecting is None:
            if time.monotonic() < self._retry_at:
                return None
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done():
                self._connecting = None

    async def _connect(self):
        from turboflow.eventing.requeststate import RequestStates

        try:
            self._states = await asyncio.wait_for(
                RequestStates.connect(
                    self.nats_url, retention_seconds=self.retention_seconds, name=f"turboflow-{self.kind}"
                ),
                CONNECT_TIMEOUT,
            )
        except Exception as e:  # noqa: BLE001 - a StateUnavailableError, a timeout: either way, carry on
            self._unavailable(e)
            return None
        if self._warned:
            log.info("request-state store reachable again: cancel checks resume")
        self._warned = False
        return self._states

    def _unavailable(self, error: BaseException) -> None:
        self._retry_at = time.monotonic() + RECONNECT_SECONDS
        if not self._warned:
            log.warning(
                "request-state store at %s unavailable (%s: %s): requests run without cancel checks until it answers",
                self.nats_url,
                type(error).__name__,
                error,
            )
            self._warned = True

    async def _drop(self, error: BaseException) -> None:
        states, self._states = self._states, None
        self._unavailable(error)
        if states is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(states.close(), 1.0)

    async def cancelled_before_start(self, tenant: str, request_id: str) -> bool:
        """Whether the request was cancelled before this delivery got to run it (False when unknown)."""
        states = await self._store()
        if states is None:
            if self.enabled:
                metrics.CANCEL_CHECKS.labels(self.kind, "unavailable").inc()
            return False
        try:
            found = await asyncio.wait_for(states.get(tenant, request_id), LOOKUP_TIMEOUT)
        except Exception as e:  # noqa: BLE001
            await self._drop(e)
            metrics.CANCEL_CHECKS.labels(self.kind, "unavailable").inc()
            return False
        cancelled = found is not None and wants_cancel(found[0])
        metrics.CANCEL_CHECKS.labels(self.kind, "cancelled" if cancelled else "proceed").inc()
        return cancelled

    @contextlib.asynccontextmanager
    async def watching(self, tenant: str, request_id: str):
        """A threading.Event set as soon as a cancel of this request appears in the KV, for the duration of the
        `async with` block (never set when the KV is unreachable or unset)."""
        flag = threading.Event()
        states = self._states if self.enabled else None  # connected by the delivery check just before
        task = None
        if states is not None:
            task = asyncio.ensure_future(self._watch(states, tenant, request_id, flag))
        try:
            yield flag
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _watch(self, states, tenant: str, request_id: str, flag: threading.Event) -> None:
        try:
            async for record in states.watch(tenant, request_id):
                if wants_cancel(record):
                    log.info("request %s: cancel requested while running; stopping at the next step", request_id)
                    flag.set()
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the watch broke: the request runs to the end
            log.warning("request %s: watching for a cancel stopped (%s: %s)", request_id, type(e).__name__, e)

    async def close(self) -> None:
        states, self._states = self._states, None
        if states is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(states.close(), 2.0)
