"""Tests for gl_lcm.losses: MS-SSIM, LSGAN losses, LPIPS loading, VQGAN objective."""
from __future__ import annotations


import pytest
import pytorch_msssim
import torch
import torch.nn.functional as F
import torchvision

from gl_lcm.losses import (
    MS_SSIM_WEIGHTS,
    PerceptualLoss,
    VQGANLoss,
    WeightsNotFoundError,
    default_trunk_weights_path,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    ms_ssim,
    ms_ssim_setting,
)
from gl_lcm.models import PatchDiscriminator


def _smooth_images(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Structured images in [-1, 1]: blurred noise (so SSIM terms are far from 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, h // 4 + 1, w // 4 + 1, generator=g)
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
    return (x / x.abs().amax()).clamp(-1, 1)


def _pair(b, h, w, seed=0, noise=0.1):
    x = _smooth_images(b, h, w, seed)
    g = torch.Generator().manual_seed(seed + 1)
    y = (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, y


# ----------------------------------------------------------------------------- MS-SSIM


@pytest.mark.parametrize("h,w", [(192, 192), (181, 200)])
def test_ms_ssim_matches_pytorch_msssim(h, w):
    x, y = _pair(2, h, w)
    ours = ms_ssim(x, y, reduction="none")
    ref = pytorch_msssim.ms_ssim((x + 1) / 2, (y + 1) / 2, data_range=1.0, size_average=False)
    assert 0.3 < float(ref.min()) < 0.999  # a meaningful, non-trivial comparison
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    assert float(ms_ssim(x, y)) == pytest.approx(float(ref.mean()), abs=1e-4)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_ms_ssim_identity_is_one_and_noise_lowers_it(size):
    x, y = _pair(2, size, size, noise=0.2)
    assert float(ms_ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(ms_ssim(x, y)) < 0.99
    _, y_more = _pair(2, size, size, noise=0.5)
    assert float(ms_ssim(x, y_more)) < float(ms_ssim(x, y))


def test_ms_ssim_setting_reduces_scales_and_window():
    assert ms_ssim_setting(1024, 1024) == (5, 11)
    assert ms_ssim_setting(161, 300) == (5, 11)  # pytorch_msssim's bound: side > 160
    assert ms_ssim_setting(160, 160) == (4, 11)
    assert ms_ssim_setting(128, 128) == (4, 11)
    assert ms_ssim_setting(64, 64) == (3, 11)
    assert ms_ssim_setting(11, 11) == (1, 11)
    assert ms_ssim_setting(10, 10) == (1, 9)
    assert ms_ssim_setting(8, 9) == (1, 7)
    with pytest.raises(ValueError):
        ms_ssim_setting(2, 2)


def test_ms_ssim_small_image_matches_reduced_reference():
    # 64 px: 3 scales, weights renormalised; reference composed from pytorch_msssim's SSIM parts
    x, y = _pair(2, 64, 64, seed=3)
    a, b = (x + 1) / 2, (y + 1) / 2
    w = torch.tensor(MS_SSIM_WEIGHTS[:3])
    w = w / w.sum()
    from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

    win = _fspecial_gauss_1d(11, 1.5).repeat(1, 1, 1, 1)  # 1 x 1 x 1 x 11 as pytorch_msssim builds it
    value = torch.ones(2, 1)
    for i in range(3):
        s, cs = _ssim(a, b, data_range=1.0, win=win, size_average=False)
        value = value * (torch.relu(s if i == 2 else cs) ** w[i])
        a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    torch.testing.assert_close(ms_ssim(x, y, reduction="none"), value.mean(1), rtol=0, atol=1e-5)
    # tiny image: one scale with a 7-tap window equals single-scale SSIM
    x8, y8 = _pair(1, 8, 8, seed=4)
    ref8 = pytorch_msssim.ssim((x8 + 1) / 2, (y8 + 1) / 2, data_range=1.0, win_size=7, nonnegative_ssim=True)
    assert float(ms_ssim(x8, y8)) == pytest.approx(float(ref8), abs=1e-5)


def test_ms_ssim_gradient_finite_even_for_anticorrelated_images():
    x = _smooth_images(1, 64, 64, seed=5).requires_grad_(True)
    value = ms_ssim(x, -x.detach())
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-6)
    value.backward()
    assert torch.isfinite(x.grad).all()
    x2, y2 = _pair(1, 64, 64, seed=6)
    x2.requires_grad_(True)
    (1 - ms_ssim(x2, y2)).backward()
    assert torch.isfinite(x2.grad).all() and x2.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- LSGAN


def test_lsgan_losses_hand_values():
    assert float(lsgan_generator_loss(torch.tensor([0.0, 1.0, 2.0]))) == pytest.approx(2 / 3)
    real, fake = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 2.0]])
    assert float(lsgan_discriminator_loss(real, fake)) == pytest.approx(0.5 * (2.0 + 2.0))
    assert float(lsgan_discriminator_loss(torch.ones(4), torch.zeros(4))) == 0.0


# ----------------------------------------------------------------------------- LPIPS


def _save_random_trunk(net: str, path) -> dict:
    model = torchvision.models.vgg16(weights=None) if net == "vgg" else torchvision.models.alexnet(weights=None)
    state = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    torch.save(state, path)
    return state


@pytest.mark.parametrize("net", ["alex", pytest.param("vgg", marks=pytest.mark.slow)])
def test_perceptual_loss_loads_local_trunk(tmp_path, net):
    path = tmp_path / "trunk.pth"
    state = _save_random_trunk(net, path)
    loss = PerceptualLoss(net=net, trunk_weights_path=path)
    first_conv = loss.lpips.net.slice1[0].weight
    torch.testing.assert_close(first_conv, state["features.0.weight"], rtol=0, atol=0)
    assert all(not p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.lpips.training and not any(m.training for m in loss.modules())

    x = _smooth_images(2, 64, 64, seed=7)
    g = torch.Generator().manual_seed(8)
    noise = torch.randn(x.shape, generator=g)
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-7)
    d_small = float(loss(x, (x + 0.05 * noise).clamp(-1, 1)))
    d_large = float(loss(x, (x + 0.4 * noise).clamp(-1, 1)))
    assert 0 < d_small < d_large
    assert loss(x, x + 0.1, reduction="none").shape == (2,)
    y = x.clone().requires_grad_(True)
    loss((y + 0.1 * noise), x).backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_perceptual_loss_missing_file_raises_with_path(tmp_path):
    missing = tmp_path / "nope" / "vgg16-397923af.pth"
    with pytest.raises(WeightsNotFoundError) as err:
        PerceptualLoss(net="vgg", trunk_weights_path=missing)
    msg = str(err.value)
    assert str(missing) in msg and "https://download.pytorch.org/models/vgg16-397923af.pth" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_perceptual_loss_default_path_follows_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert default_trunk_weights_path("alex") == expected
    with pytest.raises(WeightsNotFoundError, match="alexnet-owt-7be5be79.pth"):
        PerceptualLoss(net="alex")
    expected.parent.mkdir(parents=True)
    _save_random_trunk("alex", expected)
    assert float(PerceptualLoss(net="alex")(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32))) == 0.0


def test_perceptual_loss_rejects_wrong_checkpoint(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"something.else": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="missing"):
        PerceptualLoss(net="alex", trunk_weights_path=path)


# ----------------------------------------------------------------------------- VQGAN objective


class _L1Perceptual(torch.nn.Module):
    def forward(self, a, b):
        return (a - b).abs().mean()


def test_vqgan_loss_total_is_weighted_sum_of_terms():
    x, y = _pair(2, 64, 64, seed=9)
    quant = torch.tensor(0.2)
    disc = PatchDiscriminator(base_channels=8, norm="none")
    loss_fn = VQGANLoss(perceptual=_L1Perceptual(), adversarial_start_step=10)
    total, terms = loss_fn(x, y, quant, global_step=10, discriminator=disc)
    mse = float(F.mse_loss(y, x))
    msssim_loss = 1 - float(ms_ssim(y, x))
    perceptual = float((y - x).abs().mean())
    adv = float(((disc(y) - 1) ** 2).mean().detach())
    expected = mse + 0.2 + 1.0 * msssim_loss + 0.001 * perceptual + 0.01 * adv
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    assert terms == pytest.approx(
        {"recon_mse": mse, "quant": 0.2, "msssim_loss": msssim_loss, "perceptual": perceptual,
         "adversarial": adv, "total": expected},
        rel=1e-5,
    )
    assert all(isinstance(v, float) for v in terms.values())
    # the same with precomputed logits
    total2, _ = loss_fn(x, y, quant, global_step=10, logits_fake=disc(y))
    total2 = total2.detach()
    assert float(total2) == pytest.approx(expected, rel=1e-5)


def test_vqgan_loss_before_adversarial_start_and_without_perceptual():
    x, y = _pair(1, 32, 32, seed=10)
    loss_fn = VQGANLoss(perceptual=None, adversarial_start_step=5)
    total, terms = loss_fn(x, y, torch.tensor(0.0), global_step=4)
    assert set(terms) == {"recon_mse", "quant", "msssim_loss", "total"}  # no silent zeros
    assert float(total) == pytest.approx(terms["recon_mse"] + terms["msssim_loss"], rel=1e-6)
    with pytest.raises(ValueError, match="discriminator"):
        loss_fn(x, y, torch.tensor(0.0), global_step=5)


def test_vqgan_discriminator_loss_published_scaling():
    x, y = _pair(2, 64, 64, seed=11)
    disc = PatchDiscriminator(base_channels=8, norm="none")
    y_grad = y.clone().requires_grad_(True)
    loss, info = VQGANLoss().discriminator_loss(disc, x, y_grad)
    ref = 0.5 * (((disc(x) - 1) ** 2).mean() + (disc(y) ** 2).mean()).detach()
    assert float(loss.detach()) == pytest.approx(0.01 * float(ref), rel=1e-5)
    assert info["disc_loss"] == pytest.approx(float(ref), rel=1e-5)
    loss.backward()
    assert y_grad.grad is None  # reconstruction is detached for the discriminator step
    assert disc.model[0].weight.grad.abs().sum() > 0


def test_bone_residual_loss_is_one_minus_the_published_bsr_per_image():
    """bone_residual_loss on [-1, 1] tensors = mean over images of 1 - BSR, with BSR computed here in plain
    numpy on [0, 1] images (mean shift, one-sided residual, over the bone energy) and by gl_lcm.metrics.bsr;
    its gradient is zero where the shifted prediction is brighter than the truth."""
    import numpy as np

    from gl_lcm.losses import bone_residual_loss
    from gl_lcm.metrics import bsr

    gt = _smooth_images(3, 32, 40, seed=1) * 0.8
    cxr = (gt + 0.3 * _smooth_images(3, 32, 40, seed=2).abs()).clamp(-1, 1)
    pred = (gt + 0.2 * _smooth_images(3, 32, 40, seed=3) + 0.05).clamp(-1, 1).requires_grad_(True)
    loss = bone_residual_loss(cxr, gt, pred)

    expected = []
    for c, g, p in zip(*(((x.detach()[:, 0].double().numpy() + 1) / 2) for x in (cxr, gt, pred))):
        shifted = p + (g - p).mean()
        expected.append(np.sum(np.maximum(g - shifted, 0) ** 2) / np.sum((c - g) ** 2))
        assert abs(expected[-1] - (1 - bsr(c, g, p))) < 1e-12
    assert abs(float(loss.detach()) - float(np.mean(expected))) < 1e-5
    assert 0.01 < float(loss.detach()) < 1

    loss.backward()  # the gradient matches central differences of the numpy formula
    def reference(p_img, k):
        c, g, p01 = ((x[k, 0].double().numpy() + 1) / 2 for x in (cxr, gt, p_img))
        shifted = p01 + (g - p01).mean()
        return np.sum(np.maximum(g - shifted, 0) ** 2) / np.sum((c - g) ** 2) / len(cxr)
    for k, i, j in ((0, 5, 7), (1, 20, 3), (2, 31, 39)):
        bumped = [pred.detach().double().clone() for _ in range(2)]
        bumped[0][k, 0, i, j] += 1e-4
        bumped[1][k, 0, i, j] -= 1e-4
        fd = (reference(bumped[0], k) - reference(bumped[1], k)) / 2e-4
        assert abs(float(pred.grad[k, 0, i, j]) - fd) < 1e-3 * abs(fd) + 1e-9
    with pytest.raises(ValueError, match="equal shape"):
        bone_residual_loss(cxr, gt, pred[:, :, :16])
