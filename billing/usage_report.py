"""`turboflow billing report`: one tenant's charges summed per day and model, with totals, as table, CSV or JSON.

Every format renders the same rows; `scope` says what a row sums: `line` (one day and one model), `day` (all
models of a day), `model` (all days of a model), `total`. Cost is `billed_s / 3600 * price per GPU-hour`.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import asdict, dataclass

from .attribution import Charge, Overhead
from .errors import ConfigError

FORMATS = ("table", "csv", "json")
COLUMNS = ("scope", "day", "model", "requests", "billed_gpu_s", "load_charged_s", "platform_load_s", "cost_usd")


@dataclass(frozen=True)
class Row:
    scope: str
    day: str
    model: str
    requests: int
    billed_gpu_s: float
    load_charged_s: float
    platform_load_s: float
    cost_usd: float


def summarize(charges: list[Charge], *, price_per_gpu_hour: float) -> list[Row]:
    """Lines per (day, model) in order, then per-day and per-model subtotals, then the total."""
    groups: dict[tuple[str, str, str], list[Charge]] = defaultdict(list)
    for c in charges:
        day = c.day.isoformat()
        groups[("line", day, c.model)].append(c)
        groups[("day", day, "*")].append(c)
        groups[("model", "*", c.model)].append(c)
        groups[("total", "*", "*")].append(c)
    order = {"line": 0, "day": 1, "model": 2, "total": 3}
    rows = []
    for (scope, day, model), members in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1:])):
        billed = sum(c.billed_s for c in members)
        rows.append(
            Row(
                scope,
                day,
                model,
                len(members),
                round(billed, 3),
                round(sum(c.request_load_s for c in members), 3),
                round(sum(c.platform_load_s for c in members), 3),
                round(billed / 3600 * price_per_gpu_hour, 6),
            )
        )
    if not rows:
        rows.append(Row("total", "*", "*", 0, 0.0, 0.0, 0.0, 0.0))
    return rows


PLATFORM_COLUMNS = (
    "scope", "model", "gpu_type", "pods", "platform_load_s", "warm_idle_s", "overhead_s", "price_per_gpu_hour",
    "cost_usd",
)  # fmt: skip


@dataclass(frozen=True)
class PlatformRow:
    scope: str  # line (one model on one GPU type) | total
    model: str
    gpu_type: str
    pods: int
    platform_load_s: float
    warm_idle_s: float
    overhead_s: float
    price_per_gpu_hour: float | None  # None on the total (mixed GPU types)
    cost_usd: float


def summarize_platform(overhead: list[Overhead], *, prices: dict[str, float], default_gpu: str) -> list[PlatformRow]:
    """One line per (model, GPU type), priced at that GPU type's price (`default_gpu`'s when the type has none:
    cpu, unknown), then the total. cost = overhead_s / 3600 x price."""
    rows = []
    for o in overhead:
        price = prices.get(o.gpu_type, prices[default_gpu])
        cost = o.overhead_s / 3600 * price
        rows.append(
            PlatformRow(
                "line", o.model, o.gpu_type, o.pods, round(o.platform_load_s, 3), round(o.warm_idle_s, 3),
                round(o.overhead_s, 3), price, round(cost, 6),
            )
        )  # fmt: skip
    rows.append(
        PlatformRow(
            "total", "*", "*", sum(r.pods for r in rows), round(sum(r.platform_load_s for r in rows), 3),
            round(sum(r.warm_idle_s for r in rows), 3), round(sum(r.overhead_s for r in rows), 3), None,
            round(sum(r.cost_usd for r in rows), 6),
        )
    )  # fmt: skip
    return rows


def render_platform(rows: list[PlatformRow], fmt: str, *, meta: dict) -> str:
    return render(rows, fmt, meta=meta, columns=PLATFORM_COLUMNS)


def render(rows: list, fmt: str, *, meta: dict, columns: tuple[str, ...] = COLUMNS) -> str:
    """`rows` as `fmt`; JSON also carries `meta` (tenant, period, GPU, price, rule)."""
    if fmt == "json":
        return json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([_csv(getattr(r, c)) for c in columns] for r in rows)
        return out.getvalue().rstrip("\n")
    if fmt == "table":
        cells = [columns] + [tuple(_cell(getattr(r, c)) for c in columns) for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
        lines = [
            "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in cells
        ]
        header = ", ".join(f"{k} {v}" for k, v in meta.items())
        return "\n".join([header, *lines])
    raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _csv(value):
    return "" if value is None else value
