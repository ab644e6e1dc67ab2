"""Guidance formulas against hand computations."""
from __future__ import annotations

import math

import pytest
import torch

from gl_lcm.diffusion.guidance import apply_guidance, cfg, leg, per_sample_std, vanilla


def test_vanilla_is_identity():
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    assert vanilla(eps) is eps
    assert apply_guidance("vanilla", torch.zeros_like(eps), eps, 3.0) is eps


def test_cfg_hand_numbers():
    eps_global = torch.tensor([1.0, -2.0, 0.5]).reshape(1, 3, 1, 1)
    eps_local = torch.tensor([3.0, 0.0, 0.5]).reshape(1, 3, 1, 1)
    # 1 + 3*(3-1) = 7; -2 + 3*(0+2) = 4; 0.5 + 3*0 = 0.5
    torch.testing.assert_close(cfg(eps_global, eps_local, 3.0), torch.tensor([7.0, 4.0, 0.5]).reshape(1, 3, 1, 1))
    torch.testing.assert_close(cfg(eps_global, eps_local, 1.0), eps_local)
    torch.testing.assert_close(cfg(eps_global, eps_local, 0.0), eps_global)
    torch.testing.assert_close(apply_guidance("cfg", eps_global, eps_local, 3.0), cfg(eps_global, eps_local, 3.0))


def test_leg_hand_numbers():
    eps_local = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2)
    noise = torch.tensor([0.5, -1.0, 0.0, 2.0]).reshape(1, 1, 2, 2)
    std = math.sqrt(5.0 / 3.0)  # unbiased std of 1, 2, 3, 4
    expected = torch.tensor([3 * 1 - 2 * 0.5 / std, 3 * 2 + 2 * 1.0 / std, 3 * 3 - 0.0, 3 * 4 - 2 * 2.0 / std])
    torch.testing.assert_close(leg(eps_local, 3.0, noise), expected.reshape(1, 1, 2, 2))
    torch.testing.assert_close(apply_guidance("leg", eps_local, eps_local, 3.0, noise), expected.reshape(1, 1, 2, 2))
    # alpha = 1 ignores the noise term.
    torch.testing.assert_close(leg(eps_local, 1.0, noise), eps_local)


def test_leg_std_is_per_sample():
    generator = torch.Generator().manual_seed(1)
    eps_local = torch.randn(2, 4, 8, 8, generator=generator) * torch.tensor([0.5, 4.0]).reshape(2, 1, 1, 1)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    batched = leg(eps_local, 3.0, noise)
    for b in range(2):
        torch.testing.assert_close(batched[b : b + 1], leg(eps_local[b : b + 1], 3.0, noise[b : b + 1]))
    whole_batch_std = 3.0 * eps_local - 2.0 * noise / eps_local.std()
    assert not torch.allclose(batched, whole_batch_std)
    stds = per_sample_std(eps_local)
    assert stds.shape == (2, 1, 1, 1)
    torch.testing.assert_close(stds.flatten(), torch.stack([eps_local[0].std(), eps_local[1].std()]))


def test_guidance_errors():
    eps = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="vanilla, cfg, leg"):
        apply_guidance("classifier", eps, eps, 1.0)
    with pytest.raises(ValueError, match="needs noise"):
        apply_guidance("leg", eps, eps, 3.0)
    with pytest.raises(ValueError, match="noise shape"):
        leg(eps, 3.0, torch.zeros(1, 1, 2, 3))
