"""How the inference networks run: numeric precision (autocast), memory format, compilation.

Ours, not published (the published code samples in fp32). ``eval.precision`` sets the autocast dtype
of the denoiser (UNet) and ``eval.vqgan_precision`` that of the VQGAN (fp32 by default: the decoder
writes the output pixels). Outputs of a wrapped network are always float32, so the sampler's
scheduler arithmetic stays in fp32. With ``fp32`` the networks are returned unwrapped, so results
are bit-for-bit those of the plain modules.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """torch dtype for autocast, or None for fp32 (no autocast)."""
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return _DTYPES[precision]


class Autocast(nn.Module):
    """Runs ``module(*args)`` under ``torch.autocast(device, dtype)`` and returns float32 tensors.

    Other attributes (``encode``, ``decode``, ...) are methods wrapped the same way.
    """

    def __init__(self, module, device_type: str, dtype: torch.dtype, methods=()):
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype
        for name in methods:
            setattr(self, name, self._wrap(getattr(module, name)))

    def _wrap(self, fn):
        def run(*args, **kwargs):
            with torch.autocast(self.device_type, dtype=self.dtype):
                out = fn(*args, **kwargs)
            return out.float() if isinstance(out, torch.Tensor) else out

        return run

    def forward(self, *args, **kwargs):
        return self._wrap(self.module)(*args, **kwargs)


def prepare_denoiser(unet: nn.Module, device: torch.device, precision: str = "fp32", compile: bool = False,
                     channels_last: bool = True):
    """The UNet as the sampler should call it: ``fn(x, t, cond) -> eps`` (B x C x h x w float32).

    channels_last applies on CUDA only (no gain on the CPU). ``compile`` wraps the UNet in
    torch.compile with static shapes (a sampling run calls it with one shape; the first call compiles).
    """
    dtype = autocast_dtype(precision)
    unet.eval()
    if channels_last and device.type == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    if compile:
        unet = torch.compile(unet, dynamic=False)
    if dtype is None:
        return unet
    return Autocast(unet, device.type, dtype)


def prepare_vqgan(vqgan: nn.Module, device: torch.device, precision: str = "fp32", channels_last: bool = True):
    """The VQGAN with ``encode`` / ``decode`` run under ``precision`` (fp32 returns the module itself)."""
    dtype = autocast_dtype(precision)
    vqgan.eval()
    if channels_last and device.type == "cuda":
        vqgan = vqgan.to(memory_format=torch.channels_last)
    if dtype is None:
        return vqgan
    return Autocast(vqgan, device.type, dtype, methods=("encode", "decode"))
