#!/usr/bin/env python
"""Time and peak memory of `gl-lcm import-reference` on paper-sized published-style pickles.

Builds random-weight modules with the published class paths and sizes (guided-diffusion UNetModel
as in the published model.py, 383 M parameters, 8 in / 8 out channels; MONAI VQVAE, 38 M), saves
them whole with torch.save as the published code did, then imports both in a fresh subprocess
(restricted unpickling, architecture check, key mapping, unet.pt / vqgan.pt + .safetensors written,
each re-loaded with weights_only=True and compared). Reports the import's wall time and the
subprocess's peak RSS (VmHWM), next to the checkpoint sizes.

    python benchmarks/bench_import.py               # paper size (several GB of temporary files)
    python benchmarks/bench_import.py --small       # smoke run
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from _machine import machine_line  # noqa: E402

PAPER_UNET = dict(model_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=8,
                  attention_ds=(64, 32, 16, 8), num_heads=8, image_size=128)
PAPER_VQVAE = dict(channels=(128, 256, 512), res_channels=512, num_res_layers=2, codebook_size=1024)
SMALL_UNET = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,), num_heads=2)
SMALL_VQVAE = dict(channels=(32, 32), res_channels=32, num_res_layers=1, codebook_size=64)

CHILD = r"""
import json, sys, time
sys.path[:0] = {paths!r}
t0 = time.perf_counter()
from gl_lcm.models.reference_import import import_reference
t1 = time.perf_counter()
import_reference({unet!r}, {vqgan!r}, {out!r})
t2 = time.perf_counter()
hwm = [l for l in open('/proc/self/status') if l.startswith(('VmHWM', 'VmRSS'))]
print(json.dumps({{"import_s": t1 - t0, "run_s": t2 - t1, "status": hwm}}))
"""


def _kib(lines: list[str], key: str) -> float:
    return next(float(line.split()[1]) for line in lines if line.startswith(key))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny models (smoke run)")
    ap.add_argument("--tmp", default=None, help="folder for the temporary files (default: system temp)")
    args = ap.parse_args()
    from gl_lcm.models.published_standins import published_unet, published_vqvae

    u_kw, v_kw = (SMALL_UNET, SMALL_VQVAE) if args.small else (PAPER_UNET, PAPER_VQVAE)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        unet = published_unet(**u_kw)
        n_unet = sum(p.numel() for p in unet.parameters())
        torch.save(unet, tmp / "UNet.pth")
        del unet
        vq = published_vqvae(**v_kw)
        n_vq = sum(p.numel() for p in vq.parameters())
        torch.save(vq, tmp / "VQGAN.pth")
        del vq
        build_s = time.perf_counter() - t0
        code = CHILD.format(paths=[str(REPO)], unet=str(tmp / "UNet.pth"),
                            vqgan=str(tmp / "VQGAN.pth"), out=str(tmp / "out"))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
            sys.exit(f"import failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        size = lambda p: (tmp / p).stat().st_size / 2**20
        label = "SMOKE RUN (tiny models)" if args.small else "paper size"
        print("\n| Models | UNet params | VQ-VAE params | published .pth MiB (UNet + VQ) | written .pt MiB | "
              ".safetensors MiB | import s | peak RSS GiB |")
        print("|:--|--:|--:|--:|--:|--:|--:|--:|")
        print(f"| {label} | {n_unet / 1e6:.1f} M | {n_vq / 1e6:.1f} M | {size('UNet.pth'):.0f} + {size('VQGAN.pth'):.0f} "
              f"| {size('out/unet.pt') + size('out/vqgan.pt'):.0f} | "
              f"{size('out/unet.safetensors') + size('out/vqgan.safetensors'):.0f} | {res['run_s']:.1f} | "
              f"{_kib(res['status'], 'VmHWM') / 2**20:.2f} |")
        print(f"\nimport s: import_reference on both files (read, check, convert, write .pt and .safetensors, "
              f"re-load and compare), excluding {res['import_s']:.1f} s of Python imports; peak RSS of that "
              f"process. Building the random pickles took {build_s:.0f} s (not included).")
        print(machine_line(torch.device("cpu")))


if __name__ == "__main__":
    main()
