"""`GET /v1/usage?start=YYYY-MM-DD&end=YYYY-MM-DD`: the caller's tenant's GPU-seconds, from the usage ledger.

The ledger (billing/ledger.py) holds the raw completed/failed/cancelled events the lifecycle consumer recorded;
the charges are computed here by the same rule as `turboflow billing report` (billing/attribution.py, default
rule "waited"):

    gpu_seconds(day) = sum of charge.billed_s over the tenant's charges whose event occurred on `day` (UTC)
    requests(day)    = number of distinct request ids among them (a request cancelled by the gateway and then
                       answered `cancelled` by its function counts once)

`start` and `end` are inclusive UTC days; without `start` the whole history, without `end` up to today. Days
without usage are left out of `days`.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from turboflow.billing.attribution import charges

from .auth import current_tenant
from .problems import ApiProblem, responses


class UsageDay(BaseModel):
    day: str
    gpu_seconds: float
    requests: int


class Usage(BaseModel):
    tenant: str
    start: str | None
    end: str
    gpu_seconds: float
    requests: int
    days: list[UsageDay]


def parse_day(text: str | None, name: str) -> date | None:
    """A YYYY-MM-DD query value; ApiProblem 422 naming `name` otherwise."""
    if text is None or text == "":
        return None
    try:
        if len(text) != 10:
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise ApiProblem.invalid(
            [{"field": name, "code": f"invalid_{name}", "message": f"{name} must be a day YYYY-MM-DD, got {text!r}"}]
        ) from None


def summarize(tenant_charges) -> tuple[float, int, list[dict]]:
    """(total GPU-seconds, distinct requests, per-day rows oldest first) of charges (module doc)."""
    seconds: dict[date, float] = defaultdict(float)
    requests: dict[date, set] = defaultdict(set)
    for charge in tenant_charges:
        seconds[charge.day] += charge.billed_s
        requests[charge.day].add(charge.request_id or charge.event_id)
    days = [
        {"day": day.isoformat(), "gpu_seconds": round(seconds[day], 3), "requests": len(requests[day])}
        for day in sorted(seconds)
    ]
    every_request = set().union(*requests.values()) if requests else set()
    return round(sum(seconds.values()), 3), len(every_request), days


router = APIRouter(tags=["usage"])


@router.get(
    "/v1/usage",
    summary="The tenant's GPU-seconds, per day",
    response_model=Usage,
    responses=responses(401, 422, 500),
)
async def read_usage(
    request: Request,
    start: str | None = Query(None, description="first day (UTC, inclusive), YYYY-MM-DD; default: all history"),
    end: str | None = Query(None, description="last day (UTC, inclusive), YYYY-MM-DD; default: today"),
    tenant: str = Depends(current_tenant),
) -> Usage:
    from .app import get_service

    first = parse_day(start, "start")
    last = parse_day(end, "end") or datetime.now(UTC).date()
    if first is not None and last < first:
        raise ApiProblem.invalid(
            [{"field": "end", "code": "invalid_end", "message": f"end {last} is before start {first}"}]
        )
    ledger = get_service(request).ledger
    facts = await run_in_threadpool(
        ledger.facts,
        tenant=tenant,
        start=datetime.combine(first, time()) if first else None,
        end=datetime.combine(last + timedelta(days=1), time()) if last < date.max else None,
    )
    total, count, days = summarize(charges(facts))
    return Usage(
        tenant=tenant,
        start=first.isoformat() if first else None,
        end=last.isoformat(),
        gpu_seconds=total,
        requests=count,
        days=[UsageDay(**d) for d in days],
    )
