"""Lung-mask training sets from public annotations, in the layout ``gl-lcm train-seg`` reads.

The COVID-19 chest X-ray segmentations dataset (GeneralBlockchain, github.com/GeneralBlockchain/
covid-19-chest-xray-segmentations-dataset; outlines CC BY 4.0, images under the licence that
metadata.csv gives per film) outlines each lung and the cardiomediastinum on 100 frontal films
from the ieee8023 COVID collection. From a local clone of it this module writes:

- ``CXR/<stem>.png``: the film, 8-bit grey, long side at most ``max_side`` px (area resampling);
- ``MaskFull/<stem>.png``: left | right lung as outlined (rib-cage convention: the lung behind
  the heart and down to the costophrenic angles is included) -> the U-Net's ``full`` output;
- ``Mask/<stem>.png``: the same minus the cardiomediastinum outline, i.e. the lung not hidden
  by the heart (the SCR / JSRT convention) -> the U-Net's ``visible`` output;
- ``train.txt`` / ``val.txt``: split by patient (metadata.csv ``patientid``), seeded;
- ``sources.csv``: stem, original file name, patient, view and licence of every film.

:func:`add_phantoms` adds built-in phantoms (both masks = the phantom's lung fields) to the
training list, so a net trained on real films keeps working on the suite's synthetic data.

Films named in ``exclude`` (by file stem) are left out together with every other film of the same
patient, so a model trained here can be evaluated on them (e.g. ``real-cxr/seg/covid``).
"""
from __future__ import annotations

import csv
import io
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Union

import cv2
import numpy as np
from tqdm import tqdm

from gl_lcm.data.io import write_png
from gl_lcm.utils.atomic import atomic_write_text

PathLike = Union[str, os.PathLike]

LUNG_CLASSES = ("Left Lung", "Right Lung")
HEART_CLASS = "Cardiomediastinum"


def _safe_stem(file_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(file_name).stem)


def _read_gray(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"cannot decode {path}")
    if image.ndim == 3:
        image = cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2GRAY)
    if image.dtype != np.uint8:
        image = cv2.normalize(image.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return image


def _read_mask(path: Path) -> np.ndarray:
    """The dataset's masks are RGBA: a class colour on black, alpha 255 everywhere."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ValueError(f"cannot decode {path}")
    return (mask[..., :3].max(axis=-1) if mask.ndim == 3 else mask) > 0


def _paste_masks(repo: Path, rows: dict, classes: tuple, shape: tuple) -> np.ndarray:
    """Union of the class masks at image size; a mask file covers only its box (Top, Left)."""
    out = np.zeros(shape, bool)
    for cls in classes:
        for row in rows[cls]:
            part = _read_mask(repo / row["Mask"])
            if part.shape == tuple(shape):
                out |= part
                continue
            top, left = int(row["Top"]), int(row["Left"])
            h, w = min(part.shape[0], shape[0] - top), min(part.shape[1], shape[1] - left)
            out[top:top + h, left:left + w] |= part[:h, :w]
    return out


def prepare_covid_lung_set(repo_dir: PathLike, out_dir: PathLike, exclude: Iterable[str] = (),
                           val_fraction: float = 0.1, seed: int = 0, max_side: int = 1024,
                           progress: bool = True) -> dict:
    """Write the GeneralBlockchain films and lung masks as a train-seg folder (see module doc).

    Args:
        repo_dir: local clone of the dataset (holds structure.csv, metadata.csv, images/, masks/).
        out_dir: output folder (CXR/, Mask/, MaskFull/, train.txt, val.txt, sources.csv).
        exclude: file stems (with or without extension) to leave out with their patients.
        val_fraction: share of patients in val.txt.
        max_side: long side of the written films and masks.

    Returns:
        dict(train=n, val=n, excluded=[stems], patients=n).
    """
    repo, out = Path(repo_dir), Path(out_dir)
    structure, metadata = repo / "structure.csv", repo / "metadata.csv"
    for f in (structure, metadata, repo / "images", repo / "masks"):
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: repo_dir must be a clone of "
                                    "github.com/GeneralBlockchain/covid-19-chest-xray-segmentations-dataset")
    with metadata.open(encoding="utf-8") as fh:
        meta = {row["filename"]: row for row in csv.DictReader(fh)}
    masks: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    with structure.open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            masks[row["Filename"]][row["Template Name"]].append(row)
    excluded_stems = {Path(e).stem for e in exclude}
    patient = {name: (meta.get(name) or {}).get("patientid") or name for name in masks}
    excluded_patients = {patient[n] for n in masks if Path(n).stem in excluded_stems}
    names = sorted(n for n in masks if patient[n] not in excluded_patients
                   and all(masks[n].get(c) for c in LUNG_CLASSES + (HEART_CLASS,)))
    left_out = sorted(Path(n).stem for n in masks if patient[n] in excluded_patients)

    rows, stems_by_patient = [], defaultdict(list)
    for name in tqdm(names, desc="lung set", disable=not progress):
        image = _read_gray(repo / "images" / name)
        lungs = _paste_masks(repo, masks[name], LUNG_CLASSES, image.shape)
        heart = _paste_masks(repo, masks[name], (HEART_CLASS,), image.shape)
        scale = min(1.0, max_side / max(image.shape))
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        stem = _safe_stem(name)
        write_png(out / "CXR" / f"{stem}.png", cv2.resize(image, size, interpolation=cv2.INTER_AREA) / 255.0)
        for folder, mask in (("MaskFull", lungs), ("Mask", lungs & ~heart)):
            small = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
            write_png(out / folder / f"{stem}.png", small.astype(np.float32))
        m = meta.get(name, {})
        rows.append([stem, name, patient[name], m.get("view", ""), m.get("license", "") or "not stated"])
        stems_by_patient[patient[name]].append(stem)

    patients = sorted(stems_by_patient)
    rng = np.random.default_rng(seed)
    order = [patients[i] for i in rng.permutation(len(patients))]
    n_val = max(1, round(val_fraction * len(patients))) if val_fraction > 0 else 0
    val = sorted(s for p in order[:n_val] for s in stems_by_patient[p])
    train = sorted(s for p in order[n_val:] for s in stems_by_patient[p])
    atomic_write_text(out / "train.txt", "".join(s + "\n" for s in train))
    atomic_write_text(out / "val.txt", "".join(s + "\n" for s in val))
    table = io.StringIO()
    writer = csv.writer(table, quoting=csv.QUOTE_ALL, lineterminator="\n")
    table.write("stem,original_file,patient,view,licence\n")
    writer.writerows(rows)
    atomic_write_text(out / "sources.csv", table.getvalue())
    return {"train": len(train), "val": len(val), "excluded": left_out, "patients": len(patients)}


def add_phantoms(out_dir: PathLike, n: int, size: int = 256, seed: int = 100_000) -> list[str]:
    """Append ``n`` phantoms (seeds ``seed``, ``seed + 1``, ...) to a train-seg folder's CXR/, Mask/,
    MaskFull/ and train.txt; returns their stems. The default seeds stay clear of those the
    benchmarks and tests draw (0 upwards)."""
    from gl_lcm.data.phantom import generate_phantom

    out = Path(out_dir)
    stems = []
    for i in range(n):
        p = generate_phantom(size, seed + i)
        stem = f"phantom_{seed + i}"
        write_png(out / "CXR" / f"{stem}.png", np.round(p.cxr * 255) / 255.0)  # float32 rounding, as before
        for folder in ("Mask", "MaskFull"):
            write_png(out / folder / f"{stem}.png", p.lung_mask.astype(np.float32))
        stems.append(stem)
    train = out / "train.txt"
    listed = train.read_text().split() if train.is_file() else []
    atomic_write_text(train, "".join(s + "\n" for s in sorted(set(listed) | set(stems))))
    return stems
