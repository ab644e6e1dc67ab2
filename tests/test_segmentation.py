"""Lung segmentation: post-processing, classical method on phantoms and real CXRs, failures, dispatch."""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from gl_lcm.data.phantom import generate_phantom
from gl_lcm.segmentation import (
    NoLungFoundError,
    binarize,
    dice,
    load_masks_from_folder,
    mask_overlay,
    postprocess_mask,
    predict_lung_probability,
    remove_small_components,
    scaled_min_area,
    segment_lungs,
    segment_lungs_classical,
    segment_lungs_learned,
)

HELD_OUT_SEEDS = range(10000, 10050)  # never used while tuning the classical method


# ----------------------------------------------------------------------------- post-processing


def test_scaled_min_area():
    assert scaled_min_area((1024, 1024)) == 100
    assert scaled_min_area((512, 512)) == 25
    assert scaled_min_area((256, 256)) == 6
    assert scaled_min_area((2048, 2048)) == 400
    assert scaled_min_area((256, 256), min_area=40) == 40
    with pytest.raises(ValueError):
        scaled_min_area((256, 256), min_area=-1)


def test_postprocess_removes_small_components_with_scaled_threshold():
    prob = np.full((256, 256), 0.2)
    prob[40:200, 30:110] = 0.9  # lung-sized blob
    prob[10:12, 200:202] = 0.7  # 4 px  < 6 (100 px at 1024^2 scaled to 256^2): removed
    prob[20:23, 200:203] = 0.7  # 9 px >= 6: kept
    prob[100, 150] = 0.5  # exactly the threshold: not lung (p > 0.5)
    mask = postprocess_mask(prob)
    expected = np.zeros((256, 256), bool)
    expected[40:200, 30:110] = True
    expected[20:23, 200:203] = True
    assert np.array_equal(mask, expected)
    # the same 9 px speck goes with an explicit override
    assert not postprocess_mask(prob, min_area=10)[20:23, 200:203].any()
    # at 1024^2 the threshold is 100 px: a 9x9 (81 px) speck is removed, 10x10 kept
    big = np.zeros((1024, 1024), bool)
    big[100:700, 100:400] = True
    big[800:809, 800:809] = True
    big[900:910, 900:910] = True
    out = postprocess_mask(big)
    assert not out[800:809, 800:809].any() and out[900:910, 900:910].all()


def test_binarize_and_remove_small_components():
    assert np.array_equal(binarize(np.array([[0.2, 0.5, 0.51]])), np.array([[False, False, True]]))
    mask = np.zeros((20, 20), bool)
    mask[0:3, 0:3] = True
    mask[10:12, 10:12] = True
    kept = remove_small_components(mask, 5)
    assert kept[0:3, 0:3].all() and not kept[10:12, 10:12].any()
    with pytest.raises(ValueError):
        binarize(np.zeros((2, 2, 2)))


def test_no_lung_error_names_image():
    with pytest.raises(NoLungFoundError, match=r"'scan_07\.png'.*empty"):
        postprocess_mask(np.zeros((64, 64)), name="scan_07.png")
    tiny = np.zeros((100, 100))
    tiny[:5, :10] = 1.0  # 0.5 % of the image: implausible
    with pytest.raises(NoLungFoundError, match="0.50%"):
        postprocess_mask(tiny, min_area=0)
    assert issubclass(NoLungFoundError, ValueError)


def test_dice_values():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :6] = True  # 60 px
    b[:, 4:] = True  # 60 px, overlap 20
    assert dice(a, b) == pytest.approx(2 * 20 / 120)
    assert dice(a, a) == 1.0
    assert dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert dice(a, ~a) == 0.0
    with pytest.raises(ValueError):
        dice(a, np.zeros((5, 5)))


def test_mask_overlay():
    image = np.full((64, 64), 0.5, np.float32)
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    out = mask_overlay(image, mask, color=(0, 255, 0), thickness=1, fill_alpha=0.0)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out[2, 2], [128, 128, 128])  # untouched CXR far away
    assert np.array_equal(out[32, 16], [0, 255, 0])  # outline
    assert np.array_equal(out[32, 32], [128, 128, 128])  # interior, no tint
    tinted = mask_overlay(image, mask, color=(0, 255, 0), fill_alpha=0.5)
    assert tinted[32, 32, 1] > tinted[32, 32, 0]
    with pytest.raises(ValueError):
        mask_overlay(image, mask[:10])


# ----------------------------------------------------------------------------- classical method


def test_classical_dice_on_held_out_phantoms():
    scores = []
    start = time.perf_counter()
    for seed in HELD_OUT_SEEDS:
        phantom = generate_phantom(256, seed)
        mask = segment_lungs_classical(phantom.cxr, name=f"phantom {seed}")
        scores.append(dice(mask, phantom.lung_mask))
    elapsed = (time.perf_counter() - start) / len(scores)
    print(f"classical Dice on {len(scores)} held-out phantoms: mean {np.mean(scores):.4f} "
          f"min {np.min(scores):.4f} ({elapsed:.2f} s/image)")
    assert np.mean(scores) >= 0.9
    assert np.min(scores) >= 0.7


def test_classical_resolution_independent():
    phantom = generate_phantom(512, 10100)
    mask = segment_lungs_classical(phantom.cxr)
    assert mask.shape == (512, 512) and mask.dtype == bool
    assert dice(mask, phantom.lung_mask) >= 0.9


@pytest.mark.parametrize("index", [0, 1, 2])
def test_classical_on_real_radiographs(szch_dir, index):
    image = cv2.imread(str(szch_dir / "CXR" / f"{index}.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0
    mask = segment_lungs_classical(image, name=f"{index}.png")
    assert mask.shape == image.shape
    fraction = mask.mean()
    assert 0.15 <= fraction <= 0.45, f"lung fraction {fraction:.3f}"
    n_labels, labels, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
    assert n_labels - 1 == 2, "two lung fields"
    width = image.shape[1]
    xs = sorted(centroids[1:, 0])
    assert xs[0] < 0.45 * width and xs[1] > 0.55 * width, "one lung on each side of the midline"
    for k in (1, 2):
        assert stats[k, cv2.CC_STAT_AREA] > 0.05 * mask.size
        # a lung field is tall and in the chest, not in the abdomen or the neck
        assert stats[k, cv2.CC_STAT_HEIGHT] > 0.4 * image.shape[0]
        assert 0.3 * image.shape[0] < centroids[k, 1] < 0.65 * image.shape[0]


def _pink_noise(rng, size):
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    power = fy**2 + fx**2
    power[0, 0] = 1.0
    spectrum = (rng.standard_normal((size, size)) + 1j * rng.standard_normal((size, size))) / power**0.75
    field = np.real(np.fft.ifft2(spectrum))
    return ((field - field.min()) / np.ptp(field)).astype(np.float32)


def _non_chest_images():
    rng = np.random.default_rng(0)
    size = 256
    yy, xx = np.mgrid[0:size, 0:size] / size
    radius = np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    smooth = cv2.resize(rng.random((6, 6)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    return {
        "uniform": np.full((size, size), 0.5, np.float32),
        "black": np.zeros((size, size), np.float32),
        "uniform_noise": rng.random((size, size)).astype(np.float32),
        "gaussian_noise": np.clip(0.5 + 0.1 * rng.standard_normal((size, size)), 0, 1).astype(np.float32),
        "horizontal_ramp": xx.astype(np.float32),
        "vertical_ramp": yy.astype(np.float32),
        "radial_dark_centre": (radius / radius.max()).astype(np.float32),
        "radial_bright_centre": (1 - radius / radius.max()).astype(np.float32),
        "smooth_noise": np.clip(smooth, 0, 1),
        "pink_noise_a": _pink_noise(rng, size),
        "pink_noise_b": _pink_noise(rng, size),
        "checkerboard": ((np.floor(xx * 8) + np.floor(yy * 8)) % 2).astype(np.float32),
    }


@pytest.mark.parametrize("kind", sorted(_non_chest_images()))
def test_non_chest_images_raise(kind):
    image = _non_chest_images()[kind]
    with pytest.raises(NoLungFoundError, match=kind):
        segment_lungs_classical(image, name=kind)


def test_classical_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        segment_lungs_classical(np.zeros((8, 8, 3), np.float32))
    image = generate_phantom(128, 1).cxr.copy()
    image[3, 3] = np.nan
    with pytest.raises(NoLungFoundError, match="NaN"):
        segment_lungs_classical(image)


# ----------------------------------------------------------------------------- learned + dispatch


class DarkIsLung(nn.Module):
    """Stand-in segmentation net: logit = -20 * x (dark pixels are lung); records its input range."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(-20.0))
        self.seen = None

    def forward(self, x):
        self.seen = (float(x.min()), float(x.max()), tuple(x.shape), self.training)
        return self.scale * x


def _two_dark_fields(size):
    image = np.full((size, size), 0.9, np.float32)
    s = size // 128
    image[20 * s:100 * s, 15 * s:55 * s] = 0.1
    image[20 * s:100 * s, 73 * s:113 * s] = 0.1
    image[5 * s:8 * s, 60 * s:63 * s] = 0.1  # speck: 9 px at 128^2
    return image


def test_segment_lungs_learned():
    model = DarkIsLung()
    model.train()
    image = _two_dark_fields(128)
    prob = predict_lung_probability(model, image, image_size=128)
    assert prob.shape == (128, 128) and prob.min() >= 0 and prob.max() <= 1
    assert model.seen[0] == pytest.approx(-0.8, abs=1e-5) and model.seen[1] == pytest.approx(0.8, abs=1e-5)
    assert model.seen[2] == (1, 1, 128, 128) and model.seen[3] is False
    assert model.training, "the model's training mode must be restored"
    mask = segment_lungs_learned(model, image, image_size=128, min_area=20)
    expected = image < 0.5
    assert expected[5:8, 60:63].all()
    expected[5:8, 60:63] = False  # the 9 px speck is below min_area; nothing else changes
    assert np.array_equal(mask, expected)
    # a different net size: resized in and out, still the same fields
    mask_256 = segment_lungs_learned(model, _two_dark_fields(256), image_size=64, min_area=50)
    assert dice(mask_256, _two_dark_fields(256) < 0.5) > 0.97
    # a net that finds nothing
    with pytest.raises(NoLungFoundError, match="chest_9"):
        segment_lungs_learned(model, np.full((64, 64), 0.9, np.float32), image_size=64, name="chest_9")


def test_segment_lungs_dispatch(tmp_path):
    phantom = generate_phantom(256, 10200)
    classical = segment_lungs(phantom.cxr, "classical")
    assert np.array_equal(classical, segment_lungs_classical(phantom.cxr))
    unet = segment_lungs(_two_dark_fields(128), "unet", model=DarkIsLung(), image_size=128, min_area=20)
    assert unet.sum() == 2 * 80 * 40
    cv2.imwrite(str(tmp_path / "case_3.png"), cv2.resize(phantom.lung_mask.astype(np.uint8) * 255, (512, 512),
                                                          interpolation=cv2.INTER_NEAREST))
    folder = segment_lungs(phantom.cxr, "folder", mask_dir=tmp_path, name="case_3.png")
    assert folder.shape == (256, 256) and np.array_equal(folder, phantom.lung_mask)
    with pytest.raises(ValueError, match="classical, unet, folder"):
        segment_lungs(phantom.cxr, "magic")
    with pytest.raises(ValueError, match="model"):
        segment_lungs(phantom.cxr, "unet")
    with pytest.raises(ValueError, match="mask_dir"):
        segment_lungs(phantom.cxr, "folder", name="case_3")


def test_load_masks_from_folder(tmp_path):
    mask = np.zeros((32, 48), np.uint8)
    mask[5:20, 10:30] = 1  # 0/1 masks are accepted as well as 0/255
    cv2.imwrite(str(tmp_path / "a.png"), mask)
    loaded = load_masks_from_folder(tmp_path, "a", (32, 48))
    assert loaded.dtype == bool and np.array_equal(loaded, mask > 0)
    assert load_masks_from_folder(tmp_path, "a.png", (64, 96)).shape == (64, 96)
    with pytest.raises(FileNotFoundError, match=r"'missing_01'.*" + str(tmp_path.name)):
        load_masks_from_folder(tmp_path, "missing_01", (32, 48))
