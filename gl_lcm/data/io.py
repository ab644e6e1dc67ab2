"""Reading and writing chest X-ray images.

Every reader returns a numpy float32 array H x W in [0, 1] with bone bright (the
convention of the SZCH / JSRT PNGs the published GL-LCM code trains on), plus the
bit depth the file stored. Supported inputs:

- PNG, JPEG, TIFF, BMP: 8-bit or 16-bit, gray or colour (colour is converted to gray
  with OpenCV's ITU-R BT.601 weights, as ``cv2.imread(path, 0)`` in the published
  code). Values are divided by 255 or 65535: no per-image stretching.
- DICOM (``.dcm`` / ``.dicom``, or any file with ``DICM`` at byte 128): uncompressed,
  or compressed (JPEG baseline / extended / lossless, JPEG-LS, JPEG 2000, RLE) through
  pydicom's pixel-data plugins (pylibjpeg with its libjpeg, openjpeg and rle plugins;
  Pillow also decodes JPEG baseline); a syntax with no installed decoder is an error
  naming the package to install. Legacy (ACR-NEMA style) files without preamble / File
  Meta header are read with a :class:`LegacyDicomWarning`. Signed or unsigned pixels,
  modality LUT (rescale slope / intercept or Modality LUT Sequence), then VOI LUT
  Sequence or window when present, MONOCHROME1 inverted after the VOI step as the
  standard says, then min-max to [0, 1]. Bit depth = BitsStored.
- JSRT raw ``.IMG``: 2048 x 2048, 12 bits stored in big-endian uint16, no header
  (JSRT database description: "2048x2048 matrix, 0.175-mm pixels, 12-bit gray scale,
  no header, big-endian raw data"). The values grow with the film's optical density,
  so lungs (dark on film) are high and bone is low: displayed as they are they look
  like a negative, which is why the usual JSRT loaders invert them. We map
  ``1 - raw / 4095`` (fixed scale, no stretching) so bone is bright like the PNGs.

Failures raise :class:`ImageReadError` (a ``ValueError``) or
:class:`ImageFileNotFound` (a ``FileNotFoundError`` and an ``ImageReadError``),
whose message names the file and the problem.
"""
from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import cv2
import numpy as np
import torch

from gl_lcm.utils.atomic import atomic_path

PathLike = Union[str, os.PathLike]

# Lower-case suffixes that list_images() picks up.
IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".img")

JSRT_SIZE = 2048
JSRT_BITS = 12

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*")
_BMP_MAGIC = b"BM"


class ImageReadError(ValueError):
    """An image file could not be read; the message names the file and the problem."""


class ImageFileNotFound(ImageReadError, FileNotFoundError):
    """The image file does not exist."""


def _fail(path: Path, problem: str) -> ImageReadError:
    return ImageReadError(f"cannot read image {path}: {problem}")


# ----------------------------------------------------------------------------- reading


def read_image(path: PathLike, allow_constant: bool = False) -> Tuple[np.ndarray, int]:
    """Read a CXR image file as gray float32 H x W in [0, 1] (bone bright).

    Returns ``(image, bit_depth)`` where ``bit_depth`` is the stored depth
    (8 or 16 for PNG/JPEG/TIFF/BMP, BitsStored for DICOM, 12 for JSRT raw).
    Raises :class:`ImageFileNotFound` for a missing file and :class:`ImageReadError`
    for anything that is not a readable, non-constant 8/16-bit (or 12-bit raw /
    8-16-bit DICOM) gray or colour image. A constant image is an error (an
    "empty" CXR) unless ``allow_constant`` (for masks, which may be all 0 or all 1).
    """
    info = read_image_info(path, allow_constant)
    return info.image, info.bit_depth


def read_image_info(path: PathLike, allow_constant: bool = False) -> ImageInfo:
    """As :func:`read_image`, plus colourfulness and, for DICOM, the header and value mapping."""
    path = Path(path)
    if not path.is_file():
        raise ImageFileNotFound(f"cannot read image {path}: file not found")
    data = path.read_bytes()
    if len(data) == 0:
        raise _fail(path, "file is empty (0 bytes)")

    suffix = path.suffix.lower()
    colourfulness, dicom = 0.0, None
    if suffix in (".dcm", ".dicom") or data[128:132] == b"DICM":
        image, bit_depth, colourfulness, dicom = _read_dicom(path, allow_constant)
    elif suffix == ".img" and not _has_known_magic(data):
        image, bit_depth = _read_jsrt_raw(path, data)
    else:
        image, bit_depth, colourfulness = _read_raster(path, data)

    low, high = float(image.min()), float(image.max())
    if low == high and not allow_constant:
        raise _fail(path, f"empty image: every pixel has the same value ({low:.6g})")
    return ImageInfo(image, bit_depth, colourfulness, dicom)


def _has_known_magic(data: bytes) -> bool:
    return data.startswith((_PNG_MAGIC, _JPEG_MAGIC, *_TIFF_MAGICS))


def _read_raster(path: Path, data: bytes) -> Tuple[np.ndarray, int, float]:
    """PNG / JPEG / TIFF / BMP through OpenCV, with structural checks OpenCV skips."""
    if data.startswith(_PNG_MAGIC):
        kind = "PNG"
        png_depth = _png_bit_depth(path, data)
        if png_depth not in (8, 16):
            raise _fail(path, f"unsupported bit depth: {png_depth}-bit PNG (only 8 and 16 bits are supported)")
        # A PNG ends with its IEND chunk; without it the file was cut short.
        if not data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82"):
            raise _fail(path, "truncated or corrupt PNG (no IEND chunk at the end)")
    elif data.startswith(_JPEG_MAGIC):
        kind = "JPEG"
        # The end-of-image marker closes every complete JPEG stream.
        if b"\xff\xd9" not in data[-1024:]:
            raise _fail(path, "truncated or corrupt JPEG (no end-of-image marker)")
    elif data.startswith(_TIFF_MAGICS):
        kind = "TIFF"
        tiff_problem = _tiff_depth_problem(path)
        if tiff_problem is not None:
            raise _fail(path, f"unsupported bit depth: {tiff_problem} (only 8 and 16-bit unsigned are supported)")
    elif data.startswith(_BMP_MAGIC):
        kind = "BMP"
    else:
        raise _fail(path, "not an image (content is not PNG, JPEG, TIFF, BMP, DICOM or JSRT raw)")

    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise _fail(path, f"truncated or corrupt {kind} file (the decoder failed)")

    if decoded.dtype == np.uint8:
        bit_depth, scale = 8, 255.0
    elif decoded.dtype == np.uint16:
        bit_depth, scale = 16, 65535.0
    else:
        raise _fail(path, f"unsupported bit depth: {kind} with {decoded.dtype} samples (only 8 and 16-bit unsigned)")

    gray = _to_gray(path, decoded)
    colourfulness = _colourfulness(decoded[..., :3] / scale) if decoded.ndim == 3 and decoded.shape[2] >= 3 else 0.0
    return (gray.astype(np.float32) / np.float32(scale)), bit_depth, colourfulness


def _to_gray(path: Path, decoded: np.ndarray) -> np.ndarray:
    if decoded.ndim == 2:
        return decoded
    if decoded.ndim == 3 and decoded.shape[2] == 1:
        return decoded[:, :, 0]
    if decoded.ndim == 3 and decoded.shape[2] == 3:
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2GRAY)
    if decoded.ndim == 3 and decoded.shape[2] == 4:
        return cv2.cvtColor(decoded, cv2.COLOR_BGRA2GRAY)
    raise _fail(path, f"unsupported image layout {decoded.shape}")


def _png_bit_depth(path: Path, data: bytes) -> int:
    # IHDR is always the first chunk: 8-byte signature, 4-byte length, b"IHDR",
    # width, height (4 bytes each), then the bit depth byte.
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise _fail(path, "truncated or corrupt PNG (missing IHDR header)")
    return struct.unpack(">B", data[24:25])[0]


def _tiff_depth_problem(path: Path) -> Union[str, None]:
    """Describe an unsupported TIFF sample format, or None when it is 8/16-bit unsigned.

    OpenCV silently expands 1-bit TIFFs to 0/255, so the header is read with Pillow.
    """
    try:
        from PIL import Image

        with Image.open(path) as im:
            bits = im.tag_v2.get(258, 1)  # BitsPerSample, TIFF default 1
            sample_format = im.tag_v2.get(339, 1)  # 1 unsigned, 2 signed, 3 float
    except Exception:  # OpenCV gets the final say on files Pillow rejects
        return None
    bits = int(bits[0] if isinstance(bits, tuple) else bits)
    sample_format = int(sample_format[0] if isinstance(sample_format, tuple) else sample_format)
    kind = {1: "unsigned", 2: "signed", 3: "floating-point"}.get(sample_format, f"format-{sample_format}")
    if bits in (8, 16) and sample_format == 1:
        return None
    return f"{bits}-bit {kind} TIFF"


def _read_jsrt_raw(path: Path, data: bytes) -> Tuple[np.ndarray, int]:
    expected = JSRT_SIZE * JSRT_SIZE * 2
    if len(data) != expected:
        raise _fail(
            path,
            f"wrong raw size: {len(data)} bytes, a JSRT raw .IMG is {JSRT_SIZE}x{JSRT_SIZE} "
            f"big-endian uint16 = {expected} bytes",
        )
    raw = np.frombuffer(data, dtype=">u2").reshape(JSRT_SIZE, JSRT_SIZE)
    max_value = (1 << JSRT_BITS) - 1
    if int(raw.max()) > max_value:
        raise _fail(path, f"values up to {int(raw.max())} do not fit the 12 bits of a JSRT raw image")
    # High raw values are dark on film: invert so bone is bright.
    image = 1.0 - raw.astype(np.float32) / np.float32(max_value)
    return image.astype(np.float32), JSRT_BITS


# pip packages that decode each compressed transfer syntax (pydicom's pixel-data plugins),
# and an alternative where one exists.
_LIBJPEG = ("pylibjpeg pylibjpeg-libjpeg", "")
_OPENJPEG = ("pylibjpeg pylibjpeg-openjpeg", "")
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": ("pylibjpeg pylibjpeg-libjpeg", " (or Pillow)"),  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": _LIBJPEG,  # JPEG Extended 12-bit
    "1.2.840.10008.1.2.4.57": _LIBJPEG,  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": _LIBJPEG,  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": ("pylibjpeg pylibjpeg-libjpeg", " (or pyjpegls)"),  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": ("pylibjpeg pylibjpeg-libjpeg", " (or pyjpegls)"),  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": _OPENJPEG,  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": _OPENJPEG,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _OPENJPEG,  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": _OPENJPEG,  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": _OPENJPEG,  # HTJ2K
    "1.2.840.10008.1.2.5": ("pylibjpeg pylibjpeg-rle", ""),  # RLE Lossless
}


class LegacyDicomWarning(UserWarning):
    """A DICOM file without the preamble / File Meta header was read (ACR-NEMA style)."""


@dataclass
class DicomSource:
    """What reading a DICOM file did, so that a result can be written back as DICOM.

    ``header``: the data set without its pixel data. ``low`` / ``high``: the display values
    (see :func:`dicom_display_values`) that the [0, 1] image's 0 and 1 stand for.
    """

    header: "object"
    low: float
    high: float


@dataclass
class ImageInfo:
    """Everything :func:`read_image_info` learns about a file.

    ``image``: float32 H x W in [0, 1], bone bright. ``bit_depth``: stored bits.
    ``colourfulness``: mean absolute difference between colour channels in [0, 1]
    (0 for gray files; a photograph scores well above a gray film saved as RGB).
    ``dicom``: :class:`DicomSource` for DICOM files, else None.
    """

    image: np.ndarray
    bit_depth: int
    colourfulness: float = 0.0
    dicom: Optional[DicomSource] = None


def dicom_display_values(stored: np.ndarray, ds) -> np.ndarray:
    """Stored DICOM values -> float64 display values, larger = brighter (bone bright).

    The standard's grayscale pipeline (PS3.3 C.11): modality LUT (Rescale Slope /
    Intercept or Modality LUT Sequence), then the VOI LUT (VOI LUT Sequence, else Window
    Center / Width), then, for MONOCHROME1, a sign flip. The flip must come after the VOI
    step: the window is defined on the modality values, not on their negatives.
    Works on any array of stored values (an image, or every possible stored value).
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(np.asarray(stored), ds)
    with warnings.catch_warnings():
        # The standard feeds the modality output (float after a rescale) to the VOI LUT; pydicom
        # warns about float input to a LUT, which here is what PS3.3 C.11 asks for.
        warnings.filterwarnings("ignore", message="Applying a VOI LUT on a float input")
        values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        values = -values
    return values


def _dcmread(path: Path):
    """pydicom data set of ``path``; legacy files without preamble / File Meta are read with a warning."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    except Exception as exc:  # pydicom raises assorted errors on cut files
        raise _fail(path, f"truncated or corrupt DICOM file ({type(exc).__name__}: {exc})") from exc
    # No 128-byte preamble + "DICM" + File Meta: an ACR-NEMA style (legacy) file, or not DICOM at all.
    try:
        ds = pydicom.dcmread(path, force=True)
        has_image = "PixelData" in ds and "Rows" in ds and "Columns" in ds
    except Exception as exc:
        raise _fail(path, f"not a DICOM file ({type(exc).__name__}: {exc})") from exc
    if not has_image:
        raise _fail(path, "not a DICOM file (no DICOM preamble, and no image elements when read as a legacy file)")
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        syntax = ds.file_meta.TransferSyntaxUID
    warnings.warn(f"{path}: legacy DICOM file without preamble / File Meta header; read with "
                  f"pydicom force=True as {syntax.name}", LegacyDicomWarning, stacklevel=3)
    return ds


def _decode_problem(syntax) -> Optional[str]:
    """Why pydicom cannot decode ``syntax`` here (naming the package to install), or None."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return (f"no DICOM pixel-data decoder exists for transfer syntax {syntax} ({getattr(syntax, 'name', '?')}); "
                "convert the file to an uncompressed transfer syntax first (e.g. `gdcmconv --raw in.dcm out.dcm` "
                "or `dcmdjpeg`)")
    if decoder.is_available:
        return None
    packages, alternative = _DECODER_PACKAGES.get(
        str(syntax), ("pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle", " (or gdcm)"))
    return (f"no decoder installed for transfer syntax {syntax} ({getattr(syntax, 'name', '?')}); "
            f"install one with `pip install {packages}`{alternative}")


def _read_dicom(path: Path, allow_constant: bool) -> Tuple[np.ndarray, int, float, DicomSource]:
    ds = _dcmread(path)
    if "PixelData" not in ds:
        raise _fail(path, "DICOM file has no pixel data")
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 0)) or 0)
    if not 8 <= bits_stored <= 16:
        raise _fail(path, f"unsupported bit depth: DICOM BitsStored = {bits_stored} (only 8 to 16 bits are supported)")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise _fail(path, f"multi-frame DICOM ({ds.NumberOfFrames} frames) is not supported")

    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None:
        problem = _decode_problem(syntax)
        if problem is not None:
            raise _fail(path, problem)
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise _fail(path, f"cannot decode DICOM pixel data (transfer syntax {syntax or 'unknown'}): {exc}") from exc

    colourfulness = 0.0
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        # pydicom hands colour data back as RGB (converted from YBR); weights as cv2 BGR->gray.
        rgb = pixels.astype(np.float64)
        values = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
        colourfulness = _colourfulness(rgb / float((1 << int(ds.get("BitsAllocated", 8))) - 1))
    else:
        values = dicom_display_values(pixels, ds)

    if values.ndim != 2:
        raise _fail(path, f"unsupported DICOM pixel layout {values.shape}")
    header = ds.copy()
    del header.PixelData
    low, high = float(values.min()), float(values.max())
    if low == high:
        if not allow_constant:
            raise _fail(path, f"empty image: every pixel has the same value ({low:.6g})")
        return np.zeros(values.shape, np.float32), bits_stored, colourfulness, DicomSource(header, low, high)
    image = (values - low) / (high - low)
    return image.astype(np.float32), bits_stored, colourfulness, DicomSource(header, low, high)


def _colourfulness(rgb01: np.ndarray) -> float:
    """Mean absolute difference between the channels of an H x W x 3 image in [0, 1]."""
    c = rgb01.astype(np.float32)
    diffs = np.abs(c[..., 0] - c[..., 1]) + np.abs(c[..., 1] - c[..., 2]) + np.abs(c[..., 0] - c[..., 2])
    return float(diffs.mean() / 3)


# ----------------------------------------------------------------------------- writing


def write_png(path: PathLike, image01: np.ndarray, bit_depth: int = 8) -> None:
    """Write a gray H x W image in [0, 1] as an 8-bit or 16-bit PNG, atomically.

    Values are rounded to the nearest level (``round(x * 255)`` or ``* 65535``), so
    reading back an image that came from a PNG of the same depth is exact. Values
    outside [0, 1] are clipped (a PNG cannot hold them); NaN / inf raise ValueError.
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"write_png: bit_depth must be 8 or 16, got {bit_depth}")
    image = np.asarray(image01)
    if image.ndim != 2:
        raise ValueError(f"write_png: expected a gray H x W image, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError(f"write_png: image for {path} contains NaN or inf")
    levels = 255 if bit_depth == 8 else 65535
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    quantised = np.rint(np.clip(image.astype(np.float64), 0.0, 1.0) * levels).astype(dtype)
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"write_png: {path} does not end in .png")
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), quantised):
            raise OSError(f"write_png: OpenCV failed to write {path}")


# ----------------------------------------------------------------------------- tensors


def to_tensor(image01: np.ndarray) -> torch.Tensor:
    """H x W array in [0, 1] -> float32 tensor 1 x H x W in [-1, 1]."""
    image = np.asarray(image01, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"to_tensor: expected H x W, got shape {image.shape}")
    return torch.from_numpy(image * 2.0 - 1.0).unsqueeze(0)


def from_tensor(tensor: torch.Tensor) -> np.ndarray:
    """Tensor 1 x H x W (or H x W, or 1 x 1 x H x W) in [-1, 1] -> float32 H x W in [0, 1].

    Values outside [-1, 1] are clipped (models overshoot slightly).
    """
    t = tensor.detach().to("cpu", torch.float32)
    while t.ndim > 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise ValueError(f"from_tensor: expected a single gray image, got shape {tuple(tensor.shape)}")
    return np.clip((t.numpy() + 1.0) * 0.5, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- folders


def list_images(folder: PathLike) -> Dict[str, Path]:
    """Map file stem -> path for the images directly inside ``folder`` (sorted by stem).

    Only suffixes in :data:`IMAGE_EXTENSIONS` (any case) count; hidden files (such as
    half-written temporary files) are skipped. Raises FileNotFoundError when the
    folder is missing, ValueError when it holds no image or two files share a stem.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    found: Dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        if entry.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if entry.stem in found:
            raise ValueError(
                f"two images share the stem '{entry.stem}' in {folder}: "
                f"{found[entry.stem].name} and {entry.name}; keep only one"
            )
        found[entry.stem] = entry
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in folder {folder}")
    return dict(sorted(found.items()))
