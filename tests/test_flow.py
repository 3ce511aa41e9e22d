"""Rectified flow: path and velocity sign, loss terms, time sampling, timestep shift, Euler and Heun.

Conventions are checked against diffusers' FlowMatchEulerDiscreteScheduler, whose sigma is 1 - t and whose
velocity is the negative of ours, and against LightningDiT's shift formula.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler

from models.user_generation import (
    flow_interpolate,
    flow_matching_loss,
    flow_time_grid,
    sample_flow,
    sample_flow_times,
    shift_time,
)
from utils.errors import UserError


class VelocityField(torch.nn.Module):
    """A smooth, label-dependent, non-linear velocity field standing in for a trained model."""

    def forward(self, x, t, y):
        t = t.view(-1, 1, 1, 1)
        return torch.sin(x) * (1 + t) - 0.5 * x + 0.1 * (y.to(x.dtype) + 1).view(-1, 1, 1, 1)


def test_path_and_velocity_sign():
    x1, x0 = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.0, 0.3, 1.0])
    xt, velocity = flow_interpolate(x1, x0, t)
    torch.testing.assert_close(xt[0], x0[0])  # t = 0 is noise
    torch.testing.assert_close(xt[2], x1[2])  # t = 1 is data
    torch.testing.assert_close(xt[1], 0.3 * x1[1] + 0.7 * x0[1])
    torch.testing.assert_close(velocity, x1 - x0)  # d x_t / dt
    # Integrating the true (constant) velocity from the noise lands on the data, on any shifted grid.
    landed = sample_flow(lambda x, t, y: x1 - x0, x0, torch.zeros(3, dtype=torch.long), null_label=None, num_steps=7, shift=0.3)
    torch.testing.assert_close(landed, x1, atol=1e-5, rtol=1e-5)


def test_loss_is_zero_for_the_oracle_and_adds_the_cosine_term():
    x1, x0 = torch.randn(4, 6, 3, 3), torch.randn(4, 6, 3, 3)
    labels = torch.zeros(4, dtype=torch.long)
    oracle = flow_matching_loss(lambda xt, t, y: x1 - x0, x1, labels, noise=x0)
    assert oracle["loss"].item() < 1e-6 and oracle["cos"].item() < 1e-6
    backwards = flow_matching_loss(lambda xt, t, y: x0 - x1, x1, labels, noise=x0)
    torch.testing.assert_close(backwards["mse"], 4 * (x1 - x0).pow(2).mean())
    torch.testing.assert_close(backwards["cos"], torch.tensor(2.0))
    # An arbitrary model: the loss is MSE plus the mean over pixels of 1 - cos(prediction, target) over channels.
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    model = VelocityField()
    terms = flow_matching_loss(model, x1, labels, t=t, noise=x0)
    xt = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
    prediction, target = model(xt, t, labels), x1 - x0
    expected = (prediction - target).pow(2).mean() + (1 - F.cosine_similarity(prediction, target, dim=1)).mean()
    torch.testing.assert_close(terms["loss"], expected)
    assert flow_matching_loss(model, x1, labels, t=t, noise=x0, use_cosine_loss=False)["cos"] is None


def test_logit_normal_times_are_seeded_and_logit_standard_normal():
    first = sample_flow_times(20000, generator=torch.Generator().manual_seed(0))
    again = sample_flow_times(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again)
    assert 0 < first.min() and first.max() < 1
    logits = torch.logit(first.double())
    assert abs(logits.mean().item()) < 0.03 and abs(logits.std().item() - 1) < 0.03
    uniform = sample_flow_times(20000, "uniform", generator=torch.Generator().manual_seed(0))
    assert abs(uniform.mean().item() - 0.5) < 0.01
    with pytest.raises(UserError, match="logit_normal, uniform"):
        sample_flow_times(4, "beta")


def test_shift_is_lightningdits_formula_and_diffusers_inverse_shift():
    # LightningDiT transport/integrators.py: t' = s t / (1 + (s - 1) t), timestep_shift 0.3.
    assert shift_time(0.5, 0.3) == pytest.approx(0.15 / 0.65)
    grid = flow_time_grid(10, 0.3)
    assert grid[0] == 0 and grid[-1] == 1 and len(grid) == 11
    assert torch.equal(flow_time_grid(10, 1.0), torch.linspace(0, 1, 11, dtype=torch.float64))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1 / 0.3)
    scheduler.set_timesteps(sigmas=(1 - torch.linspace(0, 1, 11, dtype=torch.float64))[:-1].tolist())
    torch.testing.assert_close(scheduler.sigmas.double(), 1 - grid, atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="positive"):
        flow_time_grid(10, 0.0)


def test_euler_matches_diffusers_flow_match_euler_with_mapped_conventions():
    steps, shift = 6, 0.3
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])
    model = VelocityField()
    ours = sample_flow(model, noise, labels, null_label=None, num_steps=steps, shift=shift)

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1 / shift)
    scheduler.set_timesteps(sigmas=(1 - torch.linspace(0, 1, steps + 1, dtype=torch.float64))[:-1].tolist())
    x = noise.clone()
    for timestep in scheduler.timesteps:
        t = torch.full((2,), 1 - timestep.item() / 1000)
        x = scheduler.step(-model(x, t, labels), timestep, x).prev_sample  # diffusers' velocity = noise - data
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)
    # diffusers' forward noising is our path with sigma = 1 - t.
    x1 = torch.randn(2, 3, 4, 4)
    sigma = scheduler.sigmas[2].item()
    noised = scheduler.scale_noise(x1, scheduler.timesteps[2:3], noise)
    torch.testing.assert_close(noised, flow_interpolate(x1, noise, torch.full((2,), 1 - sigma))[0], atol=1e-6, rtol=1e-6)


def test_heun_is_the_trapezoidal_rule():
    rate = -1.3
    noise = torch.randn(2, 3, 2, 2)
    labels = torch.zeros(2, dtype=torch.long)
    calls = []

    def linear_field(x, t, y):
        calls.append(t[0].item())
        return rate * x

    out = sample_flow(linear_field, noise, labels, null_label=None, num_steps=5, sampler="heun", shift=0.5)
    grid = flow_time_grid(5, 0.5)
    factor = 1.0
    for h in (grid[1:] - grid[:-1]).tolist():
        factor *= 1 + h * rate + (h * rate) ** 2 / 2  # Heun's step on dx/dt = a x
    torch.testing.assert_close(out, noise * factor, atol=1e-6, rtol=1e-6)
    assert len(calls) == 10 and calls[1] == pytest.approx(grid[1].item())  # two evaluations per step
    euler = sample_flow(linear_field, noise, labels, null_label=None, num_steps=5, sampler="euler", shift=0.5)
    assert not torch.allclose(euler, out)
    with pytest.raises(UserError, match="euler, heun"):
        sample_flow(linear_field, noise, labels, null_label=None, num_steps=5, sampler="dopri5")
