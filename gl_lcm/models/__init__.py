"""Neural networks: VQGAN autoencoder, latent UNet, PatchGAN discriminator, lung segmentation net."""
from gl_lcm.models.discriminator import PatchDiscriminator
from gl_lcm.models.segnet import LungSegNet
from gl_lcm.models.unet import UNet, count_parameters
from gl_lcm.models.vqgan import (
    VQGAN,
    CodebookUsageMeter,
    VectorQuantizer,
    codebook_usage,
    estimate_latent_scale,
)

__all__ = [
    "VQGAN",
    "VectorQuantizer",
    "CodebookUsageMeter",
    "codebook_usage",
    "estimate_latent_scale",
    "UNet",
    "count_parameters",
    "PatchDiscriminator",
    "LungSegNet",
]
