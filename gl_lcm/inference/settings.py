"""The config, resolved once: plain settings objects the inference engine and samplers are built from.

``Config`` stops here. :class:`SamplingSettings` holds what the samplers need (noise schedule, step
count, clipping, guidance) and builds the scheduler and clip objects of :mod:`gl_lcm.diffusion`;
:class:`FusionSettings` and :class:`PixelSettings` hold the fusion and the published-code pixel
conventions. A denoiser's checkpoint may override sampling keys (its prediction type; for a
student that predicts x0 also its clipping and step schedules): each override it makes to a value
of the user's config is printed in one line, key, config value and checkpoint value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from gl_lcm.config import Config
from gl_lcm.diffusion.lcm import DynamicClip, LCMScheduler, dynamic_clip_range
from gl_lcm.diffusion.samplers import predict_direct, sample_ddim, sample_ddpm, sample_lcm
from gl_lcm.diffusion.schedule import alphas_cumprod_from_betas, make_betas
from gl_lcm.fusion import fuse


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling choices: noise schedule, LCM grid, dynamic clipping and local-path guidance."""

    num_train_timesteps: int
    beta_start: float
    beta_end: float
    beta_schedule: str
    prediction_type: str
    original_inference_steps: int
    timestep_scaling: float
    step_schedules: tuple
    num_inference_steps: int
    dynamic_clip: bool
    global_omega: float
    local_omega: float
    clip_b: float
    guidance_mode: str
    guidance_alpha: float
    leg_std_published: bool
    seed: int
    noise_input: bool = True  # False: a plain supervised network, predicted in one pass (predict_direct)

    @classmethod
    def from_config(cls, cfg: Config, denoiser_cfg: Optional[Config] = None, source: str = "checkpoint",
                    log: Callable[[str], None] = print) -> "SamplingSettings":
        """Settings of ``cfg``, with the sampling keys a denoiser's checkpoint config decides.

        The sampler must read the network's output the way it was trained (a one-step student
        predicts x0, its teacher epsilon); a student that predicts x0 is also sampled with the
        dynamic-clipping setting and ``lcm.step_schedules`` it was trained with.
        """
        d, lcm = cfg.diffusion, cfg.lcm
        values = {"diffusion.prediction_type": d.prediction_type, "lcm.dynamic_clip": lcm.dynamic_clip,
                  "lcm.step_schedules": lcm.step_schedules, "diffusion.noise_input": d.noise_input}
        if denoiser_cfg is not None:
            own = {"diffusion.prediction_type": denoiser_cfg.diffusion.prediction_type,
                   "diffusion.noise_input": denoiser_cfg.diffusion.noise_input}
            if own["diffusion.prediction_type"] == "sample":
                own.update({"lcm.dynamic_clip": denoiser_cfg.lcm.dynamic_clip,
                            "lcm.step_schedules": denoiser_cfg.lcm.step_schedules})
            for key, value in own.items():
                if value != values[key]:
                    log(f"{source} sets {key}: config {values[key]!r} -> checkpoint {value!r}")
                    values[key] = value
        return cls(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                   beta_schedule=d.beta_schedule, prediction_type=values["diffusion.prediction_type"],
                   original_inference_steps=lcm.original_inference_steps, timestep_scaling=lcm.timestep_scaling,
                   step_schedules=tuple(tuple(s) for s in values["lcm.step_schedules"]),
                   num_inference_steps=lcm.num_inference_steps, dynamic_clip=values["lcm.dynamic_clip"],
                   global_omega=lcm.global_omega, local_omega=lcm.local_omega, clip_b=lcm.clip_b,
                   guidance_mode=cfg.guidance.mode, guidance_alpha=cfg.guidance.alpha,
                   leg_std_published=cfg.reference.leg_std == "published", seed=cfg.seed,
                   noise_input=values["diffusion.noise_input"])

    def scheduler(self) -> LCMScheduler:
        """A fresh LCMScheduler for this noise schedule and prediction type."""
        return LCMScheduler(num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                            beta_end=self.beta_end, beta_schedule=self.beta_schedule,
                            original_inference_steps=self.original_inference_steps,
                            prediction_type=self.prediction_type, timestep_scaling=self.timestep_scaling,
                            step_schedules=[list(s) for s in self.step_schedules])

    def clip(self, omegas) -> Optional[DynamicClip]:
        """Per-sample LCM clip ranges for base ranges ``omegas``, or None when dynamic clipping is off."""
        if not self.dynamic_clip:
            return None
        return DynamicClip(tuple(float(o) for o in omegas), self.clip_b, self.num_train_timesteps,
                           self.original_inference_steps)

    def dual_path_clip(self, batch: int) -> Optional[DynamicClip]:
        """Clip ranges of a dual-path batch: ``batch`` global samples, then ``batch`` local ones."""
        return self.clip([self.global_omega] * batch + [self.local_omega] * batch)


@torch.no_grad()
def sample_single_path(model, cond: torch.Tensor, settings: SamplingSettings, num_steps: int, generator=None,
                       sampler: str = "lcm", clip_omega: Optional[float] = None,
                       noise: Optional[torch.Tensor] = None, progress: bool = False) -> torch.Tensor:
    """One path (baselines, validation): B x C x h x w latent conditioned on ``cond`` (B x C x h x w).

    sampler 'lcm' (``num_steps`` LCM steps), 'ddim' (eta 0) or 'ddpm' (all T ancestral steps; with
    fewer ``num_steps`` than T, a strided ancestral grid: DDIM with eta 1, for smoke runs); dynamic clipping with base ``clip_omega`` (default: the global path's) when it is on.
    """
    s = settings
    if not s.noise_input:  # a plain supervised network: one pass, whatever the sampler
        return predict_direct(model, cond, s.num_train_timesteps)
    x_T = noise if noise is not None else torch.randn(cond.shape, generator=generator).to(cond.device)
    fn = lambda x, t: model(x, t, cond)
    omega = s.global_omega if clip_omega is None else clip_omega
    if sampler == "lcm":
        scheduler = s.scheduler()
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.tolist()
        clip_at = s.clip([omega] * cond.shape[0])
        lcm_clip = (lambda j: clip_at(timesteps[j])) if clip_at is not None else None
        return sample_lcm(fn, scheduler, x_T, num_steps, generator=generator, clip_range_fn=lcm_clip,
                          progress=progress)
    # DDIM / DDPM count their own steps (BS-LDM's thresholding)
    clip = (lambda j: dynamic_clip_range(j, omega, s.clip_b)) if s.dynamic_clip else None
    betas = make_betas(s.beta_schedule, s.num_train_timesteps, s.beta_start, s.beta_end)
    if sampler == "ddim":
        return sample_ddim(fn, alphas_cumprod_from_betas(betas), x_T, num_steps, eta=0.0, generator=generator,
                           prediction_type=s.prediction_type, clip_range_fn=clip, progress=progress)
    if sampler == "ddpm" and num_steps < s.num_train_timesteps:
        return sample_ddim(fn, alphas_cumprod_from_betas(betas), x_T, num_steps, eta=1.0, generator=generator,
                           prediction_type=s.prediction_type, clip_range_fn=clip, progress=progress)
    if sampler == "ddpm":
        return sample_ddpm(fn, betas, x_T, generator=generator, prediction_type=s.prediction_type,
                           clip_range_fn=clip, progress=progress)
    raise ValueError(f"unknown sampler {sampler!r}; valid: lcm, ddim, ddpm")


@dataclass(frozen=True)
class FusionSettings:
    """Global-local fusion: mode, Poisson backend, feathering (pixels at 1024), mask erosion (pixels) and
    the torch backend's fixed CG iteration count (0: to tolerance)."""

    mode: str
    backend: str
    feather_px: float
    erode_px: int
    cg_iterations: int = 0

    @classmethod
    def from_config(cls, cfg: Config) -> "FusionSettings":
        f = cfg.fusion
        return cls(mode=f.mode, backend=f.backend, feather_px=f.feather_px, erode_px=f.erode_px,
                   cg_iterations=f.cg_iterations)

    def fuse(self, global_img: np.ndarray, local_img: np.ndarray, mask: np.ndarray, mode: Optional[str] = None,
             device=None) -> np.ndarray:
        """:func:`gl_lcm.fusion.fuse` with these settings; the feathering scales with the image size, the
        erosion does not (the decoder rim is about a latent cell wide whatever the resolution).
        ``device``: where the torch Poisson backend solves."""
        scale = global_img.shape[0] / 1024
        mode = mode or self.mode
        fixed = {"fixed_iterations": self.cg_iterations} if mode == "poisson" and self.backend == "torch" \
            and self.cg_iterations else {}
        return fuse(mode, global_img, local_img, mask, backend=self.backend, erode_px=self.erode_px,
                    feather_px=self.feather_px * scale, device=device if self.backend == "torch" else None, **fixed)


@dataclass(frozen=True)
class PixelSettings:
    """Image size and the pixel conventions of the published code (``reference.*``)."""

    image_size: int
    published_conversions: bool
    mean_shift: str
    requantize: bool
    cxr_minus_bone: bool = False  # eval.output: the output is CXR - (D(E(CXR)) - prediction) (ours)

    @classmethod
    def from_config(cls, cfg: Config) -> "PixelSettings":
        r = cfg.reference
        return cls(image_size=cfg.data.image_size, published_conversions=r.conversions == "published",
                   mean_shift=r.mean_shift, requantize=r.requantize,
                   cxr_minus_bone=cfg.eval.output == "cxr_minus_bone")

