"""Reference-parity mode: `evaluate` with configs/reference_szch.yaml and imported checkpoints runs the
published method. The reference here is a plain re-implementation of the published evaluation loop
(github.com/diaoquesang/GL-LCM, codes/batch_lcm_eval.py) on the published-style modules themselves:
diffusers' LCMScheduler rebuilt every step with the growing clip range, two UNet calls per step, LEG
with the std over the whole 8-channel output, mean shift inside the mask, cv2.seamlessClone."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from gl_lcm.config import load_config
from gl_lcm.models.reference_import import import_reference
from gl_lcm.models.published_standins import published_unet, published_vqvae

REPO = Path(__file__).resolve().parents[1]
SIZE, STEPS, LATENT = 64, 50, 4  # the published 50 LCM steps; tiny images and models
STEMS = ["img_a", "img_b"]


def _write_data(root: Path) -> None:
    rng = np.random.default_rng(0)
    for sub in ("CXR", "BS", "Mask"):
        (root / sub).mkdir(parents=True)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for k, stem in enumerate(STEMS):
        field = cv2.GaussianBlur(rng.random((SIZE, SIZE)), (0, 0), 6)
        cxr = np.clip((field - field.min()) / np.ptp(field) * 220 + 20, 0, 255).astype(np.uint8)
        cxr[:, :3 + 2 * k] = 0  # outside the exposure: the published code zeroes its outputs there
        mask = np.zeros((SIZE, SIZE), np.uint8)
        for cx in (20, 44):
            inside = ((xx - cx) / 10.0) ** 2 + ((yy - 32) / 19.0) ** 2
            mask[inside <= 1.2] = 200  # a soft rim: not lung at the published threshold (255)
            mask[inside <= 1.0] = 255
        mask[2:6, 55:61] = 255  # a 24-px speck: in the mean shift, dropped before fusion
        cv2.imwrite(str(root / "CXR" / f"{stem}.png"), cxr)
        cv2.imwrite(str(root / "BS" / f"{stem}.png"), cv2.GaussianBlur(cxr, (0, 0), 2))
        cv2.imwrite(str(root / "Mask" / f"{stem}.png"), mask)
    (root / "test.txt").write_text("\n".join(STEMS) + "\n")


def _noise_streams(latent_hw: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per image: the random numbers the published loop draws (8 channels where it draws 8)."""
    out = {}
    for k, stem in enumerate(STEMS):
        g = torch.Generator().manual_seed(100 + k)
        shape = (1, LATENT, latent_hw, latent_hw)
        out[stem] = {"initial": torch.randn(shape, generator=g),
                     "leg": torch.randn((STEPS, 1, 2 * LATENT, latent_hw, latent_hw), generator=g),
                     "global": torch.randn((STEPS - 1, 1, 2 * LATENT, latent_hw, latent_hw), generator=g),
                     "local": torch.randn((STEPS - 1, 1, 2 * LATENT, latent_hw, latent_hw), generator=g)}
    return out


def published_loop(unet, vqgan, cxr_u8, mask_u8, noise, omega_g=2.0, omega_l=3.5, clip_rate=0.025, alpha=3.0,
                   monkeypatch=None, bug=None):
    """The published evaluation of one image (batch size 1), re-written plainly. Returns 8-bit
    (global, local, fused) as the published code writes them. ``bug`` plants a known mistake."""
    from diffusers import LCMScheduler
    import diffusers.schedulers.scheduling_lcm as lcm_module

    queue = []
    monkeypatch.setattr(lcm_module, "randn_tensor", lambda shape, **kw: queue.pop(0))
    to_t = lambda a: ((torch.from_numpy(a).float()[None, None] / 255) - 0.5) / 0.5  # ToTensor + Normalize
    mask = mask_u8.copy()
    mask[mask < 255] = 0
    cxr, masked_cxr = to_t(cxr_u8), to_t(np.where(mask == 255, cxr_u8, 0).astype(np.uint8))
    cxr_copy = ((cxr.numpy().squeeze() * 0.5 + 0.5) * 255).astype(np.int8)
    with torch.no_grad():
        cxr, masked_cxr = vqgan.encode_stage_2_inputs(cxr), vqgan.encode_stage_2_inputs(masked_cxr)
        sample = torch.cat((noise["initial"], cxr), dim=1)
        masked_sample = torch.cat((noise["initial"], masked_cxr), dim=1)
        scheduler = LCMScheduler(num_train_timesteps=1000, clip_sample=True, clip_sample_range=omega_g)
        scheduler.set_timesteps(STEPS)
        for j, t in enumerate(scheduler.timesteps):
            tt = torch.Tensor((t,)).long()
            residual = unet(sample, tt)
            masked_residual = unet(masked_sample, tt)
            guided_src = residual if bug == "swap_guidance" else masked_residual
            masked_residual = alpha * guided_src + (1 - alpha) * noise["leg"][j] / torch.std(guided_src)
            jj = j + 1 if bug == "clip_index" else j
            if j < STEPS - 1:
                queue.append(noise["global"][j])
            s = LCMScheduler(num_train_timesteps=1000, clip_sample=True, clip_sample_range=omega_g + clip_rate * jj)
            s.set_timesteps(STEPS)
            sample = s.step(residual, t, sample).prev_sample
            if j < STEPS - 1:
                queue.append(noise["local"][j])
            s = LCMScheduler(num_train_timesteps=1000, clip_sample=True, clip_sample_range=omega_l + clip_rate * jj)
            s.set_timesteps(STEPS)
            masked_sample = s.step(masked_residual, t, masked_sample).prev_sample
            sample = torch.cat((sample[:, :4], cxr), dim=1)
            masked_sample = torch.cat((masked_sample[:, :4], masked_cxr), dim=1)
        assert not queue
        bs = vqgan.decode(sample[:, :4]).numpy().squeeze() * 0.5 + 0.5
        bs[cxr_copy == 0] = 0
        masked_bs = vqgan.decode(masked_sample[:, :4]).numpy().squeeze() * 0.5 + 0.5
    region = np.ones_like(mask, bool) if bug == "shift_whole" else mask > 0
    masked_bs[region] = masked_bs[region] + np.mean(bs[mask > 0]) - np.mean(masked_bs[mask > 0])
    masked_bs[cxr_copy == 0] = 0
    bs *= 255
    masked_bs *= 255
    written = [np.clip(np.rint(a), 0, 255).astype(np.uint8) for a in (bs, masked_bs)]  # cv.imwrite of floats
    num_labels, labels, stats, _ = cv2.connectedComponentsWithStats(mask)
    for i in range(1, num_labels):
        if stats[i, cv2.CC_STAT_AREA] < 100:
            labels[labels == i] = 0
    mask[labels == 0] = 0
    br = cv2.boundingRect(mask)
    p = (br[0] + br[2] // 2, br[1] + br[3] // 2)
    masked_bs = cv2.cvtColor(np.clip(masked_bs, 0, 255), cv2.COLOR_GRAY2BGR).astype(np.uint8)
    bs = cv2.cvtColor(np.clip(bs, 0, 255), cv2.COLOR_GRAY2BGR).astype(np.uint8)
    fused = cv2.seamlessClone(masked_bs, bs, mask, p, cv2.MONOCHROME_TRANSFER)
    return written[0], written[1], fused[:, :, 0]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """Imported random-weight published models, evaluated in reference mode with injected noise."""
    from gl_lcm.diffusion.noise import GivenNoise
    from gl_lcm.inference import InferenceEngine
    from gl_lcm.jobs.evaluate import evaluate_split
    from gl_lcm.models.factory import load_denoiser, load_vqgan

    tmp = tmp_path_factory.mktemp("parity")
    _write_data(tmp / "data")
    unet = published_unet(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,), num_heads=2,
                          seed=5)
    vqgan = published_vqvae(channels=(32, 32), res_channels=32, num_res_layers=1, codebook_size=64, seed=5)
    torch.save(unet, tmp / "UNet.pth")
    torch.save(vqgan, tmp / "VQGAN.pth")
    paths = import_reference(tmp / "UNet.pth", tmp / "VQGAN.pth", tmp / "models",
                             base_config=REPO / "configs" / "reference_szch.yaml")["paths"]
    cfg = load_config(REPO / "configs" / "reference_szch.yaml", [
        f"data.root={tmp / 'data'}", f"data.image_size={SIZE}", f"segmentation.mask_dir={tmp / 'data' / 'Mask'}",
        f"checkpoints.vqgan={paths['vqgan']}", f"checkpoints.teacher={paths['unet']}",
        f"eval.output_dir={tmp / 'out'}", "eval.save_figures=false", "metrics.lpips=false", "device=cpu",
        f"metrics.image_size={SIZE}"])
    latent_hw = SIZE // 4
    streams = _noise_streams(latent_hw)

    def noise_source(names, latent_shape, num_steps):
        assert tuple(latent_shape) == (LATENT, latent_hw, latent_hw) and num_steps == STEPS
        cat = lambda key, sl: torch.cat([streams[n][key][sl] for n in names], dim=1)
        return GivenNoise(initial_noise=torch.cat([streams[n]["initial"] for n in names]),
                          step_global=cat("global", np.s_[:, :, :LATENT]),
                          step_local=cat("local", np.s_[:, :, :LATENT]), leg_noise=cat("leg", np.s_[:, :, :LATENT]))

    imported_unet, unet_cfg = load_denoiser(paths["unet"])
    engine = InferenceEngine.from_parts(load_vqgan(paths["vqgan"]), imported_unet, cfg, torch.device("cpu"), unet_cfg,
                                        segmenter=True, noise_source=noise_source)
    evaluate_split(cfg, split="test", no_lpips=True, progress=False, engine=engine)
    ours = {stem: [cv2.imread(str(tmp / "out" / sub / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
                   for sub in ("global", "local", "fused")] for stem in STEMS}
    inputs = {stem: (cv2.imread(str(tmp / "data" / "CXR" / f"{stem}.png"), 0),
                     cv2.imread(str(tmp / "data" / "Mask" / f"{stem}.png"), 0)) for stem in STEMS}
    return {"ours": ours, "inputs": inputs, "streams": streams, "unet": unet, "vqgan": vqgan}


def _max_diff(run, monkeypatch, bug=None, stems=STEMS):
    worst = [0, 0, 0]
    for stem in stems:
        cxr, mask = run["inputs"][stem]
        ref = published_loop(run["unet"], run["vqgan"], cxr, mask, run["streams"][stem], monkeypatch=monkeypatch,
                             bug=bug)
        for i, (a, b) in enumerate(zip(run["ours"][stem], ref)):
            assert a.shape == b.shape and a.dtype == np.uint8
            worst[i] = max(worst[i], int(np.abs(a.astype(int) - b.astype(int)).max()))
    return worst


def test_reference_evaluate_equals_published_loop(reference_run, monkeypatch):
    worst = _max_diff(reference_run, monkeypatch)
    print(f"largest difference (8-bit levels) global/local/fused: {worst}")
    assert max(worst) <= 1, worst
    fused = reference_run["ours"][STEMS[0]][2]
    assert fused[:, :3].max() == 0  # zeroed outside the exposure, as published


@pytest.mark.parametrize("bug", ["swap_guidance", "clip_index", "shift_whole"])
def test_parity_check_detects_known_mistakes(reference_run, monkeypatch, bug):
    """The comparison above is sharp enough: each planted mistake moves some output by > 1 level."""
    assert max(_max_diff(reference_run, monkeypatch, bug=bug, stems=STEMS[:1])) > 1


# ------------------------------------------------------------------------------ training condition
def test_published_condition_scaling_matches_lcm_train():
    """lcm_train.py: add_noise(cat(bs, cxr), cat(noise, zeros), t) -> the condition is sqrt(alpha_bar_t) * cxr."""
    from diffusers import LCMScheduler

    from gl_lcm.diffusion.schedule import add_noise, alphas_cumprod_from_betas, make_betas, training_condition

    g = torch.Generator().manual_seed(0)
    x0, cond, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([0, 500, 999])
    published = LCMScheduler(num_train_timesteps=1000).add_noise(torch.cat([x0, cond], 1),
                                                                 torch.cat([noise, torch.zeros_like(noise)], 1), t)
    ac = alphas_cumprod_from_betas(make_betas("scaled_linear", 1000, 0.00085, 0.012))
    torch.testing.assert_close(training_condition(cond, t, ac, "published"), published[:, 4:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(add_noise(x0, noise, t, ac), published[:, :4], atol=1e-6, rtol=1e-6)
    assert training_condition(cond, t, ac, "none") is cond


def test_condition_scaling_switch_reaches_the_teacher(tmp_path, monkeypatch):
    import gl_lcm.train.ldm as ldm
    from gl_lcm.data.phantom import write_phantom_dataset
    from tiny_models import tiny_config, write_tiny_checkpoints

    write_phantom_dataset(tmp_path / "data", n=6, size=32, seed=0, progress=False)
    paths = write_tiny_checkpoints(tmp_path / "ckpt", tiny_config(["data.image_size=32", "vqgan.channels=[4,4]"]))
    seen = []
    real = ldm.training_condition
    monkeypatch.setattr(ldm, "training_condition", lambda c, t, ac, mode: seen.append(mode) or real(c, t, ac, mode))
    cfg = load_config(REPO / "configs" / "ldm_tiny.yaml", [
        f"data.root={tmp_path / 'data'}", f"train.output_dir={tmp_path / 'run'}", f"checkpoints.vqgan={paths['vqgan']}",
        "data.image_size=32", "unet.model_channels=8", "unet.channel_mult=[1,2]", "unet.num_res_blocks=1",
        "unet.attention_resolutions=[]", "unet.latent_size=8", "unet.num_heads=1", "train.batch_size=2",
        "train.max_steps=1", "train.val_every=100", "train.ckpt_every=1", "train.latent_cache=false", "device=cpu",
        "diffusion.train_cond_scaling=published"])
    ldm.train_ldm(cfg, resume="none", progress=False)
    assert seen and set(seen) == {"published"}
