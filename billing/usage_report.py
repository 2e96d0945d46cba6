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

from .attribution import Charge
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


def render(rows: list[Row], fmt: str, *, meta: dict) -> str:
    """`rows` as `fmt`; JSON also carries `meta` (tenant, period, GPU, price, rule)."""
    if fmt == "json":
        return json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows([getattr(r, c) for c in COLUMNS] for r in rows)
        return out.getvalue().rstrip("\n")
    if fmt == "table":
        cells = [COLUMNS] + [tuple(_cell(getattr(r, c)) for c in COLUMNS) for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
        lines = [
            "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in cells
        ]
        header = ", ".join(f"{k} {v}" for k, v in meta.items())
        return "\n".join([header, *lines])
    raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
