"""Tiny randomly initialised VQGAN / teacher / student checkpoints in the real checkpoint format.

They let pipeline tests exercise every stage (encode, dual-path sampling, decode, fusion) at
full resolution in seconds; quality is not the point of these models.
"""
from __future__ import annotations

from pathlib import Path

import torch

from gl_lcm.config import Config, load_config, to_dict
from gl_lcm.models.factory import build_unet, build_vqgan
from gl_lcm.utils.checkpoint import save_checkpoint

TINY_VQGAN = ["vqgan.channels=[4,4,4]", "vqgan.num_res_blocks=1", "vqgan.codebook_size=16",
              "vqgan.attn_at_bottom=false"]
TINY_UNET = ["unet.model_channels=8", "unet.channel_mult=[1,2]", "unet.num_res_blocks=1",
             "unet.attention_resolutions=[]", "unet.latent_size=16", "unet.num_heads=1"]


def tiny_config(overrides=()) -> Config:
    return load_config(None, [*TINY_VQGAN, *TINY_UNET, "device=cpu", *overrides])


def write_tiny_checkpoints(folder: Path, cfg: Config, seed: int = 0) -> dict[str, Path]:
    """vqgan.pt, teacher.pt and student.pt (random weights) in ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vqgan = build_vqgan(cfg.vqgan)
    vqgan.latent_scale.fill_(1.0)
    paths = {"vqgan": folder / "vqgan.pt", "teacher": folder / "teacher.pt", "student": folder / "student.pt"}
    save_checkpoint({"kind": "vqgan", "config": to_dict(cfg), "modules": {"vqgan": vqgan.state_dict()}, "step": 0,
                     "extra": {"latent_scale": 1.0, "latent_channels": cfg.vqgan.embed_dim}}, paths["vqgan"])
    for kind, name in (("ldm", "teacher"), ("distill", "student")):
        unet = build_unet(cfg.unet, cfg.vqgan.embed_dim)
        with torch.no_grad():  # zero-initialised layers would make the UNet output constant
            for p in unet.parameters():
                if not p.any():
                    p.normal_(0.0, 0.05)
        save_checkpoint({"kind": kind, "config": to_dict(cfg), "modules": {"ema": unet.state_dict()}, "step": 0,
                         "extra": {"latent_channels": cfg.vqgan.embed_dim}}, paths[name])
    return paths
