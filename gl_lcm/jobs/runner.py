"""The jobs layer's runner: what every batch job over many films shares.

File discovery, resume bookkeeping (``RunCounts``), sharding across torchrun ranks (``ranks``,
per-rank shards of errors.csv / timing.csv merged by rank 0 after a barrier), prefetching the next
batches while the engine works, the error log and the exit codes. Jobs (:mod:`gl_lcm.jobs.evaluate`,
``suppress``, ``segment``, ``ablate``, ``demo``) are thin layers on it and on the one inference engine.
"""
from __future__ import annotations

import csv
import io as _io
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from gl_lcm.data.chest_check import check_chest_input
from gl_lcm.data.io import list_images, read_image_info
from gl_lcm.inference.engine import STAGES as TIMING_STAGES
from gl_lcm.utils.atomic import atomic_write_text

# Exit status of a batch command in which some images failed (each recorded in errors.csv).
EXIT_SOME_FAILED = 1


def exit_code(failed: int) -> int:
    """0 when nothing failed, else :data:`EXIT_SOME_FAILED`."""
    return EXIT_SOME_FAILED if failed else 0


def discover_inputs(path: str | Path) -> dict[str, Path]:
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


# ---------------------------------------------------------------------------- ranks (torchrun)
@contextmanager
def ranks(device: str):
    """DistInfo of this process: torchrun's rank and world size (a process group is started and, if
    started here, ended on exit), or rank 0 of 1 without torchrun."""
    import torch.distributed as tdist

    from gl_lcm.utils.dist import cleanup_distributed, init_distributed

    owned = not (tdist.is_available() and tdist.is_initialized())
    info = init_distributed(device)
    try:
        yield info
    finally:
        if owned and info.distributed:
            cleanup_distributed()


def gather(obj, world_size: int) -> list:
    """Every rank's ``obj`` (a list of one for a single process)."""
    if world_size == 1:
        return [obj]
    import torch.distributed as tdist

    out = [None] * world_size
    tdist.all_gather_object(out, obj)
    return out


def shard_path(out: Path, name: str, rank: int, world_size: int) -> Path:
    """out/<name>.csv for one process; out/shards/<name>.rank<r>.csv for rank r of several."""
    if world_size == 1:
        return out / f"{name}.csv"
    return out / "shards" / f"{name}.rank{rank}.csv"


def rank_error_log(out: Path, rank: int, world_size: int, mine: Sequence[str]) -> ErrorLog:
    """This rank's ErrorLog: out/errors.csv itself for one process; otherwise a fresh shard holding
    the rows of out/errors.csv for the images this rank handles (so they can be cleared on success)."""
    path = shard_path(out, "errors", rank, world_size)
    if world_size == 1:
        return ErrorLog(path)
    path.unlink(missing_ok=True)
    log = ErrorLog(path)
    previous = ErrorLog(out / "errors.csv").rows
    log.rows = {k: v for k, v in previous.items() if k in set(mine)}
    log.flush()
    return log


def merge_error_shards(out: Path, world_size: int, handled: Sequence[str]) -> None:
    """Rank 0, after the barrier: errors.csv = old rows of images no rank handled + every shard's rows."""
    merged = ErrorLog(out / "errors.csv")
    handled = set(handled)
    merged.rows = {k: v for k, v in merged.rows.items() if k not in handled}
    for r in range(world_size):
        shard = shard_path(out, "errors", r, world_size)
        merged.rows.update(ErrorLog(shard).rows)
        shard.unlink(missing_ok=True)
    merged.flush()


# ---------------------------------------------------------------------------- batches, timings, counts
def batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def write_timings(path: Path, timings: dict[str, dict[str, float]]) -> None:
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", *TIMING_STAGES, "total"])
    for name, t in sorted(timings.items()):
        vals = [t.get(s, 0.0) for s in TIMING_STAGES]
        w.writerow([name, *[f"{v:.4f}" for v in vals], f"{sum(vals):.4f}"])
    atomic_write_text(path, buf.getvalue())


def read_timings(path: Path) -> dict[str, dict[str, float]]:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {r["image"]: {s: float(r[s]) for s in TIMING_STAGES} for r in csv.DictReader(f)}


@dataclass
class RunCounts:
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    handled: list = field(default_factory=list)  # images this run set out to process (all ranks)


def prefetched(load, batch_list: Sequence, workers: int):
    """Yield ``load(batch)`` for each batch in order; with ``workers`` > 0 a thread pool loads up to
    ``workers + 1`` batches ahead while the caller samples (image decoding and OpenCV release the GIL)."""
    if workers <= 0:
        for batch in batch_list:
            yield load(batch)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gl-lcm-loader") as pool:
        pending = deque()
        todo = iter(batch_list)
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


def fold_stale_shards(out: Path) -> None:
    """Fold timing / errors shards of an interrupted sharded run into timing.csv / errors.csv."""
    shard_dir = out / "shards"
    if not shard_dir.is_dir():
        return
    timing_shards = sorted(shard_dir.glob("timing.rank*.csv"))
    if timing_shards:
        timings = read_timings(out / "timing.csv")
        for shard in timing_shards:
            timings.update(read_timings(shard))
            shard.unlink()
        write_timings(out / "timing.csv", timings)
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
    timings = read_timings(out / "timing.csv")
    for r in range(world_size):
        shard = shard_path(out, "timing", r, world_size)
        timings.update(read_timings(shard))
        shard.unlink(missing_ok=True)
    write_timings(out / "timing.csv", timings)
    merge_error_shards(out, world_size, handled)
