"""Build models from config sections and load them from checkpoints.

Models take explicit constructor arguments and never read configs; this module is the
only place that maps config keys to constructor arguments.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gl_lcm.config import Config, SegmentationConfig, UNetConfig, VQGANConfig, config_from_checkpoint


def build_vqgan(c: VQGANConfig) -> nn.Module:
    """Our VQGAN (vqgan.arch=ours) or the published MONAI VQVAE (vqgan.arch=monai_vqvae)."""
    if c.arch == "monai_vqvae":
        from gl_lcm.models.published_vqvae import PublishedVQVAE

        return PublishedVQVAE(in_channels=1, channels=tuple(c.channels), res_channels=c.res_channels,
                              num_res_layers=c.num_res_blocks, embed_dim=c.embed_dim, codebook_size=c.codebook_size,
                              beta=c.beta, ema_decay=c.ema_decay)
    from gl_lcm.models.vqgan import VQGAN

    return VQGAN(in_channels=1, channels=tuple(c.channels), num_res_blocks=c.num_res_blocks, embed_dim=c.embed_dim,
                 codebook_size=c.codebook_size, attn_at_bottom=c.attn_at_bottom, beta=c.beta, use_ema=c.use_ema,
                 ema_decay=c.ema_decay, dead_code_threshold_steps=c.dead_code_steps,
                 gradient_checkpointing=c.gradient_checkpointing)


def build_discriminator(c: VQGANConfig) -> nn.Module:
    from gl_lcm.models.discriminator import PatchDiscriminator

    return PatchDiscriminator(in_channels=1, base_channels=c.disc_channels, n_layers=c.disc_layers)


def build_unet(c: UNetConfig, latent_channels: int) -> nn.Module:
    from gl_lcm.models.unet import UNet

    attn = [c.latent_size // r for r in c.attention_resolutions]  # downsample factors
    return UNet(in_channels=2 * latent_channels, out_channels=latent_channels, model_channels=c.model_channels,
                channel_mult=tuple(c.channel_mult), num_res_blocks=c.num_res_blocks,
                attention_downsample_factors=tuple(attn), num_heads=c.num_heads,
                num_head_channels=c.num_head_channels or None, dropout=c.dropout,
                use_scale_shift_norm=c.use_scale_shift_norm, resblock_updown=c.resblock_updown,
                gradient_checkpointing=c.gradient_checkpointing)


def build_segnet(c: SegmentationConfig) -> nn.Module:
    from gl_lcm.models.segnet import LungSegNet

    return LungSegNet(in_channels=1, out_channels=len(c.outputs), base_channels=c.base_channels, depth=c.depth,
                      normalize_input=c.normalize_input)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _load(path: str | Path, kind: str, device: Any) -> tuple[dict, Config]:
    from gl_lcm.utils.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, map_location="cpu", expect_kind=kind)
    return ckpt, config_from_checkpoint(ckpt["config"])


def _load_state(module: nn.Module, state: dict, path: str | Path, name: str) -> nn.Module:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: '{name}' weights do not fit the architecture in the checkpoint's config: "
                         f"{str(exc).splitlines()[0]}") from None
    return module


def load_vqgan(path: str | Path, device: Any = "cpu") -> nn.Module:
    """Frozen VQGAN (eval mode, latent scale inside) from a 'vqgan' checkpoint."""
    ckpt, cfg = _load(path, "vqgan", device)
    model = _load_state(build_vqgan(cfg.vqgan), ckpt["modules"]["vqgan"], path, "vqgan")
    return model.to(device).eval().requires_grad_(False)


def load_denoiser(path: str | Path, device: Any = "cpu") -> tuple[nn.Module, Config]:
    """The sampling UNet of a teacher ('ldm', EMA weights), student ('distill') or plain supervised baseline
    ('supervised') checkpoint, with its config."""
    from gl_lcm.utils.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt["kind"] not in ("ldm", "distill", "supervised"):
        raise ValueError(f"{path} holds a '{ckpt['kind']}' model, but a teacher ('ldm'), student ('distill') or "
                         f"baseline ('supervised') checkpoint is needed")
    cfg = config_from_checkpoint(ckpt["config"])
    latent_channels = int(ckpt["extra"]["latent_channels"])
    name = "ema" if "ema" in ckpt["modules"] else ("student" if "student" in ckpt["modules"] else "unet")
    model = _load_state(build_unet(cfg.unet, latent_channels), ckpt["modules"][name], path, name)
    return model.to(device).eval().requires_grad_(False), cfg


def load_segnet(path: str | Path, device: Any = "cpu") -> tuple[nn.Module, Config]:
    ckpt, cfg = _load(path, "segnet", device)
    name = "ema" if "ema" in ckpt["modules"] else "segnet"
    model = _load_state(build_segnet(cfg.segmentation), ckpt["modules"][name], path, name)
    return model.to(device).eval().requires_grad_(False), cfg


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def check_latent_fits_unet(image_size: int, vqgan: nn.Module, unet: nn.Module) -> None:
    """Fail before any work when the VQGAN's latent of a ``image_size`` image cannot pass the UNet's
    downsamplings (its side must be divisible by 2^(len(unet.channel_mult) - 1))."""
    latent = image_size // 2 ** vqgan.num_downsamplings
    factor = 2 ** unet.num_downsamplings
    if image_size % 2 ** vqgan.num_downsamplings or latent % factor:
        raise ValueError(f"data.image_size={image_size} gives a {image_size / 2 ** vqgan.num_downsamplings:g}-pixel "
                         f"latent (VQGAN: {vqgan.num_downsamplings} downsamplings), which the UNet's "
                         f"{unet.num_downsamplings} downsamplings (unet.channel_mult) cannot divide: use a "
                         f"data.image_size divisible by {2 ** vqgan.num_downsamplings * factor}")
