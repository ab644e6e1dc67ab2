"""Stand-ins for the published GL-LCM model classes, for tests and benchmarks only.

The published code (github.com/diaoquesang/GL-LCM, ``codes/``) pickles whole modules whose classes
live at ``modules.unet.*`` / ``modules.nn.GroupNorm32`` (guided-diffusion's UNetModel, vendored)
and ``generative.networks.nets.vqvae.*`` / ``generative.networks.layers.vector_quantizer.*``
(MONAI Generative 0.2.2). ``register()`` creates those module paths in ``sys.modules`` with
classes written here from the published structure: the same attribute names, the same
state-dict key layout, the same forward arithmetic (a plain re-implementation, independent of
``gl_lcm.models``). The VQ-VAE classes are MONAI's own (``monai.networks.nets.VQVAE``), re-homed
under the MONAI Generative paths, since MONAI >= 1.4 ships the same network.

``torch.save(model)`` of these gives files shaped like the released checkpoints.
"""
from __future__ import annotations

import math
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

UNET_MODULE, NN_MODULE = "modules.unet", "modules.nn"
VQVAE_MODULE, VQ_MODULE = "generative.networks.nets.vqvae", "generative.networks.layers.vector_quantizer"


class GroupNorm32(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels, self.out_channels, self.use_conv, self.dims = channels, out_channels or channels, use_conv, dims
        if use_conv:
            self.conv = nn.Conv2d(self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels, self.out_channels, self.use_conv, self.dims = channels, out_channels or channels, use_conv, dims
        self.op = nn.Conv2d(self.channels, self.out_channels, 3, stride=2, padding=1) if use_conv \
            else nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_scale_shift_norm=False, up=False,
                 down=False):
        super().__init__()
        self.channels, self.emb_channels, self.dropout = channels, emb_channels, dropout
        self.out_channels = out_channels or channels
        self.use_conv, self.use_checkpoint, self.use_scale_shift_norm = False, False, use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(
            emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(32, self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if self.out_channels == channels \
            else nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x, emb):
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttention(nn.Module):
    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.chunk(3, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", (q * scale).view(bs * self.n_heads, ch, length),
                              (k * scale).view(bs * self.n_heads, ch, length))
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v.reshape(bs * self.n_heads, ch, length))
        return a.reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    def __init__(self, channels, num_heads=1, num_head_channels=-1):
        super().__init__()
        self.channels = channels
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.use_checkpoint = False
        self.norm = GroupNorm32(32, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """guided-diffusion UNetModel (published settings: resblock_updown, scale-shift norm, new attention order)."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0, channel_mult=(1, 2, 4, 8), num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=True, resblock_updown=True):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size, self.in_channels, self.model_channels = image_size, in_channels, model_channels
        self.out_channels, self.num_res_blocks = out_channels, num_res_blocks
        self.attention_resolutions, self.dropout, self.channel_mult = attention_resolutions, dropout, channel_mult
        self.conv_resample, self.num_classes, self.use_checkpoint = True, None, False
        self.dtype = torch.float32
        self.num_heads, self.num_head_channels, self.num_heads_upsample = num_heads, num_head_channels, num_heads_upsample
        ted = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, ted, dropout, out_channels=int(mult * model_channels),
                                   use_scale_shift_norm=use_scale_shift_norm)]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads, num_head_channels=num_head_channels))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(
                    ResBlock(ch, ted, dropout, out_channels=ch, use_scale_shift_norm=use_scale_shift_norm, down=True)
                    if resblock_updown else Downsample(ch, True, out_channels=ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ted, dropout, use_scale_shift_norm=use_scale_shift_norm),
            AttentionBlock(ch, num_heads=num_heads, num_head_channels=num_head_channels),
            ResBlock(ch, ted, dropout, use_scale_shift_norm=use_scale_shift_norm))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = chans.pop()
                layers = [ResBlock(ch + ich, ted, dropout, out_channels=int(model_channels * mult),
                                   use_scale_shift_norm=use_scale_shift_norm)]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads_upsample, num_head_channels=num_head_channels))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, ted, dropout, out_channels=ch, use_scale_shift_norm=use_scale_shift_norm,
                                           up=True) if resblock_updown else Upsample(ch, True, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1))

    def forward(self, x, timesteps):
        hs = []
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


def _module(name: str) -> types.ModuleType:
    if name not in sys.modules:
        sys.modules[name] = types.ModuleType(name)
    return sys.modules[name]


_REGISTERED: dict = {}


def register() -> dict:
    """Put the published class paths into sys.modules; returns {qualified name: class}."""
    if _REGISTERED:
        return _REGISTERED
    from monai.networks.layers import vector_quantizer as mvq
    from monai.networks.nets import vqvae as mvqvae

    for cls in (TimestepEmbedSequential, ResBlock, AttentionBlock, QKVAttention, Downsample, Upsample, UNetModel):
        cls.__module__ = UNET_MODULE
        setattr(_module(UNET_MODULE), cls.__name__, cls)
    GroupNorm32.__module__ = NN_MODULE
    setattr(_module(NN_MODULE), "GroupNorm32", GroupNorm32)
    for mod, names, src in ((VQVAE_MODULE, ("VQVAE", "Encoder", "Decoder", "VQVAEResidualUnit"), mvqvae),
                            (VQ_MODULE, ("VectorQuantizer", "EMAQuantizer"), mvq)):
        for n in names:
            cls = type(n, (getattr(src, n),), {"__module__": mod})
            setattr(_module(mod), n, cls)
            _REGISTERED[f"{mod}.{n}"] = cls
    for parent in ("generative", "generative.networks", "generative.networks.nets", "generative.networks.layers",
                   "modules"):
        _module(parent)
    _REGISTERED.update({f"{UNET_MODULE}.UNetModel": UNetModel})
    return _REGISTERED


def published_unet(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,), num_heads=2,
                   latent=4, seed=0, image_size=16, resblock_updown=True) -> UNetModel:
    """Random-weight published-style UNet (8 in / 8 out channels, outputs 4-7 zero as published)."""
    register()
    torch.manual_seed(seed)
    m = UNetModel(image_size=image_size, in_channels=2 * latent, model_channels=model_channels,
                  out_channels=2 * latent, num_res_blocks=num_res_blocks, attention_resolutions=tuple(attention_ds),
                  channel_mult=tuple(channel_mult), num_heads=num_heads, resblock_updown=resblock_updown)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.05)
        m.out[2].weight[latent:] = 0  # never trained in the published code: stay zero
        m.out[2].bias[latent:] = 0
    return m.eval()


def _swap_classes(model: nn.Module) -> nn.Module:
    reg = register()
    for sub in model.modules():
        for mod in (VQVAE_MODULE, VQ_MODULE):
            key = f"{mod}.{type(sub).__name__}"
            if key in reg and type(sub).__module__.startswith("monai."):
                sub.__class__ = reg[key]
    return model


def published_vqvae(channels=(32, 64, 64), res_channels=32, num_res_layers=1, embed_dim=4, codebook_size=64,
                    seed=0) -> nn.Module:
    """Random-weight MONAI VQVAE whose classes carry the MONAI Generative 0.2.2 paths (as published)."""
    from monai.networks.nets import VQVAE

    torch.manual_seed(seed)
    n = len(channels)
    m = VQVAE(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(channels), num_res_channels=res_channels,
              num_res_layers=num_res_layers, downsample_parameters=((2, 4, 1, 1),) * n,
              upsample_parameters=((2, 4, 1, 1, 0),) * n, num_embeddings=codebook_size, embedding_dim=embed_dim)
    # MONAI Generative names the channel attribute num_channels
    m.num_channels = m.__dict__.pop("channels")
    return _swap_classes(m).eval()
