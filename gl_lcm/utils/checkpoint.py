"""Checkpoints: plain dicts of state dicts plus the config as plain data.

Saved atomically (temp file, then rename); loaded with ``torch.load(weights_only=True)``
so loading never executes code from a file.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from gl_lcm.utils.atomic import atomic_path

_STEP_RE = re.compile(r"step_(\d+)\.pt$")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """torch.save ``state`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: Any = "cpu", expect_kind: Optional[str] = None) -> dict[str, Any]:
    """Load a checkpoint safely; clear errors for a missing file, a foreign file, or the wrong kind.

    ``expect_kind``: 'vqgan', 'ldm', 'distill' or 'segnet' — the model family the caller needs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train it first, or set the path in the config's "
                                f"'checkpoints' section)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt, truncated, or a pickle with code in it
        raise ValueError(f"{path} is not a readable gl-lcm checkpoint: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(ckpt, dict) or "modules" not in ckpt or "kind" not in ckpt:
        raise ValueError(f"{path} is not a gl-lcm checkpoint (no 'kind'/'modules' entries)")
    if expect_kind is not None and ckpt["kind"] != expect_kind:
        raise ValueError(f"{path} holds a '{ckpt['kind']}' model, but a '{expect_kind}' checkpoint is needed here")
    return ckpt


def find_latest_checkpoint(folder: str | Path) -> Optional[Path]:
    """Newest ``step_XXXXXXXX.pt`` in ``folder`` (by step number), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_RE.search(p.name))]
    return max(found)[1] if found else None


def prune_checkpoints(folder: str | Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest step checkpoints."""
    found = sorted((int(m.group(1)), p) for p in Path(folder).iterdir() if (m := _STEP_RE.search(p.name)))
    for _, p in found[:-keep_last]:
        p.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states as weights_only-loadable data."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Optional[dict[str, Any]]) -> None:
    """Restore what :func:`rng_state` saved (missing parts are left as they are)."""
    if not state:
        return
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
