"""Harder variants of a real film with its lung mask transformed alike, for robustness benchmarks.

Each variant maps (image01 H x W float32 in [0, 1], mask H x W bool) to a new pair; geometric
variants move the mask with the image (nearest-neighbour), photometric ones leave it unchanged.
Randomness comes from a ``numpy.random.Generator``, so a seeded run gives the same films.
``monochrome1`` goes through a real DICOM file: the film is stored inverted (MONOCHROME1, 12 bits,
with a window) and read back by :func:`gl_lcm.data.io.read_image`, as a clinical CR would be.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Dict, Tuple

import cv2
import numpy as np

Pair = Tuple[np.ndarray, np.ndarray]
BURNED_IN_TEXTS = ("L", "R", "PORTABLE", "AP SUPINE", "ERECT", "12:41", "RT", "LT", "INSP")


def rescale(image01: np.ndarray, mask: np.ndarray, rng: np.random.Generator, low: int = 1500,
            high: int = 2500) -> Pair:
    """Long side to a random size in [low, high] px (cubic for the film, nearest for the mask)."""
    long_side = int(rng.integers(low, high + 1))
    f = long_side / max(image01.shape)
    size = (max(1, round(image01.shape[1] * f)), max(1, round(image01.shape[0] * f)))
    img = np.clip(cv2.resize(image01, size, interpolation=cv2.INTER_CUBIC), 0, 1)
    return img.astype(np.float32), cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0


def crop(image01: np.ndarray, mask: np.ndarray, rng: np.random.Generator, keep: Tuple[float, float] = (0.8, 0.92)) -> Pair:
    """Keep a random window of 80-92 % of each side (lung edges may be cut, as on a tight film)."""
    h, w = image01.shape
    ch, cw = int(h * rng.uniform(*keep)), int(w * rng.uniform(*keep))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return image01[top:top + ch, left:left + cw].copy(), mask[top:top + ch, left:left + cw].copy()


def rotate(image01: np.ndarray, mask: np.ndarray, rng: np.random.Generator, low: float = 5.0,
           high: float = 10.0) -> Pair:
    """Rotate by 5-10 degrees either way about the centre; corners take the edge values."""
    angle = float(rng.uniform(low, high) * rng.choice([-1, 1]))
    h, w = image01.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    img = cv2.warpAffine(image01, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    msk = cv2.warpAffine(mask.astype(np.uint8), m, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
    return img, msk > 0


def gamma(image01: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
    """Gamma 0.5-0.7 or 1.5-2.0 (a different detector response)."""
    g = rng.uniform(0.5, 0.7) if rng.random() < 0.5 else rng.uniform(1.5, 2.0)
    return (np.clip(image01, 0, 1) ** g).astype(np.float32), mask.copy()


def exposure(image01: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
    """Lower contrast (x0.55-0.8) and a brightness shift of +-0.1 (under- or over-exposed film)."""
    c, b = rng.uniform(0.55, 0.8), rng.uniform(-0.1, 0.1)
    return np.clip((image01 - 0.5) * c + 0.5 + b, 0, 1).astype(np.float32), mask.copy()


def collimation(image01: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
    """Dark or bright strips of 3-10 % on two to four sides (collimator shadow / unexposed plate)."""
    img = image01.copy()
    h, w = img.shape
    value = 0.0 if rng.random() < 0.5 else 1.0
    sides = rng.permutation(4)[: int(rng.integers(2, 5))]
    for side in sides:
        frac = rng.uniform(0.03, 0.10)
        if side == 0:
            img[: int(h * frac)] = value
        elif side == 1:
            img[h - int(h * frac):] = value
        elif side == 2:
            img[:, : int(w * frac)] = value
        else:
            img[:, w - int(w * frac):] = value
    return img, mask.copy()


def burned_in_text(image01: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
    """Two to four white text markers (side markers, 'PORTABLE', a time) anywhere on the film."""
    img = (np.clip(image01, 0, 1) * 255).astype(np.uint8)
    h, w = img.shape
    for _ in range(int(rng.integers(2, 5))):
        text = str(rng.choice(BURNED_IN_TEXTS))
        scale = h * rng.uniform(0.03, 0.06) / 22.0  # HERSHEY_SIMPLEX glyphs are ~22 px tall at scale 1
        thick = max(1, int(round(scale * 2)))
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        x = int(rng.integers(0, max(1, w - tw)))
        y = int(rng.integers(th, max(th + 1, h)))
        cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
    return img.astype(np.float32) / 255.0, mask.copy()


def monochrome1(image01: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
    """Store as a 12-bit MONOCHROME1 DICOM (inverted values, a window) and read it back as the suite does."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    from gl_lcm.data.io import read_image

    stored = np.round((1.0 - np.clip(image01, 0, 1)) * 4095).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = stored.tobytes()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "film.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        img, _ = read_image(path)
    return img, mask.copy()


def hard(image01: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
    """All at once: 1.5-2.5k px, rotation, gamma, collimation and burned-in text."""
    pair = (image01, mask)
    for f in (rotate, gamma, collimation, burned_in_text, rescale):
        pair = f(*pair, rng)
    return pair


VARIANTS: Dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], Pair]] = {
    "rescale 1.5-2.5k": rescale,
    "crop": crop,
    "rotate 5-10 deg": rotate,
    "gamma": gamma,
    "exposure": exposure,
    "MONOCHROME1 DICOM": monochrome1,
    "collimation": collimation,
    "burned-in text": burned_in_text,
    "all combined (2k)": hard,
}
