"""One GPU stopwatch for the small benchmarks: the median of `reps` CUDA-event-timed calls after `warmup` calls."""

from __future__ import annotations

import torch


def cuda_median_seconds(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median seconds of one `fn()` on the current CUDA device (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]
