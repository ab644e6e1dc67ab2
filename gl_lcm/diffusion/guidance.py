"""Guidance rules that turn global/local noise predictions into the one used on GL-LCM's local path.

All inputs are noise predictions B x C x h x w (any real range); ``alpha`` is a float (GL-LCM uses
alpha = 3 for LEG).
"""
from __future__ import annotations

import torch
from torch import Tensor

# The choice list of ``guidance.mode`` (declared here, referred to by gl_lcm.config).
GUIDANCE_MODES = ("vanilla", "cfg", "leg")


def vanilla(eps_local: Tensor) -> Tensor:
    """No guidance: the local path uses its own prediction ``eps_local`` unchanged."""
    return eps_local


def cfg(eps_global: Tensor, eps_local: Tensor, alpha: float) -> Tensor:
    """Classifier-free-style guidance between the paths: ``eps_global + alpha * (eps_local - eps_global)``.

    alpha = 1 gives eps_local, alpha = 0 gives eps_global, alpha > 1 extrapolates toward the local
    condition. (The published GL-LCM code keeps this as the commented-out alternative
    ``(1 - alpha) * eps_global + alpha * eps_local``, the same expression.)
    """
    return eps_global + alpha * (eps_local - eps_global)


def per_sample_std(x: Tensor, zero_channels: int = 0) -> Tensor:
    """Unbiased standard deviation of each sample over all non-batch dims: B x ... -> B x 1 x ... x 1.

    ``zero_channels``: take the std as if ``x`` (B x C x h x w) had that many more all-zero
    channels after its own, i.e. over the published 8-channel UNet output whose last 4 channels
    are 0 (``zero_channels=4`` for 4 latent channels; about 1/1.41 of the plain std).
    """
    if zero_channels:
        x = torch.cat([x, x.new_zeros(x.shape[0], zero_channels, *x.shape[2:])], dim=1)
    return x.flatten(1).std(dim=1).reshape(-1, *([1] * (x.ndim - 1)))


def leg(eps_local: Tensor, alpha: float, noise: Tensor, zero_channels: int = 0) -> Tensor:
    """Local-Enhanced Guidance (GL-LCM): ``alpha * eps_local + (1 - alpha) * noise / std(eps_local)``.

    ``std`` is the unbiased standard deviation of each sample's eps_local over (C, h, w), so the result
    for one sample never depends on what else is in the batch. With alpha > 1 this subtracts a scaled
    random direction from an amplified local prediction.

    What the published code does (github.com/diaoquesang/GL-LCM, ``batch_lcm_eval.py``): it runs with
    batch size 1 and computes ``torch.std(masked_residual)`` (unbiased) over the whole 1 x 8 x h x w
    UNet output (4 latent channels plus 4 condition channels, whose target was 0 during training),
    with ``noise = torch.randn_like(masked_residual)`` drawn freshly at every sampling step from the
    global RNG, independent of the initial noise and of the scheduler's re-injected noise. Callers
    reproducing that exactly pass the full output and a fresh standard normal ``noise`` each step.

    Args:
        eps_local: local-path noise prediction, B x C x h x w.
        alpha: guidance weight (published: 3).
        noise: standard normal, same shape as eps_local.
        zero_channels: 0 (ours: std over the predicted channels) or the number of all-zero output
            channels the published UNet appends (4): see :func:`per_sample_std`.

    Returns:
        Guided prediction, B x C x h x w.
    """
    if noise.shape != eps_local.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != eps_local shape {tuple(eps_local.shape)}")
    return alpha * eps_local + (1 - alpha) * noise / per_sample_std(eps_local, zero_channels)


def apply_guidance(
    mode: str,
    eps_global: Tensor,
    eps_local: Tensor,
    alpha: float,
    noise: Tensor | None = None,
    zero_channels: int = 0,
) -> Tensor:
    """Dispatch to :func:`vanilla`, :func:`cfg` or :func:`leg` by name; ``noise`` is required for "leg".

    Returns the guided local-path prediction, B x C x h x w.
    """
    if mode == "vanilla":
        return vanilla(eps_local)
    if mode == "cfg":
        return cfg(eps_global, eps_local, alpha)
    if mode == "leg":
        if noise is None:
            raise ValueError("guidance mode 'leg' needs noise (standard normal, shaped like eps_local)")
        return leg(eps_local, alpha, noise, zero_channels)
    raise ValueError(f"unknown guidance mode {mode!r}; valid modes: {', '.join(GUIDANCE_MODES)}")
