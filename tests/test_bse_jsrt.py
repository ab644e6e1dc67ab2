"""prepare-bse-jsrt on a self-made clone in the public repository's layout (no data downloaded)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from gl_lcm.data.bse_jsrt import prepare_bse_jsrt
from gl_lcm.data.pairs import read_split
from gl_lcm.data.phantom import generate_phantom


def _clone(root, train_ids, valid_ids, size=128):
    for split, ids in (("train", train_ids), ("valid", valid_ids)):
        for k, jsrt_id in enumerate(ids):
            p = generate_phantom(size, k + (0 if split == "train" else 100))
            for kind, image in (("source", p.cxr), ("target", p.soft_tissue)):
                folder = root / "datasets" / f"{split}_bone" / kind
                folder.mkdir(parents=True, exist_ok=True)
                # stored dark-bone, as the clone does
                cv2.imwrite(str(folder / f"s_{jsrt_id}.png"), np.rint((1 - image) * 255).astype(np.uint8))
    return root


def test_prepare_inverts_resizes_splits_and_keeps_shared_films_out(tmp_path):
    train_ids = [f"JPCLN{i:03d}" for i in range(100, 116)] + ["JPCLN139", "JPCNN043"]
    valid_ids = [f"JPCNN{i:03d}" for i in range(1, 21)]
    repo = _clone(tmp_path / "clone", train_ids, valid_ids)
    calls = []

    def segmenter(name, image):
        calls.append(name)
        if name == "JPCNN005":
            raise ValueError("no lung found")
        return image > 0.5

    result = prepare_bse_jsrt(repo, tmp_path / "out", size=64, segmenter=segmenter, val_count=4, progress=False)
    out = tmp_path / "out"
    test, val, train = (read_split(out / f"{s}.txt") for s in ("test", "val", "train"))
    shared = ["JPCLN112", "JPCLN139", "JPCNN043"]  # the films ../shared/data/real-cxr holds
    assert test == sorted(valid_ids) and len(val) == 4 and len(train) == 18 - 3 - 4
    assert not set(shared) & (set(train) | set(val)) and result["excluded"] == shared
    assert not set(train) & set(val)
    # bone bright: the written CXR is 1 - stored, area-resized (a plain re-implementation)
    stored = cv2.imread(str(repo / "datasets" / "valid_bone" / "source" / "s_JPCNN001.png"), 0)
    expect = cv2.resize((1 - stored / 255.0).astype(np.float32), (64, 64), interpolation=cv2.INTER_AREA)
    written = cv2.imread(str(out / "CXR" / "JPCNN001.png"), 0) / 255.0
    assert written.shape == (64, 64) and np.abs(written - expect).max() <= 0.5 / 255 + 1e-6
    assert np.corrcoef(written.ravel(), (stored / 255.0)[::2, ::2].ravel())[0, 1] < -0.9  # inverted
    assert (out / "Mask" / "JPCNN001.png").is_file() and len(calls) == 38 - 3
    assert (out / "masks.txt").read_text().startswith("lung masks: classical")
    # every pair has a mask (training needs one); the film without a lung got the population prior
    assert sorted(p.stem for p in (out / "Mask").glob("*.png")) == sorted(p.stem for p in (out / "CXR").glob("*.png"))
    assert result["no_mask"] == ["JPCNN005"] and "population prior mask: JPCNN005" in (out / "masks.txt").read_text()
    others = [cv2.imread(str(p), 0) > 127 for p in sorted((out / "Mask").glob("*.png")) if p.stem != "JPCNN005"]
    prior = np.mean(np.stack(others), axis=0) >= 0.5
    assert np.array_equal(cv2.imread(str(out / "Mask" / "JPCNN005.png"), 0) > 127, prior)
    # the same seed gives the same validation films
    again = prepare_bse_jsrt(repo, tmp_path / "again", size=64, segmenter=None, val_count=4, progress=False)
    assert read_split(tmp_path / "again" / "val.txt") == val and again["mask_method"] == "none"


def test_prepare_names_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="Bone_Suppresion"):
        prepare_bse_jsrt(tmp_path, tmp_path / "out", progress=False)
