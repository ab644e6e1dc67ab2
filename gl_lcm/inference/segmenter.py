"""Lung masks for the engine: the configured method, resolved once, with an optional on-disk cache."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from gl_lcm.config import Config
from gl_lcm.data.io import read_image, write_png
from gl_lcm.utils.atomic import atomic_path

# where the README's lung U-Net recipe (configs/segnet_lungs.yaml) leaves its checkpoint, relative to the
# working directory: segmentation.method=auto uses it when it exists
DEFAULT_SEGNET = Path("runs/segnet_lungs/model.pt")


class Segmenter:
    """Bool H x W lung masks by ``segmentation.method`` (models loaded once, at construction).

    With a ``cache_dir`` a call writes cache_dir/masks/<stem>.png (0/255, at the image's size) and
    cache_dir/overlays/<stem>.png (outline on the CXR), and reuses a cached mask of the right size
    unless ``overwrite`` (or ``segmentation.cache`` is off).
    """

    def __init__(self, method: str, *, min_area: int = 100, use_cache: bool = True, method_options: dict = None):
        self.method, self.min_area, self.use_cache = method, min_area, use_cache
        self.method_options = method_options or {}

    @classmethod
    def from_config(cls, cfg: Config, device=None, log=print) -> "Segmenter":
        """The configured method, models loaded. ``auto``: the lung U-Net of checkpoints.segnet, else the
        one at :data:`DEFAULT_SEGNET` when it exists, else the classical method (``log`` says so once,
        and where the recipe for the U-Net is)."""
        s = cfg.segmentation
        method, segnet = s.method, cfg.checkpoints.segnet
        if method == "auto":
            segnet = segnet or (str(DEFAULT_SEGNET) if DEFAULT_SEGNET.is_file() else "")
            method = "unet" if segnet else "classical"
            if method == "classical":
                log(f"lung masks: the classical method (no lung U-Net in checkpoints.segnet or at {DEFAULT_SEGNET}); "
                    f"on films from other sources the U-Net finds far more of the lung (96 % against 72 % on an "
                    f"unseen PA film): train it once as docs/clinical.md shows")
        options: dict = {}
        if method in ("unet", "pretrained"):
            from gl_lcm.utils.dist import resolve_device

            device = device if device is not None else resolve_device(cfg.device)
        if method == "unet":
            from gl_lcm.models.factory import load_segnet
            from gl_lcm.segmentation.learned import convention_channel

            if not segnet:
                raise ValueError("segmentation.method is 'unet' but checkpoints.segnet is empty: train one with "
                                 "`gl-lcm train-seg` or use segmentation.method=classical")
            model, net_cfg = load_segnet(segnet, device)
            options = {"model": model, "image_size": net_cfg.segmentation.image_size, "device": device,
                       "channel": convention_channel(net_cfg.segmentation.outputs, s.convention, segnet)}
        elif method == "pretrained":
            from gl_lcm.models.published_lungseg import load_published_lungseg

            options = {"model": load_published_lungseg(cfg.checkpoints.lungs_segmentation, device), "device": device}
        elif method == "folder":
            if not s.mask_dir:
                raise ValueError("segmentation.method is 'folder' but segmentation.mask_dir is empty")
            options = {"mask_dir": s.mask_dir, "mask_threshold": s.mask_threshold}
        return cls(method, min_area=s.min_area, use_cache=s.cache, method_options=options)

    def __call__(self, name: str, image01: np.ndarray, cache_dir: Optional[Path] = None,
                 overwrite: bool = False) -> np.ndarray:
        """Bool H x W lung mask of one CXR (H x W in [0, 1]); raises NoLungFoundError (a ValueError)
        when none is found."""
        from gl_lcm.segmentation import segment_lungs

        cached = self._cached(name, image01, cache_dir, overwrite)
        if cached is not None:
            return cached
        h, w = image01.shape
        min_area = int(round(self.min_area * h * w / (1024 * 1024)))
        mask = segment_lungs(image01, self.method, name=name, min_area=min_area, **self.method_options)
        self._write_cache(name, image01, mask, cache_dir)
        return mask

    def _cached(self, name: str, image01: np.ndarray, cache_dir: Optional[Path], overwrite: bool):
        """The cached mask of ``name`` when there is one of the image's size (and caching applies), else None."""
        cached = Path(cache_dir) / "masks" / f"{name}.png" if cache_dir is not None else None
        if cached is not None and cached.is_file() and self.use_cache and not overwrite:
            mask, _ = read_image(cached, allow_constant=True)
            if mask.shape == image01.shape:
                return mask > 0.5
        return None

    def _write_cache(self, name: str, image01: np.ndarray, mask: np.ndarray, cache_dir: Optional[Path]) -> None:
        if cache_dir is None:
            return
        from gl_lcm.segmentation import mask_overlay

        write_png(Path(cache_dir) / "masks" / f"{name}.png", mask.astype(np.float32))
        with atomic_path(Path(cache_dir) / "overlays" / f"{name}.png") as tmp:
            cv2.imwrite(str(tmp), cv2.cvtColor(mask_overlay(image01, mask), cv2.COLOR_RGB2BGR))

    def segment_batch(self, names, images01, cache_dir: Optional[Path] = None, overwrite: bool = False) -> list:
        """Masks of several films: one bool mask, or the exception (NoLungFoundError, ...), per film.

        With the lung U-Net the films without a cached mask go through the net in ONE forward pass
        (batched, on its device); other methods segment film by film."""
        if self.method != "unet":
            return segment_each(self, names, images01, cache_dir, overwrite)
        from gl_lcm.segmentation.learned import predict_lung_probabilities
        from gl_lcm.segmentation.postprocess import postprocess_mask

        out: list = [None] * len(names)
        todo = []
        for i, (name, image) in enumerate(zip(names, images01)):
            cached = self._cached(name, image, cache_dir, overwrite)
            if cached is not None:
                out[i] = cached
            else:
                todo.append(i)
        if todo:
            o = self.method_options
            probs = predict_lung_probabilities(o["model"], [images01[i] for i in todo], o["image_size"], o["device"],
                                               o["channel"])
            for i, prob in zip(todo, probs):
                h, w = images01[i].shape
                try:
                    mask = postprocess_mask(prob, threshold=0.5, min_area=int(round(self.min_area * h * w / 1024**2)),
                                            name=names[i])
                    self._write_cache(names[i], images01[i], mask, cache_dir)
                    out[i] = mask
                except ValueError as exc:
                    out[i] = exc
        return out



def segment_each(segmenter, names, images01, cache_dir: Optional[Path] = None, overwrite: bool = False) -> list:
    """Film by film with any segmenter callable: a bool mask, or the exception (no lung found, no mask in
    the folder, ...), per film."""
    out = []
    for name, image in zip(names, images01):
        try:
            out.append(segmenter(name, image, cache_dir=cache_dir, overwrite=overwrite))
        except (ValueError, FileNotFoundError) as exc:
            out.append(exc)
    return out


class WithFallback:
    """A segmenter that falls back to given masks (by name) where ``segmenter`` finds no lung
    (benchmarks and the demo on phantoms, whose true masks are known)."""

    def __init__(self, segmenter, fallback: dict):
        self.segmenter, self.fallback = segmenter, fallback

    def __call__(self, name: str, image01: np.ndarray, cache_dir: Optional[Path] = None,
                 overwrite: bool = False) -> np.ndarray:
        from gl_lcm.segmentation import NoLungFoundError

        try:
            return self.segmenter(name, image01, cache_dir=cache_dir, overwrite=overwrite)
        except NoLungFoundError:
            return self.fallback[name]
