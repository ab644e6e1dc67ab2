"""Figures written as PNG: training curves and image grids (headless, atomic)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from gl_lcm.utils.atomic import atomic_path


def plot_curves(series: dict[str, list[tuple[int, float]]], path: str | Path) -> None:
    """One small panel per logged name (step on x); losses with a log y-axis when positive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(n for n in series if not n.startswith("lr/") and not n.startswith("grad_norm/"))
    names = names or sorted(series)
    cols = min(4, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = zip(*series[name])
        ax.plot(steps, values, lw=1)
        finite = [v for v in values if np.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) / max(min(finite), 1e-12) > 20:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("step", fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def image_grid(rows: Sequence[Sequence[np.ndarray]], labels: Sequence[str] = (), pad: int = 2) -> np.ndarray:
    """Tile H x W float images in [0, 1] into one uint8 image; optional column labels on top."""
    import cv2

    h = max(im.shape[0] for r in rows for im in r)
    w = max(im.shape[1] for r in rows for im in r)
    ncol = max(len(r) for r in rows)
    top = 18 if labels else 0
    canvas = np.full((top + len(rows) * (h + pad) + pad, ncol * (w + pad) + pad), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            im8 = np.clip(np.asarray(im, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
            if im8.shape != (h, w):
                im8 = cv2.resize(im8, (w, h), interpolation=cv2.INTER_AREA)
            y, x = top + pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = im8
    for j, text in enumerate(labels):
        cv2.putText(canvas, text, (pad + j * (w + pad) + 2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1, cv2.LINE_AA)
    return canvas


def save_grid(path: str | Path, rows: Sequence[Sequence[np.ndarray]], labels: Sequence[str] = ()) -> None:
    """Write :func:`image_grid` as a PNG atomically."""
    import cv2

    with atomic_path(path) as tmp:
        cv2.imwrite(str(tmp), image_grid(rows, labels))
