"""The published lung segmentation model of the ``lungs-segmentation`` package, for its weights file.

Published: Alimbekov, Vassilenko, Turlassov, ``lungs-segmentation`` (MIT), github.com/alimbekovKZ/
lungs_segmentation; weights ``resnet34.pth`` released at :data:`RESNET34_URL` (103 MB; the package
reports a validation Dice of 0.9657). Its ResNet34 U-Net comes from Selim Seferbekov's encoder-decoder
zoo, not from segmentation_models_pytorch, so it is re-written here (our code, torchvision's ResNet34
as the encoder) with the same module names, so that the released state dict loads as is:

- ``encoder_stages``: [conv1-bn1-relu] (stride 2, 64 ch), [maxpool, layer1] (4, 64), layer2 (8, 128),
  layer3 (16, 256), layer4 (32, 512);
- ``decoder_stages[k].layer`` = nearest x2 upsample, 3x3 conv + bias, ReLU: 128->64, 256->128,
  256->256, 512->256 for k = 0..3, applied from k = 3 down;
- ``bottlenecks[i].seq`` = 3x3 conv + ReLU on [decoder, encoder skip]: 512->256, 384->256, 192->128,
  128->64;
- ``last_upsample.layer`` (64->64, back to full size) and ``final`` (1x1 conv, 64->2: the two lungs).

Inference as published (``lungs_segmentation.inference``): the gray image as 3 equal channels, min-max
scaled to [0, 1], resized to 512 x 512 (bilinear), sigmoid of the 2 output channels, > 0.2.
Nothing is downloaded at run time: the user supplies the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch
from torch import nn

PathLike = Union[str, os.PathLike]

RESNET34_URL = "https://github.com/alimbekovKZ/lungs_segmentation/releases/download/1.0.0/resnet34.pth"
INPUT_SIZE = 512  # as published
THRESHOLD = 0.2  # as published


class _DecoderBlock(nn.Module):
    """x2 nearest upsample, 3x3 conv, ReLU (``layer.1`` holds the conv, as in the released weights)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.layer = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(in_channels, out_channels, 3, padding=1),
                                   nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class _SkipBlock(nn.Module):
    """3x3 conv + ReLU on the concatenation [decoder features, encoder skip]."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True))

    def forward(self, dec: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        return self.seq(torch.cat([dec, enc], dim=1))


class PublishedLungsUNet(nn.Module):
    """ResNet34 U-Net of ``lungs-segmentation``: B x 3 x H x W in [0, 1] -> B x 2 x H x W logits.

    H and W must be multiples of 32 (the published input is 512 x 512).
    """

    ENCODER_CHANNELS = (64, 64, 128, 256, 512)
    DECODER_CHANNELS = (64, 128, 256, 256)

    def __init__(self, num_classes: int = 2):
        super().__init__()
        from torchvision.models import resnet34

        r = resnet34(weights=None)
        self.encoder_stages = nn.ModuleList([
            nn.Sequential(r.conv1, r.bn1, r.relu),
            nn.Sequential(r.maxpool, r.layer1),
            r.layer2,
            r.layer3,
            r.layer4,
        ])
        enc, dec = self.ENCODER_CHANNELS, self.DECODER_CHANNELS
        self.decoder_stages = nn.ModuleList([
            _DecoderBlock(enc[k + 1] if k + 1 == len(dec) else dec[k + 1], dec[k]) for k in range(len(dec))
        ])
        self.bottlenecks = nn.ModuleList([
            _SkipBlock(enc[-i - 2] + f, f) for i, f in enumerate(reversed(dec))
        ])
        self.last_upsample = _DecoderBlock(dec[0], dec[0])
        self.final = nn.Sequential(nn.Conv2d(dec[0], num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stage in self.encoder_stages:
            x = stage(x)
            skips.append(x)
        for i, skip_block in enumerate(self.bottlenecks):
            k = len(self.decoder_stages) - 1 - i
            x = skip_block(self.decoder_stages[k](x), skips[k])
        return self.final(self.last_upsample(x))


def load_published_lungseg(path: PathLike, device: Union[str, torch.device] = "cpu") -> PublishedLungsUNet:
    """The published model with the weights of the user-supplied ``resnet34.pth`` (state dict), in eval mode.

    Loaded with ``torch.load(weights_only=True)``. A missing file raises FileNotFoundError naming it,
    where the package's releases publish it, and the config key to point at it.
    """
    given = str(path or "")
    path = Path(given)
    if not given or not path.is_file():
        shown = given if given else "(checkpoints.lungs_segmentation is empty)"
        raise FileNotFoundError(
            f"published lung segmentation weights not found: {shown}. segmentation.method 'pretrained' runs the "
            f"lungs-segmentation package's ResNet34 U-Net from its file resnet34.pth, published in the "
            f"package's GitHub releases: {RESNET34_URL} (nothing is downloaded at run time). Download it, "
            "put it e.g. at checkpoints/lungs_segmentation_resnet34.pth and set "
            "checkpoints.lungs_segmentation=<that path>")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot load {path} as a state dict with weights_only=True "
                         f"({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    model = PublishedLungsUNet()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} is not the lungs-segmentation resnet34 state dict: {exc}") from exc
    return model.to(device).eval()
