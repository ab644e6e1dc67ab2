#!/usr/bin/env python
"""Per-stage inference time (segment, encode, sample, decode, fuse) and peak GPU memory, side by side.

Random weights from ``--vqgan-config`` / ``--unet-config`` (tiny configs by default; the paper
configs give the 53.8 M VQGAN and 383 M UNet), phantom CXRs at ``--image-size``. Row sets:

- ``--table gpu``: the published setting (LCM-50, two UNet calls per step, scheduler rebuilt every
  step, fp32, seamlessClone fusion) against ours (LCM-50 batched, ``--precision`` autocast, torch
  fusion on the device) and the student at 4, 2 and 1 steps (ours), then the same with every
  optimisation (UNet weights cast to bf16 once, CUDA graphs, bf16 VQGAN, 30 fixed CG iterations),
  at each ``--batch-sizes``. Every row runs the inference engine that ``gl-lcm evaluate`` runs.
- ``--table cpu``: the student at ``--student-steps`` with the previous default (fp32, sparse float
  fusion) against the current one (fp32, torch fusion): before / after.

Seconds are per image (stage time / batch size), medians over ``--repeats`` timed runs after a
warm-up run with one sampling step. A row whose estimated time exceeds ``--row-budget-s`` samples
fewer steps and scales the sampling time to the full count (linear in the UNet calls), and says so.
The segmentation stage is the classical method on the CPU (the phantom's own mask when it finds no lung).

    python benchmarks/bench_inference.py --table cpu --image-size 1024 --threads 1
    python benchmarks/bench_inference.py --table gpu --device cuda --vqgan-config configs/vqgan_paper.yaml \\
        --unet-config configs/unet_paper.yaml --image-size 1024 --batch-sizes 1 8

Prints a Markdown table and the machine line.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from _machine import machine_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("segment", "encode", "sample", "decode", "fuse")
TABLE_HEADER = ("| Row | Batch | UNet calls / batch | Precision | Fusion | segment s | encode s | sample s | decode s | "
                "fuse s | total s / image | images / s | peak GPU GiB |")


@dataclass
class RowSpec:
    name: str
    steps: int
    batched: bool
    rebuild: bool
    precision: str
    fusion: str  # fusion.backend: torch, float or opencv
    vqgan_precision: str = "fp32"
    cuda_graphs: bool = False
    cg_iterations: int = 0  # fusion.cg_iterations (0: CG to tolerance)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=["gpu", "cpu"], default="cpu", help="row set (see above)")
    p.add_argument("--vqgan-config", default=str(REPO_ROOT / "configs" / "vqgan_tiny.yaml"))
    p.add_argument("--unet-config", default=str(REPO_ROOT / "configs" / "ldm_tiny.yaml"))
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16", "bf16_weights"],
                   help="UNet precision of the plain 'ours' rows (the 'all optimisations' rows use bf16_weights)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet in 'ours' rows")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--student-steps", type=int, nargs="+", default=None,
                   help="student step counts (default: 4 2 1 for gpu, 4 for cpu)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--row-budget-s", type=float, default=0.0,
                   help="time budget per row (0 = none): longer rows sample fewer steps and scale up")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def row_specs(args) -> list[RowSpec]:
    T = args.teacher_steps
    if args.table == "gpu":
        steps = args.student_steps or [4, 2, 1]
        rows = [RowSpec(f"published: LCM-{T}, 2 UNet calls / step, scheduler rebuilt", T, False, True, "fp32",
                        "opencv"),
                RowSpec(f"ours: LCM-{T} batched", T, True, False, args.precision, "torch")]
        rows += [RowSpec(f"ours: student {s} step{'s' if s > 1 else ''}", s, True, False, args.precision, "torch")
                 for s in steps]
        # the fully optimised path: weights cast once, CUDA graphs, bf16 VQGAN, fixed-count CG fusion
        fast = dict(vqgan_precision="bf16", cuda_graphs=True, cg_iterations=30)
        rows += [RowSpec(f"ours, all optimisations: LCM-{T} batched", T, True, False, "bf16_weights", "torch", **fast)]
        rows += [RowSpec(f"ours, all optimisations: student {s} step{'s' if s > 1 else ''}", s, True, False,
                         "bf16_weights", "torch", **fast) for s in steps]
        return rows
    steps = args.student_steps or [4]
    rows = []
    for s in steps:
        rows.append(RowSpec(f"before: student {s} steps, fp32, float sparse fusion", s, True, False, "fp32", "float"))
        rows.append(RowSpec(f"after: student {s} steps, fp32, torch fusion", s, True, False, "fp32", "torch"))
    return rows


def build(args, device):
    """(vqgan, unet, cfg) with random weights (zero-initialised layers made small random)."""
    from gl_lcm.config import load_config
    from gl_lcm.models.factory import build_unet, build_vqgan

    vq_cfg, cfg = load_config(args.vqgan_config), load_config(args.unet_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        vqgan = build_vqgan(vq_cfg.vqgan)
        unet = build_unet(cfg.unet, vq_cfg.vqgan.embed_dim)
        with torch.no_grad():
            for p in unet.parameters():
                if not p.any():
                    p.normal_(0.0, 0.05)
    cfg.data.image_size = args.image_size
    cfg.device = str(device)
    return vqgan.to(device).eval().requires_grad_(False), unet.to(device).eval().requires_grad_(False), cfg


def phantoms(n: int, size: int):
    from gl_lcm.data.phantom import generate_phantom

    out = [generate_phantom(size, seed) for seed in range(n)]
    return [f"phantom_{i}" for i in range(n)], [p.cxr.astype(np.float32) for p in out], [p.lung_mask for p in out]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_engine(spec: RowSpec, vqgan, unet, cfg, device, names, fallback_masks, compile_unet=False):
    """The inference engine for one row: the classical segmentation (phantom mask where it finds no lung),
    the row's precision, fusion backend, batching and scheduler rebuild."""
    import dataclasses

    from gl_lcm.inference import FusionSettings, InferenceEngine, PixelSettings, SamplingSettings, Segmenter
    from gl_lcm.inference.segmenter import WithFallback

    segmenter = WithFallback(Segmenter("classical"), dict(zip(names, fallback_masks)))
    fusion = dataclasses.replace(FusionSettings.from_config(cfg), backend=spec.fusion,
                                 cg_iterations=spec.cg_iterations)
    return InferenceEngine(vqgan, unet, SamplingSettings.from_config(cfg), fusion, PixelSettings.from_config(cfg),
                           device, segmenter=segmenter, precision=spec.precision, compile=compile_unet,
                           vqgan_precision=spec.vqgan_precision, cuda_graphs=spec.cuda_graphs,
                           batched=spec.batched, rebuild_scheduler=spec.rebuild)


# engine stage names -> this table's column names
ENGINE_STAGES = {"segmentation": "segment", "encode": "encode", "sampling": "sample", "decode": "decode",
                 "fusion": "fuse"}


def run_once(engine, steps: int, names, cxrs):
    """Stage seconds for one batch (whole batch, not per image), through the engine's run()."""
    engine.run(names, cxrs, num_steps=steps)
    return {ENGINE_STAGES[k]: v for k, v in engine.timer.seconds.items()}


def measure(args) -> tuple[list[dict], torch.device]:
    """One dict per (row, batch size): stage seconds per image, total, images/s, peak GiB, notes."""
    from gl_lcm.utils.dist import resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    vqgan, unet, cfg = build(args, device)
    names_all, cxrs_all, masks_all = phantoms(max(args.batch_sizes), args.image_size)
    results = []
    for bs in args.batch_sizes:
        names, cxrs, fb = names_all[:bs], cxrs_all[:bs], masks_all[:bs]
        for spec in row_specs(args):
            print(f"[bench_inference] {spec.name}, batch {bs}", file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            compile_unet = args.compile and spec.name.startswith("ours")
            engine = make_engine(spec, vqgan, unet, cfg, device, names, fb, compile_unet)
            warm = run_once(engine, 1, names, cxrs)
            per_step = warm["sample"]
            fixed = sum(warm[s] for s in STAGES if s != "sample")
            steps, note = spec.steps, ""
            if args.row_budget_s and (fixed + per_step * spec.steps) * args.repeats > args.row_budget_s:
                steps = max(1, min(spec.steps, int((args.row_budget_s / args.repeats - fixed) / max(per_step, 1e-9))))
                repeats = 1 if steps < spec.steps else args.repeats
                if steps < spec.steps:
                    note = f"sampling timed at {steps} of {spec.steps} steps, scaled"
            else:
                repeats = args.repeats
            runs = [run_once(engine, steps, names, cxrs) for _ in range(repeats)]
            stage = {s: statistics.median(r[s] for r in runs) / bs for s in STAGES}
            stage["sample"] *= spec.steps / steps
            total = sum(stage.values())
            peak = engine.timer.peak_gib()
            calls = spec.steps * (1 if spec.batched else 2)
            results.append({"row": spec.name, "batch": bs, "calls": calls, "precision": spec.precision,
                            "fusion": spec.fusion, **stage, "total": total, "images_per_s": 1.0 / total,
                            "peak_gib": peak, "note": note})
    return results, device


def markdown(results: list[dict]) -> str:
    lines = [TABLE_HEADER, "|:--|--:|--:|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "–"
        name = r["row"] + (f" ({r['note']})" if r["note"] else "")
        lines.append(f"| {name} | {r['batch']} | {r['calls']} | {r['precision']} | {r['fusion']} | "
                     + " | ".join(f"{r[s]:.3f}" for s in STAGES)
                     + f" | {r['total']:.3f} | {r['images_per_s']:.2f} | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    results, device = measure(args)
    print(f"## Inference per stage at {args.image_size} x {args.image_size} (random weights: "
          f"{Path(args.vqgan_config).name} + {Path(args.unet_config).name}; seconds per image, median of "
          f"{args.repeats} runs after a 1-step warm-up)\n")
    print(markdown(results))
    print()
    print(machine_line(device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
