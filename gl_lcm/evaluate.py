"""Batch jobs over image folders and splits: segment, evaluate, suppress, ablate.

Outputs are written atomically; a rerun skips finished images (``overwrite`` redoes them);
a failing image is recorded in errors.csv with its reason and the batch goes on.
"""
from __future__ import annotations

import csv
import io as _io
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from gl_lcm.config import Config, resolve_data_path, save_config
from gl_lcm.pipeline import fuse_with_config
from gl_lcm.data.io import list_images, read_image, write_png
from gl_lcm.utils.atomic import atomic_path, atomic_write_text
from gl_lcm.utils.plotting import save_grid


# ---------------------------------------------------------------------------- segmentation
class Segmenter:
    """Lung masks with the configured method, cached as PNGs with an overlay next to them.

    masks/<stem>.png (0/255, at the image's size) and overlays/<stem>.png (outline on the CXR).
    A cached mask is reused unless ``overwrite``.
    """

    def __init__(self, cfg: Config, out_dir: Optional[Path], overwrite: bool = False):
        self.cfg, self.overwrite = cfg, overwrite
        self.mask_dir = out_dir / "masks" if out_dir else None
        self.overlay_dir = out_dir / "overlays" if out_dir else None
        self.model = None
        if cfg.segmentation.method == "unet":
            from gl_lcm.models.factory import load_segnet
            from gl_lcm.utils.dist import resolve_device

            if not cfg.checkpoints.segnet:
                raise ValueError("segmentation.method is 'unet' but checkpoints.segnet is empty: train one with "
                                 "`gl-lcm train-seg` or use segmentation.method=classical")
            self.device = resolve_device(cfg.device)
            self.model, _ = load_segnet(cfg.checkpoints.segnet, self.device)
        if cfg.segmentation.method == "folder" and not cfg.segmentation.mask_dir:
            raise ValueError("segmentation.method is 'folder' but segmentation.mask_dir is empty")

    def __call__(self, name: str, image01: np.ndarray) -> np.ndarray:
        """Bool H x W lung mask of one CXR; raises NoLungFoundError (a ValueError) when none is found."""
        from gl_lcm.segmentation import mask_overlay, segment_lungs

        cached = self.mask_dir / f"{name}.png" if self.mask_dir else None
        if cached is not None and cached.is_file() and self.cfg.segmentation.cache and not self.overwrite:
            mask, _ = read_image(cached, allow_constant=True)
            if mask.shape == image01.shape:
                return mask > 0.5
        s = self.cfg.segmentation
        h, w = image01.shape
        min_area = int(round(s.min_area * h * w / (1024 * 1024)))
        kw = {}
        if s.method == "unet":
            kw = {"model": self.model, "image_size": s.image_size, "device": self.device}
        elif s.method == "folder":
            kw = {"mask_dir": s.mask_dir, "mask_threshold": s.mask_threshold}
        mask = segment_lungs(image01, s.method, name=name, min_area=min_area, **kw)
        if cached is not None:
            write_png(cached, mask.astype(np.float32))
            with atomic_path(self.overlay_dir / f"{name}.png") as tmp:
                cv2.imwrite(str(tmp), cv2.cvtColor(mask_overlay(image01, mask), cv2.COLOR_RGB2BGR))
        return mask


def _inputs(path: str | Path) -> dict[str, Path]:
    """stem -> file for a single image file or every image in a folder."""
    path = Path(path)
    if path.is_dir():
        return list_images(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    return {path.stem: path}


class ErrorLog:
    """errors.csv: image, stage, reason (kept across reruns; an image that later succeeds is removed)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, tuple[str, str]] = {}
        if path.is_file():
            with open(path, newline="") as f:
                self.rows = {r["image"]: (r["stage"], r["reason"]) for r in csv.DictReader(f)}

    def add(self, name: str, stage: str, exc: BaseException) -> None:
        self.rows[name] = (stage, f"{type(exc).__name__}: {exc}")
        tqdm.write(f"  {name}: {stage} failed: {exc}")
        self.flush()

    def clear(self, name: str) -> None:
        if self.rows.pop(name, None) is not None:
            self.flush()

    def flush(self) -> None:
        buf = _io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image", "stage", "reason"])
        for name, (stage, reason) in sorted(self.rows.items()):
            w.writerow([name, stage, reason])
        atomic_write_text(self.path, buf.getvalue())


def segment_path(cfg: Config, input_path: str, out_dir: str) -> dict[str, int]:
    """`gl-lcm segment`: masks/ and overlays/ for one image or a folder; errors.csv for failures."""
    out = Path(out_dir)
    seg = Segmenter(cfg, out)
    errors = ErrorLog(out / "errors.csv")
    ok = 0
    files = _inputs(input_path)
    for name, path in tqdm(sorted(files.items()), desc="segment", unit="img"):
        try:
            image, _ = read_image(path)
            seg(name, image)
            errors.clear(name)
            ok += 1
        except (ValueError, FileNotFoundError) as exc:
            errors.add(name, "segmentation", exc)
    print(f"segment: {ok} succeeded, {len(files) - ok} failed -> {out}")
    return {"succeeded": ok, "failed": len(files) - ok}


# ---------------------------------------------------------------------------- evaluate
TIMING_STAGES = ("segmentation", "encode", "sampling", "decode", "fusion")


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _write_timings(path: Path, timings: dict[str, dict[str, float]]) -> None:
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", *TIMING_STAGES, "total"])
    for name, t in sorted(timings.items()):
        vals = [t.get(s, 0.0) for s in TIMING_STAGES]
        w.writerow([name, *[f"{v:.4f}" for v in vals], f"{sum(vals):.4f}"])
    atomic_write_text(path, buf.getvalue())


def _read_timings(path: Path) -> dict[str, dict[str, float]]:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {r["image"]: {s: float(r[s]) for s in TIMING_STAGES} for r in csv.DictReader(f)}


def build_lpips(cfg: Config, no_lpips: bool = False):
    """LPIPSMetric from local weights, or None when disabled (metrics.lpips=false or --no-lpips)."""
    if no_lpips or not cfg.metrics.lpips:
        return None
    from gl_lcm.metrics import LPIPSMetric

    return LPIPSMetric(protocol=cfg.metrics.lpips_protocol, weights_path=cfg.metrics.lpips_weights or None)


@dataclass
class RunCounts:
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0


def run_pipeline_on_split(cfg: Config, pipeline, stems: Sequence[str], cxr_files: dict[str, Path],
                          gt_files: dict[str, Path], out: Path, overwrite: bool = False,
                          guidance_mode: Optional[str] = None, fusion_modes: Sequence[str] = (),
                          progress: bool = True, figures: bool = True) -> RunCounts:
    """Segment, sample and fuse every stem; writes global/, local/, fused/ (+ fused_<mode>/), masks,
    overlays, figures, timing.csv and errors.csv under ``out``. Finished images are skipped."""
    counts = RunCounts()
    seg = Segmenter(cfg, out, overwrite=overwrite)
    errors = ErrorLog(out / "errors.csv")
    timing_path = out / "timing.csv"
    timings = _read_timings(timing_path)
    extra_fusions = [m for m in fusion_modes if m != cfg.fusion.mode]
    todo = []
    for stem in stems:
        done = (out / "fused" / f"{stem}.png").is_file() and all(
            (out / f"fused_{m}" / f"{stem}.png").is_file() for m in extra_fusions)
        if done and not overwrite:
            counts.skipped += 1
        else:
            todo.append(stem)
    bar = tqdm(total=len(todo), desc="GL-LCM", unit="img", disable=not progress)
    for batch in _batches(todo, cfg.eval.batch_size):
        names, cxrs, masks, seg_times = [], [], [], []
        for stem in batch:
            try:
                t0 = time.perf_counter()
                cxr, _ = read_image(cxr_files[stem])
                mask = seg(stem, cxr)
                seg_times.append(time.perf_counter() - t0)
                names.append(stem), cxrs.append(cxr), masks.append(mask)
            except (ValueError, FileNotFoundError) as exc:
                errors.add(stem, "segmentation", exc)
                counts.failed += 1
                bar.update(1)
        if not names:
            continue
        try:
            results = pipeline.run(names, cxrs, masks, guidance_mode=guidance_mode)
        except Exception as exc:  # a failing batch must not stop the run
            for stem in names:
                errors.add(stem, "sampling", exc)
            counts.failed += len(names)
            bar.update(len(names))
            tqdm.write(traceback.format_exc(limit=3))
            continue
        size = cfg.data.image_size
        for r, st, cxr in zip(results, seg_times, cxrs):
            bits = cfg.eval.bit_depth
            write_png(out / "global" / f"{r.name}.png", r.global_img, bits)
            write_png(out / "local" / f"{r.name}.png", r.local_img, bits)
            write_png(out / "fused" / f"{r.name}.png", r.fused, bits)
            for m in extra_fusions:
                fused = fuse_with_config(cfg, m, r.global_img, r.local_img, r.mask)
                write_png(out / f"fused_{m}" / f"{r.name}.png", np.clip(fused, 0, 1), bits)
            if figures and cfg.eval.save_figures and r.name in gt_files:
                gt, _ = read_image(gt_files[r.name])
                gt = cv2.resize(gt, (size, size), interpolation=cv2.INTER_AREA) if gt.shape != (size, size) else gt
                c = cv2.resize(cxr, (size, size), interpolation=cv2.INTER_AREA) if cxr.shape != (size, size) else cxr
                save_grid(out / "figures" / f"{r.name}.png", [[c, r.fused, gt, np.clip(np.abs(r.fused - gt) * 4, 0, 1)]],
                          labels=["CXR", "GL-LCM", "ground truth", "|diff| x4"])
            timings[r.name] = {"segmentation": st, **r.timings}
            errors.clear(r.name)
            counts.succeeded += 1
        _write_timings(timing_path, timings)
        bar.update(len(names))
    bar.close()
    return counts


def _split_files(cfg: Config, split: Optional[str]):
    from gl_lcm.data.datasets import pairs_for_split

    pairs = pairs_for_split(cfg, split or "test")
    return [p.stem for p in pairs], {p.stem: p.cxr for p in pairs}, {p.stem: p.bs for p in pairs}


def _finish_metrics(cfg: Config, out: Path, pred_sub: str, name: str, stems, lpips_metric) -> dict:
    from gl_lcm.metrics import evaluate_folders

    return evaluate_folders(resolve_data_path(cfg, cfg.data.cxr_dir), resolve_data_path(cfg, cfg.data.bs_dir),
                            out / pred_sub, out / "metrics" / pred_sub, stems=stems,
                            image_size=cfg.metrics.image_size, lpips_metric=lpips_metric, method_name=name,
                            progress=False)


def evaluate_split(cfg: Config, split: Optional[str] = None, overwrite: bool = False, no_lpips: bool = False,
                   progress: bool = True, pipeline=None) -> dict:
    """`gl-lcm evaluate`: GL-LCM over a split, then the metrics table (global, local, fused)."""
    from gl_lcm.metrics import markdown_table
    from gl_lcm.pipeline import GLLCMPipeline

    lpips_metric = build_lpips(cfg, no_lpips)  # fail on missing weights before any work
    stems, cxr_files, gt_files = _split_files(cfg, split)
    pipeline = pipeline or GLLCMPipeline.from_config(cfg)
    out = Path(cfg.eval.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    counts = run_pipeline_on_split(cfg, pipeline, stems, cxr_files, gt_files, out, overwrite=overwrite,
                                   progress=progress)
    summaries = {}
    for sub, name in (("global", "global path"), ("local", "local path"), ("fused", "GL-LCM (fused)")):
        if (out / sub).is_dir():
            summaries[name] = _finish_metrics(cfg, out, sub, name, stems, lpips_metric)["metrics"]
    table = markdown_table(summaries, lpips_protocol=lpips_metric.protocol if lpips_metric else None)
    timings = _read_timings(out / "timing.csv")
    mean_t = {s: float(np.mean([t[s] for t in timings.values()])) for s in TIMING_STAGES} if timings else {}
    report = (f"# GL-LCM evaluation ({cfg.eval.model}, {cfg.lcm.num_inference_steps} steps, guidance "
              f"{cfg.guidance.mode}, fusion {cfg.fusion.mode})\n\n{table}\n"
              + ("Mean time per image (s): " + ", ".join(f"{k} {v:.3f}" for k, v in mean_t.items()) + "\n"
                 if mean_t else "")
              + f"\n{counts.succeeded} succeeded, {counts.failed} failed, {counts.skipped} skipped.\n")
    atomic_write_text(out / "report.md", report)
    print(table)
    print(f"{counts.succeeded} succeeded, {counts.failed} failed, {counts.skipped} skipped -> {out}")
    return {"counts": counts, "summaries": summaries, "timing": mean_t}


# ---------------------------------------------------------------------------- suppress
def suppress_path(cfg: Config, input_path: str, output: str, bit_depth: int = 8, pipeline=None) -> RunCounts:
    """`gl-lcm suppress`: one image, a folder or DICOM files -> soft-tissue PNG at the input's original size.

    A single input file with an output ending in .png writes that file; otherwise ``output`` is a folder.
    """
    from gl_lcm.pipeline import GLLCMPipeline

    files = _inputs(input_path)
    out = Path(output)
    single = len(files) == 1 and Path(input_path).is_file() and out.suffix.lower() == ".png"
    pipeline = pipeline or GLLCMPipeline.from_config(cfg)
    seg = Segmenter(cfg, None)
    counts = RunCounts()
    errors = ErrorLog((out.parent if single else out) / "errors.csv")
    for name, path in tqdm(sorted(files.items()), desc="suppress", unit="img"):
        try:
            image, _ = read_image(path)
            mask = seg(name, image)
            r = pipeline.run([name], [image], [mask])[0]
            h, w = image.shape
            result = cv2.resize(r.fused, (w, h), interpolation=cv2.INTER_CUBIC) if (h, w) != r.fused.shape else r.fused
            write_png(out if single else out / f"{name}.png", np.clip(result, 0, 1), bit_depth)
            counts.succeeded += 1
        except (ValueError, FileNotFoundError) as exc:
            errors.add(name, "suppress", exc)
            counts.failed += 1
    print(f"suppress: {counts.succeeded} succeeded, {counts.failed} failed -> {out}")
    return counts


# ---------------------------------------------------------------------------- ablate
GUIDANCE_MODES = ("vanilla", "cfg", "leg")
FUSION_MODES = ("none", "alpha", "poisson")


def ablate(cfg: Config, split: Optional[str] = None, no_lpips: bool = False, progress: bool = True,
           pipeline=None) -> dict:
    """`gl-lcm ablate`: guidance {vanilla, cfg, leg} x fusion {none, alpha, poisson} on a split.

    Sampling depends on the guidance only, so each guidance mode samples once and the three
    fusions reuse its global/local results. Writes ablation.md with the two tables of the paper
    (guidance with Poisson fusion; fusion with LEG) and the full grid, PSNR and LPIPS.
    """
    from gl_lcm.pipeline import GLLCMPipeline

    lpips_metric = build_lpips(cfg, no_lpips)
    stems, cxr_files, gt_files = _split_files(cfg, split)
    pipeline = pipeline or GLLCMPipeline.from_config(cfg)
    root = Path(cfg.eval.output_dir) / "ablation"
    grid: dict[tuple[str, str], dict] = {}
    for g in GUIDANCE_MODES:
        out = root / g
        run_pipeline_on_split(cfg, pipeline, stems, cxr_files, gt_files, out, guidance_mode=g,
                              fusion_modes=FUSION_MODES, progress=progress, figures=False)
        for f in FUSION_MODES:
            sub = "fused" if f == cfg.fusion.mode else f"fused_{f}"
            grid[(g, f)] = _finish_metrics(cfg, out, sub, f"{g}+{f}", stems, lpips_metric)["metrics"]

    def table(rows: dict) -> str:
        def cell(summary, key, places):
            return f"{summary[key][0]:.{places}f} ± {summary[key][1]:.{places}f}" if key in summary else "–"

        head = "| Method | PSNR ↑ | LPIPS ↓ |\n|:--|:-:|:-:|\n"
        return head + "".join(f"| {n} | {cell(s, 'psnr', 2)} | {cell(s, 'lpips', 3)} |\n" for n, s in rows.items())

    names = {"vanilla": "Vanilla guidance", "cfg": "Classifier-free guidance", "leg": "Local-Enhanced Guidance"}
    fnames = {"none": "No fusion (global only)", "alpha": "Alpha fusion", "poisson": "Poisson fusion"}
    text = "# Ablations\n\n## Guidance (Poisson fusion)\n\n" + table(
        {names[g]: grid[(g, "poisson")] for g in GUIDANCE_MODES})
    text += "\n## Fusion (LEG guidance)\n\n" + table({fnames[f]: grid[("leg", f)] for f in FUSION_MODES})
    text += "\n## Full grid\n\n" + table({f"{g} + {f}": grid[(g, f)] for g in GUIDANCE_MODES for f in FUSION_MODES})
    if lpips_metric is None:
        text += "\nLPIPS not computed (no local AlexNet weights or --no-lpips).\n"
    atomic_write_text(root / "ablation.md", text)
    print(text)
    return {"grid": grid, "path": str(root / "ablation.md")}
