"""Pixel-space steps around the latent model: input conversion, per-path post-processing.

Images here are H x W float arrays in [0, 1] (bone bright); model inputs are B x 1 x S x S in [-1, 1].
``published`` variants follow github.com/diaoquesang/GL-LCM ``batch_lcm_eval.py`` (``reference.*``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np
import torch


def resize_square(img: np.ndarray, size: int, interp=cv2.INTER_AREA) -> np.ndarray:
    """H x W -> size x size float32 (unchanged values when already that size)."""
    if img.shape == (size, size):
        return img.astype(np.float32)
    return cv2.resize(img.astype(np.float32), (size, size), interpolation=interp)


def published_outside(x_norm: np.ndarray) -> np.ndarray:
    """Where the published evaluation zeroes its outputs: ``cxr_copy == 0`` with
    ``cxr_copy = ((x * 0.5 + 0.5) * 255).astype(np.int8)``, x the normalised CXR in [-1, 1]
    (float32). The cast truncates, so this is the CXR's 8-bit level 0 (|value| < 1)."""
    v = (np.asarray(x_norm, dtype=np.float32) * np.float32(0.5) + np.float32(0.5)) * np.float32(255)
    return np.trunc(v) == 0


@dataclass
class ModelInputs:
    """One batch ready for the encoder.

    x: B x 1 x S x S in [-1, 1]; masks: B x 1 x S x S {0, 1} float; cxrs, lung_masks, outside: the
    per-image S x S arrays the post-processing needs (CXR in [0, 1], bool lung mask, bool exposure-free area).
    """

    x: torch.Tensor
    masks: torch.Tensor
    cxrs: list
    lung_masks: list
    outside: list


def model_inputs(cxrs: Sequence[np.ndarray], masks: Sequence[np.ndarray], size: int, published: bool,
                 device) -> ModelInputs:
    """Resize CXRs (H x W in [0, 1], any size) and their bool lung masks to ``size`` and normalise.

    published: 8-bit images, cv2.resize (bilinear) on uint8, ToTensor + Normalize(0.5, 0.5), and the
    exposure test on the truncated 8-bit CXR; ours: float area resize, ``outside = cxr <= 0``.
    """
    mask_s = [resize_square(m.astype(np.float32), size, cv2.INTER_NEAREST) > 0.5 for m in masks]
    if published:
        c8 = [np.clip(np.rint(np.asarray(c, np.float64) * 255), 0, 255).astype(np.uint8) for c in cxrs]
        c8 = [c if c.shape == (size, size) else cv2.resize(c, (size, size)) for c in c8]
        x_norm = [(c.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5) for c in c8]
        cxr_s = [c.astype(np.float32) / 255 for c in c8]
        outside = [published_outside(xn) for xn in x_norm]
        x = torch.from_numpy(np.stack(x_norm))[:, None].to(device)
    else:
        cxr_s = [resize_square(c, size) for c in cxrs]
        outside = [c <= 0 for c in cxr_s]
        x = torch.from_numpy(np.stack(cxr_s))[:, None].to(device) * 2 - 1
    m = torch.from_numpy(np.stack(mask_s).astype(np.float32))[:, None].to(device)
    return ModelInputs(x, m, cxr_s, mask_s, outside)


def to_unit_range(images: torch.Tensor, published: bool) -> np.ndarray:
    """Decoder output B x 1 x S x S in [-1, 1] -> B x S x S float32 numpy in [0, 1].

    published: ``x * 0.5 + 0.5`` without clamping (the mean shift sees the raw values)."""
    if published:
        return images[:, 0].float().cpu().numpy() * np.float32(0.5) + np.float32(0.5)
    return ((images.clamp(-1, 1)[:, 0].float().cpu().numpy() + 1.0) / 2.0).clip(0.0, 1.0)


def postprocess_paths(cxr: np.ndarray, global_img: np.ndarray, local_img: np.ndarray, mask: np.ndarray,
                      mean_shift: str = "ours", outside: Optional[np.ndarray] = None):
    """Shift the local result's mean inside the lung mask onto the global result's, and set both
    to 0 outside the exposure (``outside``, default ``cxr <= 0``).

    mean_shift 'ours': the shift moves the whole local image and is clipped to [0, 1]; zeroing
    is done last so the shift cannot lift those pixels again.
    mean_shift 'published' (``batch_lcm_eval.py``): the global result is zeroed first, the shift
    ``l[m] + mean(g[m]) - mean(l[m])`` (float32, in that order) moves only the mask's pixels and is
    not clipped; then the local result is zeroed.
    """
    outside = cxr <= 0 if outside is None else outside
    m = mask.astype(bool)
    g = global_img.astype(np.float32)
    l = local_img.astype(np.float32)
    if mean_shift == "published":
        g = np.where(outside, np.float32(0), g)
        if m.any():
            l = l.copy()
            l[m] = l[m] + np.mean(g[m]) - np.mean(l[m])
        return g, np.where(outside, np.float32(0), l)
    if m.any():
        l = np.clip(l + (g[m].mean() - l[m].mean()), 0.0, 1.0)
    return np.where(outside, 0.0, g).astype(np.float32), np.where(outside, 0.0, l).astype(np.float32)


def cxr_minus_bone(cxr: np.ndarray, cxr_round_trip: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Ours (``eval.output: cxr_minus_bone``): subtract the model's bone image from the CXR itself.

    The bone image is D(E(CXR)) - prediction, both through the same VQGAN, so what the autoencoder loses of
    the film (fine texture, noise) cancels and stays in the output. All S x S in [0, 1]; returns float32 in [0, 1].
    """
    return np.clip(cxr - (cxr_round_trip - prediction), 0.0, 1.0).astype(np.float32)
