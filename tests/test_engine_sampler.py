"""rCM schedule and sampler semantics, checked against TurboDiffusion's published numbers and its update rules."""

import math

import pytest
import torch

from turboflow.engine.sampler import rcm_sample, rcm_timesteps


def _t(angle):
    return math.sin(angle) / (math.sin(angle) + math.cos(angle))


@pytest.mark.parametrize("sigma_max", [80.0, 200.0])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_schedule_matches_trigflow_mapping(steps, sigma_max):
    angles = [math.atan(sigma_max), 1.5, 1.4, 1.0][:steps] + [0.0]
    expected = [_t(a) for a in angles]
    got = rcm_timesteps(steps, sigma_max)
    assert got.dtype == torch.float64 and len(got) == steps + 1
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    assert got[-1] == 0 and all(a > b for a, b in zip(got.tolist(), got.tolist()[1:]))


def test_schedule_published_values():
    assert rcm_timesteps(4, 80.0).tolist() == pytest.approx([0.98765, 0.93378, 0.85290, 0.60898, 0.0], abs=5e-5)
    assert rcm_timesteps(4, 200.0)[0].item() == pytest.approx(0.99502, abs=5e-5)


@pytest.mark.parametrize("steps", [0, 5])
def test_schedule_rejects_steps_outside_1_to_4(steps):
    with pytest.raises(ValueError):
        rcm_timesteps(steps, 80.0)


SHAPE = (1, 2, 1, 3, 4)


def _linear_velocity(x, t, step):
    return 0.5 * x + 0.1 * (step + 1)


def test_sde_update_rule_and_noise_draws():
    gen = torch.Generator().manual_seed(7)
    out = rcm_sample(_linear_velocity, SHAPE, num_steps=3, sigma_max=80.0, generator=gen, device="cpu")
    # replay by hand with the same generator
    ref = torch.Generator().manual_seed(7)
    ts = rcm_timesteps(3, 80.0)
    x = torch.randn(*SHAPE, generator=ref).double() * ts[0]
    for i in range(3):
        v = _linear_velocity(x, float(ts[i]), i).double()
        # as upstream: a 0-dim float64 time times float32 noise stays float32 before joining the float64 state
        x = (1 - ts[i + 1]) * (x - ts[i] * v) + ts[i + 1] * torch.randn(*SHAPE, generator=ref)
    assert torch.equal(out, x.float())
    assert torch.equal(gen.get_state(), ref.get_state())  # initial noise + one fresh draw per step


def test_ode_update_rule_draws_no_fresh_noise():
    gen = torch.Generator().manual_seed(7)
    out = rcm_sample(_linear_velocity, SHAPE, num_steps=4, sigma_max=80.0, generator=gen, device="cpu", ode=True)
    ref = torch.Generator().manual_seed(7)
    ts = rcm_timesteps(4, 80.0)
    x = torch.randn(*SHAPE, generator=ref).double() * ts[0]
    for i in range(4):
        x = x - (ts[i] - ts[i + 1]) * _linear_velocity(x, float(ts[i]), i).double()
    assert torch.equal(out, x.float())
    assert torch.equal(gen.get_state(), ref.get_state())  # only the initial noise was drawn


def test_network_sees_one_call_per_step_with_times_in_order():
    seen = []

    def denoise(x, t, step):
        seen.append((step, t))
        return torch.zeros_like(x)

    rcm_sample(denoise, SHAPE, num_steps=4, sigma_max=200.0, generator=torch.Generator().manual_seed(0), device="cpu")
    assert [s for s, _ in seen] == [0, 1, 2, 3]
    assert [t for _, t in seen] == pytest.approx(rcm_timesteps(4, 200.0)[:-1].tolist())
