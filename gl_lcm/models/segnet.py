"""Small U-Net for lung segmentation masks (1 channel in, one logit per lung convention out)."""
from __future__ import annotations

import torch
from torch import nn

from gl_lcm.models.layers import Downsample, ResBlock, Upsample, group_norm


def percentile_normalize(x: torch.Tensor, low: float = 0.01, high: float = 0.99) -> torch.Tensor:
    """Map each image's ``low``/``high`` intensity quantiles to -1/+1 (values beyond are kept, not clipped).

    x: B x C x H x W, any range -> same shape, float. A flat image maps to 0.
    """
    flat = x.float().flatten(1)
    q = torch.quantile(flat, torch.tensor([low, high], device=x.device), dim=1)  # 2 x B
    lo, hi = q[0].view(-1, 1, 1, 1), q[1].view(-1, 1, 1, 1)
    return ((2 * x.float() - lo - hi) / (hi - lo).clamp_min(1e-6)).to(x.dtype)


class LungSegNet(nn.Module):
    """U-Net with one ResBlock per level, strided-conv down / conv up, skip concatenation.

    Args:
        in_channels: image channels (1).
        out_channels: logit channels, one per lung convention (see ``segmentation.outputs``).
        base_channels: width of the first level (16 or 32); level i has
            ``base_channels * min(2**i, 8)``.
        depth: number of 2x downsamplings; input H and W must be divisible by ``2**depth``.
        normalize_input: map each image's 1st-99th percentiles to [-1, 1] first
            (:func:`percentile_normalize`), so exposure and window do not matter.

    forward(x: B x 1 x H x W in [-1, 1]) -> B x out_channels x H x W logits (sigmoid > 0.5 = lung).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 16, depth: int = 4,
                 normalize_input: bool = False):
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.depth, self.normalize_input = depth, normalize_input
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
        if self.normalize_input:
            x = percentile_normalize(x)
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
