"""Real CXR / soft-tissue pairs from BSE-JSRT, in the layout every gl-lcm command reads.

BSE-JSRT pairs each of the 247 JSRT radiographs with a bone-shadow-eliminated image made by software
(not dual energy: only ribs and clavicles are removed, and only inside the lungs). A public clone
(github.com/akalia77/Bone_Suppresion) holds 148 of them as ``datasets/{train_bone,valid_bone}/
{source,target}/s_<JSRT id>.png``: 2048 x 2048, 8-bit, stored dark-bone. From such a clone
:func:`prepare_bse_jsrt` writes, bone bright (inverted) and resized to ``size``:

- ``CXR/<id>.png``, ``BS/<id>.png``: the radiograph and its soft-tissue image (area resampling);
- ``Mask/<id>.png``: lung masks by the suite's lung U-Net when a checkpoint is given, by the classical
  method otherwise; a film where no lung is found gets the population prior (lung in at least half of
  the other films' masks), so every pair can train the local path (``masks.txt`` says which method,
  and which films got the prior);
- ``train.txt`` / ``val.txt`` / ``test.txt``: the clone's 20 ``valid_bone`` films are the fixed held-out
  test list; a seeded ``val_count`` of its training films validate; films in ``exclude`` (the ones
  ``../shared/data/real-cxr`` holds, by default) never enter training or validation.

No licence file comes with the clone; JSRT's terms allow research and education. Nothing here is
downloaded: the clone is the user's.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence, Union

import cv2
import numpy as np
from tqdm import tqdm

from gl_lcm.data.io import read_image, write_png
from gl_lcm.data.split import write_split
from gl_lcm.utils.atomic import atomic_write_text
from gl_lcm.utils.seeding import derive_seed

PathLike = Union[str, os.PathLike]
# films of ../shared/data/real-cxr (pairs/bse-jsrt, seg/jsrt): kept out of training
SHARED_FILMS = ("JPCLN139", "JPCLN112", "JPCNN043")
_NAME = re.compile(r"^s_(JPC[LN]N\d{3})$")


def _films(folder: Path) -> dict[str, Path]:
    """JSRT id -> file for every ``s_<id>.png`` in ``folder``."""
    out = {}
    for f in sorted(folder.glob("*.png")):
        m = _NAME.match(f.stem)
        if m:
            out[m.group(1)] = f
    return out


def _load_bone_bright(path: Path, size: int) -> np.ndarray:
    image, _ = read_image(path)
    image = 1.0 - image  # stored dark-bone
    if image.shape != (size, size):
        image = cv2.resize(image.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def population_prior(masks) -> np.ndarray:
    """Pixels that are lung in at least half of ``masks`` (same-size bool H x W arrays): H x W bool."""
    return np.mean(np.stack(masks), axis=0) >= 0.5


def prepare_bse_jsrt(repo: PathLike, out: PathLike, size: int = 256, segmenter=None, mask_method: str = "classical",
                     val_count: int = 12, seed: int = 0, exclude: Sequence[str] = SHARED_FILMS,
                     progress: bool = True) -> dict:
    """Write the BSE-JSRT pairs of a local clone into ``out`` (see the module docstring).

    segmenter: ``(name, image01) -> bool mask`` (gl_lcm.inference.Segmenter); ``mask_method`` names it in
    masks.txt. Returns counts per split, the films without a lung mask and the excluded films found.
    """
    repo, out = Path(repo), Path(out)
    root = repo / "datasets"
    folders = {split: (root / f"{split}_bone" / "source", root / f"{split}_bone" / "target")
               for split in ("train", "valid")}
    for split, (src, tgt) in folders.items():
        if not src.is_dir() or not tgt.is_dir():
            raise FileNotFoundError(f"{src} or {tgt} not found: --repo must be a clone of "
                                    f"github.com/akalia77/Bone_Suppresion (datasets/{{train_bone,valid_bone}}/"
                                    f"{{source,target}}/s_<JSRT id>.png)")
    pairs: dict[str, dict[str, tuple[Path, Path]]] = {}
    for split, (src, tgt) in folders.items():
        sources, targets = _films(src), _films(tgt)
        unpaired = sorted(set(sources) ^ set(targets))
        if unpaired:
            raise ValueError(f"{src.parent}: films without a partner in source/ or target/: {unpaired[:5]}")
        pairs[split] = {k: (sources[k], targets[k]) for k in sources}
    test = sorted(pairs["valid"])
    if len(test) < 20:
        raise ValueError(f"{folders['valid'][0]} holds {len(test)} films; the held-out test list needs at least 20")
    excluded = sorted(k for k in pairs["train"] if k in set(exclude))
    pool = sorted(k for k in pairs["train"] if k not in set(exclude))
    order = sorted(pool, key=lambda k: derive_seed(seed, "bse-jsrt-val", k))
    val, train = sorted(order[:val_count]), sorted(order[val_count:])
    no_mask, found = [], []
    all_pairs = {**pairs["train"], **pairs["valid"]}
    for name in tqdm(sorted(set(train) | set(val) | set(test)), desc="prepare BSE-JSRT", disable=not progress):
        cxr_file, soft_file = all_pairs[name]
        cxr, soft = _load_bone_bright(cxr_file, size), _load_bone_bright(soft_file, size)
        write_png(out / "CXR" / f"{name}.png", cxr)
        write_png(out / "BS" / f"{name}.png", soft)
        if segmenter is not None:
            try:
                mask = segmenter(name, cxr)
                write_png(out / "Mask" / f"{name}.png", mask.astype(np.float32))
                found.append(mask)
            except ValueError:  # no lung found
                no_mask.append(name)
    if no_mask and found:
        # every pair needs a mask to train the local path: where none was found, the population prior
        # (pixels that are lung in at least half of the films' masks), named in masks.txt
        prior = population_prior(found)
        for name in no_mask:
            write_png(out / "Mask" / f"{name}.png", prior.astype(np.float32))
    write_split(out, {"train": train, "val": val, "test": test})
    atomic_write_text(out / "masks.txt",
                      f"lung masks: {mask_method if segmenter is not None else 'none'}\n"
                      + "".join(f"no lung found, population prior mask: {n}\n" for n in no_mask))
    return {"train": len(train), "val": len(val), "test": len(test), "no_mask": no_mask, "excluded": excluded,
            "mask_method": mask_method if segmenter is not None else "none"}
