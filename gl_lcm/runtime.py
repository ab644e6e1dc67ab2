"""How the inference networks run: numeric precision (autocast), memory format, compilation.

Ours, not published (the published code samples in fp32). ``eval.precision`` sets the autocast dtype
of the denoiser (UNet) and ``eval.vqgan_precision`` that of the VQGAN (fp32 by default: the decoder
writes the output pixels). Outputs of a wrapped network are always float32, so the sampler's
scheduler arithmetic stays in fp32. With ``fp32`` the networks are returned unwrapped, so results
are bit-for-bit those of the plain modules.

``bf16_weights`` / ``fp16_weights`` (UNet only) skip autocast: a copy of the UNet with its weights cast
ONCE runs without per-call casts (gl_lcm.models.fast_unet.FastUNet; 0.31 of autocast's aten operations
per call of the paper UNet, 4 casts instead of 1,748: benchmarks/bench_unet_dispatch.py). ``cuda_graphs`` additionally captures the
fixed-shape sampling call with ``torch.compile(mode="reduce-overhead")`` (CUDA only).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# the denoiser's weights cast once (no autocast): FastUNet
WEIGHT_PRECISIONS = ("bf16_weights", "fp16_weights")
_WEIGHT_DTYPES = {"bf16_weights": torch.bfloat16, "fp16_weights": torch.float16}
DENOISER_PRECISIONS = PRECISIONS + WEIGHT_PRECISIONS


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


def cast_for_inference(unet: nn.Module, dtype: torch.dtype | str = torch.bfloat16) -> nn.Module:
    """A copy of ``unet`` with its weights cast once to ``dtype``, run without autocast (``FastUNet``).

    ``dtype``: torch.bfloat16 / torch.float16, or "bf16" / "fp16" / "bf16_weights" / "fp16_weights".
    Called as ``fn(x_t, t, cond)``, it returns float32; ``unet`` itself is left as it is (dtype, mode).
    """
    from gl_lcm.models.fast_unet import FastUNet

    if isinstance(dtype, str):
        names = {**{k: v for k, v in _DTYPES.items() if v is not None}, **_WEIGHT_DTYPES}
        if dtype not in names:
            raise ValueError(f"unknown inference dtype {dtype!r}; valid: {', '.join(names)}")
        dtype = names[dtype]
    return FastUNet(unet, dtype).eval()


class CudaGraphDenoiser(nn.Module):
    """``torch.compile(fn, mode="reduce-overhead")``: CUDA graphs replay a fixed-shape sampling call.

    Each call starts a new cudagraph step and returns a clone of the graph's output buffer, so an output
    kept by the sampler is not overwritten by the next call. A new input shape records a new graph.
    """

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.compiled = torch.compile(fn, mode="reduce-overhead", dynamic=False)

    def forward(self, *args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(*args, **kwargs).clone()


def prepare_denoiser(unet: nn.Module, device: torch.device, precision: str = "fp32", compile: bool = False,
                     channels_last: bool = True, cuda_graphs: bool = False):
    """The UNet as the sampler should call it: ``fn(x, t, cond) -> eps`` (B x C x h x w float32).

    ``precision``: fp32 (the module itself), bf16 / fp16 (autocast), or bf16_weights / fp16_weights
    (``cast_for_inference``: a copy with weights cast once, no autocast; ``unet`` stays as it is).
    channels_last applies on CUDA only (no gain on the CPU). ``compile`` wraps the UNet in
    torch.compile with static shapes (a sampling run calls it with one shape; the first call compiles).
    ``cuda_graphs`` wraps the whole call in ``CudaGraphDenoiser`` on CUDA (ignored elsewhere, with a
    warning); it replaces ``compile``.
    """
    if precision in WEIGHT_PRECISIONS:
        unet.eval()
        fn = cast_for_inference(unet, precision)
        if channels_last and device.type == "cuda":
            fn = fn.to(memory_format=torch.channels_last)
        if compile and not cuda_graphs:
            fn = torch.compile(fn, dynamic=False)
        return _with_cuda_graphs(fn, device, cuda_graphs)
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(DENOISER_PRECISIONS)}")
    dtype = autocast_dtype(precision)
    unet.eval()
    if channels_last and device.type == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    if compile and not cuda_graphs:
        unet = torch.compile(unet, dynamic=False)
    if dtype is None:
        return _with_cuda_graphs(unet, device, cuda_graphs)
    return _with_cuda_graphs(Autocast(unet, device.type, dtype), device, cuda_graphs)


def _with_cuda_graphs(fn: nn.Module, device: torch.device, cuda_graphs: bool) -> nn.Module:
    if not cuda_graphs:
        return fn
    if device.type != "cuda":
        warnings.warn(f"cuda_graphs needs a CUDA device; running on {device.type} without them", stacklevel=3)
        return fn
    return CudaGraphDenoiser(fn)


class CompiledCodec:
    """``encode`` / ``decode`` of a VQGAN (or its Autocast wrapper) compiled with static shapes; the
    original stays reachable as ``module``."""

    def __init__(self, codec):
        self.module = codec
        self.encode = torch.compile(codec.encode, dynamic=False)
        self.decode = torch.compile(codec.decode, dynamic=False)


def prepare_vqgan(vqgan: nn.Module, device: torch.device, precision: str = "fp32", channels_last: bool = True,
                  compile: bool = False):
    """The VQGAN with ``encode`` / ``decode`` run under ``precision`` (fp32 returns the module itself);
    ``compile`` compiles both methods with static shapes (eval.compile: the sampling runs one shape per batch)."""
    dtype = autocast_dtype(precision)
    vqgan.eval()
    if channels_last and device.type == "cuda":
        vqgan = vqgan.to(memory_format=torch.channels_last)
    codec = vqgan if dtype is None else Autocast(vqgan, device.type, dtype, methods=("encode", "decode"))
    return CompiledCodec(codec) if compile else codec
