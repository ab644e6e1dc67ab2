"""One-step fine-tuning: the timesteps it trains on, and that its training estimate is exactly what
one LCM sampler step returns (checked against diffusers' LCMScheduler)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import LCMScheduler as Reference

from gl_lcm.config import load_config
from gl_lcm.diffusion.distill import consistency_output
from gl_lcm.diffusion.schedule import alphas_cumprod_from_betas, make_betas
from gl_lcm.train.onestep import clip_ranges, step_schedules_of, union_timesteps


def sampler_timesteps(step_counts, num_train_timesteps, original_inference_steps, step_schedules=()):
    """The timesteps the one-step task trains on (what train_onestep derives from its schedules)."""
    return union_timesteps(step_schedules_of(step_counts, num_train_timesteps, original_inference_steps,
                                             step_schedules))


def test_sampler_timesteps_are_the_union_of_diffusers_lcm_timesteps():
    union = set()
    for n in (1, 2, 4):
        s = Reference(original_inference_steps=50)
        s.set_timesteps(n)
        union |= set(s.timesteps.tolist())
    assert sampler_timesteps([1, 2, 4], 1000, 50) == sorted(union, reverse=True) == [999, 759, 499, 259]
    assert sampler_timesteps([1], 1000, 50) == [999]
    # lcm.step_schedules replace the spacing of the step counts they have: 2 -> [999, 259], 4 stays
    assert sampler_timesteps([1, 2, 4], 1000, 50, [[999, 259]]) == [999, 759, 499, 259]
    assert sampler_timesteps([1, 2], 1000, 50, [[999, 259]]) == [999, 259]
    assert sampler_timesteps([1, 2, 4], 1000, 50, [[999, 259], [999, 499, 259, 99]]) == [999, 499, 259, 99]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_estimate_is_one_lcm_step(prediction_type):
    """consistency_output with the sampler's clip range == diffusers' LCM step 'denoised' at the same t,
    for the global and the local clip base (omega + b j, j on the 50-point grid)."""
    cfg = load_config(None, ["lcm.global_omega=0.5", "lcm.local_omega=0.9", "lcm.clip_b=0.05",
                             f"diffusion.prediction_type={prediction_type}"])
    d = cfg.diffusion
    ac = alphas_cumprod_from_betas(make_betas(d.beta_schedule, d.num_train_timesteps, d.beta_start, d.beta_end))
    g = torch.Generator().manual_seed(0)
    timesteps = torch.tensor([999, 759, 499, 259])
    omegas = torch.tensor([0.5, 0.9, 0.5, 0.9])
    x_t = torch.randn(4, 4, 8, 8, generator=g) * 1.5
    out = torch.randn(4, 4, 8, 8, generator=g)
    ours = consistency_output(out, x_t, timesteps, ac, prediction_type, timestep_scaling=cfg.lcm.timestep_scaling,
                              clip_range=clip_ranges(timesteps, omegas, cfg))
    for i, (t, omega) in enumerate(zip(timesteps.tolist(), omegas.tolist())):
        j = (999 - t) // 20  # position of t on the 50-point grid 999, 979, ..., 19
        ref = Reference(beta_start=d.beta_start, beta_end=d.beta_end, beta_schedule=d.beta_schedule,
                        prediction_type=prediction_type, original_inference_steps=50, clip_sample=True,
                        clip_sample_range=omega + 0.05 * j, timestep_scaling=cfg.lcm.timestep_scaling)
        ref.set_timesteps(4)
        ref.set_begin_index(ref.timesteps.tolist().index(t))
        denoised = ref.step(out[i:i + 1], t, x_t[i:i + 1], generator=torch.Generator().manual_seed(1)).denoised
        torch.testing.assert_close(ours[i:i + 1], denoised, atol=1e-5, rtol=1e-5)
    unclipped = consistency_output(out, x_t, timesteps, ac, prediction_type, timestep_scaling=10.0)
    assert (unclipped - ours).abs().max() > 0.1  # the clip range binds here


def test_sampling_reads_the_denoisers_own_output_type(tmp_path):
    """The pipeline samples an x0-predicting one-step student as x0 and with the clipping it was trained
    with, whatever the evaluation config says; an epsilon teacher keeps the evaluation config's clipping."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_config, write_tiny_checkpoints

    from gl_lcm.diffusion.noise import PerImageNoise
    from gl_lcm.diffusion.samplers import sample_dual_path
    from gl_lcm.inference import InferenceEngine, SamplingSettings

    teacher_cfg = tiny_config()
    student_cfg = tiny_config(["diffusion.prediction_type=sample", "lcm.dynamic_clip=false",
                               "lcm.step_schedules=[[999, 259]]"])
    paths = write_tiny_checkpoints(tmp_path / "t", teacher_cfg)
    student_paths = write_tiny_checkpoints(tmp_path / "s", student_cfg)
    use = tiny_config([f"checkpoints.vqgan={paths['vqgan']}", f"checkpoints.student={student_paths['student']}",
                       f"checkpoints.teacher={paths['teacher']}", "lcm.dynamic_clip=true"])
    notices = []
    student = InferenceEngine.from_config(use, model="student", segmenter=False).sampling
    assert student.prediction_type == "sample" and student.dynamic_clip is False
    assert student.step_schedules == ((999, 259),)  # the schedule it was trained on travels with it
    seen = []

    def recording(x, t, cond):
        seen.append(sorted(set(t.tolist())))
        return torch.zeros_like(x)

    cond = torch.zeros(1, 4, 4, 4)
    gens = [torch.Generator().manual_seed(0)]
    for steps, expected in ((2, [[999], [259]]), (4, [[999], [759], [499], [259]]), (1, [[999]])):
        seen.clear()
        sample_dual_path(recording, student.scheduler(), cond, cond, steps, PerImageNoise(gens, (4, 4, 4), "cpu"),
                         guidance_mode="vanilla", clip_range_fn=student.dual_path_clip(1))
        assert seen == expected
    teacher = InferenceEngine.from_config(use, model="teacher", segmenter=False).sampling
    assert teacher.prediction_type == "epsilon" and teacher.dynamic_clip is True
    assert teacher.step_schedules == ()
    assert use.diffusion.prediction_type == "epsilon" and use.lcm.dynamic_clip is True  # the caller's config untouched
    assert use.lcm.step_schedules == []
    eps_no_clip = tiny_config(["lcm.dynamic_clip=false"])
    # an epsilon denoiser's training clip setting is not imposed, and nothing is announced
    assert SamplingSettings.from_config(use, eps_no_clip, log=notices.append) == SamplingSettings.from_config(use)
    assert notices == []
    # a checkpoint that overrides the user's keys says so, one line per key: key, config value, checkpoint value
    SamplingSettings.from_config(use, student_cfg, source="s.pt", log=notices.append)
    assert notices == ["s.pt sets diffusion.prediction_type: config 'epsilon' -> checkpoint 'sample'",
                       "s.pt sets lcm.dynamic_clip: config True -> checkpoint False",
                       "s.pt sets lcm.step_schedules: config [] -> checkpoint [[999, 259]]"]


def test_rollout_feeds_later_timesteps_the_students_own_noised_estimate():
    """onestep.rollout: a sample at a later timestep sees add_noise(first estimate, eps, t), where the first
    estimate is what one LCM step at t = 999 returns from add_noise(z0, eps', 999); t = 999 samples see z0."""
    from types import SimpleNamespace

    from gl_lcm.diffusion.distill import consistency_output
    from gl_lcm.diffusion.schedule import add_noise
    from gl_lcm.train.onestep import OneStepTask

    cfg = load_config(None, ["diffusion.prediction_type=sample", "lcm.dynamic_clip=false", "onestep.rollout=true",
                             "onestep.latent_only_steps=10"])
    d = cfg.diffusion
    ac = alphas_cumprod_from_betas(make_betas(d.beta_schedule, d.num_train_timesteps, d.beta_start, d.beta_end))
    seen = []

    class Student(torch.nn.Module):  # predicts x0 = 0.5 * cond + 0.1 * x_t, records its inputs
        def forward(self, x_t, t, cond):
            seen.append((x_t.clone(), t.clone()))
            return 0.5 * cond + 0.1 * x_t

    task = OneStepTask.__new__(OneStepTask)
    task.cfg, task.alphas_cumprod, task.unet = cfg, ac, Student()
    task.trainer = SimpleNamespace(net=lambda name: task.unet)
    task.timesteps = torch.tensor([999, 759, 499, 259])
    task.t_cdf = torch.tensor([0.25, 0.5, 0.75, 1.0])
    b = 16
    g = torch.Generator().manual_seed(5)
    batch = {"target": torch.randn(b, 4, 8, 8, generator=g), "cond": torch.randn(b, 4, 8, 8, generator=g),
             "image": torch.zeros(b, 1, 32, 32), "omega": torch.ones(b)}
    task.micro_step(batch, step=1, generator=torch.Generator().manual_seed(9))

    # the same draws, in the order the task makes them: timestep choice, noise, first-step noise
    r = torch.Generator().manual_seed(9)
    u = torch.rand(b, generator=r)
    t = task.timesteps[torch.searchsorted(task.t_cdf, u, right=True).clamp_max(3)]
    noise, first_noise = torch.randn(b, 4, 8, 8, generator=r), torch.randn(b, 4, 8, 8, generator=r)
    later = t < 999
    assert 0 < int(later.sum()) < b
    z0, cond = batch["target"], batch["cond"]
    t999 = torch.full((int(later.sum()),), 999)
    x_first = add_noise(z0[later], first_noise[later], t999, ac)
    first = consistency_output(0.5 * cond[later] + 0.1 * x_first, x_first, t999, ac, "sample",
                               timestep_scaling=cfg.lcm.timestep_scaling)
    start = z0.clone()
    start[later] = first
    x_t, t_seen = seen[-1]
    assert torch.equal(t_seen, t)
    torch.testing.assert_close(x_t, add_noise(start, noise, t, ac), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(x_t[later], add_noise(z0, noise, t, ac)[later], atol=1e-3)  # not the target's


def test_rollout_chains_are_the_steps_a_sampler_takes_before_each_timestep():
    from gl_lcm.train.onestep import rollout_chains, step_schedules_of

    schedules = step_schedules_of([1, 2, 4], 1000, 50, [[999, 99], [999, 499, 259, 99]])
    assert schedules == [[999], [999, 99], [999, 499, 259, 99]]
    ts = [999, 499, 259, 99, 99, 99]
    picks = [0.9, 0.0, 0.99, 0.0, 0.49, 0.5]
    # plain re-implementation: list every (schedule, position) pair; 99 sits in two schedules
    assert rollout_chains(ts, schedules, picks) == [[], [999], [999, 499], [999], [999], [999, 499, 259]]
    # the diffusers spacing: 4 steps 999/759/499/259, 2 steps 999/499
    plain = step_schedules_of([1, 2, 4], 1000, 50)
    assert plain == [[999], [999, 499], [999, 759, 499, 259]]
    assert rollout_chains([499, 499, 759], plain, [0.2, 0.7, 0.3]) == [[999], [999, 759], [999]]


def test_chained_rollout_feeds_each_timestep_the_estimate_of_the_step_before_it():
    """onestep.rollout_chain: a sample at 259 of the schedule 999/499/259/99 sees add_noise(e2, eps, 259), where
    e1 = LCM step at 999 from add_noise(z0, n0, 999) and e2 = LCM step at 499 from add_noise(e1, n1, 499);
    a sample at 99 follows 999 or 999/499/259 as its pick says."""
    from types import SimpleNamespace

    from gl_lcm.diffusion.distill import consistency_output
    from gl_lcm.diffusion.schedule import add_noise
    from gl_lcm.train.onestep import OneStepTask

    cfg = load_config(None, ["diffusion.prediction_type=sample", "lcm.dynamic_clip=false", "onestep.rollout=true",
                             "onestep.rollout_chain=true", "onestep.latent_only_steps=10"])
    d = cfg.diffusion
    ac = alphas_cumprod_from_betas(make_betas(d.beta_schedule, d.num_train_timesteps, d.beta_start, d.beta_end))
    seen = []

    def x0_of(x_t, cond):
        return 0.5 * cond + 0.1 * x_t

    class Student(torch.nn.Module):
        def forward(self, x_t, t, cond):
            seen.append((x_t.clone(), t.clone()))
            return x0_of(x_t, cond)

    task = OneStepTask.__new__(OneStepTask)
    task.cfg, task.alphas_cumprod, task.unet = cfg, ac, Student()
    task.trainer = SimpleNamespace(net=lambda name: task.unet)
    task.schedules = [[999], [999, 99], [999, 499, 259, 99]]
    task.timesteps = torch.tensor([999, 499, 259, 99])
    task.t_cdf = torch.tensor([0.25, 0.5, 0.75, 1.0])
    b = 24
    g = torch.Generator().manual_seed(5)
    z0, cond = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
    batch = {"target": z0, "cond": cond, "image": torch.zeros(b, 1, 32, 32), "omega": torch.ones(b)}
    task.micro_step(batch, step=1, generator=torch.Generator().manual_seed(9))

    # the task's draws in order: timestep, noise, first-step noise, schedule pick, two more rollout noises
    r = torch.Generator().manual_seed(9)
    u = torch.rand(b, generator=r)
    t = task.timesteps[torch.searchsorted(task.t_cdf, u, right=True).clamp_max(3)]
    noise = torch.randn(b, 4, 8, 8, generator=r)
    n0 = torch.randn(b, 4, 8, 8, generator=r)
    pick = torch.rand(b, generator=r)
    n1, n2 = torch.randn(b, 4, 8, 8, generator=r), torch.randn(b, 4, 8, 8, generator=r)

    def step(z, n, tt, i):  # one LCM step of the toy student on sample i
        tv = torch.tensor([tt])
        x = add_noise(z[None], n[None], tv, ac)
        return consistency_output(x0_of(x, cond[i:i + 1]), x, tv, ac, "sample",
                                  timestep_scaling=cfg.lcm.timestep_scaling)[0]

    expected = z0.clone()
    kinds = set()
    for i in range(b):
        ti = int(t[i])
        if ti == 999:
            continue
        chain = {499: [999], 259: [999, 499]}.get(ti) or ([999] if pick[i] < 0.5 else [999, 499, 259])
        kinds.add((ti, len(chain)))
        z = z0[i]
        for j, (tt, n) in enumerate(zip(chain, (n0, n1, n2))):
            z = step(z, n[i], tt, i)
        expected[i] = z
    assert {(99, 1), (99, 3), (259, 2), (499, 1)} <= kinds  # every chain shape occurs in this draw
    x_t, t_seen = seen[-1]
    assert torch.equal(t_seen, t)
    torch.testing.assert_close(x_t, add_noise(expected, noise, t, ac), atol=1e-5, rtol=1e-5)


def test_bsr_term_scores_the_decoded_estimate_against_the_items_own_radiograph(tmp_path):
    """onestep.bsr_weight adds w * (1 - BSR) of the decoded estimate, with the bone taken from the item's
    own CXR: the whole film on the global path, the masked film on the local one (LatentImagePairs)."""
    from types import SimpleNamespace

    import numpy as np

    from gl_lcm.data.datasets import masked
    from gl_lcm.data.pairs import PairedDataset, find_pairs
    from gl_lcm.data.phantom import write_phantom_dataset
    from gl_lcm.diffusion.distill import consistency_output
    from gl_lcm.diffusion.schedule import add_noise
    from gl_lcm.losses import bone_residual_loss
    from gl_lcm.metrics import bsr
    from gl_lcm.train.onestep import LatentImagePairs, OneStepTask

    write_phantom_dataset(tmp_path, n=2, size=32, seed=0)
    pairs = find_pairs(tmp_path / "CXR", tmp_path / "BS", tmp_path / "Mask")
    images = PairedDataset(pairs, 32, with_mask=True)
    z = torch.zeros(2, 4, 8, 8)
    data = LatentImagePairs({k: z for k in ("cxr", "bs", "masked_cxr", "masked_bs")}, images,
                            ["global", "local"], {"global": 1.0, "local": 1.0})
    glob, loc = data[0], data[1]
    pair = images[0]
    assert torch.equal(glob["cxr"], pair["cxr"]) and torch.equal(glob["image"], pair["bs"])
    inside = pair["mask"] > 0.5
    assert bool(inside.any()) and bool((~inside).any())
    assert torch.equal(loc["cxr"], masked(pair["cxr"][None], pair["mask"][None])[0])
    assert torch.all(loc["cxr"][~inside] == -1) and torch.equal(loc["cxr"][inside], pair["cxr"][inside])

    cfg = load_config(None, ["diffusion.prediction_type=sample", "lcm.dynamic_clip=false", "onestep.bsr_weight=2.0",
                             "onestep.pixel_weight=0", "onestep.msssim_weight=0", "onestep.latent_weight=0"])
    d = cfg.diffusion
    ac = alphas_cumprod_from_betas(make_betas(d.beta_schedule, d.num_train_timesteps, d.beta_start, d.beta_end))

    class Student(torch.nn.Module):
        def forward(self, x_t, t, cond):
            return 0.3 * x_t + cond

    decoder = SimpleNamespace(decode=lambda lat, requantize: torch.tanh(F.interpolate(lat[:, :1], scale_factor=4)))
    task = OneStepTask.__new__(OneStepTask)
    task.cfg, task.alphas_cumprod, task.unet, task.vqgan = cfg, ac, Student(), decoder
    task.trainer = SimpleNamespace(net=lambda name: task.unet)
    task.timesteps, task.t_cdf = torch.tensor([999]), torch.tensor([1.0])
    g = torch.Generator().manual_seed(3)
    batch = {"target": torch.randn(2, 4, 8, 8, generator=g), "cond": torch.randn(2, 4, 8, 8, generator=g),
             "image": torch.stack([glob["image"], loc["image"]]), "cxr": torch.stack([glob["cxr"], loc["cxr"]]),
             "omega": torch.ones(2)}
    loss, logs = task.micro_step(batch, step=1, generator=torch.Generator().manual_seed(4))

    r = torch.Generator().manual_seed(4)
    torch.rand(2, generator=r)
    noise = torch.randn(2, 4, 8, 8, generator=r)
    t = torch.full((2,), 999)
    x_t = add_noise(batch["target"], noise, t, ac)
    est = consistency_output(0.3 * x_t + batch["cond"], x_t, t, ac, "sample", timestep_scaling=cfg.lcm.timestep_scaling)
    pred = decoder.decode(est, requantize=False).clamp(-1, 1)
    to01 = lambda x: (x[0].double().numpy() + 1) / 2  # noqa: E731
    want = np.mean([1 - bsr(to01(c), to01(gt), to01(p)) for c, gt, p in zip(batch["cxr"], batch["image"], pred)])
    assert abs(float(loss) - 2.0 * want) < 1e-4
    assert abs(logs["bsr"] - (1 - want)) < 1e-4
    assert abs(float(loss) - 2.0 * float(bone_residual_loss(batch["cxr"], batch["image"], pred))) < 1e-5


def test_loss_balance_warns_once_when_the_bsr_term_swamps_the_pixel_terms():
    """On faint-bone pairs (BSE-JSRT: CXR and truth differ by a few grey levels) 1 - BSR per image is large, and
    ``onestep.bsr_weight: 0.05`` made that term ~90 % of the loss. The first pixel step says so, once, naming the
    key; with the term off, or on pairs with real bone, it says nothing. Values checked against metrics.bsr."""
    from types import SimpleNamespace

    import numpy as np

    from gl_lcm.metrics import bsr
    from gl_lcm.train.onestep import OneStepTask, dominant_loss_term

    main = "onestep.pixel_weight"
    assert dominant_loss_term({main: 0.1, "b": 0.4, "c": 0.3}) is None  # each under 5x the pixel term
    assert "the b term is 0.6, 6x the onestep.pixel_weight term (0.1)" in dominant_loss_term({main: 0.1, "b": 0.6})
    assert "the b term is 0.6, 6x" in dominant_loss_term({main: 0.1, "b": 0.6, "c": 0.2})  # against pixel alone
    assert "BSE-JSRT" not in dominant_loss_term({main: 0.1, "onestep.msssim_weight": 0.6})  # the BSR hint: BSR only
    assert dominant_loss_term({main: 1.0, "b": 0.01}) is None  # the pixel term leading is the intent
    assert dominant_loss_term({main: 0.0, "b": 1.0}) is None  # pixel term off: nothing to compare with

    g = torch.Generator().manual_seed(0)
    truth = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    pred = truth + 0.1 * torch.randn(2, 1, 32, 32, generator=g)  # decoded estimate, 0.1 off
    z0 = torch.randn(2, 4, 8, 8, generator=g)

    def messages(bone: float, bsr_weight: float) -> list[str]:
        cxr = (truth + bone * torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
        cfg = load_config(None, [f"onestep.bsr_weight={bsr_weight}", "onestep.latent_only_steps=0"])
        task = OneStepTask.__new__(OneStepTask)
        said = []
        task.cfg, task.trainer = cfg, SimpleNamespace(log=said.append)
        task.vqgan = SimpleNamespace(decode=lambda z, requantize: pred)
        batch = {"target": z0, "image": truth, "cxr": cxr}
        for step in (1, 2):
            task.loss(z0 + 0.1, batch, step)
        return said

    faint = messages(bone=0.01, bsr_weight=0.05)
    assert len(faint) == 1 and faint[0].startswith("step 1 ") and "onestep.bsr_weight term" in faint[0]
    to01 = lambda x: (x[0].double().numpy() + 1) / 2  # noqa: E731
    cxr = (truth + 0.01 * torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    want = 0.05 * np.mean([1 - bsr(to01(c), to01(t), to01(p.clamp(-1, 1))) for c, t, p in zip(cxr, truth, pred)])
    said = float(faint[0].split("term is ")[1].split(",")[0])
    assert abs(said - want) <= 1e-3 * want
    assert messages(bone=0.01, bsr_weight=0.0) == []
    assert messages(bone=0.5, bsr_weight=0.05) == []  # real bone: 1 - BSR is below 1, the pixel terms lead


@pytest.mark.parametrize("requantize", [False, True])
def test_pixel_loss_decodes_the_estimate_as_the_inference_engine_does(tmp_path, requantize):
    """The pixel terms score the image the engine will write: the estimate decoded with reference.requantize
    (default false, as the published code: no snapping to the codebook). Trained on the snapped decode, the
    student learnt an image it is never sampled into. Reference: the engine's own decode of the same latent."""
    from types import SimpleNamespace

    from tiny_models import tiny_config, write_tiny_checkpoints

    from gl_lcm.inference.engine import InferenceEngine
    from gl_lcm.train.onestep import OneStepTask

    cfg = tiny_config([f"reference.requantize={str(requantize).lower()}", "onestep.latent_only_steps=0",
                       "onestep.msssim_weight=0", "onestep.bsr_weight=0", "onestep.latent_weight=0",
                       "data.image_size=128"])
    paths = write_tiny_checkpoints(tmp_path, cfg)
    cfg.checkpoints.vqgan, cfg.checkpoints.teacher = str(paths["vqgan"]), str(paths["teacher"])
    engine = InferenceEngine.from_config(cfg, model="teacher", device=torch.device("cpu"), segmenter=False)
    seen = []

    def decode(z, requantize):  # the task's decoder: the engine's VQGAN, recording what it decoded
        seen.append(engine.codec.decode(z, requantize=requantize))
        return seen[-1]

    g = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(2, cfg.vqgan.embed_dim, 16, 16, generator=g)  # far from the codes, so snapping shows
    image = torch.rand(2, 1, 128, 128, generator=g) * 2 - 1
    task = OneStepTask.__new__(OneStepTask)
    task.cfg, task.vqgan, task.trainer = cfg, SimpleNamespace(decode=decode), SimpleNamespace(log=lambda m: None)
    _, logs = task.loss(z, {"target": z, "image": image, "cxr": image}, step=1)

    trained = ((seen[0].detach()[:, 0].clamp(-1, 1) + 1) / 2).numpy()
    written = engine.decode(z)  # what the engine writes for this latent, [0, 1]
    assert abs(logs["pixel_mse"] - F.mse_loss(seen[0][:, 0].detach(), image[:, 0]).item()) < 1e-6
    assert float(abs(trained - written).max()) < 1e-5
    assert float(abs(engine.decode(z, requantize=not requantize) - written).max()) > 1e-2  # told apart
