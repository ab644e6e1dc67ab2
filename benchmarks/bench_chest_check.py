"""Chest-only check (gl_lcm/data/chest_check.py) on real films and phantoms: which pass, which are
refused and why, the measured feature ranges, and the time per film.

    python benchmarks/bench_chest_check.py [--data ../shared/data] [--phantoms 20]

Groups: the chest films of shared/data/real-cxr (seg/*/images, pairs/*/CXR, dicom) and
shared/data/szch-sample/CXR, which must all pass; shared/data/real-cxr/nonchest, which must all be
refused; built-in phantoms at 128/256/512 px, which must pass. Missing folders are skipped.
"""
from __future__ import annotations

import argparse
import glob
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_line  # noqa: E402

from gl_lcm.data.chest_check import NonChestInputError, check_chest_input, image_features  # noqa: E402
from gl_lcm.data.io import LegacyDicomWarning, read_image_info  # noqa: E402
from gl_lcm.data.phantom import generate_phantom  # noqa: E402


def _rng(values):
    return f"{min(values):.2f}-{max(values):.2f}" if values else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--phantoms", type=int, default=20, help="phantoms per size")
    args = parser.parse_args()
    real = Path(args.data) / "real-cxr"
    groups = {
        "chest: real-cxr/seg": sorted(glob.glob(str(real / "seg" / "*" / "images" / "*"))),
        "chest: real-cxr/pairs CXR": sorted(glob.glob(str(real / "pairs" / "*" / "CXR" / "*"))),
        "chest: real-cxr/dicom": sorted(glob.glob(str(real / "dicom" / "*"))),
        "chest: szch-sample": sorted(glob.glob(str(Path(args.data) / "szch-sample" / "CXR" / "*"))),
        "non-chest: real-cxr/nonchest": sorted(glob.glob(str(real / "nonchest" / "*"))),
    }
    rows, refusals = [], []
    warnings.simplefilter("ignore", LegacyDicomWarning)
    for group, files in groups.items():
        if not files:
            continue
        items = []
        for f in files:
            info = read_image_info(f)
            items.append((Path(f).name, info.image, info.colourfulness, info.dicom.header if info.dicom else None))
        rows.append(_measure(group, items, refusals))
    phantoms = [(f"phantom {s}px #{i}", generate_phantom(s, i).cxr, 0.0, None)
                for s in (128, 256, 512) for i in range(args.phantoms)]
    rows.append(_measure("chest: phantoms 128/256/512 px", phantoms, refusals))

    print("| group | films | accepted | refused | background | mediastinum | aspect | ms / film |")
    print("|:--|--:|--:|--:|:-:|:-:|:-:|--:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]} | {r[7]:.1f} |")
    print()
    if refusals:
        print("Refused:")
        for group, name, reason in refusals:
            print(f"- {group}: {name}: {reason}")
        print()
    print(machine_line(torch.device("cpu")))


def _measure(group, items, refusals):
    accepted, times, feats = 0, [], {"background": [], "mediastinum": [], "aspect": []}
    for name, image, colour, header in items:
        t0 = time.perf_counter()
        try:
            check_chest_input(name, image, colour, header)
            accepted += 1
        except NonChestInputError as exc:
            refusals.append((group, name, str(exc).split(": ", 1)[1]))
        times.append(time.perf_counter() - t0)
        f = image_features(image)
        for k in feats:
            feats[k].append(f[k])
    return (group, len(items), accepted, len(items) - accepted, _rng(feats["background"]),
            _rng(feats["mediastinum"]), _rng(feats["aspect"]), 1000 * float(np.mean(times)))


if __name__ == "__main__":
    main()
