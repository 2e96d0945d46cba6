"""Monthly GPU-second budgets per tenant, read from the usage ledger (the gateway enforces them with a 429).

    budgets  TURBOFLOW_TENANT_MONTHLY_GPU_SECONDS = "acme=36000,*=3600"    (`*`: every tenant not named;
             no entry for a tenant and no `*`: unlimited)
    used     = sum of billed_s (billing/attribution.py, the documented rule) over the tenant's charges with
               occurred_at in [first instant of this month, first instant of next month), UTC
    verdict  exceeded when used >= budget; the budget resets at the first instant of next month

The check runs before a request is accepted, so a request that starts under budget may end over it (its GPU time
is known only when it finishes): the overshoot is bounded by the tenant's concurrent-request limit times one
request's GPU time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from .attribution import charges
from .ledger import Ledger

MONTHLY_GPU_SECONDS = "monthly_gpu_seconds"


@dataclass(frozen=True)
class QuotaVerdict:
    limit: str  # which limit: monthly_gpu_seconds
    used: float
    budget: float
    resets_at: datetime  # aware UTC

    @property
    def exceeded(self) -> bool:
        return self.used >= self.budget

    def seconds_until_reset(self, now: datetime) -> int:
        return max(1, int((self.resets_at - now).total_seconds() + 0.999))


def month_window(now: datetime) -> tuple[datetime, datetime]:
    """[first instant of now's month, first instant of the next month), aware UTC."""
    now = now.astimezone(UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if start.month == 12:
        return start, start.replace(year=start.year + 1, month=1)
    return start, start.replace(month=start.month + 1)


def budget_for(budgets: dict[str, float], tenant: str) -> float | None:
    """The tenant's own budget, else the `*` one, else None (unlimited)."""
    return budgets.get(tenant, budgets.get("*"))


def used_gpu_seconds(ledger: Ledger, tenant: str, start: datetime, end: datetime, **rule) -> float:
    """Billed GPU-seconds of `tenant` for facts in [start, end) under the attribution rule."""
    facts = ledger.facts(
        tenant=tenant, start=start.astimezone(UTC).replace(tzinfo=None), end=end.astimezone(UTC).replace(tzinfo=None)
    )
    return sum(c.billed_s for c in charges(facts, **rule))


def check_monthly(ledger: Ledger, tenant: str, budgets: dict[str, float], now: datetime) -> QuotaVerdict | None:
    """The tenant's monthly verdict, or None when it has no budget."""
    budget = budget_for(budgets, tenant)
    if budget is None:
        return None
    start, resets = month_window(now)
    return QuotaVerdict(MONTHLY_GPU_SECONDS, used_gpu_seconds(ledger, tenant, start, resets), budget, resets)
