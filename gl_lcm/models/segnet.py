"""Small U-Net for lung segmentation masks (1 channel in, 1 logit out)."""
from __future__ import annotations

import torch
from torch import nn

from gl_lcm.models.layers import Downsample, ResBlock, Upsample, group_norm


class LungSegNet(nn.Module):
    """U-Net with one ResBlock per level, strided-conv down / conv up, skip concatenation.

    Args:
        in_channels: image channels (1).
        out_channels: logit channels (1: lung vs background).
        base_channels: width of the first level (16 or 32); level i has
            ``base_channels * min(2**i, 8)``.
        depth: number of 2x downsamplings; input H and W must be divisible by ``2**depth``.

    forward(x: B x 1 x H x W in [-1, 1]) -> B x 1 x H x W logits (sigmoid > 0.5 = lung).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 16, depth: int = 4):
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.depth = depth
        widths = [base_channels * min(2**i, 8) for i in range(depth + 1)]
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.enc = nn.ModuleList(ResBlock(widths[i]) for i in range(depth))
        self.down = nn.ModuleList(Downsample(widths[i], out_channels=widths[i + 1]) for i in range(depth))
        self.bottom = ResBlock(widths[depth], widths[depth])
        self.up = nn.ModuleList(Upsample(widths[i + 1], out_channels=widths[i]) for i in range(depth))
        self.dec = nn.ModuleList(ResBlock(2 * widths[i], widths[i]) for i in range(depth))
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = 2**self.depth
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be divisible by {f}")
        h = self.conv_in(x)
        skips = []
        for i in range(self.depth):
            h = self.enc[i](h)
            skips.append(h)
            h = self.down[i](h)
        h = self.bottom(h)
        for i in reversed(range(self.depth)):
            h = self.dec[i](torch.cat([self.up[i](h), skips[i]], dim=1))
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))
