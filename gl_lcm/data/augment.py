"""Film augmentation for segmentation training: geometry, exposure and the clutter of clinical films.

Pure tensor functions driven by a ``torch.Generator``, so a resumed run draws the same
augmentations (the trainer's generator is checkpointed). Masks move with the image.
"""
from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from gl_lcm.utils import seeding

MARKER_TEXTS = ("L", "R", "PA", "AP", "PORTABLE", "SUPINE", "ERECT", "12:41")


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * seeding.rand(n, g).cpu()


@lru_cache(maxsize=None)
def marker_glyph(text: str) -> torch.Tensor:
    """h x w float tensor in {0, 1}: ``text`` drawn with OpenCV's plain font (a burned-in film marker)."""
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 1.0, 2)
    canvas = np.zeros((h + base + 4, w + 4), np.uint8)
    cv2.putText(canvas, text, (2, h + 2), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 255, 2, cv2.LINE_AA)
    return torch.from_numpy(canvas.astype(np.float32) / 255.0)


def random_affine(images: torch.Tensor, masks: torch.Tensor, g: torch.Generator, max_rotation: float = 10.0,
                  scale_range: tuple = (0.8, 1.25), max_shift: float = 0.08) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (degrees), zoom and shift each sample; the area brought in takes the film's edge values.

    images: B x 1 x H x W; masks: B x K x H x W in {0, 1} -> same shapes (masks re-binarised at 0.5).
    """
    b = images.shape[0]
    angle = _uniform(b, -max_rotation, max_rotation, g) * math.pi / 180
    scale = torch.exp(_uniform(b, math.log(scale_range[0]), math.log(scale_range[1]), g))
    shift = _uniform(2 * b, -max_shift, max_shift, g).view(b, 2) * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    moved = F.grid_sample(masks.float(), grid.to(masks.device, torch.float32), mode="bilinear",
                          padding_mode="zeros", align_corners=False)
    return out, (moved > 0.5).to(masks.dtype)


def random_exposure(images01: torch.Tensor, g: torch.Generator, gamma_range: tuple = (0.6, 1.6),
                    contrast_range: tuple = (0.6, 1.3), noise_std: float = 0.02) -> torch.Tensor:
    """Gamma, contrast/brightness and a little noise per sample: B x 1 x H x W in [0, 1] -> [0, 1]."""
    b = images01.shape[0]
    view = (b, 1, 1, 1)
    gamma = torch.exp(_uniform(b, math.log(gamma_range[0]), math.log(gamma_range[1]), g)).view(view)
    contrast = _uniform(b, *contrast_range, g).view(view)
    offset = _uniform(b, -0.1, 0.1, g).view(view)
    x = images01.clamp(0, 1) ** gamma.to(images01)
    x = (x - 0.5) * contrast.to(x) + 0.5 + offset.to(x)
    noise = seeding.randn(images01.shape, g, x.device).to(x) * noise_std
    return (x + noise).clamp(0, 1)


def random_borders_and_marks(images01: torch.Tensor, g: torch.Generator, border_prob: float = 0.4,
                             max_border: float = 0.12, marks_prob: float = 0.6) -> torch.Tensor:
    """Collimation borders (dark or bright strips on some sides) and burned-in text markers.

    B x 1 x H x W in [0, 1] -> same; the lung masks are left as they are (borders stay narrow).
    """
    x = images01.clone()
    b, _, h, w = x.shape
    for i in range(b):
        if float(seeding.rand(1, g)) < border_prob:
            value = 0.0 if float(seeding.rand(1, g)) < 0.6 else 1.0
            sides = seeding.rand(4, g).cpu() < 0.5
            widths = (_uniform(4, 0.01, max_border, g) * torch.tensor([h, h, w, w])).long()
            if sides[0]:
                x[i, :, : widths[0]] = value
            if sides[1]:
                x[i, :, h - widths[1]:] = value
            if sides[2]:
                x[i, :, :, : widths[2]] = value
            if sides[3]:
                x[i, :, :, w - widths[3]:] = value
        if float(seeding.rand(1, g)) < marks_prob:
            n = int(seeding.randint(1, 4, (1,), g))
            for _ in range(n):
                k = int(seeding.randint(0, len(MARKER_TEXTS), (1,), g))
                glyph = marker_glyph(MARKER_TEXTS[k])
                height = max(4, int(h * float(_uniform(1, 0.03, 0.08, g))))
                width = min(w - 1, max(2, round(glyph.shape[1] * height / glyph.shape[0])))
                glyph = F.interpolate(glyph[None, None], size=(height, width), mode="bilinear",
                                      align_corners=False)[0, 0].to(x)
                top = int(seeding.randint(0, h - height, (1,), g))
                left = int(seeding.randint(0, w - width, (1,), g))
                patch = x[i, 0, top:top + height, left:left + width]
                x[i, 0, top:top + height, left:left + width] = torch.maximum(patch, glyph)
    return x


def augment_films(images: torch.Tensor, masks: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine, exposure, borders and marks (no left-right flip: the heart is on the left).

    images: B x 1 x H x W in [-1, 1]; masks: B x K x H x W in {0, 1} -> same shapes and ranges.
    """
    images, masks = random_affine(images, masks, g)
    x01 = random_borders_and_marks(random_exposure((images + 1) / 2, g), g)
    return x01 * 2 - 1, masks
