"""The plain supervised baseline (ours, not published): does the diffusion machinery earn its cost?

The teacher's UNet architecture, trained from scratch to regress the soft-tissue latent from the CXR latent in
one pass: zeros where the noisy latent goes, t = T-1, output read as x0
(:func:`~gl_lcm.diffusion.samplers.predict_direct`). No noise, no teacher, no distillation. It is trained with
exactly the one-step student's loss (``onestep.*``: latent MSE first, then pixel MSE, MS-SSIM and BSR through
the frozen VQGAN decoder) on the same global and local pairs, so the two differ only in what diffusion adds.

Its checkpoint ('supervised' kind) carries ``diffusion.noise_input: false``, so the inference engine runs it
through the same dual path, decoding and fusion as any denoiser, one network pass per path.
"""
from __future__ import annotations

import copy

from gl_lcm.config import Config, config_from_checkpoint
from gl_lcm.diffusion.samplers import predict_direct
from gl_lcm.models.factory import build_unet
from gl_lcm.train.loop import Trainer
from gl_lcm.train.onestep import OneStepTask
from gl_lcm.utils.checkpoint import load_checkpoint


class SupervisedTask(OneStepTask):
    name = "supervised"
    label = "plain supervised baseline"

    def build_networks(self, trainer: Trainer) -> None:
        """A freshly initialised UNet of the configured architecture (the teacher's) and its EMA."""
        self.unet = build_unet(self.cfg.unet, self.latent_channels)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False)

    def micro_step(self, batch, step, generator):
        z = predict_direct(self.trainer.net("student"), batch["cond"], self.cfg.diffusion.num_train_timesteps)
        return self.loss(z.float(), batch, step)


def train_baseline(cfg: Config, resume: str = "auto", progress: bool = True) -> dict[str, float]:
    """Train the plain supervised baseline; writes <train.output_dir>/model.pt. checkpoints.teacher, when set,
    gives the UNet architecture (so the baseline is the teacher's network); otherwise ``unet.*`` does."""
    if not cfg.checkpoints.vqgan:
        raise ValueError("checkpoints.vqgan is empty: the baseline works in the VQGAN's latent space "
                         "(train it first: gl-lcm train-vqgan)")
    if cfg.checkpoints.teacher:
        teacher_cfg = config_from_checkpoint(load_checkpoint(cfg.checkpoints.teacher, expect_kind="ldm")["config"])
        cfg.unet = teacher_cfg.unet
    cfg.diffusion.prediction_type = "sample"
    cfg.diffusion.noise_input = False
    cfg.lcm.dynamic_clip = False
    return Trainer(cfg, SupervisedTask(cfg), resume=resume, progress=progress).fit()
