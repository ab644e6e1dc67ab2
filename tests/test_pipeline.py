"""GL-LCM inference: batched dual path == two calls per step, batch-size independence, guidance
isolation, end to end on the three real 1024x1024 images, and bad inputs."""
from __future__ import annotations

import copy
import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from gl_lcm.data.io import read_image, write_png
from gl_lcm.data.phantom import write_phantom_dataset
from gl_lcm.diffusion.noise import PerImageNoise, image_generators
from gl_lcm.diffusion.samplers import sample_dual_path
from gl_lcm.inference import InferenceEngine, SamplingSettings
from gl_lcm.inference.postprocess import postprocess_paths
from gl_lcm.jobs.evaluate import evaluate_split
from gl_lcm.jobs.segment import segment_path
from gl_lcm.jobs.suppress import suppress_path
from gl_lcm.models.factory import load_denoiser

from tiny_models import tiny_config, write_tiny_checkpoints


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tiny_config(["lcm.num_inference_steps=3"])
    paths = write_tiny_checkpoints(tmp_path_factory.mktemp("ckpt"), cfg)
    unet, _ = load_denoiser(paths["teacher"])
    return cfg, paths, unet


def dual_path_sample(model, cond_global, cond_local, cfg, num_steps, gens, guidance_mode=None, batched=True,
                     rebuild_scheduler=False):
    """The engine's sampling stage with ``cfg``'s settings (as the engine resolves them)."""
    s = SamplingSettings.from_config(cfg)
    noise = PerImageNoise(gens, cond_global.shape[1:], cond_global.device, cond_global.dtype)
    return sample_dual_path(model, s.scheduler(), cond_global, cond_local, num_steps, noise,
                            guidance_mode=guidance_mode or s.guidance_mode, guidance_alpha=s.guidance_alpha,
                            leg_zero_channels=cond_global.shape[1] if s.leg_std_published else 0,
                            clip_range_fn=s.dual_path_clip(cond_global.shape[0]), batched=batched,
                            fresh_scheduler=s.scheduler if rebuild_scheduler else None)


def _conds(seed=0, b=3, size=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, size, size, generator=g).to(dtype),
            torch.randn(b, 4, size, size, generator=g).to(dtype))


@pytest.fixture(scope="module")
def unet64(tiny):
    """The tiny UNet in float64: comparisons of two ways to compute the same thing are then exact to
    ~1e-12, far below any real difference, at any thread count (in float32 CFG's alpha = 3
    extrapolation lifted the batched-vs-unbatched rounding gap to 1.3e-5, 2.6e-5 on one thread)."""
    return copy.deepcopy(tiny[2]).double()


@pytest.mark.parametrize("mode", ["vanilla", "cfg", "leg"])
def test_batched_equals_two_calls_and_rebuilt_scheduler(tiny, unet64, mode):
    cfg = tiny[0]
    cg, cl = _conds(dtype=torch.float64)
    names = ["a", "b", "c"]
    ref = dual_path_sample(unet64, cg, cl, cfg, 4, image_generators(1, names), guidance_mode=mode)
    two = dual_path_sample(unet64, cg, cl, cfg, 4, image_generators(1, names), guidance_mode=mode, batched=False)
    rebuilt = dual_path_sample(unet64, cg, cl, cfg, 4, image_generators(1, names), guidance_mode=mode,
                               batched=False, rebuild_scheduler=True)
    assert ref[0].dtype == torch.float64
    for a, b, c in zip(ref, two, rebuilt):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-10, rtol=0)
    assert not torch.allclose(ref[0], ref[1])  # the two paths really differ


def test_results_do_not_depend_on_batch(tiny, unet64):
    cfg = tiny[0]
    cg, cl = _conds(dtype=torch.float64)
    together = dual_path_sample(unet64, cg, cl, cfg, 3, image_generators(7, ["a", "b", "c"]))
    alone = dual_path_sample(unet64, cg[1:2], cl[1:2], cfg, 3, image_generators(7, ["b"]))
    torch.testing.assert_close(together[0][1:2], alone[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(together[1][1:2], alone[1], atol=1e-10, rtol=0)


def _published_style_dual_path(unet, cond_g, cond_l, cfg, num_steps, seed, name, mode, monkeypatch):
    """A plain re-implementation of one image's dual-path loop the way the published code runs it:
    diffusers' LCMScheduler rebuilt before every step with clip range omega + b * j (j = position of
    t on the 50-point LCM grid), two UNet calls per step, the guidance written out, batch size 1.

    Random numbers replay the suite's per-image stream: initial noise and each step's re-injected
    noise (global path first, then local) from the image's generator, LEG noise from its second one.
    """
    import diffusers.schedulers.scheduling_lcm as lcm_module
    from diffusers import LCMScheduler as Reference

    from gl_lcm.utils.seeding import derive_seed, make_generator

    # diffusers draws step noise in the sample's dtype; the suite draws float32 and casts
    monkeypatch.setattr(lcm_module, "randn_tensor",
                        lambda shape, generator=None, device=None, dtype=None: torch.randn(shape, generator=generator).to(dtype))
    d, lcm = cfg.diffusion, cfg.lcm
    g = make_generator(derive_seed(seed, "image", name))
    leg_g = make_generator(derive_seed(g.initial_seed(), "leg"))
    shape = (1, *cond_g.shape[1:])
    x_g = torch.randn(shape, generator=g).double()
    x_l = x_g.clone()
    k = d.num_train_timesteps // lcm.original_inference_steps
    grid = list(range(d.num_train_timesteps - 1, -1, -k))[:lcm.original_inference_steps]  # 999, 979, ..., 19

    def scheduler(omega, j):
        s = Reference(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                      beta_schedule=d.beta_schedule, original_inference_steps=lcm.original_inference_steps,
                      prediction_type=d.prediction_type, timestep_scaling=lcm.timestep_scaling,
                      clip_sample=True, clip_sample_range=omega + lcm.clip_b * grid.index(t))
        s.set_timesteps(num_steps)
        s.set_begin_index(j)
        return s

    probe = Reference(num_train_timesteps=d.num_train_timesteps, original_inference_steps=lcm.original_inference_steps)
    probe.set_timesteps(num_steps)
    alpha = cfg.guidance.alpha
    for j, t in enumerate(probe.timesteps.tolist()):
        tt = torch.tensor([t])
        eps_g = unet(x_g, tt, cond_g)
        eps_l = unet(x_l, tt, cond_l)
        if mode == "cfg":
            eps_l = eps_g + alpha * (eps_l - eps_g)
        elif mode == "leg":
            noise = torch.randn(shape, generator=leg_g).double()
            eps_l = alpha * eps_l + (1 - alpha) * noise / eps_l.std()
        out_g = scheduler(lcm.global_omega, j).step(eps_g, t, x_g, generator=g)
        out_l = scheduler(lcm.local_omega, j).step(eps_l, t, x_l, generator=g)
        x_g, x_l = out_g.prev_sample, out_l.prev_sample
        den_g, den_l = out_g.denoised, out_l.denoised
    return den_g, den_l


@pytest.mark.parametrize("mode", ["vanilla", "cfg", "leg"])
def test_dual_path_equals_published_style_loop(tiny, unet64, mode, monkeypatch):
    """The batched loop against the plain one. Small clip ranges make dynamic clipping bind at every
    step, so a clip index counted in the sampler's own steps (j = 0..3 instead of 0, 12, 25, 37)
    fails; so do swapped guidance arguments (cfg, leg)."""
    cfg = tiny_config(["lcm.global_omega=0.3", "lcm.local_omega=0.6", "lcm.clip_b=0.05"])
    cg, cl = _conds(b=2, dtype=torch.float64)
    names = ["a", "b"]
    z_g, z_l = dual_path_sample(unet64, cg, cl, cfg, 4, image_generators(1, names), guidance_mode=mode)
    for i, name in enumerate(names):
        ref_g, ref_l = _published_style_dual_path(unet64, cg[i:i + 1], cl[i:i + 1], cfg, 4, 1, name, mode,
                                                  monkeypatch)
        # diffusers keeps its schedule tables in float32: agreement to ~1e-6, real differences are > 1e-2
        torch.testing.assert_close(z_g[i:i + 1], ref_g, atol=1e-5, rtol=0)
        torch.testing.assert_close(z_l[i:i + 1], ref_l, atol=1e-5, rtol=0)


def test_guidance_changes_local_path_only(tiny):
    cfg, _, unet = tiny
    cg, cl = _conds(b=2)
    v = dual_path_sample(unet, cg, cl, cfg, 3, image_generators(0, ["a", "b"]), guidance_mode="vanilla")
    leg = dual_path_sample(unet, cg, cl, cfg, 3, image_generators(0, ["a", "b"]), guidance_mode="leg")
    torch.testing.assert_close(v[0], leg[0])
    assert (v[1] - leg[1]).abs().max() > 1e-3


def test_dynamic_clipping_bounds_latents(tiny):
    cfg, _, unet = tiny
    cfg = tiny_config(["lcm.global_omega=0.1", "lcm.local_omega=0.3", "lcm.clip_b=0.0"])
    cg, cl = _conds(b=2)
    zg, zl = dual_path_sample(unet, cg, cl, cfg, 1, image_generators(0, ["a", "b"]))
    # one LCM step at t=999: denoised = c_out * clip(x0) + c_skip * x_t with c_skip ~ 0
    assert zg.abs().max() <= 0.1 + 1e-3 and zl.abs().max() <= 0.3 + 1e-3 and zl.abs().max() > 0.1


def test_postprocess_paths_zero_outside_exposure_and_mean_shift():
    rng = np.random.default_rng(0)
    cxr = rng.uniform(0.1, 1, (32, 32)).astype(np.float32)
    cxr[:4] = 0
    mask = np.zeros((32, 32), bool)
    mask[10:20, 8:24] = True
    g, l = postprocess_paths(cxr, np.full((32, 32), 0.5, np.float32), np.full((32, 32), 0.2, np.float32), mask)
    assert (g[:4] == 0).all() and (l[:4] == 0).all()
    assert l[mask].mean() == pytest.approx(g[mask].mean(), abs=1e-6)


def test_postprocess_mean_shift_is_measured_inside_the_mask_only():
    """Plain computation: l + (mean of g in the mask - mean of l in the mask), clipped to [0, 1],
    then 0 outside the exposure. The images differ inside and outside the mask, so a shift measured
    over the whole image gives another result."""
    rng = np.random.default_rng(1)
    cxr = rng.uniform(0.1, 1, (40, 40)).astype(np.float32)
    cxr[:, :3] = 0
    mask = np.zeros((40, 40), bool)
    mask[8:30, 6:34] = True
    g = rng.uniform(0.3, 0.7, (40, 40)).astype(np.float32)
    l = rng.uniform(0.0, 0.4, (40, 40)).astype(np.float32)
    l[~mask] += 0.5  # the local result is bright outside the lungs
    expected_l = np.clip(l.astype(np.float64) + (g[mask].mean(dtype=np.float64) - l[mask].mean(dtype=np.float64)), 0, 1)
    expected_l[cxr <= 0] = 0
    expected_g = np.where(cxr <= 0, 0, g)
    out_g, out_l = postprocess_paths(cxr, g, l, mask)
    np.testing.assert_allclose(out_g, expected_g, atol=1e-6)
    np.testing.assert_allclose(out_l, expected_l, atol=1e-6)


def _real_setup(szch_dir: Path, tmp_path: Path, paths: dict, cfg_extra=()):
    cfg = tiny_config([f"data.root={szch_dir}", "data.mask_dir=", "data.image_size=1024",
                       "metrics.image_size=1024", "metrics.lpips=false", "lcm.num_inference_steps=2",
                       f"checkpoints.vqgan={paths['vqgan']}", f"checkpoints.student={paths['student']}",
                       f"checkpoints.teacher={paths['teacher']}", f"eval.output_dir={tmp_path / 'eval'}",
                       "eval.batch_size=2", *cfg_extra])
    (tmp_path / "all.txt").write_text("0\n1\n2\n")
    return cfg


def test_end_to_end_real_images_full_resolution(szch_dir, tiny, tmp_path):
    _, paths, _ = tiny
    cfg = _real_setup(szch_dir, tmp_path, paths)
    result = evaluate_split(cfg, split=str(tmp_path / "all.txt"), progress=False)
    out = tmp_path / "eval"
    assert result["counts"].succeeded == 3 and result["counts"].failed == 0
    for stem in ("0", "1", "2"):
        cxr, _ = read_image(szch_dir / "CXR" / f"{stem}.png")
        mask, _ = read_image(out / "masks" / f"{stem}.png", allow_constant=True)
        mask = mask > 0.5
        glob, _ = read_image(out / "global" / f"{stem}.png", allow_constant=True)
        fused, _ = read_image(out / "fused" / f"{stem}.png", allow_constant=True)
        assert glob.shape == fused.shape == mask.shape == (1024, 1024)
        assert 0.1 < mask.mean() < 0.6
        assert fused.min() >= 0 and fused.max() <= 1
        # Poisson fusion changes the lungs only: outside the (slightly dilated) mask fused == global
        near = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert np.abs(fused[~near] - glob[~near]).max() <= 1 / 255 + 1e-6
        # pixels outside the exposure (CXR == 0) stay 0
        assert (glob[cxr <= 0] == 0).all()
        assert (out / "overlays" / f"{stem}.png").is_file() and (out / "figures" / f"{stem}.png").is_file()
    with open(out / "timing.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(float(r["sampling"]) > 0 and float(r["segmentation"]) > 0 for r in rows)
    table = (out / "report.md").read_text()
    assert "GL-LCM (fused)" in table and "3 succeeded, 0 failed, 0 skipped" in table
    # a rerun skips the finished images and keeps their outputs
    before = (out / "fused" / "1.png").read_bytes()
    again = evaluate_split(cfg, split=str(tmp_path / "all.txt"), progress=False)
    assert again["counts"].skipped == 3 and (out / "fused" / "1.png").read_bytes() == before


def test_suppress_keeps_original_size_and_bit_depth(szch_dir, tiny, tmp_path):
    _, paths, _ = tiny
    cfg = _real_setup(szch_dir, tmp_path, paths, ["data.image_size=256"])
    src = tmp_path / "in"
    src.mkdir()
    image, _ = read_image(szch_dir / "CXR" / "2.png")
    write_png(src / "wide.png", cv2.resize(image, (700, 600), interpolation=cv2.INTER_AREA))
    counts = suppress_path(cfg, str(src / "wide.png"), str(tmp_path / "soft.png"), bit_depth=16)
    assert counts.succeeded == 1
    out, depth = read_image(tmp_path / "soft.png")
    assert out.shape == (600, 700) and depth == 16


def test_bad_inputs_each_get_their_message(szch_dir, tiny, tmp_path):
    _, paths, _ = tiny
    data = tmp_path / "data"
    shutil.copytree(szch_dir, data)
    (data / "CXR" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # corrupt
    write_png(data / "CXR" / "blank.png", np.full((512, 512), 0.5, np.float32) + np.linspace(0, 0.1, 512)[None])
    write_png(data / "BS" / "blank.png", np.full((512, 512), 0.5, np.float32))
    cfg = _real_setup(data, tmp_path, paths, ["data.image_size=256", "metrics.image_size=256"])
    (tmp_path / "all.txt").write_text("0\n1\n2\nblank\n")
    result = evaluate_split(cfg, split=str(tmp_path / "all.txt"), progress=False)
    assert result["counts"].succeeded == 2 and result["counts"].failed == 2
    with open(tmp_path / "eval" / "errors.csv") as f:
        errors = {r["image"]: r["reason"] for r in csv.DictReader(f)}
    assert set(errors) == {"2", "blank"}
    assert "2.png" in errors["2"] and "lung" in errors["blank"].lower()
    # missing ground truth: named
    (data / "BS" / "1.png").unlink()
    with pytest.raises(ValueError, match="1"):
        evaluate_split(cfg, split=str(tmp_path / "all.txt"), progress=False)
    assert (tmp_path / "eval" / "fused" / "0.png").is_file()  # nothing already written is lost
    # missing checkpoint
    cfg_missing = _real_setup(data, tmp_path, {**paths, "student": tmp_path / "nope.pt"})
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pt"):
        InferenceEngine.from_config(cfg_missing)
    # a mask folder lacking some files
    masks = tmp_path / "masks"
    masks.mkdir()
    write_png(masks / "0.png", np.ones((64, 64), np.float32))
    cfg_folder = _real_setup(data, tmp_path, paths, ["segmentation.method=folder", f"segmentation.mask_dir={masks}"])
    counts = segment_path(cfg_folder, str(szch_dir / "CXR"), str(tmp_path / "seg"))
    assert counts == {"succeeded": 1, "failed": 2}
    with open(tmp_path / "seg" / "errors.csv") as f:
        reasons = {r["image"]: r["reason"] for r in csv.DictReader(f)}
    assert "1.png" in reasons["1"] or str(masks) in reasons["1"]


def test_segment_command_on_phantoms(tmp_path):
    from gl_lcm.config import load_config

    write_phantom_dataset(tmp_path / "ph", n=4, size=128, seed=5)
    cfg = load_config(None, ["device=cpu"])
    counts = segment_path(cfg, str(tmp_path / "ph" / "CXR"), str(tmp_path / "seg"))
    assert counts["succeeded"] == 4
    from gl_lcm.segmentation import dice

    for stem in ("phantom_0000", "phantom_0001"):
        pred, _ = read_image(tmp_path / "seg" / "masks" / f"{stem}.png", allow_constant=True)
        truth, _ = read_image(tmp_path / "ph" / "Mask" / f"{stem}.png", allow_constant=True)
        assert dice(pred > 0.5, truth > 0.5) > 0.85


def test_fusion_mask_erosion_keeps_decoder_rim_out():
    from gl_lcm.fusion import fusion_mask
    from gl_lcm.inference import FusionSettings

    mask = np.zeros((64, 64), bool)
    mask[16:48, 12:52] = True
    assert fusion_mask(mask, 0).sum() == mask.sum()
    eroded = fusion_mask(mask, 4)
    assert eroded[20:44, 16:48].all() and not eroded[16:20].any() and not eroded[:, 12:16].any()
    assert not fusion_mask(mask, 40).any()
    # a local result whose lungs have a dark rim (as decoded) must not darken the fused lungs
    glob = np.full((64, 64), 0.5, np.float32)
    local = np.where(mask, 0.5, 0.0).astype(np.float32)
    local[16:18] = 0.0
    cfg = tiny_config(["fusion.erode_px=4"])
    fused = FusionSettings.from_config(cfg).fuse(glob, local, mask, mode="poisson")
    assert np.abs(fused - glob).max() < 1e-4
    cfg = tiny_config(["fusion.erode_px=0"])
    assert np.abs(FusionSettings.from_config(cfg).fuse(glob, local, mask, mode="poisson") - glob).max() > 0.05


def test_clip_index_follows_the_original_grid():
    from gl_lcm.diffusion.lcm import LCMScheduler
    from gl_lcm.diffusion.lcm import clip_grid_index

    s = LCMScheduler()
    s.set_timesteps(50)
    assert [clip_grid_index(t, 1000, 50) for t in s.timesteps.tolist()] == list(range(50))
    s.set_timesteps(4)
    assert [clip_grid_index(t, 1000, 50) for t in s.timesteps.tolist()] == [0, 12, 25, 37]


def test_error_log_forgets_an_image_that_later_succeeds(tmp_path):
    from gl_lcm.jobs.runner import ErrorLog

    path = tmp_path / "errors.csv"
    log = ErrorLog(path)
    log.add("a", "read", ValueError("truncated"))
    log.add("b", "segment", ValueError("no lung"))
    rerun = ErrorLog(path)  # a rerun starts from the file
    rerun.clear("a")
    rerun.clear("never-failed")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"image": "b", "stage": "segment", "reason": "ValueError: no lung"}]
