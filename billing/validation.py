"""The simulator against closed-form M/M/c (Erlang C): `python -m turboflow.billing.validation` prints the table
of docs/capacity-planning.md. min-scale = max-scale = c warm replicas, exponential service (mean 1 s; the queue is
scale-free), Poisson arrivals, 200,000 requests per row."""

from __future__ import annotations

import random

from .erlang import ErlangC
from .knative import ScalingConfig
from .profiles import ModelProfile
from .report import markdown_table
from .simulator import Simulation
from .traces import poisson

CASES = ((1, 0.5), (2, 0.7), (3, 0.8), (4, 0.9))


def erlang_rows(requests: int = 200_000, seed: int = 1) -> list[list[str]]:
    rows = []
    for servers, utilization in CASES:
        rate = utilization * servers
        config = ScalingConfig(
            target=1, target_utilization_pct=100, container_concurrency=1, min_scale=servers, max_scale=servers
        )
        profile = ModelProfile("m", 1.0, distribution="exponential", fixed_cold_start_s=0.0)
        trace = poisson(rate, requests / rate, {"m": 1.0}, random.Random(seed))
        result = Simulation(trace, {"m": profile}, {"m": config}, seed=seed).run()["m"]
        waits = [r.wait for r in result.requests]
        mean_wait = sum(waits) / len(waits)
        waited = sum(1 for w in waits if w > 0) / len(waits)
        exact = ErlangC(servers, rate, 1.0)
        rows.append(
            [
                str(servers),
                f"{utilization:.2f}",
                str(len(waits)),
                f"{exact.mean_wait:.4f}",
                f"{mean_wait:.4f}",
                f"{(mean_wait / exact.mean_wait - 1) * 100:+.1f} %",
                f"{exact.probability_of_waiting:.4f}",
                f"{waited:.4f}",
                f"{(waited / exact.probability_of_waiting - 1) * 100:+.1f} %",
            ]
        )
    return rows


def main() -> None:
    print(
        markdown_table(
            [
                "c",
                "ρ",
                "requests",
                "Wq Erlang C (s)",
                "Wq simulated (s)",
                "error",
                "P(wait) Erlang C",
                "P(wait) simulated",
                "error",
            ],
            erlang_rows(),
        )
    )


if __name__ == "__main__":
    main()
