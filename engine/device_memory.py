"""Device readings for the functions' metrics and events (memory, the device's name), so no layer above the engine
calls torch itself."""

from __future__ import annotations

import torch


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window on a CUDA device (no-op elsewhere)."""
    if getattr(device, "type", None) == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def memory_bytes(device: torch.device) -> dict[str, int]:
    """{allocated, reserved, peak} bytes on a CUDA device (peak since the last reset_peak); {} elsewhere."""
    if getattr(device, "type", None) != "cuda" or not torch.cuda.is_available():
        return {}
    return {
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
        "peak": torch.cuda.max_memory_allocated(device),
    }


def device_name(device) -> str | None:
    """The CUDA device's product name (e.g. "NVIDIA H200"); None for other devices or when it cannot be read."""
    try:
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_name(device)
    except Exception:  # a device that cannot be named must not stop the pod from serving
        return None
