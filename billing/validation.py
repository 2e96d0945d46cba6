"""The simulator against closed-form M/M/c (Erlang C): `python -m turboflow.billing.validation` prints the table
of docs/capacity-planning.md. min-scale = max-scale = c warm replicas, exponential service (mean 1 s; the queue is
scale-free), Poisson arrivals, 200,000 requests per row.

`replay_check` compares the simulator with a measured replay (tests/test_simulator.py runs one through the real dev
stack): the device is the one server, so a request's end-to-end latency is

    latency_i = wait_i + held_i + D        held_i: usage.gpu_seconds (device time), D: the fixed path around it
                                           (gateway -> broker -> function -> upload -> reply -> gateway -> client)

D is fitted as the median of (latency_i - held_i - queue_wait_i) over the run, the service time as a lognormal
with the run's mean and coefficient of variation of held_i; the same arrival times go through one warm replica
(min = max scale 1, no cold start) and the simulated mean of wait + service + D is compared with the measured mean.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

from .erlang import ErlangC
from .knative import ScalingConfig
from .profiles import ModelProfile
from .report import markdown_table
from .simulator import Simulation
from .traces import Request, poisson

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


@dataclass(frozen=True)
class ReplayCheck:
    requests: int
    service_mean_s: float
    service_cv: float
    fixed_path_s: float  # D
    measured_mean_s: float
    simulated_mean_s: float

    @property
    def error(self) -> float:
        """(simulated - measured) / measured."""
        return self.simulated_mean_s / self.measured_mean_s - 1.0


def replay_check(
    arrivals_s: list[float],
    latencies_s: list[float],
    held_s: list[float],
    queue_waits_s: list[float],
    *,
    seed: int = 0,
    simulated_runs: int = 200,
) -> ReplayCheck:
    """Fit the run (module docstring), simulate its arrivals `simulated_runs` times with fresh service draws (the
    mean of 12 requests is noisy; this averages the model's expectation for this trace), compare the means."""
    n = len(arrivals_s)
    if n == 0 or not (len(latencies_s) == len(held_s) == len(queue_waits_s) == n):
        raise ValueError("one latency, device time and queue wait per arrival")
    mean = statistics.fmean(held_s)
    cv = statistics.pstdev(held_s) / mean if mean > 0 else 0.0
    fixed = statistics.median(max(lat - h - q, 0.0) for lat, h, q in zip(latencies_s, held_s, queue_waits_s))
    # ModelProfile's lognormal takes the median: median = mean / sqrt(1 + cv^2)
    profile = ModelProfile("replay", mean / math.sqrt(1 + cv**2), cv=cv, fixed_cold_start_s=0.0)
    config = ScalingConfig(target=1, target_utilization_pct=100, container_concurrency=1, min_scale=1, max_scale=1)
    start = min(arrivals_s)
    trace = [Request(a - start, "replay") for a in sorted(arrivals_s)]
    total = 0.0
    for run in range(simulated_runs):
        result = Simulation(trace, {"replay": profile}, {"replay": config}, seed=seed + run).run()["replay"]
        total += statistics.fmean(r.latency for r in result.requests) + fixed
    return ReplayCheck(n, mean, cv, fixed, statistics.fmean(latencies_s), total / simulated_runs)


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
