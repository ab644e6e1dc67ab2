"""Lung masks from a trained segmentation network or from a folder, and the single entry point.

``segment_lungs(image01, method, ...)`` dispatches on ``method``:

- ``"classical"``: training-free image processing (:mod:`gl_lcm.segmentation.classical`);
- ``"unet"``: a segmentation net (any ``nn.Module`` mapping B x 1 x H x W in [-1, 1] to
  B x K x H x W logits, e.g. :class:`gl_lcm.models.segnet.LungSegNet`); ``channel`` picks one of
  its K outputs, one per lung convention (``segmentation.outputs``: visible / full);
- ``"folder"``: precomputed masks ``<mask_dir>/<stem>.png`` (e.g. a dataset's ``Mask/``);
- ``"pretrained"``: the ``lungs-segmentation`` package's published ResNet34 U-Net
  (:mod:`gl_lcm.models.published_lungseg`), run as published (512 px, sigmoid > 0.2).

All four return a bool H x W mask after the same post-processing and raise
:class:`~gl_lcm.segmentation.postprocess.NoLungFoundError` when no plausible lung is found.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from torch import nn

from gl_lcm.segmentation.classical import segment_lungs_classical
from gl_lcm.segmentation.postprocess import postprocess_mask

PathLike = Union[str, os.PathLike]
# "auto" (the config's default) is resolved by gl_lcm.inference.segmenter: the lung U-Net when one is
# trained, else "classical"; segment_lungs itself takes the concrete methods
SEGMENTATION_METHODS: Tuple[str, ...] = ("auto", "classical", "unet", "folder", "pretrained")
MASK_EXTENSIONS: Tuple[str, ...] = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


def _check_image(image01: np.ndarray) -> np.ndarray:
    image = np.asarray(image01, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"image must be a 2-D H x W array in [0, 1], got shape {image.shape}")
    return image


@torch.no_grad()
def predict_lung_probabilities(model: nn.Module, images01: Sequence[np.ndarray], image_size: int = 256,
                               device: Union[str, torch.device] = "cpu", channel: int = 0) -> List[np.ndarray]:
    """Lung probability maps of several films from ONE forward pass of a segmentation net.

    Args:
        model: ``nn.Module`` taking B x 1 x S x S in [-1, 1] and returning B x K x S x S logits.
        images01: H_i x W_i float images in [0, 1] (sizes may differ: each is resized to S x S, area).
        image_size: the net's input side S.
        device: where to run the net (the model is expected to live there already).
        channel: which of the K outputs (lung conventions, ``segmentation.outputs``) to return.

    Returns:
        One H_i x W_i float32 probability map in [0, 1] per image (sigmoid, resized back bilinearly).
    """
    images = [_check_image(im) for im in images01]
    small = np.stack([cv2.resize(im, (int(image_size), int(image_size)), interpolation=cv2.INTER_AREA)
                      for im in images])
    x = torch.from_numpy(small * 2.0 - 1.0)[:, None].to(device)
    param = next(model.parameters(), None)
    if param is not None and param.is_floating_point():
        x = x.to(param.dtype)
    logits = _forward_in_eval_mode(model, x)
    n = len(images)
    if logits.shape[-2:] != (image_size, image_size) or logits.shape[0] != n or not 0 <= channel < logits.shape[1]:
        raise ValueError(f"segmentation net returned shape {tuple(logits.shape)}, expected ({n}, K > {channel}, "
                         f"{image_size}, {image_size})")
    probs = torch.sigmoid(logits[:, channel].float()).cpu().numpy()
    return [cv2.resize(p, (im.shape[1], im.shape[0]), interpolation=cv2.INTER_LINEAR).astype(np.float32)
            for p, im in zip(probs, images)]


def predict_lung_probability(model: nn.Module, image01: np.ndarray, image_size: int = 256,
                             device: Union[str, torch.device] = "cpu", channel: int = 0) -> np.ndarray:
    """H x W float32 lung probabilities of one film (:func:`predict_lung_probabilities` of a batch of one)."""
    return predict_lung_probabilities(model, [image01], image_size, device, channel)[0]


def segment_lungs_learned(model: nn.Module, image01: np.ndarray, image_size: int = 256,
                          device: Union[str, torch.device] = "cpu", *, name: Optional[str] = None,
                          min_area: Optional[int] = None, channel: int = 0) -> np.ndarray:
    """Lung mask from a segmentation net: resize, sigmoid, resize back, threshold 0.5, post-process.

    Args:
        model, image01, image_size, device, channel: as :func:`predict_lung_probability`.
        name: image name for error messages.
        min_area: small-component override (default 100 px at 1024^2, scaled).

    Returns:
        bool H x W mask. Raises NoLungFoundError for an empty or implausibly small mask.
    """
    prob = predict_lung_probability(model, image01, image_size, device, channel)
    return postprocess_mask(prob, threshold=0.5, min_area=min_area, name=name)


def convention_channel(outputs, convention: str, checkpoint: PathLike) -> int:
    """Index of ``convention`` among a segmentation net's ``outputs`` (its ``segmentation.outputs``).

    Raises ValueError naming the checkpoint, the convention and what the net predicts.
    """
    if convention not in outputs:
        raise ValueError(f"segmentation.convention={convention} but the U-Net {checkpoint} predicts only "
                         f"{list(outputs)}: set segmentation.convention to one of them or train a net with that output")
    return list(outputs).index(convention)


def _forward_in_eval_mode(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """model(x) in eval mode (batch-norm statistics frozen), leaving the model's mode as it was."""
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)


@torch.no_grad()
def predict_published_lung_probability(model: nn.Module, image01: np.ndarray,
                                       device: Union[str, torch.device] = "cpu") -> np.ndarray:
    """Lung probability of the published ``lungs-segmentation`` model, preprocessed as published.

    Args:
        model: :class:`~gl_lcm.models.published_lungseg.PublishedLungsUNet` (B x 3 x 512 x 512 in [0, 1]
            -> B x 2 x 512 x 512 logits, one channel per lung), already on ``device``.
        image01: H x W float image in [0, 1], bone bright (as the package's PNG input).

    Returns:
        H x W float32 in [0, 1]: the larger of the two lungs' sigmoids, resized back bilinearly.
    """
    from gl_lcm.models.published_lungseg import INPUT_SIZE

    image = _check_image(image01).astype(np.float64)
    height, width = image.shape
    low, high = float(image.min()), float(image.max())
    if high <= low:
        raise ValueError("cannot segment a constant image")
    image = (image - low) / (high - low)  # min-max as the package does
    small = cv2.resize(image, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(small).float()[None, None].expand(1, 3, INPUT_SIZE, INPUT_SIZE).contiguous().to(device)
    logits = _forward_in_eval_mode(model, x)
    prob = torch.sigmoid(logits.float())[0].amax(dim=0).cpu().numpy()
    return cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32)


def segment_lungs_pretrained(model: nn.Module, image01: np.ndarray, device: Union[str, torch.device] = "cpu", *,
                             name: Optional[str] = None, min_area: Optional[int] = None) -> np.ndarray:
    """Lung mask from the published model: probability > 0.2 (the published threshold), post-processed."""
    from gl_lcm.models.published_lungseg import THRESHOLD

    prob = predict_published_lung_probability(model, image01, device)
    return postprocess_mask(prob, threshold=THRESHOLD, min_area=min_area, name=name)


def load_masks_from_folder(folder: PathLike, stem: str, shape: Optional[Tuple[int, int]] = None,
                           threshold: float = 0.0) -> np.ndarray:
    """Read the precomputed lung mask ``<folder>/<stem>.<ext>`` as bool.

    A pixel is lung when it is nonzero (``threshold`` 0), or when its value is at least
    ``threshold`` times the full scale of the file's integer type (1.0: only 255 in an 8-bit
    file, which is what the published evaluation kept: ``mask[mask < 255] = 0``).

    Args:
        folder: folder of mask images (PNG 0/255 or 0/1; also BMP, TIFF, JPEG).
        stem: file name without extension (the image's stem).
        shape: (H, W) to resize to (nearest neighbour) when the mask size differs.

    Raises:
        FileNotFoundError: naming the folder, the stem and the extensions tried.
        ValueError: the file exists but cannot be decoded.
    """
    folder = Path(folder)
    stem = Path(stem).stem if Path(stem).suffix.lower() in MASK_EXTENSIONS else str(stem)
    candidates = [folder / f"{stem}{ext}" for ext in MASK_EXTENSIONS]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no lung mask for {stem!r} in {folder} (looked for {folder / stem}"
                                f"{{{','.join(MASK_EXTENSIONS)}}})")
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ValueError(f"cannot decode lung mask {path}")
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if threshold > 0:
        full = float(np.iinfo(mask.dtype).max) if np.issubdtype(mask.dtype, np.integer) else 1.0
        mask_bool = mask >= threshold * full
    else:
        mask_bool = mask > 0
    if shape is not None and tuple(mask_bool.shape) != tuple(shape[:2]):
        resized = cv2.resize(mask_bool.astype(np.uint8), (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_NEAREST)
        mask_bool = resized > 0
    return mask_bool


def segment_lungs(image01: np.ndarray, method: str, *, model: Optional[nn.Module] = None,
                  mask_dir: Optional[PathLike] = None, name: Optional[str] = None, min_area: Optional[int] = None,
                  mask_threshold: float = 0.0, image_size: int = 256,
                  device: Union[str, torch.device] = "cpu", channel: int = 0) -> np.ndarray:
    """Lung mask of one CXR by the chosen method.

    Args:
        image01: H x W float image in [0, 1] (bone bright).
        method: "classical", "unet" (needs ``model``; ``image_size``/``device``/``channel`` apply),
            "folder" (needs ``mask_dir`` and ``name``, whose stem names the mask file) or
            "pretrained" (needs the published ``model``; ``device`` applies).
        name: image name (file name or stem) for the folder lookup and error messages.
        mask_threshold: folder masks: lung where the value is >= this fraction of full scale (0 = nonzero).
        min_area: small-component override of the post-processing.

    Returns:
        bool H x W mask. Raises NoLungFoundError when no plausible lung is found,
        ValueError for an unknown method or missing arguments.
    """
    image = _check_image(image01)
    if method == "classical":
        return segment_lungs_classical(image, name=name, min_area=min_area)
    if method == "unet":
        if model is None:
            raise ValueError("segmentation method 'unet' needs a model")
        return segment_lungs_learned(model, image, image_size, device, name=name, min_area=min_area, channel=channel)
    if method == "pretrained":
        if model is None:
            raise ValueError("segmentation method 'pretrained' needs the published model "
                             "(gl_lcm.models.published_lungseg.load_published_lungseg)")
        return segment_lungs_pretrained(model, image, device, name=name, min_area=min_area)
    if method == "folder":
        if mask_dir is None or name is None:
            raise ValueError("segmentation method 'folder' needs mask_dir and name (the image stem)")
        mask = load_masks_from_folder(mask_dir, Path(name).stem, image.shape, threshold=mask_threshold)
        return postprocess_mask(mask, min_area=min_area, name=name)
    concrete = [m for m in SEGMENTATION_METHODS if m != "auto"]
    raise ValueError(f"unknown segmentation method {method!r}; valid: {', '.join(concrete)}")
