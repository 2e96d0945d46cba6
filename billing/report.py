"""Metrics of a simulation run, sweeps over scaling settings, the markdown summary and the PNG plots."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError
from .simulator import ServiceResult


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in 0..100."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


@dataclass
class Metrics:
    requests: int
    p50_s: float
    p95_s: float
    p99_s: float
    mean_s: float
    max_s: float
    mean_wait_s: float
    waited_fraction: float  # requests that found no free warm pod
    cold_fraction: float  # requests that waited for a pod's cold start
    over_timeout: int  # requests slower than the revision's timeoutSeconds
    slo_s: float
    slo_attainment: float  # fraction of requests with latency <= slo_s
    slo_met: bool  # p95 < slo_s
    cold_starts: int
    peak_pods: int
    gpu_hours: float
    busy_gpu_hours: float
    idle_fraction: float
    cost: float
    cost_per_video: float


def metrics(results: list[ServiceResult], *, slo_s: float, price_per_gpu_hour: float) -> Metrics:
    """Metrics over the services in `results` together (one service: that service's)."""
    records = [r for result in results for r in result.requests]
    latencies = sorted(r.latency for r in records)
    waits = [r.wait for r in records]
    gpu_s = busy_s = 0.0
    cold_starts = 0
    for result in results:
        for pod in result.pods:
            gpu_s += (pod.ended if pod.ended is not None else result.end_s) - pod.created
            busy_s += pod.busy_s
            cold_starts += not pod.warm_start
    n = len(records)
    gpu_hours = gpu_s / 3600.0
    cost = gpu_hours * price_per_gpu_hour
    p95 = percentile(latencies, 95)
    timeouts = {result.model: result.config.timeout_s for result in results}
    return Metrics(
        requests=n,
        p50_s=percentile(latencies, 50),
        p95_s=p95,
        p99_s=percentile(latencies, 99),
        mean_s=sum(latencies) / n if n else math.nan,
        max_s=latencies[-1] if n else math.nan,
        mean_wait_s=sum(waits) / n if n else math.nan,
        waited_fraction=sum(1 for w in waits if w > 0) / n if n else math.nan,
        cold_fraction=sum(1 for r in records if r.cold) / n if n else math.nan,
        over_timeout=sum(1 for r in records if r.latency > timeouts[r.model]),
        slo_s=slo_s,
        slo_attainment=sum(1 for x in latencies if x <= slo_s) / n if n else math.nan,
        slo_met=bool(n) and p95 < slo_s,
        cold_starts=cold_starts,
        peak_pods=sum(_peak_pods(result) for result in results),
        gpu_hours=gpu_hours,
        busy_gpu_hours=busy_s / 3600.0,
        idle_fraction=1.0 - busy_s / gpu_s if gpu_s else math.nan,
        cost=cost,
        cost_per_video=cost / n if n else math.nan,
    )


def _peak_pods(result: ServiceResult) -> int:
    return max((pods for _, pods, _ in result.timeline), default=0)


def sweep_points(sweeps: dict[str, list[str]]) -> list[dict[str, str]]:
    """The cartesian product of `--sweep KEY=V1,V2` values, in the order given."""
    if not sweeps:
        return [{}]
    keys = list(sweeps)
    return [dict(zip(keys, values)) for values in itertools.product(*(sweeps[k] for k in keys))]


def _fmt(value: float, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def metrics_row(m: Metrics) -> list[str]:
    return [
        _fmt(m.p50_s),
        _fmt(m.p95_s),
        _fmt(m.p99_s),
        f"{m.slo_attainment * 100:.1f} %",
        "yes" if m.slo_met else "no",
        str(m.cold_starts),
        _fmt(m.gpu_hours, 2),
        f"{m.idle_fraction * 100:.1f} %",
        f"${m.cost:.2f}",
        f"${m.cost_per_video:.4f}",
    ]


METRIC_HEADER = ["p50 s", "p95 s", "p99 s", "≤ SLO", "P95 < SLO", "cold starts", "GPU-h", "idle", "cost", "cost/video"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def recommend(points: list[tuple[dict[str, str], Metrics]]) -> tuple[dict[str, str], Metrics] | None:
    """The cheapest sweep point whose P95 meets the SLO (ties: lower P95)."""
    meeting = [(s, m) for s, m in points if m.slo_met]
    return min(meeting, key=lambda sm: (sm[1].cost, sm[1].p95_s)) if meeting else None


def summary_markdown(
    *,
    title: str,
    description: list[str],
    configs: dict,
    per_service: dict[str, Metrics],
    total: Metrics,
    points: list[tuple[dict[str, str], Metrics]],
    plots: list[str],
) -> str:
    parts = [f"# {title}", "", *[f"- {line}" for line in description], ""]
    parts += ["## Scaling settings per service (from infra/, with --set applied)", ""]
    config_rows = [
        [
            key,
            str(c.min_scale),
            str(c.max_scale or "∞"),
            str(c.initial_scale),
            f"{c.target_value:g}",
            f"{c.stable_window_s:g}",
            f"{c.panic_window_s:g}",
            f"{c.panic_threshold_pct:g}",
            f"{c.retention_s:g}",
            f"{c.scale_to_zero_grace_s:g}",
            f"{c.target_burst_capacity:g}",
        ]
        for key, c in configs.items()
    ]
    parts += [
        markdown_table(
            [
                "model",
                "min",
                "max",
                "initial",
                "target",
                "stable s",
                "panic s",
                "panic %",
                "retention s",
                "grace s",
                "burst cap.",
            ],
            config_rows,
        ),
        "",
    ]
    parts += ["## Result", ""]
    rows = [[key, str(m.requests), *metrics_row(m)] for key, m in per_service.items()]
    if len(per_service) > 1:
        rows.append(["**all**", str(total.requests), *metrics_row(total)])
    parts += [markdown_table(["model", "requests", *METRIC_HEADER], rows), ""]
    if len(points) > 1:
        keys = list(points[0][0])
        parts += [
            "## Sweep",
            "",
            markdown_table(keys + METRIC_HEADER, [[s[k] for k in keys] + metrics_row(m) for s, m in points]),
            "",
        ]
        best = recommend(points)
        if best:
            settings = ", ".join(f"{k}={v}" for k, v in best[0].items())
            parts += [
                f"**Cheapest setting meeting P95 < {best[1].slo_s:g} s:** {settings}: P95 "
                f"{best[1].p95_s:.1f} s, {best[1].gpu_hours:.2f} GPU-h, ${best[1].cost_per_video:.4f} per "
                "video.",
                "",
            ]
        else:
            parts += [f"**No swept setting meets P95 < {points[0][1].slo_s:g} s.**", ""]
    if plots:
        parts += ["## Plots", "", *[f"![{p}]({p})" for p in plots], ""]
    return "\n".join(parts)


def write_json(path: Path, payload: dict) -> None:
    def default(o):
        if hasattr(o, "__dataclass_fields__"):
            return asdict(o)
        raise TypeError(type(o))

    path.write_text(json.dumps(payload, indent=1, default=default, allow_nan=True) + "\n")


def plot_sweep(out: Path, points: list[tuple[dict[str, str], Metrics]]) -> list[str]:
    """One PNG per swept key (P95 latency and cost per video against it, a line per combination of the other keys)
    and a cost-vs-P95 scatter of every point. Returns the file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib (the project's `sim` extra): pip install matplotlib") from None
    keys = list(points[0][0])
    names = []
    for key in keys:
        others = [k for k in keys if k != key]
        fig, (ax_latency, ax_cost) = plt.subplots(1, 2, figsize=(10, 4))
        groups: dict[tuple, list] = {}
        for settings, m in points:
            groups.setdefault(tuple(settings[k] for k in others), []).append((_as_number(settings[key]), m))
        for group, values in groups.items():
            values.sort(key=lambda v: v[0])
            label = ", ".join(f"{k}={v}" for k, v in zip(others, group)) or None
            xs = [v[0] for v in values]
            ax_latency.plot(xs, [v[1].p95_s for v in values], marker="o", label=label)
            ax_cost.plot(xs, [v[1].cost_per_video for v in values], marker="o", label=label)
        slo = points[0][1].slo_s
        ax_latency.axhline(slo, color="red", linestyle="--", linewidth=1, label=f"SLO {slo:g} s")
        ax_latency.set(xlabel=key, ylabel="P95 end-to-end latency (s)", title=f"P95 latency vs {key}")
        ax_cost.set(xlabel=key, ylabel="cost per video (USD)", title=f"cost per video vs {key}")
        ax_latency.legend(fontsize=7)
        if len(groups) > 1:
            ax_cost.legend(fontsize=7)
        fig.tight_layout()
        name = f"sweep-{key}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)
    fig, ax = plt.subplots(figsize=(6, 4))
    for settings, m in points:
        ax.scatter(m.p95_s, m.cost_per_video, color="tab:green" if m.slo_met else "tab:red")
        ax.annotate(",".join(f"{v}" for v in settings.values()), (m.p95_s, m.cost_per_video), fontsize=6)
    ax.axvline(points[0][1].slo_s, color="red", linestyle="--", linewidth=1)
    ax.set(
        xlabel="P95 latency (s)",
        ylabel="cost per video (USD)",
        title="every sweep point (" + ",".join(keys) + "); green meets the SLO",
    )
    fig.tight_layout()
    fig.savefig(out / "sweep-cost-vs-p95.png", dpi=100)
    plt.close(fig)
    return names + ["sweep-cost-vs-p95.png"]


def _as_number(text: str) -> float:
    from .knative import parse_duration

    try:
        return parse_duration(text)
    except ConfigError:
        return 1.0 if str(text).lower() == "true" else 0.0 if str(text).lower() == "false" else math.nan
