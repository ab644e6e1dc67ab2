"""Where the random numbers of GL-LCM's dual-path sampler come from.

A noise source gives the sampler three kinds of standard normal draws, each B x C x h x w:
``initial()`` (both paths start from it), ``step(j)`` (2B: the global paths' then the local paths'
noise re-injected after step j) and ``leg(j)`` (LEG's random direction at step j).

- :class:`PerImageNoise` (ours): every image has its own generator, seeded from the config seed and
  its file name, so a result does not depend on batch size, order or sharding. LEG's draws come
  from a second generator per image, so the global path does not depend on the guidance mode.
- :class:`GivenNoise`: replays given tensors (e.g. the published code's random stream).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from gl_lcm.utils.seeding import derive_seed, make_generator


def image_generators(seed: int, names: Sequence[str]) -> list[torch.Generator]:
    """One CPU generator per image, seeded from (seed, file name)."""
    return [make_generator(derive_seed(seed, "image", n)) for n in names]


def randn_per_image(gens: Sequence[torch.Generator], shape: Sequence[int], device,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """len(gens) x *shape standard normal, row i drawn from gens[i] (float32 on the CPU, so the
    stream does not depend on device or dtype; then moved and cast to ``dtype``)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(device, dtype)


class PerImageNoise:
    """Draws from one generator per image (see the module docstring).

    gens: one CPU generator per image; shape: one latent, C x h x w.
    """

    def __init__(self, gens: Sequence[torch.Generator], shape: Sequence[int], device, dtype=torch.float32):
        self.gens, self.shape, self.device, self.dtype = list(gens), tuple(shape), device, dtype
        self.leg_gens = [make_generator(derive_seed(g.initial_seed(), "leg")) for g in self.gens]

    def _draw(self, gens) -> Tensor:
        return randn_per_image(gens, self.shape, self.device, self.dtype)

    def check(self, shape: Sequence[int], num_steps: int, needs_leg: bool) -> None:
        if (len(self.gens), *self.shape) != tuple(shape):
            raise ValueError(f"noise for {(len(self.gens), *self.shape)} latents, sampling {tuple(shape)}")

    def initial(self) -> Tensor:
        return self._draw(self.gens)

    def step(self, j: int, last: bool) -> Tensor:
        # drawn on the last step too (unused there), so a generator's stream never depends on the step count
        return torch.cat([self._draw(self.gens), self._draw(self.gens)])

    def leg(self, j: int) -> Tensor:
        return self._draw(self.leg_gens)


@dataclass
class GivenNoise:
    """Given random numbers, to replay a stream (e.g. the published code's).

    initial: B x C x h x w, the noise both paths start from.
    step_global, step_local: S' x B x C x h x w, the noise the scheduler re-injects after step j
        (entry j); the last step adds none, so S' = S - 1 entries suffice (S' = S is accepted).
    leg_noise: S x B x C x h x w standard normal for LEG at step j (needed for guidance 'leg' only).
    The sampler moves each draw to its latents' device and dtype.
    """

    initial_noise: Tensor
    step_global: Tensor
    step_local: Tensor
    leg_noise: Optional[Tensor] = None

    def check(self, shape: Sequence[int], num_steps: int, needs_leg: bool) -> None:
        if tuple(self.initial_noise.shape) != tuple(shape):
            raise ValueError(f"injected initial noise has shape {tuple(self.initial_noise.shape)}, "
                             f"expected {tuple(shape)}")
        for name in ("step_global", "step_local") + (("leg_noise",) if needs_leg else ()):
            t = getattr(self, name)
            need = num_steps if name == "leg_noise" else num_steps - 1
            if t is None or t.shape[0] < need or tuple(t.shape[1:]) != tuple(shape):
                got = None if t is None else tuple(t.shape)
                raise ValueError(f"injected {name} has shape {got}, expected ({need}, {', '.join(map(str, shape))})")

    def initial(self) -> Tensor:
        return self.initial_noise

    def step(self, j: int, last: bool) -> Optional[Tensor]:
        return None if last else torch.cat([self.step_global[j], self.step_local[j]])

    def leg(self, j: int) -> Tensor:
        return self.leg_noise[j]
