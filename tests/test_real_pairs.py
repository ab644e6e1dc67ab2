"""The pieces of the real-pairs study (issue 21): the plain supervised baseline, the 'CXR - bone' output,
the bone-image metrics and the job's stage configs. References: plain re-implementations written here,
scikit-image's SSIM and closed forms."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_config, write_tiny_checkpoints  # noqa: E402

from gl_lcm.config import ConfigError, to_dict  # noqa: E402
from gl_lcm.metrics import bone_metrics, markdown_table  # noqa: E402
from gl_lcm.utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

SIZE = 32  # tiny VQGAN: 8x downsampling -> 4 x 4 latents


def _films(n=3, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    return [np.clip(0.5 + 0.3 * np.sin(6 * xx + k) * np.cos(4 * yy) + 0.05 * rng.standard_normal((SIZE, SIZE)),
                    0.02, 1).astype(np.float32) for k in range(n)]


def _engine_config(paths, extra=()):
    return tiny_config([f"data.image_size={SIZE}", f"checkpoints.vqgan={paths['vqgan']}",
                        f"checkpoints.teacher={paths['teacher']}", f"checkpoints.student={paths['student']}",
                        "fusion.backend=float", "fusion.erode_px=0", *extra])


def _supervised_checkpoint(paths, folder: Path) -> Path:
    """The tiny student's weights saved as the baseline trainer saves them: kind 'supervised', no noise input."""
    ckpt = load_checkpoint(paths["student"])
    cfg = tiny_config([f"data.image_size={SIZE}", "diffusion.prediction_type=sample", "diffusion.noise_input=false",
                       "lcm.dynamic_clip=false"])
    out = folder / "baseline.pt"
    save_checkpoint({**ckpt, "kind": "supervised", "config": to_dict(cfg)}, out)
    return out


def test_baseline_is_one_pass_of_its_unet_on_zeros_at_the_last_timestep(tmp_path):
    """The engine runs a 'supervised' checkpoint as unet(0, T-1, E(cxr)), decoded, whatever the seed: checked
    against that computation written out here with the raw modules."""
    from gl_lcm.inference import InferenceEngine
    from gl_lcm.models.factory import load_denoiser, load_vqgan

    paths = write_tiny_checkpoints(tmp_path, tiny_config())
    baseline = _supervised_checkpoint(paths, tmp_path)
    cxrs, names = _films(), ["a", "b", "c"]
    outs = []
    for seed in (0, 1):
        engine = InferenceEngine.from_config(_engine_config(paths, [f"seed={seed}"]), checkpoint=str(baseline),
                                             segmenter=False)
        assert engine.sampling.noise_input is False  # the checkpoint decides, the config said true
        outs.append(engine.run_global(names, cxrs, 1, sampler="lcm"))
    vqgan, (unet, _) = load_vqgan(paths["vqgan"]), load_denoiser(baseline)
    with torch.no_grad():
        x = torch.from_numpy(np.stack(cxrs))[:, None] * 2 - 1
        z = unet(torch.zeros(3, 4, 4, 4), torch.full((3,), 999), vqgan.encode(x))
        expected = ((vqgan.decode(z, requantize=False)[:, 0].numpy() + 1) / 2).clip(0, 1)
    for out in outs:
        np.testing.assert_allclose(np.stack(out), expected, atol=2e-5)
    # the dual path runs the same one pass on the masked film too; no noise reaches it either
    engine = InferenceEngine.from_config(_engine_config(paths), checkpoint=str(baseline), segmenter=False)
    masks = [np.ones((SIZE, SIZE), bool)] * 3
    r0 = engine.run(names, cxrs, masks, num_steps=1, guidance_mode="vanilla")
    r4 = engine.run(names, cxrs, masks, num_steps=4, guidance_mode="vanilla")
    np.testing.assert_array_equal(np.stack([r.global_img for r in r0]), np.stack([r.global_img for r in r4]))


def test_cxr_minus_bone_subtracts_the_decoded_bone_image_from_the_film(tmp_path):
    """eval.output=cxr_minus_bone gives clip(cxr - (D(E(cxr)) - soft-tissue output), 0, 1), from the same
    sampling as the soft-tissue output (re-computed here from the engine's round trip)."""
    from gl_lcm.inference import InferenceEngine

    paths = write_tiny_checkpoints(tmp_path, tiny_config())
    cxrs, names = _films(), ["a", "b", "c"]
    masks = [np.pad(np.ones((SIZE - 12, SIZE - 12), bool), 6)] * 3
    soft = InferenceEngine.from_config(_engine_config(paths), model="teacher", segmenter=False)
    minus = InferenceEngine.from_config(_engine_config(paths, ["eval.output=cxr_minus_bone"]), model="teacher",
                                        segmenter=False)
    a = soft.run(names, cxrs, masks, num_steps=2, guidance_mode="vanilla")
    b = minus.run(names, cxrs, masks, num_steps=2, guidance_mode="vanilla")
    round_trip = soft.round_trip(cxrs, requantize=soft.pixels.requantize)
    for ra, rb, c, rt in zip(a, b, cxrs, round_trip):
        np.testing.assert_allclose(rb.fused, np.clip(c - (rt - ra.fused), 0, 1), atol=2e-5)
        np.testing.assert_allclose(rb.local_img, ra.local_img)  # the local path is left as it was
    assert max(np.abs(rb.fused - ra.fused).max() for ra, rb in zip(a, b)) > 1e-3  # it does change the output
    glob = minus.run_global(names, cxrs, 2, sampler="lcm")
    plain = soft.run_global(names, cxrs, 2, sampler="lcm")
    for g, p, c, rt in zip(glob, plain, cxrs, round_trip):
        np.testing.assert_allclose(g, np.clip(c - (rt - p), 0, 1), atol=2e-5)


def test_bone_metrics_against_closed_forms_and_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    cxr = rng.uniform(0.3, 0.9, (48, 48))
    gt = cxr - rng.uniform(0.0, 0.1, (48, 48))  # true bone in [0, 0.1]
    pred = gt + 0.01 * rng.standard_normal((48, 48))
    mask = np.zeros((48, 48), bool)
    mask[8:40, 10:30] = True
    true_bone, pred_bone = cxr - gt, cxr - pred
    r = true_bone[mask].max() - true_bone[mask].min()
    m = bone_metrics(cxr, gt, pred, mask)
    assert m["bone_psnr"] == pytest.approx(10 * np.log10(r ** 2 / np.mean((pred - gt)[mask] ** 2)), rel=1e-12)
    full = np.ones_like(mask)
    r_full = true_bone.max() - true_bone.min()
    expected = structural_similarity(true_bone, pred_bone, data_range=r_full, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
    assert bone_metrics(cxr, gt, pred, full)["bone_ssim"] == pytest.approx(expected, rel=1e-9)
    perfect = bone_metrics(cxr, gt, gt, mask)
    assert perfect["bone_psnr"] == float("inf") and perfect["bone_ssim"] == pytest.approx(1.0)
    identity = bone_metrics(cxr, gt, cxr, mask)  # no bone found
    assert abs(identity["bone_ssim"]) < 0.05
    assert identity["bone_psnr"] == pytest.approx(10 * np.log10(r ** 2 / np.mean(true_bone[mask] ** 2)))
    with pytest.raises(ValueError, match="empty"):
        bone_metrics(cxr, gt, pred, np.zeros_like(mask))


def test_bone_gain_is_the_least_squares_gain_over_the_lung_pixels_of_every_film():
    from gl_lcm.metrics import apply_bone_gain, fit_bone_gain

    rng = np.random.default_rng(1)
    cxrs = [rng.uniform(0.4, 0.9, (24, 24)) for _ in range(3)]
    truths = [c - rng.uniform(0, 0.1, c.shape) for c in cxrs]
    preds = [c - 0.6 * (c - t) - 0.03 * rng.standard_normal(c.shape) for c, t in zip(cxrs, truths)]
    masks = [rng.uniform(size=(24, 24)) < 0.5 for _ in range(3)]
    b_pred = np.concatenate([(c - q)[m] for c, q, m in zip(cxrs, preds, masks)])
    b_true = np.concatenate([(c - t)[m] for c, t, m in zip(cxrs, truths, masks)])
    expected = np.linalg.lstsq(b_pred[:, None], b_true, rcond=None)[0][0]  # numpy's least squares, masked pixels
    assert fit_bone_gain(cxrs, preds, truths, masks) == pytest.approx(expected, rel=1e-10)
    # pixels outside the lung do not count: wreck them and the gain stays
    wrecked = [np.where(m, q, 0.0) for q, m in zip(preds, masks)]
    assert fit_bone_gain(cxrs, wrecked, truths, masks) == pytest.approx(expected, rel=1e-10)
    # a bone image twice too strong is halved, and the gained output is then the truth
    doubled = [c - 2 * (c - t) for c, t in zip(cxrs, truths)]
    k = fit_bone_gain(cxrs, doubled, truths, masks)
    assert k == pytest.approx(0.5, rel=1e-12)
    np.testing.assert_allclose(apply_bone_gain(cxrs[0], doubled[0], k), np.clip(truths[0], 0, 1), atol=1e-12)
    with pytest.raises(ValueError, match="zero"):
        fit_bone_gain(cxrs, cxrs, truths, masks)


def test_bone_gain_rows_fit_on_validation_films_and_apply_the_gain_to_new_ones():
    from gl_lcm.jobs.real_pairs import PairSet, add_bone_gain_rows, gained_name

    rng = np.random.default_rng(2)
    films = [rng.uniform(0.5, 0.9, (SIZE, SIZE)) for _ in range(5)]
    truths = [c - rng.uniform(0, 0.1, c.shape) for c in films]
    lookup = {f"f{i}": (c, t) for i, (c, t) in enumerate(zip(films, truths))}
    # a model whose bone image is three times the truth's, so the fitted gain is 1/3
    rows = {"model": lambda names, cxrs, masks: [lookup[n][0] - 3 * (lookup[n][0] - lookup[n][1]) for n in names]}
    masks = [np.ones((SIZE, SIZE), bool)] * 5
    validation = PairSet("validation", ["f0", "f1", "f2"], films[:3], truths[:3], masks[:3], "")
    gains = add_bone_gain_rows(rows, validation, ["model"], SIZE, batch=2)
    assert gains["model"] == pytest.approx(1 / 3, rel=1e-6)  # resize_square works in float32
    # on films it was not fitted on, the gained row undoes the factor 3: its output is the truth
    out = rows[gained_name("model")](["f3", "f4"], films[3:], masks[3:])
    for o, t in zip(out, truths[3:]):
        np.testing.assert_allclose(o, t, atol=1e-6)


def test_table_shows_bone_columns_only_where_a_method_has_them():
    plain = {"a": {"psnr": (30.0, 1.0)}}
    assert "bone PSNR" not in markdown_table(plain)
    table = markdown_table({**plain, "b": {"psnr": (31.0, 1.0), "bone_psnr": (12.5, 0.5), "bone_ssim": (0.5, 0.1)}})
    header, _, row_a, row_b = table.strip().splitlines()
    assert header.endswith("| bone PSNR (lung) ↑ | bone SSIM (lung) ↑ |")
    assert row_a.endswith("| – | – |") and row_b.endswith("| 12.50 ± 0.50 | 0.5000 ± 0.1000 |")


def test_job_configs_chain_each_seed_and_reject_unknown_keys(tmp_path):
    from gl_lcm.jobs.real_pairs import real_pairs_configs

    runs = tmp_path / "runs"
    cfgs = real_pairs_configs(tmp_path / "data", runs, [3, 7], tmp_path / "out", ["train.log_every=5"])
    assert cfgs["teacher"].checkpoints.vqgan == str(runs / "vqgan" / "model.pt")
    for s in (3, 7):
        student, onestep, base = cfgs[f"student_seed{s}"], cfgs[f"onestep_seed{s}"], cfgs[f"baseline_seed{s}"]
        assert student.seed == onestep.seed == base.seed == s
        assert onestep.checkpoints.student == str(Path(student.train.output_dir) / "model.pt")
        assert base.checkpoints.teacher == str(runs / "teacher" / "model.pt")
        assert len({student.train.output_dir, onestep.train.output_dir, base.train.output_dir}) == 3
    assert all(c.train.log_every == 5 for c in cfgs.values())
    assert all(c.data.root == str(tmp_path / "data") and c.data.image_size == 128 for c in cfgs.values())
    with pytest.raises(ConfigError, match="train.log_evry"):
        real_pairs_configs(tmp_path / "data", runs, [0], tmp_path / "out", ["train.log_evry=5"])


def test_real_pairs_job_end_to_end_on_phantoms(tmp_path):
    """Every stage for a few steps on 128 px phantoms, then the report with its tables and files (~40 s)."""
    from gl_lcm.data.phantom import write_phantom_dataset
    from gl_lcm.jobs.real_pairs import PUBLISHED, run_real_pairs

    write_phantom_dataset(tmp_path / "data", n=24, size=128, seed=0)
    res = run_real_pairs(str(tmp_path / "data"), runs=str(tmp_path / "runs"), out=str(tmp_path / "out"),
                         seeds=(0, 1), shared=None, progress=False,
                         overrides=["train.max_steps=4", "train.val_every=4", "train.ckpt_every=4",
                                    "vqgan.adversarial_start_step=2", "onestep.latent_only_steps=2",
                                    "train.lr_milestones=[2]"])
    held_out = res["sets"]["held-out BSE-JSRT"]
    assert PUBLISHED in held_out["summaries"] and "bone_ssim" in held_out["summaries"][PUBLISHED]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "baseline_seed1" in report and "Paired differences" in report
    assert (tmp_path / "out" / "figure.png").is_file() and (tmp_path / "out" / "per_image_0.csv").is_file()
    # the bone-gain rows: gains fitted on the validation films, rows in every table, listed in the report
    from gl_lcm.jobs.real_pairs import baseline_name, gained_name, onestep_name
    gained = gained_name(onestep_name(0, 1))
    assert set(res["bone_gains"]) >= {onestep_name(0, 1), baseline_name(1, "one pass, global")}
    assert gained in held_out["summaries"] and gained in held_out["paired_identity"]
    assert f"{gained} - {gained_name(baseline_name(0, 'one pass, global'))}" in held_out["paired_baseline"]
    assert f"| {onestep_name(0, 1)} | {res['bone_gains'][onestep_name(0, 1)]:.3f} |" in report
