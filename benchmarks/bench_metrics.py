#!/usr/bin/env python
"""Throughput of the evaluation metrics (gl_lcm.metrics) at the paper's 1024 x 1024.

Rows: MSE + PSNR + BSR (``compute_metrics`` without LPIPS); LPIPS with the network built once and
reused (``LPIPSMetric``); LPIPS with the network rebuilt for every image; the one-time build cost;
all four metrics together. LPIPS uses the local torchvision AlexNet weights when present
(``--lpips-weights``, default: where ``gl-lcm weights lpips`` installs them, then torchvision's cache); otherwise a
randomly initialised AlexNet trunk is written to a temporary folder and the output says so (only
speed is measured, and it does not depend on the weights).

Examples::

    python benchmarks/bench_metrics.py --threads 1
    python benchmarks/bench_metrics.py --device cuda --num-images 32
    python benchmarks/bench_metrics.py --image-size 64 --num-images 1 --repeats 1    # smoke run

Prints a Markdown table and the machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _machine import machine_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

TABLE_HEADER = "| Measurement | images / s | ms / image |"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=1024, help="image side (default: %(default)s)")
    p.add_argument("--num-images", type=int, default=8, help="images per timed run (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is shown (default: %(default)s)")
    p.add_argument("--device", default="auto", help="LPIPS device: auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--lpips-weights",
                   help="AlexNet trunk weights (default: those `gl-lcm weights lpips` installed, then the torch hub cache)")
    p.add_argument("--lpips-protocol", default="published", choices=("published", "standard"),
                   help="LPIPS input protocol (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random images (default: %(default)s)")
    args = p.parse_args(argv)
    if args.image_size < 8 or args.num_images < 1 or args.repeats < 1:
        p.error("--image-size must be >= 8, --num-images and --repeats >= 1")
    return args


def random_triplets(n: int, size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """n (cxr, gt, pred) triplets of H x W float32 images in [0, 1]; cxr = gt + a bone-like offset."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        gt = rng.random((size, size), dtype=np.float32) * 0.8
        cxr = np.clip(gt + 0.2 * rng.random((size, size), dtype=np.float32), 0, 1)
        pred = np.clip(gt + 0.05 * rng.standard_normal((size, size), dtype=np.float32), 0, 1)
        out.append((cxr, gt, pred))
    return out


def lpips_weights(args, folder: Path) -> tuple[Path, str]:
    """(AlexNet weights file, description): the local file, or random weights written to ``folder``."""
    from gl_lcm.metrics import ALEXNET_WEIGHTS_FILE
    from gl_lcm.weights import find_trunk_weights, trunk_search_paths

    found = find_trunk_weights("alex", args.lpips_weights or None)
    if found is not None and found.is_file():
        return found, f"LPIPS weights: {found}"
    path = args.lpips_weights or " or ".join(str(p) for p in trunk_search_paths("alex"))
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        features = torchvision.models.alexnet(weights=None).features  # only the trunk is used by LPIPS
    random_path = folder / ALEXNET_WEIGHTS_FILE
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, random_path)
    return random_path, (f"LPIPS weights: RANDOM AlexNet trunk (no local weights at {path}); "
                         f"only the speed is measured, the LPIPS values mean nothing")


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (CUDA synchronised)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    from gl_lcm.metrics import LPIPSMetric, compute_metrics
    from gl_lcm.utils.dist import resolve_device

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = random_triplets(args.num_images, args.image_size, args.seed)
    n, size = len(data), args.image_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights, weights_note = lpips_weights(args, Path(tmp))

        def build():
            return LPIPSMetric(args.lpips_protocol, weights_path=weights, device=device)

        metric = build()
        metric(*data[0][1:])  # warm-up (kernels, allocator)
        compute_metrics(*data[0], image_size=size)

        t = median_seconds(lambda: [compute_metrics(c, g, p, image_size=size) for c, g, p in data],
                           args.repeats, device)
        rows.append(("MSE + PSNR + BSR (compute_metrics, no LPIPS)", t / n))
        t = median_seconds(lambda: [metric(g, p) for _, g, p in data], args.repeats, device)
        rows.append(("LPIPS, network built once and reused", t / n))
        t = median_seconds(lambda: [build()(g, p) for _, g, p in data], args.repeats, device)
        rows.append(("LPIPS, network rebuilt for every image", t / n))
        t = median_seconds(lambda: [compute_metrics(c, g, p, image_size=size, lpips_metric=metric)
                                    for c, g, p in data], args.repeats, device)
        rows.append(("all metrics (MSE + PSNR + BSR + LPIPS, network reused)", t / n))
        build_s = median_seconds(build, args.repeats, device)

    print(f"## Metrics throughput at {size} x {size} ({n} images per run, median of {args.repeats} runs)\n")
    print(f"- {weights_note}")
    print(f"- LPIPS: AlexNet v0.1, protocol '{args.lpips_protocol}', on {device}; MSE / PSNR / BSR in float64 "
          f"numpy on the CPU")
    print()
    print(TABLE_HEADER)
    print("|:--|--:|--:|")
    for name, sec in rows:
        print(f"| {name} | {1.0 / sec:.1f} | {1000 * sec:.2f} |")
    print(f"| building the LPIPS network (once) | – | {1000 * build_s:.2f} |")
    print()
    print("Note: timings on a shared machine are noisy.")
    print(machine_line(device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
