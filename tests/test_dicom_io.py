"""DICOM in: compressed transfer syntaxes, legacy files, VOI LUT sequences, signed pixels,
MONOCHROME1 with a window, missing decoders, and the real DICOMs in ../shared/data/real-cxr."""
from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
import pytest

from gl_lcm.data.io import ImageReadError, LegacyDicomWarning, read_image, read_image_info
from conftest import REPO_ROOT

REAL_CXR = REPO_ROOT.parent / "shared" / "data" / "real-cxr"


def _dataset(stored, photometric="MONOCHROME2", bits_stored=12, signed=False, modality="DX"):
    """An uncompressed Explicit VR LE single-frame data set holding ``stored`` (H x W ints)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16 if bits_stored > 8 else 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = ("<i2" if signed else "<u2") if bits_stored > 8 else ("i1" if signed else "u1")
    ds.PixelData = stored.astype(dtype).tobytes()
    return ds


def _film(shape=(48, 64), levels=4095, seed=0):
    """Smooth test image with every code from 0 to ``levels`` reachable (compressors like smooth input)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    base = 0.5 + 0.35 * np.sin(xx / 7.0) * np.cos(yy / 5.0) + 0.05 * rng.standard_normal(shape)
    codes = np.clip(np.rint(base * levels), 0, levels).astype(np.int64)
    codes.flat[0], codes.flat[1] = 0, levels
    return codes


# ----------------------------------------------------------------------------- compressed


@pytest.mark.parametrize("syntax_name,plugin", [
    ("RLELossless", ""),
    ("JPEG2000Lossless", "pylibjpeg"),
    ("JPEGLSLossless", "pyjpegls"),
])
def test_lossless_compressed_dicom_reads_like_uncompressed(tmp_path, syntax_name, plugin):
    import pydicom.uid

    syntax = getattr(pydicom.uid, syntax_name)
    stored = _film()
    plain = _dataset(stored)
    plain.save_as(tmp_path / "plain.dcm", enforce_file_format=True)
    packed = _dataset(stored)
    try:
        packed.compress(syntax, encoding_plugin=plugin)
    except (RuntimeError, ValueError) as exc:  # encoder plugin absent on this machine
        pytest.skip(f"pydicom cannot encode {syntax_name} here: {exc}")
    packed.save_as(tmp_path / "packed.dcm", enforce_file_format=True)
    assert str(read_image_info(tmp_path / "packed.dcm").dicom.header.file_meta.TransferSyntaxUID) == str(syntax)
    image, depth = read_image(tmp_path / "packed.dcm")
    assert depth == 12
    np.testing.assert_array_equal(image, read_image(tmp_path / "plain.dcm")[0])
    np.testing.assert_allclose(image, stored / 4095.0, atol=1e-6)


def test_jpeg_baseline_dicom_matches_pillow_decode(tmp_path):
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    stored = _film(levels=255)
    buf = io.BytesIO()
    Image.fromarray(stored.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    ds = _dataset(stored, bits_stored=8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    ds.save_as(tmp_path / "jpeg.dcm", enforce_file_format=True)

    reference = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float64)
    reference = (reference - reference.min()) / (reference.max() - reference.min())
    image, depth = read_image(tmp_path / "jpeg.dcm")
    assert depth == 8
    # decoders may differ by one level in the IDCT rounding
    np.testing.assert_allclose(image, reference, atol=1.5 / 255)


def test_transfer_syntax_without_decoder_names_the_fix(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    ds = _dataset(_film())
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "video.dcm", enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"video\.dcm.*no DICOM pixel-data decoder.*MPEG2.*gdcmconv --raw"):
        read_image(tmp_path / "video.dcm")


def test_missing_decoder_plugin_names_the_package(tmp_path, monkeypatch):
    from pydicom.pixels.decoders.base import Decoder
    from pydicom.uid import JPEG2000Lossless

    ds = _dataset(_film())
    ds.compress(JPEG2000Lossless)
    ds.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    # as on a machine without pylibjpeg-openjpeg / gdcm: no plugin available for the syntax
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(ImageReadError, match=r"j2k\.dcm.*JPEG 2000.*pip install pylibjpeg pylibjpeg-openjpeg"):
        read_image(tmp_path / "j2k.dcm")


# ----------------------------------------------------------------------------- legacy, LUTs, sign


def test_legacy_dicom_without_preamble_is_read_with_a_warning(tmp_path):
    stored = _film()
    ds = _dataset(stored)
    ds.save_as(tmp_path / "modern.dcm", enforce_file_format=True)
    # ACR-NEMA style: no preamble, no DICM, no File Meta, implicit VR little endian
    legacy = _dataset(stored)
    del legacy.file_meta
    from pydicom.filewriter import write_dataset

    with open(tmp_path / "legacy.dcm", "wb") as f:
        from pydicom.filebase import DicomFileLike

        fp = DicomFileLike(f)
        fp.is_little_endian, fp.is_implicit_VR = True, True
        write_dataset(fp, legacy)
    assert (tmp_path / "legacy.dcm").read_bytes()[128:132] != b"DICM"
    with pytest.warns(LegacyDicomWarning, match=r"legacy\.dcm.*Implicit VR Little Endian"):
        image, depth = read_image(tmp_path / "legacy.dcm")
    assert depth == 12
    np.testing.assert_array_equal(image, read_image(tmp_path / "modern.dcm")[0])


def test_text_file_named_dcm_is_still_not_dicom(tmp_path):
    (tmp_path / "notes.dcm").write_bytes(b"patient list\n" * 50)
    with pytest.raises(ImageReadError, match=r"notes\.dcm.*not a DICOM file"):
        read_image(tmp_path / "notes.dcm")


def test_voi_lut_sequence_is_applied(tmp_path):
    from pydicom.dataset import Dataset

    stored = _film(levels=1023)
    ds = _dataset(stored, bits_stored=10)
    ds.RescaleSlope, ds.RescaleIntercept = 2.0, -100.0  # LUT input = modality values
    first, n = 50, 1500
    lut = np.rint(4095 * np.sqrt(np.linspace(0, 1, n))).astype(np.uint16)  # a non-linear VOI curve
    item = Dataset()
    item.LUTDescriptor = [n, first, 12]
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    ds.VOILUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = 500, 100  # must be ignored: the sequence wins
    ds.save_as(tmp_path / "voi.dcm", enforce_file_format=True)

    x = 2.0 * stored - 100.0
    y = lut[np.clip(np.rint(x).astype(int) - first, 0, n - 1)].astype(np.float64)  # PS3.3 C.11.2.1.1
    expected = (y - y.min()) / (y.max() - y.min())
    image, _ = read_image(tmp_path / "voi.dcm")
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_signed_pixel_data(tmp_path):
    stored = _film(levels=3000) - 1500  # -1500 .. 1500 in 12 signed bits
    ds = _dataset(stored, bits_stored=12, signed=True)
    ds.save_as(tmp_path / "signed.dcm", enforce_file_format=True)
    image, depth = read_image(tmp_path / "signed.dcm")
    assert depth == 12
    expected = (stored - stored.min()) / (stored.max() - stored.min())
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_monochrome1_window_is_inverted_after_the_window(tmp_path):
    stored = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.int64)
    ds = _dataset(stored, photometric="MONOCHROME1")
    center, width = 1000.0, 801.0  # asymmetric: inverting first would window the wrong values
    ds.WindowCenter, ds.WindowWidth = center, width
    ds.save_as(tmp_path / "m1w.dcm", enforce_file_format=True)
    x = stored.astype(np.float64)
    # PS3.3 C.11.2.1.2 linear window onto 0..1, then MONOCHROME1 display: high values dark
    windowed = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    expected = 1.0 - windowed
    image, _ = read_image(tmp_path / "m1w.dcm")
    np.testing.assert_allclose(image, expected, atol=1e-3)
    assert image[0, 0] == 1.0 and image[-1, -1] == 0.0


# ----------------------------------------------------------------------------- real files


def _real(name: str):
    path = REAL_CXR / name
    if not path.is_file():
        pytest.skip(f"real DICOM sample not found at {path} (needs ../shared/data/real-cxr)")
    return path


@pytest.mark.parametrize("name,shape,bits", [
    ("dicom/cr_mono1_10_chest.dcm", (440, 440), 10),
    ("dicom/nih_cxr14_dx.dcm", (1024, 1024), 8),
    ("dicom/siim_cr_chest.dcm", (1024, 1024), 8),
    ("nonchest/dental_panoramic_cr.dcm", (1576, 1976), 10),
    ("nonchest/mammo_stereo_mg.dcm", (788, 1318), 12),
    ("nonchest/ct_surview_abdomen.dcm", (512, 512), 12),
    ("nonchest/abdomen_xr_ot.dcm", (512, 512), 8),
])
def test_real_dicoms_decode(name, shape, bits):
    path = _real(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyDicomWarning)
        image, depth = read_image(path)
    assert image.shape == shape and depth == bits
    assert 0.05 < float(image.std())


@pytest.mark.parametrize("name", ["dental_panoramic_cr", "mammo_stereo_mg"])
def test_real_jpeg_lossless_matches_its_png_twin(name):
    """The PNG twins were decoded elsewhere (pylibjpeg-libjpeg, percentile window, 1024 px)."""
    dcm, png = _real(f"nonchest/{name}.dcm"), _real(f"nonchest/{name}.png")
    image, _ = read_image(dcm)
    twin, _ = read_image(png)
    small = cv2.resize(image, (twin.shape[1], twin.shape[0]), interpolation=cv2.INTER_AREA)
    assert np.corrcoef(small.ravel(), twin.ravel())[0, 1] > 0.97


def test_real_legacy_monochrome1_chest_reads_bone_bright():
    path = _real("dicom/cr_mono1_10_chest.dcm")
    with pytest.warns(LegacyDicomWarning):
        image, _ = read_image(path)
    h, w = image.shape
    # bone bright: the mediastinum (centre column band) is brighter than the lung fields
    centre = image[h // 4: 3 * h // 4, int(w * 0.45): int(w * 0.55)].mean()
    lungs = np.r_[image[h // 4: 3 * h // 4, int(w * 0.2): int(w * 0.35)].ravel(),
                  image[h // 4: 3 * h // 4, int(w * 0.65): int(w * 0.8)].ravel()].mean()
    assert centre > lungs + 0.05
