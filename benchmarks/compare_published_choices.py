#!/usr/bin/env python
"""Published choice vs ours, one switch at a time, with the same models and the same noise.

Runs GL-LCM on the test split of a data set (the demo's phantoms by default) once with our
defaults and once per published behaviour (reference.* switches, the published fusion, no
erosion), every run with the same per-image random numbers (the training-time switch
diffusion.train_cond_scaling needs a retrained teacher and is not covered here), and prints BSR / MSE / PSNR of the
fused result against the ground truth as a Markdown table.

    python benchmarks/compare_published_choices.py --demo results/demo            # demo models
    python benchmarks/compare_published_choices.py --vqgan V.pt --denoiser U.pt --data-root DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from _machine import machine_line  # noqa: E402

VARIANTS = [
    ("ours (defaults)", []),
    ("LEG std over 8 channels (published)", ["reference.leg_std=published"]),
    ("re-quantised decoding (our default before this table)", ["reference.requantize=true"]),
    ("mean shift inside the mask, unclipped (published)", ["reference.mean_shift=published"]),
    ("8-bit conversions (published)", ["reference.conversions=published"]),
    ("no mask erosion, float Poisson", ["fusion.erode_px=0"]),
    ("seamlessClone as published", ["fusion.backend=published", "fusion.erode_px=0"]),
    ("all published choices", ["reference.leg_std=published", "reference.requantize=false",
                               "reference.mean_shift=published", "reference.conversions=published",
                               "fusion.backend=published", "fusion.erode_px=0"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default=None, help="a `gl-lcm demo` output folder (uses its data, VQGAN and teacher)")
    ap.add_argument("--vqgan", default=None)
    ap.add_argument("--denoiser", default=None, help="teacher or student checkpoint")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--steps", type=int, default=None, help="LCM steps (default: the denoiser's config)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from gl_lcm.config import Config, apply_overrides, from_dict, to_dict
    from gl_lcm.data.datasets import pairs_for_split
    from gl_lcm.data.io import read_image
    from gl_lcm.metrics import compute_metrics, summarize
    from gl_lcm.models.factory import load_denoiser, load_vqgan
    from gl_lcm.inference import FusionSettings, InferenceEngine, PixelSettings, SamplingSettings
    from gl_lcm.segmentation import load_masks_from_folder

    if args.demo:
        demo = Path(args.demo)
        args.vqgan = args.vqgan or str(demo / "vqgan" / "model.pt")
        args.denoiser = args.denoiser or str(demo / "teacher" / "model.pt")
        args.data_root = args.data_root or str(demo / "data")
    if not (args.vqgan and args.denoiser and args.data_root):
        sys.exit("give --demo, or --vqgan, --denoiser and --data-root")
    vqgan = load_vqgan(args.vqgan)
    unet, base = load_denoiser(args.denoiser)
    base_dict = to_dict(base)
    base_dict["data"]["root"] = args.data_root
    base_dict["device"] = "cpu"
    pairs = pairs_for_split(from_dict(Config, base_dict), "test")
    size = base.data.image_size
    import cv2

    def load(p):
        img, _ = read_image(p)
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA) if img.shape != (size, size) else img

    names = [p.stem for p in pairs]
    cxrs, gts = [load(p.cxr) for p in pairs], [load(p.bs) for p in pairs]
    masks = [load_masks_from_folder(Path(args.data_root) / "Mask", n, (size, size)) for n in names]
    steps = args.steps or base.lcm.num_inference_steps
    rows = []
    for label, overrides in VARIANTS:
        cfg = from_dict(Config, apply_overrides(to_dict(from_dict(Config, base_dict)), overrides))
        engine = InferenceEngine(vqgan, unet, SamplingSettings.from_config(cfg, base), FusionSettings.from_config(cfg),
                                 PixelSettings.from_config(cfg), torch.device("cpu"))
        metrics = []
        for i in range(0, len(names), 4):
            res = engine.run(names[i:i + 4], cxrs[i:i + 4], masks[i:i + 4], num_steps=steps)
            metrics += [compute_metrics(cxrs[i + k], gts[i + k], r.fused, image_size=size) for k, r in enumerate(res)]
        s = summarize(metrics)
        rows.append((label, s))
    print(f"\n| Choice ({len(names)} test images, {size} px, {steps} LCM steps, guidance {base.guidance.mode}) "
          f"| BSR (%) ↑ | MSE (10⁻³) ↓ | PSNR ↑ | ΔPSNR vs ours |")
    print("|:--|:-:|:-:|:-:|--:|")
    ref = rows[0][1]["psnr"][0]
    for label, s in rows:
        print(f"| {label} | {100 * s['bsr'][0]:.2f} ± {100 * s['bsr'][1]:.2f} | {1e3 * s['mse'][0]:.3f} ± "
              f"{1e3 * s['mse'][1]:.3f} | {s['psnr'][0]:.2f} ± {s['psnr'][1]:.2f} | {s['psnr'][0] - ref:+.2f} |")
    print(f"\nmodels: {args.vqgan}, {args.denoiser}; masks from {Path(args.data_root) / 'Mask'}")
    print(machine_line(torch.device("cpu")))


if __name__ == "__main__":
    main()
