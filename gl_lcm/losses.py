"""Losses for the VQGAN autoencoder (taming-style: the models know nothing about their losses).

Published GL-LCM VQGAN objective (``codes/vq-gan_train.py``):
``MSE + quant_loss + 1 * (1 - MS-SSIM) + 0.001 * LPIPS(vgg) + 0.01 * LSGAN_G`` and the
discriminator minimises ``0.01 * 0.5 * (LSGAN_real + LSGAN_fake)``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


# --------------------------------------------------------------------------- MS-SSIM


def gaussian_window_1d(size: int, sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of odd length ``size`` centred on the middle tap, float32 (size,)."""
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ms_ssim_setting(height: int, width: int, win_size: int = 11, max_scales: int = 5) -> tuple[int, int]:
    """Scales and window for an image size, shrinking the standard setting for small images.

    Every scale must be at least ``win_size`` pixels on its shorter side (valid filtering;
    each scale halves the side, rounding up). The number of scales is the largest
    ``L <= max_scales`` that satisfies this (5 scales need >= 161 px with window 11, e.g.
    128 px -> 4 scales, 64 px -> 3). If even one scale is smaller than the window, the window
    shrinks to the largest odd size that fits and one scale is used.

    Returns:
        (num_scales, win_size).
    """
    side = min(height, width)
    if side < 3:
        raise ValueError(f"MS-SSIM needs images of at least 3 x 3 pixels, got {height} x {width}")
    if side < win_size:
        return 1, side if side % 2 else side - 1
    scales = 1
    while scales < max_scales:
        side = (side + 1) // 2
        if side < win_size:
            break
        scales += 1
    return scales, win_size


def _positive_power(v: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    # relu(v) ** exponent with a zero (not NaN) gradient where v <= 0
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)) ** exponent, torch.zeros_like(v))


def _ssim_and_cs(x: torch.Tensor, y: torch.Tensor, win: torch.Tensor, data_range: float, k1: float, k2: float):
    c = x.shape[1]
    wx = win.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    wy = win.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(z):  # separable valid Gaussian filtering
        return F.conv2d(F.conv2d(z, wy, groups=c), wx, groups=c)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs_map
    return ssim_map.flatten(2).mean(-1), cs_map.flatten(2).mean(-1)  # B x C each


def ms_ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    win_size: int = 11,
    sigma: float = 1.5,
    weights: tuple[float, ...] = MS_SSIM_WEIGHTS,
    k: tuple[float, float] = (0.01, 0.03),
    reduction: str = "mean",
) -> torch.Tensor:
    """Multi-scale SSIM (Wang et al. 2003) of images in [-1, 1], differentiable.

    Args:
        x, y: B x C x H x W in [-1, 1] (mapped to [0, 1], data range 1, inside).
        win_size, sigma: Gaussian window (valid filtering, no padding).
        weights: per-scale exponents for the standard 5-scale setting. For small images
            the scales / window are reduced by ``ms_ssim_setting`` and the first
            ``num_scales`` weights are renormalised to sum to 1.
        k: SSIM stability constants (K1, K2).
        reduction: "mean" -> scalar; "none" -> (B,) mean over channels.

    Returns:
        MS-SSIM in [0, 1] (1 for identical images). Scales are separated by 2x2 average
        pooling (zero padding of odd sides, as pytorch_msssim); contrast-structure terms and
        the last-scale SSIM are clipped at 0 before the power. Equal to
        ``pytorch_msssim.ms_ssim(x01, y01, data_range=1)`` when min(H, W) > 160.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ms_ssim needs two B x C x H x W tensors of equal shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    x = (x.float() + 1) / 2
    y = (y.float() + 1) / 2
    scales, win_size = ms_ssim_setting(x.shape[-2], x.shape[-1], win_size, len(weights))
    w = torch.tensor(weights[:scales], dtype=torch.float32, device=x.device)
    if scales < len(weights):
        w = w / w.sum()
    win = gaussian_window_1d(win_size, sigma).to(x.device)
    factors = []
    for i in range(scales):
        ssim_val, cs = _ssim_and_cs(x, y, win, 1.0, *k)
        if i < scales - 1:
            factors.append(_positive_power(cs, w[i]))
            pad = [s % 2 for s in x.shape[-2:]]
            x = F.avg_pool2d(x, kernel_size=2, padding=pad)
            y = F.avg_pool2d(y, kernel_size=2, padding=pad)
    factors.append(_positive_power(ssim_val, w[scales - 1]))
    value = torch.stack(factors, dim=0).prod(dim=0).mean(dim=1)  # B
    if reduction == "mean":
        return value.mean()
    if reduction == "none":
        return value
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def ssim(x: torch.Tensor, y: torch.Tensor, win_size: int = 11, sigma: float = 1.5,
         k: tuple[float, float] = (0.01, 0.03), reduction: str = "mean") -> torch.Tensor:
    """Single-scale SSIM (Wang et al. 2004) of images in [-1, 1] (measured on [0, 1], data range 1).

    Gaussian window (``win_size``, ``sigma``; shrunk to the largest odd size that fits small images),
    valid filtering, mean over the SSIM map. Equal to ``pytorch_msssim.ssim(x01, y01, data_range=1)``.
    x, y: B x C x H x W. Returns a scalar ("mean") or (B,) ("none").
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two B x C x H x W tensors of equal shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    side = min(x.shape[-2:])
    win_size = min(win_size, side if side % 2 else side - 1)
    x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
    value = _ssim_and_cs(x, y, gaussian_window_1d(win_size, sigma).to(x.device), 1.0, *k)[0].mean(dim=1)
    if reduction == "mean":
        return value.mean()
    if reduction == "none":
        return value
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


# --------------------------------------------------------------------------- bone suppression


def bone_residual_loss(cxr: torch.Tensor, gt: torch.Tensor, pred: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``1 - BSR`` per image as a differentiable loss, mean over the batch (scalar).

    The published BSR (``gl_lcm.metrics.bsr``): ``pred' = pred + mean(gt - pred)`` per image,
    ``residual = max(gt - pred', 0)``, ``1 - BSR = sum(residual^2) / sum((cxr - gt)^2)``. Both sums
    scale alike, so images in [-1, 1] give the same value as in [0, 1]. ``eps`` guards an image
    without bone (a local-path item whose mask is empty). cxr, gt, pred: B x C x H x W in [-1, 1].
    """
    if not (cxr.shape == gt.shape == pred.shape) or pred.ndim != 4:
        raise ValueError(f"bone_residual_loss needs three B x C x H x W tensors of equal shape, got "
                         f"{tuple(cxr.shape)}, {tuple(gt.shape)}, {tuple(pred.shape)}")
    cxr, gt, pred = cxr.float(), gt.float(), pred.float()
    shifted = pred + (gt - pred).mean(dim=(1, 2, 3), keepdim=True)
    residual = F.relu(gt - shifted).pow(2).sum(dim=(1, 2, 3))
    bone = (cxr - gt).pow(2).sum(dim=(1, 2, 3))
    return (residual / bone.clamp_min(eps)).mean()


# --------------------------------------------------------------------------- GAN losses


def lsgan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Least-squares generator loss ``mean((D(fake) - 1)**2)`` (scalar) from raw logits of any shape."""
    return (logits_fake.float() - 1).pow(2).mean()


def lsgan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Least-squares discriminator loss ``0.5 * (mean((D(real) - 1)**2) + mean(D(fake)**2))`` (scalar)."""
    return 0.5 * ((logits_real.float() - 1).pow(2).mean() + logits_fake.float().pow(2).mean())


# --------------------------------------------------------------------------- LPIPS

TRUNK_CHECKPOINTS = {
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth", "vgg16"),
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "alexnet"),
}


class WeightsNotFoundError(FileNotFoundError):
    """A pretrained weight file needed at run time is not on disk (nothing is ever downloaded)."""


def default_trunk_weights_path(net: str) -> Path:
    """Where torchvision caches the ImageNet trunk: ``$TORCH_HOME/hub/checkpoints/<file>``.

    TORCH_HOME defaults to ``$XDG_CACHE_HOME/torch`` or ``~/.cache/torch`` (torch.hub.get_dir).
    """
    if net not in TRUNK_CHECKPOINTS:
        raise ValueError(f"net must be one of {sorted(TRUNK_CHECKPOINTS)}, got {net!r}")
    return Path(torch.hub.get_dir()) / "checkpoints" / TRUNK_CHECKPOINTS[net][0]


class PerceptualLoss(nn.Module):
    """LPIPS distance (``lpips`` package) for 1-channel images, built without any download.

    Args:
        net: "vgg" (published setting) or "alex".
        trunk_weights_path: trunk weights in torchvision layout (``features.*`` keys; a
            ``.safetensors`` file or a torchvision ``.pth``, full model or features only).
            Default: the first existing file of ``gl_lcm.weights.trunk_search_paths(net)``:
            ``lpips_{net}.safetensors`` in the weights folder (``gl-lcm weights lpips``), then
            ``default_trunk_weights_path(net)`` (torchvision's cache).

    Raises:
        WeightsNotFoundError: the trunk file is missing (message names ``gl-lcm weights lpips``
            and the torchvision file). The LPIPS linear heads ship with the ``lpips`` package.

    forward(x, y: B x 1 x H x W in [-1, 1]) -> scalar mean LPIPS (>= 0; 0 for x == y), or (B,)
    with ``reduction="none"``. All weights are frozen and the module always stays in eval
    mode; gradients flow to the inputs.
    """

    def __init__(self, net: str = "vgg", trunk_weights_path: str | Path | None = None):
        super().__init__()
        if net not in TRUNK_CHECKPOINTS:
            raise ValueError(f"net must be one of {sorted(TRUNK_CHECKPOINTS)}, got {net!r}")
        from gl_lcm.weights import find_trunk_weights, missing_weights_message

        path = find_trunk_weights(net, trunk_weights_path)
        if path is None or not path.is_file():
            raise WeightsNotFoundError(missing_weights_message(net, trunk_weights_path))
        import lpips  # local import: heavy, and only needed when the perceptual loss is used

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notice for pretrained=False
            # pnet_rand=True: torchvision builds a random trunk (no download); pretrained=True
            # loads the package's own linear heads; use_dropout=True matches their key names.
            self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, use_dropout=True, verbose=False)
        self._load_trunk(path)
        self._check_linear_heads(net)
        self.net_name = net
        self.weights_path = path
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def _load_trunk(self, path: Path) -> None:
        from gl_lcm.weights import load_trunk_state

        state = load_trunk_state(path)
        trunk = self.lpips.net
        wanted, missing = {}, []
        # lpips splits torchvision's ``features`` into slices whose children keep the indices
        for slice_name, slice_module in trunk.named_children():
            for idx, layer in slice_module.named_children():
                for pname, _ in layer.named_parameters(recurse=False):
                    key = f"features.{idx}.{pname}"
                    if key in state:
                        wanted[f"{slice_name}.{idx}.{pname}"] = state[key]
                    else:
                        missing.append(key)
        if missing:
            raise ValueError(f"{path} is not a torchvision {self.lpips.pnet_type} checkpoint: missing {missing[:4]}...")
        trunk.load_state_dict(wanted, strict=True)

    def _check_linear_heads(self, net: str) -> None:
        # lpips loads its heads with strict=False; make sure they really arrived
        import lpips

        head_file = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
        heads = torch.load(head_file, map_location="cpu", weights_only=True)
        own = self.lpips.state_dict()
        for key, value in heads.items():
            if key not in own or not torch.equal(own[key].cpu(), value):
                raise RuntimeError(f"LPIPS linear head {key} from {head_file} was not loaded")

    def train(self, mode: bool = True) -> "PerceptualLoss":
        """Kept in eval mode regardless of ``mode`` (frozen network; no dropout)."""
        super().train(False)
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"PerceptualLoss needs two B x 1 x H x W tensors, got {tuple(x.shape)}, {tuple(y.shape)}")
        d = self.lpips(x.float().expand(-1, 3, -1, -1), y.float().expand(-1, 3, -1, -1)).reshape(-1)
        if reduction == "mean":
            return d.mean()
        if reduction == "none":
            return d
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


# --------------------------------------------------------------------------- VQGAN objective


class VQGANLoss(nn.Module):
    """Generator and discriminator objectives for VQGAN training (no discriminator inside).

    Args:
        msssim_weight: weight of ``1 - MS-SSIM`` (published 1).
        perceptual_weight: weight of LPIPS (published 0.001).
        adversarial_weight: weight of the least-squares GAN terms (published 0.01).
        adversarial_start_step: the adversarial terms are used from this global step on.
        perceptual: a ``PerceptualLoss`` (or any module ``(recon, target) -> scalar``), or None
            when it is unavailable: its term is then left out of the total and of the dict.

    ``forward`` returns ``(total, terms)`` where ``total`` is the weighted sum with gradient
    and ``terms`` holds detached floats of the UNweighted parts: ``recon_mse``, ``quant``,
    ``msssim_loss`` (1 - MS-SSIM), ``perceptual`` (if a perceptual module is set),
    ``adversarial`` (generator LSGAN term, once active) and ``total``.
    """

    def __init__(
        self,
        msssim_weight: float = 1.0,
        perceptual_weight: float = 0.001,
        adversarial_weight: float = 0.01,
        adversarial_start_step: int = 0,
        perceptual: nn.Module | None = None,
    ):
        super().__init__()
        self.msssim_weight = msssim_weight
        self.perceptual_weight = perceptual_weight
        self.adversarial_weight = adversarial_weight
        self.adversarial_start_step = adversarial_start_step
        self.perceptual = perceptual

    def adversarial_active(self, global_step: int) -> bool:
        """Whether the GAN terms are used at ``global_step``."""
        return self.adversarial_weight > 0 and global_step >= self.adversarial_start_step

    def forward(
        self,
        target: torch.Tensor,
        reconstruction: torch.Tensor,
        quant_loss: torch.Tensor,
        global_step: int,
        discriminator: nn.Module | None = None,
        logits_fake: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Generator (autoencoder) loss.

        Args:
            target, reconstruction: B x 1 x H x W in [-1, 1].
            quant_loss: scalar from the VQGAN forward.
            global_step: training step (decides whether the adversarial term is active).
            discriminator / logits_fake: when the adversarial term is active, either the
                discriminator (applied to ``reconstruction``) or its logits on it.

        Returns:
            (total scalar loss, dict of detached float terms; see class doc).
        """
        recon = F.mse_loss(reconstruction.float(), target.float())
        msssim_loss = 1 - ms_ssim(reconstruction, target)
        total = recon + quant_loss + self.msssim_weight * msssim_loss
        terms = {"recon_mse": recon, "quant": quant_loss, "msssim_loss": msssim_loss}
        if self.perceptual is not None:
            p = self.perceptual(reconstruction, target)
            total = total + self.perceptual_weight * p
            terms["perceptual"] = p
        if self.adversarial_active(global_step):
            if logits_fake is None:
                if discriminator is None:
                    raise ValueError(
                        f"adversarial term is active at step {global_step}: pass discriminator= or logits_fake="
                    )
                logits_fake = discriminator(reconstruction)
            g = lsgan_generator_loss(logits_fake)
            total = total + self.adversarial_weight * g
            terms["adversarial"] = g
        terms["total"] = total
        return total, {k: float(v.detach()) for k, v in terms.items()}

    def discriminator_loss(
        self,
        discriminator: nn.Module,
        target: torch.Tensor,
        reconstruction: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Discriminator loss ``adversarial_weight * lsgan_discriminator_loss`` (published scaling).

        Args:
            discriminator: maps B x 1 x H x W to logits.
            target, reconstruction: B x 1 x H x W in [-1, 1]; reconstruction is detached here.

        Returns:
            (scalar loss, {"disc_loss" (unweighted), "logits_real", "logits_fake" (means)}).
        """
        logits_real = discriminator(target.detach())
        logits_fake = discriminator(reconstruction.detach())
        d = lsgan_discriminator_loss(logits_real, logits_fake)
        info = {
            "disc_loss": float(d.detach()),
            "logits_real": float(logits_real.detach().float().mean()),
            "logits_fake": float(logits_fake.detach().float().mean()),
        }
        return self.adversarial_weight * d, info
