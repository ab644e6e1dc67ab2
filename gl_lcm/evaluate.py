"""Batch jobs over image folders and splits: segment, evaluate, suppress, ablate.

Outputs are written atomically; a rerun skips finished images (``overwrite`` redoes them);
a failing image is recorded in errors.csv with its reason and the batch goes on.

Under ``torchrun --nproc_per_node=N`` evaluate and suppress split the work across ranks (ours):
evaluate deals out whole batches (batch i to rank i mod N, so every batch holds the same images as
in one process and the outputs are byte-identical), suppress deals out images; each rank keeps
its own errors / timing shard under shards/, and after a barrier rank 0 merges them and writes
the metrics table.
"""
from __future__ import annotations

import csv
import io as _io
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from gl_lcm.config import Config, resolve_data_path, save_config
from gl_lcm.pipeline import fuse_with_config
from gl_lcm.data.chest_check import check_chest_input
from gl_lcm.data.io import list_images, read_image, read_image_info, write_png
from gl_lcm.utils.atomic import atomic_path, atomic_write_text, ensure_writable, remove_stale_temporaries
from gl_lcm.utils.plotting import save_grid


# ---------------------------------------------------------------------------- segmentation
class Segmenter:
    """Lung masks with the configured method, cached as PNGs with an overlay next to them.

    masks/<stem>.png (0/255, at the image's size) and overlays/<stem>.png (outline on the CXR).
    A cached mask is reused unless ``overwrite``.
    """

    def __init__(self, cfg: Config, out_dir: Optional[Path], overwrite: bool = False, device=None):
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
            self.device = device if device is not None else resolve_device(cfg.device)
            from gl_lcm.segmentation.learned import convention_channel

            self.model, net_cfg = load_segnet(cfg.checkpoints.segnet, self.device)
            self.net_size = net_cfg.segmentation.image_size
            self.channel = convention_channel(net_cfg.segmentation.outputs, cfg.segmentation.convention,
                                              cfg.checkpoints.segnet)
        if cfg.segmentation.method == "pretrained":
            from gl_lcm.models.published_lungseg import load_published_lungseg
            from gl_lcm.utils.dist import resolve_device

            self.device = resolve_device(cfg.device)
            self.model = load_published_lungseg(cfg.checkpoints.lungs_segmentation, self.device)
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
            kw = {"model": self.model, "image_size": self.net_size, "device": self.device, "channel": self.channel}
        elif s.method == "pretrained":
            kw = {"model": self.model, "device": self.device}
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


def read_chest_input(name: str, path: Path, allow_non_chest: bool = False):
    """Read a user's film and refuse non-chest inputs (:mod:`gl_lcm.data.chest_check`).

    Returns the :class:`~gl_lcm.data.io.ImageInfo`; raises ImageReadError or NonChestInputError
    (both ValueErrors) whose message names the file and the reason.
    """
    info = read_image_info(path)
    check_chest_input(str(path), info.image, info.colourfulness,
                      info.dicom.header if info.dicom is not None else None, allow_non_chest)
    return info


def segment_path(cfg: Config, input_path: str, out_dir: str, allow_non_chest: bool = False) -> dict[str, int]:
    """`gl-lcm segment`: masks/ and overlays/ for one image or a folder; errors.csv for failures.

    Non-chest inputs are refused (errors.csv names the reason); ``allow_non_chest`` skips the
    DICOM metadata part of that check."""
    out = Path(out_dir)
    ensure_writable(out, "--out")
    remove_stale_temporaries(out)
    seg = Segmenter(cfg, out)
    errors = ErrorLog(out / "errors.csv")
    ok = 0
    files = _inputs(input_path)
    for name, path in tqdm(sorted(files.items()), desc="segment", unit="img"):
        try:
            image = read_chest_input(name, path, allow_non_chest).image
            seg(name, image)
            errors.clear(name)
            ok += 1
        except (ValueError, FileNotFoundError) as exc:
            errors.add(name, "segmentation", exc)
    print(f"segment: {ok} succeeded, {len(files) - ok} failed -> {out}")
    return {"succeeded": ok, "failed": len(files) - ok}


# ---------------------------------------------------------------------------- ranks (torchrun)
@contextmanager
def ranks(cfg: Config):
    """DistInfo of this process: torchrun's rank and world size (a process group is started and, if
    started here, ended on exit), or rank 0 of 1 without torchrun."""
    import torch.distributed as tdist

    from gl_lcm.utils.dist import cleanup_distributed, init_distributed

    owned = not (tdist.is_available() and tdist.is_initialized())
    info = init_distributed(cfg.device)
    try:
        yield info
    finally:
        if owned and info.distributed:
            cleanup_distributed()


def _gather(obj, world_size: int) -> list:
    """Every rank's ``obj`` (a list of one for a single process)."""
    if world_size == 1:
        return [obj]
    import torch.distributed as tdist

    out = [None] * world_size
    tdist.all_gather_object(out, obj)
    return out


def _shard_paths(out: Path, name: str, rank: int, world_size: int) -> Path:
    """out/<name>.csv for one process; out/shards/<name>.rank<r>.csv for rank r of several."""
    if world_size == 1:
        return out / f"{name}.csv"
    return out / "shards" / f"{name}.rank{rank}.csv"


def _rank_error_log(out: Path, rank: int, world_size: int, mine: Sequence[str]) -> ErrorLog:
    """This rank's ErrorLog: out/errors.csv itself for one process; otherwise a fresh shard holding
    the rows of out/errors.csv for the images this rank handles (so they can be cleared on success)."""
    path = _shard_paths(out, "errors", rank, world_size)
    if world_size == 1:
        return ErrorLog(path)
    path.unlink(missing_ok=True)
    log = ErrorLog(path)
    previous = ErrorLog(out / "errors.csv").rows
    log.rows = {k: v for k, v in previous.items() if k in set(mine)}
    log.flush()
    return log


def _merge_error_shards(out: Path, world_size: int, handled: Sequence[str]) -> None:
    """Rank 0, after the barrier: errors.csv = old rows of images no rank handled + every shard's rows."""
    merged = ErrorLog(out / "errors.csv")
    handled = set(handled)
    merged.rows = {k: v for k, v in merged.rows.items() if k not in handled}
    for r in range(world_size):
        shard = _shard_paths(out, "errors", r, world_size)
        merged.rows.update(ErrorLog(shard).rows)
        shard.unlink(missing_ok=True)
    merged.flush()


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

    return LPIPSMetric.from_config(cfg.metrics)  # None when metrics.lpips_missing=skip and no weights


@dataclass
class RunCounts:
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    handled: list = field(default_factory=list)  # images this run set out to process (all ranks)


def _load_batch(seg: "Segmenter", batch: Sequence[str], cxr_files: dict[str, Path]) -> list:
    """Read, decode and segment one batch: [(stem, cxr, mask, seconds) or (stem, exception)]."""
    items = []
    for stem in batch:
        try:
            t0 = time.perf_counter()
            cxr, _ = read_image(cxr_files[stem])
            mask = seg(stem, cxr)
            items.append((stem, cxr, mask, time.perf_counter() - t0))
        except (ValueError, FileNotFoundError) as exc:
            items.append((stem, exc))
    return items


def _prefetched(load, batches: Sequence, workers: int):
    """Yield ``load(batch)`` for each batch in order; with ``workers`` > 0 a thread pool loads up to
    ``workers + 1`` batches ahead while the caller samples (image decoding and OpenCV release the GIL)."""
    if workers <= 0:
        for batch in batches:
            yield load(batch)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gl-lcm-loader") as pool:
        pending = deque()
        todo = iter(batches)
        for batch in todo:
            pending.append(pool.submit(load, batch))
            if len(pending) > workers:
                break
        while pending:
            items = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(load, nxt))
            yield items


def _is_done(out: Path, stem: str, extra_fusions: Sequence[str]) -> bool:
    return (out / "fused" / f"{stem}.png").is_file() and all(
        (out / f"fused_{m}" / f"{stem}.png").is_file() for m in extra_fusions)


def run_pipeline_on_split(cfg: Config, pipeline, stems: Sequence[str], cxr_files: dict[str, Path],
                          gt_files: dict[str, Path], out: Path, overwrite: bool = False,
                          guidance_mode: Optional[str] = None, fusion_modes: Sequence[str] = (),
                          progress: bool = True, figures: bool = True, rank: int = 0, world_size: int = 1,
                          segmenter: Optional["Segmenter"] = None) -> RunCounts:
    """Segment, sample and fuse every stem; writes global/, local/, fused/ (+ fused_<mode>/), masks,
    overlays, figures, timing.csv and errors.csv under ``out``. Finished images are skipped.

    With ``world_size`` > 1 (torchrun) this rank handles batches rank, rank + N, ... of the unfinished
    images and keeps errors / timings in out/shards/; the caller merges them after a barrier
    (:func:`merge_rank_shards`). Counts are this rank's.
    """
    from gl_lcm.utils.dist import barrier

    counts = RunCounts()
    seg = segmenter or Segmenter(cfg, out, overwrite=overwrite)
    if rank == 0:  # before any rank writes (the others wait at the barrier below)
        remove_stale_temporaries(out)  # half-written files of a killed earlier run
        _fold_stale_shards(out)  # shards left by an interrupted sharded run
    extra_fusions = [m for m in fusion_modes if m != cfg.fusion.mode]
    todo = []
    for stem in stems:
        if _is_done(out, stem, extra_fusions) and not overwrite:
            counts.skipped += 1
        else:
            todo.append(stem)
    if world_size > 1:
        barrier()  # every rank has listed the unfinished images before any rank writes new ones
        counts.skipped = counts.skipped if rank == 0 else 0  # counted once
    batches = list(_batches(todo, cfg.eval.batch_size))[rank::world_size]
    mine = [s for batch in batches for s in batch]
    errors = _rank_error_log(out, rank, world_size, mine)
    timing_path = _shard_paths(out, "timing", rank, world_size)
    timings = _read_timings(timing_path) if world_size == 1 else {}
    bar = tqdm(total=len(mine), desc="GL-LCM" + (f" rank {rank}" if world_size > 1 else ""), unit="img",
               disable=not progress)
    loaded = _prefetched(lambda batch: _load_batch(seg, batch, cxr_files), batches, cfg.eval.loader_workers)
    for items in loaded:
        names, cxrs, masks, seg_times = [], [], [], []
        for item in items:
            if len(item) == 2:
                errors.add(item[0], "segmentation", item[1])
                counts.failed += 1
                bar.update(1)
                continue
            stem, cxr, mask, st = item
            names.append(stem), cxrs.append(cxr), masks.append(mask), seg_times.append(st)
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
    if world_size > 1:
        _write_timings(timing_path, timings)  # an (empty) shard from every rank
    counts.handled = todo
    return counts


def _fold_stale_shards(out: Path) -> None:
    """Fold timing / errors shards of an interrupted sharded run into timing.csv / errors.csv."""
    shard_dir = out / "shards"
    if not shard_dir.is_dir():
        return
    timing_shards = sorted(shard_dir.glob("timing.rank*.csv"))
    if timing_shards:
        timings = _read_timings(out / "timing.csv")
        for shard in timing_shards:
            timings.update(_read_timings(shard))
            shard.unlink()
        _write_timings(out / "timing.csv", timings)
    error_shards = sorted(shard_dir.glob("errors.rank*.csv"))
    if error_shards:
        merged = ErrorLog(out / "errors.csv")
        for shard in error_shards:
            merged.rows.update(ErrorLog(shard).rows)
            shard.unlink()
        merged.flush()


def merge_rank_shards(out: Path, world_size: int, handled: Sequence[str]) -> None:
    """Rank 0 after the barrier: fold every rank's timing and errors shard into timing.csv / errors.csv."""
    if world_size == 1:
        return
    timings = _read_timings(out / "timing.csv")
    for r in range(world_size):
        shard = _shard_paths(out, "timing", r, world_size)
        timings.update(_read_timings(shard))
        shard.unlink(missing_ok=True)
    _write_timings(out / "timing.csv", timings)
    _merge_error_shards(out, world_size, handled)


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
    """`gl-lcm evaluate`: GL-LCM over a split, then the metrics table (global, local, fused).

    Under torchrun the images are sharded across ranks (see the module docstring); rank 0 writes the
    table once every rank has finished, and returns the summaries (other ranks return their counts only).
    """
    from gl_lcm.utils.dist import barrier

    with ranks(cfg) as info:
        lpips_metric = build_lpips(cfg, no_lpips) if info.is_main else None  # fail on missing weights before any work
        stems, cxr_files, gt_files = _split_files(cfg, split)
        out = Path(cfg.eval.output_dir)
        ensure_writable(out, "eval.output_dir")
        if pipeline is None:
            from gl_lcm.pipeline import GLLCMPipeline

            pipeline = GLLCMPipeline.from_config(cfg, device=info.device)
        if info.is_main:
            save_config(cfg, out / "config.yaml")
        seg = Segmenter(cfg, out, overwrite=overwrite, device=info.device)
        counts = run_pipeline_on_split(cfg, pipeline, stems, cxr_files, gt_files, out, overwrite=overwrite,
                                       progress=progress, rank=info.rank, world_size=info.world_size,
                                       segmenter=seg)
        handled = counts.handled  # the same list on every rank
        all_counts = _gather(counts, info.world_size)
        barrier()  # every rank has written its images and shards
        if not info.is_main:
            return {"counts": counts, "summaries": {}, "timing": {}, "metrics_failed": 0}  # rank 0 has the totals
        merge_rank_shards(out, info.world_size, handled)
        counts = RunCounts(*(sum(getattr(c, f) for c in all_counts) for f in ("succeeded", "failed", "skipped")))
        return _write_report(cfg, out, stems, lpips_metric, counts)


def _write_report(cfg: Config, out: Path, stems, lpips_metric, counts: RunCounts) -> dict:
    from gl_lcm.metrics import markdown_table

    summaries, metrics_failed = {}, set()
    for sub, name in (("global", "global path"), ("local", "local path"), ("fused", "GL-LCM (fused)")):
        if (out / sub).is_dir():
            result = _finish_metrics(cfg, out, sub, name, stems, lpips_metric)
            summaries[name] = result["metrics"]
            metrics_failed.update(result["failed"])
    table = markdown_table(summaries, lpips_protocol=lpips_metric.protocol if lpips_metric else None)
    timings = _read_timings(out / "timing.csv")
    mean_t = {s: float(np.mean([t[s] for t in timings.values()])) for s in TIMING_STAGES} if timings else {}
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


# ---------------------------------------------------------------------------- suppress
OUTPUT_FORMATS = ("auto", "png", "dicom")


def model_description(cfg: Config) -> str:
    """Names the model that made a result, for DICOM SeriesDescription / DerivationDescription."""
    ckpt = Path(getattr(cfg.checkpoints, cfg.eval.model) or "").name or "no checkpoint"
    return (f"GL-LCM {cfg.eval.model} {ckpt}, {cfg.lcm.num_inference_steps} steps, guidance {cfg.guidance.mode}, "
            f"fusion {cfg.fusion.mode}")


def suppress_path(cfg: Config, input_path: str, output: str, bit_depth: Optional[int] = None, pipeline=None,
                  output_format: str = "auto", allow_non_chest: bool = False) -> RunCounts:
    """`gl-lcm suppress`: one image, a folder or DICOM files -> soft-tissue image at the input's original size.

    A single input file with an output ending in .png or .dcm writes that file; otherwise ``output`` is a
    folder. ``output_format`` "auto" writes a derived DICOM for a DICOM input (:mod:`gl_lcm.data.dicom_out`)
    and a PNG otherwise; "png" / "dicom" force one (DICOM needs a DICOM input). PNG bit depth: ``bit_depth``,
    or by default the input's (8-bit input -> 8, deeper inputs -> 16). Non-chest inputs are refused.
    Under torchrun rank r handles images r, r + N, ... (sorted by name); rank 0 merges errors.csv
    after every rank has finished. Returns this process's counts (rank 0: the totals).
    """
    from gl_lcm.data.dicom_out import write_derived_dicom
    from gl_lcm.utils.dist import barrier

    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    files = _inputs(input_path)
    out = Path(output)
    single = len(files) == 1 and Path(input_path).is_file() and out.suffix.lower() in (".png", ".dcm")
    if single:
        output_format = "dicom" if out.suffix.lower() == ".dcm" else "png"
    description = model_description(cfg)
    with ranks(cfg) as info:
        if pipeline is None:
            from gl_lcm.pipeline import GLLCMPipeline

            pipeline = GLLCMPipeline.from_config(cfg, device=info.device)
        seg = Segmenter(cfg, None, device=info.device)
        counts = RunCounts()
        log_dir = out.parent if single else out
        mine = sorted(files.items())[info.rank::info.world_size]
        errors = _rank_error_log(log_dir, info.rank, info.world_size, [n for n, _ in mine])
        for name, path in tqdm(mine, desc="suppress", unit="img"):
            try:
                film = read_chest_input(name, path, allow_non_chest)
                image = film.image
                as_dicom = output_format == "dicom" or (output_format == "auto" and film.dicom is not None)
                if as_dicom and film.dicom is None:
                    raise ValueError(f"{path}: DICOM output needs a DICOM input (this is not one); write PNG instead")
                mask = seg(name, image)
                r = pipeline.run([name], [image], [mask])[0]
                h, w = image.shape
                result = cv2.resize(r.fused, (w, h), interpolation=cv2.INTER_CUBIC) if (h, w) != r.fused.shape else r.fused
                result = np.clip(result, 0, 1)
                if as_dicom:
                    write_derived_dicom(out if single else out / f"{name}.dcm", result, film.dicom, description)
                else:
                    depth = bit_depth or (8 if film.bit_depth <= 8 else 16)
                    write_png(out if single else out / f"{name}.png", result, depth)
                errors.clear(name)
                counts.succeeded += 1
            except (ValueError, FileNotFoundError) as exc:
                errors.add(name, "suppress", exc)
                counts.failed += 1
        all_counts = _gather(counts, info.world_size)
        barrier()
        if not info.is_main:
            return counts
        if info.distributed:
            _merge_error_shards(log_dir, info.world_size, list(files))
            counts = RunCounts(sum(c.succeeded for c in all_counts), sum(c.failed for c in all_counts), 0)
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
