"""Prometheus metrics of the gateway, served at GET /metrics by `metrics_router` (G1's app includes it).

A registry of its own (not prometheus_client's global one), so a process that also hosts a function or a second
gateway in tests never mixes series. Names:

    turboflow_gateway_request_seconds{task,status}     accepted -> terminal, observed once per request when its
                                                       record turns terminal (queueing and cold start count);
                                                       drives the P95 alert
    turboflow_gateway_requests_accepted_total{task}    POST /v1/videos answered 201
    turboflow_gateway_requests_rejected_total{code}    POST /v1/videos answered 4xx/503, by problem code
    turboflow_gateway_lifecycle_events_total{type,outcome}
                                                       events at /internal/events: applied | unchanged |
                                                       ignored_unsigned | ignored_type | malformed
    turboflow_gateway_webhook_attempts_total{event,outcome}
                                                       webhook POSTs: delivered | failed | refused | gave_up
    turboflow_gateway_tenant_requests_total{tenant,outcome}
                                                       requests that turned terminal: completed | failed | cancelled
    turboflow_gateway_tenant_gpu_seconds_total{tenant} GPU-seconds billed to the tenant by the default rule
                                                       (billing/attribution.py; pod.ready facts are not consulted
                                                       here, so a load the activator made a request wait for is
                                                       left out: the ledger's report is the bill)

`tenant` is a label: one series per tenant (and outcome), bounded by the tenants that hold API keys; see
docs/billing.md on cardinality.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# A video takes seconds to minutes; a cold start with a queue can take many minutes: buckets up to one hour.
REQUEST_BUCKETS = (1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 450, 600, 900, 1200, 1800, 2700, 3600)

REQUEST_SECONDS = Histogram(
    "turboflow_gateway_request_seconds",
    "Seconds from the gateway accepting a request to its terminal state",
    ["task", "status"],
    buckets=REQUEST_BUCKETS,
    registry=REGISTRY,
)
REQUESTS_ACCEPTED = Counter(
    "turboflow_gateway_requests_accepted", "Requests accepted (201) by the gateway", ["task"], registry=REGISTRY
)
REQUESTS_REJECTED = Counter(
    "turboflow_gateway_requests_rejected",
    "Requests refused by the gateway, by problem code",
    ["code"],
    registry=REGISTRY,
)
LIFECYCLE_EVENTS = Counter(
    "turboflow_gateway_lifecycle_events",
    "CloudEvents received at /internal/events, by type and what became of them",
    ["type", "outcome"],
    registry=REGISTRY,
)
WEBHOOK_ATTEMPTS = Counter(
    "turboflow_gateway_webhook_attempts",
    "Webhook delivery attempts, by lifecycle event name and outcome",
    ["event", "outcome"],
    registry=REGISTRY,
)
TENANT_REQUESTS = Counter(
    "turboflow_gateway_tenant_requests",
    "Requests that reached a terminal state, by tenant and outcome",
    ["tenant", "outcome"],
    registry=REGISTRY,
)
TENANT_GPU_SECONDS = Counter(
    "turboflow_gateway_tenant_gpu_seconds",
    "GPU-seconds billed to each tenant (the ledger's default attribution rule)",
    ["tenant"],
    registry=REGISTRY,
)


def count_terminal(tenant: str, outcome: str, billed_gpu_seconds: float) -> None:
    """One request turned terminal: its outcome and the GPU-seconds it is billed (never negative)."""
    TENANT_REQUESTS.labels(tenant or "unknown", outcome).inc()
    TENANT_GPU_SECONDS.labels(tenant or "unknown").inc(max(float(billed_gpu_seconds), 0.0))


def observe_request_seconds(task: str, status: str, seconds: float) -> None:
    """One accepted -> terminal duration (negative clock skew between pods counts as 0)."""
    REQUEST_SECONDS.labels(task or "unknown", status).observe(max(float(seconds), 0.0))


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


metrics_router = APIRouter()


@metrics_router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    body, content_type = render()
    return Response(body, media_type=content_type)
