"""Config glue between the data folders and the training tasks.

- :func:`pairs_for_split`: the CXR / BS (/ mask) pairs of one split named in the config.
- :class:`AutoencoderImages`: every pair expanded into the four images the VQGAN learns
  (CXR, soft tissue, masked CXR, masked soft tissue), 1 x S x S in [-1, 1].
- :func:`masked`: images with everything outside the lung mask set to 0 in [0, 1] terms
  (that is -1 in the package's [-1, 1] convention).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from gl_lcm.config import Config, resolve_data_path
from gl_lcm.data.pairs import PairedDataset, find_pairs, read_split

SPLITS = ("train", "val", "test")


def split_list_path(cfg: Config, split: str) -> Path:
    """Path of a split list: 'train'/'val'/'test' (from data.*_list) or a file path."""
    if split in SPLITS:
        return resolve_data_path(cfg, getattr(cfg.data, f"{split}_list"))
    return Path(split)


def pairs_for_split(cfg: Config, split: Optional[str], require_masks: bool = False):
    """Pairs of ``split`` ('train', 'val', 'test', a list file, or None for every pair)."""
    cxr_dir = resolve_data_path(cfg, cfg.data.cxr_dir)
    bs_dir = resolve_data_path(cfg, cfg.data.bs_dir)
    mask_dir = resolve_data_path(cfg, cfg.data.mask_dir) if cfg.data.mask_dir else None
    if mask_dir is not None and not mask_dir.is_dir():
        if require_masks:
            raise FileNotFoundError(f"mask folder {mask_dir} not found (data.mask_dir); masks are needed here")
        mask_dir = None
    stems = None
    if split is not None:
        path = split_list_path(cfg, split)
        if not path.is_file():
            raise FileNotFoundError(f"split list {path} not found; create it with `gl-lcm split` "
                                    f"or set data.{split}_list")
        stems = read_split(path)
        if not stems:
            raise ValueError(f"split list {path} is empty")
    return find_pairs(cxr_dir, bs_dir, mask_dir, allow_unpaired=cfg.data.allow_unpaired, stems=stems)


def masked(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Image in [-1, 1] with pixels outside ``mask`` (same shape, {0,1}) set to black (-1)."""
    return torch.where(mask > 0.5, image, torch.full_like(image, -1.0))


class AutoencoderImages(Dataset):
    """Each pair gives up to four training images: CXR, BS, masked CXR, masked BS.

    Returns dict(image=1 x S x S in [-1, 1], stem=str, kind=str). Without masks only
    CXR and BS are used.
    """

    KINDS = ("cxr", "bs", "masked_cxr", "masked_bs")

    def __init__(self, pairs, image_size: int):
        self.with_mask = all(p.mask is not None for p in pairs)
        self.base = PairedDataset(pairs, image_size, with_mask=self.with_mask)
        self.kinds = self.KINDS if self.with_mask else self.KINDS[:2]

    def __len__(self) -> int:
        return len(self.base) * len(self.kinds)

    def __getitem__(self, index: int) -> dict:
        item = self.base[index // len(self.kinds)]
        kind = self.kinds[index % len(self.kinds)]
        source = item["cxr"] if kind.endswith("cxr") else item["bs"]
        image = masked(source, item["mask"]) if kind.startswith("masked") else source
        return {"image": image, "stem": item["stem"], "kind": kind}
