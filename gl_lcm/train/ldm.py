"""Latent diffusion teacher training task (conditional UNet on frozen VQGAN latents).

Training pairs per image: global (condition E(CXR) -> target E(BS)) and local
(E(masked CXR) -> E(masked BS)). The condition is passed clean in training and sampling.
With ``train.latent_cache`` the frozen VQGAN encodes the training set once (written to
``<output_dir>/latent_cache.pt``) and every step trains on cached latents: no encoder
forward per step, which on CPU makes teacher training several times faster.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from gl_lcm.config import Config
from gl_lcm.data.datasets import masked, pairs_for_split
from gl_lcm.data.pairs import PairedDataset
from gl_lcm.diffusion.schedule import (add_noise, alphas_cumprod_from_betas, make_betas, offset_noise,
                                      training_condition, velocity)
from gl_lcm.models.factory import build_unet, check_latent_fits_unet, load_vqgan, update_ema
from gl_lcm.utils.checkpoint import load_checkpoint, save_checkpoint
from gl_lcm.train.loop import Trainer, TrainTask
from gl_lcm.utils import seeding
from gl_lcm.utils.dist import barrier
from gl_lcm.utils.plotting import save_grid


def psnr_batch(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of B x 1 x H x W images in [-1, 1], measured in [0, 1]: B."""
    mse = ((x - y) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return -10 * torch.log10(mse)


def diffusion_tables(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(betas, alphas_cumprod) of the configured schedule, float32 (T,)."""
    d = cfg.diffusion
    betas = make_betas(d.beta_schedule, d.num_train_timesteps, d.beta_start, d.beta_end)
    return betas, alphas_cumprod_from_betas(betas)


@torch.no_grad()
def encode_pairs(vqgan, pairs, image_size: int, device, batch_size: int = 8, progress: bool = True) -> dict:
    """Scaled latents of every pair: dict of N x C x h x w tensors cxr, bs and, with masks, masked_cxr, masked_bs."""
    data = PairedDataset(pairs, image_size, with_mask=all(p.mask is not None for p in pairs))
    out: dict[str, list[torch.Tensor]] = {}
    for start in tqdm(range(0, len(data), batch_size), desc="encode latents", disable=not progress):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        cxr = torch.stack([it["cxr"] for it in items]).to(device)
        bs = torch.stack([it["bs"] for it in items]).to(device)
        views = {"cxr": cxr, "bs": bs}
        if "mask" in items[0]:
            mask = torch.stack([it["mask"] for it in items]).to(device)
            views.update(masked_cxr=masked(cxr, mask), masked_bs=masked(bs, mask))
        for k, v in views.items():
            out.setdefault(k, []).append(vqgan.encode(v).float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


class LatentPairs(Dataset):
    """(target, condition) latent pairs for the configured paths ('global', 'local')."""

    def __init__(self, latents: dict, paths: list[str]):
        self.items: list[tuple[str, str, int]] = []
        n = len(latents["cxr"])
        if "local" in paths and "masked_cxr" not in latents:
            raise ValueError("diffusion.paths includes 'local' but no lung masks were found (data.mask_dir)")
        for i in range(n):
            if "global" in paths:
                self.items.append(("bs", "cxr", i))
            if "local" in paths:
                self.items.append(("masked_bs", "masked_cxr", i))
        self.latents = latents

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        tgt, cond, i = self.items[index]
        return {"target": self.latents[tgt][i], "cond": self.latents[cond][i]}


def latent_cache(cfg: Config, vqgan, trainer: Trainer, pairs, name: str) -> dict:
    """Latents of ``pairs``, computed once by rank 0 and cached in output_dir (keyed by VQGAN + stems)."""
    path = Path(cfg.train.output_dir) / f"latent_cache_{name}.pt"
    key = {"vqgan": str(Path(cfg.checkpoints.vqgan).resolve()), "stems": [p.stem for p in pairs],
           "image_size": cfg.data.image_size, "scale": float(vqgan.latent_scale)}
    cached = None
    if trainer.is_main:
        cached = torch.load(path, weights_only=True) if path.is_file() else None
        if cached is None or cached.get("key") != key:
            cached = {"key": key, "latents": encode_pairs(vqgan, pairs, cfg.data.image_size, trainer.device,
                                                          progress=trainer.progress)}
            save_checkpoint(cached, path)
    barrier()  # the other ranks read what rank 0 wrote
    return (cached if cached is not None else torch.load(path, weights_only=True))["latents"]


class LDMTask(TrainTask):
    name = "ldm"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def build(self, trainer: Trainer) -> None:
        cfg = self.cfg
        self.trainer = trainer
        self.vqgan = load_vqgan(cfg.checkpoints.vqgan, trainer.device)
        self.latent_channels = self.vqgan.embed_dim if hasattr(self.vqgan, "embed_dim") else cfg.vqgan.embed_dim
        self.build_networks(trainer)
        check_latent_fits_unet(cfg.data.image_size, self.vqgan, self.unet)  # before encoding the data
        train_pairs = pairs_for_split(cfg, "train", require_masks="local" in cfg.diffusion.paths)
        if cfg.train.latent_cache:
            latents = latent_cache(cfg, self.vqgan, trainer, train_pairs, "train")
        else:
            latents = encode_pairs(self.vqgan, train_pairs, cfg.data.image_size, trainer.device,
                                   progress=trainer.progress and trainer.is_main)
        self.train_set = self.make_train_set(latents, train_pairs)
        self.betas, self.alphas_cumprod = diffusion_tables(cfg)
        self.alphas_cumprod = self.alphas_cumprod.to(trainer.device)
        val_pairs = pairs_for_split(cfg, "val")[:4]
        self.val_data = PairedDataset(val_pairs, cfg.data.image_size, with_mask=False)

    def make_train_set(self, latents: dict, pairs) -> Dataset:
        """Training items from the encoded ``pairs`` (``latents``: dict of N x C x h x w tensors)."""
        return LatentPairs(latents, list(self.cfg.diffusion.paths))

    def build_networks(self, trainer: Trainer) -> None:
        """The trained UNet and its EMA copy (used for sampling)."""
        self.unet = build_unet(self.cfg.unet, self.latent_channels)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False)

    def train_dataset(self):
        return self.train_set

    def modules(self):
        return {"unet": self.unet, "ema": self.ema}

    def inference_modules(self):
        return ["ema"]

    def optimizer_groups(self):
        return {"unet": {"modules": ["unet"], "lr": self.cfg.train.lr}}

    def micro_step(self, batch, step, generator):
        d = self.cfg.diffusion
        x0, cond = batch["target"], batch["cond"]
        b = x0.shape[0]
        noise = offset_noise(x0.shape, d.offset_noise, generator=generator, device=x0.device)
        t = seeding.randint(0, d.num_train_timesteps, (b,), generator, x0.device)
        if d.cond_dropout > 0:
            keep = seeding.rand(b, generator, x0.device) >= d.cond_dropout
            cond = cond * keep.view(b, 1, 1, 1)
        x_t = add_noise(x0, noise, t, self.alphas_cumprod)
        cond = training_condition(cond, t, self.alphas_cumprod, d.train_cond_scaling)
        pred = self.trainer.net("unet")(x_t, t, cond)
        target = noise if d.prediction_type == "epsilon" else velocity(x0, noise, t, self.alphas_cumprod)
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"loss": float(loss.detach())}

    def after_optimizer_step(self, step):
        update_ema(self.ema, self.unet, self.cfg.train.ema_decay if step > 1 else 0.0)

    @torch.no_grad()
    def validate(self, step, out_dir):
        from gl_lcm.inference.settings import SamplingSettings, sample_single_path

        if len(self.val_data) == 0:
            return {}
        cxr = torch.stack([self.val_data[i]["cxr"] for i in range(len(self.val_data))]).to(self.trainer.device)
        bs = torch.stack([self.val_data[i]["bs"] for i in range(len(self.val_data))]).to(self.trainer.device)
        cond = self.vqgan.encode(cxr)
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
        z = sample_single_path(self.ema, cond, SamplingSettings.from_config(self.cfg),
                               num_steps=self.cfg.lcm.num_inference_steps, generator=gen,
                               clip_omega=self.cfg.lcm.global_omega)
        pred = self.vqgan.decode(z, requantize=self.cfg.reference.requantize).clamp(-1, 1)  # as the engine does
        to01 = lambda t: ((t[:, 0].float().cpu().numpy() + 1) / 2).clip(0, 1)
        rows = [[a, b_, c] for a, b_, c in zip(to01(cxr), to01(pred), to01(bs))]
        save_grid(out_dir / f"ldm_step_{step:08d}.png", rows, labels=["CXR", "teacher LCM", "soft tissue"])
        return {"psnr": float(psnr_batch(pred, bs).mean())}

    def extra_state(self):
        return {"latent_channels": int(self.latent_channels), "vqgan": str(self.cfg.checkpoints.vqgan)}


def train_ldm(cfg: Config, resume: str = "auto", progress: bool = True) -> dict[str, float]:
    """Train the teacher; writes <train.output_dir>/model.pt (EMA weights) and checkpoints/, logs/, samples/."""
    if not cfg.checkpoints.vqgan:
        raise ValueError("checkpoints.vqgan is empty: train the VQGAN first (gl-lcm train-vqgan) and set its model.pt")
    load_checkpoint(cfg.checkpoints.vqgan, expect_kind="vqgan")  # fail early, before any work
    return Trainer(cfg, LDMTask(cfg), resume=resume, progress=progress).fit()
