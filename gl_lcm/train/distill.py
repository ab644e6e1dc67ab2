"""Latent consistency distillation task (Luo et al. 2023): teacher -> few-step student.

Student and target start as copies of the teacher (EMA weights). Each step draws a point
of the 50-point skipping-step grid (k = T/50), runs the teacher's DDIM step from t to
t - k, and pulls the student's consistency output at t towards the target network's
output at t - k (pseudo-Huber, c = 0.001). The target is an EMA of the student (0.95)
and is what samples: it is saved as ``ema`` in model.pt.
"""
from __future__ import annotations

import copy

from gl_lcm.config import Config, config_from_checkpoint
from gl_lcm.diffusion.distill import consistency_distillation_loss, solver_timesteps
from gl_lcm.diffusion.schedule import offset_noise
from gl_lcm.models.factory import load_denoiser, update_ema
from gl_lcm.utils.checkpoint import load_checkpoint
from gl_lcm.train.ldm import LDMTask
from gl_lcm.train.loop import Trainer
from gl_lcm.utils import seeding


class DistillTask(LDMTask):
    name = "distill"

    def build(self, trainer: Trainer) -> None:
        super().build(trainer)  # VQGAN, latent pairs, val data, schedule tables, networks below
        self.solver = solver_timesteps(self.cfg.diffusion.num_train_timesteps, self.cfg.distill.num_ddim_timesteps)

    def build_networks(self, trainer: Trainer) -> None:
        """Frozen teacher; student and target network both start as copies of it."""
        teacher, _ = load_denoiser(self.cfg.checkpoints.teacher, trainer.device)
        self.teacher = teacher.requires_grad_(False).eval()
        self.unet = copy.deepcopy(self.teacher).requires_grad_(True).train()
        self.ema = copy.deepcopy(self.teacher).requires_grad_(False)

    def modules(self):
        return {"student": self.unet, "ema": self.ema}

    def optimizer_groups(self):
        return {"student": {"modules": ["student"], "lr": self.cfg.train.lr}}

    def micro_step(self, batch, step, generator):
        c = self.cfg
        x0, cond = batch["target"], batch["cond"]
        b = x0.shape[0]
        noise = offset_noise(x0.shape, 0.0, generator=generator, device=x0.device)
        index = seeding.randint(0, len(self.solver), (b,), generator, x0.device)
        student = self.trainer.net("student")
        loss, diag = consistency_distillation_loss(
            student_fn=lambda x, t: student(x, t, cond),
            teacher_fn=lambda x, t: self.teacher(x, t, cond),
            target_fn=lambda x, t: self.ema(x, t, cond),
            x0=x0, noise=noise, timestep_index=index, solver=self.solver.to(x0.device),
            alphas_cumprod=self.alphas_cumprod, prediction_type=c.diffusion.prediction_type,
            loss_type=c.distill.loss_type, huber_c=c.distill.huber_c, timestep_scaling=c.lcm.timestep_scaling)
        return loss, {"loss": float(loss.detach()), "mse": float(diag["mse"])}

    def after_optimizer_step(self, step):
        update_ema(self.ema, self.unet, self.cfg.distill.target_ema)


def train_distill(cfg: Config, resume: str = "auto", progress: bool = True) -> dict[str, float]:
    """Distil checkpoints.teacher into a student; writes <train.output_dir>/model.pt (target network)."""
    for key in ("vqgan", "teacher"):
        if not getattr(cfg.checkpoints, key):
            raise ValueError(f"checkpoints.{key} is empty: distillation needs the trained VQGAN and teacher")
    teacher_ckpt = load_checkpoint(cfg.checkpoints.teacher, expect_kind="ldm")
    teacher_cfg = config_from_checkpoint(teacher_ckpt["config"])
    # the student has the teacher's architecture and objective, whatever this config says
    cfg.unet, cfg.diffusion = teacher_cfg.unet, teacher_cfg.diffusion
    return Trainer(cfg, DistillTask(cfg), resume=resume, progress=progress).fit()
