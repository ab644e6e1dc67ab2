"""Synthetic phantoms: determinism, value ranges, anatomy sanity, dataset writer, figure."""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from gl_lcm.data.phantom import (
    Phantom,
    generate_phantom,
    sample_seed_sequence,
    save_phantom_figure,
    split_counts,
    write_phantom_dataset,
)

FIELDS = ("cxr", "soft_tissue", "bone", "lung_mask")


def test_same_seed_gives_identical_arrays():
    a = generate_phantom(128, 7)
    b = generate_phantom(128, 7)
    c = generate_phantom(128, np.random.default_rng(7))
    for field in FIELDS:
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
        assert np.array_equal(getattr(a, field), getattr(c, field)), field


def test_different_seeds_differ():
    a = generate_phantom(128, 1)
    b = generate_phantom(128, 2)
    assert np.abs(a.cxr - b.cxr).mean() > 0.01
    assert not np.array_equal(a.lung_mask, b.lung_mask)
    assert a.params["rib_spacing"] != b.params["rib_spacing"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ranges_and_bone_identity(seed):
    start = time.perf_counter()
    p = generate_phantom(256, seed)
    print(f"phantom 256x256 generated in {1000 * (time.perf_counter() - start):.1f} ms")
    assert isinstance(p, Phantom)
    for field in ("cxr", "soft_tissue", "bone"):
        arr = getattr(p, field)
        assert arr.shape == (256, 256) and arr.dtype == np.float32, field
        assert arr.min() >= 0.0 and arr.max() <= 1.0, field
    assert p.lung_mask.dtype == bool and p.lung_mask.shape == (256, 256)
    # bone is exactly what the model must remove; CXR never darker than the soft tissue
    assert np.array_equal(p.bone, p.cxr - p.soft_tissue)
    assert np.all(p.cxr >= p.soft_tissue)
    # ribs, clavicles and spine: a real fraction of the image carries visible bone
    assert p.bone.max() > 0.15
    assert 0.05 < float(np.mean(p.bone > 0.03)) < 0.6


@pytest.mark.parametrize("seed", [0, 5, 9])
def test_lungs_inside_body_and_darker(seed):
    p = generate_phantom(256, seed)
    mask = p.lung_mask
    fraction = mask.mean()
    assert 0.15 < fraction < 0.45
    n_labels, _ = cv2.connectedComponents(mask.astype(np.uint8))
    assert n_labels - 1 == 2, "two lung fields"
    ys, xs = np.nonzero(mask)
    u = (xs + 0.5) / 256
    assert np.all(np.abs(u - p.params["midline"]) < p.params["body_half_width"]), "lung outside the body"
    assert ys.min() > 5 and ys.max() < 250 and xs.min() > 5 and xs.max() < 250
    ring = (cv2.dilate(mask.astype(np.uint8), np.ones((15, 15), np.uint8)) > 0) & ~mask
    assert p.soft_tissue[mask].mean() < p.soft_tissue[ring].mean() - 0.1, "lungs must be darker than their surroundings"
    # the two fields sit on either side of the midline
    midline_px = p.params["midline"] * 256
    assert np.any(xs < midline_px) and np.any(xs > midline_px)


def test_sizes_scale_consistently():
    small = generate_phantom(64, 11)
    large = generate_phantom(512, 11)
    assert small.cxr.shape == (64, 64) and large.cxr.shape == (512, 512)
    assert abs(small.lung_mask.mean() - large.lung_mask.mean()) < 0.03
    with pytest.raises(ValueError, match="size"):
        generate_phantom(16, 0)
    with pytest.raises(TypeError, match="rng"):
        generate_phantom(64, "seed")


def test_split_counts():
    assert split_counts(10, (0.8, 0.1, 0.1)) == (8, 1, 1)
    assert split_counts(7, (0.8, 0.1, 0.1)) == (5, 1, 1)
    with pytest.raises(ValueError, match="sum"):
        split_counts(10, (0.8, 0.3, 0.1))


def _read(path):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def test_write_phantom_dataset(tmp_path):
    out = tmp_path / "ph"
    summary = write_phantom_dataset(out, n=10, size=64, seed=3, progress=False)
    assert summary["counts"] == {"train": 8, "val": 1, "test": 1}
    stems = [f"phantom_{i:04d}" for i in range(10)]
    for sub in ("CXR", "BS", "Mask"):
        assert sorted(p.stem for p in (out / sub).glob("*.png")) == stems
        assert not list((out / sub).glob(".*")), "temporary files left behind"
    for stem in stems:
        cxr, bs, mask = (_read(out / sub / f"{stem}.png") for sub in ("CXR", "BS", "Mask"))
        assert cxr.shape == bs.shape == mask.shape == (64, 64) and cxr.dtype == np.uint8
        assert np.all(cxr >= bs)
        assert set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    lists = {name: (out / f"{name}.txt").read_text().split() for name in ("train", "val", "test")}
    all_listed = lists["train"] + lists["val"] + lists["test"]
    assert sorted(all_listed) == stems and len(set(all_listed)) == 10, "splits must be disjoint and cover all"
    # same seed -> identical bytes; sample i does not depend on n
    again = tmp_path / "again"
    write_phantom_dataset(again, n=4, size=64, seed=3, progress=False)
    for sub in ("CXR", "BS", "Mask"):
        assert (out / sub / "phantom_0002.png").read_bytes() == (again / sub / "phantom_0002.png").read_bytes()
    expected = generate_phantom(64, sample_seed_sequence(3, 2))
    assert np.array_equal(_read(out / "CXR" / "phantom_0002.png"), np.rint(expected.cxr * 255).astype(np.uint8))
    other = tmp_path / "other_seed"
    write_phantom_dataset(other, n=2, size=64, seed=4, progress=False)
    assert (other / "CXR" / "phantom_0000.png").read_bytes() != (out / "CXR" / "phantom_0000.png").read_bytes()


def test_save_phantom_figure(tmp_path):
    phantoms = [generate_phantom(64, s) for s in (0, 1)]
    path = save_phantom_figure(tmp_path / "fig.png", phantoms, tile=96)
    fig = _read(path)
    header = max(16, 96 // 10)
    assert fig.shape == (2 * (96 + header) + 2, 4 * 96 + 3 * 2)
    # the CXR tile of the first row is the resized phantom
    tile = fig[header:header + 96, :96]
    expected = cv2.resize(np.rint(phantoms[0].cxr * 255).astype(np.uint8), (96, 96), interpolation=cv2.INTER_AREA)
    assert np.array_equal(tile, expected)
    with pytest.raises(ValueError):
        save_phantom_figure(tmp_path / "empty.png", [])
