"""Latent consistency distillation (LCD; Luo et al. 2023, "Latent Consistency Models"), pure functions.

Recipe (as in diffusers' ``examples/consistency_distillation/train_lcm_distill_sd_wds.py``, without
the text-CFG teacher since GL-LCM's UNet is conditioned by concatenation): pick a solver-grid timestep
t = t_{n+k} and t_prev = t - k; z_t = forward-noised x0; the online student's consistency output
f(z_t, t) is pulled toward the EMA target network's f(z_prev, t_prev), where z_prev is one deterministic
DDIM step of the frozen teacher from z_t. Model callables take (x_t: B x C x h x w, t: LongTensor B)
and close over their condition.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from .lcm import boundary_condition_scalings, clamp_per_sample
from .schedule import add_noise, gather_per_sample, predict_x0_and_eps

ModelFn = Callable[[Tensor, Tensor], Tensor]
VALID_LOSS_TYPES = ("huber", "l2")


def solver_timesteps(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> Tensor:
    """Skipping-step DDIM solver grid ``t_i = (i + 1) * k - 1`` for i = 0..N-1, k = T // N (ascending).

    T = 1000, N = 50 gives k = 20 and [19, 39, ..., 999], the same points the LCM sampler steps on.

    Returns:
        LongTensor (N,).
    """
    if not 1 <= num_ddim_timesteps <= num_train_timesteps:
        raise ValueError(f"num_ddim_timesteps must be in [1, {num_train_timesteps}], got {num_ddim_timesteps}")
    skip = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.long) * skip - 1


def solver_timestep_pair(solver: Tensor, timestep_index: Tensor) -> tuple[Tensor, Tensor]:
    """Start and end timesteps of one solver step: ``t = solver[index]``, ``t_prev = max(t - k, 0)``.

    The skip k is recovered from the grid as ``solver[0] + 1``.

    Args:
        solver: grid from :func:`solver_timesteps`, LongTensor (N,).
        timestep_index: LongTensor (B,) with values in [0, N).

    Returns:
        (t, t_prev), LongTensors (B,) on timestep_index's device.
    """
    solver = solver.to(timestep_index.device)
    skip = solver[0] + 1
    t = solver[timestep_index]
    return t, torch.clamp(t - skip, min=0)


def ddim_solver_step(x0_pred: Tensor, eps_pred: Tensor, alpha_bar_prev: Tensor | float) -> Tensor:
    """Deterministic DDIM (eta = 0) jump to an earlier time: ``sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps``.

    Args:
        x0_pred, eps_pred: B x C x h x w.
        alpha_bar_prev: float, 0-d tensor or tensor broadcastable to B x C x h x w (e.g. B x 1 x 1 x 1).
    """
    alpha_bar_prev = torch.as_tensor(alpha_bar_prev, dtype=x0_pred.dtype, device=x0_pred.device)
    return alpha_bar_prev.sqrt() * x0_pred + (1 - alpha_bar_prev).sqrt() * eps_pred


def consistency_output(
    model_output: Tensor,
    sample: Tensor,
    timesteps: Tensor | int,
    alphas_cumprod: Tensor,
    prediction_type: str = "epsilon",
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
    clip_range: Tensor | float | None = None,
) -> Tensor:
    """Consistency function ``f(z_t, t) = c_skip(t) * z_t + c_out(t) * x0_pred(z_t, t)``.

    With ``clip_range`` (float or (B,) tensor) x0_pred is first clamped to +-clip_range, which makes
    this the ``denoised`` output of one LCM sampler step with dynamic clipping.

    Args:
        model_output, sample: B x C x h x w (sample is z_t).
        timesteps: LongTensor (B,) or scalar.

    Returns:
        B x C x h x w; equals z_t at t = 0 up to c_out(0) = 0 (exact boundary condition).
    """
    x0_pred, _ = predict_x0_and_eps(model_output, sample, timesteps, alphas_cumprod, prediction_type)
    if clip_range is not None:
        x0_pred = clamp_per_sample(x0_pred, clip_range)
    if isinstance(timesteps, Tensor) and timesteps.ndim == 1:
        scaled_t = timesteps.to(device=sample.device, dtype=sample.dtype).reshape(-1, *([1] * (sample.ndim - 1)))
    else:
        scaled_t = float(timesteps)
    c_skip, c_out = boundary_condition_scalings(scaled_t, sigma_data, timestep_scaling)
    return c_skip * sample + c_out * x0_pred


def pseudo_huber_loss(pred: Tensor, target: Tensor, c: float = 0.001) -> Tensor:
    """``mean(sqrt((pred - target)^2 + c^2) - c)``: ~ squared error / (2c) for small errors, ~ |error| for large.

    Returns a 0-d tensor >= 0.
    """
    return torch.mean(torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c)


def consistency_loss(pred: Tensor, target: Tensor, loss_type: str = "huber", huber_c: float = 0.001) -> Tensor:
    """Distance between student and target consistency outputs: "huber" (pseudo-Huber) or "l2" (MSE)."""
    if loss_type == "huber":
        return pseudo_huber_loss(pred, target, huber_c)
    if loss_type == "l2":
        return torch.mean((pred.float() - target.float()) ** 2)
    raise ValueError(f"unknown loss_type {loss_type!r}; valid types: {', '.join(VALID_LOSS_TYPES)}")


def consistency_distillation_loss(
    student_fn: ModelFn,
    teacher_fn: ModelFn,
    target_fn: ModelFn,
    x0: Tensor,
    noise: Tensor,
    timestep_index: Tensor,
    solver: Tensor,
    alphas_cumprod: Tensor,
    prediction_type: str = "epsilon",
    teacher_prediction_type: str | None = None,
    loss_type: str = "huber",
    huber_c: float = 0.001,
    timestep_scaling: float = 10.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One latent consistency distillation objective (LCM paper, Algorithm 1 without text CFG).

    1. t, t_prev from the solver grid at ``timestep_index``; ``z_t = add_noise(x0, noise, t)``.
    2. student: ``f_student(z_t, t)`` (with grad).
    3. teacher (no grad): x0/eps at t, then ``z_prev = ddim_solver_step(x0, eps, alpha_bar[t_prev])``.
    4. target (EMA of student, no grad): ``f_target(z_prev, t_prev)``.
    5. loss = consistency_loss(student, target).

    Args:
        student_fn, target_fn: consistency networks, outputs of ``prediction_type``.
        teacher_fn: frozen diffusion model, outputs of ``teacher_prediction_type`` (default: prediction_type).
        x0: clean latents B x C x h x w; noise: standard normal of the same shape (explicit, for determinism).
        timestep_index: LongTensor (B,) in [0, len(solver)), drawn by the caller.
        solver: grid from :func:`solver_timesteps`; alphas_cumprod: (T,).

    Returns:
        (loss: 0-d tensor with grad through student_fn,
         diagnostics: dict of detached tensors "timesteps", "timesteps_prev" (B,), "mse" (0-d)).
    """
    teacher_prediction_type = teacher_prediction_type or prediction_type
    t, t_prev = solver_timestep_pair(solver, timestep_index.to(x0.device))
    alphas_cumprod = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)
    z_t = add_noise(x0, noise, t, alphas_cumprod)

    student = consistency_output(student_fn(z_t, t), z_t, t, alphas_cumprod, prediction_type, timestep_scaling)

    with torch.no_grad():
        teacher_output = teacher_fn(z_t, t)
        teacher_x0, teacher_eps = predict_x0_and_eps(teacher_output, z_t, t, alphas_cumprod, teacher_prediction_type)
        z_prev = ddim_solver_step(teacher_x0, teacher_eps, gather_per_sample(alphas_cumprod, t_prev, z_t))
        target = consistency_output(
            target_fn(z_prev, t_prev), z_prev, t_prev, alphas_cumprod, prediction_type, timestep_scaling
        )

    loss = consistency_loss(student, target, loss_type, huber_c)
    diagnostics = {
        "timesteps": t.detach(),
        "timesteps_prev": t_prev.detach(),
        "mse": torch.mean((student.detach().float() - target.float()) ** 2),
    }
    return loss, diagnostics


@torch.no_grad()
def ema_update(target_params: Iterable[Tensor], online_params: Iterable[Tensor], decay: float) -> None:
    """In place ``target = decay * target + (1 - decay) * online`` for paired parameters (LCD uses 0.95)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    target_params, online_params = list(target_params), list(online_params)
    if len(target_params) != len(online_params):
        raise ValueError(f"parameter count mismatch: {len(target_params)} target vs {len(online_params)} online")
    for target, online in zip(target_params, online_params):
        target.mul_(decay).add_(online.detach(), alpha=1.0 - decay)
