"""Shared network blocks for the VQGAN, the latent UNet and the lung segmentation net.

Style follows guided-diffusion (ADM): GroupNorm computed in float32, ResBlocks with an
optional timestep embedding injected either additively or as scale-shift of the second
norm, optional 2x up/down inside the ResBlock, multi-head self-attention over spatial
positions, and zero-initialised output projections so every residual branch starts as
the identity.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero in place and return it.

    Used on the last layer of residual branches so a freshly built network is the identity
    on those branches (stable start for deep UNets).
    """
    for p in module.parameters():
        p.detach().zero_()
    return module


def num_groups_for(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= ``max_groups`` that divides ``channels`` (1 for odd primes)."""
    if channels <= 0:
        raise ValueError(f"channels must be positive, got {channels}")
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in at least float32 (stable under fp16/bf16 autocast; float64 stays
    float64), output in input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32))).type(x.dtype)


def group_norm(channels: int, max_groups: int = 32, eps: float = 1e-5) -> GroupNorm32:
    """GroupNorm with 32 groups, or fewer when ``channels`` is small / not divisible by 32."""
    return GroupNorm32(num_groups_for(channels, max_groups), channels, eps=eps)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, ADM convention.

    Args:
        timesteps: shape (B,) integer or float timesteps (e.g. in [0, 1000)); a 0-d tensor
            is treated as one timestep.
        dim: embedding width.
        max_period: lowest frequency is 1 / max_period.

    Returns:
        B x dim float32 tensor ``[cos(t * f_0..f_{h-1}), sin(t * f_0..f_{h-1})]`` with
        ``f_i = max_period ** (-i / h)``, ``h = dim // 2`` (a zero column is appended when dim is odd).
    """
    t = timesteps.reshape(-1).float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv.

    B x C x H x W -> B x C_out x 2H x 2W (C_out = C without conv).
    """

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if not use_conv and self.out_channels != channels:
            raise ValueError("Upsample without conv cannot change the channel count")
        self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class Downsample(nn.Module):
    """2x downsampling: strided 3x3 conv, or 2x2 average pooling without conv.

    B x C x H x W -> B x C_out x H/2 x W/2 (H, W even).
    """

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without conv cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block: norm-SiLU-conv, [+timestep embedding], norm-SiLU-dropout-conv(zero init).

    Args:
        in_channels / out_channels: channel counts (out defaults to in); a 1x1 conv maps the
            skip path when they differ.
        emb_channels: width of the timestep embedding; None builds a block without one.
        dropout: dropout probability before the last conv.
        use_scale_shift_norm: inject the embedding as ``norm(h) * (1 + scale) + shift``
            (ADM) instead of adding it before the second norm.
        up / down: resample 2x inside the block (nearest / average pool on both paths, ADM
            ``resblock_updown``).
        use_checkpoint: recompute activations in backward (torch.utils.checkpoint, non-reentrant).

    forward(x: B x in x H x W, emb: B x emb_channels or None) -> B x out x H' x W'.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        emb_channels: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if up and down:
            raise ValueError("a ResBlock cannot both upsample and downsample")
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_norm = group_norm(in_channels)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if up:
            self.h_resample, self.x_resample = Upsample(in_channels, False), Upsample(in_channels, False)
        elif down:
            self.h_resample, self.x_resample = Downsample(in_channels, False), Downsample(in_channels, False)
        else:
            self.h_resample = self.x_resample = None
        if emb_channels is not None:
            self.emb_proj = nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        else:
            if use_scale_shift_norm:
                raise ValueError("use_scale_shift_norm needs emb_channels")
            self.emb_proj = None
        self.out_norm = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        if self.h_resample is not None:
            # resample after the activation, before the conv (ADM ordering)
            h = self.h_resample(h)
            x = self.x_resample(x)
        h = self.in_conv(h)
        if self.emb_proj is not None:
            if emb is None:
                raise ValueError("this ResBlock was built with a timestep embedding; pass emb")
            e = self.emb_proj(F.silu(emb)).type(h.dtype)[:, :, None, None]
            if self.use_scale_shift_norm:
                scale, shift = e.chunk(2, dim=1)
                h = self.out_norm(h) * (1 + scale) + shift
            else:
                h = self.out_norm(h + e)
        else:
            h = self.out_norm(h)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head softmax attention over tokens with F.scaled_dot_product_attention.

    Args:
        q, k, v: B x C x T (channels first, T tokens); C divisible by num_heads.
        num_heads: heads; each uses C / num_heads channels and scale 1/sqrt(C / num_heads).

    Returns:
        B x C x T.
    """
    b, c, t = q.shape
    if c % num_heads:
        raise ValueError(f"channels {c} not divisible by num_heads {num_heads}")
    hd = c // num_heads

    def split(z: torch.Tensor) -> torch.Tensor:  # B x C x T -> B x heads x T x hd
        return z.reshape(b, num_heads, hd, z.shape[-1]).transpose(-1, -2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(-1, -2).reshape(b, c, t)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection (ADM ``AttentionBlock``, new qkv order).

    Args:
        channels: C.
        num_heads: heads, used when ``num_head_channels`` is None.
        num_head_channels: if set, heads = C / num_head_channels.
        use_checkpoint: gradient checkpointing.

    forward(x: B x C x H x W) -> B x C x H x W. q, k, v come from one 1x1 projection of the
    group-normalised input, split in that order into three C-wide chunks; output projection is
    zero-initialised.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int | None = None,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if num_head_channels is not None and num_head_channels > 0:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.channels, self.num_heads = channels, num_heads
        self.use_checkpoint = use_checkpoint
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h * w)
        q, k, v = self.qkv(self.norm(tokens)).chunk(3, dim=1)
        out = self.proj_out(multi_head_attention(q, k, v, self.num_heads))
        return (tokens + out).reshape(b, c, h, w)
