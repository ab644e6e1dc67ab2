"""Smoke tests of the benchmark scripts: each runs once in its smallest setting as a subprocess,
exits 0 and prints its Markdown table (header, separator and the expected rows). The numbers
themselves are never asserted (they depend on the machine)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tiny_models import tiny_config, write_tiny_checkpoints

from gl_lcm.data.phantom import write_phantom_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "benchmarks"


def run_script(name: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def table_rows(stdout: str, header_start: str) -> list[str]:
    """The rows of the Markdown table whose header starts with ``header_start`` (separator checked)."""
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(header_start)]
    assert len(starts) == 1, f"table header {header_start!r} not printed once:\n{stdout}"
    i = starts[0]
    assert lines[i + 1].startswith("|:--"), f"no Markdown separator under the header:\n{stdout}"
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_bench_sampling_smoke():
    out = run_script("bench_sampling.py", "--image-size", "64", "--num-images", "1", "--ddpm-steps", "3",
                     "--teacher-steps", "2", "--repeats", "1", "--threads", "1")
    rows = table_rows(out, "| Method | UNet calls / batch | encode s | sampling s | decode s | fusion s | "
                           "total s / image | speed-up vs DDPM-3 | PSNR (dB) | BSR (%) |")
    names = [r.split("|")[1].strip() for r in rows]
    assert len(rows) == 6, rows  # DDPM, LCM sequential, LCM batched, student 1/2/4
    assert names[0].startswith("DDPM-3 (SMOKE RUN")
    assert names[1].startswith("LCM-2 dual path, sequential") and names[2].startswith("LCM-2 dual path, batched")
    assert [n.split(",")[0] for n in names[3:]] == ["student 1 step", "student 2 steps", "student 4 steps"]
    # UNet calls per batch: DDPM 3, sequential 2 x 2, batched 2, students 1 / 2 / 4
    assert [r.split("|")[2].strip() for r in rows] == ["3", "4", "2", "1", "2", "4"]
    assert all(r.rstrip(" |").endswith("n/a | n/a") for r in rows)  # random models: no metrics
    assert "batched dual path == sequential dual path (max abs diff" in out
    assert "Machine:" in out


def test_bench_sampling_trained_checkpoints_report_metrics(tmp_path):
    write_phantom_dataset(tmp_path / "data", n=3, size=64, seed=0, progress=False)
    paths = write_tiny_checkpoints(tmp_path / "ckpt", tiny_config(["data.image_size=64"]))
    out = run_script("bench_sampling.py", "--vqgan", str(paths["vqgan"]), "--teacher", str(paths["teacher"]),
                     "--student", str(paths["student"]), "--data", str(tmp_path / "data"), "--num-images", "2",
                     "--batch-size", "2", "--ddpm-steps", "3", "--teacher-steps", "2", "--student-steps", "1",
                     "--repeats", "1", "--threads", "1")
    rows = table_rows(out, "| Method | UNet calls / batch |")
    assert len(rows) == 4, rows  # DDPM, LCM sequential, LCM batched, student 1 step
    for row in rows:  # trained-model mode with ground truth: PSNR and BSR are numbers
        psnr, bsr = row.split("|")[-3].strip(), row.split("|")[-2].strip()
        float(psnr), float(bsr)
    assert "images: 2 from" in out and "Mask" in out  # lung masks read from the phantom folder


def test_bench_memory_smoke():
    out = run_script("bench_memory.py", "--vqgan-config", "configs/vqgan_tiny.yaml", "--unet-config",
                     "configs/ldm_tiny.yaml", "--image-size", "64", "--steps", "1", "--threads", "1")
    rows = table_rows(out, "| Case | Parameters | Peak memory (GiB) | Baseline (GiB) | Peak - baseline (GiB) | "
                           "Wall s |")
    assert [r.split("|")[1].strip().split(":")[0] for r in rows] == ["inference", "vqgan", "unet"]
    for row in rows:
        peak, baseline = float(row.split("|")[3]), float(row.split("|")[4])
        assert peak >= baseline > 0, row  # a peak below the post-import baseline would be a measuring bug
    assert "2x4x8x8" in rows[0]  # one batched UNet call on the global + local latents of one image
    assert "Machine:" in out


def test_bench_metrics_smoke():
    out = run_script("bench_metrics.py", "--image-size", "64", "--num-images", "1", "--repeats", "1",
                     "--threads", "1")
    rows = table_rows(out, "| Measurement | images / s | ms / image |")
    assert len(rows) == 5, rows
    assert rows[-1].startswith("| building the LPIPS network (once)")
    assert "LPIPS weights:" in out and "Machine:" in out


def test_bench_fusion_smoke():
    out = run_script("bench_fusion.py", "--size", "96", "--repeats", "1", "--threads", "1")
    rows = table_rows(out, "| Method | Device | ms / image | vs seamlessClone |")
    names = [r.split("|")[1].strip() for r in rows]
    assert names[0].startswith("float sparse") and names[-1].startswith("OpenCV seamlessClone")
    assert any(n.startswith("torch DST-CG") for n in names)
    torch_row = next(r for r in rows if "torch DST-CG float32" in r)
    assert float(torch_row.split("|")[5]) < 1e-4  # agreement with the float solver is part of the table
    assert "Machine:" in out


def test_bench_inference_smoke():
    out = run_script("bench_inference.py", "--table", "cpu", "--image-size", "64", "--repeats", "1", "--threads", "1",
                     "--student-steps", "1")
    rows = table_rows(out, "| Row | Batch | UNet calls / batch | Precision | Fusion | segment s |")
    assert [r.split("|")[1].strip().split(":")[0] for r in rows] == ["before", "after"]
    assert [r.split("|")[5].strip() for r in rows] == ["float", "torch"]
    assert "Machine:" in out


def test_gpu_check_cpu_mode():
    """gpu_check.sh without CUDA: one table, the cuda tests reported as skipped, the skipped parts named."""
    import os

    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("CPU mode only (on a CUDA machine the script runs the full GPU check)")
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-3000:]}"
    out = proc.stdout
    assert out.count("| Part | Case | Result |") == 1  # ONE table
    rows = table_rows(out, "| Part | Case | Result |")
    parts = {r.split("|")[1].strip().split(" ")[0] for r in rows}
    assert {"cuda", "inference", "fusion"} <= parts
    cuda_rows = [r for r in rows if r.startswith("| cuda tests")]
    assert len(cuda_rows) >= 4 and all("skipped" in r for r in cuda_rows)
    assert "Skipped without CUDA:" in out and "training runs" in out and "Machine:" in out


def test_bench_chest_check_smoke(tmp_path):
    out = run_script("bench_chest_check.py", "--data", str(tmp_path / "no-data"), "--phantoms", "1")
    rows = table_rows(out, "| group | films | accepted | refused |")
    assert len(rows) == 1 and rows[0].startswith("| chest: phantoms 128/256/512 px | 3 | 3 | 0 |")
    assert "Machine:" in out


def test_bench_import_smoke():
    out = run_script("bench_import.py", "--small")
    rows = table_rows(out, "| Models | UNet params | VQ-VAE params |")
    assert len(rows) == 1 and rows[0].startswith("| SMOKE RUN")
    assert "Machine:" in out


def test_compare_published_choices_smoke(tmp_path):
    write_phantom_dataset(tmp_path / "data", n=10, size=64, seed=0, progress=False)
    paths = write_tiny_checkpoints(tmp_path / "ckpt", tiny_config(["data.image_size=64"]))
    out = run_script("compare_published_choices.py", "--vqgan", str(paths["vqgan"]), "--denoiser",
                     str(paths["teacher"]), "--data-root", str(tmp_path / "data"), "--steps", "2", "--threads", "1")
    rows = table_rows(out, "| Choice (")
    assert [r.split("|")[1].strip() for r in rows][0] == "ours (defaults)" and len(rows) == 8
    assert rows[0].rstrip(" |").endswith("+0.00")


def test_bench_segmentation_smoke(tmp_path):
    """Per-source and per-variant tables on a fake real-cxr/seg made of phantoms, with a 1-step U-Net."""
    import cv2
    import numpy as np

    from gl_lcm.config import load_config
    from gl_lcm.data.phantom import generate_phantom
    from gl_lcm.train.segnet import train_segnet

    for source in ("jsrt", "covid"):
        for folder in ("images", "masks"):
            (tmp_path / "real-cxr" / "seg" / source / folder).mkdir(parents=True)
        for i in range(2):
            p = generate_phantom(64, i)
            cv2.imwrite(str(tmp_path / "real-cxr" / "seg" / source / "images" / f"f{i}.png"), (p.cxr * 255).astype(np.uint8))
            cv2.imwrite(str(tmp_path / "real-cxr" / "seg" / source / "masks" / f"f{i}.png"),
                        p.lung_mask.astype(np.uint8) * 255)
    write_phantom_dataset(tmp_path / "ph", n=4, size=32, seed=1, progress=False)
    cfg = load_config(REPO_ROOT / "configs/segnet_tiny.yaml", [
        f"data.root={tmp_path / 'ph'}", f"train.output_dir={tmp_path / 'seg'}", "segmentation.image_size=32",
        "segmentation.depth=2", "segmentation.base_channels=8", "segmentation.outputs=[visible,full]",
        "data.full_mask_dir=Mask", "train.max_steps=1", "train.batch_size=2", "device=cpu"])
    train_segnet(cfg, progress=False)
    out = run_script("bench_segmentation.py", "--data", str(tmp_path), "--segnet", str(tmp_path / "seg" / "model.pt"),
                     "--variants", "--phantoms", "2", "--out", str(tmp_path / "bench"))
    rows = table_rows(out, "| method | source (convention) |")
    assert [tuple(c.strip() for c in r.split("|")[1:3]) for r in rows] == [
        (m, s) for m in ("classical", "unet") for s in ("jsrt (visible)", "covid (full)", "phantoms 256 px (visible)")]
    variants = table_rows(out, "| variant | method |")
    assert len(variants) == 9 * 2
    assert (tmp_path / "bench" / "table.md").is_file() and (tmp_path / "bench" / "worst.png").is_file()


def test_gpu_check_reports_the_failing_childs_traceback(tmp_path):
    """A failed torchrun training run: the child's own traceback from torchrun's per-rank log, not its banner."""
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCH))
    rank0 = tmp_path / "logs" / "abc_1" / "attempt_0" / "0"
    rank0.mkdir(parents=True)
    (rank0 / "stderr.log").write_text(
        "train vqgan:  10%|#         | 2/20\rtrain vqgan:  15%|#5        | 3/20\n"
        + "".join(f"noise {i}\n" for i in range(30))
        + "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n    f()\n"
        "RuntimeError: Expected a 'cuda' device type for generator but found 'cpu'\n")
    (rank0 / "stdout.log").write_text("")
    banner = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: gl_lcm.cli FAILED\n"
    lines = gpu_check.child_error_lines(tmp_path / "logs", banner)
    assert lines[0] == "Traceback (most recent call last):" and len(lines) == 4
    assert gpu_check.failure_reason(lines) == "RuntimeError: Expected a 'cuda' device type for generator but found 'cpu'"
    # no per-rank log (torchrun itself failed): the captured output's last lines
    assert gpu_check.child_error_lines(tmp_path / "none", "a\n\nb | c\n") == ["a", "b | c"]
    assert gpu_check.failure_reason(["a", "b | c"]) == "b / c"


def test_bench_unet_dispatch_smoke():
    out = run_script("bench_unet_dispatch.py", "--tiny", "--repeats", "0")
    rows = table_rows(out, "| path | dispatched ops |")
    assert len(rows) == 2 and "autocast" in rows[0] and "bf16_weights" in rows[1]
    assert "of the dispatched operations" in out
