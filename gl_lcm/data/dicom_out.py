"""Write a result back as a derived DICOM image of the film it came from.

The output keeps the input's rows / columns, bits allocated / stored, pixel representation
and photometric interpretation (a MONOCHROME1 film is written back as MONOCHROME1), and
its modality LUT (rescale slope / intercept or sequence). The [0, 1] result is mapped
back into the input's stored-value range by inverting, value by value, the mapping that
:func:`gl_lcm.data.io.read_image_info` applied on read (modality LUT, VOI LUT or window,
MONOCHROME1 flip, min-max). Where the input's window clipped, the inverse lands on the
window's edge (what is clipped cannot be recovered). A new window centre / width,
from the 1st-99th percentiles of the result in modality units, replaces the input's VOI
LUT. UIDs: new SOP Instance and Series Instance UIDs in the input's study; ImageType
DERIVED\\SECONDARY; the input is named in the Source Image Sequence.
"""
from __future__ import annotations

import copy
import datetime
import os
from typing import Tuple, Union

import numpy as np

from gl_lcm.data.io import DicomSource, dicom_display_values
from gl_lcm.utils.atomic import atomic_path

PathLike = Union[str, os.PathLike]

# Elements of the input that no longer describe the derived pixels.
_DROPPED = ("PixelData", "VOILUTSequence", "WindowCenter", "WindowWidth", "WindowCenterWidthExplanation",
            "VOILUTFunction", "SmallestImagePixelValue", "LargestImagePixelValue", "IconImageSequence",
            "NumberOfFrames", "PlanarConfiguration", "LossyImageCompressionRatio",
            "LossyImageCompressionMethod", "DigitalSignaturesSequence", "PixelDataProviderURL")


def stored_range(header) -> Tuple[int, int]:
    """Smallest and largest stored value of the header's BitsStored / PixelRepresentation."""
    bits = int(header.BitsStored)
    if int(header.get("PixelRepresentation", 0)) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def stored_from_image(image01: np.ndarray, source: DicomSource) -> np.ndarray:
    """Invert the read mapping: H x W values in [0, 1] -> int64 stored values of the input's range.

    The forward mapping is evaluated at every possible stored value (at most 2**16), then
    inverted by linear interpolation on its monotone levels. Runs of stored values that read
    as the same level (a window's clipped ends, LUT steps) are represented by the value next
    to the neighbouring level at the ends and by their middle inside, so the result is
    within half a stored unit of the exact inverse wherever the forward map is linear.
    """
    header = source.header
    if source.high == source.low:
        raise ValueError("cannot map a result back into a constant input image's stored values")
    lo, hi = stored_range(header)
    codes = np.arange(lo, hi + 1, dtype=np.int64)
    forward = (dicom_display_values(codes, header) - source.low) / (source.high - source.low)
    if forward[-1] < forward[0]:  # e.g. MONOCHROME1 or a negative slope: make it increasing
        codes, forward = codes[::-1], forward[::-1]
    levels, first = np.unique(forward, return_index=True)  # sorted levels and each one's first index
    last = np.r_[first[1:], len(forward)] - 1 if np.all(np.diff(forward) >= 0) else first
    rep = (codes[first] + codes[last]) / 2.0
    rep[0], rep[-1] = codes[last[0]], codes[first[-1]]
    values = np.interp(np.clip(np.asarray(image01, np.float64), 0.0, 1.0), levels, rep)
    return np.clip(np.rint(values), lo, hi).astype(np.int64)


def soft_tissue_window(stored: np.ndarray, header) -> Tuple[float, float]:
    """Window (centre, width) in modality units spanning the 1st-99th percentiles of ``stored``."""
    from pydicom.pixels import apply_modality_lut

    modality = np.asarray(apply_modality_lut(stored, header), dtype=np.float64)
    p1, p99 = np.percentile(modality, [1, 99])
    width = max(float(p99 - p1), 2.0)
    return float((p1 + p99) / 2.0), width


def derived_dataset(image01: np.ndarray, source: DicomSource, model_description: str):
    """The derived pydicom Dataset (Explicit VR Little Endian) for a result ``image01`` (H x W in [0, 1])."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, SecondaryCaptureImageStorage, generate_uid

    header = source.header
    if int(header.get("SamplesPerPixel", 1)) != 1:
        raise ValueError("DICOM output needs a grayscale (SamplesPerPixel 1) input; write PNG instead")
    rows, cols = int(header.Rows), int(header.Columns)
    if np.asarray(image01).shape != (rows, cols):
        raise ValueError(f"result is {np.asarray(image01).shape}, the input DICOM is {rows}x{cols}")
    stored = stored_from_image(image01, source)

    ds = copy.deepcopy(header)  # element objects are not shared: the source header stays as it was
    for elem in list(ds):
        if elem.keyword in _DROPPED or elem.tag.group & 0xFF00 == 0x6000:  # overlays belong to the source
            del ds[elem.tag]
    now = datetime.datetime.now()
    sop_class = header.get("SOPClassUID", SecondaryCaptureImageStorage)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if "StudyInstanceUID" not in header:  # legacy files may lack it: a new study is all we can say
        ds.StudyInstanceUID = generate_uid()
    ds.SeriesNumber = int(header.get("SeriesNumber", 0) or 0) + 1000
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesDescription = f"Bone suppressed ({model_description})"[:64]
    ds.DerivationDescription = (f"Bone suppression by gl-lcm: {model_description}; values mapped back into "
                                "the source's stored range")[:1024]
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    if "SOPInstanceUID" in header:
        source_item = Dataset()
        source_item.ReferencedSOPClassUID = sop_class
        source_item.ReferencedSOPInstanceUID = header.SOPInstanceUID
        ds.SourceImageSequence = [source_item]

    bits_allocated = int(header.get("BitsAllocated", 16))
    signed = int(header.get("PixelRepresentation", 0)) == 1
    dtype = {(8, False): "u1", (8, True): "i1", (16, False): "<u2", (16, True): "<i2"}.get((bits_allocated, signed))
    if dtype is None:
        raise ValueError(f"DICOM output supports 8 or 16 bits allocated, the input has {bits_allocated}")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = str(header.PhotometricInterpretation)
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, int(header.BitsStored), int(header.BitsStored) - 1
    ds.PixelRepresentation = int(signed)
    centre, width = soft_tissue_window(stored, header)
    ds.WindowCenter, ds.WindowWidth = round(centre, 2), round(width, 2)
    ds.WindowCenterWidthExplanation = "SOFT TISSUE"
    ds.PixelData = stored.astype(dtype).tobytes()
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def write_derived_dicom(path: PathLike, image01: np.ndarray, source: DicomSource, model_description: str) -> None:
    """Write :func:`derived_dataset` to ``path`` atomically (preamble, File Meta, Explicit VR LE)."""
    ds = derived_dataset(image01, source, model_description)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
