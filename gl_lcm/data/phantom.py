"""Synthetic chest radiographs with known soft-tissue, bone and lung-mask ground truth.

A phantom is drawn in normalised coordinates (u = x / size, v = y / size, both in
[0, 1]) so every anatomical size scales with the resolution; all drawing is vectorised
numpy or OpenCV (no per-pixel Python loops), about 20 ms at 256 x 256.

- ``soft_tissue``: air outside an elliptical-section body (neck, shoulders, torso), two
  dark lung fields with branching vessel texture, bright mediastinum, heart, diaphragm
  domes and abdomen, a trachea, sometimes a gastric air bubble, smooth and grain noise.
- ``bone``: posterior ribs (curved bands with bright cortical edges), fainter anterior
  ribs that fade towards the sternum, clavicles and the vertebral column.
- ``cxr = clip(soft_tissue + bone_drawn, 0, 1)`` and ``bone = cxr - soft_tissue``, so
  ``cxr >= soft_tissue`` and ``bone >= 0`` hold exactly: ``bone`` is what a
  bone-suppression model must remove.
- ``lung_mask``: the visible lung fields (heart and mediastinum excluded), as in
  JSRT/SZCH-style lung masks.

Image-left is the patient's right (standard PA view), so the heart bulges into the
image-right lung and the gastric bubble sits under the image-right dome.
Everything that varies (anatomy, contrast, position, size, rib spacing, noise) is drawn
from one ``numpy.random.Generator``: the same seed gives the same arrays bit for bit.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import cv2
import numpy as np

from gl_lcm.utils.atomic import atomic_path, atomic_write_text

PathLike = Union[str, os.PathLike]
RngLike = Union[int, np.integer, np.random.Generator, np.random.SeedSequence]

# Sub-pixel precision of OpenCV polygon drawing (coordinates scaled by 2**_SHIFT).
_SHIFT = 4
# Second word of the seed sequence that orders the train/val/test split (sample seeds use the index).
_SPLIT_SEED_KEY = 2**31 - 1
SPLIT_NAMES: Tuple[str, str, str] = ("train", "val", "test")


@dataclass
class Phantom:
    """One synthetic frontal chest radiograph; arrays are H x W.

    Attributes:
        cxr: float32 in [0, 1], the conventional radiograph (bone bright).
        soft_tissue: float32 in [0, 1], the bone-suppressed target (``cxr - bone``).
        bone: float32 in [0, 1], ``cxr - soft_tissue`` (>= 0 everywhere).
        lung_mask: bool, True on the two lung fields.
        params: the sampled anatomy (normalised coordinates) for inspection.
    """

    cxr: np.ndarray
    soft_tissue: np.ndarray
    bone: np.ndarray
    lung_mask: np.ndarray
    params: Dict[str, float] = field(default_factory=dict)


def as_generator(rng: RngLike) -> np.random.Generator:
    """Return a numpy Generator from an int seed, a SeedSequence or a Generator (returned as is)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer, np.random.SeedSequence)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be an int seed, a SeedSequence or a numpy Generator, got {type(rng).__name__}")


def sample_seed_sequence(seed: int, index: int) -> np.random.SeedSequence:
    """Seed sequence of sample ``index`` of a dataset seeded by ``seed`` (independent of the dataset size)."""
    return np.random.SeedSequence([int(seed), int(index)])


# ----------------------------------------------------------------------------- drawing helpers


def _to_px(points_uv: np.ndarray, size: int) -> np.ndarray:
    """N x 2 normalised (u, v) points -> int32 fixed-point pixel coordinates for OpenCV (shift=_SHIFT)."""
    return np.round(points_uv * size * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)


def _fill_polygons(canvas: np.ndarray, polygons: Sequence[np.ndarray], size: int, antialias: bool = True) -> None:
    """Fill normalised polygons into a uint8 canvas with value 255 (anti-aliased when asked)."""
    if polygons:
        cv2.fillPoly(canvas, [_to_px(p, size) for p in polygons], 255,
                     lineType=cv2.LINE_AA if antialias else cv2.LINE_8, shift=_SHIFT)


def _draw_polylines(canvas: np.ndarray, lines: Sequence[np.ndarray], size: int, thickness_px: int) -> None:
    """Draw open normalised polylines into a uint8 canvas with value 255, anti-aliased."""
    if lines:
        cv2.polylines(canvas, [_to_px(p, size) for p in lines], False, 255,
                      thickness=max(1, int(thickness_px)), lineType=cv2.LINE_AA, shift=_SHIFT)


def _band_outline(centre: np.ndarray, half_width: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offset a centreline (N x 2) by +-half_width along its normals.

    Returns (polygon of the band, upper edge, lower edge), all in normalised coordinates.
    """
    tangent = np.gradient(centre, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True) + 1e-12
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    offset = normal * np.asarray(half_width).reshape(-1, 1)
    edge_a = centre + offset
    edge_b = centre - offset
    return np.concatenate([edge_a, edge_b[::-1]], axis=0), edge_a, edge_b


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish amplitude low-frequency noise field (size x size float32)."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of a float image with sigma in pixels (no-op below 0.3 px)."""
    if sigma_px < 0.3:
        return image
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma_px, sigmaY=sigma_px, borderType=cv2.BORDER_REPLICATE)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


# ----------------------------------------------------------------------------- anatomy


def _sample_anatomy(rng: np.random.Generator) -> Dict[str, float]:
    """Draw the per-sample anatomy and contrast parameters (normalised units)."""
    p: Dict[str, float] = {}
    p["midline"] = 0.5 + rng.normal(0.0, 0.012)
    p["body_half_width"] = rng.uniform(0.40, 0.47)
    p["neck_half_width"] = rng.uniform(0.08, 0.11)
    p["shoulder_v"] = rng.uniform(-0.02, 0.03)
    p["apex_v"] = rng.uniform(0.11, 0.17)
    p["base_v"] = rng.uniform(0.70, 0.82)
    p["chest_wall"] = rng.uniform(0.035, 0.065)
    p["apex_offset"] = rng.uniform(0.10, 0.14)
    p["mediastinum_top"] = rng.uniform(0.045, 0.065)
    p["mediastinum_bottom"] = rng.uniform(0.065, 0.09)
    p["dome_height"] = rng.uniform(0.05, 0.10)
    p["left_dome_drop"] = rng.uniform(0.0, 0.035)
    p["heart_u"] = rng.uniform(0.035, 0.075)
    p["heart_rx"] = rng.uniform(0.13, 0.17)
    p["heart_ry"] = rng.uniform(0.12, 0.16)
    p["heart_angle"] = rng.uniform(-25.0, -5.0)
    p["lateral_power"] = rng.uniform(2.0, 3.2)
    p["air_level"] = rng.uniform(0.0, 0.08)
    p["body_level"] = rng.uniform(0.52, 0.68)
    p["mediastinum_gain"] = rng.uniform(0.12, 0.22)
    p["abdomen_gain"] = rng.uniform(0.12, 0.22)
    p["lung_depth"] = rng.uniform(0.26, 0.38)
    p["vessel_gain"] = rng.uniform(0.05, 0.10)
    p["rib_count"] = float(rng.integers(10, 13))
    p["rib_spacing"] = rng.uniform(0.052, 0.068)
    p["rib_width"] = rng.uniform(0.017, 0.024)
    p["rib_start_v"] = rng.uniform(0.07, 0.12)
    p["rib_fill"] = rng.uniform(0.07, 0.12)
    p["rib_edge"] = rng.uniform(0.05, 0.09)
    p["anterior_gain"] = rng.uniform(0.5, 0.75)
    p["clavicle_v"] = rng.uniform(0.12, 0.19)
    p["clavicle_rise"] = rng.uniform(0.03, 0.07)
    p["spine_gain"] = rng.uniform(0.08, 0.14)
    p["gastric_bubble"] = float(rng.random() < 0.5)
    p["noise_smooth"] = rng.uniform(0.01, 0.03)
    p["noise_grain"] = rng.uniform(0.003, 0.01)
    return p


def _lung_polygon(p: Dict[str, float], side: int, n: int = 64) -> np.ndarray:
    """Closed outline (N x 2, normalised) of one lung field; side -1 = image left, +1 = image right."""
    cx, apex_v = p["midline"], p["apex_v"]
    base_v = p["base_v"] + (p["left_dome_drop"] if side > 0 else 0.0)
    lateral = p["body_half_width"] - p["chest_wall"]
    apex_off = p["apex_offset"]
    dome_h = p["dome_height"]
    t = np.linspace(0.0, 1.0, n)
    # Lateral border: v grows like t**2, so the width grows like sqrt(v - apex): a round apex.
    lat_v = apex_v + (base_v - apex_v) * t**2
    lat_u = cx + side * (apex_off + (lateral - apex_off) * (1.0 - (1.0 - t) ** p["lateral_power"]))
    # Diaphragm dome from the costophrenic angle (lowest) to the cardiophrenic angle.
    tau = np.linspace(0.0, 1.0, n)[1:]
    medial_base = p["mediastinum_bottom"]
    dome_u = cx + side * (lateral + (medial_base - lateral) * tau)
    dome_v = base_v - dome_h * np.sin(np.pi * 0.75 * tau)
    # Medial border: hugs the mediastinum, bends out to the apex near the top.
    med_end_v = dome_v[-1]
    s = np.linspace(1.0, 0.0, n)[1:-1]
    med_v = apex_v + (med_end_v - apex_v) * s**2
    frac = (med_v - apex_v) / max(base_v - apex_v, 1e-6)
    med_half = p["mediastinum_top"] + (p["mediastinum_bottom"] - p["mediastinum_top"]) * frac**2
    med_u = cx + side * (med_half + (apex_off - p["mediastinum_top"]) * (1.0 - s) ** 6)
    return np.concatenate([np.stack([lat_u, lat_v], 1), np.stack([dome_u, dome_v], 1), np.stack([med_u, med_v], 1)])


def _vessel_segments(rng: np.random.Generator, start: np.ndarray, direction: float, length: float,
                     depth: int) -> List[Tuple[np.ndarray, np.ndarray, int]]:
    """Random binary branching tree: list of (p0, p1, generation) segments in normalised units."""
    segments: List[Tuple[np.ndarray, np.ndarray, int]] = []
    stack = [(start, direction, length, 0)]
    while stack:
        p0, angle, seg_len, gen = stack.pop()
        p1 = p0 + seg_len * np.array([np.cos(angle), np.sin(angle)])
        segments.append((p0, p1, gen))
        if gen + 1 < depth:
            for turn in (-1.0, 1.0):
                stack.append((p1, angle + turn * rng.uniform(0.25, 0.6), seg_len * rng.uniform(0.65, 0.85), gen + 1))
    return segments


def _render_soft_tissue(rng: np.random.Generator, p: Dict[str, float], size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft-tissue image, lung mask and body mask (all size x size)."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    u, v = np.meshgrid(coords, coords)
    cx = p["midline"]

    # Body: neck widening into shoulders and torso; elliptical cross-section gives the
    # thickness (brighter in the middle, darker towards the skin line).
    shoulder = _smoothstep((v - p["shoulder_v"]) / 0.09)
    half_width = p["neck_half_width"] + (p["body_half_width"] - p["neck_half_width"]) * shoulder
    rel = np.clip(np.abs(u - cx) / half_width, 0.0, 1.0)
    thickness = np.sqrt(np.clip(1.0 - rel**2, 0.0, 1.0))
    body = (np.abs(u - cx) < half_width).astype(np.float32)
    body_soft = _blur(body, 1.0 * size / 256)
    soft = p["air_level"] + (p["body_level"] - p["air_level"]) * body_soft * (0.72 + 0.28 * thickness**0.4)

    # Lungs.
    lung_canvas = np.zeros((size, size), np.uint8)
    _fill_polygons(lung_canvas, [_lung_polygon(p, -1), _lung_polygon(p, +1)], size, antialias=False)
    heart = np.zeros((size, size), np.uint8)
    heart_centre = (cx + p["heart_u"], p["base_v"] - p["heart_ry"] * 0.3)
    cv2.ellipse(heart, (int(round(heart_centre[0] * size * 16)), int(round(heart_centre[1] * size * 16))),
                (int(round(p["heart_rx"] * size * 16)), int(round(p["heart_ry"] * size * 16))),
                p["heart_angle"], 0, 360, 255, -1, cv2.LINE_8, _SHIFT)
    lung_mask = (lung_canvas > 0) & (heart == 0)
    lung_mask = cv2.morphologyEx(lung_mask.astype(np.uint8), cv2.MORPH_OPEN,
                                 cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))) > 0
    lung_soft = _blur(lung_mask.astype(np.float32), 1.2 * size / 256)
    # Lungs are lighter at the apex (shoulder muscles overlap) and near the hilum.
    apex_fade = 1.0 - 0.35 * np.exp(-(((v - p["apex_v"]) / 0.08) ** 2))
    hilum_fade = 1.0 - 0.25 * np.exp(-(((np.abs(u - cx) - 0.1) / 0.06) ** 2) - (((v - 0.42) / 0.15) ** 2))
    lung_variation = 1.0 + 0.12 * _smooth_noise(rng, size, 5)
    soft = soft - p["lung_depth"] * lung_soft * apex_fade * hilum_fade * lung_variation

    # Vessels: branching trees from each hilum, brighter than the aerated lung.
    vessels = np.zeros((size, size), np.uint8)
    for side in (-1, +1):
        hilum = np.array([cx + side * (p["mediastinum_bottom"] + 0.02), p["apex_v"] + 0.45 * (p["base_v"] - p["apex_v"])])
        for base_angle in (-1.9, -1.2, -0.6, 0.0, 0.5, 1.1):
            angle = base_angle if side > 0 else np.pi - base_angle
            for p0, p1, gen in _vessel_segments(rng, hilum, angle + rng.normal(0, 0.15), rng.uniform(0.045, 0.07), 5):
                thick = max(1, int(round((0.007 - 0.0013 * gen) * size)))
                cv2.line(vessels, tuple(int(c) for c in np.round(p0 * size * 16)),
                         tuple(int(c) for c in np.round(p1 * size * 16)), int(255 - 35 * gen), thick, cv2.LINE_AA, _SHIFT)
    vessel_img = _blur(vessels.astype(np.float32) / 255.0, 0.7 * size / 256)
    # Fine interstitial texture: band-pass noise (a few pixels at 256) inside the lungs.
    fine = _smooth_noise(rng, size, 48) - _blur(_smooth_noise(rng, size, 48), 2.0 * size / 256)
    soft = soft + (p["vessel_gain"] * vessel_img + 0.012 * fine) * lung_soft

    # Mediastinum, heart and the trachea.
    frac = np.clip((v - p["apex_v"]) / (p["base_v"] - p["apex_v"]), 0.0, 1.0)
    med_half = p["mediastinum_top"] + (p["mediastinum_bottom"] - p["mediastinum_top"]) * frac**2
    mediastinum = ((np.abs(u - cx) < med_half) & (v > p["shoulder_v"])).astype(np.float32)
    heart_f = heart.astype(np.float32) / 255.0
    dense = _blur(np.maximum(mediastinum, heart_f), 3.0 * size / 256)
    soft = soft + p["mediastinum_gain"] * dense * body_soft
    trachea = ((np.abs(u - cx - 0.004) < 0.016) & (v < p["apex_v"] + 0.17)).astype(np.float32)
    soft = soft - 0.06 * _blur(trachea, 1.5 * size / 256)

    # Abdomen below the diaphragm: brighter (liver, spleen, bowel).
    dome_line = np.where(u < cx, p["base_v"] - p["dome_height"] * 0.8, p["base_v"] + p["left_dome_drop"] - p["dome_height"] * 0.8)
    abdomen = _blur(((v > dome_line) & ~lung_mask).astype(np.float32), 4.0 * size / 256)
    soft = soft + p["abdomen_gain"] * abdomen * body_soft * (1.0 - lung_soft)
    if p["gastric_bubble"] > 0:
        gb = np.zeros((size, size), np.uint8)
        gb_c = (cx + p["heart_u"] + rng.uniform(0.08, 0.16), p["base_v"] + p["left_dome_drop"] - p["dome_height"] * 0.4 + rng.uniform(0.04, 0.07))
        gb_r = (rng.uniform(0.035, 0.06), rng.uniform(0.02, 0.035))
        cv2.ellipse(gb, (int(gb_c[0] * size * 16), int(gb_c[1] * size * 16)), (int(gb_r[0] * size * 16), int(gb_r[1] * size * 16)),
                    0, 180, 360, 255, -1, cv2.LINE_AA, _SHIFT)
        soft = soft - rng.uniform(0.15, 0.25) * _blur(gb.astype(np.float32) / 255.0, 0.8 * size / 256) * (1.0 - lung_soft)

    # Noise: low-frequency exposure variation and fine grain.
    soft = soft + p["noise_smooth"] * _smooth_noise(rng, size, 7) * body_soft
    soft = soft + p["noise_grain"] * rng.standard_normal((size, size)).astype(np.float32)
    soft = np.clip(soft, 0.0, 1.0).astype(np.float32)
    return soft, lung_mask, body > 0


def _render_bone(rng: np.random.Generator, p: Dict[str, float], size: int) -> np.ndarray:
    """Bone image (>= 0, before clipping against the soft tissue), size x size float32."""
    cx = p["midline"]
    lateral = p["body_half_width"] - p["chest_wall"] + 0.012
    n_ribs = int(p["rib_count"])
    post_fill = np.zeros((size, size), np.uint8)
    post_edge = np.zeros((size, size), np.uint8)
    ant_fill = np.zeros((size, size), np.uint8)
    ant_edge = np.zeros((size, size), np.uint8)
    clav_fill = np.zeros((size, size), np.uint8)
    clav_edge = np.zeros((size, size), np.uint8)
    edge_px = max(1, int(round(0.0035 * size)))
    t = np.linspace(0.0, 1.0, 48)
    post_polys: List[np.ndarray] = []
    post_edges: List[np.ndarray] = []
    ant_polys: List[np.ndarray] = []
    ant_edges: List[np.ndarray] = []
    for side in (-1, +1):
        for k in range(n_ribs):
            start_v = p["rib_start_v"] + k * p["rib_spacing"] * rng.uniform(0.96, 1.04)
            reach = lateral * min(1.0, 0.5 + 0.17 * k) * rng.uniform(0.97, 1.03)
            rise = rng.uniform(0.025, 0.045)
            drop = rng.uniform(0.10, 0.15) * min(1.0, 0.5 + 0.1 * k)
            # Posterior rib: leaves the spine, rises slightly, sweeps laterally and curves down the wall.
            centre = np.stack([cx + side * (0.025 + (reach - 0.025) * np.sin(0.5 * np.pi * t)),
                               start_v - rise * np.sin(np.pi * t) + drop * t**3], axis=1)
            width = p["rib_width"] * (0.75 + 0.25 * np.sin(0.5 * np.pi * t)) * rng.uniform(0.9, 1.1)
            poly, edge_a, edge_b = _band_outline(centre, 0.5 * width)
            post_polys.append(poly)
            post_edges += [edge_a, edge_b]
            # Anterior rib (upper ribs only; the lower ones hide under the diaphragm): from the
            # lateral end it arcs down and towards the sternum, concave upwards.
            if k < n_ribs - 3:
                end = centre[-1]
                span = abs(end[0] - cx) - rng.uniform(0.06, 0.10)
                fall = rng.uniform(0.10, 0.15)
                ant_centre = np.stack([end[0] - side * span * np.sin(0.5 * np.pi * t), end[1] + fall * t**0.7], axis=1)
                ant_poly, ant_a, ant_b = _band_outline(ant_centre, 0.5 * p["rib_width"] * 1.2 * np.ones_like(t))
                ant_polys.append(ant_poly)
                ant_edges += [ant_a, ant_b]
        # Clavicle: gentle S from the sternal notch up and out to the shoulder.
        clav_len = rng.uniform(0.28, 0.35)
        clav_centre = np.stack([cx + side * (0.03 + clav_len * t),
                                p["clavicle_v"] - p["clavicle_rise"] * t + 0.012 * np.sin(2.0 * np.pi * t)], axis=1)
        clav_poly, clav_a, clav_b = _band_outline(clav_centre, 0.5 * rng.uniform(0.022, 0.03) * (1.0 + 0.3 * t**4))
        _fill_polygons(clav_fill, [clav_poly], size)
        _draw_polylines(clav_edge, [clav_a, clav_b], size, edge_px)
    _fill_polygons(post_fill, post_polys, size)
    _draw_polylines(post_edge, post_edges, size, edge_px)
    _fill_polygons(ant_fill, ant_polys, size)
    _draw_polylines(ant_edge, ant_edges, size, edge_px)

    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    u = np.broadcast_to(coords[None, :], (size, size))
    # Anterior ribs fade out medially (costal cartilage is radiolucent).
    ant_fade = np.clip((np.abs(u - cx) - 0.07) / 0.2, 0.0, 1.0)
    bone = (p["rib_fill"] * post_fill + p["rib_edge"] * post_edge) / 255.0
    bone = bone + p["anterior_gain"] * ant_fade * (p["rib_fill"] * ant_fill + 0.5 * p["rib_edge"] * ant_edge) / 255.0
    bone = bone + (1.3 * p["rib_fill"] * clav_fill + p["rib_edge"] * clav_edge) / 255.0

    # Spine: stacked vertebral bodies with cortical rims, pedicles and spinous processes.
    spine_fill = np.zeros((size, size), np.uint8)
    spine_edge = np.zeros((size, size), np.uint8)
    v_pos = rng.uniform(-0.02, 0.01)
    while v_pos < 1.0:
        height = 0.030 + 0.018 * np.clip(v_pos, 0.0, 1.0)
        half_w = 0.028 + 0.012 * np.clip(v_pos, 0.0, 1.0)
        corners = np.array([[cx - half_w, v_pos], [cx + half_w, v_pos], [cx + half_w, v_pos + height], [cx - half_w, v_pos + height]])
        _fill_polygons(spine_fill, [corners], size)
        _draw_polylines(spine_edge, [np.concatenate([corners, corners[:1]])], size, edge_px)
        for side in (-1, +1):
            centre_px = (int(round((cx + side * 0.7 * half_w) * size * 16)), int(round((v_pos + 0.35 * height) * size * 16)))
            axes_px = (int(round(0.2 * half_w * size * 16)), int(round(0.22 * height * size * 16)))
            cv2.ellipse(spine_edge, centre_px, axes_px, 0, 0, 360, 255, edge_px, cv2.LINE_AA, _SHIFT)
        spinous = (int(round(cx * size * 16)), int(round((v_pos + 0.6 * height) * size * 16)))
        cv2.ellipse(spine_fill, spinous, (int(round(0.15 * half_w * size * 16)), int(round(0.4 * height * size * 16))),
                    0, 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)
        v_pos += height + rng.uniform(0.006, 0.010)
    # The spine is seen through the mediastinum and abdomen: fainter lower down.
    v_col = np.broadcast_to(coords[:, None], (size, size))
    spine_fade = 1.0 - 0.4 * np.clip((v_col - 0.5) / 0.5, 0.0, 1.0)
    bone = bone + p["spine_gain"] * spine_fade * (0.6 * spine_fill + 0.6 * spine_edge) / 255.0
    bone = bone * rng.uniform(0.85, 1.15)
    return _blur(bone.astype(np.float32), 0.5 * size / 256)


def generate_phantom(size: int = 256, rng: RngLike = 0) -> Phantom:
    """Generate one synthetic frontal chest radiograph with ground truth.

    Args:
        size: output side length in pixels (square images).
        rng: an int seed, a ``numpy.random.SeedSequence`` or a ``numpy.random.Generator``
            (consumed). The same seed gives bit-identical arrays.

    Returns:
        :class:`Phantom` with float32 H x W arrays in [0, 1] (``cxr``, ``soft_tissue``,
        ``bone = cxr - soft_tissue``) and a bool ``lung_mask``.
    """
    if int(size) < 32:
        raise ValueError(f"phantom size must be >= 32 pixels, got {size}")
    size = int(size)
    gen = as_generator(rng)
    params = _sample_anatomy(gen)
    soft, lung_mask, body = _render_soft_tissue(gen, params, size)
    bone_drawn = _render_bone(gen, params, size) * body
    cxr = np.clip(soft + bone_drawn, 0.0, 1.0).astype(np.float32)
    bone = (cxr - soft).astype(np.float32)
    return Phantom(cxr=cxr, soft_tissue=soft, bone=bone, lung_mask=lung_mask.astype(bool), params=params)


# ----------------------------------------------------------------------------- datasets and figures


def _to_uint8(image01: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(image01, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def _write_png(path: Path, image_u8: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), image_u8):
            raise OSError(f"cv2.imwrite failed for {path}")


def split_counts(n: int, split: Sequence[float]) -> Tuple[int, int, int]:
    """Numbers of (train, val, test) samples for ``n`` samples and fractions ``split`` (summing to 1)."""
    if len(split) != 3 or any(f < 0 for f in split) or abs(sum(split) - 1.0) > 1e-6:
        raise ValueError(f"split must be three non-negative fractions summing to 1, got {tuple(split)}")
    n_val = int(round(n * split[1]))
    n_test = int(round(n * split[2]))
    n_train = n - n_val - n_test
    if n_train < 0:
        raise ValueError(f"split {tuple(split)} leaves no room for training samples with n={n}")
    return n_train, n_val, n_test


def write_phantom_dataset(out_dir: PathLike, n: int, size: int = 256, seed: int = 0,
                          split: Sequence[float] = (0.8, 0.1, 0.1), progress: bool = True) -> Dict[str, object]:
    """Write ``n`` phantoms as ``CXR/``, ``BS/`` and ``Mask/`` 8-bit PNG folders plus split lists.

    File names are ``phantom_0000.png`` ...; masks are 0/255. Sample ``i`` is generated
    from ``SeedSequence([seed, i])``, so it does not depend on ``n``. ``train.txt``,
    ``val.txt`` and ``test.txt`` hold one stem per line (a seeded permutation cut by
    ``split``; each list sorted). Every file is written atomically.

    Returns:
        Summary dict: out_dir, n, size, seed, counts per split, mean lung fraction, seconds.
    """
    out = Path(out_dir)
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    counts = split_counts(n, split)
    for sub in ("CXR", "BS", "Mask"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(n - 1)))
    stems = [f"phantom_{i:0{width}d}" for i in range(n)]
    indices = range(n)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="phantoms", unit="img")
    start = time.perf_counter()
    lung_fractions = []
    for i in indices:
        phantom = generate_phantom(size, sample_seed_sequence(seed, i))
        _write_png(out / "CXR" / f"{stems[i]}.png", _to_uint8(phantom.cxr))
        _write_png(out / "BS" / f"{stems[i]}.png", _to_uint8(phantom.soft_tissue))
        _write_png(out / "Mask" / f"{stems[i]}.png", phantom.lung_mask.astype(np.uint8) * 255)
        lung_fractions.append(float(phantom.lung_mask.mean()))
    order = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_SEED_KEY])).permutation(n)
    bounds = np.cumsum((0,) + counts)
    lists: Dict[str, List[str]] = {}
    for name, lo, hi in zip(SPLIT_NAMES, bounds[:-1], bounds[1:]):
        lists[name] = sorted(stems[j] for j in order[lo:hi])
        atomic_write_text(out / f"{name}.txt", "".join(f"{s}\n" for s in lists[name]))
    return {
        "out_dir": str(out),
        "n": n,
        "size": int(size),
        "seed": int(seed),
        "counts": {name: len(lists[name]) for name in SPLIT_NAMES},
        "lung_fraction_mean": float(np.mean(lung_fractions)),
        "seconds": time.perf_counter() - start,
    }


def save_phantom_figure(path: PathLike, phantoms: Sequence[Phantom], tile: int = 256) -> Path:
    """Save a PNG grid: one row per phantom, columns CXR | soft tissue (BS) | bone | lung mask.

    The bone column is contrast-stretched (x k, written in its label) so faint ribs show.
    Drawn with OpenCV/numpy only; written atomically. Returns the path.
    """
    if not phantoms:
        raise ValueError("save_phantom_figure needs at least one phantom")
    header = max(16, tile // 10)
    rows = []
    for phantom in phantoms:
        bone_gain = 0.9 / max(float(phantom.bone.max()), 1e-6)
        panels = [(phantom.cxr, "CXR"), (phantom.soft_tissue, "soft tissue (BS)"),
                  (np.clip(phantom.bone * bone_gain, 0, 1), f"bone (x{bone_gain:.1f})"),
                  (phantom.lung_mask.astype(np.float32), "lung mask")]
        tiles = []
        for image, label in panels:
            img = cv2.resize(_to_uint8(image), (tile, tile), interpolation=cv2.INTER_AREA)
            strip = np.zeros((header, tile), np.uint8)
            cv2.putText(strip, label, (4, header - 5), cv2.FONT_HERSHEY_SIMPLEX, header / 40.0, 255, 1, cv2.LINE_AA)
            tiles.append(np.concatenate([strip, img], axis=0))
            tiles.append(np.full((tile + header, 2), 128, np.uint8))
        rows.append(np.concatenate(tiles[:-1], axis=1))
        rows.append(np.full((2, rows[-1].shape[1]), 128, np.uint8))
    figure = np.concatenate(rows[:-1], axis=0)
    path = Path(path)
    _write_png(path, figure)
    return path
