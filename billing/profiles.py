"""Service-time and cold-start distributions per model, from the benchmark JSON (bench/results/*.json).

Service time: the measured request total of a 4-step run (`ours.projected_total_4_steps_s`: text encode, DiT, VAE
decode, mp4 encode, S3 upload) of the preferred variant, newest run first. The default distribution is lognormal with
that value as its median and a coefficient of variation of 0.1 (an assumption: the bench's step times vary < 2 %, but
a served request adds event handling, S3 latency and prompt-dependent work the bench does not see).

Cold start: resampled uniformly from the bench's measured function cold starts (`coldstart.runs[]` with a fastload
read: process launch -> ready, i.e. imports + weight load + CUDA warm-up, from a warm page cache and from cold disk)
plus the extra weights a bigger model reads at that run's measured rate, plus a fixed pod start (scheduling on a GPU
node that already exists, container start with the image cached: 15 s, an assumption). Not modelled by default: a
GPU node the cluster autoscaler must create first (minutes; `--pod-start` can carry it) and torch.compile warm-ups.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

# Weights each model reads at a cold start (bf16 safetensors on the model cache PVC), GB. 1.3B: measured
# (bench coldstart cache_gb). 14B: a 14.29 B-parameter DiT (bench run 4, expert_params_b) x 2 bytes + umT5-xxl
# 11.36 GB + VAE 0.25 GB; I2V-A14B: two such experts + umT5 + VAE.
CACHE_GB = {"1.3b-480p": 14.46, "14b-480p": 40.2, "14b-720p": 40.2, "i2v-a14b-720p": 68.8}
DEFAULT_VARIANTS = ("turbo", "sla-vae-compile", "sla-vae", "sla", "eager")
DEFAULT_POD_START_S = 15.0
# Example on-demand prices per GPU-hour (USD). They are placeholders to make cost comparable between settings,
# not quotes: pass your own with --gpu-price TYPE=USD.
EXAMPLE_GPU_PRICES = {"H200": 3.50, "H100": 2.50, "RTX5090": 0.90}
SERVICE_DISTRIBUTIONS = ("lognormal", "exponential", "fixed")


@dataclass(frozen=True)
class ColdStartSample:
    ready_s: float  # process launch -> ready, as measured
    gb: float  # weights that run read
    gbps: float  # its read rate


@dataclass
class ModelProfile:
    """How long one request and one cold start of `key` take on one GPU pod."""

    key: str
    service_s: float  # median (lognormal), mean (exponential) or the value (fixed)
    cold_starts: list[ColdStartSample] = field(default_factory=list)
    fixed_cold_start_s: float | None = None
    pod_start_s: float = DEFAULT_POD_START_S
    distribution: str = "lognormal"
    cv: float = 0.1
    source: str = ""

    @property
    def kind(self) -> str:
        return "i2v" if self.key.startswith("i2v-") else "t2v"

    def sample_service(self, rng: random.Random) -> float:
        if self.distribution == "exponential":
            return rng.expovariate(1.0 / self.service_s)
        if self.distribution == "fixed" or self.cv == 0:
            return self.service_s
        sigma = math.sqrt(math.log1p(self.cv**2))  # lognormal with this coefficient of variation
        return self.service_s * math.exp(rng.gauss(0.0, sigma))

    def sample_cold_start(self, rng: random.Random) -> float:
        if self.fixed_cold_start_s is not None:
            return self.fixed_cold_start_s
        if not self.cold_starts:
            raise ConfigError(f"no cold-start measurement for {self.key}: pass --cold-start {self.key}=SECONDS")
        run = rng.choice(self.cold_starts)
        extra_gb = max(0.0, CACHE_GB.get(self.key, run.gb) - run.gb)
        return self.pod_start_s + run.ready_s + extra_gb / run.gbps

    def mean_cold_start(self) -> float:
        if self.fixed_cold_start_s is not None:
            return self.fixed_cold_start_s
        if not self.cold_starts:
            return float("nan")
        return sum(
            self.pod_start_s + r.ready_s + max(0.0, CACHE_GB.get(self.key, r.gb) - r.gb) / r.gbps
            for r in self.cold_starts
        ) / len(self.cold_starts)


def _read_results(bench_dir: Path) -> list[tuple[str, dict]]:
    if not bench_dir.is_dir():
        raise ConfigError(f"benchmark results directory {bench_dir} does not exist (--bench DIR)")
    results = []
    for path in sorted(bench_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read benchmark result {path}: {e}") from None
        if isinstance(data, dict):
            results.append((path.name, data))
    return results


def measured_service_times(bench_dir: Path, variants: tuple[str, ...] = DEFAULT_VARIANTS) -> dict[str, tuple]:
    """key -> (seconds, "file:variant"): the first variant of `variants` measured for the key, newest run first;
    a key measured only in other variants takes its newest measurement."""
    found: dict[str, list] = {}
    for name, data in _read_results(bench_dir):
        date = str(data.get("environment", {}).get("date", ""))
        for model in data.get("models") or []:
            ours = model.get("ours") or {}
            seconds = ours.get("projected_total_4_steps_s") or ours.get("total_s")
            if not isinstance(seconds, (int, float)) or seconds <= 0 or "key" not in model:
                continue
            variant = str(model.get("variant", ""))
            rank = variants.index(variant) if variant in variants else len(variants)
            found.setdefault(model["key"], []).append((rank, _neg(date), float(seconds), f"{name}:{variant}"))
    return {key: (best[2], best[3]) for key, rows in found.items() for best in [min(rows)]}


def _neg(date: str) -> tuple:
    # newest first within a rank: sort on the negated code points of the ISO date
    return tuple(-ord(c) for c in date)


def measured_cold_starts(bench_dir: Path) -> list[ColdStartSample]:
    samples = []
    for _, data in _read_results(bench_dir):
        coldstart = data.get("coldstart") or {}
        gb = coldstart.get("cache_gb")
        for run in coldstart.get("runs") or []:
            if str(run.get("label", "")).startswith("fastload") and run.get("ready_s") and run.get("gbps") and gb:
                samples.append(ColdStartSample(float(run["ready_s"]), float(gb), float(run["gbps"])))
    return samples


def load_profiles(
    bench_dir: Path,
    *,
    variants: tuple[str, ...] = DEFAULT_VARIANTS,
    service_overrides: dict[str, float] | None = None,
    cold_start_overrides: dict[str, float] | None = None,
    distribution: str = "lognormal",
    cv: float = 0.1,
    pod_start_s: float = DEFAULT_POD_START_S,
) -> dict[str, ModelProfile]:
    if distribution not in SERVICE_DISTRIBUTIONS:
        raise ConfigError(f"service distribution {distribution!r} is not one of {', '.join(SERVICE_DISTRIBUTIONS)}")
    if not 0 <= cv <= 5:
        raise ConfigError(f"service-time coefficient of variation {cv:g} is outside 0..5")
    if pod_start_s < 0:
        raise ConfigError("pod start must be >= 0 s")
    service = measured_service_times(bench_dir, variants)
    for key, seconds in (service_overrides or {}).items():
        service[key] = (seconds, "--service-time")
    cold = measured_cold_starts(bench_dir)
    profiles = {}
    for key, (seconds, source) in service.items():
        profiles[key] = ModelProfile(
            key=key,
            service_s=seconds,
            cold_starts=cold,
            fixed_cold_start_s=(cold_start_overrides or {}).get(key),
            pod_start_s=pod_start_s,
            distribution=distribution,
            cv=cv,
            source=source,
        )
    for key in cold_start_overrides or {}:
        if key not in profiles:
            raise ConfigError(
                f"--cold-start names {key!r}, which has no service time (known: "
                f"{', '.join(sorted(profiles))}); add --service-time {key}=SECONDS"
            )
    return profiles
