"""Reverse-diffusion sampling loops (LCM, DDIM, DDPM) over a model callable.

``model_fn(x_t, t) -> output``: x_t is B x C x h x w, t a LongTensor (B,); the output has x_t's shape
and is interpreted by ``prediction_type``. Conditioning (e.g. the CXR latent concatenated to x_t) is
closed over by the callable, so these loops stay condition-agnostic. ``clip_range_fn(j)`` gives the
x0 clamp half-width at sampling step j (0 = first, noisiest step): None, a float, or a (B,) tensor.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .guidance import apply_guidance
from .lcm import LCMScheduler, clamp_per_sample
from .schedule import alphas_cumprod_from_betas, predict_x0_and_eps, randn_like

ModelFn = Callable[[Tensor, Tensor], Tensor]
ClipRangeFn = Callable[[int], "Tensor | float | None"]


def _timestep_batch(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def _maybe_clip(x0: Tensor, clip_range_fn: ClipRangeFn | None, step_index: int) -> tuple[Tensor, bool]:
    clip_range = clip_range_fn(step_index) if clip_range_fn is not None else None
    if clip_range is None:
        return x0, False
    return clamp_per_sample(x0, clip_range), True


def sample_lcm(
    model_fn: ModelFn,
    scheduler: LCMScheduler,
    x_T: Tensor,
    num_steps: int,
    generator: torch.Generator | None = None,
    clip_range_fn: ClipRangeFn | None = None,
    progress: bool = False,
) -> Tensor:
    """Multistep LCM sampling: ``num_steps`` consistency evaluations with noise re-injection between them.

    The model output is interpreted with ``scheduler.prediction_type``. To run GL-LCM's global and local
    paths together, stack them in the batch and return per-sample (B,) ranges from ``clip_range_fn``.

    Args:
        x_T: initial noise, B x C x h x w (standard normal).
        num_steps: number of LCM steps (1 .. scheduler.original_inference_steps).
        generator: RNG for the re-injected noise.

    Returns:
        The final denoised latent, B x C x h x w.
    """
    scheduler.set_timesteps(num_steps, device=x_T.device)
    x = x_T
    denoised = x_T
    for step_index, t in enumerate(tqdm(scheduler.timesteps.tolist(), desc="LCM", disable=not progress)):
        model_output = model_fn(x, _timestep_batch(t, x))
        clip_range = clip_range_fn(step_index) if clip_range_fn is not None else None
        out = scheduler.step(model_output, t, x, generator=generator, clip_range=clip_range)
        x, denoised = out.prev_sample, out.denoised
    return denoised


class DualPathNoise(Protocol):
    """Random numbers of :func:`sample_dual_path` (implementations: gl_lcm.diffusion.noise).

    ``prepare`` is called once before the loop and puts every draw on the device (shape: the B x C x h x w
    of one path); the other methods then only index."""

    def prepare(self, shape, num_steps: int, needs_leg: bool, device, dtype) -> None: ...
    def initial(self) -> Tensor: ...
    def step(self, j: int, last: bool) -> Optional[Tensor]: ...
    def leg(self, j: int) -> Tensor: ...


def predict_direct(model_fn: Callable[[Tensor, Tensor, Tensor], Tensor], cond: Tensor, num_train_timesteps: int) -> Tensor:
    """The plain supervised baseline (ours, ``diffusion.noise_input: false``): one call with zeros where the
    noisy latent goes, at t = T-1, its output read as the x0 latent. cond: B x C x h x w -> B x C x h x w."""
    zeros = torch.zeros_like(cond)
    return model_fn(zeros, _timestep_batch(num_train_timesteps - 1, zeros), cond)


@torch.no_grad()
def sample_dual_path(
    model_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    scheduler: LCMScheduler,
    cond_global: Tensor,
    cond_local: Tensor,
    num_steps: int,
    noise: DualPathNoise,
    guidance_mode: str = "leg",
    guidance_alpha: float = 3.0,
    leg_zero_channels: int = 0,
    clip_range_fn: Optional[Callable[[int], Tensor]] = None,
    batched: bool = True,
    fresh_scheduler: Optional[Callable[[], LCMScheduler]] = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """GL-LCM dual-path LCM sampling (the only LCM loop of the dual path). Returns (z_global, z_local).

    The global path [x, cond_global] and the local path [x, cond_local] start from the same noise;
    at each step both go through ``model_fn(x, t, cond)`` in ONE batched call (2B samples), the
    local prediction is guided (:func:`~gl_lcm.diffusion.guidance.apply_guidance`), and one
    scheduler step advances both paths, each sample clipped to its own range.

    Args:
        cond_global, cond_local: B x C x h x w scaled latents of the CXR and of the lung-masked CXR.
        noise: initial, re-injected and LEG draws (see :class:`DualPathNoise`).
        leg_zero_channels: LEG's std counted over that many extra zero channels (the published
            UNet's untrained outputs; 0 = ours).
        clip_range_fn: timestep -> (2B,) x0 clip half-widths (e.g. a
            :class:`~gl_lcm.diffusion.lcm.DynamicClip`), or None for no clipping.
        batched: False makes two model calls per step (the published implementation's way; same result).
        fresh_scheduler: when given, a new scheduler from it is built at every step, as the published
            code did to change its clip range (benchmarks only; same result).

    Returns:
        (z_global, z_local), each B x C x h x w: the last step's denoised estimates.
    """
    b, device, dtype = cond_global.shape[0], cond_global.device, cond_global.dtype
    # everything the loop needs is put on the device first: the loop itself never synchronises with the host
    noise.prepare(cond_global.shape, num_steps, guidance_mode == "leg", device, dtype)
    x_T = noise.initial()
    x = torch.cat([x_T, x_T])  # both paths start from the same noise
    cond = torch.cat([cond_global, cond_local])
    scheduler.set_timesteps(num_steps, device=device)
    scheduler.set_begin_index(0)
    timesteps = scheduler.timestep_list
    clips = [clip_range_fn(t).to(device) if clip_range_fn is not None else None for t in timesteps]
    t_batches = [torch.full((2 * b,), t, device=device, dtype=torch.long) for t in timesteps]
    denoised = x
    for j, t in enumerate(tqdm(timesteps, desc="dual-path LCM", disable=not progress, leave=False)):
        t_batch = t_batches[j]
        if batched:
            out = model_fn(x, t_batch, cond)
        else:
            out = torch.cat([model_fn(x[:b], t_batch[:b], cond[:b]), model_fn(x[b:], t_batch[b:], cond[b:])])
        eps_global, eps_local = out[:b], out[b:]
        leg_noise = noise.leg(j) if guidance_mode == "leg" else None
        step_noise = noise.step(j, j == len(timesteps) - 1)
        eps_local = apply_guidance(guidance_mode, eps_global, eps_local, guidance_alpha, noise=leg_noise,
                                   zero_channels=leg_zero_channels)
        clip = clips[j]
        if fresh_scheduler is not None:
            scheduler = fresh_scheduler()
            scheduler.set_timesteps(num_steps, device=device)
            scheduler.set_begin_index(j)
        step = scheduler.step(torch.cat([eps_global, eps_local]), t, x, clip_range=clip, noise=step_noise)
        x, denoised = step.prev_sample, step.denoised
    return denoised[:b], denoised[b:]


def ddim_timesteps(num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """DDIM "leading" spacing with steps_offset 0 (diffusers' DDIMScheduler default).

    ``k = T // num_steps``; timesteps ``[(n-1)k, ..., k, 0]`` (descending, int64, always ending at 0);
    each step goes from t to t - k, and from 0 to the clean sample (alpha_bar_prev = 1).
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    step_ratio = num_train_timesteps // num_steps
    return (np.arange(0, num_steps) * step_ratio)[::-1].astype(np.int64).copy()


def ddim_step(
    x_t: Tensor,
    eps: Tensor | None,
    x0: Tensor,
    alpha_bar_t: Tensor | float,
    alpha_bar_prev: Tensor | float,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """One DDIM update (Song et al. 2021, eq. 12) from x_t to x_prev.

    ``sigma = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)``;
    ``x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma^2) * eps + sigma * noise``.

    Args:
        x_t: current sample B x C x h x w; only used when ``eps`` is None, in which case eps is re-derived
            from x_t and x0: ``eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)`` (consistent with a clipped x0).
        eps, x0: predicted noise and clean sample, shaped like x_t.
        alpha_bar_t, alpha_bar_prev: floats, 0-d tensors or tensors broadcastable to x_t (e.g. B x 1 x 1 x 1).
        eta: 0 gives the deterministic DDIM ODE step; 1 gives DDPM-like ancestral variance.
        noise: standard normal, shaped like x_t; required when eta > 0.

    Returns:
        x_prev shaped like x_t.
    """
    alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=x0.dtype, device=x0.device)
    alpha_bar_prev = torch.as_tensor(alpha_bar_prev, dtype=x0.dtype, device=x0.device)
    if eps is None:
        eps = (x_t - alpha_bar_t**0.5 * x0) / (1 - alpha_bar_t) ** 0.5
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
    sigma = eta * variance**0.5
    x_prev = alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev - sigma**2) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + sigma * noise
    return x_prev


def sample_ddim(
    model_fn: ModelFn,
    alphas_cumprod: Tensor,
    x_T: Tensor,
    num_steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    prediction_type: str = "epsilon",
    clip_range_fn: ClipRangeFn | None = None,
    progress: bool = False,
    use_clipped_model_output: bool = False,
) -> Tensor:
    """DDIM sampling with "leading" timestep spacing (see :func:`ddim_timesteps`), final alpha_bar 1.

    Matches diffusers' DDIMScheduler (set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading").
    When x0 is clipped, eps is kept as predicted (diffusers' default) unless
    ``use_clipped_model_output`` re-derives it from the clipped x0.

    Args:
        alphas_cumprod: (T,).
        x_T: initial noise B x C x h x w.
        eta: DDIM stochasticity; > 0 draws noise from ``generator`` after each model call.

    Returns:
        The final sample x_0, B x C x h x w.
    """
    timesteps = ddim_timesteps(alphas_cumprod.shape[0], num_steps)
    step_ratio = alphas_cumprod.shape[0] // num_steps
    alphas_cumprod = alphas_cumprod.to(device=x_T.device, dtype=x_T.dtype)
    x = x_T
    for step_index, t in enumerate(tqdm(timesteps.tolist(), desc="DDIM", disable=not progress)):
        model_output = model_fn(x, _timestep_batch(t, x))
        x0, eps = predict_x0_and_eps(model_output, x, t, alphas_cumprod, prediction_type)
        x0, clipped = _maybe_clip(x0, clip_range_fn, step_index)
        prev_t = t - step_ratio
        alpha_bar_t = alphas_cumprod[t]
        alpha_bar_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.ones_like(alpha_bar_t)
        noise = randn_like(model_output, generator) if eta > 0 else None
        x = ddim_step(
            x, None if (clipped and use_clipped_model_output) else eps, x0, alpha_bar_t, alpha_bar_prev, eta, noise
        )
    return x


def ddpm_step(
    x_t: Tensor,
    x0: Tensor,
    alpha_bar_t: Tensor | float,
    alpha_bar_prev: Tensor | float,
    noise: Tensor | None = None,
) -> Tensor:
    """One ancestral DDPM step (Ho et al. 2020) from the posterior q(x_prev | x_t, x0), "fixed_small" variance.

    With ``a_t = alpha_bar_t``, ``a_p = alpha_bar_prev``, ``beta = 1 - a_t / a_p``:
    ``mean = sqrt(a_p) * beta / (1 - a_t) * x0 + sqrt(1 - beta) * (1 - a_p) / (1 - a_t) * x_t``,
    ``var = (1 - a_p) / (1 - a_t) * beta`` (clamped to >= 1e-20); returns ``mean + sqrt(var) * noise``
    (just the mean when ``noise`` is None, as on the last step t = 0).

    Shapes: x_t, x0, noise B x C x h x w; alphas floats/tensors broadcastable to them.
    """
    alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=x0.dtype, device=x0.device)
    alpha_bar_prev = torch.as_tensor(alpha_bar_prev, dtype=x0.dtype, device=x0.device)
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    mean = (alpha_bar_prev**0.5 * beta_t) / (1 - alpha_bar_t) * x0 + alpha_t**0.5 * (1 - alpha_bar_prev) / (
        1 - alpha_bar_t
    ) * x_t
    if noise is None:
        return mean
    variance = torch.clamp((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t, min=1e-20)
    return mean + variance**0.5 * noise


def sample_ddpm(
    model_fn: ModelFn,
    betas: Tensor,
    x_T: Tensor,
    generator: torch.Generator | None = None,
    prediction_type: str = "epsilon",
    clip_range_fn: ClipRangeFn | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral DDPM sampling over all T training timesteps (the BS-LDM baseline sampler).

    Matches diffusers' DDPMScheduler (variance_type "fixed_small") step for step; noise for t > 0 is
    drawn from ``generator`` after each model call. Step index j for ``clip_range_fn`` is 0 at t = T-1.

    Args:
        betas: (T,).
        x_T: initial noise B x C x h x w.

    Returns:
        The final sample x_0, B x C x h x w.
    """
    alphas_cumprod = alphas_cumprod_from_betas(betas.to(torch.float32)).to(device=x_T.device, dtype=x_T.dtype)
    num_train_timesteps = alphas_cumprod.shape[0]
    x = x_T
    timesteps = range(num_train_timesteps - 1, -1, -1)
    for step_index, t in enumerate(tqdm(timesteps, desc="DDPM", disable=not progress)):
        model_output = model_fn(x, _timestep_batch(t, x))
        x0, _ = predict_x0_and_eps(model_output, x, t, alphas_cumprod, prediction_type)
        x0, _ = _maybe_clip(x0, clip_range_fn, step_index)
        alpha_bar_prev = alphas_cumprod[t - 1] if t > 0 else torch.ones_like(alphas_cumprod[0])
        noise = randn_like(model_output, generator) if t > 0 else None
        x = ddpm_step(x, x0, alphas_cumprod[t], alpha_bar_prev, noise)
    return x
