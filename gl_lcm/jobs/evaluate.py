"""`gl-lcm evaluate`: GL-LCM over a split, with predictions, figures, timings and the metrics table.

Outputs are written atomically; a rerun skips finished images (``overwrite`` redoes them); a failing
image is recorded in errors.csv with its reason and the batch goes on. Under ``torchrun
--nproc_per_node=N`` batch i goes to rank i mod N (every batch holds the same images as in one
process, so the outputs are byte-identical); rank 0 merges the shards and writes the table.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from gl_lcm.config import Config, resolve_data_path, save_config
from gl_lcm.data.io import read_image, write_png
from gl_lcm.inference.engine import STAGES, InferenceEngine
from gl_lcm.jobs.runner import (RunCounts, batches, fold_stale_shards, gather, merge_rank_shards,
                                prefetched, rank_error_log, ranks, read_timings, shard_path, write_timings)
from gl_lcm.utils.atomic import atomic_write_text, ensure_writable, remove_stale_temporaries
from gl_lcm.utils.plotting import save_grid


@dataclass(frozen=True)
class OutputOptions:
    """How a split run writes: batch size, loader threads, PNG bit depth, figures (eval.* keys)."""

    batch_size: int = 2
    loader_workers: int = 2
    bit_depth: int = 8
    save_figures: bool = True

    @classmethod
    def from_config(cls, cfg: Config) -> "OutputOptions":
        e = cfg.eval
        return cls(e.batch_size, e.loader_workers, e.bit_depth, e.save_figures)


@dataclass(frozen=True)
class SplitFiles:
    """The images of a split: stems in order, CXR file and ground-truth file per stem."""

    stems: list
    cxr: dict
    truth: dict

    @classmethod
    def from_config(cls, cfg: Config, split: Optional[str] = None) -> "SplitFiles":
        from gl_lcm.data.datasets import pairs_for_split

        pairs = pairs_for_split(cfg, split or "test")
        return cls([p.stem for p in pairs], {p.stem: p.cxr for p in pairs}, {p.stem: p.bs for p in pairs})


def build_lpips(cfg: Config, no_lpips: bool = False):
    """LPIPSMetric from local weights, or None when disabled (metrics.lpips=false or --no-lpips)."""
    if no_lpips or not cfg.metrics.lpips:
        return None
    from gl_lcm.metrics import LPIPSMetric

    return LPIPSMetric.from_config(cfg.metrics)  # None when metrics.lpips_missing=skip and no weights


def _load_batch(engine: InferenceEngine, batch: Sequence[str], files: SplitFiles, out: Path, overwrite: bool) -> list:
    """Read, decode and segment one batch (the lung U-Net in one pass): [(stem, cxr, mask, seconds) or
    (stem, exception)]; seconds = the film's reading time + its share of the batch's segmentation."""
    read, items = {}, {}
    for stem in batch:
        try:
            t0 = time.perf_counter()
            read[stem] = (read_image(files.cxr[stem])[0], time.perf_counter() - t0)
        except (ValueError, FileNotFoundError) as exc:
            items[stem] = (stem, exc)
    t0 = time.perf_counter()
    masks = engine.segment_batch(list(read), [cxr for cxr, _ in read.values()], cache_dir=out, overwrite=overwrite)
    share = (time.perf_counter() - t0) / max(len(read), 1)
    for (stem, (cxr, seconds)), mask in zip(read.items(), masks):
        items[stem] = (stem, mask) if isinstance(mask, Exception) else (stem, cxr, mask, seconds + share)
    return [items[stem] for stem in batch]


def _is_done(out: Path, stem: str, extra_fusions: Sequence[str]) -> bool:
    return (out / "fused" / f"{stem}.png").is_file() and all(
        (out / f"fused_{m}" / f"{stem}.png").is_file() for m in extra_fusions)


def _figure(path: Path, cxr: np.ndarray, fused: np.ndarray, truth_file: Path, size: int) -> None:
    gt, _ = read_image(truth_file)
    gt = cv2.resize(gt, (size, size), interpolation=cv2.INTER_AREA) if gt.shape != (size, size) else gt
    c = cv2.resize(cxr, (size, size), interpolation=cv2.INTER_AREA) if cxr.shape != (size, size) else cxr
    save_grid(path, [[c, fused, gt, np.clip(np.abs(fused - gt) * 4, 0, 1)]],
              labels=["CXR", "GL-LCM", "ground truth", "|diff| x4"])


def run_split(engine: InferenceEngine, files: SplitFiles, out: Path, options: OutputOptions,
              overwrite: bool = False, guidance_mode: Optional[str] = None, num_steps: Optional[int] = None,
              fusion_modes: Sequence[str] = (), progress: bool = True, figures: bool = True, rank: int = 0,
              world_size: int = 1) -> RunCounts:
    """Segment, sample and fuse every stem; writes global/, local/, fused/ (+ fused_<mode>/), masks,
    overlays, figures, timing.csv and errors.csv under ``out``. Finished images are skipped.

    With ``world_size`` > 1 (torchrun) this rank handles batches rank, rank + N, ... of the unfinished
    images and keeps errors / timings in out/shards/; the caller merges them after a barrier
    (:func:`~gl_lcm.jobs.runner.merge_rank_shards`). Counts are this rank's.
    """
    from gl_lcm.utils.dist import barrier

    counts = RunCounts()
    if rank == 0:  # before any rank writes (the others wait at the barrier below)
        remove_stale_temporaries(out)  # half-written files of a killed earlier run
        fold_stale_shards(out)  # shards left by an interrupted sharded run
    extra_fusions = [m for m in fusion_modes if m != engine.fusion.mode]
    todo = []
    for stem in files.stems:
        if _is_done(out, stem, extra_fusions) and not overwrite:
            counts.skipped += 1
        else:
            todo.append(stem)
    if world_size > 1:
        barrier()  # every rank has listed the unfinished images before any rank writes new ones
        counts.skipped = counts.skipped if rank == 0 else 0  # counted once
    mine_batches = list(batches(todo, options.batch_size))[rank::world_size]
    mine = [s for batch in mine_batches for s in batch]
    errors = rank_error_log(out, rank, world_size, mine)
    timing_path = shard_path(out, "timing", rank, world_size)
    timings = read_timings(timing_path) if world_size == 1 else {}
    bar = tqdm(total=len(mine), desc="GL-LCM" + (f" rank {rank}" if world_size > 1 else ""), unit="img",
               disable=not progress)
    loaded = prefetched(lambda batch: _load_batch(engine, batch, files, out, overwrite), mine_batches,
                        options.loader_workers)
    size, bits = engine.pixels.image_size, options.bit_depth
    for items in loaded:
        failed = [item for item in items if len(item) == 2]
        for stem, exc in failed:
            errors.add(stem, "segmentation", exc)
        counts.failed += len(failed)
        bar.update(len(failed))
        ok = [item for item in items if len(item) == 4]
        if not ok:
            continue
        names, cxrs, masks, seg_times = (list(v) for v in zip(*ok))
        try:
            results = engine.run(names, cxrs, masks, num_steps=num_steps, guidance_mode=guidance_mode)
        except Exception as exc:  # a failing batch must not stop the run
            for stem in names:
                errors.add(stem, "sampling", exc)
            counts.failed += len(names)
            bar.update(len(names))
            tqdm.write(traceback.format_exc(limit=3))
            continue
        for r, st, cxr in zip(results, seg_times, cxrs):
            write_png(out / "global" / f"{r.name}.png", r.global_img, bits)
            write_png(out / "local" / f"{r.name}.png", r.local_img, bits)
            write_png(out / "fused" / f"{r.name}.png", r.fused, bits)
            for m in extra_fusions:
                write_png(out / f"fused_{m}" / f"{r.name}.png", engine.fuse_again(r, m), bits)
            if figures and options.save_figures and r.name in files.truth:
                _figure(out / "figures" / f"{r.name}.png", cxr, r.fused, files.truth[r.name], size)
            timings[r.name] = {"segmentation": st, **r.timings}
            errors.clear(r.name)
            counts.succeeded += 1
        write_timings(timing_path, timings)
        bar.update(len(names))
    bar.close()
    if world_size > 1:
        write_timings(timing_path, timings)  # an (empty) shard from every rank
    counts.handled = todo
    return counts


def folder_metrics(cfg: Config, out: Path, pred_sub: str, name: str, stems, lpips_metric) -> dict:
    """Metrics of out/<pred_sub>/ against the split's ground truths, written to out/metrics/<pred_sub>/."""
    from gl_lcm.metrics import evaluate_folders

    return evaluate_folders(resolve_data_path(cfg, cfg.data.cxr_dir), resolve_data_path(cfg, cfg.data.bs_dir),
                            out / pred_sub, out / "metrics" / pred_sub, stems=stems,
                            image_size=cfg.metrics.image_size, lpips_metric=lpips_metric, method_name=name,
                            progress=False)


def evaluate_split(cfg: Config, split: Optional[str] = None, overwrite: bool = False, no_lpips: bool = False,
                   progress: bool = True, engine: Optional[InferenceEngine] = None) -> dict:
    """`gl-lcm evaluate`: GL-LCM over a split, then the metrics table (global, local, fused).

    Under torchrun the images are sharded across ranks (see the module docstring); rank 0 writes the
    table once every rank has finished, and returns the summaries (other ranks return their counts only).
    """
    from gl_lcm.utils.dist import barrier

    with ranks(cfg.device) as info:
        lpips_metric = build_lpips(cfg, no_lpips) if info.is_main else None  # fail on missing weights before any work
        files = SplitFiles.from_config(cfg, split)
        out = Path(cfg.eval.output_dir)
        ensure_writable(out, "eval.output_dir")
        engine = engine or InferenceEngine.from_config(cfg, device=info.device)
        if info.is_main:
            save_config(cfg, out / "config.yaml")
        counts = run_split(engine, files, out, OutputOptions.from_config(cfg), overwrite=overwrite,
                           progress=progress, rank=info.rank, world_size=info.world_size)
        handled = counts.handled  # the same list on every rank
        all_counts = gather(counts, info.world_size)
        barrier()  # every rank has written its images and shards
        if not info.is_main:
            return {"counts": counts, "summaries": {}, "timing": {}, "metrics_failed": 0}  # rank 0 has the totals
        merge_rank_shards(out, info.world_size, handled)
        counts = RunCounts(*(sum(getattr(c, f) for c in all_counts) for f in ("succeeded", "failed", "skipped")))
        return write_report(cfg, out, files.stems, lpips_metric, counts)


def write_report(cfg: Config, out: Path, stems, lpips_metric, counts: RunCounts) -> dict:
    """Metrics of global/, local/ and fused/ under ``out``, report.md with the table and mean stage times."""
    from gl_lcm.metrics import markdown_table

    summaries, metrics_failed = {}, set()
    for sub, name in (("global", "global path"), ("local", "local path"), ("fused", "GL-LCM (fused)")):
        if (out / sub).is_dir():
            result = folder_metrics(cfg, out, sub, name, stems, lpips_metric)
            summaries[name] = result["metrics"]
            metrics_failed.update(result["failed"])
    table = markdown_table(summaries, lpips_protocol=lpips_metric.protocol if lpips_metric else None)
    timings = read_timings(out / "timing.csv")
    mean_t = {s: float(np.mean([t[s] for t in timings.values()])) for s in STAGES} if timings else {}
    report = (f"# GL-LCM evaluation ({cfg.eval.model}, {cfg.lcm.num_inference_steps} steps, guidance "
              f"{cfg.guidance.mode}, fusion {cfg.fusion.mode})\n\n{table}\n"
              + ("Mean time per image (s): " + ", ".join(f"{k} {v:.3f}" for k, v in mean_t.items()) + "\n"
                 if mean_t else "")
              + f"\n{counts.succeeded} succeeded, {counts.failed} failed, {counts.skipped} skipped.\n"
              + (f"Left out of the metrics (unreadable or wrong-size outputs, see metrics/*/errors.csv): "
                 f"{', '.join(sorted(metrics_failed))}.\n" if metrics_failed else ""))
    atomic_write_text(out / "report.md", report)
    print(table)
    print(f"{counts.succeeded} succeeded, {counts.failed} failed, {counts.skipped} skipped -> {out}")
    return {"counts": counts, "summaries": summaries, "timing": mean_t, "metrics_failed": len(metrics_failed)}
