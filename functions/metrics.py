"""Prometheus metrics of the video functions, served at GET /metrics on the function's own port.

One registry per process (a pod serves one function). Names:

    turboflow_requests_total{kind,outcome,code}      outcome: completed | replayed | failed | cancelled | retry
    turboflow_stage_seconds{kind,stage}              queue_wait, image_fetch, text_encode, vae_encode, diffusion,
                                                     vae_decode, mp4_encode, upload, total
    turboflow_queue_wait_seconds{kind}               time from arrival to the GPU worker picking the job up
    turboflow_gpu_seconds_total{kind}                billed GPU-seconds (includes the cold-start load once)
    turboflow_inflight_requests{kind}                requests waiting for or holding the device
    turboflow_model_ready{kind}                      1 once weights are on the device
    turboflow_model_load_seconds{kind}               how long the last successful load took
    turboflow_gpu_memory_bytes{kind,type}            allocated | reserved | peak (peak of the last request)
    turboflow_lifecycle_events_total{kind,type,outcome}  started | progress | ready | stopped, sent | dropped
    turboflow_pod_start_to_ready_seconds{kind}       the pod's cold start: process start -> model ready
    turboflow_pod_busy_seconds_total{kind}           device seconds requests held (warm idle = ready time - this)
    turboflow_cancel_checks_total{kind,outcome}      look-ups at delivery: cancelled | proceed | unavailable (no KV)
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

REQUESTS = Counter(
    "turboflow_requests",
    "Requests handled, by outcome and failure code",
    ["kind", "outcome", "code"],
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "turboflow_stage_seconds",
    "Seconds per pipeline stage",
    ["kind", "stage"],
    buckets=_STAGE_BUCKETS,
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "turboflow_queue_wait_seconds",
    "Seconds a request waited for the GPU worker",
    ["kind"],
    buckets=_STAGE_BUCKETS,
    registry=REGISTRY,
)
GPU_SECONDS = Counter(
    "turboflow_gpu_seconds",
    "GPU-seconds billed to requests (cold-start load included once)",
    ["kind"],
    registry=REGISTRY,
)
INFLIGHT = Gauge(
    "turboflow_inflight_requests", "Requests waiting for or holding the device", ["kind"], registry=REGISTRY
)
MODEL_READY = Gauge("turboflow_model_ready", "1 when the model is loaded on the device", ["kind"], registry=REGISTRY)
MODEL_LOAD_SECONDS = Gauge(
    "turboflow_model_load_seconds", "Duration of the last successful model load", ["kind"], registry=REGISTRY
)
GPU_MEMORY = Gauge(
    "turboflow_gpu_memory_bytes",
    "CUDA memory: allocated, reserved, peak of the last request",
    ["kind", "type"],
    registry=REGISTRY,
)

LIFECYCLE_EVENTS = Counter(
    "turboflow_lifecycle_events",
    "Lifecycle events (started, progress) sent to K_SINK or dropped",
    ["kind", "type", "outcome"],
    registry=REGISTRY,
)
CANCEL_CHECKS = Counter(
    "turboflow_cancel_checks",
    "Request-state look-ups at delivery: cancelled (dropped before the device), proceed, unavailable (no KV)",
    ["kind", "outcome"],
    registry=REGISTRY,
)
POD_START_TO_READY = Gauge(
    "turboflow_pod_start_to_ready_seconds",
    "The pod's cold start: seconds from process start to the model being ready",
    ["kind"],
    registry=REGISTRY,
)
POD_BUSY_SECONDS = Counter(
    "turboflow_pod_busy_seconds",
    "Device seconds requests held on this pod (completed, and cancelled while running)",
    ["kind"],
    registry=REGISTRY,
)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def record_gpu_memory(kind: str, readings: dict[str, int]) -> None:
    """Set the GPU memory gauges from engine/device_memory.py's readings (empty on CPU: nothing to record)."""
    for kind_of_memory, value in readings.items():
        GPU_MEMORY.labels(kind, kind_of_memory).set(value)
