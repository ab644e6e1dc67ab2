"""Lung-mask post-processing, checks, overlays and Dice.

Post-processing: binarise the network output at probability 0.5 (ours; the published masks
came from the ``lungs-segmentation`` package's pretrained ResNet34 U-Net with sigmoid > 0.2,
``codes/lungSegmentation.ipynb``), then drop connected components smaller than 100 pixels at
1024 x 1024 (the published evaluation does this to the mask before fusion,
``batch_lcm_eval.py``); here that area is scaled with the image size
(``round(100 * H * W / 1024**2)``) so the rule means the same at every resolution.
A mask that ends up empty or implausibly small raises :class:`NoLungFoundError`
instead of silently feeding an empty lung region to the local diffusion path.
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

REFERENCE_SIDE = 1024
REFERENCE_MIN_AREA = 100
# A frontal CXR whose lungs cover less than this fraction of the image is not plausible.
MIN_LUNG_FRACTION = 0.01


class NoLungFoundError(ValueError):
    """No plausible lung field was found in an image (blank, non-chest or failed segmentation)."""


def _describe(name: Optional[str]) -> str:
    return f" in image {name!r}" if name else ""


def scaled_min_area(shape: tuple, min_area: Optional[int] = None) -> int:
    """Minimum component area in pixels for an image of ``shape`` (H, W, ...).

    ``round(100 * H * W / 1024**2)`` (100 px at 1024 x 1024), unless ``min_area`` overrides it.
    """
    if min_area is not None:
        if min_area < 0:
            raise ValueError(f"min_area must be >= 0, got {min_area}")
        return int(min_area)
    height, width = int(shape[0]), int(shape[1])
    return int(round(REFERENCE_MIN_AREA * height * width / (REFERENCE_SIDE * REFERENCE_SIDE)))


def binarize(prob_or_mask: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """H x W probabilities in [0, 1] (or a bool mask) -> bool mask (``p > threshold``; bools pass through)."""
    arr = np.asarray(prob_or_mask)
    if arr.ndim != 2:
        raise ValueError(f"mask must be 2-D H x W, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.copy()
    return arr.astype(np.float64) > threshold


def remove_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop 8-connected components of a bool H x W mask with fewer than ``min_area`` pixels."""
    mask_u8 = np.asarray(mask, dtype=bool).astype(np.uint8)
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(mask_u8, connectivity=8)
    keep = np.zeros(n_labels, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return keep[labels]


def check_lung_mask(mask: np.ndarray, name: Optional[str] = None,
                    min_fraction: float = MIN_LUNG_FRACTION) -> np.ndarray:
    """Raise :class:`NoLungFoundError` when a bool H x W mask is empty or covers < ``min_fraction``; return it."""
    fraction = float(np.mean(mask)) if mask.size else 0.0
    if fraction == 0.0:
        raise NoLungFoundError(f"no lung found{_describe(name)}: the lung mask is empty")
    if fraction < min_fraction:
        raise NoLungFoundError(
            f"no plausible lung found{_describe(name)}: the lung mask covers {100 * fraction:.2f}% "
            f"of the image (< {100 * min_fraction:.0f}%)")
    return mask


def postprocess_mask(prob_or_mask: np.ndarray, *, threshold: float = 0.5, min_area: Optional[int] = None,
                     name: Optional[str] = None) -> np.ndarray:
    """Binarise, drop small components, check plausibility.

    Args:
        prob_or_mask: H x W probabilities in [0, 1] or a bool mask.
        threshold: probability threshold (0.5, ours; the published notebook used 0.2 with its own network).
        min_area: component-size override in pixels (default: scaled 100 px at 1024^2).
        name: image name used in the error message.

    Returns:
        bool H x W mask. Raises :class:`NoLungFoundError` when it is empty or covers
        less than 1 % of the image.
    """
    mask = binarize(prob_or_mask, threshold)
    mask = remove_small_components(mask, scaled_min_area(mask.shape, min_area))
    return check_lung_mask(mask, name)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient 2|A and B| / (|A| + |B|) of two H x W masks (nonzero = inside); 1.0 when both are empty."""
    a_bool = np.asarray(a) > 0
    b_bool = np.asarray(b) > 0
    if a_bool.shape != b_bool.shape:
        raise ValueError(f"mask shapes differ: {a_bool.shape} vs {b_bool.shape}")
    total = int(a_bool.sum()) + int(b_bool.sum())
    if total == 0:
        return 1.0
    return 2.0 * float(np.logical_and(a_bool, b_bool).sum()) / total


def mask_overlay(image01: np.ndarray, mask: np.ndarray, color: tuple = (0, 255, 0), thickness: Optional[int] = None,
                 fill_alpha: float = 0.15) -> np.ndarray:
    """Draw a mask's outline (and a light tint) on a grey CXR.

    Args:
        image01: H x W float image in [0, 1].
        mask: H x W mask (nonzero = lung).
        color: outline colour, in the output's channel order.
        thickness: outline width in pixels (default ~ H / 256, at least 1).
        fill_alpha: opacity of the tint inside the mask (0 = outline only).

    Returns:
        H x W x 3 uint8 image (BGR order as OpenCV writes it; ``color`` in that order).
    """
    image = np.asarray(image01, dtype=np.float64)
    mask_bool = np.asarray(mask) > 0
    if image.ndim != 2 or mask_bool.shape != image.shape:
        raise ValueError(f"need a 2-D image and a mask of the same shape, got {image.shape} and {mask_bool.shape}")
    grey = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    overlay = np.repeat(grey[:, :, None], 3, axis=2)
    if fill_alpha > 0 and mask_bool.any():
        tint = np.array(color, dtype=np.float64)
        overlay[mask_bool] = np.clip((1 - fill_alpha) * overlay[mask_bool] + fill_alpha * tint, 0, 255).astype(np.uint8)
    if thickness is None:
        thickness = max(1, int(round(image.shape[0] / 256)))
    contours, _ = cv2.findContours(mask_bool.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(overlay, contours, -1, tuple(int(c) for c in color), thickness, cv2.LINE_8)
    return overlay
