#!/usr/bin/env python
"""Sampling speed of GL-LCM against the DDPM-1000 baseline, on the same models and images.

Methods (every row: encode -> sample -> decode (-> post-processing and Poisson fusion)):

- DDPM-1000: global path only, one UNet call per training timestep (BS-LDM style);
- LCM-50 as published: dual path with two UNet calls per step (global, then local) and a
  scheduler rebuilt at every step (the engine with ``batched=False, rebuild_scheduler=True``);
- LCM-50 batched: both paths in one UNet call per step (the package default);
- student at 1 / 2 / 4 steps (batched dual path).

Without checkpoints the models are randomly initialised from ``--vqgan-config`` / ``--unet-config``
(tiny configs by default) and the images are random, so PSNR / BSR print "n/a"; only the times mean
something. With ``--vqgan --teacher [--student]`` (e.g. the demo's ``results/demo/*/model.pt``) and
``--data`` (a folder with CXR/ and BS/, optional Mask/ and ``--split`` list) it also reports the
PSNR / BSR of each method's output against the soft-tissue ground truth.

Examples::

    python benchmarks/bench_sampling.py                       # tiny random models on the CPU
    python benchmarks/bench_sampling.py --vqgan results/demo/vqgan/model.pt \\
        --teacher results/demo/teacher/model.pt --student results/demo/student/model.pt \\
        --data results/demo/data --split results/demo/data/test.txt --num-images 4
    python benchmarks/bench_sampling.py --vqgan-config configs/vqgan_paper.yaml \\
        --unet-config configs/unet_paper.yaml --image-size 1024 --device cuda     # paper size

Prints a Markdown table, the check "batched dual path == sequential dual path" and the machine.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch

from _machine import machine_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLE_HEADER = "| Method | UNet calls / batch | encode s | sampling s | decode s | fusion s | total s / image | speed-up vs"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqgan", help="trained VQGAN model.pt (with --teacher: trained-model mode)")
    p.add_argument("--teacher", help="trained teacher (ldm) model.pt")
    p.add_argument("--student", help="trained student (distill) model.pt; without it the student rows are skipped")
    p.add_argument("--config", help="inference config (lcm / guidance / fusion settings); default: the teacher "
                                    "checkpoint's config, or --unet-config with random models")
    p.add_argument("--data", help="folder with CXR/, BS/ and optionally Mask/ (random images when absent)")
    p.add_argument("--split", help="text file of stems to use from --data (default: every pair, sorted)")
    p.add_argument("--vqgan-config", default=str(REPO_ROOT / "configs" / "vqgan_tiny.yaml"),
                   help="VQGAN architecture of the random models (default: %(default)s)")
    p.add_argument("--unet-config", default=str(REPO_ROOT / "configs" / "ldm_tiny.yaml"),
                   help="UNet architecture and sampling settings of the random models (default: %(default)s)")
    p.add_argument("--image-size", type=int, help="image side (default: data.image_size of the VQGAN config)")
    p.add_argument("--num-images", type=int, default=2, help="images timed per method (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="images per sampling batch (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--ddpm-steps", type=int, default=1000,
                   help="DDPM steps; fewer than the training T (1000) runs ancestral sampling on a strided grid "
                        "(DDIM with eta=1), for smoke runs only (default: %(default)s)")
    p.add_argument("--teacher-steps", type=int, default=50, help="LCM steps of the teacher rows (default: %(default)s)")
    p.add_argument("--student-steps", type=int, nargs="+", default=[1, 2, 4],
                   help="student step counts (default: 1 2 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method; the median is shown "
                                                           "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and images (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); use 1 when other "
                                               "processes share the cores, as idle-spinning threads slow down badly")
    args = p.parse_args(argv)
    if bool(args.vqgan) != bool(args.teacher):
        p.error("--vqgan and --teacher go together (trained-model mode); give both or neither")
    if args.student and not args.vqgan:
        p.error("--student needs --vqgan and --teacher")
    for name in ("num_images", "batch_size", "ddpm_steps", "teacher_steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# ----------------------------------------------------------------------------- models and images
@dataclass
class Setup:
    """Everything the methods share: models, inference config and images (H x W in [0, 1])."""

    vqgan: torch.nn.Module
    teacher: torch.nn.Module
    student: Optional[torch.nn.Module]
    cfg: object
    device: torch.device
    names: list[str]
    cxrs: list[np.ndarray]
    masks: list[np.ndarray]
    gts: Optional[list[np.ndarray]]
    description: list[str] = field(default_factory=list)


def _randomise_zero_parameters(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Zero-initialised output layers make a random UNet predict exactly 0 (every path identical, the
    batched-vs-sequential check vacuous); give them small random values instead."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def random_models(args, device: torch.device):
    """(vqgan, unet, cfg) with random weights from the two architecture configs."""
    from gl_lcm.config import load_config
    from gl_lcm.models.factory import build_unet, build_vqgan

    vq_cfg = load_config(args.vqgan_config)
    cfg = load_config(args.config or args.unet_config)
    unet_cfg = load_config(args.unet_config)
    with torch.random.fork_rng(devices=[]):  # module initialisers draw from the global RNG
        torch.manual_seed(args.seed)
        vqgan = build_vqgan(vq_cfg.vqgan)
        unet = build_unet(unet_cfg.unet, vq_cfg.vqgan.embed_dim)
    _randomise_zero_parameters(unet, torch.Generator().manual_seed(args.seed + 1))
    cfg.data.image_size = args.image_size or vq_cfg.data.image_size
    vqgan = vqgan.to(device).eval().requires_grad_(False)
    unet = unet.to(device).eval().requires_grad_(False)
    return vqgan, unet, cfg


def trained_models(args, device: torch.device):
    """(vqgan, teacher, student or None, cfg) from checkpoints."""
    from gl_lcm.config import load_config
    from gl_lcm.models.factory import load_denoiser, load_vqgan

    vqgan = load_vqgan(args.vqgan, device)
    teacher, teacher_cfg = load_denoiser(args.teacher, device)
    student = load_denoiser(args.student, device)[0] if args.student else None
    cfg = load_config(args.config) if args.config else teacher_cfg
    if args.image_size:
        cfg.data.image_size = args.image_size
    return vqgan, teacher, student, cfg


def _two_lung_mask(size: int) -> np.ndarray:
    """Bool size x size mask of two upright ellipses where lungs usually are."""
    mask = np.zeros((size, size), np.uint8)
    for cx in (0.32, 0.68):
        cv2.ellipse(mask, (int(cx * size), int(0.45 * size)), (int(0.13 * size), int(0.27 * size)), 0, 0, 360, 1, -1)
    return mask.astype(bool)


def random_images(n: int, size: int, seed: int) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """n smooth random images in [0.05, 0.95] (H x W float32) with a two-ellipse lung mask each."""
    rng = np.random.default_rng(seed)
    coarse = max(4, size // 16)
    images = []
    for _ in range(n):
        low = rng.random((coarse, coarse)).astype(np.float32)
        img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
        img += 0.05 * rng.standard_normal((size, size)).astype(np.float32)
        images.append(np.clip(img, 0.05, 0.95).astype(np.float32))
    return [f"random_{i}" for i in range(n)], images, [_two_lung_mask(size) for _ in range(n)]


def folder_images(data: str, split: Optional[str], n: int, size: int):
    """First n pairs of a CXR/ BS/ (Mask/) folder resized to size: names, cxrs, gts, masks, mask source."""
    from gl_lcm.data.io import read_image
    from gl_lcm.data.pairs import find_pairs, read_split
    from gl_lcm.segmentation import NoLungFoundError, segment_lungs

    root = Path(data)
    mask_dir = root / "Mask" if (root / "Mask").is_dir() else None
    stems = read_split(split) if split else None
    pairs = find_pairs(root / "CXR", root / "BS", mask_dir, stems=stems)[:n]

    def load(path, interp=cv2.INTER_AREA):
        img, _ = read_image(path, allow_constant=interp == cv2.INTER_NEAREST)
        return img if img.shape == (size, size) else cv2.resize(img, (size, size), interpolation=interp)

    names = [p.stem for p in pairs]
    cxrs = [load(p.cxr) for p in pairs]
    gts = [load(p.bs) for p in pairs]
    if mask_dir is not None:
        masks = [load(p.mask, cv2.INTER_NEAREST) > 0.5 for p in pairs]
        source = f"{mask_dir}"
    else:  # no mask folder: the package's classical lung segmentation
        min_area = int(round(100 * size * size / 1024**2))
        masks, failed = [], []
        for nm, c in zip(names, cxrs):
            try:
                masks.append(segment_lungs(c, "classical", name=nm, min_area=min_area))
            except NoLungFoundError:  # keep benchmarking: a generic two-lung mask stands in
                masks.append(_two_lung_mask(size))
                failed.append(nm)
        source = "classical segmentation" + (f" (no lung found in {', '.join(failed)}: ellipse masks used)"
                                             if failed else "")
    return names, cxrs, gts, masks, source


def build_setup(args) -> Setup:
    from gl_lcm.utils.dist import resolve_device

    device = resolve_device(args.device)
    if args.vqgan:
        vqgan, teacher, student, cfg = trained_models(args, device)
        desc = [f"models: trained checkpoints (VQGAN {args.vqgan}, teacher {args.teacher}, "
                f"student {args.student or 'not given: student rows skipped'})"]
    else:
        vqgan, teacher, cfg = random_models(args, device)
        student = teacher  # same architecture as a distilled student; only the timing matters here
        desc = [f"models: RANDOM weights from {args.vqgan_config} and {args.unet_config} "
                f"(the student rows use the same random UNet); PSNR / BSR not meaningful: n/a"]
    size = cfg.data.image_size
    if args.data:
        names, cxrs, gts, masks, mask_source = folder_images(args.data, args.split, args.num_images, size)
        desc.append(f"images: {len(names)} from {args.data}{' (' + args.split + ')' if args.split else ''}, "
                    f"lung masks from {mask_source}")
    else:
        names, cxrs, masks = random_images(args.num_images, size, args.seed)
        gts = None
        desc.append(f"images: {len(names)} random images (no ground truth)")
    if not args.vqgan:
        gts = None  # metrics of random models would only be noise
    desc.append(f"image size {size} x {size}, batch size {args.batch_size}, latents "
                f"{tuple(vqgan.latent_shape(size))}")
    return Setup(vqgan, teacher, student, cfg, device, names, cxrs, masks, gts, desc)


# ----------------------------------------------------------------------------- methods
@dataclass
class Method:
    name: str
    kind: str  # "ddpm" or "dual"
    model: str  # "teacher" or "student"
    steps: int
    batched: bool = True
    rebuild_scheduler: bool = False

    @property
    def unet_calls(self) -> int:
        """UNet forward calls per batch."""
        return self.steps * (1 if self.kind == "ddpm" or self.batched else 2)


def method_list(args, setup: Setup) -> list[Method]:
    ddpm_name = (f"DDPM-{args.ddpm_steps} (global path, BS-LDM style)" if args.ddpm_steps >= 1000
                 else f"DDPM-{args.ddpm_steps} (SMOKE RUN: strided ancestral, not DDPM-1000)")
    n = args.teacher_steps
    methods = [Method(ddpm_name, "ddpm", "teacher", args.ddpm_steps),
               Method(f"LCM-{n} dual path, sequential + scheduler rebuilt per step (published)", "dual", "teacher",
                      n, batched=False, rebuild_scheduler=True),
               Method(f"LCM-{n} dual path, batched (default)", "dual", "teacher", n)]
    if setup.student is not None:
        methods += [Method(f"student {k} step{'s' if k > 1 else ''}, batched dual path", "dual", "student", k)
                    for k in args.student_steps]
    return methods


def _engine(setup: Setup, unet, batched: bool = True, rebuild_scheduler: bool = False):
    """The inference engine over ``unet`` with the setup's config and masks (as `gl-lcm evaluate` runs it)."""
    from gl_lcm.inference import FusionSettings, InferenceEngine, PixelSettings, SamplingSettings

    cfg = setup.cfg
    return InferenceEngine(setup.vqgan, unet, SamplingSettings.from_config(cfg), FusionSettings.from_config(cfg),
                           PixelSettings.from_config(cfg), setup.device, batched=batched,
                           rebuild_scheduler=rebuild_scheduler)


@torch.no_grad()
def run_batch(method: Method, setup: Setup, idx: list[int], unet=None):
    """One batch through one method: (outputs H x W in [0, 1], latents, stage seconds)."""
    model = unet or (setup.teacher if method.model == "teacher" else setup.student)
    names = [setup.names[i] for i in idx]
    cxrs = [setup.cxrs[i] for i in idx]
    if method.kind == "ddpm":
        engine = _engine(setup, model)
        outs = engine.run_global(names, cxrs, method.steps, sampler="ddpm")
    else:
        engine = _engine(setup, model, method.batched, method.rebuild_scheduler)
        outs = [r.fused for r in engine.run(names, cxrs, [setup.masks[i] for i in idx], num_steps=method.steps)]
    return outs, engine.last_latents, dict(engine.timer.seconds)


def run_method(method: Method, setup: Setup, batch_size: int):
    """Every image through ``method``: (stage seconds summed over batches, outputs, latents per batch)."""
    times: dict[str, float] = {}
    outs, latents = [], []
    n = len(setup.names)
    for start in range(0, n, batch_size):
        o, z, t = run_batch(method, setup, list(range(start, min(start + batch_size, n))))
        outs += o
        latents.append(z)
        for k, v in t.items():
            times[k] = times.get(k, 0.0) + v
    return times, outs, latents


def metrics_of(setup: Setup, outs: list[np.ndarray]) -> tuple[str, str]:
    """Mean PSNR (dB) and BSR (%) over the images, or n/a without ground truth."""
    if setup.gts is None:
        return "n/a", "n/a"
    from gl_lcm.metrics import compute_metrics

    rows = [compute_metrics(c, g, o, image_size=None) for c, g, o in zip(setup.cxrs, setup.gts, outs)]
    psnr = float(np.mean([r["psnr"] for r in rows]))
    bsr = float(np.mean([r["bsr"] for r in rows]))
    return f"{psnr:.2f}", f"{100 * bsr:.2f}"


class PerSampleUNet(torch.nn.Module):
    """Evaluates the wrapped UNet one sample at a time, so a batched call does exactly the arithmetic of
    separate calls (convolution kernels may sum in a different order for different batch sizes)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.unet(x_t[i:i + 1], t[i:i + 1], cond[i:i + 1]) for i in range(x_t.shape[0])])


def exact_equivalence_diff(setup: Setup, sequential: Method, batched: Method, batch_size: int) -> float:
    """Max abs latent difference of the two dual-path variants on the first batch, with per-sample UNet
    arithmetic: 0 unless the variants differ in noise, guidance or scheduler steps."""

    exact = PerSampleUNet(setup.teacher)
    idx = list(range(min(batch_size, len(setup.names))))
    _, za, _ = run_batch(sequential, setup, idx, unet=exact)
    _, zb, _ = run_batch(batched, setup, idx, unet=exact)
    return max_abs_diff([za], [zb])


def max_abs_diff(a_batches, b_batches) -> float:
    """Largest |a - b| over per-batch (z_global, z_local) latent pairs."""
    return max(float((a - b).abs().max()) for za, zb in zip(a_batches, b_batches) for a, b in zip(za, zb))


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = build_setup(args)
    methods = method_list(args, setup)
    n = len(setup.names)

    # warm-up: one batch of a short dual-path run and a few single-path steps (kernels, allocator, caches)
    warm = Method("warm-up", "dual", "teacher", 1)
    run_batch(warm, setup, list(range(min(args.batch_size, n))))
    run_batch(Method("warm-up", "ddpm", "teacher", 2), setup, [0])

    rows, first_latents = [], {}
    for method in methods:
        totals, stages, outs = [], {}, None
        for r in range(args.repeats):
            times, outs_r, latents = run_method(method, setup, args.batch_size)
            totals.append(sum(times.values()))
            for k, v in times.items():
                stages.setdefault(k, []).append(v)
            if r == 0:
                outs, first_latents[method.name] = outs_r, latents
        per_image = {k: statistics.median(v) / n for k, v in stages.items()}
        rows.append((method, per_image, statistics.median(totals) / n, metrics_of(setup, outs)))
        print(f"  done: {method.name}: {rows[-1][2]:.4f} s / image", file=sys.stderr, flush=True)

    ddpm_total = rows[0][2]
    ddpm_label = f"DDPM-{args.ddpm_steps}"
    print(f"## Sampling time per image ({args.repeats} runs, median; {n} images, batch {args.batch_size})\n")
    for line in setup.description:
        print(f"- {line}")
    print()
    print(f"{TABLE_HEADER} {ddpm_label} | PSNR (dB) | BSR (%) |")
    print("|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for method, st, total, (psnr, bsr) in rows:
        print(f"| {method.name} | {method.unet_calls} | {st.get('encode', 0):.4f} | {st.get('sampling', 0):.4f} | "
              f"{st.get('decode', 0):.4f} | {st.get('fusion', 0):.4f} | {total:.4f} | {ddpm_total / total:.1f}x | "
              f"{psnr} | {bsr} |")
    print()
    seq, bat = methods[1].name, methods[2].name
    diff = max_abs_diff(first_latents[seq], first_latents[bat])
    scale = max(float(z.abs().max()) for zs in first_latents[bat] for z in zs)
    exact = exact_equivalence_diff(setup, methods[1], methods[2], args.batch_size)
    print(f"Check: batched dual path == sequential dual path (max abs diff of the final latents): {diff:.3e} "
          f"(max |latent| {scale:.3g}){'' if math.isfinite(diff) else ' NOT FINITE'}; with the UNet evaluated "
          f"sample by sample in both (first batch): {exact:.3e} (0 = same noise, guidance and scheduler steps).")
    print(f"Note: the first number is float round-off (UNet kernels sum in another order for a batch of 1 than "
          f"for 2B), which {args.teacher_steps} sampling steps can amplify, most with random weights.")
    if args.ddpm_steps < 1000:
        print(f"Note: --ddpm-steps {args.ddpm_steps} < 1000 is a smoke setting; the speed-up column is relative to "
              f"{ddpm_label}, not to DDPM-1000.")
    print("Note: timings on a shared machine are noisy; fusion s includes post-processing "
          "(exposure mask, local mean shift) and the Poisson blend.")
    print(machine_line(setup.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
