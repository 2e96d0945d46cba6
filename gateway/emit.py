"""Hand CloudEvents to the broker: an HTTP POST (binary content mode) to K_SINK, answered 2xx when accepted.

In a cluster K_SINK is the Broker's ingress (a SinkBinding sets it); locally, the dev broker's ingress. Anything but
a 2xx, or no answer, is `BrokerUnavailable`: the caller must not report the request as accepted.
"""

from __future__ import annotations

import logging

import httpx
from cloudevents.core.bindings.http import to_binary_event

log = logging.getLogger(__name__)

EMIT_TIMEOUT_SECONDS = 10.0


class BrokerUnavailable(Exception):
    """The broker did not accept the event (no sink configured, unreachable, or a non-2xx answer)."""


class EventEmitter:
    """POSTs events to `sink_url` over one pooled HTTP client (opened by `start`, closed by `stop`)."""

    def __init__(self, sink_url: str | None, *, timeout: float = EMIT_TIMEOUT_SECONDS):
        self.sink_url = sink_url
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def emit(self, event) -> None:
        """Deliver `event`; BrokerUnavailable (with a user-safe reason) unless the broker accepted it."""
        if not self.sink_url:
            raise BrokerUnavailable("no event sink is configured (K_SINK)")
        await self.start()
        message = to_binary_event(event)
        try:
            response = await self._client.post(self.sink_url, headers=dict(message.headers), content=message.body)
        except httpx.HTTPError as e:
            log.warning("emitting %s to %s failed: %s: %s", event.get_id(), self.sink_url, type(e).__name__, e)
            raise BrokerUnavailable("the broker could not be reached") from e
        if not 200 <= response.status_code < 300:
            log.warning("broker refused %s with %s: %s", event.get_id(), response.status_code, response.text[:300])
            raise BrokerUnavailable(f"the broker answered {response.status_code}")
