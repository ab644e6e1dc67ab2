"""Splits (seeded, disjoint, covering, grouped) and paired data set matching / resizing."""
from __future__ import annotations

import re
import warnings

import cv2
import numpy as np
import pytest
import torch

from gl_lcm.data.pairs import Pair, PairedDataset, find_pairs, read_split
from gl_lcm.data.split import make_split, write_split

STEMS = [f"img{i:03d}" for i in range(50)]


# ----------------------------------------------------------------------------- split


def test_split_is_disjoint_covering_and_sized():
    split = make_split(STEMS, (0.8, 0.1, 0.1), seed=3)
    assert set(split) == {"train", "val", "test"}
    sets = [set(split[name]) for name in ("train", "val", "test")]
    assert sum(len(s) for s in sets) == len(STEMS)
    assert set().union(*sets) == set(STEMS)
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert [len(s) for s in sets] == [40, 5, 5]
    assert all(split[name] == sorted(split[name]) for name in split)


def test_split_is_deterministic_and_independent_of_input_order(tmp_path):
    first = make_split(STEMS, seed=7)
    shuffled = list(STEMS)
    np.random.default_rng(0).shuffle(shuffled)
    assert make_split(shuffled, seed=7) == first
    assert make_split(reversed(STEMS), seed=7) == first

    write_split(tmp_path / "a", first)
    write_split(tmp_path / "b", make_split(shuffled, seed=7))
    for name in ("train", "val", "test"):
        text_a = (tmp_path / "a" / f"{name}.txt").read_bytes()
        assert text_a == (tmp_path / "b" / f"{name}.txt").read_bytes()
        assert read_split(tmp_path / "a" / f"{name}.txt") == first[name]


def test_different_seed_gives_different_split():
    assert make_split(STEMS, seed=1)["test"] != make_split(STEMS, seed=2)["test"]


def test_group_regex_keeps_groups_together():
    # 20 patients with 1 to 4 images each, named patient<ID>_view<k>
    rng = np.random.default_rng(5)
    stems = [f"patient{p:02d}_view{k}" for p in range(20) for k in range(int(rng.integers(1, 5)))]
    split = make_split(stems, (0.6, 0.2, 0.2), seed=11, group_regex=r"^(patient\d+)_")
    where = {}
    for name, members in split.items():
        for stem in members:
            patient = re.match(r"(patient\d+)", stem).group(1)
            where.setdefault(patient, set()).add(name)
    assert len(where) == 20
    assert all(len(names) == 1 for names in where.values()), where
    assert sorted(sum(split.values(), [])) == sorted(stems)
    assert all(split[name] for name in ("train", "val", "test"))


def test_group_regex_whole_match_and_unmatched():
    split = make_split(["a1", "a2", "b1", "b2", "c1"], (0.5, 0.0, 0.5), seed=0, group_regex=r"[a-z]")
    for letter in "abc":
        homes = {name for name, members in split.items() for s in members if s.startswith(letter)}
        assert len(homes) == 1
    with pytest.raises(ValueError, match=r"does not match 1 stems: zz"):
        make_split(["p1_x", "zz"], group_regex=r"^(p\d+)_")


@pytest.mark.parametrize(
    "fractions,message",
    [((0.5, 0.5), "3 entries"), ((0.9, 0.2, -0.1), "non-negative"), ((0.5, 0.3, 0.1), "sum to 1")],
)
def test_split_validates_fractions(fractions, message):
    with pytest.raises(ValueError, match=message):
        make_split(STEMS, fractions)


def test_split_rejects_duplicates_and_bad_split_dict(tmp_path):
    with pytest.raises(ValueError, match="duplicate stems.*'a'"):
        make_split(["a", "b", "a"])
    with pytest.raises(ValueError, match="test"):
        write_split(tmp_path, {"train": ["a"], "val": []})


def test_read_split_strips_extensions_comments_and_finds_duplicates(tmp_path):
    path = tmp_path / "SZCH_testset.txt"
    path.write_text("# published style\n0.png\n\n  17.PNG \nJPCLN001\n")
    assert read_split(path) == ["0", "17", "JPCLN001"]
    path.write_text("3.png\n3\n")
    with pytest.raises(ValueError, match="more than once: 3"):
        read_split(path)
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        read_split(tmp_path / "nothere.txt")


# ----------------------------------------------------------------------------- pairs


def _write(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def _gradient(h, w, offset=0):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx * 255 // max(w - 1, 1) + offset) % 256).astype(np.uint8) ^ (yy % 2).astype(np.uint8)


def _make_folders(root, cxr_stems, bs_stems, mask_stems=None, size=(16, 16)):
    for stem in cxr_stems:
        _write(root / "CXR" / f"{stem}.png", _gradient(*size))
    for stem in bs_stems:
        _write(root / "BS" / f"{stem}.png", _gradient(*size, offset=9))
    for stem in mask_stems or []:
        mask = np.zeros(size, np.uint8)
        mask[2:10, 3:12] = 255
        _write(root / "Mask" / f"{stem}.png", mask)


def test_find_pairs_matches_by_stem(tmp_path):
    _make_folders(tmp_path, ["2", "0", "1"], ["0", "1", "2"])
    (tmp_path / "BS" / "2.png").rename(tmp_path / "BS" / "2.tif")  # extensions may differ
    pairs = find_pairs(tmp_path / "CXR", tmp_path / "BS")
    assert [p.stem for p in pairs] == ["0", "1", "2"]
    assert pairs[2] == Pair("2", tmp_path / "CXR" / "2.png", tmp_path / "BS" / "2.tif", None)


def test_find_pairs_reports_unpaired_by_name(tmp_path):
    _make_folders(tmp_path, ["0", "1", "lonely_cxr"], ["0", "1", "lonely_bs"])
    with pytest.raises(ValueError) as info:
        find_pairs(tmp_path / "CXR", tmp_path / "BS")
    message = str(info.value)
    assert "lonely_cxr" in message and "lonely_bs" in message and "allow_unpaired" in message

    with pytest.warns(UserWarning, match=r"lonely_cxr.*lonely_bs"):
        pairs = find_pairs(tmp_path / "CXR", tmp_path / "BS", allow_unpaired=True)
    assert [p.stem for p in pairs] == ["0", "1"]


def test_find_pairs_with_stems(tmp_path):
    _make_folders(tmp_path, ["0", "1", "2", "extra"], ["0", "1", "2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the unlisted 'extra' must not even warn
        pairs = find_pairs(tmp_path / "CXR", tmp_path / "BS", stems=["2", "0"])
    assert [p.stem for p in pairs] == ["0", "2"]
    with pytest.raises(ValueError, match=r"in neither folder: ghost"):
        find_pairs(tmp_path / "CXR", tmp_path / "BS", stems=["0", "ghost"])


def test_find_pairs_mask_folder_missing_files(tmp_path):
    _make_folders(tmp_path, ["0", "1", "2"], ["0", "1", "2"], mask_stems=["1", "9"])
    with pytest.raises(ValueError, match=r"lacks masks for 2 pairs: 0, 2"):
        find_pairs(tmp_path / "CXR", tmp_path / "BS", mask_dir=tmp_path / "Mask")
    pairs = find_pairs(tmp_path / "CXR", tmp_path / "BS", mask_dir=tmp_path / "Mask", stems=["1"])
    assert pairs[0].mask == tmp_path / "Mask" / "1.png"


def test_paired_dataset_values_and_shapes(tmp_path):
    _make_folders(tmp_path, ["a"], ["a"], mask_stems=["a"], size=(16, 16))
    pairs = find_pairs(tmp_path / "CXR", tmp_path / "BS", mask_dir=tmp_path / "Mask")
    item = PairedDataset(pairs, image_size=16, with_mask=True)[0]
    assert item["stem"] == "a"
    for key in ("cxr", "bs", "mask"):
        assert item[key].shape == (1, 16, 16) and item[key].dtype == torch.float32
    expected_cxr = torch.from_numpy(_gradient(16, 16) / 255.0).float() * 2 - 1
    torch.testing.assert_close(item["cxr"][0], expected_cxr)
    assert set(torch.unique(item["mask"]).tolist()) == {0.0, 1.0}
    assert item["mask"][0, 2:10, 3:12].all() and item["mask"].sum() == 8 * 9
    assert "mask" not in PairedDataset(pairs, image_size=16)[0]


def test_paired_dataset_resizes_pairs_of_different_sizes_consistently(tmp_path):
    # same content at two resolutions: after resizing both sides must agree
    yy, xx = np.mgrid[0:64, 0:64]
    big = (xx * 2 + yy).astype(np.uint8)
    small = cv2.resize(big, (32, 32), interpolation=cv2.INTER_AREA)
    _write(tmp_path / "CXR" / "p.png", big)
    _write(tmp_path / "BS" / "p.png", small)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    _write(tmp_path / "Mask" / "p.png", mask)
    pairs = find_pairs(tmp_path / "CXR", tmp_path / "BS", mask_dir=tmp_path / "Mask")

    item = PairedDataset(pairs, image_size=32, with_mask=True)[0]
    assert item["cxr"].shape == item["bs"].shape == item["mask"].shape == (1, 32, 32)
    # downsized cxr (area) equals the bs made the same way, to 8-bit rounding
    assert torch.max(torch.abs(item["cxr"] - item["bs"])) <= 2.0 / 255 + 1e-6
    # nearest-neighbour mask stays binary and keeps its box
    assert set(torch.unique(item["mask"]).tolist()) == {0.0, 1.0}
    assert item["mask"][0, 8:24, 4:20].all() and item["mask"].sum() == 16 * 16

    up = PairedDataset(pairs, image_size=64, with_mask=True)[0]
    assert up["cxr"].shape == up["bs"].shape == (1, 64, 64)
    torch.testing.assert_close(up["cxr"][0], torch.from_numpy(big / 255.0).float() * 2 - 1)  # untouched
    expected_bs = cv2.resize(small.astype(np.float32) / 255, (64, 64), interpolation=cv2.INTER_LINEAR)
    torch.testing.assert_close(up["bs"][0], torch.from_numpy(expected_bs) * 2 - 1)


def test_paired_dataset_requires_masks(tmp_path):
    _make_folders(tmp_path, ["a"], ["a"])
    pairs = find_pairs(tmp_path / "CXR", tmp_path / "BS")
    with pytest.raises(ValueError, match="no mask: a"):
        PairedDataset(pairs, image_size=16, with_mask=True)


def test_paired_dataset_on_real_data(szch_dir):
    pairs = find_pairs(szch_dir / "CXR", szch_dir / "BS")
    assert [p.stem for p in pairs] == ["0", "1", "2"]
    item = PairedDataset(pairs, image_size=256)[1]
    assert item["cxr"].shape == (1, 256, 256) and item["stem"] == "1"
    assert -1.0 <= item["cxr"].min() < item["cxr"].max() <= 1.0
    raw = cv2.imread(str(szch_dir / "BS" / "1.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
    expected = cv2.resize(raw, (256, 256), interpolation=cv2.INTER_AREA) * 2 - 1
    torch.testing.assert_close(item["bs"][0], torch.from_numpy(expected))


def test_mask_resizing_is_nearest_neighbour(tmp_path):
    rng = np.random.default_rng(8)
    mask = (rng.random((10, 10)) > 0.5).astype(np.uint8) * 255
    _write(tmp_path / "CXR" / "m.png", _gradient(10, 10))
    _write(tmp_path / "BS" / "m.png", _gradient(10, 10, offset=3))
    _write(tmp_path / "Mask" / "m.png", mask)
    pairs = find_pairs(tmp_path / "CXR", tmp_path / "BS", mask_dir=tmp_path / "Mask")
    resized = PairedDataset(pairs, image_size=16, with_mask=True)[0]["mask"][0].numpy()
    # OpenCV's nearest rule: destination pixel i takes source pixel floor(i * src / dst)
    rows = [int(i * 10 // 16) for i in range(16)]
    expected = (mask[np.ix_(rows, rows)] > 0).astype(np.float32)
    np.testing.assert_array_equal(resized, expected)
