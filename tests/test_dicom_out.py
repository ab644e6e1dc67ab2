"""DICOM out: derived-image tags, stored values mapped back within one unit, PNG bit depth kept."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from conftest import REPO_ROOT
from gl_lcm.data.io import LegacyDicomWarning, dicom_display_values, read_image, write_png
from gl_lcm.data.phantom import generate_phantom
from test_dicom_io import _dataset

REAL_CXR = REPO_ROOT.parent / "shared" / "data" / "real-cxr"


class StandIn:
    """An inference engine whose soft-tissue output is a known function of its input (classical lung masks)."""

    def __init__(self, fn):
        from gl_lcm.inference import Segmenter

        self.fn = fn
        self.segment = lambda name, image, cache_dir=None, overwrite=False: Segmenter("classical")(name, image)

    def run(self, names, images, masks, guidance_mode=None):
        return [SimpleNamespace(name=n, fused=self.fn(im).astype(np.float32)) for n, im in zip(names, images)]


@pytest.fixture(scope="module")
def cfg():
    from gl_lcm.config import load_config

    return load_config(None, ["device=cpu"])


def _film_dicom(path, photometric="MONOCHROME2", slope=1.0, intercept=0.0, window=None, signed=False, seed=2):
    """A 12-bit DICOM of a 256 px chest phantom (stored values spanning most of the range), with study tags."""
    cxr = generate_phantom(256, seed).cxr.astype(np.float64)
    stored = np.rint(200 + cxr * 3600).astype(np.int64)  # 200 .. 3800
    if photometric == "MONOCHROME1":
        stored = 4000 - stored  # bone dark on the stored values
    if signed:
        stored = stored - 2048
    ds = _dataset(stored, photometric=photometric, signed=signed, modality="CR")
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "P123", "19700101", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240102", "101010", "ACC9", "S1"
    ds.SeriesNumber, ds.InstanceNumber, ds.BodyPartExamined = 3, 1, "CHEST"
    ds.save_as(path, enforce_file_format=True)
    return stored


def _suppress(cfg, src, dst, fn, **kw):
    from gl_lcm.jobs.suppress import suppress_path

    counts = suppress_path(cfg, str(src), str(dst), engine=StandIn(fn), **kw)
    assert counts.succeeded >= 1 and counts.failed == 0
    return counts


def test_derived_dicom_tags(cfg, tmp_path):
    _film_dicom(tmp_path / "film.dcm", "MONOCHROME1", slope=0.5, intercept=-100.0, window=(800.0, 1500.0))
    _suppress(cfg, tmp_path / "film.dcm", tmp_path / "soft.dcm", lambda x: x)
    src, out = pydicom.dcmread(tmp_path / "film.dcm"), pydicom.dcmread(tmp_path / "soft.dcm")
    assert out.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    for tag in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                "PhotometricInterpretation", "SOPClassUID", "StudyInstanceUID", "PatientName", "PatientID",
                "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                "Modality", "BodyPartExamined", "RescaleSlope", "RescaleIntercept"):
        assert out[tag].value == src[tag].value, (tag, out[tag].value, src[tag].value)
    assert out.PhotometricInterpretation == "MONOCHROME1"
    assert out.SOPInstanceUID != src.SOPInstanceUID and out.SeriesInstanceUID != src.SeriesInstanceUID
    assert list(out.ImageType) == ["DERIVED", "SECONDARY"]
    assert "Bone suppressed" in out.SeriesDescription and "GL-LCM" in out.SeriesDescription
    assert "Bone suppression" in out.DerivationDescription and "GL-LCM student" in out.DerivationDescription
    assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert out.SeriesNumber == 1003
    # the soft-tissue window spans the result's 1-99 % modality values
    modality = out.pixel_array.astype(np.float64) * 0.5 - 100.0
    p1, p99 = np.percentile(modality, [1, 99])
    assert float(out.WindowCenter) == pytest.approx((p1 + p99) / 2, abs=0.01)
    assert float(out.WindowWidth) == pytest.approx(p99 - p1, abs=0.01)
    assert out.pixel_array.shape == (256, 256) and out.pixel_array.dtype == np.uint16


@pytest.mark.parametrize("photometric,signed", [("MONOCHROME2", False), ("MONOCHROME1", False),
                                                ("MONOCHROME2", True)])
def test_identity_round_trip_gives_back_the_stored_values(cfg, tmp_path, photometric, signed):
    stored = _film_dicom(tmp_path / "film.dcm", photometric, slope=2.0, intercept=-50.0, signed=signed)
    _suppress(cfg, tmp_path / "film.dcm", tmp_path / "soft.dcm", lambda x: x)
    back = pydicom.dcmread(tmp_path / "soft.dcm").pixel_array.astype(np.int64)
    assert np.abs(back - stored).max() <= 1


def test_known_function_round_trip_within_one_stored_unit(cfg, tmp_path):
    stored = _film_dicom(tmp_path / "film.dcm", "MONOCHROME1")
    _suppress(cfg, tmp_path / "film.dcm", tmp_path / "soft.dcm", lambda x: x ** 2)
    # direct computation: MONOCHROME1 without window reads as (max - s) / (max - min), bone bright
    smin, smax = stored.min(), stored.max()
    image = (smax - stored) / (smax - smin)
    expected = smax - image ** 2 * (smax - smin)
    back = pydicom.dcmread(tmp_path / "soft.dcm").pixel_array.astype(np.float64)
    assert np.abs(back - expected).max() <= 1.0


def test_clipping_window_is_inverted_inside_the_window(cfg, tmp_path):
    slope, intercept, centre, width = 1.0, -1000.0, 1000.0, 1801.0
    stored = _film_dicom(tmp_path / "film.dcm", "MONOCHROME2", slope, intercept, window=(centre, width))
    _suppress(cfg, tmp_path / "film.dcm", tmp_path / "soft.dcm", lambda x: 1.0 - x)
    x = slope * stored + intercept
    inside = (x > centre - 0.5 - (width - 1) / 2 + 2) & (x < centre - 0.5 + (width - 1) / 2 - 2)
    assert 0.2 < inside.mean() < 0.95  # the window really clips some of the film
    image = (x - (centre - 0.5)) / (width - 1) + 0.5  # PS3.3 C.11.2.1.2 on 0..1
    y = 1.0 - image
    expected = ((centre - 0.5 + (y - 0.5) * (width - 1)) - intercept) / slope
    back = pydicom.dcmread(tmp_path / "soft.dcm").pixel_array.astype(np.float64)
    assert np.abs(back - expected)[inside].max() <= 1.0


def test_folder_of_dicoms_to_folder(cfg, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _film_dicom(src / "a.dcm", seed=1)
    _film_dicom(src / "b.dcm", "MONOCHROME1", seed=2)
    write_png(src / "c.png", generate_phantom(256, 3).cxr)
    _suppress(cfg, src, tmp_path / "out", lambda x: x)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.dcm", "b.dcm", "c.png"]
    assert pydicom.dcmread(tmp_path / "out" / "b.dcm").PhotometricInterpretation == "MONOCHROME1"
    # PNG forced for everything: DICOM inputs give 16-bit PNGs at their size
    _suppress(cfg, src, tmp_path / "png", lambda x: x, output_format="png")
    image, depth = read_image(tmp_path / "png" / "a.png")
    assert depth == 16 and image.shape == (256, 256)
    assert read_image(tmp_path / "png" / "c.png")[1] == 8


def test_png_output_keeps_the_input_bit_depth(cfg, tmp_path):
    cxr = generate_phantom(256, 4).cxr
    write_png(tmp_path / "deep.png", cxr, 16)
    write_png(tmp_path / "flat.png", cxr, 8)
    _suppress(cfg, tmp_path / "deep.png", tmp_path / "deep_out.png", lambda x: x)
    _suppress(cfg, tmp_path / "flat.png", tmp_path / "flat_out.png", lambda x: x)
    assert read_image(tmp_path / "deep_out.png")[1] == 16
    assert read_image(tmp_path / "flat_out.png")[1] == 8
    _suppress(cfg, tmp_path / "deep.png", tmp_path / "forced.png", lambda x: x, bit_depth=8)
    assert read_image(tmp_path / "forced.png")[1] == 8
    # and the 16-bit output really carries the extra levels
    back, _ = read_image(tmp_path / "deep_out.png")
    assert np.abs(back - cxr).max() < 1.0 / 65535 + 1e-6


def test_dicom_output_from_a_png_is_an_error(cfg, tmp_path):
    from gl_lcm.jobs.suppress import suppress_path

    write_png(tmp_path / "film.png", generate_phantom(256, 4).cxr)
    counts = suppress_path(cfg, str(tmp_path / "film.png"), str(tmp_path / "soft.dcm"), engine=StandIn(lambda x: x))
    assert counts.failed == 1
    assert "DICOM output needs a DICOM input" in (tmp_path / "errors.csv").read_text()


@pytest.mark.parametrize("name", ["cr_mono1_10_chest.dcm", "nih_cxr14_dx.dcm", "siim_cr_chest.dcm"])
def test_real_dicom_round_trip(cfg, tmp_path, name):
    path = REAL_CXR / "dicom" / name
    if not path.is_file():
        pytest.skip(f"real DICOM not found at {path} (needs ../shared/data/real-cxr)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyDicomWarning)
        _suppress(cfg, path, tmp_path / "soft.dcm", lambda x: x)
        src = pydicom.dcmread(path, force=True)
        if "TransferSyntaxUID" not in src.file_meta:
            src.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        src_display = dicom_display_values(src.pixel_array, src)
    out = pydicom.dcmread(tmp_path / "soft.dcm")
    assert out.pixel_array.shape == src.pixel_array.shape
    assert out.PhotometricInterpretation == src.PhotometricInterpretation
    # through the source's own display mapping, the identity result shows the same picture
    out_display = dicom_display_values(out.pixel_array, src)
    step = np.abs(np.diff(np.unique(src_display))).min()
    assert np.abs(out_display - src_display).max() <= step + 1e-9
