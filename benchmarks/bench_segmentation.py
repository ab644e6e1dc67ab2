"""Lung segmentation on real films per source, on harder variants of them, and on phantoms.

    python benchmarks/bench_segmentation.py --segnet runs/segnet_lungs/model.pt \
        [--data ../shared/data] [--variants] [--phantoms 20] [--out results/bench_segmentation]

Sources: shared/data/real-cxr/seg/{jsrt, jsrt-equalized, shenzhen, covid}, each scored against its
own outline convention (JSRT/SCR and Shenzhen: the visible lung; COVID: the full lung to the rib
cage), so the U-Net is asked for its 'visible' or 'full' output accordingly. Methods: classical,
unet (--segnet), pretrained (--lungs-segmentation resnet34.pth, when given). Variants
(gl_lcm/data/variants.py) transform each film and its mask alike, seeded per film. Per cell: mean
Dice, lowest Dice, mean recall, refused films ("no lung found" counts as Dice 0), seconds per film
(segmentation only, file reading excluded). Writes table.md, per_film.csv and worst.png (the worst
film per source and method, truth green, prediction red) to --out.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_line  # noqa: E402

from gl_lcm.data.io import list_images, read_image  # noqa: E402
from gl_lcm.data.phantom import generate_phantom  # noqa: E402
from gl_lcm.data.variants import VARIANTS  # noqa: E402
from gl_lcm.segmentation import NoLungFoundError, segment_lungs  # noqa: E402
from gl_lcm.segmentation.learned import convention_channel  # noqa: E402

SOURCES = {"jsrt": "visible", "jsrt-equalized": "visible", "shenzhen": "visible", "covid": "full"}


def load_source(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    images, masks = list_images(folder / "images"), list_images(folder / "masks")
    return [(s, read_image(images[s])[0], read_image(masks[s], allow_constant=True)[0] > 0.5) for s in images]


def make_segmenters(args) -> dict:
    """name -> f(image01, convention, name) -> bool mask."""
    out = {"classical": lambda img, conv, name: segment_lungs(img, "classical", name=name)}
    if args.segnet:
        from gl_lcm.models.factory import load_segnet

        model, cfg = load_segnet(args.segnet, "cpu")
        outputs, size = cfg.segmentation.outputs, cfg.segmentation.image_size
        channels = {}
        for conv in sorted(set(SOURCES.values())):
            try:
                channels[conv] = convention_channel(outputs, conv, args.segnet)
            except ValueError as exc:  # score what the net has, and say so
                channels[conv] = 0
                print(f"note: {exc}; its '{outputs[0]}' output is scored for the '{conv}' sources", file=sys.stderr)

        def unet(img, conv, name):
            return segment_lungs(img, "unet", model=model, image_size=size, channel=channels[conv], name=name)
        out["unet"] = unet
    if args.lungs_segmentation:
        from gl_lcm.models.published_lungseg import load_published_lungseg

        published = load_published_lungseg(args.lungs_segmentation, "cpu")
        out["pretrained"] = lambda img, conv, name: segment_lungs(img, "pretrained", model=published, name=name)
    return out


def score(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    inter = float(np.logical_and(pred, truth).sum())
    return 2 * inter / max(1.0, float(pred.sum() + truth.sum())), inter / max(1.0, float(truth.sum()))


def run_cell(segment, films, convention) -> dict:
    dices, recalls, refused, times, worst = [], [], 0, [], None
    rows = []
    for name, img, truth in films:
        t0 = time.perf_counter()
        try:
            pred = segment(img, convention, name)
        except NoLungFoundError:
            pred, refused = np.zeros_like(truth), refused + 1
        times.append(time.perf_counter() - t0)
        d, r = score(pred, truth)
        dices.append(d)
        recalls.append(r)
        rows.append((name, d, r))
        if worst is None or d < worst[0]:
            worst = (d, name, img, truth, pred)
    return {"dice": float(np.mean(dices)), "min": float(np.min(dices)), "recall": float(np.mean(recalls)),
            "refused": refused, "n": len(films), "s": float(np.mean(times)), "rows": rows, "worst": worst}


def overlay(img: np.ndarray, truth: np.ndarray, pred: np.ndarray, label: str, side: int = 256) -> np.ndarray:
    small = cv2.resize((np.clip(img, 0, 1) * 255).astype(np.uint8), (side, side), interpolation=cv2.INTER_AREA)
    tile = cv2.cvtColor(small, cv2.COLOR_GRAY2BGR)
    for m, colour in ((truth, (0, 200, 0)), (pred, (0, 0, 255))):
        m = cv2.resize(m.astype(np.uint8), (side, side), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(tile, contours, -1, colour, 1)
    cv2.putText(tile, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1, cv2.LINE_AA)
    return tile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--segnet", default="", help="gl-lcm train-seg checkpoint (model.pt)")
    parser.add_argument("--lungs-segmentation", default="", help="the lungs-segmentation package's resnet34.pth")
    parser.add_argument("--variants", action="store_true", help="also the harder variants of every film")
    parser.add_argument("--phantoms", type=int, default=20, help="phantoms at 256 px (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_segmentation")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    seg_root = Path(args.data) / "real-cxr" / "seg"
    sources = {s: load_source(seg_root / s) for s in SOURCES if (seg_root / s / "images").is_dir()}
    if not sources:
        sys.exit(f"no films under {seg_root}: pass --data (the folder holding real-cxr/)")
    segmenters = make_segmenters(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_film, tiles = [], []

    def cells(films_by_source, variant):
        table = {}
        for method, segment in segmenters.items():
            for source, films in films_by_source.items():
                cell = run_cell(segment, films, SOURCES.get(source, "visible"))
                table[(method, source)] = cell
                per_film.extend([variant, method, source, *r] for r in cell["rows"])
                if variant == "original":
                    d, name, img, truth, pred = cell["worst"]
                    tiles.append(overlay(img, truth, pred, f"{method} {source} {name[:18]} {d:.2f}"))
        return table

    print("## Per source (original films)\n")
    print("| method | source (convention) | films | mean Dice | lowest Dice | mean recall | refused | s / film |")
    print("|:--|:--|--:|--:|--:|--:|--:|--:|")
    all_sources = dict(sources)
    if args.phantoms:
        phantoms = [generate_phantom(256, i) for i in range(args.phantoms)]
        all_sources["phantoms 256 px"] = [(f"phantom_{i}", p.cxr, p.lung_mask) for i, p in enumerate(phantoms)]
    table = cells(all_sources, "original")
    lines = []
    for (method, source), c in table.items():
        lines.append(f"| {method} | {source} ({SOURCES.get(source, 'visible')}) | {c['n']} | {c['dice']:.3f} | "
                     f"{c['min']:.3f} | {c['recall']:.3f} | {c['refused']} | {c['s']:.3f} |")
    print("\n".join(lines))
    report = ["## Per source (original films)", "", *lines]

    if args.variants:
        header = " | ".join(f"{s} Dice (lowest)" for s in sources)
        print(f"\n## Harder variants (masks transformed alike)\n\n| variant | method | {header} | refused | s / film |")
        print("|:--|:--|" + "--:|" * (len(sources) + 2))
        for variant, transform in VARIANTS.items():
            films_by_source = {}
            for source, films in sources.items():
                moved = []
                for i, (name, img, truth) in enumerate(films):
                    rng = np.random.default_rng([args.seed, i, sum(map(ord, variant + source))])
                    moved.append((name, *transform(img, truth, rng)))
                films_by_source[source] = moved
            vt = cells(films_by_source, variant)
            for method in segmenters:
                cs = [vt[(method, s)] for s in sources]
                line = (f"| {variant} | {method} | " + " | ".join(f"{c['dice']:.3f} ({c['min']:.2f})" for c in cs)
                        + f" | {sum(c['refused'] for c in cs)} | {np.mean([c['s'] for c in cs]):.3f} |")
                print(line, flush=True)
                report.append(line)
    machine = machine_line(torch.device("cpu"))
    print(f"\n{machine}")
    (out / "table.md").write_text("\n".join(report) + f"\n\n{machine}\n")
    with open(out / "per_film.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "method", "source", "film", "dice", "recall"])
        w.writerows(per_film)
    if tiles:
        cols = len(all_sources)
        rows = [np.hstack(tiles[i:i + cols]) for i in range(0, len(tiles), cols)]
        cv2.imwrite(str(out / "worst.png"), np.vstack(rows))
    print(f"wrote {out / 'table.md'}, {out / 'per_film.csv'}, {out / 'worst.png'}")


if __name__ == "__main__":
    main()
