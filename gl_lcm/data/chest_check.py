"""Is this input a frontal chest radiograph? Metadata and image checks, each with a reason.

Two independent gates, pure functions:

- :func:`dicom_metadata_problem`: a DICOM header whose Modality is not a projection
  radiograph (CR, DX, DR, RG), or whose BodyPartExamined is present and not a chest
  value. ``--allow-non-chest`` switches this gate off (for mislabelled headers).
- :func:`image_plausibility`: what the pixels say, on any file type. It refuses colour
  photographs, blank and noise images, and images whose layout is not a frontal chest
  film (a large empty background joined to the border, as around a CT slice, a hand,
  a dental panoramic or a mammogram; or no pair of dark lung fields beside a brighter
  mediastinum, as in skull films). It is always on.

The image features are measured on a 256 x 256 copy of the bone-bright [0, 1] image with
letterbox padding (constant border rows / columns) removed, intensities rescaled so the
1st / 99th percentiles are 0 / 1. The thresholds are ours, set on the films in
``shared/data/real-cxr`` and ``shared/data/szch-sample`` (55 chest films from JSRT,
Shenzhen, NIH, SIIM, COVID teaching files, Gusarev DES, SZCH) and its non-chest films
(dental panoramic, mammogram, abdominal film, CT scout), plus the built-in phantoms.
Measured ranges (chest films / non-chest films) are given with each threshold; they come
from few films, so they are plausibility limits, not a classifier.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import cv2
import numpy as np

# ---- metadata
# Projection radiography modalities (DICOM PS3.3 C.7.3.1.1.1: CR computed radiography,
# DX digital radiography, RG radiographic imaging; DR is a retired code still written by some devices).
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR", "RG")
# Substrings of BodyPartExamined that mean chest (DICOM defined term CHEST, plus THORAX /
# LUNG variants and Spanish / Italian / Portuguese spellings seen in the wild).
CHEST_BODY_PARTS = ("CHEST", "THORAX", "THORAC", "TORAX", "TORACE", "LUNG", "PULMO", "CXR")

# ---- image features (see module docstring; values measured on shared/data/real-cxr)
CHECK_SIZE = 256  # features are computed on a CHECK_SIZE x CHECK_SIZE copy
MIN_SIDE_PX = 32  # smaller than this is an icon, not a radiograph (32 px phantoms serve in tests)
MAX_ASPECT = 1.8  # long / short side, padding removed; chest films 1.00-1.27, panoramic strips ~2
MAX_COLOURFULNESS = 0.04  # mean |channel difference| in [0, 1]; gray films saved as RGB score < 0.01
MIN_CONTRAST = 0.08  # 99th - 1st percentile of [0, 1] values; chest films 0.40-1.00
MIN_NEIGHBOUR_CORR = 0.70  # correlation of horizontally adjacent pixels; chest 0.96-1.00, white noise ~0
DARK_LEVEL = 0.08  # "empty background" = below this on the 1-99 percentile scale
MAX_BACKGROUND = 0.25  # share of the image that is dark background joined to the border;
#                        chest films 0.00-0.19; CT scout 0.27, mammogram 0.30, abdominal film
#                        0.38, dental panoramic 0.47
MIN_MEDIASTINUM_CONTRAST = 0.10  # brightest centre column minus the brighter lung field minimum,
#                                  in rows 25-60 %; chest films 0.14-0.82, mammogram 0.07, uniform skull ~0

_BORDER_STD = 1e-3  # a border row / column this flat is padding


class NonChestInputError(ValueError):
    """The input is not a frontal chest radiograph; the message names the file and the reason."""


@dataclass
class ChestCheck:
    """Outcome of :func:`image_plausibility`: ``ok``, a reason when not, and the measured features."""

    ok: bool
    reason: str = ""
    features: Dict[str, float] = field(default_factory=dict)
    kind: str = ""  # which check failed: size, colour, blank, noise, shape, background, layout


def dicom_metadata_problem(header) -> Optional[str]:
    """Why a DICOM header says "not a chest radiograph", or None when it does not say so.

    ``header``: a pydicom Dataset (pixel data not needed). Missing Modality or
    BodyPartExamined are not held against the file (many exports drop them).
    """
    modality = str(header.get("Modality", "") or "").strip().upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        return (f"DICOM Modality is {modality}, not a projection radiograph "
                f"({', '.join(RADIOGRAPH_MODALITIES)}); only chest radiographs are supported "
                "(use --allow-non-chest if the header is wrong)")
    body_part = str(header.get("BodyPartExamined", "") or "").strip().upper()
    if body_part and not any(k in body_part for k in CHEST_BODY_PARTS):
        return (f"DICOM BodyPartExamined is {body_part}, not the chest; only chest radiographs are supported "
                "(use --allow-non-chest if the header is wrong)")
    return None


def _strip_padding(image: np.ndarray) -> np.ndarray:
    """Drop letterbox padding: constant border rows, or constant border columns, not both.

    A film padded to a square is padded along one axis. Constant bands on all four sides are
    what surrounds a CT slice or an extremity, and are kept so that they count as background.
    """
    rows = np.flatnonzero(image.std(axis=1) > _BORDER_STD)
    cols = np.flatnonzero(image.std(axis=0) > _BORDER_STD)
    if rows.size == 0 or cols.size == 0:
        return image
    pad_rows = rows[0] > 0 or rows[-1] < image.shape[0] - 1
    pad_cols = cols[0] > 0 or cols[-1] < image.shape[1] - 1
    if pad_rows and pad_cols:
        return image
    if pad_rows and rows.size >= image.shape[0] // 3:
        return image[rows[0]:rows[-1] + 1]
    if pad_cols and cols.size >= image.shape[1] // 3:
        return image[:, cols[0]:cols[-1] + 1]
    return image


def image_features(image01: np.ndarray) -> Dict[str, float]:
    """Plausibility features of a bone-bright H x W image in [0, 1] (see the thresholds above).

    Returns contrast, neighbour_corr, background (share), mediastinum (contrast) and aspect
    (long / short side of the content with letterbox padding removed).
    """
    image = np.asarray(image01, dtype=np.float32)
    core = _strip_padding(image)
    ch, cw = core.shape
    small = cv2.resize(core, (CHECK_SIZE, CHECK_SIZE), interpolation=cv2.INTER_AREA).astype(np.float64)
    p1, p99 = np.percentile(small, [1, 99])
    contrast = float(p99 - p1)
    n = (small - p1) / max(contrast, 1e-6)
    a, b = n[:, :-1].ravel(), n[:, 1:].ravel()
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0

    # dark background connected to the image border (air around a body part)
    count, labels = cv2.connectedComponents((n < DARK_LEVEL).astype(np.uint8), connectivity=4)
    edge = np.unique(np.r_[labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    edge = edge[edge > 0]
    background = float(np.isin(labels, edge).mean()) if edge.size else 0.0

    # frontal chest layout: a bright central column (mediastinum, spine) between two dark lung fields
    s = CHECK_SIZE
    profile = np.convolve(n[int(0.25 * s):int(0.60 * s)].mean(axis=0), np.ones(9) / 9, mode="same")
    centre = profile[int(0.40 * s):int(0.60 * s)].max()
    left = profile[int(0.12 * s):int(0.42 * s)].min()
    right = profile[int(0.58 * s):int(0.88 * s)].min()
    return {"contrast": contrast, "neighbour_corr": corr, "background": background,
            "mediastinum": float(centre - max(left, right)), "aspect": float(max(ch, cw) / max(min(ch, cw), 1))}


def image_plausibility(image01: np.ndarray, colourfulness: float = 0.0) -> ChestCheck:
    """Does a bone-bright H x W image in [0, 1] look like a frontal chest radiograph?

    ``colourfulness``: as measured by the reader on the file's colour channels (0 for gray).
    Checks run in order (size, colour, blank, noise, shape, background, layout); the first
    that fails gives the reason. (The layout features do not tell a negative from a positive
    film reliably, so no "is it a negative?" hint is given.)
    """
    return _plausibility(image01, colourfulness)


def _plausibility(image01: np.ndarray, colourfulness: float) -> ChestCheck:
    h, w = np.asarray(image01).shape[:2]
    if min(h, w) < MIN_SIDE_PX:
        return ChestCheck(False, f"image is {w}x{h} px, too small for a radiograph (at least {MIN_SIDE_PX} px a side)",
                          kind="size")
    if colourfulness > MAX_COLOURFULNESS:
        return ChestCheck(False, f"colour image (colourfulness {colourfulness:.3f} > {MAX_COLOURFULNESS}): "
                                 "looks like a photograph, not a radiograph", kind="colour")
    f = image_features(image01)
    if f["contrast"] < MIN_CONTRAST:
        return ChestCheck(False, f"blank image (1-99 % intensity spread {f['contrast']:.3f} < {MIN_CONTRAST})", f,
                          kind="blank")
    if f["neighbour_corr"] < MIN_NEIGHBOUR_CORR:
        return ChestCheck(False, f"noise image (neighbouring pixels correlate at {f['neighbour_corr']:.2f} "
                                 f"< {MIN_NEIGHBOUR_CORR}; a radiograph is smooth)", f, kind="noise")
    if f["aspect"] > MAX_ASPECT:
        return ChestCheck(False, f"image content (padding removed) is {f['aspect']:.2f} times as long as wide "
                                 f"(> {MAX_ASPECT}): not the shape of a chest film (a dental panoramic or "
                                 "extremity film?)", f, kind="shape")
    if f["background"] > MAX_BACKGROUND:
        return ChestCheck(False, f"{100 * f['background']:.0f} % of the image is empty dark background "
                                 f"(a chest film has at most {100 * MAX_BACKGROUND:.0f} %): looks like a CT slice, "
                                 "an extremity, skull, dental film or mammogram, not a frontal chest radiograph", f,
                          kind="background")
    if f["mediastinum"] < MIN_MEDIASTINUM_CONTRAST:
        return ChestCheck(False, "no frontal chest layout: no two dark lung fields beside a brighter mediastinum "
                                 f"(contrast {f['mediastinum']:.2f} < {MIN_MEDIASTINUM_CONTRAST})", f, kind="layout")
    return ChestCheck(True, "", f)


def check_chest_input(name: str, image01: np.ndarray, colourfulness: float = 0.0, dicom_header=None,
                      allow_non_chest: bool = False) -> None:
    """Raise :class:`NonChestInputError` naming ``name`` and the reason when the input is not a chest film.

    ``allow_non_chest`` skips the DICOM metadata checks only; the image checks always run.
    """
    if dicom_header is not None and not allow_non_chest:
        problem = dicom_metadata_problem(dicom_header)
        if problem:
            raise NonChestInputError(f"{name}: refused: {problem}")
    check = image_plausibility(image01, colourfulness)
    if not check.ok:
        raise NonChestInputError(f"{name}: refused as not a chest radiograph: {check.reason}")
