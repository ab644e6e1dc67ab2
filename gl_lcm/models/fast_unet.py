"""Inference-only execution of the UNet with its weights cast ONCE to bf16 / fp16 (ours, not published).

Under autocast every call re-casts every conv / linear weight and bias, and ``GroupNorm32`` casts its
input up to float32 and its output back down: about 2,000 cast operations per call of the paper-sized
UNet, on top of the per-block timestep projections. At sampling batch sizes that per-call overhead
(Python plus one kernel launch per aten operation) bounds the speed. ``FastUNet`` runs the same
network with:

- a private copy of the weights in the low dtype (the trained module is untouched), no autocast;
- group normalisation on the low-precision activations directly (``F.group_norm`` accumulates its
  statistics in float32 on the CPU and on CUDA; only the output is rounded), no casts around it;
- the timestep embedding MLP and ALL the ResBlocks' embedding projections in float32, as ONE matmul per
  call (the projections are concatenated; ``1 + scale`` of scale-shift norm folded into the bias), cast
  once and split into per-block views;
- scale-shift as one ``addcmul``; attention's q / k / v as views of one projection, contiguous in the
  head dimension so that ``scaled_dot_product_attention`` takes its fused kernel;
- output returned as float32 (the sampler's scheduler arithmetic stays fp32).

It computes the function of ``UNet.forward`` (checked against fp32 in tests/test_runtime.py); it is not
meant for training (no gradient, no dropout, no checkpointing).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from gl_lcm.models.layers import AttentionBlock, Downsample, GroupNorm32, ResBlock, Upsample
from gl_lcm.models.unet import UNet, _EmbedSequential

LOW_DTYPES = (torch.bfloat16, torch.float16)


def _norm(norm: GroupNorm32, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm on the low-precision tensor itself (float32 statistics inside the kernel)."""
    return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


def _as_conv2d(conv: nn.Conv1d) -> nn.Conv2d:
    """The 1x1 Conv1d as a 1x1 Conv2d over the H x W map (weight viewed C_out x C_in x 1 x 1)."""
    if conv.kernel_size != (1,) or conv.groups != 1 or conv.stride != (1,) or conv.padding != (0,):
        raise TypeError("FastUNet expects 1x1 Conv1d projections in attention")
    out = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None, device="meta")
    out.weight = nn.Parameter(conv.weight.detach()[..., None], requires_grad=False)
    if conv.bias is not None:
        out.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    return out


class FastUNet(nn.Module):
    """``fn(x_t, t, cond) -> float32`` computing ``unet(x_t, t, cond)`` with weights cast once to ``dtype``."""

    def __init__(self, unet: UNet, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if not isinstance(unet, UNet):
            raise TypeError(f"FastUNet runs gl_lcm.models.unet.UNet, got {type(unet).__name__}")
        if dtype not in LOW_DTYPES:
            raise ValueError(f"dtype must be one of {LOW_DTYPES}, got {dtype}")
        self.dtype = dtype
        # the copy: every parameter / buffer cast while copying (no second float32 copy of the network);
        # the timestep MLP stays float32
        keep32 = {id(p) for p in unet.time_embed.parameters()}
        memo = {}
        for p in unet.parameters():
            memo[id(p)] = nn.Parameter(p.detach().to(torch.float32 if id(p) in keep32 else dtype, copy=True),
                                       requires_grad=False)
        for b in unet.buffers():
            memo[id(b)] = b.detach().to(dtype, copy=True) if b.is_floating_point() else b.detach().clone()
        net = copy.deepcopy(unet, memo).eval()
        # all embedding projections as one float32 matmul: rows of block i, scale rows carry "+1"
        weights, biases, sizes = [], [], []
        for src, blk in list(zip(unet.modules(), net.modules())):  # (the loop drops modules from net)
            if isinstance(blk, ResBlock) and blk.emb_proj is not None:
                w = src.emb_proj.weight.detach().float()
                b = src.emb_proj.bias.detach().float().clone()
                c = blk.out_channels
                if blk.use_scale_shift_norm:
                    b[:c] += 1.0  # the first chunk is the scale: the block uses 1 + scale
                    sizes += [c, c]
                else:
                    sizes += [c]
                blk._fast_slot = len(sizes) - (2 if blk.use_scale_shift_norm else 1)
                weights.append(w)
                biases.append(b)
                blk.emb_proj = None  # its rows live in the concatenated projection
        for blk in [m for m in net.modules() if isinstance(m, AttentionBlock)]:
            blk.qkv, blk.proj_out = _as_conv2d(blk.qkv), _as_conv2d(blk.proj_out)
        for m in net.modules():
            if not isinstance(m, (UNet, _EmbedSequential, nn.ModuleList, nn.Sequential, ResBlock, AttentionBlock,
                                  GroupNorm32, nn.Conv1d, nn.Conv2d, nn.Linear, nn.SiLU, nn.Dropout, nn.Identity,
                                  Upsample, Downsample, nn.AvgPool2d)):
                raise TypeError(f"FastUNet does not know the layer {type(m).__name__}")
        self.net = net
        if weights:
            self.register_buffer("emb_weight_t", torch.cat(weights).t().contiguous(), persistent=False)
            self.register_buffer("emb_bias", torch.cat(biases), persistent=False)
        self.emb_sizes = sizes
        half = net.model_channels // 2
        device = next(net.parameters()).device
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=device) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    # ------------------------------------------------------------------ blocks
    def _res(self, blk: ResBlock, x: torch.Tensor, emb: tuple) -> torch.Tensor:
        h = F.silu(_norm(blk.in_norm, x))
        if blk.h_resample is not None:
            h, x = blk.h_resample(h), blk.x_resample(x)
        h = blk.in_conv(h)
        if hasattr(blk, "_fast_slot"):
            i = blk._fast_slot
            if blk.use_scale_shift_norm:
                h = torch.addcmul(emb[i + 1], _norm(blk.out_norm, h), emb[i])  # shift + norm(h) * (1 + scale)
            else:
                h = _norm(blk.out_norm, h + emb[i])
        else:
            h = _norm(blk.out_norm, h)
        h = blk.out_conv(F.silu(h))
        return h.add_(blk.skip(x))

    @staticmethod
    def _attn(blk: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
        # on the B x C x H x W map itself: group norm over (C / groups, H, W) is the norm over (C / groups,
        # tokens), and the 1x1 Conv1d projections are 1x1 Conv2d with the same weights (see _as_conv2d)
        b, c, hh, ww = x.shape
        heads = blk.num_heads
        qkv = blk.qkv(_norm(blk.norm, x))
        # B x heads x T x hd each (the channel order of layers.multi_head_attention), made contiguous in
        # hd: the fused SDPA kernels (flash on the CPU and CUDA) need stride 1 in the last dimension; the
        # transposed views of the training layer send every call to the unfused math path (~25 operations,
        # with float32 up-casts) instead
        q, k, v = qkv.reshape(b, 3, heads, c // heads, hh * ww).transpose(-1, -2).contiguous().unbind(1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, hh, ww)
        return blk.proj_out(out).add_(x)

    def _seq(self, block: _EmbedSequential, h: torch.Tensor, emb: tuple) -> torch.Tensor:
        for layer in block:
            if isinstance(layer, ResBlock):
                h = self._res(layer, h, emb)
            elif isinstance(layer, AttentionBlock):
                h = self._attn(layer, h)
            else:
                h = layer(h)
        return h

    # ------------------------------------------------------------------ forward
    def _embedding(self, t: torch.Tensor) -> tuple:
        net = self.net
        args = t.float()[:, None] * self.freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if net.model_channels % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        emb = net.time_embed(emb)
        if not self.emb_sizes:
            return ()
        proj = torch.addmm(self.emb_bias, F.silu(emb), self.emb_weight_t)
        return proj.to(self.dtype)[:, :, None, None].split(self.emb_sizes, dim=1)

    @torch.no_grad()
    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        net = self.net
        x, t = net.network_inputs(x_t, t, cond)
        emb = self._embedding(t)
        h = x.to(self.dtype)
        skips = []
        for block in net.input_blocks:
            h = self._seq(block, h, emb)
            skips.append(h)
        h = self._seq(net.middle_block, h, emb)
        for block in net.output_blocks:
            h = self._seq(block, torch.cat([h, skips.pop()], dim=1), emb)
        norm, _, conv = net.out
        return conv(F.silu(_norm(norm, h))).float()
