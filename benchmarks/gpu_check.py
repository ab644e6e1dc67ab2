#!/usr/bin/env python
"""One-command GPU check (run through benchmarks/gpu_check.sh): prints ONE Markdown table.

On a CUDA machine (about 8 minutes on one H100/H200):

1. ``pytest -m cuda``: autocast, compile, Poisson fusion on the device, DDP with nccl on one rank;
2. a 20-step run of each training command (train-vqgan, train-ldm, distill, train-onestep, train-seg) with
   the tiny configs in bf16 under torchrun (one process per visible GPU) on freshly generated phantoms; a
   failed run prints its child's last 20 stderr lines (the traceback) and a one-line reason in the table;
3. paper-sized inference at 1024 x 1024 (random weights: configs/vqgan_paper.yaml + configs/unet_paper.yaml):
   the published setting (LCM-50, two UNet calls per step, scheduler rebuilt, fp32, seamlessClone)
   against ours (LCM-50 batched, bf16, torch fusion on the device) and the student at 4, 2 and 1
   steps, per stage and end to end, at batch 1 and 8, with peak GPU memory;
4. Poisson fusion at 1024 x 1024: torch on the device vs the sparse float solver vs seamlessClone.

Without CUDA it runs the CPU parts small and fast (the cuda tests, which skip; tiny-model inference
at 128 px; fusion at 256 px), says what it skipped, and finishes in well under a minute.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from _machine import machine_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
HEADER = ("| Part | Case | Result | Batch | segment s | encode s | sample s | decode s | fuse s | total s / image | "
          "images / s | peak GPU GiB | wall s |")
CUDA_TEST_PATHS = ["tests"]  # every test marked cuda, wherever it lives


def row(part, case, result, wall=None, stages=None) -> dict:
    return {"part": part, "case": case, "result": result, "wall": wall, "stages": stages}


def cuda_tests(tmp: Path) -> list[dict]:
    """pytest -m cuda over the whole suite; one row per test."""
    xml = tmp / "cuda.xml"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           f"--junitxml={xml}", *CUDA_TEST_PATHS], cwd=REPO, capture_output=True, text=True,
                          timeout=420)
    wall = time.perf_counter() - t0
    rows = []
    if not xml.is_file():
        return [row("cuda tests", "pytest -m cuda", f"ERROR (exit {proc.returncode}): {proc.stderr[-300:]!r}", wall)]
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            result = "FAILED: " + (bad.get("message") or "")[:120].replace("|", "/").replace("\n", " ")
        elif case.find("skipped") is not None:
            result = "skipped: " + (case.find("skipped").get("message") or "")[:80].replace("|", "/")
        else:
            result = "passed"
        rows.append(row("cuda tests", name, result, float(case.get("time", 0))))
    return rows or [row("cuda tests", "pytest -m cuda", f"no tests collected (exit {proc.returncode})", wall)]


def child_error_lines(log_dir: Path, fallback: str, n: int = 20) -> list[str]:
    """The last ``n`` lines of the failing child's own stderr: its traceback, not torchrun's banner.

    torchrun (``--log-dir --tee 3``) writes each rank's output to ``<log_dir>/<run>/attempt_<k>/<rank>/
    stderr.log``; the first rank whose log holds a traceback is chosen (else the first non-empty log, else
    ``fallback``, the captured output). Progress-bar redraws (carriage returns) keep their last state.
    """
    logs = sorted(log_dir.rglob("stderr.log"), key=lambda p: (len(p.parts), str(p))) if log_dir.is_dir() else []
    texts = [p.read_text(errors="replace") for p in logs]
    text = next((t for t in texts if "Traceback (most recent call last)" in t),
                next((t for t in texts if t.strip()), fallback))
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in text.splitlines()]
    lines = [line for line in lines if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        lines = lines[starts[-1]:]
    return lines[-n:]


def failure_reason(lines: list[str]) -> str:
    """One line for the table: the exception line of the traceback (or the last line), Markdown-safe."""
    exc = [line for line in lines if not line.startswith((" ", "\t")) and ("Error" in line or "Exception" in line)]
    reason = (exc or lines or ["no output"])[-1].strip()
    return reason[:160].replace("|", "/")


def training_runs(tmp: Path, steps: int, device: str = "cuda") -> list[dict]:
    """A ``steps``-step bf16 run of each training command under torchrun (tiny configs, phantoms).

    A failed run gets a one-line reason in the table and its child's last 20 stderr lines (the
    traceback) printed right away, before the table.
    """
    nproc = max(1, torch.cuda.device_count()) if device == "cuda" else 1
    data, runs = tmp / "phantoms", tmp / "runs"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-m", "gl_lcm.cli", "phantoms", "--out", str(data), "--n", "48", "--size", "128"],
                   cwd=REPO, env=env, check=True, capture_output=True)
    common = [f"data.root={data}", f"train.max_steps={steps}", "train.mixed_precision=bf16", f"device={device}",
              f"train.ckpt_every={steps}", f"train.val_every={steps}", "train.log_every=5"]
    vq, ldm, student = runs / "vqgan" / "model.pt", runs / "ldm" / "model.pt", runs / "distill" / "model.pt"
    half = max(1, steps // 2)  # train-onestep: latent-only steps, then steps through the decoder
    commands = [
        ("train-vqgan", "configs/vqgan_tiny.yaml", [f"train.output_dir={runs / 'vqgan'}"]),
        ("train-ldm", "configs/ldm_tiny.yaml", [f"train.output_dir={runs / 'ldm'}", f"checkpoints.vqgan={vq}"]),
        ("distill", "configs/distill_tiny.yaml", [f"train.output_dir={runs / 'distill'}", f"checkpoints.vqgan={vq}",
                                                  f"checkpoints.teacher={ldm}"]),
        ("train-onestep", "configs/onestep_tiny.yaml", [f"train.output_dir={runs / 'onestep'}",
                                                        f"checkpoints.vqgan={vq}", f"checkpoints.teacher={ldm}",
                                                        f"onestep.latent_only_steps={half}",
                                                        f"train.lr_milestones=[{half}]", "train.warmup_steps=0"]),
        ("train-seg", "configs/segnet_tiny.yaml", [f"train.output_dir={runs / 'seg'}"]),
    ]
    rows = []
    for cmd, config, extra in commands:
        note = ""
        if cmd == "train-onestep":  # from the distilled student as in the recipe; from the teacher if there is none
            extra = extra + [f"checkpoints.student={student if student.is_file() else ''}"]
            note = " (from the distilled student)" if student.is_file() else " (from the teacher: no distilled student)"
        log_dir = tmp / "torchrun_logs" / cmd
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   f"--nproc_per_node={nproc}", f"--log-dir={log_dir}", "--tee=3",
                                   "-m", "gl_lcm.cli", cmd, "--config", config, *common, *extra],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            returncode, output = proc.returncode, (proc.stderr or "") + (proc.stdout or "")
        except subprocess.TimeoutExpired as exc:
            returncode = "timeout after 300 s"
            output = "".join(o.decode(errors="replace") if isinstance(o, bytes) else (o or "")
                             for o in (exc.stderr, exc.output))
        wall = time.perf_counter() - t0
        out_dir = Path(extra[0].split("=", 1)[1])
        ok = returncode == 0 and (out_dir / "model.pt").is_file()
        case = f"{cmd} {steps} steps, {nproc} process(es){note}"
        if ok:
            rows.append(row("training (bf16, torchrun)", case, "passed", wall))
            continue
        lines = child_error_lines(log_dir, output)
        if returncode == 0:
            lines = lines + [f"exit 0 but no {out_dir / 'model.pt'}"]
        why = failure_reason(lines) if returncode != 0 else f"no model.pt in {out_dir.name}/"
        rows.append(row("training (bf16, torchrun)", case, f"FAILED (exit {returncode}): {why}", wall))
        print(f"### {cmd} failed (exit {returncode}): the child's last {len(lines)} error lines\n\n```\n"
              + "\n".join(lines) + "\n```\n", flush=True)
    return rows


def inference(cuda: bool) -> list[dict]:
    import bench_inference

    if cuda:
        argv = ["--table", "gpu", "--device", "cuda", "--vqgan-config", str(REPO / "configs" / "vqgan_paper.yaml"),
                "--unet-config", str(REPO / "configs" / "unet_paper.yaml"), "--image-size", "1024",
                "--batch-sizes", "1", "8", "--repeats", "2", "--row-budget-s", "20"]
        part = "inference 1024 px, paper-sized (random weights)"
    else:
        argv = ["--table", "gpu", "--device", "cpu", "--image-size", "128", "--batch-sizes", "1", "--repeats", "1",
                "--teacher-steps", "2", "--student-steps", "1", "--precision", "bf16", "--threads", "1"]
        part = "inference 128 px, tiny (CPU smoke; not the GPU figures)"
    t0 = time.perf_counter()
    results, _ = bench_inference.measure(bench_inference.parse_args(argv))
    wall = time.perf_counter() - t0
    rows = []
    for r in results:
        case = f"{r['row']}, {r['precision']}, fusion {r['fusion']}" + (f" ({r['note']})" if r["note"] else "")
        rows.append(row(part, case, "passed", None, r))
    rows[-1]["wall"] = wall
    return rows


def fusion(cuda: bool) -> list[dict]:
    import numpy as np

    import bench_fusion
    from gl_lcm.fusion import poisson_fuse, poisson_fuse_opencv, poisson_fuse_torch

    size = 1024 if cuda else 256
    g, l, mask = bench_fusion.scene(size, 5)
    cases = [("float sparse (CPU)", torch.device("cpu"), lambda: poisson_fuse(g, l, mask)),
             ("torch DST-CG (CPU)", torch.device("cpu"), lambda: poisson_fuse_torch(g, l, mask)),
             ("seamlessClone (CPU, published)", torch.device("cpu"), lambda: poisson_fuse_opencv(g, l, mask))]
    if cuda:
        dev = torch.device("cuda")
        gt, lt, mt = (torch.from_numpy(a).to(dev) for a in (g, l, mask))
        cases.insert(2, ("torch DST-CG (GPU)", dev, lambda: poisson_fuse_torch(gt, lt, mt)))
    secs, outs = bench_fusion.interleaved_medians([c[2] for c in cases], 3, [c[1] for c in cases])
    ref = outs[0]
    rows = []
    for (name, _, _), sec, out in zip(cases, secs, outs):
        out = out.cpu().numpy() if isinstance(out, torch.Tensor) else out
        diff = float(np.abs(out.astype(np.float64) - ref).max())
        rows.append(row(f"fusion {size} px", name, f"max abs diff vs float sparse {diff:.1e}", sec,
                        {"fuse": sec, "batch": 1}))
    return rows


def fmt(value, places=3) -> str:
    return "–" if value is None else f"{value:.{places}f}"


def markdown(rows: list[dict]) -> str:
    lines = [HEADER, "|:--|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        s = r["stages"] or {}
        cells = [fmt(s.get(k)) for k in ("segment", "encode", "sample", "decode", "fuse", "total")]
        ips = fmt(s.get("images_per_s"), 2)
        peak = fmt(s.get("peak_gib"), 2)
        batch = str(s.get("batch", "–"))
        lines.append(f"| {r['part']} | {r['case']} | {r['result']} | {batch} | " + " | ".join(cells)
                     + f" | {ips} | {peak} | {fmt(r['wall'], 1)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-steps", type=int, default=20, help="steps of each training run (CUDA only)")
    p.add_argument("--train-on-cpu", action="store_true",
                   help="without CUDA, still run the training commands on the CPU (checks the command lines; slow)")
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "training", "inference", "fusion"],
                   help="parts to leave out")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    start = time.perf_counter()
    rows, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="gl_lcm_gpu_check_") as tmp:
        tmp = Path(tmp)
        if "tests" not in args.skip:
            rows += cuda_tests(tmp)
        if "training" not in args.skip:
            if cuda or args.train_on_cpu:
                rows += training_runs(tmp, args.train_steps, "cuda" if cuda else "cpu")
            else:
                skipped.append("training runs (bf16 under torchrun need CUDA)")
        if "inference" not in args.skip:
            rows += inference(cuda)
            if not cuda:
                skipped.append("paper-sized inference at 1024 px with peak GPU memory (tiny 128 px CPU run instead)")
        if "fusion" not in args.skip:
            rows += fusion(cuda)
            if not cuda:
                skipped.append("fusion on the GPU (CPU backends at 256 px instead)")
    if not cuda:
        skipped.insert(0, "the CUDA tests themselves (they skip)")
    print(f"## GPU check ({'CUDA: ' + torch.cuda.get_device_name(0) if cuda else 'no CUDA: CPU parts only'}, "
          f"{time.perf_counter() - start:.0f} s)\n")
    print(markdown(rows))
    print()
    if skipped:
        print("Skipped without CUDA: " + "; ".join(skipped) + ".")
    failed = [r for r in rows if r["result"].startswith(("FAILED", "ERROR"))]
    print(f"{len(rows)} rows, {len(failed)} failed.")
    print(machine_line(torch.device("cuda") if cuda else torch.device("cpu")))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
