"""GL-LCM inference: segment -> encode -> dual-path sample -> decode -> fuse.

Dual-path sampling (``dual_path_sample``): the global path [z, E(cxr)] and the local path
[z, E(masked cxr)] start from the same initial noise; at each LCM step both go through the
UNet in ONE batched forward pass (2B samples), the local prediction is guided
(vanilla / CFG / LEG, gl_lcm.diffusion.guidance), and one scheduler step with a per-sample
clip range (global omega vs local omega, growing by b per step) advances both paths.

Every random number of image i comes from its own generator (seeded from the config seed
and the file name), so a result does not depend on batch size or order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch

from gl_lcm.config import Config
from gl_lcm.data.datasets import masked
from gl_lcm.diffusion.guidance import apply_guidance
from gl_lcm.diffusion.lcm import LCMScheduler, dynamic_clip_range
from gl_lcm.diffusion.samplers import sample_ddim, sample_ddpm, sample_lcm
from gl_lcm.diffusion.schedule import alphas_cumprod_from_betas, make_betas
from gl_lcm.fusion import fuse
from gl_lcm.utils.seeding import derive_seed, make_generator


def make_scheduler(cfg: Config) -> LCMScheduler:
    """LCMScheduler for the configured noise schedule and prediction type."""
    d = cfg.diffusion
    return LCMScheduler(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                        beta_schedule=d.beta_schedule, original_inference_steps=cfg.lcm.original_inference_steps,
                        prediction_type=d.prediction_type, timestep_scaling=cfg.lcm.timestep_scaling,
                        step_schedules=cfg.lcm.step_schedules)


def image_generators(seed: int, names: Sequence[str]) -> list[torch.Generator]:
    """One CPU generator per image, seeded from (seed, file name)."""
    return [make_generator(derive_seed(seed, "image", n)) for n in names]


def randn_per_image(gens: Sequence[torch.Generator], shape: Sequence[int], device,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """len(gens) x *shape standard normal, row i drawn from gens[i] (float32 on the CPU, so the
    stream does not depend on device or dtype; then moved and cast to ``dtype``)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(device, dtype)


def clip_grid_index(timestep: int, num_train_timesteps: int, original_inference_steps: int) -> int:
    """Index j of ``timestep`` on the LCM's original grid (0 at t = T-1, the noisiest point).

    Dynamic clipping widens the x0 range by b per step of the published 50-step schedule. A
    sampler with fewer steps jumps along that same grid (4 steps: t = 999, 759, 499, 259 ->
    j = 0, 12, 25, 37), so it gets the range the 50-step sampler has at the same noise level;
    counting its own steps (j = 0..3) would clip the last, nearly clean estimates far too hard.
    With 50 steps j is the step index, as published.
    """
    k = num_train_timesteps // original_inference_steps
    return max(0, (num_train_timesteps - 1 - int(timestep)) // k)


def lcm_clip_at(cfg: Config, omegas: Sequence[float]) -> Optional[Callable[[int], torch.Tensor]]:
    """Per-sample clip ranges (len(omegas),) as a function of the LCM timestep, or None when
    lcm.dynamic_clip is off: omega + b * j with j from :func:`clip_grid_index`."""
    if not cfg.lcm.dynamic_clip:
        return None
    d = cfg.diffusion

    def clip(t: int) -> torch.Tensor:
        j = clip_grid_index(t, d.num_train_timesteps, cfg.lcm.original_inference_steps)
        return torch.tensor([dynamic_clip_range(j, float(o), cfg.lcm.clip_b) for o in omegas])

    return clip


@torch.no_grad()
def sample_latents(model, cond: torch.Tensor, cfg: Config, num_steps: int, generator=None, sampler: str = "lcm",
                   clip_omega: Optional[float] = None, noise: Optional[torch.Tensor] = None,
                   progress: bool = False) -> torch.Tensor:
    """Single-path sampling (baselines, validation): B x C x h x w latent conditioned on ``cond``.

    sampler 'lcm' (``num_steps`` LCM steps), 'ddim' (eta 0) or 'ddpm' (all T ancestral steps).
    Dynamic clipping with base ``clip_omega`` when lcm.dynamic_clip is on.
    """
    x_T = noise if noise is not None else torch.randn(cond.shape, generator=generator).to(cond.device)
    fn = lambda x, t: model(x, t, cond)
    omega = cfg.lcm.global_omega if clip_omega is None else clip_omega
    if sampler == "lcm":
        scheduler = make_scheduler(cfg)
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.tolist()
        clip_at = lcm_clip_at(cfg, [omega] * cond.shape[0])
        lcm_clip = (lambda j: clip_at(timesteps[j])) if clip_at is not None else None
        return sample_lcm(fn, scheduler, x_T, num_steps, generator=generator, clip_range_fn=lcm_clip,
                          progress=progress)
    # DDIM / DDPM count their own steps (BS-LDM's thresholding)
    clip = (lambda j: dynamic_clip_range(j, omega, cfg.lcm.clip_b)) if cfg.lcm.dynamic_clip else None
    d = cfg.diffusion
    betas = make_betas(d.beta_schedule, d.num_train_timesteps, d.beta_start, d.beta_end)
    if sampler == "ddim":
        return sample_ddim(fn, alphas_cumprod_from_betas(betas), x_T, num_steps, eta=0.0, generator=generator,
                           prediction_type=d.prediction_type, clip_range_fn=clip, progress=progress)
    if sampler == "ddpm":
        return sample_ddpm(fn, betas, x_T, generator=generator, prediction_type=d.prediction_type,
                           clip_range_fn=clip, progress=progress)
    raise ValueError(f"unknown sampler {sampler!r}; valid: lcm, ddim, ddpm")


@dataclass
class SamplingNoise:
    """Given random numbers for :func:`dual_path_sample`, to replay a stream (e.g. the published code's).

    initial: B x C x h x w, the noise both paths start from.
    step_global, step_local: S' x B x C x h x w, the noise the scheduler re-injects after step j
        (entry j); the last step adds none, so S' = S - 1 entries suffice (S' = S is accepted).
    leg: S x B x C x h x w standard normal for LEG at step j (needed for guidance 'leg' only).
    """

    initial: torch.Tensor
    step_global: torch.Tensor
    step_local: torch.Tensor
    leg: Optional[torch.Tensor] = None

    def check(self, shape: Sequence[int], num_steps: int, needs_leg: bool) -> None:
        if tuple(self.initial.shape) != tuple(shape):
            raise ValueError(f"injected initial noise has shape {tuple(self.initial.shape)}, expected {tuple(shape)}")
        for name in ("step_global", "step_local") + (("leg",) if needs_leg else ()):
            t = getattr(self, name)
            need = num_steps if name == "leg" else num_steps - 1
            if t is None or t.shape[0] < need or tuple(t.shape[1:]) != tuple(shape):
                got = None if t is None else tuple(t.shape)
                raise ValueError(f"injected {name} noise has shape {got}, expected ({need}, {', '.join(map(str, shape))})")


@torch.no_grad()
def dual_path_sample(model, cond_global: torch.Tensor, cond_local: torch.Tensor, cfg: Config, num_steps: int,
                     gens: Sequence[torch.Generator], guidance_mode: Optional[str] = None,
                     guidance_alpha: Optional[float] = None, batched: bool = True,
                     rebuild_scheduler: bool = False, progress: bool = False,
                     noise: Optional[SamplingNoise] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GL-LCM dual-path LCM sampling. Returns (z_global, z_local), each B x C x h x w.

    cond_*: B x C x h x w scaled latents of the CXR and of the lung-masked CXR.
    gens: one generator per image (initial noise and re-injected noise per step); LEG noise comes
    from a second generator per image derived from it, so the global path does not depend on
    the guidance mode.
    batched: both paths in one UNet call (default); False makes two calls per step (the
    published implementation's way; same result for the same noise).
    rebuild_scheduler: construct a fresh scheduler every step to change its clip range, as the
    published code did (for benchmarks only; the result is the same).
    noise: given random numbers instead of the generators' (see :class:`SamplingNoise`).
    With ``reference.leg_std=published`` LEG's std counts as many extra zero channels as the
    condition has (the published UNet's untrained outputs).
    """
    mode = guidance_mode or cfg.guidance.mode
    alpha = cfg.guidance.alpha if guidance_alpha is None else guidance_alpha
    b, device, dtype = cond_global.shape[0], cond_global.device, cond_global.dtype
    latent_shape = cond_global.shape[1:]
    if noise is not None:
        noise.check(cond_global.shape, num_steps, mode == "leg")
        x_T = noise.initial.to(device=device, dtype=dtype)
    else:
        draw = lambda generators: randn_per_image(generators, latent_shape, device, dtype)
        x_T = draw(gens)
        leg_gens = [make_generator(derive_seed(g.initial_seed(), "leg")) for g in gens]
    zero_channels = cond_global.shape[1] if cfg.reference.leg_std == "published" else 0
    x = torch.cat([x_T, x_T])  # both paths start from the same noise
    cond = torch.cat([cond_global, cond_local])
    clip_at = lcm_clip_at(cfg, [cfg.lcm.global_omega] * b + [cfg.lcm.local_omega] * b)
    scheduler = make_scheduler(cfg)
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps.tolist()
    denoised = x
    from tqdm import tqdm

    for j, t in enumerate(tqdm(timesteps, desc="dual-path LCM", disable=not progress, leave=False)):
        t_batch = torch.full((2 * b,), t, device=device, dtype=torch.long)
        if batched:
            out = model(x, t_batch, cond)
        else:
            out = torch.cat([model(x[:b], t_batch[:b], cond[:b]), model(x[b:], t_batch[b:], cond[b:])])
        eps_global, eps_local = out[:b], out[b:]
        if noise is not None:
            leg_noise = noise.leg[j].to(device, dtype) if mode == "leg" else None
            last = j == len(timesteps) - 1
            step_noise = None if last else torch.cat([noise.step_global[j], noise.step_local[j]]).to(device, dtype)
        else:
            leg_noise = draw(leg_gens) if mode == "leg" else None
            step_noise = torch.cat([draw(gens), draw(gens)])  # global path's, then local path's
        eps_local = apply_guidance(mode, eps_global, eps_local, alpha, noise=leg_noise, zero_channels=zero_channels)
        clip = clip_at(t) if clip_at is not None else None
        if rebuild_scheduler:
            fresh = make_scheduler(cfg)
            fresh.set_timesteps(num_steps, device=device)
            fresh.set_begin_index(j)  # the published code rebuilt its scheduler at every step
            scheduler = fresh
        step = scheduler.step(torch.cat([eps_global, eps_local]), t, x, clip_range=clip, noise=step_noise)
        x, denoised = step.prev_sample, step.denoised
    return denoised[:b], denoised[b:]


def fusion_mask(mask: np.ndarray, erode_px: int) -> np.ndarray:
    """The lung mask shrunk by ``erode_px`` pixels (disk), the region the local result is fused over.

    The local path decodes an image that is black outside the lungs; the VQGAN decoder blurs
    that edge over about one latent cell, so the outermost pixels of the local result are dark.
    Fusing only inside the shrunk mask keeps that rim out (OpenCV's seamlessClone likewise
    erodes its mask). An erosion that empties the mask leaves nothing to fuse (global result).
    """
    m = mask.astype(bool)
    if erode_px <= 0 or not m.any():
        return m
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * erode_px + 1, 2 * erode_px + 1))
    return cv2.erode(m.astype(np.uint8), k) > 0


def fuse_with_config(cfg: Config, mode: str, global_img, local_img, mask, device=None) -> np.ndarray:
    """fusion.fuse with the config's backend, feathering (pixels at 1024, scaled to the image size)
    and mask erosion (pixels of the model's images: the decoder rim is about a latent cell wide
    whatever the resolution). ``device``: where the torch Poisson backend solves (default cpu)."""
    scale = global_img.shape[0] / 1024
    mask = fusion_mask(mask, cfg.fusion.erode_px)
    if mode == "poisson":
        backend = {"torch": "torch", "float": "scipy", "opencv": "opencv", "published": "published"}[cfg.fusion.backend]
        if backend == "torch":
            return fuse(mode, global_img, local_img, mask, backend="torch", device=device)
        return fuse(mode, global_img, local_img, mask, backend=backend)
    if mode == "alpha":
        return fuse(mode, global_img, local_img, mask, feather_px=cfg.fusion.feather_px * scale)
    return fuse(mode, global_img, local_img, mask)


@dataclass
class GLLCMResult:
    """Outputs for one image, H x W float arrays in [0, 1] at data.image_size."""

    name: str
    global_img: np.ndarray
    local_img: np.ndarray
    fused: np.ndarray
    mask: np.ndarray
    timings: dict = field(default_factory=dict)


def _to01(x: torch.Tensor) -> np.ndarray:
    return ((x[:, 0].float().cpu().numpy() + 1.0) / 2.0).clip(0.0, 1.0)


def _resize(img: np.ndarray, size: int, interp=cv2.INTER_AREA) -> np.ndarray:
    if img.shape == (size, size):
        return img.astype(np.float32)
    return cv2.resize(img.astype(np.float32), (size, size), interpolation=interp)


def published_outside(x_norm: np.ndarray) -> np.ndarray:
    """Where the published evaluation zeroes its outputs: ``cxr_copy == 0`` with
    ``cxr_copy = ((x * 0.5 + 0.5) * 255).astype(np.int8)``, x the normalised CXR in [-1, 1]
    (float32). The cast truncates, so this is the CXR's 8-bit level 0 (|value| < 1)."""
    v = (np.asarray(x_norm, dtype=np.float32) * np.float32(0.5) + np.float32(0.5)) * np.float32(255)
    return np.trunc(v) == 0


def postprocess_paths(cxr: np.ndarray, global_img: np.ndarray, local_img: np.ndarray, mask: np.ndarray,
                      mean_shift: str = "ours", outside: Optional[np.ndarray] = None):
    """Shift the local result's mean inside the lung mask onto the global result's, and set both
    to 0 outside the exposure (``outside``, default ``cxr <= 0``).

    mean_shift 'ours': the shift moves the whole local image and is clipped to [0, 1]; zeroing
    is done last so the shift cannot lift those pixels again.
    mean_shift 'published' (``batch_lcm_eval.py``): the global result is zeroed first, the shift
    ``l[m] + mean(g[m]) - mean(l[m])`` (float32, in that order) moves only the mask's pixels and is
    not clipped; then the local result is zeroed.
    """
    outside = cxr <= 0 if outside is None else outside
    m = mask.astype(bool)
    g = global_img.astype(np.float32)
    l = local_img.astype(np.float32)
    if mean_shift == "published":
        g = np.where(outside, np.float32(0), g)
        if m.any():
            l = l.copy()
            l[m] = l[m] + np.mean(g[m]) - np.mean(l[m])
        return g, np.where(outside, np.float32(0), l)
    if m.any():
        l = np.clip(l + (g[m].mean() - l[m].mean()), 0.0, 1.0)
    return np.where(outside, 0.0, g).astype(np.float32), np.where(outside, 0.0, l).astype(np.float32)


def sampling_config(cfg: Config, denoiser_cfg: Config) -> Config:
    """``cfg`` with the denoiser's own prediction type (from its checkpoint): the sampler must read the
    network's output the way it was trained (a one-step student predicts x0, its teacher epsilon).
    A denoiser that predicts x0 (``sample``: the one-step students of gl_lcm.train.onestep) is also
    sampled with the dynamic-clipping setting and the ``lcm.step_schedules`` it was trained with."""
    import copy

    d = denoiser_cfg
    x0 = d.diffusion.prediction_type == "sample"
    same = cfg.diffusion.prediction_type == d.diffusion.prediction_type
    if same and not (x0 and (cfg.lcm.dynamic_clip, cfg.lcm.step_schedules) != (d.lcm.dynamic_clip, d.lcm.step_schedules)):
        return cfg
    out = copy.deepcopy(cfg)
    out.diffusion.prediction_type = d.diffusion.prediction_type
    if x0:
        out.lcm.dynamic_clip = d.lcm.dynamic_clip
        out.lcm.step_schedules = copy.deepcopy(d.lcm.step_schedules)
    return out


class GLLCMPipeline:
    """The method of the paper over trained parts: a VQGAN, a denoiser (teacher or student) and a config."""

    def __init__(self, vqgan, unet, cfg: Config, device: torch.device,
                 noise_source: Optional[Callable[[Sequence[str], tuple, int], SamplingNoise]] = None):
        """``noise_source(names, latent_shape, num_steps) -> SamplingNoise`` replaces the per-image
        generators (to replay a given random stream); None keeps them."""
        from gl_lcm.runtime import prepare_denoiser, prepare_vqgan

        self.vqgan, self.unet, self.cfg, self.device = vqgan, unet, cfg, device
        self.noise_source = noise_source
        e = cfg.eval
        # how the networks run (eval.precision / vqgan_precision / compile / channels_last); fp32 = the modules
        self.denoiser = prepare_denoiser(unet, device, e.precision, e.compile, e.channels_last)
        self.codec = prepare_vqgan(vqgan, device, e.vqgan_precision, e.channels_last)

    @classmethod
    def from_config(cls, cfg: Config, model: Optional[str] = None, device: Optional[torch.device] = None) -> "GLLCMPipeline":
        """Load checkpoints.vqgan and the teacher or student (eval.model) named in the config, on ``device``
        (default: cfg.device resolved; torchrun ranks pass their own GPU)."""
        from gl_lcm.models.factory import check_latent_fits_unet, load_denoiser, load_vqgan
        from gl_lcm.utils.dist import resolve_device

        device = device if device is not None else resolve_device(cfg.device)
        which = model or cfg.eval.model
        path = getattr(cfg.checkpoints, which)
        if not path:
            raise ValueError(f"checkpoints.{which} is empty: set it to a trained {which} model.pt")
        if not cfg.checkpoints.vqgan:
            raise ValueError("checkpoints.vqgan is empty: set it to the trained VQGAN model.pt")
        vqgan = load_vqgan(cfg.checkpoints.vqgan, device)
        unet, unet_cfg = load_denoiser(path, device)
        check_latent_fits_unet(cfg.data.image_size, vqgan, unet)
        return cls(vqgan, unet, sampling_config(cfg, unet_cfg), device)

    @torch.no_grad()
    def run(self, names: Sequence[str], cxrs: Sequence[np.ndarray], masks: Sequence[np.ndarray],
            num_steps: Optional[int] = None, guidance_mode: Optional[str] = None, fusion_mode: Optional[str] = None,
            batched: bool = True) -> list[GLLCMResult]:
        """Bone-suppress a batch. cxrs: H x W in [0, 1] (any size; resized to data.image_size);
        masks: bool H x W lung masks of the same sizes. Results at data.image_size."""
        cfg, dev = self.cfg, self.device
        size = cfg.data.image_size
        steps = num_steps or cfg.lcm.num_inference_steps
        times: dict[str, float] = {}

        def tick(stage: str, t0: float) -> float:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            times[stage] = now - t0
            return now

        t0 = time.perf_counter()
        ref = cfg.reference
        published_px = ref.conversions == "published"
        mask_s = [_resize(m.astype(np.float32), size, cv2.INTER_NEAREST) > 0.5 for m in masks]
        if published_px:
            # published: 8-bit images, cv2.resize (bilinear) on uint8, ToTensor + Normalize(0.5, 0.5)
            c8 = [np.clip(np.rint(np.asarray(c, np.float64) * 255), 0, 255).astype(np.uint8) for c in cxrs]
            c8 = [c if c.shape == (size, size) else cv2.resize(c, (size, size)) for c in c8]
            x_norm = [(c.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5) for c in c8]
            cxr_s = [c.astype(np.float32) / 255 for c in c8]
            outside = [published_outside(xn) for xn in x_norm]
            x = torch.from_numpy(np.stack(x_norm))[:, None].to(dev)
        else:
            cxr_s = [_resize(c, size) for c in cxrs]
            outside = [c <= 0 for c in cxr_s]
            x = torch.from_numpy(np.stack(cxr_s))[:, None].to(dev) * 2 - 1
        m = torch.from_numpy(np.stack(mask_s).astype(np.float32))[:, None].to(dev)
        both = self.codec.encode(torch.cat([x, masked(x, m)]))
        b = len(names)
        t0 = tick("encode", t0)
        gens = image_generators(cfg.seed, names)
        noise = self.noise_source(names, tuple(both.shape[1:]), steps) if self.noise_source is not None else None
        z_g, z_l = dual_path_sample(self.denoiser, both[:b], both[b:], cfg, steps, gens, guidance_mode=guidance_mode,
                                    batched=batched, noise=noise)
        t0 = tick("sampling", t0)
        images = self.codec.decode(torch.cat([z_g, z_l]), requantize=ref.requantize)
        # published: x * 0.5 + 0.5 without clamping (the mean shift sees the raw values)
        decoded = (images[:, 0].float().cpu().numpy() * np.float32(0.5) + np.float32(0.5)) if published_px \
            else _to01(images.clamp(-1, 1))
        t0 = tick("decode", t0)
        results = []
        mode = fusion_mode or cfg.fusion.mode
        for i, name in enumerate(names):
            g, l = postprocess_paths(cxr_s[i], decoded[i], decoded[b + i], mask_s[i], mean_shift=ref.mean_shift,
                                     outside=outside[i])
            fused = fuse_with_config(cfg, mode, g, l, mask_s[i], device=dev)
            g, l = np.clip(g, 0, 1), np.clip(l, 0, 1)
            results.append(GLLCMResult(name, g, l, np.clip(fused, 0, 1).astype(np.float32), mask_s[i]))
        tick("fusion", t0)
        per_image = {k: v / b for k, v in times.items()}
        for r in results:
            r.timings = dict(per_image)
        return results
