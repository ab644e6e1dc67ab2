"""PatchGAN discriminator (pix2pix ``NLayerDiscriminator``) for 1-channel images.

The published GL-LCM VQGAN training uses MONAI's ``PatchDiscriminator(num_layers_d=3,
num_channels=64)`` with BatchNorm and least-squares adversarial losses; this is the same
architecture family. Under DDP with BatchNorm, convert it with
``nn.SyncBatchNorm.convert_sync_batchnorm`` (the trainer's job) or pick ``norm="group"``.
"""
from __future__ import annotations

from torch import nn
import torch


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=False)
    if norm == "group":
        return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r} (choose batch, instance, group or none)")


class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN: (n_layers) stride-2 4x4 convs, one stride-1 conv, 1-channel logit map.

    Args:
        in_channels: image channels (1).
        base_channels: width of the first conv (64); doubles per layer up to 8x.
        n_layers: number of stride-2 convs (3 -> 70x70 receptive field).
        norm: "batch" (pix2pix default), "instance", "group" or "none".

    forward(x: B x in x H x W in [-1, 1]) -> B x 1 x H' x W' raw logits, where for n_layers=3
    H' = H / 8 - 2 (e.g. 256 -> 30).
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        # a bias is redundant before an affine norm; keep it when the norm has no affine shift
        use_bias = norm in ("instance", "none")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride=stride, padding=1, bias=use_bias),
                _norm_layer(norm, base_channels * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _init_weights(m: nn.Module) -> None:
    # pix2pix / taming initialisation: N(0, 0.02) convs, N(1, 0.02) norm scales
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
