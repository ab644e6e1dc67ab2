"""Noise schedules and forward-process algebra for discrete-time diffusion (pure tensor functions).

Conventions: ``T`` training timesteps indexed ``t = 0 .. T-1``; ``alphas_cumprod[t]`` is
``alpha_bar_t = prod_{s<=t} (1 - beta_s)``; the forward process is
``x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps``. Latents are B x C x h x w.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from gl_lcm.utils import seeding

VALID_SCHEDULES = ("scaled_linear", "linear", "cosine")
# Names diffusers uses for the same schedules, accepted so scheduler configs carry over unchanged.
_SCHEDULE_ALIASES = {"squaredcos_cap_v2": "cosine"}
VALID_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def make_betas(
    schedule: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> Tensor:
    """Per-step noise variances ``beta_t``.

    Args:
        schedule: "scaled_linear" (linspace of sqrt(beta) from sqrt(beta_start) to sqrt(beta_end),
            then squared: the latent-diffusion schedule), "linear" (linspace of beta), or "cosine"
            (Nichol & Dhariwal 2021 ``alpha_bar(t) = cos^2(((t/T) + 0.008) / 1.008 * pi/2)``,
            ``beta_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), 0.999)``; beta_start/beta_end are
            ignored). "squaredcos_cap_v2" is accepted as an alias of "cosine".
        num_train_timesteps: T >= 1.

    Returns:
        float32 tensor of shape (T,) with values in (0, 1).
    """
    name = _SCHEDULE_ALIASES.get(schedule, schedule)
    if name not in VALID_SCHEDULES:
        raise ValueError(f"unknown beta schedule {schedule!r}; valid schedules: {', '.join(VALID_SCHEDULES)}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if name == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if name == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2

    def alpha_bar(fraction: float) -> float:
        return math.cos((fraction + 0.008) / 1.008 * math.pi / 2) ** 2

    # Computed in float64 Python arithmetic, then cast, so values match the reference discretisation.
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """``alpha_bar_t = prod_{s<=t} (1 - beta_s)``: shape (T,) -> (T,), decreasing, values in (0, 1)."""
    return torch.cumprod(1.0 - betas, dim=0)


def gather_per_sample(values: Tensor, timesteps: Tensor | int, like: Tensor) -> Tensor:
    """Gather ``values[timesteps]`` cast to ``like``'s dtype/device and shaped to broadcast over ``like``.

    A scalar timestep gives a 0-d tensor; a (B,) timestep tensor gives shape (B, 1, ..., 1).
    """
    values = values.to(device=like.device, dtype=like.dtype)
    if isinstance(timesteps, Tensor):
        timesteps = timesteps.to(device=like.device, dtype=torch.long)
        if timesteps.ndim == 0:
            return values[timesteps]
        if timesteps.ndim != 1 or timesteps.shape[0] != like.shape[0]:
            raise ValueError(
                f"timesteps must be a scalar or of shape (B,) with B={like.shape[0]}, "
                f"got shape {tuple(timesteps.shape)}"
            )
        return values[timesteps].reshape(-1, *([1] * (like.ndim - 1)))
    return values[int(timesteps)]


def add_noise(x0: Tensor, noise: Tensor, timesteps: Tensor | int, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion ``x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise``.

    Args:
        x0: clean latents, B x C x h x w (any range).
        noise: same shape as x0, usually standard normal.
        timesteps: LongTensor (B,) (one timestep per sample) or a scalar, values in [0, T).
        alphas_cumprod: (T,) cumulative products.

    Returns:
        x_t, same shape and dtype as x0.
    """
    alpha_bar = gather_per_sample(alphas_cumprod, timesteps, x0)
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise


def training_condition(cond: Tensor, timesteps: Tensor | int, alphas_cumprod: Tensor, mode: str = "none") -> Tensor:
    """The condition latent the teacher sees in training.

    mode 'none' (ours): ``cond`` as is, the same as in sampling. mode 'published': what the
    published ``lcm_train.py`` does by passing ``cat(x0, cond)`` through ``add_noise`` with zero
    noise on the condition channels: ``sqrt(alpha_bar_t) * cond`` (its sampling feeds ``cond``
    unscaled). Shapes as in :func:`add_noise`.
    """
    if mode == "none":
        return cond
    if mode == "published":
        return gather_per_sample(alphas_cumprod, timesteps, cond) ** 0.5 * cond
    raise ValueError(f"unknown condition scaling {mode!r}; valid: none, published")


def velocity(x0: Tensor, noise: Tensor, timesteps: Tensor | int, alphas_cumprod: Tensor) -> Tensor:
    """v-prediction target ``v = sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * x0`` (Salimans & Ho 2022).

    Shapes as in :func:`add_noise`; returns a tensor shaped like x0.
    """
    alpha_bar = gather_per_sample(alphas_cumprod, timesteps, x0)
    return alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * x0


def offset_noise(
    shape: tuple[int, ...] | torch.Size,
    strength: float = 0.1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Offset noise: ``randn(shape) + strength * randn(B, C, 1, 1)`` (one extra scalar per sample and channel).

    The per-channel offset lets a model trained on it shift the mean brightness of a sample, which
    plain zero-mean noise cannot teach (Guttenberg 2023; used by BS-LDM / GL-LCM with strength 0.1).

    Args:
        shape: (B, C, h, w) (any rank >= 2; the offset has shape (B, C, 1, ..., 1)).
        strength: scale of the offset term; 0 gives plain standard normal noise.
        generator: explicit RNG; both draws come from it, full-size noise first.

    Returns:
        Tensor of ``shape``; per element variance ``1 + strength**2``.
    """
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"offset_noise needs a shape (B, C, ...), got {shape}")
    dtype = dtype or torch.float32
    device = torch.device(device) if device is not None else torch.device("cpu")
    # drawn on the generator's device, in this order, and moved to ``device`` (gl_lcm.utils.seeding)
    noise = seeding.randn(shape, generator, device, dtype)
    offset = seeding.randn(shape[:2] + (1,) * (len(shape) - 2), generator, device, dtype)
    return noise + strength * offset


def randn_like(reference: Tensor, generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Standard normal noise shaped like ``reference`` (on its device; dtype defaults to its dtype).

    The draw happens on the generator's device and moves to the reference's (``seeding.randn``): a CPU
    generator with a non-CPU reference draws on the CPU (as diffusers' ``randn_tensor`` does), so one
    generator state gives the same numbers whatever the device.
    """
    return seeding.randn(reference.shape, generator, reference.device, dtype or reference.dtype)


def predict_x0_and_eps(
    model_output: Tensor,
    sample: Tensor,
    timesteps: Tensor | int,
    alphas_cumprod: Tensor,
    prediction_type: str,
) -> tuple[Tensor, Tensor]:
    """Convert a network output into predicted clean sample x0 and predicted noise eps.

    With ``a = alpha_bar_t`` and ``s = 1 - a``:
      - "epsilon": eps = out, x0 = (x_t - sqrt(s) * eps) / sqrt(a)
      - "sample":  x0 = out, eps = (x_t - sqrt(a) * x0) / sqrt(s)
      - "v_prediction": x0 = sqrt(a) * x_t - sqrt(s) * out, eps = sqrt(a) * out + sqrt(s) * x_t

    Args:
        model_output, sample: B x C x h x w (sample is x_t).
        timesteps: LongTensor (B,) or scalar in [0, T).
        alphas_cumprod: (T,).

    Returns:
        (x0, eps), each shaped like sample.
    """
    alpha_bar = gather_per_sample(alphas_cumprod, timesteps, sample)
    beta_bar = 1 - alpha_bar
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - beta_bar.sqrt() * eps) / alpha_bar.sqrt()
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - alpha_bar.sqrt() * x0) / beta_bar.sqrt()
    elif prediction_type == "v_prediction":
        x0 = alpha_bar.sqrt() * sample - beta_bar.sqrt() * model_output
        eps = alpha_bar.sqrt() * model_output + beta_bar.sqrt() * sample
    else:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; valid types: {', '.join(VALID_PREDICTION_TYPES)}"
        )
    return x0, eps
