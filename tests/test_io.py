"""Image IO: round trips, format conversions, DICOM / JSRT raw, error messages."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from gl_lcm.data.io import (
    IMAGE_EXTENSIONS,
    JSRT_SIZE,
    ImageFileNotFound,
    ImageReadError,
    from_tensor,
    list_images,
    read_image,
    to_tensor,
    write_png,
)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _random_levels(rng, shape, levels):
    image = rng.integers(0, levels + 1, size=shape)
    image.flat[0], image.flat[1] = 0, levels  # full range, never constant
    return image


# ----------------------------------------------------------------------------- PNG / JPEG / TIFF


@pytest.mark.parametrize("bit_depth,levels,dtype", [(8, 255, np.uint8), (16, 65535, np.uint16)])
def test_png_round_trip_is_exact(tmp_path, rng, bit_depth, levels, dtype):
    codes = _random_levels(rng, (37, 53), levels)
    image = (codes / levels).astype(np.float32)
    path = tmp_path / "img.png"
    write_png(path, image, bit_depth=bit_depth)

    on_disk = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert on_disk.dtype == dtype
    np.testing.assert_array_equal(on_disk, codes)

    back, depth = read_image(path)
    assert depth == bit_depth
    assert back.dtype == np.float32 and back.shape == (37, 53)
    np.testing.assert_array_equal(np.rint(back.astype(np.float64) * levels), codes)
    # and writing what was read reproduces the same file content
    write_png(tmp_path / "again.png", back, bit_depth=bit_depth)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "again.png"), cv2.IMREAD_UNCHANGED), codes)


def test_write_png_clips_rounds_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "x.png"
    write_png(path, np.array([[-0.2, 0.0, 0.5, 1.3]], dtype=np.float32))
    np.testing.assert_array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), [[0, 0, 128, 255]])
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.png"]


def test_write_png_is_atomic(tmp_path, monkeypatch):
    """The target is only ever replaced whole: if the final rename fails, the old file is untouched
    and no temporary file is left (a writer that opens the target itself changes it first)."""
    import gl_lcm.utils.atomic as atomic

    path = tmp_path / "x.png"
    write_png(path, np.zeros((4, 4), np.float32))
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated"):
        write_png(path, np.ones((4, 4), np.float32))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_write_png_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="bit_depth"):
        write_png(tmp_path / "a.png", np.zeros((4, 4)), bit_depth=12)
    with pytest.raises(ValueError, match="NaN"):
        write_png(tmp_path / "a.png", np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="H x W"):
        write_png(tmp_path / "a.png", np.zeros((4, 4, 3)))
    assert not (tmp_path / "a.png").exists()


def test_colour_png_is_converted_to_gray(tmp_path, rng):
    bgr = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    image, depth = read_image(tmp_path / "c.png")
    assert depth == 8 and image.shape == (20, 30)
    b, g, r = (bgr[..., i].astype(np.float64) for i in range(3))
    expected = (0.299 * r + 0.587 * g + 0.114 * b) / 255.0
    np.testing.assert_allclose(image, expected, atol=1.0 / 255 + 1e-6)

    # a gray image stored as 3 equal channels (like the published Fusion_BS files) is exact
    gray = _random_levels(rng, (20, 30), 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "g3.png"), np.dstack([gray] * 3))
    np.testing.assert_array_equal(np.rint(read_image(tmp_path / "g3.png")[0] * 255), gray)


def test_colour_16bit_png_with_alpha(tmp_path, rng):
    gray = _random_levels(rng, (10, 12), 65535).astype(np.uint16)
    bgra = np.dstack([gray, gray, gray, np.full_like(gray, 65535)])
    cv2.imwrite(str(tmp_path / "c16.png"), bgra)
    image, depth = read_image(tmp_path / "c16.png")
    assert depth == 16
    np.testing.assert_allclose(image, gray / 65535.0, atol=2.0 / 65535)


def test_jpeg_reads_close_to_source(tmp_path):
    yy, xx = np.mgrid[0:64, 0:64]
    smooth = (40 + 3 * xx + yy).astype(np.uint8)  # smooth ramp: JPEG keeps it within a few levels
    cv2.imwrite(str(tmp_path / "a.jpg"), smooth, [cv2.IMWRITE_JPEG_QUALITY, 100])
    image, depth = read_image(tmp_path / "a.jpg")
    assert depth == 8 and image.shape == (64, 64)
    assert np.max(np.abs(image * 255 - smooth)) <= 3


def test_tiff_16bit_is_exact(tmp_path, rng):
    codes = _random_levels(rng, (33, 17), 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "a.tif"), codes)
    image, depth = read_image(tmp_path / "a.tif")
    assert depth == 16
    np.testing.assert_array_equal(np.rint(image.astype(np.float64) * 65535), codes)


def test_tensor_conversion_round_trip(rng):
    image = rng.random((6, 9)).astype(np.float32)
    tensor = to_tensor(image)
    assert tensor.shape == (1, 6, 9) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor, torch.from_numpy(image)[None] * 2 - 1)
    np.testing.assert_allclose(from_tensor(tensor), image, atol=1e-6)
    np.testing.assert_allclose(from_tensor(tensor[None]), image, atol=1e-6)
    # model overshoot is clipped back into [0, 1]
    np.testing.assert_array_equal(from_tensor(torch.tensor([[[-1.5, 1.2]]])), [[0.0, 1.0]])
    with pytest.raises(ValueError, match="single gray image"):
        from_tensor(torch.zeros(3, 4, 4))


def test_real_szch_images_read(szch_dir):
    for name in ("CXR", "BS"):
        image, depth = read_image(szch_dir / name / "0.png")
        assert depth == 8 and image.shape == (1024, 1024) and image.dtype == np.float32
        raw = cv2.imread(str(szch_dir / name / "0.png"), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(np.rint(image * 255).astype(np.uint8), raw)


# ----------------------------------------------------------------------------- DICOM


def _write_dicom(path, stored, photometric, slope=1.0, intercept=0.0, window=None, with_suffix=True):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_rescale_and_photometric(tmp_path, rng, photometric):
    stored = _random_levels(rng, (16, 24), 4095).astype(np.uint16)
    # a negative slope flips contrast: only visible if the modality LUT is applied
    _write_dicom(tmp_path / "a.dcm", stored, photometric, slope=-2.0, intercept=100.0)
    image, depth = read_image(tmp_path / "a.dcm")
    assert depth == 12 and image.shape == stored.shape
    values = -2.0 * stored.astype(np.float64) + 100.0
    if photometric == "MONOCHROME1":
        values = -values
    expected = (values - values.min()) / (values.max() - values.min())
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert image.min() == 0.0 and image.max() == 1.0


def test_dicom_monochrome1_is_inverse_of_monochrome2(tmp_path, rng):
    stored = _random_levels(rng, (8, 8), 4095).astype(np.uint16)
    _write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1")
    _write_dicom(tmp_path / "m2.dcm", stored, "MONOCHROME2")
    np.testing.assert_allclose(read_image(tmp_path / "m1.dcm")[0], 1.0 - read_image(tmp_path / "m2.dcm")[0], atol=1e-6)


def test_dicom_window_applied_after_rescale(tmp_path):
    stored = np.linspace(0, 4000, 64).reshape(8, 8).astype(np.uint16)
    slope, intercept, center, width = 0.5, -1000.0, 0.0, 1001.0
    _write_dicom(tmp_path / "w.dcm", stored, "MONOCHROME2", slope, intercept, window=(center, width))
    image, _ = read_image(tmp_path / "w.dcm")
    x = slope * stored.astype(np.float64) + intercept  # -1000 .. 1000
    # DICOM linear window, written out from PS3.3 C.11.2.1.2, on a 0..1 output range
    expected = np.empty_like(x)
    for idx, value in np.ndenumerate(x):
        if value <= center - 0.5 - (width - 1) / 2:
            expected[idx] = 0.0
        elif value > center - 0.5 + (width - 1) / 2:
            expected[idx] = 1.0
        else:
            expected[idx] = (value - (center - 0.5)) / (width - 1) + 0.5
    np.testing.assert_allclose(image, expected, atol=1e-4)
    assert np.sum(image == 0.0) > 10 and np.sum(image == 1.0) > 10  # the window really clipped


def test_dicom_monochrome1_window_then_invert(tmp_path):
    """MONOCHROME1 with a VOI window: window first (pydicom's own LUT functions), then invert.
    Inverting first would move every value out of the window and give a constant image."""
    from pydicom import dcmread
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    stored = np.linspace(0, 4000, 96).reshape(8, 12).astype(np.uint16)
    _write_dicom(tmp_path / "m1w.dcm", stored, "MONOCHROME1", 1.0, 0.0, window=(1500.0, 1200.0))
    ds = dcmread(tmp_path / "m1w.dcm")
    windowed = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    expected = (windowed.max() - windowed) / (windowed.max() - windowed.min())  # bright = low stored value
    image, _ = read_image(tmp_path / "m1w.dcm")
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert image[0, 0] == 1.0 and image[-1, -1] == 0.0  # low stored values are bright in MONOCHROME1
    assert np.sum(image == 1.0) > 10 and np.sum(image == 0.0) > 10  # the window really clipped


def test_dicom_detected_by_magic_without_suffix(tmp_path, rng):
    stored = _random_levels(rng, (8, 8), 4095).astype(np.uint16)
    _write_dicom(tmp_path / "noext", stored, "MONOCHROME2")
    image, depth = read_image(tmp_path / "noext")
    assert depth == 12
    np.testing.assert_allclose(image, stored / 4095.0, atol=1e-6)


# ----------------------------------------------------------------------------- JSRT raw


def test_jsrt_raw_big_endian_inverted(tmp_path, rng):
    raw = rng.integers(0, 4096, size=(JSRT_SIZE, JSRT_SIZE)).astype(np.uint16)
    raw[0, 0], raw[0, 1] = 0, 4095
    (tmp_path / "JPCLN001.IMG").write_bytes(raw.astype(">u2").tobytes())
    image, depth = read_image(tmp_path / "JPCLN001.IMG")
    assert depth == 12 and image.shape == (JSRT_SIZE, JSRT_SIZE)
    np.testing.assert_allclose(image, 1.0 - raw / 4095.0, atol=1e-6)
    # byte order matters: a little-endian reading would give different values
    assert image[0, 1] == 0.0 and image[0, 0] == 1.0


def test_jsrt_raw_wrong_size(tmp_path):
    path = tmp_path / "short.img"
    path.write_bytes(b"\x01\x02" * 1000)
    with pytest.raises(ImageReadError, match=r"short\.img.*wrong raw size: 2000 bytes"):
        read_image(path)


def test_jsrt_raw_values_beyond_12_bits(tmp_path):
    raw = np.full((JSRT_SIZE, JSRT_SIZE), 100, dtype=np.uint16)
    raw[5, 5] = 5000
    (tmp_path / "big.IMG").write_bytes(raw.astype(">u2").tobytes())
    with pytest.raises(ImageReadError, match=r"big\.IMG.*12 bits"):
        read_image(tmp_path / "big.IMG")


# ----------------------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png.*not found") as info:
        read_image(path)
    assert isinstance(info.value, ImageFileNotFound) and isinstance(info.value, ImageReadError)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "fake.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageReadError, match=r"fake\.png.*not an image"):
        read_image(path)


def test_truncated_png(tmp_path, rng):
    full = tmp_path / "full.png"
    cv2.imwrite(str(full), _random_levels(rng, (64, 64), 255).astype(np.uint8))
    data = full.read_bytes()
    for cut in (len(data) // 2, len(data) - 5):
        path = tmp_path / "cut.png"
        path.write_bytes(data[:cut])
        with pytest.raises(ImageReadError, match=r"cut\.png.*truncated or corrupt PNG"):
            read_image(path)


def test_truncated_jpeg(tmp_path, rng):
    full = tmp_path / "full.jpg"
    cv2.imwrite(str(full), _random_levels(rng, (64, 64), 255).astype(np.uint8))
    (tmp_path / "cut.jpg").write_bytes(full.read_bytes()[:-200])
    with pytest.raises(ImageReadError, match=r"cut\.jpg.*truncated or corrupt JPEG"):
        read_image(tmp_path / "cut.jpg")


def test_empty_file_and_constant_image(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"zero\.png.*0 bytes"):
        read_image(tmp_path / "zero.png")
    cv2.imwrite(str(tmp_path / "flat.png"), np.full((16, 16), 77, np.uint8))
    with pytest.raises(ImageReadError, match=r"flat\.png.*empty image.*same value"):
        read_image(tmp_path / "flat.png")
    image, _ = read_image(tmp_path / "flat.png", allow_constant=True)  # masks may be constant
    np.testing.assert_allclose(image, 77 / 255)


def test_unsupported_bit_depths(tmp_path, rng):
    from PIL import Image

    binary = rng.random((16, 16)) > 0.5
    Image.fromarray(binary).save(tmp_path / "one_bit.png")
    with pytest.raises(ImageReadError, match=r"one_bit\.png.*unsupported bit depth: 1-bit PNG"):
        read_image(tmp_path / "one_bit.png")

    Image.fromarray(binary).save(tmp_path / "one_bit.tif")
    with pytest.raises(ImageReadError, match=r"one_bit\.tif.*unsupported bit depth: 1-bit"):
        read_image(tmp_path / "one_bit.tif")

    cv2.imwrite(str(tmp_path / "float.tif"), rng.random((16, 16)).astype(np.float32))
    with pytest.raises(ImageReadError, match=r"float\.tif.*unsupported bit depth: 32-bit floating-point"):
        read_image(tmp_path / "float.tif")


def test_not_a_dicom_and_truncated_dicom(tmp_path, rng):
    (tmp_path / "fake.dcm").write_text("hello")
    with pytest.raises(ImageReadError, match=r"fake\.dcm.*not a DICOM file"):
        read_image(tmp_path / "fake.dcm")
    stored = _random_levels(rng, (32, 32), 4095).astype(np.uint16)
    _write_dicom(tmp_path / "ok.dcm", stored, "MONOCHROME2")
    data = (tmp_path / "ok.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 700])
    with pytest.raises(ImageReadError, match=r"cut\.dcm.*cannot decode DICOM pixel data"):
        read_image(tmp_path / "cut.dcm")


# ----------------------------------------------------------------------------- folders


def test_list_images(tmp_path):
    for name in ("b.png", "a.JPG", "c.dcm", "notes.txt", ".a.tmp.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    found = list_images(tmp_path)
    assert list(found) == ["a", "b", "c"]
    assert found["a"] == tmp_path / "a.JPG"
    assert ".png" in IMAGE_EXTENSIONS and ".img" in IMAGE_EXTENSIONS


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        list_images(tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no images.*empty"):
        list_images(tmp_path / "empty")
    (tmp_path / "dup").mkdir()
    (tmp_path / "dup" / "7.png").write_bytes(b"x")
    (tmp_path / "dup" / "7.tif").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"stem '7'.*7\.png and 7\.tif"):
        list_images(tmp_path / "dup")
