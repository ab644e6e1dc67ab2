"""The published GL-LCM autoencoder (MONAI ``VQVAE``) behind this project's VQGAN interface.

The published code (github.com/diaoquesang/GL-LCM, ``codes/model.py``) builds MONAI Generative
0.2.2's ``VQVAE`` with channels (128, 256, 512), 512 residual channels, 2 residual layers,
4 x 4 stride-2 convolutions down and transposed convolutions up, ReLU, no normalisation, and
an EMA quantiser with 1024 codes of dimension 4 (VQVAE's defaults: decay 0.5, commitment 0.25,
epsilon 1e-5); 38.3 M parameters. Its latents are used unscaled.

MONAI >= 1.4 ships the same class as ``monai.networks.nets.VQVAE``: its state-dict keys are
identical to MONAI Generative 0.2.2's and it computes the same outputs (checked with equal
weights: encode, decode and forward agree bit for bit; only the constructor argument
``num_channels`` is spelt ``channels``). So this module depends on MONAI instead of re-writing
the network, and keeps the published state-dict key layout (``encoder.*``, ``quantizer.quantizer.*``,
``decoder.*``), so published weights load without renaming.

Interface (same as ``gl_lcm.models.vqgan.VQGAN``): ``encode`` / ``decode`` on scaled latents
(scale fixed at 1, a non-persistent buffer), ``encode_unscaled`` / ``decode_unscaled``,
``forward`` -> (reconstruction, quantisation loss, info) for training.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from gl_lcm.models.vqgan import LatentGeometry


class PublishedVQVAE(LatentGeometry, nn.Module):
    """MONAI VQVAE (published GL-LCM autoencoder) for 1-channel images in [-1, 1].

    Args:
        in_channels: image channels (1).
        channels: width per level; one stride-2 4 x 4 convolution per entry.
        res_channels: width inside the residual units (MONAI ``num_res_channels``).
        num_res_layers: residual units per level.
        embed_dim: latent channels = code width.
        codebook_size: number of codes.
        beta: commitment cost of the EMA quantiser.
        ema_decay: EMA decay of the codebook statistics (published 0.5).
        epsilon: Laplace smoothing of the EMA cluster sizes (MONAI default 1e-5).
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (128, 256, 512), res_channels: int = 512,
                 num_res_layers: int = 2, embed_dim: int = 4, codebook_size: int = 1024, beta: float = 0.25,
                 ema_decay: float = 0.5, epsilon: float = 1e-5):
        super().__init__()
        from monai.networks.nets import VQVAE

        n = len(channels)
        net = VQVAE(spatial_dims=2, in_channels=in_channels, out_channels=in_channels, channels=tuple(channels),
                    num_res_channels=res_channels, num_res_layers=num_res_layers,
                    downsample_parameters=((2, 4, 1, 1),) * n, upsample_parameters=((2, 4, 1, 1, 0),) * n,
                    num_embeddings=codebook_size, embedding_dim=embed_dim, commitment_cost=beta, decay=ema_decay,
                    epsilon=epsilon)
        # the published key layout: encoder.*, quantizer.quantizer.*, decoder.*
        self.encoder, self.quantizer, self.decoder = net.encoder, net.quantizer, net.decoder
        self.in_channels, self.embed_dim, self.codebook_size = in_channels, embed_dim, codebook_size
        self.channels = tuple(channels)
        self.register_buffer("latent_scale", torch.tensor(1.0), persistent=False)


    def _snap(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes without touching the EMA statistics: (z + (q - z), indices B x h x w).

        ``z + (q - z)`` is the value MONAI's quantiser returns (straight-through form), kept so
        encodings equal the published ``encode_stage_2_inputs`` to the last bit.
        """
        _, _, idx = self.quantizer.quantizer.quantize(z)
        q = self.quantizer.quantizer.embed(idx)
        return z + (q - z), idx

    def encode_pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output before quantisation: B x 1 x H x W -> B x D x h x w."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected B x {self.in_channels} x H x W images, got {tuple(x.shape)}")
        self.latent_shape(tuple(x.shape[-2:]))
        return self.encoder(x)

    def encode_unscaled(self, x: torch.Tensor) -> torch.Tensor:
        """Quantised latent (published ``encode_stage_2_inputs``): B x 1 x H x W in [-1, 1] -> B x D x h x w."""
        return self._snap(self.encode_pre_quant(x))[0]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Same as ``encode_unscaled`` (latent scale 1, as published)."""
        return self.encode_unscaled(x)

    def decode_unscaled(self, z: torch.Tensor, requantize: bool = True) -> torch.Tensor:
        """Image from a latent: B x D x h x w -> B x 1 x H x W (about [-1, 1]).

        ``requantize`` snaps ``z`` to the nearest codes first (ours); the published evaluation
        decodes sampled latents as they are (``VQGAN.decode(sample[:, :4])``), i.e. False.
        """
        if requantize:
            z = self._snap(z)[0]
        return self.decoder(z)

    def decode(self, latent: torch.Tensor, requantize: bool = True) -> torch.Tensor:
        """Same as ``decode_unscaled`` (latent scale 1)."""
        return self.decode_unscaled(latent, requantize=requantize)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Reconstruct (training): (B x 1 x H x W, quantisation loss, info with indices, used_fraction, perplexity).

        In training mode MONAI's EMA codebook update runs. ``generator`` is accepted for
        interface parity and unused (MONAI's quantiser has no dead-code restart).
        """
        z_q, loss, idx = self.quantizer.quantizer(self.encode_pre_quant(x))
        counts = torch.bincount(idx.flatten(), minlength=self.codebook_size).float()
        p = counts / counts.sum()
        info = {"indices": idx, "used_fraction": (counts > 0).float().mean(),
                "perplexity": torch.exp(-(p * torch.log(p + 1e-10)).sum()), "commitment": loss.detach()}
        return self.decoder(z_q), loss, info
