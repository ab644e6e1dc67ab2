"""ADM-style (guided-diffusion) conditional UNet noise estimator for VQGAN latents.

The condition latent (whole CXR for the global path, lung-masked CXR for the local path) is
concatenated to the noisy latent on the channel axis: ``in_channels = latent + condition``.

Attention placement convention: ``attention_downsample_factors`` lists the total
downsampling factors ``ds`` (relative to the input latent) at which self-attention follows
the ResBlocks, exactly as guided-diffusion's ``UNetModel(attention_resolutions=...)``
interprets its argument. Level ``i`` runs at ``ds = 2**i``. For the paper's 128 x 128
latent and six levels, factors (8, 16, 32) put attention at 16x16, 8x8 and 4x4 feature maps
(the middle block always has attention). The published GL-LCM code passes
``attention_resolutions=(64, 32, 16, 8)`` straight to ``UNetModel``; with six levels the
factor 64 is never reached, so its effective setting is (8, 16, 32). Here an unreachable
factor raises ValueError instead of being silently ignored.

Paper configuration (published ``model.py``): model_channels=128, channel_mult=(1,1,2,2,4,4),
num_res_blocks=8, num_heads=8 (num_head_channels=-1, i.e. 8 heads at every width),
resblock_updown=True, use_scale_shift_norm=True, use_new_attention_order=True. This gives
~383.2M parameters (the published model has out_channels=8 and uses only the first 4
output channels; here out_channels=4, ~4.6k parameters fewer).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from gl_lcm.models.layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    group_norm,
    timestep_embedding,
    zero_module,
)


class _EmbedSequential(nn.Sequential):
    """Sequential that passes the timestep embedding to the ResBlocks it contains."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """Conditional ADM UNet predicting noise (or any B x out x h x w target) from [x_t, cond].

    Args:
        in_channels: channels of ``cat([x_t, cond])`` (8 = 4 latent + 4 condition).
        out_channels: predicted channels (4).
        model_channels: base width; level ``i`` has ``model_channels * channel_mult[i]``.
        channel_mult: width multiplier per level; ``len - 1`` downsamplings.
        num_res_blocks: ResBlocks per level in the encoder (decoder uses one more).
        attention_downsample_factors: downsampling factors ``ds`` with attention (see module doc).
        num_heads: attention heads (used when num_head_channels is None).
        num_head_channels: if set, heads = width / num_head_channels at every attention block.
        dropout: dropout in ResBlocks.
        use_scale_shift_norm: ADM scale-shift timestep conditioning.
        resblock_updown: resample with ResBlocks (ADM) instead of plain conv up/down.
        gradient_checkpointing: recompute ResBlock/attention activations in backward.

    The latent side must be divisible by ``2 ** (len(channel_mult) - 1)``.
    """

    def __init__(
        self,
        in_channels: int = 8,
        out_channels: int = 4,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4, 4),
        num_res_blocks: int = 8,
        attention_downsample_factors: Sequence[int] = (8, 16, 32),
        num_heads: int = 8,
        num_head_channels: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = True,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        reachable = {2**i for i in range(len(channel_mult))}
        unreachable = sorted(set(attention_downsample_factors) - reachable)
        if unreachable:
            raise ValueError(
                f"attention_downsample_factors {unreachable} not reachable with {len(channel_mult)} levels "
                f"(possible: {sorted(reachable)})"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels = model_channels
        self.channel_mult = tuple(channel_mult)
        self.num_downsamplings = len(channel_mult) - 1
        attn_ds = set(attention_downsample_factors)
        emb_dim = model_channels * 4
        ckpt = gradient_checkpointing

        def res(cin: int, cout: int, **kw) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, use_scale_shift_norm, use_checkpoint=ckpt, **kw)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads, num_head_channels, use_checkpoint=ckpt)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        ch = model_channels
        self.input_blocks = nn.ModuleList([_EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attn_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(_EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, use_conv=True)
                self.input_blocks.append(_EmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = _EmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attn_ds:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, use_conv=True))
                    ds //= 2
                self.output_blocks.append(_EmbedSequential(*layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def network_inputs(self, x_t: torch.Tensor, t: torch.Tensor | float,
                       cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, t): x_t and cond concatenated (checked against in_channels and the downsamplings) and the
        timesteps as a (B,) tensor on x's device (a scalar is broadcast)."""
        x = x_t if cond is None else torch.cat([x_t, cond.to(x_t.dtype)], dim=1)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects {self.in_channels} input channels (x_t + cond), got {x.shape[1]}")
        factor = 2**self.num_downsamplings
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} must be divisible by {factor}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) or be a scalar, got {tuple(t.shape)}")
        return x, t

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the target for noisy latents.

        Args:
            x_t: B x C_x x h x w noisy latents (scaled latent space).
            t: timesteps, LongTensor or float tensor of shape (B,), or a scalar for all.
            cond: B x C_c x h x w clean condition latent, concatenated after x_t;
                C_x + C_c must equal ``in_channels`` (cond may be None when C_x does).

        Returns:
            B x out_channels x h x w.
        """
        x, t = self.network_inputs(x_t, t, cond)
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype))

        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).type(x_t.dtype)


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters (works for models built on the ``meta`` device)."""
    return sum(p.numel() for p in model.parameters())
