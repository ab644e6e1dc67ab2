"""Non-chest inputs refused with a reason: DICOM metadata, image plausibility, and the batch commands."""
from __future__ import annotations

import csv
import glob
import warnings

import cv2
import numpy as np
import pytest

from conftest import REPO_ROOT, SZCH_DIR
from gl_lcm.data.chest_check import (
    NonChestInputError,
    check_chest_input,
    dicom_metadata_problem,
    image_plausibility,
)
from gl_lcm.data.io import LegacyDicomWarning, read_image_info, write_png
from gl_lcm.data.phantom import generate_phantom

REAL_CXR = REPO_ROOT.parent / "shared" / "data" / "real-cxr"


# ----------------------------------------------------------------------------- synthetic non-chest images
def _grid(n=512):
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    return xx, yy


def _texture(n, seed, sigma=3.0, amount=0.04):
    rng = np.random.default_rng(seed)
    return amount * cv2.GaussianBlur(rng.standard_normal((n, n)).astype(np.float32), (0, 0), sigma)


def ct_head_slice(n=512):
    """Axial head CT, bone bright: skull ring, grey brain, air outside."""
    xx, yy = _grid(n)
    r = np.sqrt(((xx - 0.5) / 0.36) ** 2 + ((yy - 0.5) / 0.44) ** 2)
    img = np.where(r < 1.0, 0.45, 0.0) + np.where((r > 0.9) & (r < 1.0), 0.5, 0.0)
    return np.clip(img + _texture(n, 1) * (r < 1), 0, 1).astype(np.float32)


def ct_chest_slice(n=512):
    """Axial chest CT in a lung window: body ellipse, two dark lungs, bright spine, air around."""
    xx, yy = _grid(n)
    body = ((xx - 0.5) / 0.46) ** 2 + ((yy - 0.52) / 0.32) ** 2 < 1
    lungs = (((xx - 0.32) / 0.13) ** 2 + ((yy - 0.5) / 0.22) ** 2 < 1) | (((xx - 0.68) / 0.13) ** 2 + ((yy - 0.5) / 0.22) ** 2 < 1)
    spine = ((xx - 0.5) / 0.05) ** 2 + ((yy - 0.72) / 0.05) ** 2 < 1
    img = np.where(body, 0.55, 0.0) - 0.45 * lungs + 0.4 * spine
    return np.clip(img + _texture(n, 2) * body, 0, 1).astype(np.float32)


def hand_film(n=512):
    """PA hand: five bright finger rays and a palm on an air background."""
    xx, yy = _grid(n)
    img = np.zeros((n, n), np.float32)
    palm = (((xx - 0.5) / 0.22) ** 2 + ((yy - 0.72) / 0.2) ** 2) < 1
    img[palm] = 0.55
    for k, x0 in enumerate((0.3, 0.4, 0.5, 0.6, 0.7)):
        finger = (np.abs(xx - x0 - (0.72 - yy) * (x0 - 0.5) * 0.6) < 0.03) & (yy > 0.15 + 0.05 * abs(k - 2)) & (yy < 0.7)
        img[finger] = 0.75
    return np.clip(img + _texture(n, 3) * (img > 0), 0, 1)


def skull_film(n=512):
    """PA skull filling the frame: bright vault rim, even interior, no lungs or mediastinum."""
    xx, yy = _grid(n)
    r = np.sqrt(((xx - 0.5) / 0.56) ** 2 + ((yy - 0.5) / 0.6) ** 2)
    img = np.where(r < 1.0, 0.6, 0.05) + np.where((r > 0.88) & (r < 1.0), 0.3, 0.0)
    return np.clip(img + _texture(n, 4, sigma=6, amount=0.05), 0, 1).astype(np.float32)


def panoramic_shape(phantom):
    """A wide strip (aspect 2.4) cut from a chest phantom: shape alone refuses it."""
    h = phantom.shape[0]
    return cv2.resize(phantom[h // 3: h // 3 + h // 4], (h, int(h / 2.4)), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def phantom256():
    return generate_phantom(256, 3).cxr


@pytest.mark.parametrize("make,kind", [
    (ct_head_slice, "background"),
    (ct_chest_slice, "background"),
    (hand_film, "background"),
    (skull_film, "layout"),
])
def test_non_chest_images_are_refused_with_their_reason(make, kind):
    check = image_plausibility(make())
    assert not check.ok and check.kind == kind, (check.kind, check.features)
    assert "not a frontal chest" in check.reason or "no frontal chest layout" in check.reason


def test_blank_noise_tiny_and_wide_images_are_refused(phantom256):
    rng = np.random.default_rng(0)
    blank = (0.5 + np.linspace(0, 0.02, 256)[None] + np.zeros((256, 1))).astype(np.float32)
    cases = {
        "blank": blank,
        "noise": rng.uniform(0, 1, (300, 300)).astype(np.float32),
        "size": phantom256[::16, ::16],
        "shape": panoramic_shape(phantom256),
    }
    for kind, image in cases.items():
        check = image_plausibility(image)
        assert not check.ok and check.kind == kind, (kind, check.reason)
    assert "blank image" in image_plausibility(blank).reason
    assert "noise image" in image_plausibility(cases["noise"]).reason


def test_colour_photograph_is_refused_but_gray_rgb_film_is_not(tmp_path, phantom256):
    xx, yy = _grid(256)
    photo = np.stack([xx, yy, 1 - xx * yy], axis=-1) * 255  # a colourful smooth picture
    cv2.imwrite(str(tmp_path / "photo.png"), photo.astype(np.uint8))
    gray = np.repeat(np.rint(phantom256 * 255).astype(np.uint8)[..., None], 3, axis=-1)
    cv2.imwrite(str(tmp_path / "gray_rgb.png"), gray)
    photo_info, gray_info = read_image_info(tmp_path / "photo.png"), read_image_info(tmp_path / "gray_rgb.png")
    # independent colourfulness: mean pairwise channel difference
    c = photo.astype(np.float64) / 255
    expected = np.mean([np.abs(c[..., i] - c[..., j]).mean() for i, j in ((0, 1), (1, 2), (0, 2))])
    assert photo_info.colourfulness == pytest.approx(expected, abs=2e-3)
    check = image_plausibility(photo_info.image, photo_info.colourfulness)
    assert not check.ok and check.kind == "colour" and "photograph" in check.reason
    assert gray_info.colourfulness == 0.0
    assert image_plausibility(gray_info.image, gray_info.colourfulness).ok


def test_phantoms_pass_at_every_size():
    for seed in range(12):
        for size in (32, 128, 256, 512):
            check = image_plausibility(generate_phantom(size, seed).cxr)
            assert check.ok, (seed, size, check.reason)


def test_letterbox_padding_does_not_count_as_background(phantom256):
    padded = np.zeros((256, 400), np.float32)
    padded[:, 72:328] = phantom256
    assert image_plausibility(padded).ok


# ----------------------------------------------------------------------------- metadata
def _header(**tags):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize("modality", ["CT", "MR", "US", "NM", "PT", "MG", "OT", "XA", "RF"])
def test_non_radiograph_modalities_are_refused(modality):
    problem = dicom_metadata_problem(_header(Modality=modality))
    assert problem is not None and f"Modality is {modality}" in problem and "--allow-non-chest" in problem


@pytest.mark.parametrize("tags", [
    {"Modality": "CR"}, {"Modality": "DX"}, {"Modality": "DR"}, {"Modality": "RG"}, {},
    {"Modality": "DX", "BodyPartExamined": "CHEST"}, {"Modality": "CR", "BodyPartExamined": "THORAX"},
    {"Modality": "CR", "BodyPartExamined": "TORAX"}, {"Modality": "DX", "BodyPartExamined": ""},
])
def test_chest_radiograph_headers_pass(tags):
    assert dicom_metadata_problem(_header(**tags)) is None


@pytest.mark.parametrize("part", ["HAND", "SKULL", "ABDOMEN", "KNEE", "BREAST", "PELVIS"])
def test_non_chest_body_parts_are_refused(part):
    problem = dicom_metadata_problem(_header(Modality="CR", BodyPartExamined=part))
    assert problem is not None and f"BodyPartExamined is {part}" in problem


def test_allow_non_chest_skips_metadata_but_not_image_checks(phantom256):
    ct = _header(Modality="CT")
    with pytest.raises(NonChestInputError, match=r"film\.dcm: refused: DICOM Modality is CT"):
        check_chest_input("film.dcm", phantom256, dicom_header=ct)
    check_chest_input("film.dcm", phantom256, dicom_header=ct, allow_non_chest=True)
    with pytest.raises(NonChestInputError, match=r"head\.dcm: refused as not a chest radiograph: .*background"):
        check_chest_input("head.dcm", ct_head_slice(), dicom_header=ct, allow_non_chest=True)


# ----------------------------------------------------------------------------- real films
def _real_files(*patterns):
    files = [f for p in patterns for f in sorted(glob.glob(str(REAL_CXR / p)))]
    if not files:
        pytest.skip(f"real films not found under {REAL_CXR} (needs ../shared/data/real-cxr)")
    return files


def _check_file(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyDicomWarning)
        info = read_image_info(path)
    try:
        check_chest_input(str(path), info.image, info.colourfulness, info.dicom.header if info.dicom else None)
        return None
    except NonChestInputError as exc:
        return str(exc)


def test_every_real_chest_film_passes():
    files = _real_files("seg/*/images/*.png", "pairs/*/CXR/*.png", "dicom/*.dcm")
    files += sorted(glob.glob(str(SZCH_DIR / "CXR" / "*.png")))
    refused = {f: r for f in files if (r := _check_file(f)) is not None}
    assert not refused, refused
    assert len(files) >= 50


def test_every_real_non_chest_film_is_refused():
    files = _real_files("nonchest/*")
    accepted = [f for f in files if _check_file(f) is None]
    assert not accepted
    # the two PNG twins carry no metadata: the image check alone refuses them
    for name in ("dental_panoramic_cr.png", "mammo_stereo_mg.png"):
        info = read_image_info(REAL_CXR / "nonchest" / name)
        assert not image_plausibility(info.image).ok


# ----------------------------------------------------------------------------- batch command
def test_segment_batch_refuses_non_chest_and_goes_on(tmp_path):
    from gl_lcm.config import load_config
    from gl_lcm.jobs.segment import segment_path
    from test_dicom_io import _dataset

    src = tmp_path / "in"
    cxr = generate_phantom(256, 1).cxr
    write_png(src / "chest.png", cxr)
    write_png(src / "head_ct.png", ct_head_slice(256))
    ds = _dataset(np.rint(cxr * 4095).astype(np.int64), modality="CT")
    ds.save_as(src / "ct_labelled.dcm", enforce_file_format=True)
    cfg = load_config(None, ["device=cpu"])
    counts = segment_path(cfg, str(src), str(tmp_path / "seg"))
    assert counts == {"succeeded": 1, "failed": 2}
    with open(tmp_path / "seg" / "errors.csv") as f:
        reasons = {r["image"]: r["reason"] for r in csv.DictReader(f)}
    assert set(reasons) == {"head_ct", "ct_labelled"}
    assert "NonChestInputError" in reasons["head_ct"] and "background" in reasons["head_ct"]
    assert "Modality is CT" in reasons["ct_labelled"]
    # --allow-non-chest: the mislabelled chest film goes through, the head CT is still refused
    counts = segment_path(cfg, str(src), str(tmp_path / "seg"), allow_non_chest=True)
    assert counts == {"succeeded": 2, "failed": 1}
    with open(tmp_path / "seg" / "errors.csv") as f:
        assert {r["image"] for r in csv.DictReader(f)} == {"head_ct"}
