"""Per-tenant Prometheus counters of the gateway (issue 15 deliverable 3), over real HTTP on a real nats-server and
a real SQLite ledger (tests/gateway_event_side.py): each request counted once when it turns terminal, by outcome,
with the GPU-seconds the ledger's rule bills it; redeliveries and a later, losing terminal event add nothing."""

from __future__ import annotations

import re
import uuid

import pytest
from gateway_event_side import EventSideGateway, completed_event, failed_event, started_event

from turboflow.eventing.natsserver import NatsServer


@pytest.fixture(scope="module")
def nats_url():
    with NatsServer() as server:
        yield server.url


@pytest.fixture
async def gateway(nats_url, tmp_path):
    async with EventSideGateway(nats_url, tmp_path / "gateway.db") as gw:
        yield gw


def sample(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            if found == labels:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_tenant_counters_count_each_terminal_request_once_with_its_billed_seconds(gateway):
    tenant = "c" + uuid.uuid4().hex[:8]
    done, broken = "r-" + uuid.uuid4().hex[:10], "r-" + uuid.uuid4().hex[:10]
    for request_id in (done, broken):
        await gateway.create(tenant, request_id)
        await gateway.post_event(started_event(tenant, request_id))
    await gateway.post_event(completed_event(tenant, done, gpu_seconds=4.25))
    await gateway.post_event(completed_event(tenant, done, gpu_seconds=4.25))  # redelivered
    await gateway.post_event(failed_event(tenant, broken))  # reports 1.0 s of device time
    await gateway.post_event(completed_event(tenant, broken, gpu_seconds=9.0))  # too late: first terminal won

    text = (await gateway.http.get("/metrics")).text
    requests = "turboflow_gateway_tenant_requests_total"
    assert sample(text, requests, tenant=tenant, outcome="completed") == 1
    assert sample(text, requests, tenant=tenant, outcome="failed") == 1
    assert sample(text, "turboflow_gateway_tenant_gpu_seconds_total", tenant=tenant) == pytest.approx(5.25)
