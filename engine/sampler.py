"""rCM few-step sampling exactly as TurboDiffusion implements it.

TrigFlow angles [atan(sigma_max), 1.5, 1.4, 1.0][:steps] then 0 map to rectified-flow time t = sin/(sin+cos).
The network gets t*1000 and predicts velocity v; x0 = x - t*v. SDE (default) re-noises with fresh noise from the
same generator: x = (1-t_next)*x0 + t_next*eps. ODE: x = x - (t - t_next)*v. No CFG: one forward per step.
The state is kept in float64 between steps, as upstream does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

MID_ANGLES = (1.5, 1.4, 1.0)

# denoise(x_model_dtype_input: float64 tensor, t_cur: float, step: int) -> velocity (any float dtype)
Denoiser = Callable[[torch.Tensor, float, int], torch.Tensor]


def rcm_timesteps(num_steps: int, sigma_max: float) -> torch.Tensor:
    """Rectified-flow times t_0 > ... > t_{steps-1} > t_steps = 0, float64, length num_steps + 1."""
    if not 1 <= num_steps <= 4:
        raise ValueError(f"rCM supports 1-4 steps, got {num_steps}")
    angles = torch.tensor([math.atan(sigma_max), *MID_ANGLES[: num_steps - 1], 0.0], dtype=torch.float64)
    return torch.sin(angles) / (torch.cos(angles) + torch.sin(angles))


def rcm_sample(
    denoise: Denoiser,
    shape: tuple[int, ...],
    *,
    num_steps: int,
    sigma_max: float,
    generator: torch.Generator,
    device: torch.device | str,
    ode: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run the rCM loop and return the final latent (float32)."""
    t_steps = rcm_timesteps(num_steps, sigma_max).to(device)
    noise = torch.randn(*shape, dtype=torch.float32, device=device, generator=generator)
    x = noise.to(torch.float64) * t_steps[0]
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        v = denoise(x, float(t_cur), i).to(torch.float64)
        if ode:
            x = x - (t_cur - t_next) * v
        else:
            fresh = torch.randn(*shape, dtype=torch.float32, device=device, generator=generator)
            x = (1 - t_next) * (x - t_cur * v) + t_next * fresh
        if progress is not None:
            progress(i + 1, num_steps)
    return x.float()
