"""Request traces: synthetic (Poisson, bursty, diurnal) or read from a CSV of arrival times.

A trace is a list of Request(arrival_s, model) sorted by arrival; `model` is a benchmark key such as "1.3b-480p",
"14b-720p" or "i2v-a14b-720p" (task, model size and resolution in one word, which also picks the Knative Service).
"""

from __future__ import annotations

import csv
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, InvalidTraceError

DAY_S = 86400.0
CSV_COLUMNS = ("arrival_s", "task", "model", "resolution")
TASKS = ("t2v", "i2v")
RESOLUTIONS = ("480p", "720p")
_RATE_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0, "day": DAY_S, "d": DAY_S}
_MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9.]*")


@dataclass(frozen=True)
class Request:
    arrival_s: float
    model: str


def model_key(task: str, model: str, resolution: str) -> str:
    """The benchmark key of a (task, model size, resolution): t2v 1.3b 480p -> 1.3b-480p, i2v a14b 720p ->
    i2v-a14b-720p."""
    return f"{model}-{resolution}" if task == "t2v" else f"i2v-{model}-{resolution}"


def parse_rate(text: str) -> float:
    """Requests per second from "1000/day", "40/h", "2/min", "0.01/s" or a bare number (per hour)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*(?:/\s*(s|min|h|day|d))?\s*", str(text))
    if not match:
        raise ConfigError(f"rate {text!r} is not N/s, N/min, N/h, N/day or a number per hour")
    value = float(match.group(1)) / _RATE_UNITS[match.group(2) or "h"]
    if value <= 0:
        raise ConfigError(f"rate {text!r} must be > 0")
    return value


def parse_mix(text: str, known: set[str]) -> dict[str, float]:
    """{"1.3b-480p": 0.7, "14b-720p": 0.3} from "1.3b-480p=0.7,14b-720p=0.3" (weights are normalised; a single
    key needs no weight)."""
    mix: dict[str, float] = {}
    for part in str(text).split(","):
        key, _, weight = part.strip().partition("=")
        key = key.strip()
        if key not in known:
            raise ConfigError(
                f"model {key!r} has no service time (known: {', '.join(sorted(known))}; "
                f"or pass --service-time {key}=SECONDS)"
            )
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"model weight {weight!r} of {key} is not a number") from None
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"model weight of {key} must be > 0")
        mix[key] = mix.get(key, 0.0) + value
    total = sum(mix.values())
    return {key: value / total for key, value in mix.items()}


def _pick(mix: dict[str, float], rng: random.Random) -> str:
    keys = list(mix)
    return keys[0] if len(keys) == 1 else rng.choices(keys, weights=[mix[k] for k in keys])[0]


def poisson(rate: float, duration: float, mix: dict[str, float], rng: random.Random) -> list[Request]:
    requests, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return requests
        requests.append(Request(t, _pick(mix, rng)))


def bursty(
    rate: float,
    duration: float,
    mix: dict[str, float],
    rng: random.Random,
    *,
    burst_size: float = 8.0,
    burst_spread_s: float = 60.0,
) -> list[Request]:
    """Compound Poisson: bursts arrive as a Poisson process at rate / burst_size; each holds a geometric number of
    requests (mean burst_size) spread uniformly over burst_spread_s. The long-run rate stays `rate`."""
    if burst_size < 1 or burst_spread_s < 0:
        raise ConfigError("burst size must be >= 1 and burst spread >= 0")
    requests, t = [], 0.0
    p = 1.0 / burst_size
    while True:
        t += rng.expovariate(rate / burst_size)
        if t >= duration:
            break
        size = 1
        while rng.random() > p:
            size += 1
        for _ in range(size):
            arrival = t + rng.uniform(0.0, burst_spread_s)
            if arrival < duration:
                requests.append(Request(arrival, _pick(mix, rng)))
    requests.sort(key=lambda r: r.arrival_s)
    return requests


def diurnal_rate(t: float, rate: float, amplitude: float, peak_hour: float) -> float:
    """Requests per second at time t (0 = midnight): a daily cosine around the mean `rate`, highest at peak_hour."""
    return rate * (1.0 + amplitude * math.cos(2 * math.pi * (t - peak_hour * 3600.0) / DAY_S))


def diurnal(
    rate: float,
    duration: float,
    mix: dict[str, float],
    rng: random.Random,
    *,
    amplitude: float = 0.8,
    peak_hour: float = 15.0,
) -> list[Request]:
    """Non-homogeneous Poisson with a daily cycle (thinning, Lewis & Shedler); mean rate `rate`, peak/trough ratio
    (1+a)/(1-a) (a=0.8: 9x)."""
    if not 0 <= amplitude <= 1:
        raise ConfigError(f"diurnal amplitude {amplitude:g} is outside 0..1")
    if not 0 <= peak_hour < 24:
        raise ConfigError(f"peak hour {peak_hour:g} is outside 0..24")
    requests, t, top = [], 0.0, rate * (1.0 + amplitude)
    while True:
        t += rng.expovariate(top)
        if t >= duration:
            return requests
        if rng.random() * top <= diurnal_rate(t, rate, amplitude, peak_hour):
            requests.append(Request(t, _pick(mix, rng)))


def read_csv(path: Path, known: set[str]) -> list[Request]:
    """Rows `arrival_s,task,model,resolution` (seconds from the start of the trace; a header line first).
    Any bad row is an InvalidTraceError naming its line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidTraceError(f"cannot read {path}: {e}") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or [c.strip() for c in rows[0]] != list(CSV_COLUMNS):
        raise InvalidTraceError(f"line 1: the header must be {','.join(CSV_COLUMNS)}")
    requests = []
    for number, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        requests.append(_parse_row(number, [cell.strip() for cell in row], known))
    if not requests:
        raise InvalidTraceError(f"{path} has no requests")
    requests.sort(key=lambda r: r.arrival_s)
    return requests


def _parse_row(number: int, row: list[str], known: set[str]) -> Request:
    if len(row) != len(CSV_COLUMNS):
        raise InvalidTraceError(
            f"line {number}: expected {len(CSV_COLUMNS)} fields ({','.join(CSV_COLUMNS)}), got {len(row)}"
        )
    arrival_text, task, model, resolution = row
    try:
        arrival = float(arrival_text)
    except ValueError:
        raise InvalidTraceError(f"line {number}: arrival_s {arrival_text!r} is not a number") from None
    if not math.isfinite(arrival) or arrival < 0:
        raise InvalidTraceError(f"line {number}: arrival_s {arrival_text!r} must be a finite number >= 0")
    if task not in TASKS:
        raise InvalidTraceError(f"line {number}: task {task!r} is not one of {', '.join(TASKS)}")
    if not _MODEL_NAME.fullmatch(model):
        raise InvalidTraceError(f"line {number}: model {model!r} is not a model size such as 1.3b, 14b or a14b")
    if resolution not in RESOLUTIONS:
        raise InvalidTraceError(f"line {number}: resolution {resolution!r} is not one of {', '.join(RESOLUTIONS)}")
    key = model_key(task, model, resolution)
    if key not in known:
        raise InvalidTraceError(
            f"line {number}: no service time for {task} {model} {resolution} ({key}); known: "
            f"{', '.join(sorted(known))} (or pass --service-time {key}=SECONDS)"
        )
    return Request(arrival, key)


def write_csv(path: Path, requests: list[Request]) -> None:
    """The CSV form of a trace (read_csv reads it back)."""
    lines = [",".join(CSV_COLUMNS)]
    for r in requests:
        task, rest = ("i2v", r.model[4:]) if r.model.startswith("i2v-") else ("t2v", r.model)
        model, _, resolution = rest.rpartition("-")
        lines.append(f"{r.arrival_s:.3f},{task},{model},{resolution}")
    Path(path).write_text("\n".join(lines) + "\n")
