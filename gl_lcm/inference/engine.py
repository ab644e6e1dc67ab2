"""The inference engine: GL-LCM on a batch of films, the one place that chains its stages.

Built once from the config (models, scheduler settings, guidance, fusion and segmenter resolved at
construction), it exposes the stages as methods, each usable alone:

    segment -> (model_inputs) -> encode -> sample -> decode -> fuse        run() chains them

Every command (evaluate, suppress, segment, ablate), the demo and the benchmarks run through it.
A :class:`StageTimer` records seconds per stage (CUDA synchronised) and the peak device memory.
Every random number of image i comes from its own generator (seeded from the config seed and the
file name), so a result does not depend on batch size, order or sharding.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from gl_lcm.config import Config
from gl_lcm.data.datasets import masked
from gl_lcm.diffusion.noise import GivenNoise, PerImageNoise, image_generators, randn_per_image
from gl_lcm.diffusion.samplers import predict_direct, sample_dual_path
from gl_lcm.inference.postprocess import (ModelInputs, cxr_minus_bone, model_inputs, postprocess_paths,
                                          to_unit_range)
from gl_lcm.inference.segmenter import Segmenter, segment_each
from gl_lcm.inference.settings import FusionSettings, PixelSettings, SamplingSettings, sample_single_path

# stage names as timing.csv writes them
STAGES = ("segmentation", "encode", "sampling", "decode", "fusion")


@dataclass
class GLLCMResult:
    """Outputs for one image, H x W float arrays in [0, 1] at data.image_size."""

    name: str
    global_img: np.ndarray
    local_img: np.ndarray
    fused: np.ndarray
    mask: np.ndarray
    timings: dict = field(default_factory=dict)


class StageTimer:
    """Seconds per stage (summed over calls, CUDA synchronised at each stage end) and peak device memory."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    def reset(self) -> None:
        self.seconds = {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def peak_gib(self) -> Optional[float]:
        """Peak device memory since the last reset (GiB), None on the CPU."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30


class InferenceEngine:
    """GL-LCM over trained parts: a VQGAN, a denoiser (teacher or student) and resolved settings.

    noise_source(names, latent_shape, num_steps) -> :class:`~gl_lcm.diffusion.noise.GivenNoise`
    replays a given random stream instead of the per-image generators. ``batched`` False and
    ``rebuild_scheduler`` reproduce the published implementation's two UNet calls per step and
    per-step scheduler rebuild (benchmarks; same results).
    """

    def __init__(self, vqgan, unet, sampling: SamplingSettings, fusion: FusionSettings, pixels: PixelSettings,
                 device: torch.device, segmenter: Optional[Segmenter] = None, precision: str = "fp32",
                 vqgan_precision: str = "fp32", compile: bool = False, channels_last: bool = True,
                 cuda_graphs: bool = False,
                 noise_source: Optional[Callable[[Sequence[str], tuple, int], GivenNoise]] = None,
                 batched: bool = True, rebuild_scheduler: bool = False):
        from gl_lcm.runtime import prepare_denoiser, prepare_vqgan

        self.vqgan, self.unet, self.device = vqgan, unet, device
        self.sampling, self.fusion, self.pixels = sampling, fusion, pixels
        self.segmenter = segmenter
        self.noise_source, self.batched, self.rebuild_scheduler = noise_source, batched, rebuild_scheduler
        # how the networks run (precision / compile / channels_last); fp32 = the modules themselves
        self.denoiser = prepare_denoiser(unet, device, precision, compile, channels_last, cuda_graphs)
        self.codec = prepare_vqgan(vqgan, device, vqgan_precision, channels_last, compile)
        self.timer = StageTimer(device)
        self.last_latents: tuple = ()  # the latents of the last run() / run_global(), for checks

    @classmethod
    def from_parts(cls, vqgan, unet, cfg: Config, device: torch.device, denoiser_cfg: Optional[Config] = None,
                   segmenter=None, source: str = "checkpoint", **options) -> "InferenceEngine":
        """An engine over given modules with ``cfg``'s settings (``denoiser_cfg``: the denoiser's own
        checkpoint config, which decides its prediction type; ``source`` names it in the override notices).
        ``segmenter`` as in :meth:`from_config` (default: none here)."""
        e = cfg.eval
        return cls(vqgan, unet, SamplingSettings.from_config(cfg, denoiser_cfg, source=source),
                   FusionSettings.from_config(cfg),
                   PixelSettings.from_config(cfg), device,
                   segmenter=Segmenter.from_config(cfg, device) if segmenter is True else (segmenter or None),
                   precision=e.precision, vqgan_precision=e.vqgan_precision, compile=e.compile,
                   channels_last=e.channels_last, cuda_graphs=e.cuda_graphs, **options)

    @classmethod
    def from_config(cls, cfg: Config, model: Optional[str] = None, device: Optional[torch.device] = None,
                    checkpoint: Optional[str] = None, segmenter=True, **options) -> "InferenceEngine":
        """Load checkpoints.vqgan and the denoiser (``checkpoint``, else checkpoints.<model or eval.model>)
        on ``device`` (default: cfg.device resolved; torchrun ranks pass their own GPU). The denoiser's
        checkpoint decides its prediction type (see :meth:`SamplingSettings.from_config`).

        segmenter: True builds the configured :class:`Segmenter`, False none; or any callable
        ``(name, image01, cache_dir=None, overwrite=False) -> bool mask``. ``options``: the
        constructor's noise_source / batched / rebuild_scheduler."""
        from gl_lcm.models.factory import check_latent_fits_unet, load_denoiser, load_vqgan
        from gl_lcm.utils.dist import resolve_device

        device = device if device is not None else resolve_device(cfg.device)
        which = model or cfg.eval.model
        path = checkpoint or getattr(cfg.checkpoints, which)
        if not path:
            raise ValueError(f"checkpoints.{which} is empty: set it to a trained {which} model.pt")
        if not cfg.checkpoints.vqgan:
            raise ValueError("checkpoints.vqgan is empty: set it to the trained VQGAN model.pt")
        vqgan = load_vqgan(cfg.checkpoints.vqgan, device)
        unet, unet_cfg = load_denoiser(path, device)
        check_latent_fits_unet(cfg.data.image_size, vqgan, unet)
        return cls.from_parts(vqgan, unet, cfg, device, denoiser_cfg=unet_cfg, source=str(path), segmenter=segmenter,
                              **options)

    # ------------------------------------------------------------------ stages
    def segment(self, name: str, image01: np.ndarray, cache_dir: Optional[Path] = None,
                overwrite: bool = False) -> np.ndarray:
        """Bool H x W lung mask of one CXR (H x W in [0, 1]); raises NoLungFoundError when none is found."""
        if self.segmenter is None:
            raise ValueError("this engine was built without a segmenter: pass lung masks to run()")
        # untimed: loader threads call it while the main thread samples (run() times its own calls)
        return self.segmenter(name, image01, cache_dir=cache_dir, overwrite=overwrite)

    def segment_batch(self, names: Sequence[str], images01: Sequence[np.ndarray], cache_dir: Optional[Path] = None,
                      overwrite: bool = False) -> list:
        """Masks of several films: a bool mask or the exception per film (a batched U-Net pass where the
        segmenter has one, :meth:`Segmenter.segment_batch`; film by film otherwise)."""
        if self.segmenter is None:
            raise ValueError("this engine was built without a segmenter: pass lung masks to run()")
        batch_fn = getattr(self.segmenter, "segment_batch", None)
        if batch_fn is not None:
            return batch_fn(names, images01, cache_dir=cache_dir, overwrite=overwrite)
        return segment_each(self.segmenter, names, images01, cache_dir, overwrite)

    def inputs(self, cxrs: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> ModelInputs:
        """CXRs (H x W in [0, 1], any size) and lung masks -> model inputs at data.image_size."""
        p = self.pixels
        return model_inputs(cxrs, masks, p.image_size, p.published_conversions, self.device)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B x 1 x S x S images in [-1, 1] and {0, 1} lung masks -> (global, local) scaled latents."""
        with self.timer.stage("encode"):
            both = self.codec.encode(torch.cat([x, masked(x, masks)]))
            return both[:x.shape[0]], both[x.shape[0]:]

    @torch.no_grad()
    def sample(self, names: Sequence[str], cond_global: torch.Tensor, cond_local: torch.Tensor,
               num_steps: Optional[int] = None, guidance_mode: Optional[str] = None,
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Dual-path LCM sampling (:func:`~gl_lcm.diffusion.samplers.sample_dual_path`): (z_global, z_local)."""
        s = self.sampling
        steps = num_steps or s.num_inference_steps
        mode = guidance_mode or s.guidance_mode
        b = len(names)
        with self.timer.stage("sampling"):
            if not s.noise_input:  # a plain supervised network: one pass over both paths, no noise
                both = predict_direct(self.denoiser, torch.cat([cond_global, cond_local]), s.num_train_timesteps)
                return both[:b], both[b:]
            if self.noise_source is not None:
                noise = self.noise_source(names, tuple(cond_global.shape[1:]), steps)
            else:
                noise = PerImageNoise(image_generators(s.seed, names), cond_global.shape[1:], self.device,
                                      cond_global.dtype)
            return sample_dual_path(
                self.denoiser, s.scheduler(), cond_global, cond_local, steps, noise, guidance_mode=mode,
                guidance_alpha=s.guidance_alpha,
                leg_zero_channels=cond_global.shape[1] if s.leg_std_published else 0,
                clip_range_fn=s.dual_path_clip(b), batched=self.batched,
                fresh_scheduler=s.scheduler if self.rebuild_scheduler else None, progress=progress)

    @torch.no_grad()
    def sample_global(self, names: Sequence[str], cond: torch.Tensor, num_steps: int,
                      sampler: str = "lcm") -> torch.Tensor:
        """The global path alone (baselines: BS-LDM's DDPM, DDIM): B x C x h x w latents.

        Initial noise per image from its generator; the step noise of the batch continues the first
        image's generator (so a batch of one is that image's own stream)."""
        gens = image_generators(self.sampling.seed, names)
        with self.timer.stage("sampling"):
            x_T = randn_per_image(gens, cond.shape[1:], cond.device)
            return sample_single_path(self.denoiser, cond, self.sampling, num_steps, generator=gens[0],
                                      sampler=sampler, noise=x_T)

    @torch.no_grad()
    def decode(self, *latents: torch.Tensor, requantize: Optional[bool] = None) -> np.ndarray:
        """Scaled latents (each B x C x h x w, concatenated in order) -> N x S x S float32 in [0, 1]."""
        p = self.pixels
        requantize = p.requantize if requantize is None else requantize
        with self.timer.stage("decode"):
            images = self.codec.decode(torch.cat(latents), requantize=requantize)
            return to_unit_range(images, p.published_conversions)

    def fuse(self, names: Sequence[str], inputs: ModelInputs, decoded: np.ndarray,
             fusion_mode: Optional[str] = None) -> list[GLLCMResult]:
        """Post-process both paths (mean shift, exposure zeroing) and fuse them: one result per image.

        decoded: 2B x S x S, the B global images then the B local images."""
        b = len(names)
        results = []
        with self.timer.stage("fusion"):
            for i, name in enumerate(names):
                g, l = postprocess_paths(inputs.cxrs[i], decoded[i], decoded[b + i], inputs.lung_masks[i],
                                         mean_shift=self.pixels.mean_shift, outside=inputs.outside[i])
                fused = self.fusion.fuse(g, l, inputs.lung_masks[i], mode=fusion_mode, device=self.device)
                g, l = np.clip(g, 0, 1), np.clip(l, 0, 1)
                results.append(GLLCMResult(name, g, l, np.clip(fused, 0, 1).astype(np.float32),
                                           inputs.lung_masks[i]))
        return results

    def fuse_again(self, result: GLLCMResult, fusion_mode: str) -> np.ndarray:
        """Another fusion of a finished result's paths (ablations): S x S float32 in [0, 1]."""
        return np.clip(self.fusion.fuse(result.global_img, result.local_img, result.mask, mode=fusion_mode,
                                        device=self.device), 0, 1)

    # ------------------------------------------------------------------ chains
    @torch.no_grad()
    def run(self, names: Sequence[str], cxrs: Sequence[np.ndarray], masks: Optional[Sequence[np.ndarray]] = None,
            num_steps: Optional[int] = None, guidance_mode: Optional[str] = None,
            fusion_mode: Optional[str] = None) -> list[GLLCMResult]:
        """Bone-suppress a batch: segment (when ``masks`` is None) -> encode -> sample -> decode -> fuse.

        cxrs: H x W in [0, 1] (any size; resized to data.image_size); masks: bool H x W lung masks of
        the same sizes. Results at data.image_size; ``timings`` holds each stage's seconds per image.
        """
        self.timer.reset()
        if masks is None:
            with self.timer.stage("segmentation"):
                masks = self.segment_batch(names, cxrs)
            failed = [m for m in masks if isinstance(m, Exception)]
            if failed:
                raise failed[0]
        with self.timer.stage("encode"):
            inputs = self.inputs(cxrs, masks)
        cond_global, cond_local = self.encode(inputs.x, inputs.masks)
        z_global, z_local = self.sample(names, cond_global, cond_local, num_steps, guidance_mode)
        self.last_latents = (z_global, z_local)
        subtract = self.pixels.cxr_minus_bone
        decoded = self.decode(z_global, z_local, *((cond_global,) if subtract else ()))
        results = self.fuse(names, inputs, decoded[:2 * len(names)], fusion_mode)
        if subtract:  # eval.output: cxr_minus_bone; the third block of decoded is D(E(CXR))
            with self.timer.stage("fusion"):
                for i, r in enumerate(results):
                    rt = decoded[2 * len(names) + i]
                    r.fused = cxr_minus_bone(inputs.cxrs[i], rt, r.fused)
                    r.global_img = cxr_minus_bone(inputs.cxrs[i], rt, r.global_img)
        per_image = {k: v / len(names) for k, v in self.timer.seconds.items()}
        for r in results:
            r.timings = dict(per_image)
        return results

    @torch.no_grad()
    def run_global(self, names: Sequence[str], cxrs: Sequence[np.ndarray], num_steps: int,
                   sampler: str = "ddpm") -> list[np.ndarray]:
        """Single-path baseline (BS-LDM style): CXRs at data.image_size -> predictions S x S in [0, 1],
        zero outside the exposure. Initial noise per image from its generator."""
        self.timer.reset()
        x = torch.from_numpy(np.stack(cxrs))[:, None].to(self.device) * 2 - 1
        with self.timer.stage("encode"):
            cond = self.codec.encode(x)
        z = self.sample_global(names, cond, num_steps, sampler)
        self.last_latents = (z,)
        if self.pixels.cxr_minus_bone:  # eval.output: cxr_minus_bone
            both = self.decode(z, cond)
            return [cxr_minus_bone(c, rt, np.where(c <= 0, 0.0, d))
                    for c, d, rt in zip(cxrs, both[:len(cxrs)], both[len(cxrs):])]
        decoded = self.decode(z)
        return [np.where(c <= 0, 0.0, d) for c, d in zip(cxrs, decoded)]

    @torch.no_grad()
    def round_trip(self, images: Sequence[np.ndarray], requantize: bool = True) -> list[np.ndarray]:
        """VQGAN encode + decode of images at data.image_size (H x W in [0, 1]): the autoencoder's ceiling."""
        x = torch.from_numpy(np.stack(images))[:, None].to(self.device) * 2 - 1
        with self.timer.stage("encode"):
            z = self.codec.encode(x)
        return list(self.decode(z, requantize=requantize))
