"""Lung segmentation: classical image processing, segmentation-net inference, the published
lungs-segmentation model, folder masks, post-processing."""
from gl_lcm.segmentation.classical import segment_lungs_classical
from gl_lcm.segmentation.learned import (
    SEGMENTATION_METHODS,
    load_masks_from_folder,
    predict_lung_probability,
    predict_published_lung_probability,
    segment_lungs,
    segment_lungs_learned,
    segment_lungs_pretrained,
)
from gl_lcm.segmentation.postprocess import (
    NoLungFoundError,
    binarize,
    check_lung_mask,
    dice,
    mask_overlay,
    postprocess_mask,
    remove_small_components,
    scaled_min_area,
)

__all__ = [
    "SEGMENTATION_METHODS",
    "NoLungFoundError",
    "binarize",
    "check_lung_mask",
    "dice",
    "load_masks_from_folder",
    "mask_overlay",
    "postprocess_mask",
    "predict_lung_probability",
    "predict_published_lung_probability",
    "remove_small_components",
    "scaled_min_area",
    "segment_lungs",
    "segment_lungs_classical",
    "segment_lungs_learned",
    "segment_lungs_pretrained",
]
