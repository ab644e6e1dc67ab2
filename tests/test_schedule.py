"""Noise schedules and forward-process algebra against diffusers and closed forms."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from gl_lcm.diffusion.schedule import (
    add_noise,
    alphas_cumprod_from_betas,
    make_betas,
    offset_noise,
    predict_x0_and_eps,
    randn_like,
    velocity,
)


@pytest.mark.parametrize(
    ("ours", "theirs", "num_train_timesteps", "beta_start", "beta_end"),
    [
        ("scaled_linear", "scaled_linear", 1000, 0.00085, 0.012),
        ("linear", "linear", 1000, 0.0001, 0.02),
        ("cosine", "squaredcos_cap_v2", 1000, 0.0001, 0.02),
        ("scaled_linear", "scaled_linear", 37, 0.001, 0.05),
        ("cosine", "squaredcos_cap_v2", 37, 0.0001, 0.02),
    ],
)
def test_make_betas_matches_diffusers(ours, theirs, num_train_timesteps, beta_start, beta_end):
    reference = DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule=theirs, beta_start=beta_start, beta_end=beta_end
    )
    betas = make_betas(ours, num_train_timesteps, beta_start, beta_end)
    assert betas.dtype == torch.float32 and betas.shape == (num_train_timesteps,)
    torch.testing.assert_close(betas, reference.betas, rtol=0, atol=0)
    torch.testing.assert_close(alphas_cumprod_from_betas(betas), reference.alphas_cumprod, rtol=0, atol=0)


def test_make_betas_values_and_alias():
    scaled = make_betas("scaled_linear")
    assert scaled[0].item() == pytest.approx(0.00085, rel=1e-5)
    assert scaled[-1].item() == pytest.approx(0.012, rel=1e-5)
    assert torch.equal(make_betas("squaredcos_cap_v2"), make_betas("cosine"))
    cosine = make_betas("cosine")
    assert cosine.max().item() == pytest.approx(0.999, rel=1e-6)  # the cap is reached at t = T-1
    assert cosine.max() <= torch.tensor(0.999, dtype=torch.float32)


def test_make_betas_unknown_schedule_names_valid_ones():
    with pytest.raises(ValueError, match="scaled_linear, linear, cosine"):
        make_betas("quadratic")


def test_alphas_cumprod_matches_numpy_cumprod():
    betas = make_betas("linear", 100, 0.001, 0.05)
    expected = np.cumprod(1.0 - betas.double().numpy())
    np.testing.assert_allclose(alphas_cumprod_from_betas(betas).numpy(), expected, rtol=1e-5)


def test_add_noise_closed_form_per_sample():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 6, generator=generator)
    noise = torch.randn(3, 4, 5, 6, generator=generator)
    timesteps = torch.tensor([0, 500, 999])
    alphas_cumprod = alphas_cumprod_from_betas(make_betas())
    noisy = add_noise(x0, noise, timesteps, alphas_cumprod)
    for b, t in enumerate(timesteps.tolist()):
        a = float(alphas_cumprod[t])
        expected = np.sqrt(a) * x0[b].double().numpy() + np.sqrt(1 - a) * noise[b].double().numpy()
        np.testing.assert_allclose(noisy[b].numpy(), expected, rtol=1e-5, atol=1e-6)
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(noisy, reference.add_noise(x0, noise, timesteps))


def test_add_noise_scalar_timestep_and_bad_shape():
    alphas_cumprod = alphas_cumprod_from_betas(make_betas())
    x0, noise = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    out = add_noise(x0, noise, 10, alphas_cumprod)
    torch.testing.assert_close(out, torch.full_like(x0, float(alphas_cumprod[10].sqrt())))
    with pytest.raises(ValueError, match="shape \\(B,\\)"):
        add_noise(x0, noise, torch.tensor([1, 2, 3]), alphas_cumprod)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_predict_x0_and_eps_inverts_forward_process(prediction_type):
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 4, 8, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(4, 4, 8, 8, generator=generator, dtype=torch.float64)
    timesteps = torch.tensor([1, 250, 700, 998])
    alphas_cumprod = alphas_cumprod_from_betas(make_betas()).double()
    x_t = add_noise(x0, noise, timesteps, alphas_cumprod)
    target = {"epsilon": noise, "sample": x0, "v_prediction": velocity(x0, noise, timesteps, alphas_cumprod)}
    x0_pred, eps_pred = predict_x0_and_eps(target[prediction_type], x_t, timesteps, alphas_cumprod, prediction_type)
    torch.testing.assert_close(x0_pred, x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eps_pred, noise, rtol=1e-6, atol=1e-6)


def test_velocity_matches_diffusers_and_unknown_prediction_type():
    generator = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)
    timesteps = torch.tensor([3, 900])
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    alphas_cumprod = alphas_cumprod_from_betas(make_betas())
    expected = reference.get_velocity(x0, noise, timesteps)
    torch.testing.assert_close(velocity(x0, noise, timesteps, alphas_cumprod), expected)
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample"):
        predict_x0_and_eps(x0, x0, timesteps, alphas_cumprod, "x_start")


def test_offset_noise_composition_is_reproducible():
    shape = (3, 4, 6, 5)
    noise = offset_noise(shape, strength=0.5, generator=torch.Generator().manual_seed(7))
    replay = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=replay)
    offset = torch.randn(3, 4, 1, 1, generator=replay)
    assert noise.shape == shape and noise.dtype == torch.float32
    torch.testing.assert_close(noise, base + 0.5 * offset)
    # The added part is constant over space: one scalar per (sample, channel).
    spatial_spread = (noise - base).flatten(2).std(dim=2)
    assert spatial_spread.max().item() < 1e-6
    plain = offset_noise(shape, strength=0.0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(plain, base)


def test_offset_noise_statistics():
    shape = (128, 4, 32, 32)
    with_offset = offset_noise(shape, strength=1.0, generator=torch.Generator().manual_seed(3))
    without = offset_noise(shape, strength=0.0, generator=torch.Generator().manual_seed(3))
    # Per-(sample, channel) means: std ~ strength (1.0) with offset, ~ 1/32 without.
    assert with_offset.mean(dim=(2, 3)).std().item() == pytest.approx(1.0, abs=0.1)
    assert without.mean(dim=(2, 3)).std().item() == pytest.approx(1 / 32, abs=0.01)
    assert with_offset.var().item() == pytest.approx(2.0, abs=0.2)
    assert abs(with_offset.mean().item()) < 0.15
    with pytest.raises(ValueError, match="shape"):
        offset_noise((5,))


def test_randn_like_follows_generator():
    reference = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    drawn = randn_like(reference, torch.Generator().manual_seed(5))
    assert drawn.dtype == torch.float64 and drawn.shape == reference.shape
    expected = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(drawn, expected)
