"""Deterministic seeds derived from a base seed and names/indices.

Per-step seeds (base seed, rank, step) make training resume exactly: a resumed run
re-derives the same random numbers for step s as an uninterrupted run would.
Per-image seeds (base seed, file stem) make inference independent of order and batch size.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, stable across runs and platforms."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global generators (for code we do not control, e.g. dropout)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded with ``seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# ---------------------------------------------------------------------------- draws from a generator
# torch draws with a generator only on the generator's own device: a CUDA generator with a CPU draw
# (or the reverse) raises. These helpers always draw where the generator lives and move the result
# to ``device``, so a draw agrees with its generator by construction; with a CPU generator the numbers
# do not depend on the target device (as diffusers' ``randn_tensor``). Without a generator they draw
# from the global generator of ``device``.
def _shape(shape) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


def _devices(generator: torch.Generator | None, device) -> tuple[torch.device, torch.device]:
    """(device to draw on, device of the result); the result defaults to the generator's device."""
    if generator is None:
        target = torch.device(device) if device is not None else torch.device("cpu")
        return target, target
    target = torch.device(device) if device is not None else generator.device
    return generator.device, target


def randn(shape, generator: torch.Generator | None = None, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` drawn on ``generator.device``, returned on ``device``."""
    draw, target = _devices(generator, device)
    return torch.randn(_shape(shape), generator=generator, device=draw, dtype=dtype).to(target)


def rand(shape, generator: torch.Generator | None = None, device: torch.device | str | None = None,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uniform [0, 1) numbers of ``shape`` drawn on ``generator.device``, returned on ``device``."""
    draw, target = _devices(generator, device)
    return torch.rand(_shape(shape), generator=generator, device=draw, dtype=dtype).to(target)


def randint(low: int, high: int, shape, generator: torch.Generator | None = None,
            device: torch.device | str | None = None, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Integers in [low, high) of ``shape`` drawn on ``generator.device``, returned on ``device``."""
    draw, target = _devices(generator, device)
    return torch.randint(low, high, _shape(shape), generator=generator, device=draw, dtype=dtype).to(target)


def randperm(n: int, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
    """A random permutation of 0..n-1 drawn on ``generator.device``, returned on ``device``."""
    draw, target = _devices(generator, device)
    return torch.randperm(n, generator=generator, device=draw).to(target)
