#!/usr/bin/env python
"""Reduced precision against fp32, through the inference engine, on trained models (demo) and real films.

For each reduced setting (UNet ``eval.precision`` and VQGAN ``eval.vqgan_precision``) it runs the same
images through the engine as fp32 and prints, side by side:

- the mean and max |fused(reduced) - fused(fp32)| in 8-bit levels (target: mean <= 1 level),
- the mean PSNR against the ground truth of both, and their difference (target: |dPSNR| <= 0.05 dB),
- for the VQGAN alone, the round trip (encode + decode) of real 1024 px films (``--real``, e.g. the three
  SZCH pairs in ../shared/data/szch-sample): mean |difference| in 8-bit levels and the round-trip PSNR.

    python benchmarks/bench_precision.py --demo results/demo --real ../shared/data/szch-sample/CXR

The 1-step one-step student is the default denoiser (``--model teacher --steps 50 --guidance leg`` for
the published setting). On a CPU bf16 runs through oneDNN; the figures that matter are a GPU's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from _machine import machine_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [("fp32", "fp32"), ("bf16", "fp32"), ("bf16_weights", "fp32"), ("bf16_weights", "bf16")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", default="results/demo", help="a finished `gl-lcm demo` folder (models and phantoms)")
    p.add_argument("--fast", action="store_true", help="the folder holds a `gl-lcm demo --fast` run")
    p.add_argument("--model", choices=["onestep", "teacher", "student"], default="onestep")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--guidance", default="vanilla")
    p.add_argument("--real", default=str(REPO.parent / "shared" / "data" / "szch-sample" / "CXR"),
                   help="folder of real films for the VQGAN round trip (skipped when absent)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(np.mean((a.astype(np.float64) - b) ** 2), 1e-12)))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from gl_lcm.config import Config, apply_overrides, from_dict, to_dict
    from gl_lcm.data.datasets import pairs_for_split
    from gl_lcm.data.io import list_images, read_image
    from gl_lcm.inference import InferenceEngine
    from gl_lcm.jobs.demo import KnownMasks, demo_configs
    from gl_lcm.utils.dist import resolve_device

    demo = Path(args.demo)
    if not (demo / "onestep" / "model.pt").is_file():
        sys.exit(f"{demo} holds no finished demo (no onestep/model.pt): run `gl-lcm demo` first")
    device = resolve_device(args.device)
    base = demo_configs(demo, fast=args.fast)["eval"]
    pairs = pairs_for_split(base, "test")
    names = [p.stem for p in pairs]
    cxrs = [read_image(p.cxr)[0] for p in pairs]
    gts = [read_image(p.bs)[0] for p in pairs]
    masks = KnownMasks({p.stem: read_image(p.mask)[0] > 0.5 for p in pairs})
    checkpoint = str(demo / "onestep" / "model.pt") if args.model == "onestep" else None
    model = None if args.model == "onestep" else args.model

    fused, round_trips = {}, {}
    real = sorted(list_images(args.real).values()) if Path(args.real).is_dir() else []
    films = [read_image(f)[0] for f in real]
    for unet_p, vq_p in SETTINGS:
        cfg = from_dict(Config, apply_overrides(to_dict(base), [f"eval.precision={unet_p}",
                                                                f"eval.vqgan_precision={vq_p}"]))
        engine = InferenceEngine.from_config(cfg, model=model, checkpoint=checkpoint, device=device, segmenter=masks)
        out = []
        for i in range(0, len(names), 8):
            out += [r.fused for r in engine.run(names[i:i + 8], cxrs[i:i + 8], num_steps=args.steps,
                                                guidance_mode=args.guidance)]
        fused[(unet_p, vq_p)] = out
        if films and (vq_p, "rt") not in round_trips:
            round_trips[(vq_p, "rt")] = [engine.round_trip([f])[0] for f in films]
    ref = fused[("fp32", "fp32")]
    ref_psnr = np.mean([psnr(g, f) for g, f in zip(gts, ref)])
    print(f"## Reduced precision against fp32 ({args.model}, {args.steps} step(s), guidance {args.guidance}; "
          f"{len(names)} held-out demo phantoms at {cxrs[0].shape[0]} px, their true lung masks)\n")
    print("| UNet | VQGAN | mean |fused - fp32| (8-bit levels) | max | PSNR (dB) | dPSNR vs fp32 (dB) |")
    print("|:--|:--|--:|--:|--:|--:|")
    for key, out in fused.items():
        d = np.abs(np.stack(out) - np.stack(ref)) * 255
        p = np.mean([psnr(g, f) for g, f in zip(gts, out)])
        print(f"| {key[0]} | {key[1]} | {d.mean():.3f} | {d.max():.1f} | {p:.3f} | {p - ref_psnr:+.4f} |")
    if films:
        print(f"\n## VQGAN round trip of {len(films)} real films ({Path(args.real)}, {films[0].shape[0]} px)\n")
        print("| VQGAN | mean |round trip - fp32 round trip| (8-bit levels) | round-trip PSNR vs the film (dB) |")
        print("|:--|--:|--:|")
        ref_rt = round_trips[("fp32", "rt")]
        for (vq_p, _), rts in round_trips.items():
            d = np.mean([np.abs(a - b).mean() * 255 for a, b in zip(rts, ref_rt)])
            print(f"| {vq_p} | {d:.3f} | {np.mean([psnr(f, r) for f, r in zip(films, rts)]):.3f} |")
    else:
        print(f"\n(no real films at {args.real}: VQGAN round trip skipped)")
    print(machine_line(device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
