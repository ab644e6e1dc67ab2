"""VQGAN training task (losses and batches only; the loop is gl_lcm.train.loop) and evaluation."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gl_lcm.config import Config
from gl_lcm.data.datasets import AutoencoderImages, pairs_for_split
from gl_lcm.models.factory import build_discriminator, build_vqgan, load_vqgan
from gl_lcm.train.ldm import psnr_batch
from gl_lcm.train.loop import Trainer, TrainTask
from gl_lcm.utils import seeding
from gl_lcm.utils.atomic import atomic_write_text
from gl_lcm.utils.plotting import save_grid


def build_perceptual(cfg: Config, device: torch.device, warn: bool = True):
    """LPIPS perceptual loss (trunk from ``gl-lcm weights lpips`` or torchvision's cache), or None with ONE
    clear warning (rank 0) naming the install command when the weights are absent."""
    if cfg.vqgan.perceptual_weight <= 0:
        return None
    from gl_lcm.losses import PerceptualLoss, WeightsNotFoundError

    try:
        return PerceptualLoss(net=cfg.vqgan.perceptual_net,
                              trunk_weights_path=cfg.vqgan.perceptual_weights or None).to(device)
    except WeightsNotFoundError as exc:
        if warn:
            warnings.warn(f"perceptual loss disabled, training goes on without it: {exc}", stacklevel=2)
        return None


class VQGANTask(TrainTask):
    name = "vqgan"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def build(self, trainer: Trainer) -> None:
        from gl_lcm.losses import VQGANLoss

        cfg = self.cfg
        self.trainer = trainer
        self.vqgan = build_vqgan(cfg.vqgan)
        self.disc = build_discriminator(cfg.vqgan)
        train_pairs = pairs_for_split(cfg, "train")
        self.train_set = AutoencoderImages(train_pairs, cfg.data.image_size)
        if not self.train_set.with_mask and trainer.is_main:
            warnings.warn("no lung masks found (data.mask_dir): training on CXR and soft tissue only", stacklevel=2)
        val_pairs = pairs_for_split(cfg, "val")
        val_set = AutoencoderImages(val_pairs, cfg.data.image_size)
        # a fixed validation batch: the first images of each kind, spread over pairs
        idx = list(range(0, len(val_set), max(1, len(val_set) // 8)))[:8]
        self.val_batch = torch.stack([val_set[i]["image"] for i in idx])
        self.val_set = val_set
        self.perceptual = build_perceptual(cfg, trainer.device, warn=trainer.is_main)
        v = cfg.vqgan
        self.loss = VQGANLoss(msssim_weight=v.msssim_weight, perceptual_weight=v.perceptual_weight,
                              adversarial_weight=v.adversarial_weight,
                              adversarial_start_step=v.adversarial_start_step, perceptual=self.perceptual)

    def train_dataset(self):
        return self.train_set

    def modules(self):
        return {"vqgan": self.vqgan, "disc": self.disc}

    def inference_modules(self):
        return ["vqgan"]

    def optimizer_groups(self):
        return {"vqgan": {"modules": ["vqgan"], "lr": self.cfg.train.lr},
                "disc": {"modules": ["disc"], "lr": self.cfg.vqgan.disc_lr}}

    def micro_step(self, batch, step, generator):
        x = batch["image"]
        # dead-code restarts draw from a CPU generator derived from this step's seed (drawn on the step
        # generator's own device: on CUDA that generator lives on the GPU)
        restart_gen = torch.Generator().manual_seed(int(seeding.randint(0, 2**62, (1,), generator, "cpu")))
        recon, quant_loss, info = self.trainer.net("vqgan")(x, generator=restart_gen)
        adversarial_on = self.loss.adversarial_active(step)
        # the generator's adversarial term goes through the bare discriminator with frozen weights,
        # so its gradient reaches the generator only (never the discriminator's parameters)
        logits_fake = None
        if adversarial_on:
            self.disc.requires_grad_(False)
            logits_fake = self.disc(recon)
            self.disc.requires_grad_(True)
        total, logs = self.loss(x, recon, quant_loss, step, logits_fake=logits_fake)
        if adversarial_on:
            d_loss, d_logs = self.loss.discriminator_loss(self.trainer.net("disc"), x, recon)
            total = total + d_loss
            logs.update(d_logs)
        logs["codebook_usage"] = float(info["used_fraction"])
        logs["perplexity"] = float(info["perplexity"])
        return total, logs

    @torch.no_grad()
    def validate(self, step, out_dir):
        model = self.vqgan
        x = self.val_batch.to(self.trainer.device)
        recon = model.decode(model.encode(x)).clamp(-1, 1)
        to01 = lambda t: ((t[:, 0].float().cpu().numpy() + 1) / 2).clip(0, 1)
        rows = [[a, b, np.abs(a - b) * 4] for a, b in zip(to01(x), to01(recon))]
        save_grid(out_dir / f"recon_step_{step:08d}.png", rows, labels=["input", "reconstruction", "|diff| x4"])
        self.set_latent_scale()
        return {"psnr": float(psnr_batch(recon, x).mean()), "latent_scale": float(model.latent_scale)}

    @torch.no_grad()
    def set_latent_scale(self, max_images: int = 64) -> None:
        """latent_scale = 1 / std of the (unscaled) quantised latents of training images.

        The published MONAI VQVAE (vqgan.arch=monai_vqvae) keeps latent scale 1, as published."""
        from gl_lcm.models.vqgan import estimate_latent_scale

        if self.cfg.vqgan.arch == "monai_vqvae":
            return

        n = min(len(self.train_set), max_images)
        idx = np.linspace(0, len(self.train_set) - 1, n).round().astype(int)
        images = torch.stack([self.train_set[int(i)]["image"] for i in idx])
        batches = [images[i:i + 8].to(self.trainer.device) for i in range(0, len(images), 8)]
        self.vqgan.latent_scale.fill_(float(estimate_latent_scale(self.vqgan, batches)))

    def extra_state(self):
        return {"latent_scale": float(self.vqgan.latent_scale), "latent_channels": self.cfg.vqgan.embed_dim,
                "downsample_factor": 2 ** len(self.cfg.vqgan.channels)}


def train_vqgan(cfg: Config, resume: str = "auto", progress: bool = True) -> dict[str, float]:
    """Train the VQGAN; writes <train.output_dir>/model.pt and checkpoints/, logs/, samples/."""
    return Trainer(cfg, VQGANTask(cfg), resume=resume, progress=progress).fit()


# ---------------------------------------------------------------------------- evaluation
def _reconstruction_lpips(cfg: Config, device: torch.device):
    """(LPIPSMetric or None, note): LPIPS of the round trip when metrics.lpips is on and the AlexNet
    weights are found (``gl-lcm weights lpips``); otherwise None and why (never an error here)."""
    from gl_lcm.metrics import LPIPSMetric, LPIPSWeightsMissing

    if not cfg.metrics.lpips:
        return None, "LPIPS off (metrics.lpips=false)"
    try:
        metric = LPIPSMetric(protocol=cfg.metrics.lpips_protocol, weights_path=cfg.metrics.lpips_weights or None,
                             device=device)
    except LPIPSWeightsMissing as exc:
        return None, f"LPIPS skipped: {exc}"
    return metric, f"LPIPS AlexNet v0.1, protocol '{metric.protocol}', weights {metric.weights_path}"


def bicubic_baseline(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic down-sampling by ``factor`` and back up: the no-learning reconstruction baseline."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(h // factor, w // factor), mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def evaluate_vqgan(cfg: Config, checkpoint: Optional[str] = None, split: Optional[str] = None,
                   out_dir: Optional[str] = None, progress: bool = True, batch_size: int = 8) -> dict[str, Any]:
    """Reconstruct a split (CXR and BS images): PSNR, MS-SSIM, LPIPS (mean ± std; LPIPS when its AlexNet
    weights are installed and metrics.lpips is on, with metrics.lpips_protocol), codebook usage, bicubic baseline."""
    from gl_lcm.data.io import write_png
    from gl_lcm.losses import ms_ssim
    from gl_lcm.utils.dist import resolve_device

    checkpoint = checkpoint or cfg.checkpoints.vqgan
    if not checkpoint:
        raise ValueError("no VQGAN checkpoint given: pass --checkpoint or set checkpoints.vqgan")
    device = resolve_device(cfg.device)
    model = load_vqgan(checkpoint, device)
    factor = 2 ** model.num_downsamplings
    pairs = pairs_for_split(cfg, split or "test")
    data = AutoencoderImages(pairs, cfg.data.image_size)
    out = Path(out_dir) if out_dir else Path(checkpoint).parent / "eval"
    rows = []
    model_codebook_size = int(getattr(model, "codebook_size", 0) or model.quantizer.codebook_size)
    counts = torch.zeros(model_codebook_size, dtype=torch.long)
    lpips_metric, lpips_note = _reconstruction_lpips(cfg, device)
    for start in tqdm(range(0, len(data), batch_size), desc="eval-vqgan", disable=not progress):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        x = torch.stack([it["image"] for it in items]).to(device)
        recon, _, info = model(x)
        recon = recon.clamp(-1, 1)
        counts += torch.bincount(info["indices"].flatten().cpu(), minlength=model_codebook_size)
        base = bicubic_baseline(x, factor)
        p, pb = psnr_batch(recon, x), psnr_batch(base, x)
        s = ms_ssim(recon, x, reduction="none")
        for it, xi, r, pi, pbi, si in zip(items, x, recon, p, pb, s):
            r01 = ((r[0].float().cpu().numpy() + 1) / 2).clip(0, 1)
            write_png(out / it["kind"] / f"{it['stem']}.png", r01)
            rows.append({"stem": it["stem"], "kind": it["kind"], "psnr": float(pi), "ms_ssim": float(si),
                         "psnr_bicubic": float(pbi)})
            if lpips_metric is not None:
                rows[-1]["lpips"] = lpips_metric(((xi[0].float().cpu().numpy() + 1) / 2).clip(0, 1), r01)
    probs = counts.double() / counts.sum().clamp_min(1)
    nz = probs[probs > 0]
    summary = {
        "checkpoint": str(checkpoint), "images": len(rows),
        "psnr_mean": float(np.mean([r["psnr"] for r in rows])), "psnr_std": float(np.std([r["psnr"] for r in rows])),
        "ms_ssim_mean": float(np.mean([r["ms_ssim"] for r in rows])),
        "ms_ssim_std": float(np.std([r["ms_ssim"] for r in rows])),
        "bicubic_psnr_mean": float(np.mean([r["psnr_bicubic"] for r in rows])),
        "bicubic_psnr_std": float(np.std([r["psnr_bicubic"] for r in rows])),
        "codebook_usage": float((counts > 0).double().mean()),
        "perplexity": float(torch.exp(-(nz * nz.log()).sum())),
        "lpips_protocol": lpips_metric.protocol if lpips_metric is not None else None,
        "lpips_note": lpips_note,
    }
    if lpips_metric is not None:
        summary["lpips_mean"] = float(np.mean([r["lpips"] for r in rows]))
        summary["lpips_std"] = float(np.std([r["lpips"] for r in rows]))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    with_lpips = lpips_metric is not None
    header = "stem,kind,psnr,ms_ssim,psnr_bicubic" + (",lpips" if with_lpips else "") + "\n"
    atomic_write_text(out / "per_image.csv", header + "".join(
        f"{r['stem']},{r['kind']},{r['psnr']:.4f},{r['ms_ssim']:.5f},{r['psnr_bicubic']:.4f}"
        + (f",{r['lpips']:.5f}" if with_lpips else "") + "\n" for r in rows))
    lpips_text = (f"LPIPS ({lpips_metric.protocol}) {summary['lpips_mean']:.4f} ± {summary['lpips_std']:.4f}, "
                  if with_lpips else "")
    print(f"VQGAN reconstruction on {len(rows)} images: PSNR {summary['psnr_mean']:.2f} ± {summary['psnr_std']:.2f} dB "
          f"(bicubic x{factor} baseline {summary['bicubic_psnr_mean']:.2f} ± {summary['bicubic_psnr_std']:.2f} dB), "
          f"MS-SSIM {summary['ms_ssim_mean']:.4f} ± {summary['ms_ssim_std']:.4f}, {lpips_text}"
          f"codebook usage {100 * summary['codebook_usage']:.1f} %, perplexity {summary['perplexity']:.1f} -> {out}")
    if not with_lpips:
        print(lpips_note)
    return summary
