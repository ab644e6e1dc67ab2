"""Sampling loops: closed-form steps, diffusers equivalence, oracle models recover x0."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers import LCMScheduler as DiffusersLCMScheduler

from gl_lcm.diffusion.lcm import LCMScheduler
from gl_lcm.diffusion.samplers import (
    ddim_step,
    ddim_timesteps,
    ddpm_step,
    sample_ddim,
    sample_ddpm,
    sample_lcm,
)
from gl_lcm.diffusion.schedule import add_noise, alphas_cumprod_from_betas, make_betas, velocity

SHAPE = (2, 4, 8, 8)
ALPHAS_CUMPROD = alphas_cumprod_from_betas(make_betas())


def _oracle(x0: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
    """Model that returns the exact target for a known clean sample x0."""

    def model_fn(x_t, t):
        a = alphas_cumprod[t].reshape(-1, 1, 1, 1).to(x_t.dtype)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0.expand_as(x_t)
        return velocity(x0, eps, t, alphas_cumprod)

    return model_fn


def _smooth_model(x_t, t):
    """A deterministic stand-in network (depends on x_t and t)."""
    return 0.6 * x_t + 0.2 * torch.tanh(x_t.roll(1, dims=-1)) + (t.float() / 1000.0).reshape(-1, 1, 1, 1)


def _known(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=generator).clamp(-2, 2), torch.randn(SHAPE, generator=generator)


def test_ddim_step_closed_form():
    x0, eps = _known(1)
    x_t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    a_t, a_prev = 0.3, 0.7
    deterministic = ddim_step(x_t, eps, x0, a_t, a_prev)
    torch.testing.assert_close(deterministic, np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps)
    sigma = 0.5 * np.sqrt((1 - a_prev) / (1 - a_t)) * np.sqrt(1 - a_t / a_prev)
    expected = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps + sigma * noise
    torch.testing.assert_close(ddim_step(x_t, eps, x0, a_t, a_prev, eta=0.5, noise=noise), expected)
    # eps=None re-derives eps from x_t and x0.
    x_t_consistent = np.sqrt(a_t) * x0 + np.sqrt(1 - a_t) * eps
    torch.testing.assert_close(ddim_step(x_t_consistent, None, x0, a_t, a_prev), deterministic, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(x_t, eps, x0, a_t, a_prev, eta=1.0)


def test_ddpm_step_closed_form():
    x0, x_t = _known(4)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    a_t, a_prev = 0.4, 0.5
    beta = 1 - a_t / a_prev
    mean = np.sqrt(a_prev) * beta / (1 - a_t) * x0 + np.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * x_t
    variance = (1 - a_prev) / (1 - a_t) * beta
    torch.testing.assert_close(ddpm_step(x_t, x0, a_t, a_prev), mean)
    torch.testing.assert_close(ddpm_step(x_t, x0, a_t, a_prev, noise), mean + np.sqrt(variance) * noise)


@pytest.mark.parametrize("num_steps", [1, 10, 50, 1000])
def test_ddim_timesteps_match_diffusers_leading(num_steps):
    reference = DDIMScheduler(timestep_spacing="leading", steps_offset=0)
    reference.set_timesteps(num_steps)
    assert ddim_timesteps(1000, num_steps).tolist() == reference.timesteps.tolist()


@pytest.mark.parametrize(
    ("eta", "prediction_type", "clip"), [(0.0, "epsilon", None), (0.7, "v_prediction", None), (0.0, "sample", 1.2)]
)
def test_sample_ddim_matches_diffusers(eta, prediction_type, clip):
    num_steps = 10
    reference = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=clip is not None,
        clip_sample_range=clip or 1.0,
    )
    reference.set_timesteps(num_steps)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    expected, theirs_generator = x_T.clone(), torch.Generator().manual_seed(8)
    for t in reference.timesteps:
        t_batch = torch.full((SHAPE[0],), int(t), dtype=torch.long)
        model_output = _smooth_model(expected, t_batch)
        expected = reference.step(model_output, t, expected, eta=eta, generator=theirs_generator).prev_sample
    result = sample_ddim(
        _smooth_model,
        ALPHAS_CUMPROD,
        x_T,
        num_steps,
        eta=eta,
        generator=torch.Generator().manual_seed(8),
        prediction_type=prediction_type,
        clip_range_fn=None if clip is None else (lambda j: clip),
    )
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)


def test_sample_ddpm_matches_diffusers():
    betas = make_betas("linear", 60, 0.0005, 0.2)
    reference = DDPMScheduler(
        num_train_timesteps=60,
        beta_schedule="linear",
        beta_start=0.0005,
        beta_end=0.2,
        clip_sample=True,
        clip_sample_range=1.5,
    )
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    expected, theirs_generator = x_T.clone(), torch.Generator().manual_seed(10)
    for t in reference.timesteps:
        t_batch = torch.full((SHAPE[0],), int(t), dtype=torch.long)
        expected = reference.step(_smooth_model(expected, t_batch), t, expected, generator=theirs_generator).prev_sample
    generator = torch.Generator().manual_seed(10)
    result = sample_ddpm(_smooth_model, betas, x_T, generator=generator, clip_range_fn=lambda j: 1.5)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)


def test_sample_lcm_matches_manual_diffusers_loop():
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    reference = DiffusersLCMScheduler(clip_sample=True, clip_sample_range=2.0)
    reference.set_timesteps(4)
    expected, theirs_generator = x_T.clone(), torch.Generator().manual_seed(12)
    for t in reference.timesteps:
        t_batch = torch.full((SHAPE[0],), int(t), dtype=torch.long)
        out = reference.step(_smooth_model(expected, t_batch), t, expected, generator=theirs_generator)
        expected = out.prev_sample
    generator = torch.Generator().manual_seed(12)
    result = sample_lcm(_smooth_model, LCMScheduler(), x_T, 4, generator=generator, clip_range_fn=lambda j: 2.0)
    torch.testing.assert_close(result, out.denoised, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_oracle_recovers_x0(prediction_type):
    x0, _ = _known(13)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(14))
    oracle = _oracle(x0, ALPHAS_CUMPROD, prediction_type)
    result = sample_ddim(oracle, ALPHAS_CUMPROD, x_T, 20, prediction_type=prediction_type)
    assert result.shape == SHAPE
    torch.testing.assert_close(result, x0, rtol=1e-4, atol=1e-4)


def test_ddpm_oracle_recovers_x0():
    x0, _ = _known(15)
    betas = make_betas()
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(16))
    result = sample_ddpm(_oracle(x0, ALPHAS_CUMPROD), betas, x_T, generator=torch.Generator().manual_seed(17))
    assert result.shape == SHAPE
    torch.testing.assert_close(result, x0, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("num_steps", [1, 4])
def test_lcm_oracle_recovers_x0(num_steps):
    x0, _ = _known(18)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(19))
    generator = torch.Generator().manual_seed(20)
    result = sample_lcm(_oracle(x0, ALPHAS_CUMPROD), LCMScheduler(), x_T, num_steps, generator=generator)
    assert result.shape == SHAPE
    # c_skip(t) * x_t leaks in at most ~1e-5 at t >= 259.
    torch.testing.assert_close(result, x0, rtol=0, atol=1e-4)


def test_sample_lcm_per_sample_clip_equals_separate_runs():
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(21))
    ranges = torch.tensor([1.0, 2.5])

    def model_fn(x_t, t):
        return 4.0 * _smooth_model(x_t, t)

    # Explicit per-step noise equal for both runs: zero re-injection noise makes runs comparable.
    class ZeroNoise(LCMScheduler):
        def step(self, model_output, timestep, sample, generator=None, clip_range=None, noise=None):
            return super().step(model_output, timestep, sample, clip_range=clip_range, noise=torch.zeros_like(sample))

    batched = sample_lcm(model_fn, ZeroNoise(), x_T, 4, clip_range_fn=lambda j: ranges + 0.025 * j)
    for b in range(2):
        single = sample_lcm(
            model_fn, ZeroNoise(), x_T[b : b + 1], 4, clip_range_fn=lambda j, b=b: float(ranges[b]) + 0.025 * j
        )
        torch.testing.assert_close(batched[b : b + 1], single)
    assert not torch.allclose(batched[0], batched[1])


def test_progress_bar_runs_and_shapes(capsys):
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(22))
    out = sample_ddim(_smooth_model, ALPHAS_CUMPROD, x_T, 3, progress=True)
    assert out.shape == x_T.shape
    assert "DDIM" in capsys.readouterr().err
    out = sample_lcm(_smooth_model, LCMScheduler(), x_T, 2, progress=True)
    assert out.shape == x_T.shape
    assert "LCM" in capsys.readouterr().err


def test_add_noise_then_oracle_ddim_from_intermediate_time_is_consistent():
    """A one-step DDIM jump from x_t to t_prev with the true eps lands exactly on the forward process."""
    x0, eps = _known(23)
    t, t_prev = torch.tensor([600, 600]), torch.tensor([400, 400])
    x_t = add_noise(x0, eps, t, ALPHAS_CUMPROD)
    a_t = ALPHAS_CUMPROD[600]
    a_prev = ALPHAS_CUMPROD[400]
    torch.testing.assert_close(ddim_step(x_t, eps, x0, a_t, a_prev), add_noise(x0, eps, t_prev, ALPHAS_CUMPROD))
