"""Where the random numbers of GL-LCM's dual-path sampler come from.

A noise source gives the sampler three kinds of standard normal draws, each B x C x h x w:
``initial()`` (both paths start from it), ``step(j)`` (2B: the global paths' then the local paths'
noise re-injected after step j) and ``leg(j)`` (LEG's random direction at step j). The sampler calls
``prepare`` once before its loop: every draw is then already on the device, so the loop never copies
to it (no host synchronisation per step).

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

    gens: one CPU generator per image; shape: one latent, C x h x w. ``prepare`` draws the whole
    stream in the order a step-by-step sampler would (initial noise, then per step the global and
    the local paths' noise; LEG's from the second generators) and moves it to the device at once.
    """

    def __init__(self, gens: Sequence[torch.Generator], shape: Sequence[int], device="cpu", dtype=torch.float32):
        self.gens, self.shape, self.device, self.dtype = list(gens), tuple(shape), device, dtype
        self.leg_gens = [make_generator(derive_seed(g.initial_seed(), "leg")) for g in self.gens]
        self._initial = self._steps = self._legs = None

    def _draw(self, gens) -> Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in gens])  # float32, CPU

    def prepare(self, shape: Sequence[int], num_steps: int, needs_leg: bool, device=None, dtype=None) -> None:
        """Draw the stream for ``num_steps`` steps onto ``device`` / ``dtype`` (default: the constructor's)."""
        self.device, self.dtype = device or self.device, dtype or self.dtype
        if (len(self.gens), *self.shape) != tuple(shape):
            raise ValueError(f"noise for {(len(self.gens), *self.shape)} latents, sampling {tuple(shape)}")
        initial = self._draw(self.gens)
        # drawn on the last step too (unused there), so a generator's stream never depends on the step count
        steps = torch.stack([torch.cat([self._draw(self.gens), self._draw(self.gens)]) for _ in range(num_steps)])
        self._initial = initial.to(self.device, self.dtype)
        self._steps = steps.to(self.device, self.dtype)
        self._legs = (torch.stack([self._draw(self.leg_gens) for _ in range(num_steps)]).to(self.device, self.dtype)
                      if needs_leg else None)

    def initial(self) -> Tensor:
        return self._initial

    def step(self, j: int, last: bool) -> Tensor:
        return self._steps[j]

    def leg(self, j: int) -> Tensor:
        return self._legs[j]


@dataclass
class GivenNoise:
    """Given random numbers, to replay a stream (e.g. the published code's).

    initial: B x C x h x w, the noise both paths start from.
    step_global, step_local: S' x B x C x h x w, the noise the scheduler re-injects after step j
        (entry j); the last step adds none, so S' = S - 1 entries suffice (S' = S is accepted).
    leg_noise: S x B x C x h x w standard normal for LEG at step j (needed for guidance 'leg' only).
    ``prepare`` checks the shapes and moves the draws to the latents' device and dtype.
    """

    initial_noise: Tensor
    step_global: Tensor
    step_local: Tensor
    leg_noise: Optional[Tensor] = None

    def prepare(self, shape: Sequence[int], num_steps: int, needs_leg: bool, device=None,
                dtype: torch.dtype = torch.float32) -> None:
        if tuple(self.initial_noise.shape) != tuple(shape):
            raise ValueError(f"injected initial noise has shape {tuple(self.initial_noise.shape)}, "
                             f"expected {tuple(shape)}")
        for name in ("step_global", "step_local") + (("leg_noise",) if needs_leg else ()):
            t = getattr(self, name)
            need = num_steps if name == "leg_noise" else num_steps - 1
            if t is None or t.shape[0] < need or tuple(t.shape[1:]) != tuple(shape):
                got = None if t is None else tuple(t.shape)
                raise ValueError(f"injected {name} has shape {got}, expected ({need}, {', '.join(map(str, shape))})")
        move = lambda t: t.to(device, dtype) if t is not None else None
        self.initial_noise, self.step_global, self.step_local = (move(self.initial_noise), move(self.step_global),
                                                                 move(self.step_local))
        self.leg_noise = move(self.leg_noise)

    def initial(self) -> Tensor:
        return self.initial_noise

    def step(self, j: int, last: bool) -> Optional[Tensor]:
        return None if last else torch.cat([self.step_global[j], self.step_local[j]])

    def leg(self, j: int) -> Tensor:
        return self.leg_noise[j]
