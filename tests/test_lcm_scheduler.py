"""LCMScheduler against diffusers' LCMScheduler, plus per-step / per-sample clipping."""
from __future__ import annotations

import pytest
import torch
from diffusers import LCMScheduler as DiffusersLCMScheduler

from gl_lcm.diffusion.lcm import (
    LCMScheduler,
    LCMSchedulerOutput,
    boundary_condition_scalings,
    clamp_per_sample,
    dynamic_clip_range,
)
from gl_lcm.diffusion.schedule import make_betas

SHAPE = (2, 4, 8, 8)


def _pair(**config):
    return LCMScheduler(**config), DiffusersLCMScheduler(**config)


@pytest.mark.parametrize("original_inference_steps", [None, 50, 25, 10])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 50])
def test_timesteps_match_diffusers(num_steps, original_inference_steps):
    ours, theirs = _pair()
    limit = original_inference_steps or 50
    if num_steps > limit:
        with pytest.raises(ValueError, match="original_inference_steps"):
            ours.set_timesteps(num_steps, original_inference_steps=original_inference_steps)
        return
    ours.set_timesteps(num_steps, original_inference_steps=original_inference_steps)
    theirs.set_timesteps(num_steps, original_inference_steps=original_inference_steps)
    assert ours.timesteps.dtype == torch.long
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    assert ours.num_inference_steps == num_steps


def test_timesteps_known_values_and_constructor_original_steps():
    scheduler = LCMScheduler()
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [999]
    ours, theirs = _pair(original_inference_steps=20)
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()


def _run_both(ours, theirs, num_steps, seed, clip_ranges=None, output_scale=1.0):
    """Step both schedulers through a whole schedule on the same random model outputs."""
    ours.set_timesteps(num_steps)
    theirs.set_timesteps(num_steps)
    data = torch.Generator().manual_seed(seed)
    sample = torch.randn(SHAPE, generator=data)
    ours_sample, theirs_sample = sample.clone(), sample.clone()
    ours_noise, theirs_noise = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    steps = []
    for j, t in enumerate(theirs.timesteps):
        model_output = output_scale * torch.randn(SHAPE, generator=data)
        clip_range = None if clip_ranges is None else clip_ranges[j]
        mine = ours.step(model_output, t, ours_sample, generator=ours_noise, clip_range=clip_range)
        reference = theirs.step(model_output, t, theirs_sample, generator=theirs_noise)
        steps.append((mine, reference))
        ours_sample, theirs_sample = mine.prev_sample, reference.prev_sample
    return steps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("num_steps", [1, 4, 8])
def test_step_matches_diffusers_with_same_generator(prediction_type, num_steps):
    ours, theirs = _pair(prediction_type=prediction_type)
    steps = _run_both(ours, theirs, num_steps, seed=10 + num_steps)
    assert len(steps) == num_steps
    for mine, reference in steps:
        assert isinstance(mine, LCMSchedulerOutput)
        torch.testing.assert_close(mine.denoised, reference.denoised, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.prev_sample, reference.prev_sample, rtol=1e-5, atol=1e-5)
    # Last step injects no noise.
    assert torch.equal(steps[-1][0].prev_sample, steps[-1][0].denoised)


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_step_matches_diffusers_other_schedules(beta_schedule):
    ours, theirs = _pair(beta_schedule=beta_schedule, beta_start=0.0001, beta_end=0.02, original_inference_steps=40)
    for mine, reference in _run_both(ours, theirs, 5, seed=3):
        torch.testing.assert_close(mine.prev_sample, reference.prev_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_step_matches_diffusers_small_timestep_scaling(prediction_type):
    """timestep_scaling 0.01 makes c_skip non-negligible (0.11 at t = 139), exposing the skip term."""
    ours, theirs = _pair(timestep_scaling=0.01, prediction_type=prediction_type)
    steps = _run_both(ours, theirs, 8, seed=21)
    c_skip, _ = boundary_condition_scalings(ours.timesteps[-1].item(), timestep_scaling=0.01)
    assert c_skip > 0.05
    for mine, reference in steps:
        torch.testing.assert_close(mine.denoised, reference.denoised, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.prev_sample, reference.prev_sample, rtol=1e-5, atol=1e-5)


def test_trained_betas_equal_named_schedule():
    from_betas = LCMScheduler(trained_betas=make_betas("linear", 1000, 0.0001, 0.02))
    named = LCMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    assert torch.equal(from_betas.alphas_cumprod, named.alphas_cumprod)


def test_explicit_noise_matches_diffusers_draw():
    ours, theirs = _pair()
    ours.set_timesteps(4)
    theirs.set_timesteps(4)
    data = torch.Generator().manual_seed(0)
    sample, model_output = torch.randn(SHAPE, generator=data), torch.randn(SHAPE, generator=data)
    explicit = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    t = theirs.timesteps[0]
    mine = ours.step(model_output, t, sample, noise=explicit)
    reference = theirs.step(model_output, t, sample, generator=torch.Generator().manual_seed(99))
    torch.testing.assert_close(mine.prev_sample, reference.prev_sample, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="noise shape"):
        ours.step(model_output, ours.timesteps[1], sample, noise=explicit[:1])


def test_clip_sample_config_matches_diffusers():
    ours, theirs = _pair(clip_sample=True, clip_sample_range=1.5, prediction_type="sample")
    steps = _run_both(ours, theirs, 4, seed=5, output_scale=4.0)
    for mine, reference in steps:
        torch.testing.assert_close(mine.denoised, reference.denoised, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.prev_sample, reference.prev_sample, rtol=1e-5, atol=1e-5)
    # Clipping was active: unclipped x0 reaches |4 * N(0,1)| >> 1.5, the denoised output does not.
    assert steps[-1][0].denoised.abs().max().item() < 1.5 + 1e-3


def test_per_step_clip_range_matches_published_rebuild_per_step():
    """GL-LCM's published loop rebuilds diffusers' scheduler each step with clip range omega + b*j."""
    omega, b, num_steps = 2.0, 0.025, 8
    ours = LCMScheduler()
    ours.set_timesteps(num_steps)
    data = torch.Generator().manual_seed(4)
    sample = torch.randn(SHAPE, generator=data)
    ours_sample, theirs_sample = sample.clone(), sample.clone()
    ours_noise, theirs_noise = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    for j, t in enumerate(ours.timesteps.tolist()):
        model_output = 3.0 * torch.randn(SHAPE, generator=data)
        rebuilt = DiffusersLCMScheduler(clip_sample=True, clip_sample_range=omega + b * j)
        rebuilt.set_timesteps(num_steps)
        reference = rebuilt.step(model_output, t, theirs_sample, generator=theirs_noise)
        mine = ours.step(model_output, t, ours_sample, generator=ours_noise, clip_range=dynamic_clip_range(j, omega, b))
        torch.testing.assert_close(mine.prev_sample, reference.prev_sample, rtol=1e-5, atol=1e-5)
        ours_sample, theirs_sample = mine.prev_sample, reference.prev_sample


def test_dynamic_clip_range_values():
    assert dynamic_clip_range(0, 2.0, 0.025) == pytest.approx(2.0)
    assert dynamic_clip_range(49, 2.0, 0.025) == pytest.approx(3.225)
    assert dynamic_clip_range(3, 3.0, 0.025) == pytest.approx(3.075)
    with pytest.raises(ValueError, match="step_index"):
        dynamic_clip_range(-1, 2.0, 0.025)


def test_denoised_respects_dynamic_bounds_every_step():
    omega, b = 1.7, 0.025
    scheduler = LCMScheduler(prediction_type="sample")
    scheduler.set_timesteps(8)
    data = torch.Generator().manual_seed(6)
    sample = torch.randn(SHAPE, generator=data)
    for j, t in enumerate(scheduler.timesteps.tolist()):
        bound = dynamic_clip_range(j, omega, b)
        out = scheduler.step(10.0 * torch.randn(SHAPE, generator=data), t, sample, generator=data, clip_range=bound)
        c_skip, c_out = boundary_condition_scalings(t)
        x0_hat = (out.denoised - c_skip * sample) / c_out
        assert x0_hat.abs().max().item() == pytest.approx(bound, abs=1e-4)  # clamp active and tight
        assert out.denoised.abs().max().item() <= c_out * bound + c_skip * sample.abs().max().item() + 1e-5
        sample = out.prev_sample


def test_per_sample_clip_range_acts_per_sample():
    data = torch.Generator().manual_seed(12)
    sample, model_output = torch.randn(SHAPE, generator=data), 5.0 * torch.randn(SHAPE, generator=data)
    noise = torch.randn(SHAPE, generator=data)
    ranges = torch.tensor([1.0, 3.0])
    batched = LCMScheduler(prediction_type="sample")
    batched.set_timesteps(4)
    out = batched.step(model_output, 999, sample, clip_range=ranges, noise=noise)
    for b in range(2):
        single = LCMScheduler(prediction_type="sample")
        single.set_timesteps(4)
        one = slice(b, b + 1)
        ref = single.step(model_output[one], 999, sample[one], clip_range=float(ranges[b]), noise=noise[one])
        torch.testing.assert_close(out.denoised[b : b + 1], ref.denoised)
        torch.testing.assert_close(out.prev_sample[b : b + 1], ref.prev_sample)
    c_skip, c_out = boundary_condition_scalings(999)
    x0_hat = (out.denoised - c_skip * sample) / c_out
    assert x0_hat[0].abs().max().item() == pytest.approx(1.0, abs=1e-4)
    assert x0_hat[1].abs().max().item() == pytest.approx(3.0, abs=1e-4)


def test_clamp_per_sample_validation_and_scalar_tensor():
    x = torch.linspace(-5, 5, 2 * 3).reshape(2, 3, 1, 1)
    torch.testing.assert_close(clamp_per_sample(x, torch.tensor(2.0)), x.clamp(-2, 2))
    with pytest.raises(ValueError, match="shape \\(B,\\)"):
        clamp_per_sample(x, torch.tensor([1.0, 2.0, 3.0]))


def test_boundary_scalings_match_diffusers():
    reference = DiffusersLCMScheduler()
    for t in [0, 1, 19, 259, 999]:
        expected = reference.get_scalings_for_boundary_condition_discrete(t)
        assert boundary_condition_scalings(t) == pytest.approx(expected)
    assert boundary_condition_scalings(0) == (1.0, 0.0)
    c_skip, c_out = boundary_condition_scalings(torch.tensor([0.0, 999.0]))
    torch.testing.assert_close(c_skip, torch.tensor([1.0, 0.25 / (9990.0**2 + 0.25)]))
    assert c_out[1].item() == pytest.approx(1.0, abs=1e-6)


def test_step_index_bookkeeping_and_errors():
    scheduler = LCMScheduler()
    sample = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(sample, 999, sample)
    scheduler.set_timesteps(2)
    assert scheduler.step_index is None
    scheduler.step(sample, 999, sample, noise=sample)
    assert scheduler.step_index == 1
    scheduler.set_timesteps(2)
    assert scheduler.step_index is None
    # Starting mid-schedule looks the timestep up (second schedule entry -> index 1, the last step).
    out = scheduler.step(torch.ones(SHAPE), 499, torch.ones(SHAPE))
    assert scheduler.step_index == 2 and torch.equal(out.prev_sample, out.denoised)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(sample, 123, sample)
    with pytest.raises(ValueError, match="prediction_type"):
        LCMScheduler(prediction_type="x_start")


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("schedule", [[999, 259], [999, 499, 259, 99], [999]])
def test_custom_step_schedule_matches_diffusers_custom_timesteps(prediction_type, schedule):
    """step_schedules (ours, per step count) and set_timesteps(timesteps=...) step exactly like diffusers'
    LCMScheduler.set_timesteps(timesteps=...); other step counts keep the grid's even spacing."""
    ours = LCMScheduler(prediction_type=prediction_type, step_schedules=[schedule, [899, 499, 99]])
    theirs = DiffusersLCMScheduler(prediction_type=prediction_type)
    ours.set_timesteps(len(schedule))
    theirs.set_timesteps(timesteps=schedule)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist() == schedule
    data = torch.Generator().manual_seed(3)
    x_ours = x_theirs = torch.randn(SHAPE, generator=data)
    g_ours, g_theirs = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for t in schedule:
        out = torch.randn(SHAPE, generator=data)
        mine, reference = ours.step(out, t, x_ours, generator=g_ours), theirs.step(out, t, x_theirs, generator=g_theirs)
        torch.testing.assert_close(mine.denoised, reference.denoised, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.prev_sample, reference.prev_sample, rtol=1e-5, atol=1e-5)
        x_ours, x_theirs = mine.prev_sample, reference.prev_sample

    explicit = LCMScheduler(prediction_type=prediction_type)
    explicit.set_timesteps(timesteps=schedule)
    assert explicit.timesteps.tolist() == schedule
    ours.set_timesteps(2 if len(schedule) != 2 else 4)  # no schedule of that length: the grid's spacing
    theirs.set_timesteps(2 if len(schedule) != 2 else 4)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    ours.set_timesteps(3)
    assert ours.timesteps.tolist() == [899, 499, 99]


@pytest.mark.parametrize("bad", [[999, 999], [1000, 5], [5, 999], [], [999, 2.5]])
def test_custom_step_schedule_rejects_bad_timesteps(bad):
    with pytest.raises(ValueError, match="custom LCM timesteps"):
        LCMScheduler(step_schedules=[bad])
    with pytest.raises(ValueError, match="custom LCM timesteps"):
        LCMScheduler().set_timesteps(timesteps=bad)


def test_two_step_schedules_of_one_length_are_refused():
    with pytest.raises(ValueError, match="two schedules of the same length"):
        LCMScheduler(step_schedules=[[999, 99], [899, 9]])
