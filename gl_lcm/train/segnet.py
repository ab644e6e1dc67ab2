"""Lung segmentation U-Net training task: any folder of (image, mask) pairs.

Images come from data.cxr_dir and masks (0/255, same stems) from one folder per output
convention (segmentation.outputs: visible -> data.mask_dir, full -> data.full_mask_dir); the split
lists restrict them when present (JSRT/SCR, Montgomery or Shenzhen masks all fit this layout).
Loss: binary cross-entropy + soft Dice, averaged over the outputs. Augmentation
(segmentation.augment): :func:`gl_lcm.data.augment.augment_films`; off: random horizontal flips.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from gl_lcm.config import Config, resolve_data_path
from gl_lcm.data.augment import augment_films
from gl_lcm.data.io import list_images, read_image, to_tensor
from gl_lcm.data.pairs import read_split, resize_image
from gl_lcm.data.datasets import split_list_path
from gl_lcm.models.factory import build_segnet
from gl_lcm.train.loop import Trainer, TrainTask
from gl_lcm.utils import seeding
from gl_lcm.utils.plotting import save_grid


class ImageMaskPairs(Dataset):
    """dict(image=1 x S x S in [-1, 1], mask=K x S x S in {0, 1} (one per output), stem)."""

    def __init__(self, items: list[tuple[str, Path, list[Path]]], size: int):
        self.items, self.size = items, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        stem, img_path, mask_paths = self.items[i]
        image, _ = read_image(img_path)
        masks = [resize_image(read_image(p, allow_constant=True)[0], self.size, is_mask=True) for p in mask_paths]
        return {"image": to_tensor(resize_image(image, self.size)),
                "mask": torch.from_numpy(np.stack(masks)).float(), "stem": stem}


MASK_DIR_KEYS = {"visible": "mask_dir", "full": "full_mask_dir"}


def image_mask_items(cfg: Config, split: str) -> list[tuple[str, Path, list[Path]]]:
    """(stem, image, [mask per output]) for a split; every image of the split must have its masks."""
    images = list_images(resolve_data_path(cfg, cfg.data.cxr_dir))
    mask_sets = []
    for output in cfg.segmentation.outputs:
        key = MASK_DIR_KEYS[output]
        if not getattr(cfg.data, key):
            raise ValueError(f"data.{key} is empty: train-seg needs the masks of the '{output}' output "
                             f"(segmentation.outputs={cfg.segmentation.outputs})")
        mask_sets.append(list_images(resolve_data_path(cfg, getattr(cfg.data, key))))
    path = split_list_path(cfg, split)
    stems = read_split(path) if path.is_file() else sorted(images)
    missing = [s for s in stems if s not in images or any(s not in m for m in mask_sets)]
    if missing:
        raise ValueError(f"{len(missing)} images or masks missing for split '{split}': {', '.join(missing[:10])}")
    return [(s, images[s], [m[s] for m in mask_sets]) for s in stems]


def dice_score(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Soft Dice per sample of B x 1 x H x W probabilities / {0,1} targets: B."""
    inter = (pred * target).flatten(1).sum(1)
    return (2 * inter + eps) / (pred.flatten(1).sum(1) + target.flatten(1).sum(1) + eps)


class SegNetTask(TrainTask):
    name = "segnet"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def build(self, trainer: Trainer) -> None:
        s = self.cfg.segmentation
        self.trainer = trainer
        self.net = build_segnet(s)
        self.train_set = ImageMaskPairs(image_mask_items(self.cfg, "train"), s.image_size)
        val_path = split_list_path(self.cfg, "val")
        self.val_set = ImageMaskPairs(image_mask_items(self.cfg, "val"), s.image_size) if val_path.is_file() else None

    def train_dataset(self):
        return self.train_set

    def modules(self):
        return {"segnet": self.net}

    def optimizer_groups(self):
        return {"segnet": {"modules": ["segnet"], "lr": self.cfg.train.lr}}

    def micro_step(self, batch, step, generator):
        x, y = batch["image"], batch["mask"]
        if self.cfg.segmentation.augment:
            x, y = augment_films(x, y, generator)
        else:
            flip = seeding.rand(x.shape[0], generator, x.device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            y = torch.where(flip.view(-1, 1, 1, 1), y.flip(-1), y)
        logits = self.trainer.net("segnet")(x)
        bce = F.binary_cross_entropy_with_logits(logits.float(), y)
        dice = dice_score(torch.sigmoid(logits.float()), y).mean()
        return bce + (1 - dice), {"bce": float(bce.detach()), "dice": float(dice.detach())}

    @torch.no_grad()
    def validate(self, step, out_dir):
        if self.val_set is None or len(self.val_set) == 0:
            return {}
        items = [self.val_set[i] for i in range(min(len(self.val_set), 16))]
        x = torch.stack([it["image"] for it in items]).to(self.trainer.device)
        y = torch.stack([it["mask"] for it in items]).to(self.trainer.device)
        p = (torch.sigmoid(self.net(x).float()) > 0.5).float()
        to01 = lambda t: t[:, 0].cpu().numpy()
        rows = [[(a + 1) / 2, b, c] for a, b, c in zip(to01(x)[:4], to01(p)[:4], to01(y)[:4])]
        save_grid(out_dir / f"seg_step_{step:08d}.png", rows, labels=["image", "predicted", "truth"])
        return {f"dice_{name}": float(dice_score(p[:, k:k + 1], y[:, k:k + 1]).mean())
                for k, name in enumerate(self.cfg.segmentation.outputs)}


def train_segnet(cfg: Config, resume: str = "auto", progress: bool = True) -> dict[str, float]:
    """Train the lung U-Net; writes <train.output_dir>/model.pt (use it as checkpoints.segnet)."""
    return Trainer(cfg, SegNetTask(cfg), resume=resume, progress=progress).fit()
