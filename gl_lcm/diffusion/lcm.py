"""Latent consistency model (LCM) multistep sampler with per-step, per-sample x0 clipping.

Numerically follows ``diffusers.LCMScheduler`` (timesteps, boundary conditions, noise
re-injection) but takes the clipping range as a ``step`` argument, so GL-LCM's temporal adaptive
thresholding never needs the scheduler rebuilt, and a batch stacking the global and the local path
can clip each sample to its own range.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .schedule import (
    VALID_PREDICTION_TYPES,
    alphas_cumprod_from_betas,
    make_betas,
    predict_x0_and_eps,
    randn_like,
)


def boundary_condition_scalings(
    timestep: Tensor | int | float, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[Tensor | float, Tensor | float]:
    """Consistency-model boundary scalings (Song et al. 2023; LCM discrete form).

    With ``s = timestep_scaling * t``: ``c_skip = sigma_data^2 / (s^2 + sigma_data^2)`` and
    ``c_out = s / sqrt(s^2 + sigma_data^2)``, so at t = 0 c_skip = 1 and c_out = 0 (f(x, 0) = x), and
    for large t c_skip -> 0, c_out -> 1.

    Args:
        timestep: Python number (returns floats) or tensor of any shape (returns tensors of that shape).

    Returns:
        (c_skip, c_out), both in [0, 1].
    """
    scaled = timestep * timestep_scaling
    denominator = scaled**2 + sigma_data**2
    return sigma_data**2 / denominator, scaled / denominator**0.5


def dynamic_clip_range(step_index: int, omega: float, b: float) -> float:
    """Temporal adaptive thresholding (BS-LDM / GL-LCM): x0 is clamped to +-(omega + b * j) at step j.

    ``j`` counts sampling steps from 0 at the first, noisiest step (t = T-1) upward, so the range
    widens as denoising proceeds. This is how the published GL-LCM code counts it
    (github.com/diaoquesang/GL-LCM, ``batch_lcm_eval.py``: ``for j, t in enumerate(scheduler.timesteps)``
    rebuilds the scheduler with ``clip_sample_range = initial_range + clip_rate * j`` *before* stepping).
    BS-LDM's ``ldm_eval.py`` rebuilt its scheduler *after* each step, i.e. it lagged by one step
    (omega + b * max(j - 1, 0)); we follow GL-LCM. Published values: SZCH omega 2.0 (global) /
    3.5 (local), b 0.025; JSRT 1.7 / 3.0, b 0.025.

    Args:
        step_index: j >= 0.

    Returns:
        The clamp half-width, a float.
    """
    if step_index < 0:
        raise ValueError(f"step_index must be >= 0, got {step_index}")
    return float(omega + b * step_index)


def clip_grid_index(timestep: int, num_train_timesteps: int, original_inference_steps: int) -> int:
    """Index j of ``timestep`` on the LCM's original grid (0 at t = T-1, the noisiest point).

    Dynamic clipping widens the x0 range by b per step of the published 50-step schedule. A
    sampler with fewer steps jumps along that same grid (4 steps: t = 999, 759, 499, 259 ->
    j = 0, 12, 25, 37), so it gets the range the 50-step sampler has at the same noise level;
    counting its own steps (j = 0..3) would clip the last, nearly clean estimates far too hard.
    With 50 steps j is the step index, as published.
    """
    k = num_train_timesteps // original_inference_steps
    return max(0, (num_train_timesteps - 1 - int(timestep)) // k)


@dataclass(frozen=True)
class DynamicClip:
    """Per-sample x0 clip ranges of an LCM sampler as a function of the timestep.

    ``self(t)`` -> (len(omegas),) float32 tensor ``omega_i + b * j``, j = :func:`clip_grid_index`
    of t. ``omegas`` holds one base range per sample of the stacked batch (GL-LCM: B global
    values, then B local values).
    """

    omegas: tuple[float, ...]
    b: float
    num_train_timesteps: int = 1000
    original_inference_steps: int = 50

    def __call__(self, timestep: int) -> Tensor:
        j = clip_grid_index(timestep, self.num_train_timesteps, self.original_inference_steps)
        return torch.tensor([dynamic_clip_range(j, float(o), self.b) for o in self.omegas])


def clamp_per_sample(x: Tensor, clip_range: Tensor | float) -> Tensor:
    """Clamp x (B x ...) to [-r, r] where r is a float, a 0-d tensor or a (B,) tensor (one range per sample)."""
    if not isinstance(clip_range, Tensor):
        return x.clamp(-float(clip_range), float(clip_range))
    if clip_range.ndim == 0:
        return x.clamp(-clip_range.item(), clip_range.item())
    if clip_range.ndim != 1 or clip_range.shape[0] != x.shape[0]:
        raise ValueError(
            f"clip_range tensor must have shape (B,) with B={x.shape[0]}, got shape {tuple(clip_range.shape)}"
        )
    bound = clip_range.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.maximum(torch.minimum(x, bound), -bound)


def check_custom_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> None:
    """Raise ValueError unless ``timesteps`` are integers, strictly descending, in [0, T-1]."""
    ts = list(timesteps)
    if not ts or any(isinstance(t, bool) or int(t) != t for t in ts):
        raise ValueError(f"custom LCM timesteps must be a non-empty list of integers, got {ts}")
    if any(a <= b for a, b in zip(ts, ts[1:])) or ts[0] > num_train_timesteps - 1 or ts[-1] < 0:
        raise ValueError(f"custom LCM timesteps {ts} must be strictly descending within [0, {num_train_timesteps - 1}]")


def check_step_schedules(step_schedules: Sequence[Sequence[int]], num_train_timesteps: int) -> None:
    """Raise ValueError unless every schedule passes :func:`check_custom_timesteps` and no two have the
    same length (sampling picks a schedule by its step count, so a later one would replace an earlier one)."""
    for schedule in step_schedules:
        try:
            check_custom_timesteps(schedule if isinstance(schedule, (list, tuple)) else [], num_train_timesteps)
        except ValueError as err:
            raise ValueError(f"step_schedules entry {schedule!r}: {err}") from None
    lengths = [len(s) for s in step_schedules]
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"step_schedules={[list(s) for s in step_schedules]} has two schedules of the same length: "
                         f"sampling picks the schedule by its step count")


@dataclass
class LCMSchedulerOutput:
    """Result of one LCM step: ``prev_sample`` (next x_t, B x C x h x w) and ``denoised`` (consistency x0 estimate)."""

    prev_sample: Tensor
    denoised: Tensor


class LCMScheduler:
    """Multistep LCM sampler (Luo et al. 2023) with the semantics of ``diffusers.LCMScheduler``.

    Differences on purpose: ``step`` takes ``clip_range`` (float or per-sample (B,) tensor) and optional
    explicit ``noise``; no dynamic thresholding, zero-SNR rescaling, custom timesteps or strength.
    ``timestep_spacing`` and ``steps_offset`` are accepted for config compatibility and, exactly as in
    diffusers' LCMScheduler, do not change the LCM timestep schedule.
    """

    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Tensor | np.ndarray | list[float] | None = None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        sigma_data: float = 0.5,
        step_schedules: Sequence[Sequence[int]] = (),
    ) -> None:
        if prediction_type not in VALID_PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {prediction_type!r}; valid types: {', '.join(VALID_PREDICTION_TYPES)}"
            )
        if trained_betas is not None:
            self.betas = torch.as_tensor(np.asarray(trained_betas), dtype=torch.float32)
            num_train_timesteps = int(self.betas.shape[0])
        else:
            self.betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        self.alphas_cumprod = alphas_cumprod_from_betas(self.betas)
        # alpha_bar "after" the last step: 1 (fully clean) or alpha_bar_0, as in DDIM.
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

        self.num_train_timesteps = num_train_timesteps
        self.original_inference_steps = original_inference_steps
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.steps_offset = steps_offset
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.timestep_scaling = timestep_scaling
        self.sigma_data = sigma_data
        # ours: explicit timesteps for some step counts (set_timesteps(n) uses the one of length n)
        check_step_schedules(step_schedules, num_train_timesteps)
        self.step_schedules = {len(s): [int(t) for t in s] for s in step_schedules}

        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.long)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next step; None until the first ``step`` after ``set_timesteps``."""
        return self._step_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start stepping at ``timesteps[begin_index]`` instead of looking the first timestep up."""
        self._begin_index = begin_index

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        original_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """Choose the sampling timesteps and reset the step index.

        The distillation grid is ``t_i = (i + 1) * k - 1`` (i = 0..N-1, k = T // N, N =
        original_inference_steps); ``num_inference_steps`` of its points, evenly spaced in index from the
        top, are used in descending order (N=50, T=1000, 4 steps -> [999, 759, 499, 259]).
        ``timesteps`` (strictly descending, in [0, T-1]) are used as given instead, as diffusers'
        ``set_timesteps(timesteps=...)``; so is the constructor's ``step_schedules`` entry of length
        ``num_inference_steps`` when there is one.
        """
        if timesteps is None and num_inference_steps in self.step_schedules:
            timesteps = self.step_schedules[num_inference_steps]
        if timesteps is not None:
            if num_inference_steps is not None and num_inference_steps != len(timesteps):
                raise ValueError(f"num_inference_steps={num_inference_steps} but {len(timesteps)} timesteps given")
            check_custom_timesteps(timesteps, self.num_train_timesteps)
            self.timesteps = torch.tensor([int(t) for t in timesteps], device=device, dtype=torch.long)
            self.num_inference_steps = len(timesteps)
            self._after_set_timesteps(device, [int(t) for t in timesteps])
            return
        if num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps or timesteps")
        original_steps = (
            self.original_inference_steps if original_inference_steps is None else original_inference_steps
        )
        if original_steps > self.num_train_timesteps:
            raise ValueError(
                f"original_inference_steps ({original_steps}) cannot exceed num_train_timesteps "
                f"({self.num_train_timesteps})"
            )
        if num_inference_steps > self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps ({num_inference_steps}) cannot exceed num_train_timesteps "
                f"({self.num_train_timesteps})"
            )
        if num_inference_steps > original_steps:
            raise ValueError(
                f"num_inference_steps ({num_inference_steps}) cannot exceed original_inference_steps "
                f"({original_steps}): the schedule is a subset of that grid"
            )
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        skip = self.num_train_timesteps // original_steps
        grid_descending = (np.arange(1, original_steps + 1) * skip - 1)[::-1]
        indices = np.floor(np.linspace(0, original_steps, num=num_inference_steps, endpoint=False)).astype(np.int64)
        self.timesteps = torch.from_numpy(grid_descending[indices].copy()).to(device=device, dtype=torch.long)
        self.num_inference_steps = num_inference_steps
        self._after_set_timesteps(device, [int(t) for t in grid_descending[indices]])

    @property
    def timestep_list(self) -> list[int]:
        """``timesteps`` as Python ints (read without touching device memory)."""
        return list(self._timestep_list)

    def _after_set_timesteps(self, device, timesteps: list[int]) -> None:
        """Reset the step index; keep the timesteps as Python ints and alpha_bar on ``device``, so that
        ``step`` never reads device memory or copies to it (no host synchronisation per step)."""
        self._step_index = None
        self._begin_index = None
        self._timestep_list = timesteps
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._alphas_on_device = (device, self.alphas_cumprod.to(device), self.final_alpha_cumprod.to(device))

    def _alphas(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(alphas_cumprod, final_alpha_cumprod) on ``device`` (copied once per device)."""
        cached = getattr(self, "_alphas_on_device", None)
        if cached is None or cached[0] != device:
            cached = (device, self.alphas_cumprod.to(device), self.final_alpha_cumprod.to(device))
            self._alphas_on_device = cached
        return cached[1], cached[2]

    def index_for_timestep(self, timestep: Tensor | int) -> int:
        """Position of ``timestep`` in ``timesteps`` (the second match if it repeats, like diffusers)."""
        matches = (self.timesteps == int(timestep)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {int(timestep)} is not in the schedule {self.timesteps.tolist()}")
        return int(matches[1 if len(matches) > 1 else 0].item())

    def step(
        self,
        model_output: Tensor,
        timestep: Tensor | int,
        sample: Tensor,
        generator: torch.Generator | None = None,
        clip_range: Tensor | float | None = None,
        noise: Tensor | None = None,
    ) -> LCMSchedulerOutput:
        """One LCM step: consistency estimate of x0, then re-noise it to the next timestep.

        ``x0_hat`` from the model output (prediction_type), clamped to [-r, r];
        ``denoised = c_out(t) * x0_hat + c_skip(t) * x_t``;
        ``prev_sample = sqrt(a_prev) * denoised + sqrt(1 - a_prev) * z`` with a_prev = alpha_bar of the next
        timestep, except on the last step, where ``prev_sample = denoised`` (no noise).

        Args:
            model_output: network output at (sample, timestep), B x C x h x w.
            timestep: the current timestep (an element of ``timesteps``), int or 0-d tensor.
            sample: x_t, B x C x h x w.
            generator: RNG for z when ``noise`` is None. A CPU generator with a tensor on another device
                draws on the CPU and moves the result, exactly like diffusers' ``randn_tensor``, so the same
                generator state gives the same z as diffusers.
            clip_range: None -> clamp to +-clip_sample_range only if clip_sample; a float r -> clamp to
                [-r, r]; a (B,) tensor -> sample b is clamped to +-clip_range[b].
            noise: explicit z (shape of sample); overrides generator.

        Returns:
            LCMSchedulerOutput(prev_sample, denoised), each B x C x h x w.
        """
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        timestep = int(timestep)
        next_index = self._step_index + 1
        steps = self._timestep_list
        prev_timestep = steps[next_index] if next_index < len(steps) else timestep

        alphas_cumprod, final_alpha_cumprod = self._alphas(sample.device)
        alpha_bar_prev = alphas_cumprod[prev_timestep] if prev_timestep >= 0 else final_alpha_cumprod
        c_skip, c_out = boundary_condition_scalings(timestep, self.sigma_data, self.timestep_scaling)

        x0_hat, _ = predict_x0_and_eps(model_output, sample, timestep, alphas_cumprod, self.prediction_type)
        if clip_range is None and self.clip_sample:
            clip_range = self.clip_sample_range
        if clip_range is not None:
            x0_hat = clamp_per_sample(x0_hat, clip_range)

        denoised = c_out * x0_hat + c_skip * sample

        if self._step_index != self.num_inference_steps - 1:
            if noise is None:
                noise = randn_like(model_output, generator, dtype=denoised.dtype)
            elif noise.shape != denoised.shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} != sample shape {tuple(denoised.shape)}")
            prev_sample = alpha_bar_prev.sqrt() * denoised + (1 - alpha_bar_prev).sqrt() * noise
        else:
            prev_sample = denoised

        self._step_index += 1
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

