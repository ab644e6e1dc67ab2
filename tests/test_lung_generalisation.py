"""Segmentation that generalises: training-set preparation from the public COVID outlines, film
augmentation, harder film variants for the benchmark, percentile input normalisation, and the
choice of lung convention (visible / full) at inference."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from gl_lcm.data.augment import augment_films, random_affine
from gl_lcm.data.lung_sets import prepare_covid_lung_set
from gl_lcm.data.variants import VARIANTS, crop, monochrome1, rescale, rotate
from gl_lcm.models.segnet import percentile_normalize

REPO = Path(__file__).resolve().parents[1]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum()) / max(1.0, float(np.logical_or(a, b).sum()))


# ----------------------------------------------------------------------------- training-set preparation
def _fake_gb_repo(root: Path) -> dict:
    """A miniature GeneralBlockchain layout: 4 films of 3 patients; RGBA masks cropped to their box."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    films = {"a-day0.jpg": "1", "a-day3.jpg": "1", "b.png": "2", "c.jpeg": "3"}
    truth, rows = {}, []
    for k, (name, patient) in enumerate(films.items()):
        h, w = 60 + 4 * k, 80
        cv2.imwrite(str(root / "images" / name), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        full = {"Left Lung": np.zeros((h, w), bool), "Right Lung": np.zeros((h, w), bool),
                "Cardiomediastinum": np.zeros((h, w), bool)}
        boxes = {"Right Lung": (10, 5, 30, 25), "Left Lung": (12, 45, 28, 25), "Cardiomediastinum": (25, 25, 30, 30)}
        for cls, (top, left, bh, bw) in boxes.items():
            part = np.zeros((bh, bw), bool)
            part[2:-2, 2:-2] = True
            full[cls][top:top + bh, left:left + bw] = part
            rgba = np.zeros((bh, bw, 4), np.uint8)
            rgba[..., 3] = 255
            rgba[part, :3] = (187, 73, 73)  # a class colour whose grey value is below 127
            mask_name = f"masks/{k}_{cls.replace(' ', '')}.png"
            cv2.imwrite(str(root / mask_name), rgba)
            rows.append({"Template Name": cls, "Filename": name, "Mask": mask_name, "Top": top, "Left": left})
        lungs = full["Left Lung"] | full["Right Lung"]
        truth[Path(name).stem] = (lungs, lungs & ~full["Cardiomediastinum"])
    with open(root / "structure.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["Template Name", "Filename", "Mask", "Top", "Left"])
        w.writeheader()
        w.writerows(rows)
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["patientid", "filename", "view", "license"])
        w.writeheader()
        w.writerows({"patientid": p, "filename": n, "view": "PA", "license": "CC BY"} for n, p in films.items())
    return truth


def test_prepare_lung_set_places_boxes_subtracts_the_heart_and_leaves_out_whole_patients(tmp_path):
    truth = _fake_gb_repo(tmp_path / "repo")
    result = prepare_covid_lung_set(tmp_path / "repo", tmp_path / "out", exclude=["a-day3"], val_fraction=0.5,
                                    progress=False)
    assert sorted(result["excluded"]) == ["a-day0", "a-day3"]  # the other film of patient 1 goes too
    written = sorted(p.stem for p in (tmp_path / "out" / "CXR").glob("*.png"))
    assert written == ["b", "c"]
    for stem in written:
        full, visible = truth[stem]
        assert np.array_equal(cv2.imread(str(tmp_path / "out" / "MaskFull" / f"{stem}.png"), 0) > 127, full)
        assert np.array_equal(cv2.imread(str(tmp_path / "out" / "Mask" / f"{stem}.png"), 0) > 127, visible)
    train = (tmp_path / "out" / "train.txt").read_text().split()
    val = (tmp_path / "out" / "val.txt").read_text().split()
    assert sorted(train + val) == written and not set(train) & set(val)


def test_add_phantoms_appends_training_films_with_their_lung_fields(tmp_path):
    from gl_lcm.data.lung_sets import add_phantoms
    from gl_lcm.data.phantom import generate_phantom

    (tmp_path / "train.txt").write_text("real_1\n")
    stems = add_phantoms(tmp_path, 2, size=64, seed=7)
    assert stems == ["phantom_7", "phantom_8"]
    assert (tmp_path / "train.txt").read_text().split() == ["phantom_7", "phantom_8", "real_1"]
    ref = generate_phantom(64, 8)
    assert np.array_equal(cv2.imread(str(tmp_path / "CXR" / "phantom_8.png"), 0), np.round(ref.cxr * 255).astype(np.uint8))
    for folder in ("Mask", "MaskFull"):
        assert np.array_equal(cv2.imread(str(tmp_path / folder / "phantom_8.png"), 0) > 127, ref.lung_mask)


def test_prepare_lung_set_cli_reads_the_exclusions_from_a_folder(tmp_path):
    _fake_gb_repo(tmp_path / "repo")
    held_out = tmp_path / "eval"
    held_out.mkdir()
    cv2.imwrite(str(held_out / "b.png"), np.full((8, 8), 128, np.uint8))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "gl_lcm.cli", "prepare-lung-set", "--repo", str(tmp_path / "repo"),
                        "--out", str(tmp_path / "out"), "--exclude", str(held_out), "--phantoms", "1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.stem for p in (tmp_path / "out" / "CXR").glob("*.png")) == ["a-day0", "a-day3", "c",
                                                                              "phantom_100000"]
    r = subprocess.run([sys.executable, "-m", "gl_lcm.cli", "prepare-lung-set", "--repo", str(tmp_path / "nothing"),
                        "--out", str(tmp_path / "o2")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "covid-19-chest-xray-segmentations-dataset" in r.stderr


# ----------------------------------------------------------------------------- augmentation
def _blob_masks(b: int, size: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    out = np.zeros((b, 2, size, size), np.float32)
    for i in range(b):
        for k in range(2):
            cx, cy = rng.integers(size // 4, 3 * size // 4, 2)
            cv2.ellipse(out[i, k], (int(cx), int(cy)), (size // 6, size // 4), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return torch.from_numpy(out)


def test_random_affine_moves_the_masks_with_the_image():
    masks = _blob_masks(6, 64, 1)
    images = masks[:, :1] * 2 - 1  # the first mask drawn as the image
    g = torch.Generator().manual_seed(3)
    moved_img, moved_masks = random_affine(images, masks, g, max_rotation=10, scale_range=(0.8, 1.25), max_shift=0.08)
    for i in range(6):
        assert _iou(moved_img[i, 0].numpy() > 0, moved_masks[i, 0].numpy() > 0.5) > 0.95
    assert not torch.equal(moved_masks, masks)  # it did move them
    assert set(torch.unique(moved_masks).tolist()) <= {0.0, 1.0}


def test_augment_films_is_a_function_of_the_generator_state():
    masks = _blob_masks(4, 64, 2)
    images = torch.rand(4, 1, 64, 64) * 2 - 1
    a = augment_films(images, masks, torch.Generator().manual_seed(7))
    b = augment_films(images, masks, torch.Generator().manual_seed(7))
    c = augment_films(images, masks, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].min() >= -1 and a[0].max() <= 1


def test_percentile_normalize_matches_numpy_quantiles():
    x = torch.rand(3, 1, 20, 24) * torch.tensor([1.0, 5.0, 0.1]).view(3, 1, 1, 1) + 2
    out = percentile_normalize(x)
    for i in range(3):
        lo, hi = np.quantile(x[i].numpy().ravel(), [0.01, 0.99])
        ref = 2 * (x[i].numpy() - lo) / (hi - lo) - 1
        np.testing.assert_allclose(out[i].numpy(), ref, rtol=1e-5, atol=1e-5)
    flat = percentile_normalize(torch.full((1, 1, 8, 8), 0.3))
    assert torch.all(flat == 0)


# ----------------------------------------------------------------------------- harder variants
def _film_with_mask(h: int = 200, w: int = 180) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (60, 100), (30, 60), 5, 0, 360, 1, -1)
    cv2.ellipse(mask, (125, 100), (28, 58), -5, 0, 360, 1, -1)
    return (0.2 + 0.6 * mask).astype(np.float32), mask > 0


@pytest.mark.parametrize("transform", [rescale, crop, rotate])
def test_geometric_variants_move_the_mask_with_the_film(transform):
    img, mask = _film_with_mask()
    out_img, out_mask = transform(img, mask, np.random.default_rng(4))
    assert out_img.shape == out_mask.shape and out_img.dtype == np.float32
    assert _iou(out_img > 0.5, out_mask) > 0.97
    if transform is rescale:
        assert 1500 <= max(out_img.shape) <= 2500


def test_every_variant_keeps_range_and_shape_and_is_seeded():
    img, mask = _film_with_mask()
    for name, transform in VARIANTS.items():
        a = transform(img, mask, np.random.default_rng(1))
        b = transform(img, mask, np.random.default_rng(1))
        assert a[0].shape == a[1].shape, name
        assert 0 <= a[0].min() and a[0].max() <= 1, name
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), name


def test_monochrome1_variant_reads_back_bone_bright():
    pytest.importorskip("pydicom")  # the variant writes its DICOM with pydicom
    img, mask = _film_with_mask()
    out, out_mask = monochrome1(img, mask, np.random.default_rng(0))
    ref = (img - img.min()) / (img.max() - img.min())  # the reader stretches the windowed values to [0, 1]
    np.testing.assert_allclose(out, ref, atol=2.0 / 4095 / 0.6)  # inverted on disk, upright when read
    assert np.array_equal(out_mask, mask)


# ----------------------------------------------------------------------------- convention at inference
def _two_output_checkpoint(tmp_path: Path, phantoms: Path) -> Path:
    """A 1-step train-seg checkpoint whose 'visible' output says 'no lung' and 'full' says 'all lung'."""
    from gl_lcm.config import load_config
    from gl_lcm.train.segnet import train_segnet

    cfg = load_config(REPO / "configs/segnet_tiny.yaml", [
        f"data.root={phantoms}", f"train.output_dir={tmp_path / 'seg'}", "segmentation.image_size=32",
        "segmentation.depth=2", "segmentation.base_channels=8", "segmentation.outputs=[visible,full]",
        "data.full_mask_dir=Mask", "train.max_steps=1", "train.batch_size=2", "device=cpu"])
    train_segnet(cfg, progress=False)
    path = tmp_path / "seg" / "model.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt["modules"]["segnet"]
    state["conv_out.weight"].zero_()
    state["conv_out.bias"].copy_(torch.tensor([-20.0, 20.0]))
    torch.save(ckpt, path)
    return path


def test_segment_uses_the_configured_convention_output(tmp_path):
    from gl_lcm.config import load_config
    from gl_lcm.data.phantom import write_phantom_dataset
    from gl_lcm.jobs.segment import segment_path

    phantoms = tmp_path / "ph"
    write_phantom_dataset(phantoms, n=4, size=32, seed=1)
    ckpt = _two_output_checkpoint(tmp_path, phantoms)
    base = ["segmentation.method=unet", f"checkpoints.segnet={ckpt}", "device=cpu", "segmentation.min_area=0",
            "segmentation.image_size=34", "segmentation.depth=1"]  # the net's own size (32, from its checkpoint)
    # must win: 34 px would not fit its two downsamplings
    full = segment_path(load_config(None, base + ["segmentation.convention=full"]), str(phantoms / "CXR"),
                        str(tmp_path / "full"))
    assert full["succeeded"] == 4
    masks = [cv2.imread(str(p), 0) for p in sorted((tmp_path / "full" / "masks").glob("*.png"))]
    assert len(masks) == 4 and all((m > 127).all() for m in masks)
    visible = segment_path(load_config(None, base + ["segmentation.convention=visible"]), str(phantoms / "CXR"),
                           str(tmp_path / "visible"))
    assert visible["succeeded"] == 0 and visible["failed"] == 4  # 'no lung' on the visible output


def test_a_convention_the_net_lacks_is_an_error_naming_both(tmp_path):
    from gl_lcm.config import load_config
    from gl_lcm.data.phantom import write_phantom_dataset
    from gl_lcm.inference import Segmenter
    from gl_lcm.train.segnet import train_segnet

    phantoms = tmp_path / "ph"
    write_phantom_dataset(phantoms, n=4, size=32, seed=1)
    cfg = load_config(REPO / "configs/segnet_tiny.yaml", [
        f"data.root={phantoms}", f"train.output_dir={tmp_path / 'seg'}", "segmentation.image_size=32",
        "segmentation.depth=2", "segmentation.base_channels=8", "train.max_steps=1", "train.batch_size=2",
        "device=cpu"])
    train_segnet(cfg, progress=False)
    use = load_config(None, ["segmentation.method=unet", f"checkpoints.segnet={tmp_path / 'seg' / 'model.pt'}",
                             "segmentation.convention=full", "device=cpu"])
    with pytest.raises(ValueError, match=r"convention=full .* predicts only \['visible'\]"):
        Segmenter.from_config(use)


def test_outputs_are_validated_on_load():
    from gl_lcm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="segmentation.outputs"):
        load_config(None, ["segmentation.outputs=[visible,visible]"])
    with pytest.raises(ConfigError, match="segmentation.outputs"):
        load_config(None, ["segmentation.outputs=[lungs]"])


def test_auto_uses_a_trained_lung_unet_from_the_documented_path(tmp_path, monkeypatch):
    """segmentation.method=auto (the default): the U-Net where the README recipe leaves it, else the
    classical method with one line that names the recipe."""
    from gl_lcm.config import load_config
    from gl_lcm.data.phantom import write_phantom_dataset
    from gl_lcm.inference import Segmenter
    from gl_lcm.train.segnet import train_segnet

    monkeypatch.chdir(tmp_path)  # DEFAULT_SEGNET is relative to the working directory
    said = []
    auto = load_config(None, ["device=cpu"])
    assert auto.segmentation.method == "auto"
    assert Segmenter.from_config(auto, log=said.append).method == "classical"
    assert len(said) == 1 and "runs/segnet_lungs/model.pt" in said[0] and "docs/clinical.md" in said[0]
    phantoms = tmp_path / "ph"
    write_phantom_dataset(phantoms, n=4, size=32, seed=1)
    train_segnet(load_config(REPO / "configs/segnet_tiny.yaml", [
        f"data.root={phantoms}", "train.output_dir=runs/segnet_lungs", "segmentation.image_size=32",
        "segmentation.depth=2", "segmentation.base_channels=8", "train.max_steps=1", "train.batch_size=2",
        "device=cpu"]), progress=False)
    said.clear()
    seg = Segmenter.from_config(auto, log=said.append)
    assert seg.method == "unet" and said == [] and seg.method_options["image_size"] == 32
    # an explicit choice wins
    assert Segmenter.from_config(load_config(None, ["segmentation.method=classical"]), log=said.append).method \
        == "classical" and said == []


def test_unet_segments_a_batch_in_one_forward_pass_with_the_per_film_masks(tmp_path):
    from gl_lcm.config import load_config
    from gl_lcm.data.phantom import generate_phantom, write_phantom_dataset
    from gl_lcm.inference import Segmenter
    from gl_lcm.train.segnet import train_segnet

    phantoms = tmp_path / "ph"
    write_phantom_dataset(phantoms, n=4, size=32, seed=1)
    train_segnet(load_config(REPO / "configs/segnet_tiny.yaml", [
        f"data.root={phantoms}", f"train.output_dir={tmp_path / 'seg'}", "segmentation.image_size=32",
        "segmentation.depth=2", "segmentation.base_channels=8", "train.max_steps=20", "train.batch_size=2",
        "device=cpu"]), progress=False)
    seg = Segmenter.from_config(load_config(None, ["segmentation.method=unet", "segmentation.min_area=0",
                                                   f"checkpoints.segnet={tmp_path / 'seg' / 'model.pt'}", "device=cpu"]))
    calls = []
    seg.method_options["model"].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    images = [generate_phantom(s, k).cxr.astype(np.float32) for k, s in enumerate((48, 64, 64))]
    names = ["a", "b", "c"]
    batch = seg.segment_batch(names, images, cache_dir=tmp_path / "cache")
    assert calls == [3]  # one pass for the three films
    assert sum(not isinstance(m, Exception) for m in batch) >= 2  # masks were found (the comparison bites)
    for name, image, got in zip(names, images, batch):
        try:
            alone = seg(name, image)
        except ValueError as exc:
            assert isinstance(got, ValueError) and type(got) is type(exc)
            continue
        assert got.shape == image.shape and np.array_equal(got, alone)
    assert sorted(p.name for p in (tmp_path / "cache" / "masks").glob("*.png")) == \
        sorted(f"{n}.png" for n, m in zip(names, batch) if not isinstance(m, Exception))
