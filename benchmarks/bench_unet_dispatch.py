#!/usr/bin/env python
"""Per-call overhead of one UNet forward: aten operations today (bf16 autocast) vs the weights-cast-once path.

A paper-sized UNet call at sampling batch sizes is bound by dispatch (Python plus one kernel launch per
aten operation), not by arithmetic. This counts, on the CPU, the aten operations of ONE forward:

- ``dispatched``: operations that reach the kernels (a ``TorchDispatchMode`` sees each once; on CUDA
  each is about one kernel launch), and among them the dtype casts (``_to_copy``, ``to``, ``copy_``);
- ``profiler``: every ``aten::`` event of ``torch.profiler`` (nested composites counted too: the way
  issue 20 counted 21,198 for the paper UNet under bf16 autocast);

for (i) ``prepare_denoiser(unet, device, "bf16")`` (autocast, today) and (ii) ``prepare_denoiser(unet,
device, "bf16_weights")`` (``FastUNet``: weights cast once, no autocast), plus the output's relative L2
difference from fp32 and the CPU time of a call (noisy on a shared machine). The counts hardly depend on
the spatial size (same layers, same calls; issue 20 counted 21,198 profiler events at 128 x 128, this
script 21,286 at 32 x 32, where today's attention on single-token maps differs slightly), so the default
latent is the smallest the network accepts (32 x 32 for the paper's five downsamplings); ``--latent-size
128`` is the paper shape (slow on the CPU).

    python benchmarks/bench_unet_dispatch.py            # paper-sized UNet (configs/unet_paper.yaml)
    python benchmarks/bench_unet_dispatch.py --tiny     # the tiny UNet of the tests (seconds)
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gl_lcm.config import load_config  # noqa: E402
from gl_lcm.models.factory import build_unet  # noqa: E402
from gl_lcm.runtime import prepare_denoiser  # noqa: E402

CAST_OPS = ("_to_copy", "to", "copy_")
TINY = ["unet.model_channels=16", "unet.channel_mult=[1,2]", "unet.num_res_blocks=1", "unet.attention_resolutions=[8]",
        "unet.latent_size=16", "unet.num_heads=2"]


class CountOps(TorchDispatchMode):
    """Counts the aten operations that reach the kernels, by name (overload dropped)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn, *args) -> Counter:
    with torch.no_grad(), CountOps() as counter:
        fn(*args)
    return counter.ops


def profiler_ops(fn, *args) -> Counter:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args)
    return Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")})


def casts(ops: Counter, prefix: str = "") -> int:
    return sum(ops.get(prefix + name, 0) for name in CAST_OPS)


def seconds_per_call(fn, args, repeats: int) -> float:
    with torch.no_grad():
        fn(*args)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    return min(times)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "unet_paper.yaml"), help="UNet config")
    p.add_argument("--tiny", action="store_true", help="the tiny test UNet instead of the config's")
    p.add_argument("--batch", type=int, default=2, help="batch (the paper samples 2 paths per image)")
    p.add_argument("--latent-size", type=int, default=0,
                   help="latent side (0: the smallest the UNet accepts; 128 is the paper shape)")
    p.add_argument("--latent-channels", type=int, default=4, help="VQGAN latent channels (the condition has as many)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per path (fastest reported); 0 skips timing")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave)")
    p.add_argument("--top", type=int, default=12, help="most frequent operations listed per path")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(None if args.tiny else args.config, TINY if args.tiny else [])
    torch.manual_seed(0)
    unet = build_unet(cfg.unet, args.latent_channels).eval()
    with torch.no_grad():  # zero-initialised output layers would make every branch (and the output) trivial
        for p in unet.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    size = args.latent_size or 2 ** (len(cfg.unet.channel_mult) - 1) * (2 if args.tiny else 1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.latent_channels, size, size, generator=g)
    cond = torch.randn(args.batch, args.latent_channels, size, size, generator=g)
    t = torch.full((args.batch,), 999, dtype=torch.long)
    device = torch.device("cpu")
    params = sum(p.numel() for p in unet.parameters())
    print(f"## UNet dispatch count ({'tiny' if args.tiny else Path(args.config).name}, {params / 1e6:.1f}M "
          f"parameters; batch {args.batch}, latent {args.latent_channels} + {args.latent_channels} condition "
          f"channels, {size} x {size}{'' if args.latent_size else ': op counts hardly depend on the size'})\n")
    with torch.no_grad():
        ref = unet(x, t, cond)
    paths = [("today: bf16 autocast (precision=bf16)", prepare_denoiser(unet, device, "bf16")),
             ("weights cast once (precision=bf16_weights)", prepare_denoiser(unet, device, "bf16_weights"))]
    print("| path | dispatched ops | of which casts | profiler aten events | of which casts | rel. L2 vs fp32 "
          "| CPU s / call |")
    print("|:--|--:|--:|--:|--:|--:|--:|")
    results = []
    for name, fn in paths:
        d, p = dispatched_ops(fn, x, t, cond), profiler_ops(fn, x, t, cond)
        with torch.no_grad():
            out = fn(x, t, cond)
        rel = float((out.float() - ref).norm() / ref.norm())
        sec = seconds_per_call(fn, (x, t, cond), args.repeats) if args.repeats else float("nan")
        results.append((name, d, p))
        print(f"| {name} | {sum(d.values())} | {casts(d)} | {sum(p.values())} | {casts(p, 'aten::')} | {rel:.2e} "
              f"| {sec:.3f} |")
    (_, d0, p0), (_, d1, p1) = results
    print(f"\nweights cast once / today: {sum(d1.values()) / sum(d0.values()):.2f} of the dispatched operations, "
          f"{sum(p1.values()) / sum(p0.values()):.2f} of the profiler's aten events.")
    for name, d, _ in results:
        top = ", ".join(f"{k} {v}" for k, v in d.most_common(args.top))
        print(f"\n{name}, most frequent dispatched operations: {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
