#!/usr/bin/env python
"""Poisson fusion speed and agreement, side by side in one run: the sparse float solver, the torch
solver (DST-preconditioned CG; CPU, and the GPU when there is one) and OpenCV's seamlessClone.

Scene: a phantom CXR at ``--size`` (default 1024 x 1024); global = soft tissue, local = the CXR plus a
fine texture; mask = the phantom's lung fields dilated by 7 px (about a third of the image, a large
lung mask). Every row fuses the same images; the agreement columns compare against the sparse float
solver (float64 inside), over the whole image and inside the mask at least 6 px from its edge
(OpenCV erodes its mask by 3 px, so it differs near the edge by construction).

    python benchmarks/bench_fusion.py --threads 1
    python benchmarks/bench_fusion.py --size 2048 --repeats 3

Prints a Markdown table and the machine line.
"""
from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np
import torch

from _machine import machine_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

TABLE_HEADER = ("| Method | Device | ms / image | vs seamlessClone | max abs diff vs float sparse | "
                "mean abs diff (mask interior, /255) | CG iterations |")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per method; the median is printed")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=5, help="phantom seed")
    p.add_argument("--skip-sparse", action="store_true", help="leave out the sparse float solver (slow at large sizes); "
                                                              "agreement is then measured against torch float64")
    return p.parse_args(argv)


def scene(size: int, seed: int):
    from gl_lcm.data.phantom import generate_phantom

    phantom = generate_phantom(size, seed)
    mask = cv2.dilate(phantom.lung_mask.astype(np.uint8), np.ones((15, 15), np.uint8)) > 0
    rng = np.random.default_rng(seed)
    texture = cv2.GaussianBlur(rng.standard_normal((size, size)), (0, 0), 1.5)
    local = np.clip(phantom.cxr + 0.03 * texture, 0, 1)
    return phantom.soft_tissue.astype(np.float64), local.astype(np.float64), mask


def interleaved_medians(fns, repeats: int, devices):
    """Median wall seconds and last result of each ``fns[i]()``: one warm-up call each, then ``repeats``
    rounds that run every method once in turn, so load from other processes hits all methods alike."""
    outs = [fn() for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, (fn, device) in enumerate(zip(fns, devices)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            outs[i] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times], outs


def main(argv=None) -> int:
    from gl_lcm.fusion import poisson_fuse, poisson_fuse_opencv, poisson_fuse_torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g, l, mask = scene(args.size, args.seed)
    cpu = torch.device("cpu")
    cases = []  # (name, device, fn, iterations?)
    if not args.skip_sparse:
        cases.append(("float sparse (scipy splu, float64)", cpu, lambda: poisson_fuse(g, l, mask), False))
    cases.append(("torch DST-CG float32 (default)", cpu, lambda: poisson_fuse_torch(g, l, mask), True))
    cases.append(("torch DST-CG float64", cpu, lambda: poisson_fuse_torch(g, l, mask, dtype=torch.float64), True))
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        gt, lt, mt = (torch.from_numpy(a).to(dev) for a in (g, l, mask))
        cases.append(("torch DST-CG float32 (default)", dev, lambda: poisson_fuse_torch(gt, lt, mt), True))
    cases.append(("OpenCV seamlessClone (published; 8-bit)", cpu, lambda: poisson_fuse_opencv(g, l, mask), False))

    iterations = {}

    def counted(i, fn):
        def run():
            out = fn()
            iterations[i] = "+".join(str(n) for n in poisson_fuse_torch.last_iterations)
            return out
        return run

    fns = [counted(i, fn) if has_iters else fn for i, (_, _, fn, has_iters) in enumerate(cases)]
    secs, outs = interleaved_medians(fns, args.repeats, [c[1] for c in cases])
    results = []
    for i, ((name, device, _, _), sec, out) in enumerate(zip(cases, secs, outs)):
        if isinstance(out, torch.Tensor):
            out = out.cpu().numpy()
        results.append((name, device, sec, out, iterations.get(i, "–")))
    reference = results[0][3] if not args.skip_sparse else poisson_fuse_torch(g, l, mask, dtype=torch.float64,
                                                                              tol=1e-9)
    opencv_sec = results[-1][2]
    interior = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=6) > 0

    print(f"## Poisson fusion at {args.size} x {args.size} (mask {100 * mask.mean():.0f}% of the image, "
          f"median of {args.repeats} interleaved runs after one warm-up)\n")
    print(TABLE_HEADER)
    print("|:--|:--|--:|--:|--:|--:|--:|")
    for name, device, sec, out, iters in results:
        diff = np.abs(out.astype(np.float64) - reference)
        print(f"| {name} | {device.type} | {1000 * sec:.1f} | {opencv_sec / sec:.2f}x | {diff.max():.2e} | "
              f"{255 * diff[interior].mean():.3f} | {iters} |")
    print()
    print("CG iterations: one count per 4-connected component of the mask (each is solved on its own box).")
    print(machine_line(torch.device("cuda") if torch.cuda.is_available() else cpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
