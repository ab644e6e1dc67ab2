"""Lung segmentation: classical image processing, segmentation-net inference, folder masks, post-processing."""
from gl_lcm.segmentation.classical import segment_lungs_classical
from gl_lcm.segmentation.learned import (
    SEGMENTATION_METHODS,
    load_masks_from_folder,
    predict_lung_probability,
    segment_lungs,
    segment_lungs_learned,
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
    "remove_small_components",
    "scaled_min_area",
    "segment_lungs",
    "segment_lungs_classical",
    "segment_lungs_learned",
]
