"""The local broker: Knative Broker semantics on a real nats-server with JetStream, driven by the Trigger YAML.

It only composes three parts:
    `jetstream.py`   the event log on JetStream (stream TURBOFLOW_EVENTS, subjects turboflow.events.<type>,
                     Nats-Msg-Id = msg_id(source, id), one durable pull consumer per Trigger)
    `ingress.py`     POST /{namespace}/{broker} (ASGI): 202/400/403/404/409/413/503 as Knative's ingress
    `dispatcher.py`  Knative delivery per Trigger: filters, timeout, retry with backoff, dead letter, replies
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .dispatcher import Dispatcher
from .ingress import Ingress
from .jetstream import DUPLICATE_WINDOW_S, STREAM, SUBJECT_PREFIX, JetStreamLog
from .triggers import Trigger

log = logging.getLogger(__name__)


class Broker:
    """Ingress + dispatcher for one broker (`namespace/name`) on a NATS server.

    addresses: maps a Destination ref (`kind/namespace/name` or `name`) to a base URL; every Trigger's subscriber
        and dead-letter sink is resolved here, so a Trigger the broker cannot route fails at construction.
    gates: optional URL -> readiness URL; before each attempt the dispatcher waits (up to the delivery timeout)
        until the readiness URL answers 200, like Knative's activator holding a request for a pod that is not
        ready yet. Without a gate, a subscriber that is down is simply retried.
    signing_key: the deployment's TURBOFLOW_EVENT_SIGNING_KEY; with it the ingress refuses turboflow reply types
        that do not carry a valid `turboflowsig` (nobody else may post a completion).
    """

    def __init__(
        self,
        nats_url: str,
        triggers: list[Trigger],
        addresses: Mapping[str, str],
        *,
        namespace: str = "turboflow",
        name: str = "default",
        gates: Mapping[str, str] | None = None,
        stream: str = STREAM,
        prefix: str = SUBJECT_PREFIX,
        max_inflight: int = 2,
        duplicate_window: float = DUPLICATE_WINDOW_S,
        ack_margin: float = 30.0,
        signing_key: bytes | None = None,
    ):
        self.nats_url, self.namespace, self.name = nats_url, namespace, name
        self.stream, self.prefix, self.duplicate_window = stream, prefix, duplicate_window
        self.signing_key, self.gates, self.max_inflight, self.ack_margin = signing_key, gates, max_inflight, ack_margin
        self.triggers = [t for t in triggers if t.broker == name and t.namespace == namespace]
        if not self.triggers:
            log.warning("no Trigger for broker %s/%s: events are stored but not delivered", namespace, name)
        self.targets = {
            t.name: (
                t.subscriber.resolve(addresses),
                t.delivery.dead_letter.resolve(addresses) if t.delivery.dead_letter else None,
            )
            for t in self.triggers
        }
        self.log: JetStreamLog | None = None
        self.ingress: Ingress | None = None
        self.dispatcher: Dispatcher | None = None

    async def start(self) -> None:
        self.log = await JetStreamLog.connect(
            self.nats_url,
            client_name=f"turboflow-broker-{self.namespace}-{self.name}",
            stream=self.stream,
            prefix=self.prefix,
            duplicate_window=self.duplicate_window,
        )
        self.ingress = Ingress(self.log, namespace=self.namespace, name=self.name, signing_key=self.signing_key)
        self.dispatcher = Dispatcher(
            self.log,
            self.triggers,
            self.targets,
            gates=self.gates,
            max_inflight=self.max_inflight,
            ack_margin=self.ack_margin,
            source=f"/turboflow/broker/{self.namespace}/{self.name}",
        )
        await self.dispatcher.start()
        log.info(
            "broker %s/%s: stream %s, subjects %s.>, triggers %s",
            self.namespace,
            self.name,
            self.stream,
            self.prefix,
            ", ".join(f"{t.name}->{self.targets[t.name][0]}" for t in self.triggers) or "none",
        )

    async def stop(self) -> None:
        if self.dispatcher:
            await self.dispatcher.stop()
        if self.log:
            await self.log.close()

    async def asgi(self, scope, receive, send) -> None:
        """The HTTP ingress (ASGI; see `eventing/ingress.py`)."""
        await self.ingress(scope, receive, send)

    async def accept(self, event) -> bool:
        """Store an event as the ingress does (see `Ingress.accept`)."""
        return await self.ingress.accept(event)
