"""One-step fine-tuning of a consistency student through the frozen VQGAN decoder (ours, not published).

Consistency distillation teaches the student the teacher's probability-flow ODE; with one step its
latent estimate at t = T-1 lands far from the soft-tissue image (the demo's 1-step student scored
below the identity baseline). Bone suppression is a nearly deterministic image-to-image task, so this
task trains the *sampler's own computation* end to end against the ground-truth image:

    x_t = add_noise(z0, eps, t)                           t from the LCM timesteps of 1/2/4-step sampling
    x0  = clip(x0_from(model(x_t, t, cond)), +-(omega + b j))   the sampler's dynamic clipping at t
    z   = c_skip(t) x_t + c_out(t) x0                     LCM boundary condition (what one LCM step returns)
    loss = MSE(D(z), image) + w_ms (1 - MS-SSIM(D(z), image)) + w_lat MSE(z, z0)
           + w_bsr (1 - BSR(cxr, image, D(z)))               the published bone suppression ratio per image

(the first ``onestep.latent_only_steps`` steps use MSE(z, z0) alone: the decoder pass costs most of a
step on the CPU). The student predicts x0 directly (``onestep.prediction_type: sample``): with an
epsilon output the estimate at t = T-1 is (x_t - 0.998 eps) / 0.068, so every error is amplified ~15x.
It is trained and sampled without dynamic clipping (``lcm.dynamic_clip: false`` in its config): at
t = T-1 the 50-step clip range (+-omega = +-2 for the global path) cuts 5.7 % of the demo's soft-tissue
latent values, and a one-step estimate is final.

D is the frozen VQGAN decoder (gradients pass through it, its weights stay fixed). Training on the
timesteps that 1, 2 and 4-step sampling visit keeps every step count usable; with
``lcm.step_schedules`` (ours, e.g. 999/99 for 2 steps) those are the schedules' timesteps, and the
student's checkpoint carries the schedules so that it is sampled at the timesteps it learnt. With
``onestep.rollout`` a sample at a later timestep noises the student's own (detached) one-step
estimate instead of z0, which is what a 2- or 4-step sampler feeds it, so the later steps learn to
correct the first estimate rather than to trust it; with ``onestep.rollout_chain`` the estimate is the one
a sampler holds just before that timestep (through all earlier steps of a schedule that visits it). The result is a
'distill'-kind checkpoint, so the inference engine (dual path, guidance, fusion) uses it unchanged.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from gl_lcm.config import Config, config_from_checkpoint
from gl_lcm.data.datasets import masked
from gl_lcm.data.pairs import PairedDataset
from gl_lcm.diffusion.distill import consistency_output
from gl_lcm.diffusion.lcm import LCMScheduler, clip_grid_index, dynamic_clip_range
from gl_lcm.diffusion.schedule import add_noise
from gl_lcm.losses import bone_residual_loss, ms_ssim
from gl_lcm.models.factory import load_denoiser, update_ema
from gl_lcm.utils.checkpoint import load_checkpoint
from gl_lcm.train.ldm import LDMTask, psnr_batch
from gl_lcm.train.loop import Trainer
from gl_lcm.utils import seeding


def union_timesteps(schedules) -> list[int]:
    """The timesteps any of ``schedules`` visits, descending."""
    return sorted({t for s in schedules for t in s}, reverse=True)


def step_schedules_of(step_counts, num_train_timesteps: int, original_inference_steps: int,
                      step_schedules=()) -> list[list[int]]:
    """The descending timestep list that sampling with each of ``step_counts`` visits (one list per count)."""
    out = []
    for n in step_counts:
        s = LCMScheduler(num_train_timesteps=num_train_timesteps, original_inference_steps=original_inference_steps,
                         step_schedules=step_schedules)
        s.set_timesteps(int(n))
        out.append([int(t) for t in s.timesteps.tolist()])
    return out


def rollout_chains(timesteps, schedules, picks) -> list[list[int]]:
    """For each sample's timestep, the timesteps a sampler visits before it: those preceding it in one of the
    ``schedules`` that visits it at a later position, chosen by ``picks`` (uniform in [0, 1), one per sample)
    among such schedules; [] where no schedule visits it after another step (the first timestep).

    Example: schedules [[999], [999, 99], [999, 499, 259, 99]]: 259 -> [999, 499]; 99 -> [999] or
    [999, 499, 259] (pick < 0.5 or not); 999 -> [].
    """
    chains = []
    for t, u in zip(timesteps, picks):
        options = [s[:s.index(int(t))] for s in schedules if int(t) in s[1:]]
        chains.append(options[min(int(u * len(options)), len(options) - 1)] if options else [])
    return chains


def dominant_loss_term(terms: dict[str, float], main: str = "onestep.pixel_weight",
                       limit: float = 5.0) -> Optional[str]:
    """A one-line warning when an auxiliary loss term exceeds ``limit`` times the ``main`` term, else None.

    ``terms``: config key of the term's weight -> weighted value (a scalar >= 0); the pixel MSE is the term the
    others support. The published BSR divides by the image's bone energy, so on faint-bone data (BSE-JSRT,
    1 - BSR of 3.5-6.2 per batch) ``onestep.bsr_weight: 0.05`` weighed 12-22x the pixel MSE and cost 1.2-1.3 dB PSNR
    (on the phantoms it is 0.5x); this says so at the first pixel step (again after a resume). None when the main term is off (0).
    """
    base = terms.get(main, 0.0)
    if base <= 0:
        return None
    for key, value in terms.items():
        if key != main and value > limit * base:
            hint = " (on faint-bone data such as BSE-JSRT, onestep.bsr_weight: 0)" if "bsr" in key else ""
            return (f"loss balance: the {key} term is {value:.4g}, {value / base:.0f}x the {main} term "
                    f"({base:.4g}), so it steers training; lower {key} if that is not meant{hint}")
    return None


def clip_ranges(timesteps: torch.Tensor, omegas: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Per-sample x0 clip range the LCM sampler uses at ``timesteps`` (B,) for base ``omegas`` (B,)."""
    d = cfg.diffusion
    return torch.tensor([dynamic_clip_range(clip_grid_index(int(t), d.num_train_timesteps,
                                                            cfg.lcm.original_inference_steps), float(o), cfg.lcm.clip_b)
                         for t, o in zip(timesteps.tolist(), omegas.tolist())])


class LatentImagePairs(Dataset):
    """Global and local training items: condition latent, target latent, target image and clip base.

    Latents come from the latent cache; images are read from disk per item (B x 1 x H x W in [-1, 1]).
    """

    def __init__(self, latents: dict, images: PairedDataset, paths: list[str], omegas: dict[str, float]):
        self.latents, self.images, self.omegas = latents, images, omegas
        self.items = [(p, i) for i in range(len(images)) for p in ("global", "local") if p in paths]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, i = self.items[index]
        pair = self.images[i]
        if path == "global":
            return {"cond": self.latents["cxr"][i], "target": self.latents["bs"][i], "image": pair["bs"],
                    "cxr": pair["cxr"], "omega": torch.tensor(self.omegas["global"])}
        mask = pair["mask"][None]
        return {"cond": self.latents["masked_cxr"][i], "target": self.latents["masked_bs"][i],
                "image": masked(pair["bs"][None], mask)[0], "cxr": masked(pair["cxr"][None], mask)[0],
                "omega": torch.tensor(self.omegas["local"])}


class OneStepTask(LDMTask):
    name = "distill"  # a student checkpoint: the inference engine loads it like a distilled one
    label = "one-step student"

    def build(self, trainer: Trainer) -> None:
        cfg, o = self.cfg, self.cfg.onestep
        super().build(trainer)  # VQGAN, latent cache, networks, schedule tables, validation data
        self.schedules = step_schedules_of(o.step_counts, cfg.diffusion.num_train_timesteps,
                                           cfg.lcm.original_inference_steps, cfg.lcm.step_schedules)
        self.timesteps = torch.tensor(union_timesteps(self.schedules))
        rest = (1.0 - o.first_step_weight) / max(1, len(self.timesteps) - 1)
        probs = torch.tensor([o.first_step_weight] + [rest] * (len(self.timesteps) - 1), dtype=torch.float64)
        self.t_cdf = (probs.cumsum(0) / probs.sum()).float()

    def make_train_set(self, latents: dict, pairs) -> Dataset:
        cfg = self.cfg
        images = PairedDataset(pairs, cfg.data.image_size, with_mask="local" in cfg.diffusion.paths)
        return LatentImagePairs(latents, images, list(cfg.diffusion.paths),
                                {"global": cfg.lcm.global_omega, "local": cfg.lcm.local_omega})

    def build_networks(self, trainer: Trainer) -> None:
        """Student and its EMA start from checkpoints.student (or the teacher when that is empty)."""
        path = self.cfg.checkpoints.student or self.cfg.checkpoints.teacher
        start, _ = load_denoiser(path, trainer.device)
        self.unet = copy.deepcopy(start).requires_grad_(True).train()
        self.ema = copy.deepcopy(start).requires_grad_(False)

    def modules(self):
        return {"student": self.unet, "ema": self.ema}

    def optimizer_groups(self):
        return {"student": {"modules": ["student"], "lr": self.cfg.train.lr}}

    def micro_step(self, batch, step, generator):
        o = self.cfg.onestep
        z0, cond, omega = batch["target"], batch["cond"], batch["omega"]
        b, dev = z0.shape[0], z0.device
        u = seeding.rand(b, generator, "cpu")
        t = self.timesteps[torch.searchsorted(self.t_cdf, u, right=True).clamp_max(len(self.timesteps) - 1)].to(dev)
        noise = seeding.randn(z0.shape, generator, dev)
        start = z0
        if o.rollout:  # later steps start from the student's own earlier estimate, as in sampling
            noises = [seeding.randn(z0.shape, generator, dev)]
            if o.rollout_chain:  # the steps before t in a schedule that visits it
                picks = seeding.rand(b, generator, "cpu")
                depth = max(len(s) for s in self.schedules) - 1
                noises += [seeding.randn(z0.shape, generator, dev)
                           for _ in range(depth - 1)]
                chains = rollout_chains(t.tolist(), self.schedules, picks.tolist())
            else:  # the first estimate only
                first = int(self.timesteps[0])
                chains = [[first] if ti < first else [] for ti in t.tolist()]
            start = self._rollout(z0, cond, omega, chains, noises)
        x_t = add_noise(start, noise, t, self.alphas_cumprod)
        z = self._estimate(self.trainer.net("student"), x_t, t, cond, omega)
        return self.loss(z, batch, step)

    def loss(self, z, batch, step):
        """The fine-tuning loss of latent estimates z (B x C x h x w) against the batch's target latent and
        image: latent MSE alone for the first ``onestep.latent_only_steps`` steps, then the pixel terms."""
        o = self.cfg.onestep
        z0, image = batch["target"], batch["image"]
        latent_only = step <= o.latent_only_steps
        loss = (1.0 if latent_only else o.latent_weight) * F.mse_loss(z, z0)
        logs = {"latent_mse": float(F.mse_loss(z.detach(), z0))}
        if not latent_only and (o.pixel_weight > 0 or o.msssim_weight > 0 or o.bsr_weight > 0):  # frozen decoder
            # decoded as the engine decodes samples (reference.requantize, default false: no snapping to codes)
            pred = self.vqgan.decode(z, requantize=self.cfg.reference.requantize).float()
            mse = F.mse_loss(pred, image.float())
            loss = loss + o.pixel_weight * mse
            logs.update(pixel_mse=float(mse.detach()), psnr=float(psnr_batch(pred.detach().clamp(-1, 1), image).mean()))
            if o.msssim_weight > 0:
                sim = ms_ssim(pred.clamp(-1, 1), image.float())
                loss = loss + o.msssim_weight * (1 - sim)
                logs["ms_ssim"] = float(sim.detach())
            if o.bsr_weight > 0:
                residual = bone_residual_loss(batch["cxr"], image, pred.clamp(-1, 1))
                loss = loss + o.bsr_weight * residual
                logs["bsr"] = 1.0 - float(residual.detach())
            if not getattr(self, "_balance_checked", False):  # once, at the first step with the pixel terms
                self._balance_checked = True
                terms = {"onestep.latent_weight": o.latent_weight * logs["latent_mse"],
                         "onestep.pixel_weight": o.pixel_weight * logs["pixel_mse"]}
                if "ms_ssim" in logs:
                    terms["onestep.msssim_weight"] = o.msssim_weight * (1 - logs["ms_ssim"])
                if "bsr" in logs:
                    terms["onestep.bsr_weight"] = o.bsr_weight * (1 - logs["bsr"])
                warning = dominant_loss_term(terms)
                if warning:
                    self.trainer.log(f"step {step} {warning}")
        logs["loss"] = float(loss.detach())
        return loss, logs

    @torch.no_grad()
    def _rollout(self, z0, cond, omega, chains, noises):
        """The (detached) estimate a sampler holds after the steps of each sample's chain; z0 where it is empty.
        Step j of every chain noises the previous estimate (z0 for j = 0) with ``noises[j]``."""
        lengths = torch.tensor([len(c) for c in chains], device=z0.device)
        if not bool((lengths > 0).any()):
            return z0
        current = z0.clone()
        for j in range(int(lengths.max())):
            sel = lengths > j
            t_j = torch.tensor([c[j] for c in chains if len(c) > j], device=z0.device)
            x = add_noise(z0[sel] if j == 0 else current[sel], noises[j][sel], t_j, self.alphas_cumprod)
            current[sel] = self._estimate(self.unet, x, t_j, cond[sel], omega[sel]).to(current.dtype)
        return current  # still z0 where the chain is empty

    def _estimate(self, net, x_t, t, cond, omega):
        """What one LCM step returns at t: the boundary-condition output with the sampler's clipping."""
        c = self.cfg
        out = net(x_t, t, cond)
        clip = clip_ranges(t.cpu(), omega.cpu(), c).to(x_t.device) if c.lcm.dynamic_clip else None
        return consistency_output(out.float(), x_t, t, self.alphas_cumprod, c.diffusion.prediction_type,
                                  timestep_scaling=c.lcm.timestep_scaling, clip_range=clip)

    def after_optimizer_step(self, step):
        update_ema(self.ema, self.unet, self.cfg.train.ema_decay if step > 1 else 0.0)


def train_onestep(cfg: Config, resume: str = "auto", progress: bool = True) -> dict[str, float]:
    """Fine-tune checkpoints.student (or .teacher) for 1-4 step sampling; writes <train.output_dir>/model.pt."""
    for key in ("vqgan", "teacher"):
        if not getattr(cfg.checkpoints, key):
            raise ValueError(f"checkpoints.{key} is empty: one-step fine-tuning needs the VQGAN and the teacher "
                             f"(its architecture and schedule; checkpoints.student, if set, is the starting point)")
    teacher_cfg = config_from_checkpoint(load_checkpoint(cfg.checkpoints.teacher, expect_kind="ldm")["config"])
    cfg.unet, cfg.diffusion = teacher_cfg.unet, teacher_cfg.diffusion
    if cfg.onestep.prediction_type == "sample":  # saved with the student, so sampling reads its output as x0
        cfg.diffusion.prediction_type = "sample"
    return Trainer(cfg, OneStepTask(cfg), resume=resume, progress=progress).fit()
