"""Paired CXR / bone-suppressed (soft-tissue) images, optionally with lung masks.

Pairs are matched by file stem (``CXR/0.png`` with ``BS/0.png``). Files present in
only one folder are never dropped silently: they are named in an error, or in a
warning when the caller allows unpaired files.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from gl_lcm.data.io import IMAGE_EXTENSIONS, list_images, read_image, to_tensor

PathLike = Union[str, os.PathLike]

_MAX_NAMES_SHOWN = 20


@dataclass(frozen=True)
class Pair:
    """One training / test sample: file paths sharing a stem."""

    stem: str
    cxr: Path
    bs: Path
    mask: Optional[Path] = None


def _name_list(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_NAMES_SHOWN])
    more = len(names) - _MAX_NAMES_SHOWN
    return shown + (f" ... and {more} more" if more > 0 else "")


def find_pairs(
    cxr_dir: PathLike,
    bs_dir: PathLike,
    mask_dir: Optional[PathLike] = None,
    allow_unpaired: bool = False,
    stems: Optional[Sequence[str]] = None,
) -> List[Pair]:
    """Match ``cxr_dir`` and ``bs_dir`` (and ``mask_dir``) images by file stem.

    stems: restrict to these stems (e.g. from :func:`read_split`); a requested stem
        missing from either folder counts as unpaired.
    Unpaired files raise ValueError naming them, or with ``allow_unpaired`` are
    skipped with a ``warnings.warn`` naming them. When ``mask_dir`` is given every
    returned pair must have a mask: missing masks raise ValueError naming them
    (extra masks are ignored). Returns pairs sorted by stem.
    """
    cxr_files = list_images(cxr_dir)
    bs_files = list_images(bs_dir)

    if stems is None:
        wanted = sorted(set(cxr_files) | set(bs_files))
    else:
        wanted = sorted(set(stems))
    only_cxr = [s for s in wanted if s in cxr_files and s not in bs_files]
    only_bs = [s for s in wanted if s in bs_files and s not in cxr_files]
    in_neither = [s for s in wanted if s not in cxr_files and s not in bs_files]

    problems = []
    if only_cxr:
        problems.append(f"{len(only_cxr)} only in {cxr_dir} (no soft-tissue image in {bs_dir}): {_name_list(only_cxr)}")
    if only_bs:
        problems.append(f"{len(only_bs)} only in {bs_dir} (no CXR in {cxr_dir}): {_name_list(only_bs)}")
    if in_neither:
        problems.append(f"{len(in_neither)} requested but in neither folder: {_name_list(in_neither)}")
    if problems:
        message = "unpaired images: " + "; ".join(problems)
        if not allow_unpaired:
            raise ValueError(message + " (pass allow_unpaired=True to skip them)")
        warnings.warn(message + " -- skipped", stacklevel=2)

    paired = [s for s in wanted if s in cxr_files and s in bs_files]
    if not paired:
        raise ValueError(f"no CXR / soft-tissue pairs found between {cxr_dir} and {bs_dir}")

    mask_files: Dict[str, Path] = {}
    if mask_dir is not None:
        mask_files = list_images(mask_dir)
        no_mask = [s for s in paired if s not in mask_files]
        if no_mask:
            raise ValueError(f"mask folder {mask_dir} lacks masks for {len(no_mask)} pairs: {_name_list(no_mask)}")

    return [Pair(stem=s, cxr=cxr_files[s], bs=bs_files[s], mask=mask_files.get(s)) for s in paired]


def read_split(path: PathLike) -> List[str]:
    """Read a split file (one name per line) as a list of stems, in file order.

    Blank lines and lines starting with ``#`` are ignored. Entries carrying an image
    extension (``0.png``, as in the published GL-LCM split files) become their stem.
    Raises FileNotFoundError when missing and ValueError on duplicate entries.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    stems: List[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        entry_path = Path(entry)
        stems.append(entry_path.stem if entry_path.suffix.lower() in IMAGE_EXTENSIONS else entry)
    seen, duplicates = set(), set()
    for stem in stems:
        (duplicates if stem in seen else seen).add(stem)
    if duplicates:
        raise ValueError(f"split file {path} lists these stems more than once: {_name_list(duplicates)}")
    return stems


def resize_image(image: np.ndarray, size: int, is_mask: bool = False) -> np.ndarray:
    """Resize H x W float32 to size x size.

    Images: area interpolation when shrinking (no aliasing), bilinear when growing.
    Masks: nearest neighbour, then thresholded at 0.5 to {0, 1}.
    Non-square inputs are stretched to the square, as the published pipeline does.
    """
    if is_mask:
        if image.shape != (size, size):
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_NEAREST)
        return (image > 0.5).astype(np.float32)
    if image.shape == (size, size):
        return image
    shrinking = image.shape[0] * image.shape[1] > size * size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation).astype(np.float32)


class PairedDataset(Dataset):
    """Torch dataset of CXR / soft-tissue pairs resized to image_size x image_size.

    Item: dict(cxr=1 x S x S float32 in [-1, 1], bs=1 x S x S in [-1, 1],
    mask=1 x S x S float32 in {0, 1} (only with ``with_mask``), stem=str).
    Both images of a pair are resized to S x S with the same rule (area / bilinear),
    whatever their original sizes, so they stay pixel-aligned.
    """

    def __init__(self, pairs: Sequence[Pair], image_size: int, with_mask: bool = False):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if with_mask:
            no_mask = [p.stem for p in pairs if p.mask is None]
            if no_mask:
                raise ValueError(f"with_mask=True but these pairs have no mask: {_name_list(no_mask)}")
        self.pairs = list(pairs)
        self.image_size = int(image_size)
        self.with_mask = with_mask

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Dict[str, Union[torch.Tensor, str]]:
        pair = self.pairs[index]
        cxr, _ = read_image(pair.cxr)
        bs, _ = read_image(pair.bs)
        item: Dict[str, Union[torch.Tensor, str]] = {
            "cxr": to_tensor(resize_image(cxr, self.image_size)),
            "bs": to_tensor(resize_image(bs, self.image_size)),
            "stem": pair.stem,
        }
        if self.with_mask:
            mask, _ = read_image(pair.mask, allow_constant=True)
            item["mask"] = torch.from_numpy(resize_image(mask, self.image_size, is_mask=True)).unsqueeze(0)
        return item
