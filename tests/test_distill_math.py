"""Latent consistency distillation math and a tiny deterministic optimisation."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import LCMScheduler as DiffusersLCMScheduler
from torch import nn

from gl_lcm.diffusion.distill import (
    consistency_distillation_loss,
    consistency_loss,
    consistency_output,
    ddim_solver_step,
    ema_update,
    pseudo_huber_loss,
    solver_timestep_pair,
    solver_timesteps,
)
from gl_lcm.diffusion.schedule import add_noise, alphas_cumprod_from_betas, make_betas, predict_x0_and_eps

ALPHAS_CUMPROD = alphas_cumprod_from_betas(make_betas())


def test_solver_grid_is_the_lcm_50_step_schedule():
    grid = solver_timesteps(1000, 50)
    assert grid.dtype == torch.long and grid.shape == (50,)
    assert grid[:3].tolist() == [19, 39, 59] and grid[-1].item() == 999
    reference = DiffusersLCMScheduler()
    reference.set_timesteps(50)
    assert grid.tolist() == reference.timesteps.flip(0).tolist()
    with pytest.raises(ValueError, match="num_ddim_timesteps"):
        solver_timesteps(1000, 0)


def test_solver_timestep_pair_skips_k():
    grid = solver_timesteps(1000, 50)
    t, t_prev = solver_timestep_pair(grid, torch.tensor([0, 1, 25, 49]))
    assert t.tolist() == [19, 39, 519, 999]
    assert t_prev.tolist() == [0, 19, 499, 979]
    t, t_prev = solver_timestep_pair(solver_timesteps(1000, 30), torch.tensor([0, 29]))  # k = 33
    assert t.tolist() == [32, 989] and t_prev.tolist() == [0, 956]


def test_ddim_solver_step_with_true_eps_lands_on_forward_process():
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 6, 6, generator=generator), torch.randn(2, 4, 6, 6, generator=generator)
    a_prev = ALPHAS_CUMPROD[479].item()
    expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    torch.testing.assert_close(ddim_solver_step(x0, eps, a_prev), expected)
    torch.testing.assert_close(ddim_solver_step(x0, eps, ALPHAS_CUMPROD[479]), add_noise(x0, eps, 479, ALPHAS_CUMPROD))


def test_pseudo_huber_hand_numbers():
    pred, target = torch.tensor([0.0, 3.0]), torch.tensor([0.0, 4.0])
    # c = 1: (sqrt(0 + 1) - 1 + sqrt(1 + 1) - 1) / 2
    assert pseudo_huber_loss(pred, target, c=1.0).item() == pytest.approx((math.sqrt(2) - 1) / 2, rel=1e-6)
    value = pseudo_huber_loss(torch.tensor([0.5]), torch.tensor([0.0]), c=0.001).item()
    assert value == pytest.approx(math.sqrt(0.25 + 1e-6) - 0.001, rel=1e-6)
    assert pseudo_huber_loss(pred, pred).item() == 0.0
    huber = consistency_loss(pred, target, "huber", huber_c=1.0).item()
    assert huber == pytest.approx((math.sqrt(2) - 1) / 2, rel=1e-6)
    assert consistency_loss(pred, target, "l2").item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="huber, l2"):
        consistency_loss(pred, target, "l1")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_consistency_output_matches_diffusers_lcm_denoised(prediction_type):
    generator = torch.Generator().manual_seed(1)
    sample, model_output = torch.randn(1, 4, 4, 4, generator=generator), torch.randn(1, 4, 4, 4, generator=generator)
    reference = DiffusersLCMScheduler(prediction_type=prediction_type)
    reference.set_timesteps(4)
    for t in reference.timesteps.tolist():
        expected = reference.step(model_output, t, sample, generator=generator).denoised
        ours = consistency_output(model_output, sample, torch.tensor([t]), ALPHAS_CUMPROD, prediction_type)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_consistency_output_boundary_condition():
    generator = torch.Generator().manual_seed(2)
    sample, model_output = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)
    # t = 0: c_skip = 1, c_out = 0 exactly -> f(z, 0) = z.
    torch.testing.assert_close(consistency_output(model_output, sample, torch.tensor([0, 0]), ALPHAS_CUMPROD), sample)
    # Large t: c_skip ~ 0, c_out ~ 1 -> f ~ predicted x0.
    x0_pred, _ = predict_x0_and_eps(model_output, sample, 999, ALPHAS_CUMPROD, "epsilon")
    late = consistency_output(model_output, sample, 999, ALPHAS_CUMPROD)
    torch.testing.assert_close(late, x0_pred, rtol=1e-5, atol=1e-5)
    # Per-sample timesteps use per-sample scalings.
    mixed = consistency_output(model_output, sample, torch.tensor([0, 999]), ALPHAS_CUMPROD)
    torch.testing.assert_close(mixed[0], sample[0])
    torch.testing.assert_close(mixed[1], x0_pred[1], rtol=1e-5, atol=1e-5)


def test_ema_update_values_and_errors():
    target, online = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    ema_update(target, online, 0.95)
    torch.testing.assert_close(target[0], torch.tensor([1.1, 2.2]))
    ema_update(target, online, 0.0)
    torch.testing.assert_close(target[0], online[0])
    with pytest.raises(ValueError, match="decay"):
        ema_update(target, online, 1.5)
    with pytest.raises(ValueError, match="mismatch"):
        ema_update(target, online + online, 0.9)


def _noise_pair(seed, shape=(4, 4, 8, 8)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_distillation_loss_matches_manual_composition():
    x0, noise = _noise_pair(3)
    index = torch.tensor([0, 10, 30, 49])

    def student(x, t):
        return 0.9 * x

    def teacher(x, t):
        return 0.5 * x + 0.1

    def target(x, t):
        return 0.8 * x - 0.05

    loss, diagnostics = consistency_distillation_loss(
        student, teacher, target, x0, noise, index, solver_timesteps(), ALPHAS_CUMPROD, huber_c=0.01
    )
    t = torch.tensor([19, 219, 619, 999])
    t_prev = torch.tensor([0, 199, 599, 979])
    assert diagnostics["timesteps"].tolist() == t.tolist() and diagnostics["timesteps_prev"].tolist() == t_prev.tolist()
    a = ALPHAS_CUMPROD.double()
    x0, noise = x0.double(), noise.double()
    expected_student, expected_target = [], []
    for b in range(4):
        a_t, a_p = a[t[b]], a[t_prev[b]]
        z_t = a_t.sqrt() * x0[b] + (1 - a_t).sqrt() * noise[b]
        s_t, s_p = 10.0 * t[b].item(), 10.0 * t_prev[b].item()
        s_x0 = (z_t - (1 - a_t).sqrt() * 0.9 * z_t) / a_t.sqrt()
        expected_student.append(0.25 / (s_t**2 + 0.25) * z_t + s_t / math.sqrt(s_t**2 + 0.25) * s_x0)
        eps_teacher = 0.5 * z_t + 0.1
        x0_teacher = (z_t - (1 - a_t).sqrt() * eps_teacher) / a_t.sqrt()
        z_prev = a_p.sqrt() * x0_teacher + (1 - a_p).sqrt() * eps_teacher
        tgt_x0 = (z_prev - (1 - a_p).sqrt() * (0.8 * z_prev - 0.05)) / a_p.sqrt()
        expected_target.append(0.25 / (s_p**2 + 0.25) * z_prev + s_p / math.sqrt(s_p**2 + 0.25) * tgt_x0)
    difference = torch.stack(expected_student) - torch.stack(expected_target)
    expected_loss = torch.mean(torch.sqrt(difference**2 + 0.01**2) - 0.01)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-4)
    assert diagnostics["mse"].item() == pytest.approx(torch.mean(difference**2).item(), rel=1e-4)


class TinyEpsNet(nn.Module):
    """Two 3x3 convolutions with the timestep as an extra input channel."""

    def __init__(self, channels: int = 4, hidden: int = 16, seed: int = 0):
        super().__init__()
        self.inp = nn.Conv2d(channels + 1, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))

    def forward(self, x, t):
        t_channel = (t.float() / 1000.0).reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])
        return self.out(torch.nn.functional.silu(self.inp(torch.cat([x, t_channel], dim=1))))


def test_few_distillation_steps_reduce_the_consistency_loss():
    teacher = TinyEpsNet(seed=0).requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    target = copy.deepcopy(teacher)
    x0, noise = _noise_pair(4, shape=(8, 4, 8, 8))
    index = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(5))
    solver = solver_timesteps()
    optimizer = torch.optim.Adam(student.parameters(), lr=2e-3)

    def batch_loss():
        return consistency_distillation_loss(student, teacher, target, x0, noise, index, solver, ALPHAS_CUMPROD)

    initial, _ = batch_loss()
    assert initial.requires_grad and initial.item() > 0
    for _ in range(40):
        loss, _ = batch_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema_update(target.parameters(), student.parameters(), 0.95)
    final, _ = batch_loss()
    assert final.item() < 0.7 * initial.item()
    assert all(p.grad is None for p in teacher.parameters())
