"""One-channel VQGAN (taming-transformers style) mapping CXR images to a small latent grid.

Mapping of the published GL-LCM VQGAN (MONAI ``VQVAE`` in ``model.py``) to these arguments:

============================================  ==========================================
published (MONAI VQVAE)                       here
============================================  ==========================================
num_channels=(128, 256, 512)                  ``channels=(128, 256, 512)``: width per level
downsample_parameters: 3 x (stride 2, k 4)    ``len(channels)`` = 3 downsamplings (1024 -> 128)
num_res_layers=2                              ``num_res_blocks=2`` per level (enc. and dec.)
num_res_channels=512                          the bottom level width (512); the ResBlocks here
                                              are taming-style (GroupNorm, SiLU) at the level
                                              width, not MONAI's bottleneck units
embedding_dim=4                               ``embed_dim=4`` (latent channels)
num_embeddings=1024                           ``codebook_size=1024``
(VQVAE defaults) commitment_cost=0.25,        ``beta=0.25``, ``use_ema=True``,
EMA decay=0.5                                 ``ema_decay=0.99`` (ours)
============================================  ==========================================

so the paper setting turns a 1 x 1024 x 1024 image into a 4 x 128 x 128 latent. This is a
different network from the published one (53.8 M vs 38.3 M parameters) and cannot load its
weights; the published network itself is ``vqgan.arch=monai_vqvae``
(``gl_lcm.models.published_vqvae``). Additions
over the published model (taming style): GroupNorm, an attention block at the bottom
(``attn_at_bottom``) and dead-code restart.

Levels: encoder level ``i`` runs ``num_res_blocks`` ResBlocks at ``channels[i]`` width and
then halves the resolution with a strided conv, so there are ``len(channels)``
downsamplings; the decoder mirrors it (conv upsample, then ResBlocks).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gl_lcm.models.layers import AttentionBlock, Downsample, ResBlock, Upsample, group_norm
from gl_lcm.utils import seeding


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def codebook_usage(counts: torch.Tensor) -> tuple[float, float]:
    """Fraction of codes used and perplexity from per-code assignment counts.

    Args:
        counts: (K,) non-negative counts of how often each code was chosen.

    Returns:
        (used_fraction in [0, 1], perplexity in [1, K]); perplexity = exp(entropy of the
        empirical code distribution), K when all codes are used equally, 1 for a single code.
        (0.0, 0.0) when counts are all zero.
    """
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        return 0.0, 0.0
    p = counts / total
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()  # 0 log 0 = 0
    return float((counts > 0).double().mean()), float(torch.exp(entropy))


class CodebookUsageMeter:
    """Accumulates code assignment counts over many batches (evaluation of codebook usage).

    ``update(indices)`` with any integer tensor of code indices in [0, K); ``compute()`` gives
    ``{"used_fraction", "perplexity", "num_used"}`` over everything seen since ``reset()``.
    """

    def __init__(self, codebook_size: int):
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.float64)

    def reset(self) -> None:
        self.counts.zero_()

    def update(self, indices: torch.Tensor) -> None:
        self.counts += torch.bincount(indices.reshape(-1).cpu(), minlength=self.codebook_size).double()

    def compute(self) -> dict[str, float]:
        used_fraction, perplexity = codebook_usage(self.counts)
        return {"used_fraction": used_fraction, "perplexity": perplexity, "num_used": int((self.counts > 0).sum())}


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantiser with straight-through gradients.

    Args:
        codebook_size: K codes.
        embed_dim: D, code width (= latent channels).
        beta: weight of the commitment term ``mean((z_e - sg(e))**2)``.
        use_ema: update codes by exponential moving averages of their assigned encoder outputs
            (VQ-VAE-2 / Sonnet); the codebook term ``mean((sg(z_e) - e)**2)`` is then dropped.
            Without EMA the codebook is a trained parameter and the loss is
            ``codebook + beta * commitment``.
        ema_decay: EMA decay.
        ema_eps: Laplace smoothing of EMA cluster sizes.
        dead_code_threshold_steps: a code not chosen in this many consecutive training steps
            is replaced by a random encoder output of the current batch; None or 0 disables.
        seed: seed of the internal generator that picks restart vectors (a generator can also
            be passed to ``forward``).

    Under torch.distributed (initialised, world size > 1) the per-code counts and sums are
    all-reduced before the EMA / dead-code bookkeeping and restart vectors are broadcast from
    rank 0, so every rank keeps an identical codebook.
    """

    def __init__(
        self,
        codebook_size: int = 1024,
        embed_dim: int = 4,
        beta: float = 0.25,
        use_ema: bool = True,
        ema_decay: float = 0.99,
        ema_eps: float = 1e-5,
        dead_code_threshold_steps: int | None = 100,
        seed: int = 0,
    ):
        super().__init__()
        self.codebook_size, self.embed_dim = codebook_size, embed_dim
        self.beta, self.use_ema = beta, use_ema
        self.ema_decay, self.ema_eps = ema_decay, ema_eps
        self.dead_code_threshold_steps = dead_code_threshold_steps or 0
        init = torch.empty(codebook_size, embed_dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.codebook = nn.Parameter(init, requires_grad=not use_ema)
        if use_ema:
            # cluster sizes start at 1 with sums = codes, so unused codes stay put instead of
            # being divided by ~0 (the classic EMA blow-up)
            self.register_buffer("ema_cluster_size", torch.ones(codebook_size))
            self.register_buffer("ema_embed_sum", init.clone())
        self.register_buffer("steps_since_used", torch.zeros(codebook_size, dtype=torch.long))
        self._generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def reset_codebook(self, codes: torch.Tensor) -> None:
        """Replace all codes (K x D) and restart their EMA statistics and usage counters."""
        if codes.shape != self.codebook.shape:
            raise ValueError(f"codes must have shape {tuple(self.codebook.shape)}, got {tuple(codes.shape)}")
        self.codebook.data.copy_(codes)
        if self.use_ema:
            self.ema_embed_sum.copy_(codes)
            self.ema_cluster_size.fill_(1.0)
        self.steps_since_used.zero_()

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for integer indices: (...) -> (..., D)."""
        return F.embedding(indices, self.codebook)

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean) for each row of N x D -> (N,)."""
        e = self.codebook.float()
        d = z_flat.pow(2).sum(1, keepdim=True) - 2 * z_flat @ e.t() + e.pow(2).sum(1)[None]
        return d.argmin(dim=1)

    def forward(
        self,
        z: torch.Tensor,
        update: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Quantise encoder outputs.

        Args:
            z: B x D x h x w encoder outputs (any float dtype; quantised in float32).
            update: run EMA / dead-code bookkeeping; defaults to ``self.training``.
            generator: CPU generator for restart vectors (defaults to the internal one).

        Returns:
            z_q: B x D x h x w quantised latents with straight-through gradient to ``z``;
            loss: scalar quantisation loss (see class doc);
            info: ``indices`` (B x h x w long), ``used_fraction`` and ``perplexity`` of the
                batch (floats, this rank's batch), ``commitment`` (detached float).
        """
        b, d, h, w = z.shape
        if d != self.embed_dim:
            raise ValueError(f"expected {self.embed_dim} latent channels, got {d}")
        update = self.training if update is None else update
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32 = z.float()
            z_flat = z32.permute(0, 2, 3, 1).reshape(-1, d)
            with torch.no_grad():
                indices = self.nearest(z_flat)
            z_q_flat = self.lookup(indices).float()
            commitment = F.mse_loss(z_flat, z_q_flat.detach())
            loss = self.beta * commitment
            if not self.use_ema:
                loss = loss + F.mse_loss(z_q_flat, z_flat.detach())
            counts = torch.bincount(indices, minlength=self.codebook_size).float()
            used_fraction, perplexity = codebook_usage(counts)
            if update:
                self._update_codebook(z_flat.detach(), indices, counts, generator)
            z_q = z_q_flat.reshape(b, h, w, d).permute(0, 3, 1, 2)
            z_q = z32 + (z_q - z32).detach()  # straight-through estimator
        info = {
            "indices": indices.reshape(b, h, w),
            "used_fraction": used_fraction,
            "perplexity": perplexity,
            "commitment": float(commitment.detach()),
        }
        return z_q.to(z.dtype), loss, info

    @torch.no_grad()
    def _update_codebook(
        self,
        z_flat: torch.Tensor,
        indices: torch.Tensor,
        counts: torch.Tensor,
        generator: torch.Generator | None,
    ) -> None:
        counts = counts.clone()
        if self.use_ema:
            sums = torch.zeros(self.codebook_size, self.embed_dim, device=z_flat.device)
            sums.index_add_(0, indices, z_flat)
            if _distributed():
                dist.all_reduce(counts)
                dist.all_reduce(sums)
            decay = self.ema_decay
            self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
            self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
            n = self.ema_cluster_size.sum()
            smoothed = (self.ema_cluster_size + self.ema_eps) / (n + self.codebook_size * self.ema_eps) * n
            self.codebook.data.copy_(self.ema_embed_sum / smoothed[:, None])
        elif _distributed():
            dist.all_reduce(counts)

        self.steps_since_used.add_(1).masked_fill_(counts > 0, 0)
        if self.dead_code_threshold_steps <= 0:
            return
        dead = (self.steps_since_used >= self.dead_code_threshold_steps).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        gen = generator if generator is not None else self._generator
        pick = seeding.randint(0, z_flat.shape[0], (dead.numel(),), gen, z_flat.device)
        new_codes = z_flat[pick].contiguous()
        if _distributed():
            dist.broadcast(new_codes, src=0)
        self.codebook.data[dead] = new_codes.to(self.codebook.dtype)
        if self.use_ema:
            self.ema_embed_sum[dead] = new_codes
            self.ema_cluster_size[dead] = 1.0
        self.steps_since_used[dead] = 0


class _Encoder(nn.Module):
    def __init__(self, in_channels, channels, num_res_blocks, out_channels, attn_at_bottom, ckpt):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.levels = nn.ModuleList()
        prev = channels[0]
        for ch in channels:
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(prev, ch, use_checkpoint=ckpt))
                prev = ch
            self.levels.append(nn.ModuleDict({"blocks": nn.ModuleList(blocks), "down": Downsample(ch)}))
        mid = [ResBlock(prev, use_checkpoint=ckpt)]
        if attn_at_bottom:
            mid.append(AttentionBlock(prev, num_heads=1, use_checkpoint=ckpt))
        mid.append(ResBlock(prev, use_checkpoint=ckpt))
        self.mid = nn.Sequential(*mid)
        self.norm_out = group_norm(prev)
        self.conv_out = nn.Conv2d(prev, out_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.levels:
            for block in level["blocks"]:
                h = block(h)
            h = level["down"](h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Decoder(nn.Module):
    def __init__(self, in_channels, channels, num_res_blocks, out_channels, attn_at_bottom, ckpt):
        super().__init__()
        prev = channels[-1]
        self.conv_in = nn.Conv2d(in_channels, prev, 3, padding=1)
        mid = [ResBlock(prev, use_checkpoint=ckpt)]
        if attn_at_bottom:
            mid.append(AttentionBlock(prev, num_heads=1, use_checkpoint=ckpt))
        mid.append(ResBlock(prev, use_checkpoint=ckpt))
        self.mid = nn.Sequential(*mid)
        self.levels = nn.ModuleList()
        for ch in reversed(channels):
            up = Upsample(prev)
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(prev, ch, use_checkpoint=ckpt))
                prev = ch
            self.levels.append(nn.ModuleDict({"up": up, "blocks": nn.ModuleList(blocks)}))
        self.norm_out = group_norm(prev)
        self.conv_out = nn.Conv2d(prev, out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level["up"](h)
            for block in level["blocks"]:
                h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LatentGeometry:
    """Latent geometry shared by the autoencoders: one 2x downsampling per entry of ``self.channels``,
    ``self.embed_dim`` latent channels."""

    channels: tuple
    embed_dim: int

    @property
    def num_downsamplings(self) -> int:
        """Number of 2x downsamplings (= len(channels))."""
        return len(self.channels)

    def latent_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
        """(embed_dim, H / 2^n, W / 2^n) for an image of side ``image_size`` or (H, W)."""
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        f = 2**self.num_downsamplings
        if any(s % f for s in hw):
            raise ValueError(f"image size {hw} must be divisible by {f}")
        return (self.embed_dim, hw[0] // f, hw[1] // f)


class VQGAN(LatentGeometry, nn.Module):
    """Encoder -> vector quantiser -> decoder for 1-channel images in [-1, 1].

    Args:
        in_channels: image channels (1).
        channels: width per level; ``len(channels)`` 2x downsamplings.
        num_res_blocks: ResBlocks per level.
        embed_dim: latent channels = code width.
        codebook_size: number of codes.
        attn_at_bottom: self-attention in the bottom (middle) blocks of encoder and decoder.
        beta, use_ema, ema_decay, dead_code_threshold_steps: see ``VectorQuantizer``.
        gradient_checkpointing: recompute ResBlock/attention activations in backward.
        seed: seed for the quantiser's restart generator.

    ``latent_scale`` (buffer, saved in the state dict, default 1.0) multiplies the quantised
    latent in ``encode`` and divides it in ``decode``; set it to
    ``estimate_latent_scale(model, batches)`` after training the VQGAN.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (128, 256, 512),
        num_res_blocks: int = 2,
        embed_dim: int = 4,
        codebook_size: int = 1024,
        attn_at_bottom: bool = True,
        beta: float = 0.25,
        use_ema: bool = True,
        ema_decay: float = 0.99,
        dead_code_threshold_steps: int | None = 100,
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        if len(channels) < 1:
            raise ValueError("channels needs at least one level")
        self.in_channels, self.embed_dim = in_channels, embed_dim
        self.channels = tuple(channels)
        ckpt = gradient_checkpointing
        self.encoder = _Encoder(in_channels, self.channels, num_res_blocks, embed_dim, attn_at_bottom, ckpt)
        self.quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        self.quantizer = VectorQuantizer(
            codebook_size, embed_dim, beta, use_ema, ema_decay,
            dead_code_threshold_steps=dead_code_threshold_steps, seed=seed,
        )
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        self.decoder = _Decoder(embed_dim, self.channels, num_res_blocks, in_channels, attn_at_bottom, ckpt)
        self.register_buffer("latent_scale", torch.tensor(1.0))


    def _check_image(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected B x {self.in_channels} x H x W images, got {tuple(x.shape)}")
        self.latent_shape(tuple(x.shape[-2:]))

    def encode_pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous encoder output before quantisation: B x 1 x H x W -> B x D x h x w."""
        self._check_image(x)
        return self.quant_conv(self.encoder(x))

    def encode_unscaled(self, x: torch.Tensor) -> torch.Tensor:
        """Quantised latent without scale: B x 1 x H x W in [-1, 1] -> B x D x H/2^n x W/2^n.

        Never updates the codebook (EMA / dead-code bookkeeping runs only in ``forward``).
        """
        z_q, _, _ = self.quantizer(self.encode_pre_quant(x), update=False)
        return z_q

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Quantised latent multiplied by ``latent_scale``: B x 1 x H x W in [-1, 1] -> B x D x h x w."""
        return self.encode_unscaled(x) * self.latent_scale

    def decode_unscaled(self, z: torch.Tensor, requantize: bool = True) -> torch.Tensor:
        """Image from an unscaled latent: B x D x h x w -> B x 1 x h*2^n x w*2^n (about [-1, 1]).

        ``requantize`` snaps ``z`` to the nearest codes first (ours); pass False to decode ``z``
        as given, which is what the published evaluation does with sampled latents
        (``VQGAN.decode(sample[:, :4])``, no quantiser; ``reference.requantize=false``).
        """
        if requantize:
            z, _, _ = self.quantizer(z, update=False)
        return self.decoder(self.post_quant_conv(z))

    def decode(self, latent: torch.Tensor, requantize: bool = True) -> torch.Tensor:
        """Image from a scaled latent (``encode`` output or diffusion sample): see ``decode_unscaled``."""
        return self.decode_unscaled(latent / self.latent_scale, requantize=requantize)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Reconstruct images (training / evaluation of the autoencoder itself).

        Args:
            x: B x 1 x H x W in [-1, 1], H and W divisible by 2^num_downsamplings.
            generator: optional CPU generator for dead-code restarts.

        Returns:
            (reconstruction B x 1 x H x W, quantisation loss scalar, info dict with
            ``indices`` B x h x w, ``used_fraction``, ``perplexity``, ``commitment``).
            In training mode the codebook EMA / dead-code bookkeeping runs.
        """
        z_q, quant_loss, info = self.quantizer(self.encode_pre_quant(x), generator=generator)
        return self.decoder(self.post_quant_conv(z_q)), quant_loss, info


@torch.no_grad()
def estimate_latent_scale(model: VQGAN, batches: Iterable[torch.Tensor]) -> float:
    """1 / std of the unscaled quantised latents over all elements of all ``batches``.

    Args:
        model: a trained VQGAN (its mode is left unchanged; the codebook is not updated).
        batches: iterable of B x 1 x H x W image tensors in [-1, 1] (moved to the model's device).

    Returns:
        the scale to store in ``model.latent_scale`` so encoded latents have unit variance.
    """
    device = model.latent_scale.device
    total = total_sq = 0.0
    count = 0
    for x in batches:
        z = model.encode_unscaled(x.to(device)).double()
        total += float(z.sum())
        total_sq += float(z.pow(2).sum())
        count += z.numel()
    if count < 2:
        raise ValueError("estimate_latent_scale needs at least two latent elements")
    var = (total_sq - total * total / count) / (count - 1)
    if var <= 0:
        raise ValueError("quantised latents have zero variance; cannot estimate a scale")
    return float(var**-0.5)
