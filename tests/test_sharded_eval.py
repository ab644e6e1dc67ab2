"""Sharded evaluation and suppression under torchrun (2 gloo ranks on the CPU, tiny random models):
outputs byte-identical to one process, one merged metrics table / timing.csv / errors.csv written by
rank 0, reruns resume; the loader pool does not change results."""
from __future__ import annotations

import csv
from contextlib import contextmanager
import os
import subprocess
import sys
from pathlib import Path

import pytest
from types import SimpleNamespace
import torch

from gl_lcm.config import load_config
from gl_lcm.data.phantom import write_phantom_dataset
from gl_lcm.jobs.evaluate import evaluate_split
from gl_lcm.jobs.suppress import suppress_path

from tiny_models import tiny_config, write_tiny_checkpoints

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
STEMS = [f"phantom_{i:04d}" for i in range(5)]


@contextmanager
def ranks_thread_count():
    """The reference process computes with the ranks' thread count (run_cli sets OMP_NUM_THREADS=1): the
    byte-identity is about sharding; another thread count rounds reductions (the Poisson CG) differently."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cli(args, torchrun: int = 0, expect: int = 0):
    """Run the CLI (under torchrun with ``torchrun`` ranks); ``expect``: its exit status (1 = some images
    failed, as with the unreadable CXR planted below)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "gl_lcm.cli", *args]
    else:
        cmd = [sys.executable, "-m", "gl_lcm.cli", *args]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == expect, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    write_phantom_dataset(root / "data", n=len(STEMS), size=SIZE, seed=1, progress=False)
    (root / "data" / "some.txt").write_text("\n".join(STEMS) + "\n")
    # an unreadable CXR: its error must survive the merge of the rank shards
    (root / "data" / "CXR" / "phantom_0004.png").write_bytes(b"not a png")
    paths = write_tiny_checkpoints(root / "ckpt", tiny_config([f"data.image_size={SIZE}"]))
    return root, paths


def _args(root: Path, paths: dict, out: Path, extra=()):
    return ["evaluate", "--config", "configs/gl_lcm_tiny.yaml", "--split", str(root / "data" / "some.txt"),
            "--no-lpips", f"data.root={root / 'data'}", f"data.image_size={SIZE}", f"metrics.image_size={SIZE}",
            f"checkpoints.vqgan={paths['vqgan']}", f"checkpoints.student={paths['student']}",
            f"checkpoints.teacher={paths['teacher']}", f"eval.output_dir={out}", "eval.batch_size=2",
            "lcm.num_inference_steps=2", "device=cpu", "segmentation.method=folder",
            f"segmentation.mask_dir={root / 'data' / 'Mask'}", *extra]


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for sub in ("global", "local", "fused", "masks")
            for p in sorted((out / sub).glob("*.png"))}


def _table(out: Path) -> list[str]:
    return [line for line in (out / "report.md").read_text().splitlines() if line.startswith("|")]


def test_two_ranks_equal_one_process_and_resume(setup):
    root, paths = setup
    one, two = root / "one", root / "two"
    # the reference: one process, in this interpreter, loading in the main thread
    args = _args(root, paths, one, ["eval.loader_workers=0"])
    with ranks_thread_count():
        evaluate_split(load_config(REPO / args[2], args[6:]), split=args[4], no_lpips=True, progress=False)
    r = run_cli(_args(root, paths, two), torchrun=2, expect=1)
    ref, got = _files(one), _files(two)
    assert len(ref) == 4 * 4  # 4 readable images x (global, local, fused, mask)
    assert got.keys() == ref.keys()
    assert [k for k in ref if ref[k] != got[k]] == []  # byte-identical outputs
    assert _table(two) == _table(one) and len(_table(one)) >= 5  # one metrics table, from all images
    assert r.stdout.count("4 succeeded, 1 failed, 0 skipped") == 1  # rank 0 reports the totals once
    with open(two / "timing.csv", newline="") as f:
        assert sorted(row["image"] for row in csv.DictReader(f)) == STEMS[:4]
    with open(two / "errors.csv", newline="") as f:
        errors = list(csv.DictReader(f))
    assert [e["image"] for e in errors] == ["phantom_0004"] and errors[0]["stage"] == "segmentation"
    assert not list((two / "shards").glob("*.csv"))  # merged and removed
    # a rerun resumes: everything finished is skipped, nothing is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in (two / "fused").glob("*.png")}
    r = run_cli(_args(root, paths, two), torchrun=2, expect=1)
    assert "0 succeeded, 1 failed, 4 skipped" in r.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in (two / "fused").glob("*.png")}
    assert _table(two) == _table(one)


def test_suppress_two_ranks_equal_one_process(setup):
    root, paths = setup
    src = root / "data" / "CXR"
    common = [f"data.image_size={SIZE}", f"checkpoints.vqgan={paths['vqgan']}",
              f"checkpoints.student={paths['student']}", "lcm.num_inference_steps=2", "device=cpu",
              "segmentation.method=folder", f"segmentation.mask_dir={root / 'data' / 'Mask'}"]
    with ranks_thread_count():
        suppress_path(load_config(REPO / "configs" / "gl_lcm_tiny.yaml", common), str(src), str(root / "s1"))
    r = run_cli(["suppress", "--config", "configs/gl_lcm_tiny.yaml", "-o", str(root / "s2"), str(src), *common],
                torchrun=2, expect=1)
    one = {p.name: p.read_bytes() for p in (root / "s1").glob("*.png")}
    two = {p.name: p.read_bytes() for p in (root / "s2").glob("*.png")}
    assert len(one) == 4 and one == two
    assert r.stdout.count("suppress: 4 succeeded, 1 failed") == 1
    with open(root / "s2" / "errors.csv", newline="") as f:
        assert [e["image"] for e in csv.DictReader(f)] == ["phantom_0004"]


class _RecordingEngine:
    """Stands in for the InferenceEngine: records the batches it is given and returns the CXR as every result."""

    fusion = SimpleNamespace(mode="poisson")
    pixels = SimpleNamespace(image_size=64)

    def __init__(self, cfg):
        from gl_lcm.inference import Segmenter

        self.batches = []
        self.segmenter = Segmenter.from_config(cfg)

    def segment_batch(self, names, images, cache_dir=None, overwrite=False):
        return self.segmenter.segment_batch(names, images, cache_dir=cache_dir, overwrite=overwrite)

    def run(self, names, cxrs, masks, guidance_mode=None, num_steps=None):
        from gl_lcm.inference import GLLCMResult

        self.batches.append(list(names))
        return [GLLCMResult(n, c, c, c, m) for n, c, m in zip(names, cxrs, masks)]


def test_ranks_get_whole_batches_of_the_single_process_run(setup, tmp_path):
    """Rank r samples exactly batches r, r + N, ... of the one-process run (same batch composition,
    hence the same arithmetic on real models, where a batch's round-off depends on its members)."""
    from gl_lcm.jobs.evaluate import OutputOptions, SplitFiles, run_split

    root, paths = setup
    args = _args(root, paths, tmp_path, ["eval.batch_size=2", "eval.save_figures=false"])
    cfg = load_config(REPO / args[2], args[6:])
    cxr_files = {s: root / "data" / "CXR" / f"{s}.png" for s in STEMS[:4]}
    stems = sorted(cxr_files)
    files, options = SplitFiles(stems, cxr_files, {}), OutputOptions.from_config(cfg)
    single = _RecordingEngine(cfg)
    run_split(single, files, tmp_path / "one", options, progress=False)
    per_rank = []
    for rank in range(2):
        rec = _RecordingEngine(cfg)
        run_split(rec, files, tmp_path / f"rank{rank}", options, progress=False, rank=rank, world_size=2)
        per_rank.append(rec.batches)
    assert single.batches == [stems[0:2], stems[2:4]]
    assert per_rank == [[stems[0:2]], [stems[2:4]]]
