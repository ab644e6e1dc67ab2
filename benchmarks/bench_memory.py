#!/usr/bin/env python
"""Peak memory (and wall time) of GL-LCM inference and training steps at the paper's size.

Cases (paper-sized models from configs/vqgan_paper.yaml and configs/unet_paper.yaml by default):

- inference: ONE dual-path sampling step at --image-size: encode 2B images (CXR + lung-masked CXR),
  one batched UNet call on 2B latents (2 x 4 x 128 x 128 at 1024 px, B = 1), decode 2B latents;
- vqgan: VQGAN training steps at --batch-size (the package's VQGANTask.micro_step: forward with the
  EMA codebook update, MSE + quantisation + MS-SSIM (+ LPIPS, see --perceptual) + adversarial term
  and discriminator loss, backward, gradient clipping, AdamW steps of the VQGAN and discriminator);
- unet: teacher training steps at --batch-size (LDMTask.micro_step on latents as with the latent
  cache: noise, UNet forward/backward, clipping, AdamW, EMA update; the frozen VQGAN stays resident
  as in LDMTask).

Training cases run --steps steps (default 2: the first step allocates AdamW's state lazily, so the
steady-state peak shows from the second step on); the peak covers all steps, the time is the last
step's. On CUDA the peak is torch.cuda.max_memory_allocated (reset between cases, models included);
on the CPU every case runs in a fresh subprocess and reports its peak RSS (VmHWM of
/proc/self/status; ru_maxrss would include the parent's RSS at fork) with the baseline RSS after
imports.

Examples::

    python benchmarks/bench_memory.py --threads 1                 # all cases, paper size, on the CPU
    python benchmarks/bench_memory.py --device cuda --bf16 --grad-checkpointing
    python benchmarks/bench_memory.py --vqgan-config configs/vqgan_tiny.yaml \\
        --unet-config configs/ldm_tiny.yaml --image-size 64        # smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from _machine import machine_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO_ROOT = Path(__file__).resolve().parents[1]
CASES = ("inference", "vqgan", "unet")
RESULT_PREFIX = "BENCH_MEMORY_RESULT "
TABLE_HEADER = "| Case | Parameters | Peak memory (GiB) | Baseline (GiB) | Peak - baseline (GiB) | Wall s |"
GIB = 1024**3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only; ignored on the CPU)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in backward (VQGAN and UNet); no effect on inference")
    p.add_argument("--batch-size", type=int, default=1, help="images (inference, vqgan) or latent pairs (unet) "
                                                             "per step (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=1024, help="image side in pixels (default: %(default)s)")
    p.add_argument("--only", choices=CASES, help="run one case only")
    p.add_argument("--steps", type=int, default=2, help="training steps per training case (default: %(default)s)")
    p.add_argument("--vqgan-config", default=str(REPO_ROOT / "configs" / "vqgan_paper.yaml"),
                   help="VQGAN architecture and loss weights (default: %(default)s)")
    p.add_argument("--unet-config", default=str(REPO_ROOT / "configs" / "unet_paper.yaml"),
                   help="UNet architecture, diffusion and training settings (default: %(default)s)")
    p.add_argument("--perceptual", choices=("auto", "random", "off"), default="auto",
                   help="LPIPS term of the VQGAN loss: auto = as training does (local trunk weights if present, "
                        "else left out), random = random trunk weights (same memory/time), off (default: auto)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--mem-limit-gb", type=float,
                   help="CPU only: kill a case whose RSS exceeds this (protects a shared machine)")
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    p.add_argument("--random-trunk", help=argparse.SUPPRESS)  # internal: file from write_random_trunk
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1 or args.image_size < 8:
        p.error("--batch-size and --steps must be >= 1, --image-size >= 8")
    return args


# ----------------------------------------------------------------------------- environment
def resolve(args) -> torch.device:
    from gl_lcm.utils.dist import resolve_device

    return resolve_device(args.device)


def load_configs(args):
    """(VQGAN config, UNet config) with image size and gradient checkpointing applied."""
    from gl_lcm.config import load_config

    extra = [f"data.image_size={args.image_size}"]
    vq = load_config(args.vqgan_config, extra + [f"vqgan.gradient_checkpointing={args.grad_checkpointing}"])
    un = load_config(args.unet_config, extra + [f"unet.gradient_checkpointing={args.grad_checkpointing}"])
    factor = 2 ** len(vq.vqgan.channels)
    if args.image_size % factor:
        raise SystemExit(f"--image-size {args.image_size} must be divisible by {factor} (VQGAN downsamplings)")
    latent = args.image_size // factor
    unet_factor = 2 ** (len(un.unet.channel_mult) - 1)
    if latent % unet_factor:
        raise SystemExit(f"latent side {latent} (image {args.image_size}) must be divisible by {unet_factor} "
                         f"for the UNet of {args.unet_config}; use a larger --image-size or a smaller UNet")
    return vq, un


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked, else a no-op (CPU runs fp32)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_seeded(fn, seed: int = 0):
    """Call a module constructor with seeded, isolated global RNG (module initialisers use it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def prepare(module: torch.nn.Module, device: torch.device, cfg) -> torch.nn.Module:
    """Move to the device; channels_last on CUDA as the trainer does."""
    module = module.to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


class StubTrainer:
    """The two things a TrainTask's micro_step asks of the trainer: its modules and the device."""

    def __init__(self, modules: dict, device: torch.device):
        self.modules, self.device = modules, device

    def net(self, name: str) -> torch.nn.Module:
        return self.modules[name]


def optimizer_step(optimizers: dict, modules: dict, groups: dict, grad_clip: float) -> None:
    """Clip and step each optimizer, then free the gradients (as gl_lcm.train.loop.Trainer does)."""
    for name, opt in optimizers.items():
        if grad_clip > 0:
            params = [p for n in groups[name] for p in modules[n].parameters() if p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def adamw(modules, cfg, lr: float) -> torch.optim.Optimizer:
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.train.adam_betas), weight_decay=cfg.train.weight_decay)


def random_image_batch(n: int, size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n x 1 x size x size images in [-1, 1] (smooth random) and two-ellipse lung masks in {0, 1}."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, max(4, size // 16), max(4, size // 16), generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1
    mask = np.zeros((size, size), np.uint8)
    for cx in (0.32, 0.68):
        cv2.ellipse(mask, (int(cx * size), int(0.45 * size)), (int(0.13 * size), int(0.27 * size)), 0, 0, 360, 1, -1)
    m = torch.from_numpy(mask.astype(np.float32))[None, None].expand(n, 1, size, size).contiguous()
    return x.to(device), m.to(device)


def write_random_trunk(net: str, folder: Path) -> Path:
    """A torchvision-style state dict (features.* keys) of a randomly initialised LPIPS trunk.

    Written by the parent process, so building it does not count towards a case's peak memory.
    """
    import torchvision

    from gl_lcm.losses import TRUNK_CHECKPOINTS

    file_name, _, tv_name = TRUNK_CHECKPOINTS[net]
    trunk = build_seeded(lambda: getattr(torchvision.models, tv_name)(weights=None).features)
    path = folder / file_name
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, path)
    return path


def perceptual_module(args, cfg, device: torch.device):
    """(LPIPS module or None, description) for the VQGAN case."""
    from gl_lcm.losses import PerceptualLoss
    from gl_lcm.train.vqgan import build_perceptual

    net = cfg.vqgan.perceptual_net
    if args.perceptual == "off" or cfg.vqgan.perceptual_weight <= 0:
        return None, "LPIPS off"
    if args.perceptual == "auto":
        module = build_perceptual(cfg, device, warn=False)
        return module, (f"LPIPS-{net} (local weights)" if module is not None
                        else f"LPIPS-{net} left out (no local trunk weights, as training does)")
    return (PerceptualLoss(net=net, trunk_weights_path=args.random_trunk).to(device),
            f"LPIPS-{net} (RANDOM trunk weights)")


# ----------------------------------------------------------------------------- cases
def case_inference(args, device: torch.device) -> dict:
    """One dual-path step: encode 2B images, one UNet call on 2B latents, decode 2B latents."""
    from gl_lcm.data.datasets import masked
    from gl_lcm.models.factory import build_unet, build_vqgan

    vq_cfg, un_cfg = load_configs(args)
    vqgan = build_seeded(lambda: build_vqgan(vq_cfg.vqgan)).to(device).eval().requires_grad_(False)
    unet = build_seeded(lambda: build_unet(un_cfg.unet, vq_cfg.vqgan.embed_dim), 1).to(device).eval()
    unet.requires_grad_(False)
    x, m = random_image_batch(args.batch_size, args.image_size, device)
    g = torch.Generator().manual_seed(0)
    synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(device, args.bf16):
        cond = vqgan.encode(torch.cat([x, masked(x, m)]))  # 2B x C x h x w
        noise = torch.randn(cond.shape, generator=g).to(device)
        t = torch.full((cond.shape[0],), un_cfg.diffusion.num_train_timesteps - 1, device=device, dtype=torch.long)
        eps = unet(noise, t, cond)
        images = vqgan.decode(eps.float())
    synchronize(device)
    latent = "x".join(str(s) for s in cond.shape)
    return {"wall_s": time.perf_counter() - t0, "params": {"VQGAN": count(vqgan), "UNet": count(unet)},
            "what": f"encode {images.shape[0]} images, 1 UNet call on {latent}, decode {images.shape[0]} latents"}


def case_vqgan(args, device: torch.device) -> dict:
    """VQGAN training steps with discriminator and adversarial term active."""
    from gl_lcm.losses import VQGANLoss
    from gl_lcm.models.factory import build_discriminator, build_vqgan
    from gl_lcm.train.vqgan import VQGANTask
    from gl_lcm.utils.seeding import make_generator

    cfg, _ = load_configs(args)
    v = cfg.vqgan
    vqgan = prepare(build_seeded(lambda: build_vqgan(v)), device, cfg).train()
    disc = prepare(build_seeded(lambda: build_discriminator(v), 1), device, cfg).train()
    perceptual, lpips_note = perceptual_module(args, cfg, device)
    task = VQGANTask(cfg)
    task.trainer = StubTrainer({"vqgan": vqgan, "disc": disc}, device)
    task.vqgan, task.disc = vqgan, disc
    task.loss = VQGANLoss(msssim_weight=v.msssim_weight, perceptual_weight=v.perceptual_weight,
                          adversarial_weight=v.adversarial_weight, adversarial_start_step=v.adversarial_start_step,
                          perceptual=perceptual)
    modules = {"vqgan": vqgan, "disc": disc}
    groups = {"vqgan": ["vqgan"], "disc": ["disc"]}
    opts = {"vqgan": adamw([vqgan], cfg, cfg.train.lr), "disc": adamw([disc], cfg, v.disc_lr)}
    x, _ = random_image_batch(args.batch_size, args.image_size, device)
    step0 = max(v.adversarial_start_step, 1)  # adversarial term and discriminator active
    wall = 0.0
    for i in range(args.steps):
        synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, args.bf16):
            loss, _ = task.micro_step({"image": x}, step0 + i, make_generator(i, device))
        loss.backward()
        optimizer_step(opts, modules, groups, cfg.train.grad_clip)
        synchronize(device)
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "params": {"VQGAN": count(vqgan), "discriminator": count(disc)},
            "what": f"{args.steps} step(s), batch {args.batch_size}, MSE+VQ+MS-SSIM+GAN, {lpips_note}"}


def case_unet(args, device: torch.device) -> dict:
    """Teacher training steps on latents (latent cache), EMA update included."""
    from gl_lcm.models.factory import build_unet, build_vqgan
    from gl_lcm.train.ldm import LDMTask, diffusion_tables
    from gl_lcm.utils.seeding import make_generator

    vq_cfg, cfg = load_configs(args)
    vqgan = build_seeded(lambda: build_vqgan(vq_cfg.vqgan)).to(device).eval().requires_grad_(False)
    unet = prepare(build_seeded(lambda: build_unet(cfg.unet, vq_cfg.vqgan.embed_dim)), device, cfg).train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    task = LDMTask(cfg)
    task.trainer = StubTrainer({"unet": unet}, device)
    task.unet, task.ema, task.vqgan = unet, ema, vqgan
    task.alphas_cumprod = diffusion_tables(cfg)[1].to(device)
    opts = {"unet": adamw([unet], cfg, cfg.train.lr)}
    c, h, w = vqgan.latent_shape(args.image_size)
    g = torch.Generator().manual_seed(0)
    batch = {"target": torch.randn(args.batch_size, c, h, w, generator=g).to(device),
             "cond": torch.randn(args.batch_size, c, h, w, generator=g).to(device)}
    wall = 0.0
    for i in range(args.steps):
        synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, args.bf16):
            loss, _ = task.micro_step(batch, i + 1, make_generator(i, device))
        loss.backward()
        optimizer_step(opts, {"unet": unet}, {"unet": ["unet"]}, cfg.train.grad_clip)
        task.after_optimizer_step(i + 1)
        synchronize(device)
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "params": {"UNet": count(unet), "frozen VQGAN": count(vqgan)},
            "what": f"{args.steps} step(s), batch {args.batch_size} latents {c}x{h}x{w}, AdamW + EMA copy"}


CASE_FUNCTIONS = {"inference": case_inference, "vqgan": case_vqgan, "unet": case_unet}


# ----------------------------------------------------------------------------- measurement
def peak_rss_bytes() -> tuple[int, int]:
    """(peak RSS of this process image, ru_maxrss) in bytes.

    The first is VmHWM from /proc/self/status, the high-water mark of this process's own memory
    since its exec. ru_maxrss (KiB on Linux) is also returned but is not used as the peak: Linux
    carries the parent's RSS high-water mark at fork into the child's ru_maxrss across exec, so a
    large parent would inflate it. Without /proc, ru_maxrss is all there is.
    """
    rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, rusage
    except OSError:
        pass
    return rusage, rusage


def run_child(args) -> int:
    """Inside the subprocess: run one case on the CPU and print its result as JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    import gl_lcm.models.factory  # noqa: F401  (imports count towards the baseline)
    import gl_lcm.train.ldm  # noqa: F401
    import gl_lcm.train.vqgan  # noqa: F401

    baseline, _ = peak_rss_bytes()
    result = CASE_FUNCTIONS[args.child](args, torch.device("cpu"))
    peak, rusage = peak_rss_bytes()
    result.update(peak=peak, baseline=baseline, ru_maxrss=rusage)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def child_command(args, case: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--device", "cpu",
           "--batch-size", str(args.batch_size), "--image-size", str(args.image_size), "--steps", str(args.steps),
           "--vqgan-config", args.vqgan_config, "--unet-config", args.unet_config, "--perceptual", args.perceptual]
    if args.grad_checkpointing:
        cmd.append("--grad-checkpointing")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.random_trunk:
        cmd += ["--random-trunk", str(args.random_trunk)]
    return cmd


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure_cpu(args, case: str) -> dict:
    """Run ``case`` in a fresh interpreter; kill it if it passes --mem-limit-gb."""
    proc = subprocess.Popen(child_command(args, case), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = False
    if args.mem_limit_gb:
        limit = args.mem_limit_gb * GIB
        while proc.poll() is None:
            if _rss_bytes(proc.pid) > limit:
                proc.kill()  # only the child this function started
                killed = True
                break
            time.sleep(0.1)
    out, err = proc.communicate()
    if killed:
        return {"error": f"killed: RSS above --mem-limit-gb {args.mem_limit_gb}"}
    for line in out.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (err.strip().splitlines() or ["no output"])[-1]
    return {"error": f"failed (exit {proc.returncode}): {tail}"}


def measure_cuda(args, case: str, device: torch.device) -> dict:
    """Run ``case`` in this process with the CUDA peak statistics reset before it."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    try:
        result = CASE_FUNCTIONS[case](args, device)
    except torch.cuda.OutOfMemoryError as exc:
        return {"error": f"CUDA out of memory: {str(exc).splitlines()[0]}"}
    result.update(peak=torch.cuda.max_memory_allocated(device), baseline=baseline)
    gc.collect()
    torch.cuda.empty_cache()
    return result


def _params(params: dict) -> str:
    return " + ".join(f"{k} {v / 1e6:.1f}M" for k, v in params.items())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve(args)
    load_configs(args)  # fail early on sizes that do not fit
    cases = [args.only] if args.only else list(CASES)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.perceptual == "random" and "vqgan" in cases:
            args.random_trunk = str(write_random_trunk(load_configs(args)[0].vqgan.perceptual_net, Path(tmp)))
        for case in cases:
            print(f"  running {case} ...", file=sys.stderr, flush=True)
            results[case] = measure_cuda(args, case, device) if device.type == "cuda" else measure_cpu(args, case)

    cuda = device.type == "cuda"
    how = ("torch.cuda.max_memory_allocated, reset per case; baseline = allocated before the case" if cuda else
           "peak RSS (VmHWM, read at the end like ru_maxrss but not inflated by the parent's RSS) of a fresh "
           "subprocess per case; baseline = its RSS after importing torch and gl_lcm")
    precision = "bf16 autocast" if (args.bf16 and cuda) else ("fp32 (--bf16 unsupported on the CPU: ignored)"
                                                             if args.bf16 else "fp32")
    print(f"## Peak memory at {args.image_size} x {args.image_size}, batch {args.batch_size}\n")
    print(f"- models: {args.vqgan_config}, {args.unet_config} (random weights; memory does not depend on them)")
    print(f"- precision: {precision}; gradient checkpointing: {'on' if args.grad_checkpointing else 'off'}; "
          f"torch threads: {args.threads or torch.get_num_threads()}")
    print(f"- measured: {how}")
    print()
    print(TABLE_HEADER)
    print("|:--|:--|--:|--:|--:|--:|")
    for case, r in results.items():
        if "error" in r:
            print(f"| {case} | – | {r['error']} | – | – | – |")
            continue
        print(f"| {case}: {r['what']} | {_params(r['params'])} | {r['peak'] / GIB:.2f} | {r['baseline'] / GIB:.2f} | "
              f"{(r['peak'] - r['baseline']) / GIB:.2f} | {r['wall_s']:.2f} |")
    print()
    print("Wall s: the inference step, or the last training step (excluding model construction). "
          "Timings on a shared machine are noisy.")
    print(machine_line(device))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
