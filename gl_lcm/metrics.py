"""Evaluation metrics of the published GL-LCM tables (BSR, MSE, PSNR, LPIPS) plus SSIM and MS-SSIM.

All metric functions take gray numpy arrays H x W in [0, 1] (as returned by
:func:`gl_lcm.data.io.read_image`) and compute in float64. They follow the
published evaluation script (GL-LCM ``codes/metrics.py``):

- images are resized to ``image_size`` x ``image_size`` (1024) with
  ``cv2.resize(..., INTER_LINEAR)``; the published script resized the 8-bit images
  before dividing by 255 for MSE / LPIPS, we resize the [0, 1] floats (identical
  when the images are already 1024 x 1024, as in SZCH);
- MSE is on the [0, 1] scale (tables print it in units of 1e-3);
- PSNR uses peak 1; identical images give +inf (the published script crashed);
- BSR uses the bone image ``cxr - gt`` and a mean-shifted prediction;
- LPIPS is AlexNet / v0.1 fed the 1-channel image in [0, 1] without rescaling to
  [-1, 1] (see :class:`LPIPSMetric`); its trunk weights come from ``gl-lcm weights lpips``
  (:mod:`gl_lcm.weights`) or torchvision's cache, never from a download at metric time.

SSIM and MS-SSIM are ours (the paper reports neither): perceptual measures that need no ImageNet
weights, so every table has one even where LPIPS cannot run. They follow Wang et al. (Gaussian
window 11, sigma 1.5, data range 1; MS-SSIM with 5 scales, fewer for small images).
"""
from __future__ import annotations

import csv
import io as _io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch

from gl_lcm.utils.atomic import atomic_write_text

PathLike = Union[str, os.PathLike]

ALEXNET_WEIGHTS_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_WEIGHTS_URL = f"https://download.pytorch.org/models/{ALEXNET_WEIGHTS_FILE}"
LPIPS_PROTOCOLS = ("published", "standard")

METRIC_ORDER = ("bsr", "mse", "psnr", "lpips", "ssim", "ms_ssim")


def _as_pair(gt: np.ndarray, pred: np.ndarray, name: str) -> Tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if gt.ndim != 2 or gt.shape != pred.shape:
        raise ValueError(f"{name}: expected two H x W arrays of the same shape, got {gt.shape} and {pred.shape}")
    return gt, pred


# ----------------------------------------------------------------------------- pixel metrics


def mse(gt: np.ndarray, pred: np.ndarray) -> float:
    """Mean squared error: ``mean((gt - pred)^2)``; H x W arrays in [0, 1].

    The published tables print it in units of 1e-3 (multiply by 1000).
    """
    gt, pred = _as_pair(gt, pred, "mse")
    return float(np.mean((gt - pred) ** 2))


def psnr(gt: np.ndarray, pred: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB with peak 1: ``20 * log10(1 / sqrt(MSE))``.

    H x W arrays in [0, 1]. Identical images give ``+inf`` (no warning).
    """
    error = mse(gt, pred)
    if error == 0.0:
        return math.inf
    return 20.0 * math.log10(1.0 / math.sqrt(error))


def bsr(cxr: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> float:
    """Bone suppression ratio; H x W arrays in [0, 1], result <= 1 (1 = perfect).

    ``bone = cxr - gt``; ``pred' = pred + mean(gt - pred)`` (removes a global
    brightness offset); ``residual = max(gt - pred', 0)`` elementwise (bone left
    over in the prediction is brighter than gt, but only the part where pred' is
    darker is counted, as in the published code);
    ``BSR = 1 - sum(residual^2) / sum(bone^2)``.
    Raises ValueError when ``sum(bone^2) == 0`` (cxr == gt: no bone signal).
    """
    gt, pred = _as_pair(gt, pred, "bsr")
    cxr, _ = _as_pair(cxr, gt, "bsr")
    bone_energy = float(np.sum((cxr - gt) ** 2))
    if bone_energy == 0.0:
        raise ValueError("bsr: the CXR equals the ground truth (sum(bone^2) == 0): no bone signal to suppress")
    shifted = pred + np.mean(gt - pred)
    residual = np.maximum(gt - shifted, 0.0)
    return float(1.0 - np.sum(residual**2) / bone_energy)


def structural_similarity(gt: np.ndarray, pred: np.ndarray) -> Tuple[float, float]:
    """(SSIM, MS-SSIM) of two H x W images in [0, 1], computed in float32 torch (gl_lcm.losses)."""
    from gl_lcm.losses import ms_ssim, ssim

    gt, pred = _as_pair(gt, pred, "structural_similarity")
    g = torch.from_numpy(np.ascontiguousarray(gt, dtype=np.float32))[None, None] * 2 - 1
    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32))[None, None] * 2 - 1
    with torch.no_grad():
        return float(ssim(p, g)), float(ms_ssim(p, g))


def bone_metrics(cxr: np.ndarray, gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> Dict[str, float]:
    """The bone image itself, inside the lung mask: dict(bone_psnr, bone_ssim).

    Predicted bone = cxr - pred, true bone = cxr - gt (H x W arrays in [0, 1], same size; mask bool H x W).
    Both are scored against the true bone's own range R inside the mask (max - min), since bone is a faint
    signal that a [0, 1] peak would flatter: bone_psnr = 10 log10(R^2 / MSE over the mask); bone_ssim = the
    mean of the SSIM map (scikit-image, Gaussian 11 x 11, sigma 1.5, data range R) over the mask. An identity
    prediction (no bone found) scores SSIM near 0.
    """
    from skimage.metrics import structural_similarity as ssim_map

    cxr, gt, pred = (np.asarray(x, dtype=np.float64) for x in (cxr, gt, pred))
    mask = np.asarray(mask, dtype=bool)
    if not (cxr.shape == gt.shape == pred.shape == mask.shape):
        raise ValueError(f"bone_metrics: shapes differ: cxr {cxr.shape}, gt {gt.shape}, pred {pred.shape}, "
                         f"mask {mask.shape}")
    if not mask.any():
        raise ValueError("bone_metrics: the lung mask is empty")
    true_bone, pred_bone = cxr - gt, cxr - pred
    r = float(true_bone[mask].max() - true_bone[mask].min()) or 1.0
    err = float(np.mean((pred_bone[mask] - true_bone[mask]) ** 2))
    _, full = ssim_map(true_bone, pred_bone, data_range=r, gaussian_weights=True, sigma=1.5,
                       use_sample_covariance=False, full=True)
    inner = np.zeros_like(mask)  # as scikit-image's own mean, leave out the 5-pixel rim its 11 x 11 window pads
    inner[5:-5, 5:-5] = mask[5:-5, 5:-5]
    return {"bone_psnr": 10 * np.log10(r * r / err) if err > 0 else float("inf"),
            "bone_ssim": float(full[inner if inner.any() else mask].mean())}


def fit_bone_gain(cxrs, preds, truths, masks) -> float:
    """Least-squares gain k of a predicted bone image: argmin_k sum over the lung pixels of every film of
    (k (cxr - pred) - (cxr - truth))^2 = <b_pred, b_true> / <b_pred, b_pred>.

    Lists of H x W arrays in [0, 1] (masks bool). Fit it on films the models never trained on (a validation
    split) and apply it with :func:`apply_bone_gain`: a bone estimate that correlates with the truth by rho
    and has the right energy leaves (1 - rho^2) of the bone energy as error with the gain, against
    2 (1 - rho) without it, so a weakly correlated estimate is shrunk towards 'no bone' (the identity).
    """
    num = den = 0.0
    for cxr, pred, truth, mask in zip(cxrs, preds, truths, masks):
        m = np.asarray(mask, dtype=bool)
        b_pred = (np.asarray(cxr, np.float64) - np.asarray(pred, np.float64))[m]
        b_true = (np.asarray(cxr, np.float64) - np.asarray(truth, np.float64))[m]
        num += float(b_pred @ b_true)
        den += float(b_pred @ b_pred)
    if den <= 0:
        raise ValueError("fit_bone_gain: the predicted bone is zero on every lung pixel")
    return num / den


def apply_bone_gain(cxr: np.ndarray, pred: np.ndarray, gain: float) -> np.ndarray:
    """The soft-tissue image whose bone is ``gain`` x that of ``pred``: cxr - gain (cxr - pred), clipped to [0, 1]."""
    cxr = np.asarray(cxr, np.float64)
    return np.clip(cxr - gain * (cxr - np.asarray(pred, np.float64)), 0.0, 1.0)


def resize_for_metrics(image: np.ndarray, size: int = 1024) -> np.ndarray:
    """Resize an H x W image to size x size with ``cv2.resize`` INTER_LINEAR (float64 out)."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"resize_for_metrics: expected H x W, got {image.shape}")
    if image.shape == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)


# ----------------------------------------------------------------------------- LPIPS


class LPIPSWeightsMissing(FileNotFoundError):
    """The AlexNet trunk weights LPIPS needs are not on disk (install: ``gl-lcm weights lpips``)."""


def default_alexnet_weights_path() -> Path:
    """``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth`` (TORCH_HOME default ~/.cache/torch)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch"
    )
    return Path(torch_home) / "hub" / "checkpoints" / ALEXNET_WEIGHTS_FILE


def _missing_weights_message(explicit: Optional[PathLike] = None) -> str:
    from gl_lcm.weights import missing_weights_message

    return missing_weights_message("alex", explicit) + " Or evaluate without LPIPS with --no-lpips."


class LPIPSMetric:
    """LPIPS (AlexNet trunk, v0.1 linear heads), built once and reused per image.

    Built without any download: the trunk comes from the torchvision-layout AlexNet state
    dict at ``weights_path`` (keys ``features.*``, other keys ignored; ``.safetensors`` or a
    torchvision ``.pth``). Without ``weights_path`` the first file found of
    ``gl_lcm.weights.trunk_search_paths("alex")`` is used: ``lpips_alex.safetensors`` in the
    weights folder (``$GL_LCM_HOME/weights``, default ``~/.cache/gl_lcm/weights``, written by
    ``gl-lcm weights lpips``), then torchvision's ``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``.
    The linear heads are the v0.1 weights shipped inside the ``lpips`` package. A missing file
    raises :class:`LPIPSWeightsMissing`, whose message names the install command.

    protocol:
      "published" (default): what the published GL-LCM script computed. It fed a
        1 x 1 x H x W tensor in [0, 1] to ``lpips.LPIPS()`` without ``normalize``.
        AlexNet needs 3 channels; the 1-channel input works only because lpips'
        ScalingLayer computes ``(x - shift) / scale`` with 1 x 3 x 1 x 1 buffers,
        which broadcasts the gray channel to 3 channels. So the effective input is
        the gray image replicated to RGB, left in [0, 1] although LPIPS expects
        [-1, 1]. We replicate to 3 channels explicitly (same numbers).
      "standard": the gray image rescaled to [-1, 1] (``2x - 1``), replicated to RGB.
    """

    def __init__(
        self,
        protocol: str = "published",
        weights_path: Optional[PathLike] = None,
        device: Union[str, torch.device] = "cpu",
    ):
        if protocol not in LPIPS_PROTOCOLS:
            raise ValueError(f"LPIPS protocol must be one of {LPIPS_PROTOCOLS}, got {protocol!r}")
        from gl_lcm.weights import find_trunk_weights

        path = find_trunk_weights("alex", weights_path)
        if path is None or not path.is_file():
            raise LPIPSWeightsMissing(_missing_weights_message(weights_path))

        import lpips

        # pnet_rand=True builds a random trunk (no download); fork_rng keeps the
        # caller's global RNG stream untouched by that initialisation.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision 'pretrained' deprecation
            model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        _load_alexnet_trunk(model, path)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.protocol = protocol
        self.weights_path = path

    @classmethod
    def from_config(cls, metrics_cfg, device: Union[str, torch.device] = "cpu") -> Optional["LPIPSMetric"]:
        """The metric a ``metrics`` config section asks for, or None.

        None when ``metrics.lpips`` is false, or when the weights are missing and
        ``metrics.lpips_missing`` is ``skip`` (one warning naming the install command);
        with ``lpips_missing: error`` a missing file raises :class:`LPIPSWeightsMissing`.
        """
        if not metrics_cfg.lpips:
            return None
        try:
            return cls(protocol=metrics_cfg.lpips_protocol, weights_path=metrics_cfg.lpips_weights or None,
                       device=device)
        except LPIPSWeightsMissing as exc:
            if getattr(metrics_cfg, "lpips_missing", "error") != "skip":
                raise
            warnings.warn(f"LPIPS skipped (metrics.lpips_missing=skip): {exc}", stacklevel=2)
            return None

    def __call__(self, gt: np.ndarray, pred: np.ndarray) -> float:
        """LPIPS distance between two gray H x W images in [0, 1] (0 = identical)."""
        gt, pred = _as_pair(gt, pred, "lpips")
        with torch.no_grad():
            a = self._prepare(gt)
            b = self._prepare(pred)
            return float(self.model(a, b).item())

    def _prepare(self, image: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(image.astype(np.float32))[None, None].to(self.device)
        if self.protocol == "standard":
            tensor = tensor * 2.0 - 1.0
        return tensor.expand(-1, 3, -1, -1)


def _load_alexnet_trunk(model: torch.nn.Module, path: Path) -> None:
    """Copy torchvision ``features.<i>.*`` tensors into lpips' ``net.slice<k>.<i>.*``."""
    from gl_lcm.weights import load_trunk_state

    state = load_trunk_state(path)  # .safetensors (gl-lcm weights lpips) or torchvision .pth

    target = model.net.state_dict()
    # lpips keeps torchvision's layer indices inside its slices: slice2.3 is features.3.
    by_feature_key = {f"features.{k.split('.', 1)[1]}": k for k in target}
    new_state = {}
    for feature_key, target_key in by_feature_key.items():
        if feature_key not in state:
            raise ValueError(f"AlexNet weights {path} lack '{feature_key}' (is it torchvision's alexnet state dict?)")
        tensor = state[feature_key]
        if tuple(tensor.shape) != tuple(target[target_key].shape):
            raise ValueError(
                f"AlexNet weights {path}: '{feature_key}' has shape {tuple(tensor.shape)}, "
                f"expected {tuple(target[target_key].shape)}"
            )
        new_state[target_key] = tensor
    model.net.load_state_dict(new_state, strict=True)


# ----------------------------------------------------------------------------- per image


def compute_metrics(
    cxr: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    image_size: Optional[int] = 1024,
    lpips_metric: Optional[LPIPSMetric] = None,
) -> Dict[str, float]:
    """All metrics of one image: dict(bsr, mse, psnr[, lpips], ssim, ms_ssim).

    cxr, gt, pred: H x W arrays in [0, 1] (sizes may differ); each is first resized
    to image_size x image_size (bilinear; None keeps the sizes, which must match).
    bsr is a fraction (x100 for the tables' %), mse on the [0, 1] scale.
    """
    if image_size is not None:
        cxr, gt, pred = (resize_for_metrics(x, image_size) for x in (cxr, gt, pred))
    result = {"bsr": bsr(cxr, gt, pred), "mse": mse(gt, pred), "psnr": psnr(gt, pred)}
    if lpips_metric is not None:
        result["lpips"] = lpips_metric(gt, pred)
    result["ssim"], result["ms_ssim"] = structural_similarity(gt, pred)
    return result


# ----------------------------------------------------------------------------- summaries


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], n_boot: int = 10000, confidence: float = 0.95,
                        seed: int = 0) -> Tuple[float, float, float]:
    """Mean of the per-image paired differences ``a - b`` and its percentile bootstrap interval.

    a, b: one value per image, same images in the same order (e.g. PSNR of a method and of the
    published setting). Resamples the n differences with replacement ``n_boot`` times (seeded), and
    returns (mean difference, lower, upper) with the (1 - confidence) / 2 and (1 + confidence) / 2
    percentiles of the resampled means. A method is better (worse) than the other only where the
    whole interval is above (below) zero.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"paired_bootstrap_ci needs two equal-length 1-D sequences, got {np.shape(a)} and {np.shape(b)}")
    if not np.all(np.isfinite(d)):
        raise ValueError("paired_bootstrap_ci: non-finite differences (e.g. PSNR of identical images)")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(d.mean()), float(lo), float(hi)


def summarize(rows: Sequence[Mapping[str, object]]) -> Dict[str, Tuple[float, float]]:
    """Metric -> (mean, population std) over per-image rows.

    Every numeric (non-bool) value of the rows counts as a metric (keys such as
    ``stem`` are skipped); a metric must be present in every row. If any value is
    +inf (identical images give PSNR inf) the mean is inf and the std is inf, or 0
    when every value is the same inf. No warnings, no crash. Empty rows -> {}.
    """
    if not rows:
        return {}
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)]
    summary: Dict[str, Tuple[float, float]] = {}
    for key in keys:
        missing = [i for i, row in enumerate(rows) if key not in row]
        if missing:
            raise ValueError(f"summarize: metric '{key}' missing from rows {missing[:10]}")
        values = np.array([float(row[key]) for row in rows], dtype=np.float64)
        if np.all(np.isfinite(values)) or np.any(np.isnan(values)):
            summary[key] = (float(np.mean(values)), float(np.std(values)))
        elif np.all(values == values[0]):
            summary[key] = (float(values[0]), 0.0)
        else:
            has_pos, has_neg = np.any(values == math.inf), np.any(values == -math.inf)
            mean = math.nan if (has_pos and has_neg) else (math.inf if has_pos else -math.inf)
            summary[key] = (mean, math.inf)
    return summary


_TABLE_COLUMNS = (
    ("bsr", "BSR (%) ↑", 100.0),
    ("mse", "MSE (10⁻³) ↓", 1000.0),
    ("psnr", "PSNR ↑", 1.0),
    ("lpips", "LPIPS ↓", 1.0),
    ("ssim", "SSIM ↑", 1.0),  # ours, after the paper's four columns
    ("ms_ssim", "MS-SSIM ↑", 1.0),
    ("bone_psnr", "bone PSNR (lung) ↑", 1.0),  # ours: the bone image inside the lung mask (bone_metrics)
    ("bone_ssim", "bone SSIM (lung) ↑", 1.0),
)
_OPTIONAL_COLUMNS = ("bone_psnr", "bone_ssim")  # shown only where some method has them
_DEFAULT_DECIMALS = {"bsr": 2, "mse": 3, "psnr": 2, "lpips": 3, "ssim": 4, "ms_ssim": 4, "bone_psnr": 2,
                     "bone_ssim": 4}


def _format_value(value: float, decimals: int) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{decimals}f}"


def markdown_table(
    summaries: Mapping[str, Mapping[str, Tuple[float, float]]],
    decimals: Optional[Mapping[str, int]] = None,
    lpips_protocol: Optional[str] = None,
) -> str:
    """Markdown table in the layout of the GL-LCM paper, one row per method.

    summaries: method name -> :func:`summarize` output (metric -> (mean, std)).
    Columns: Method | BSR (%) ↑ | MSE (10⁻³) ↓ | PSNR ↑ | LPIPS ↓ | SSIM ↑ | MS-SSIM ↑ (the paper's
    four, then ours; then bone PSNR / SSIM inside the lung where some method has them), cells
    ``mean ± std`` (BSR x100, MSE x1000); a metric a method lacks shows "–".
    ``lpips_protocol`` adds a note line stating how LPIPS was computed.
    """
    places = dict(_DEFAULT_DECIMALS)
    places.update(decimals or {})
    columns = [c for c in _TABLE_COLUMNS
               if c[0] not in _OPTIONAL_COLUMNS or any(c[0] in s for s in summaries.values())]
    lines = [
        "| Method | " + " | ".join(title for _, title, _ in columns) + " |",
        "|:--|" + "|".join(":-:" for _ in columns) + "|",
    ]
    for method, summary in summaries.items():
        cells = []
        for key, _, scale in columns:
            if key not in summary:
                cells.append("–")
                continue
            mean, std = summary[key]
            cells.append(f"{_format_value(mean * scale, places[key])} ± {_format_value(std * scale, places[key])}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    if lpips_protocol is not None:
        table += f"\nLPIPS: AlexNet, v0.1, protocol '{lpips_protocol}'.\n"
    return table


# ----------------------------------------------------------------------------- folders


def _json_number(value: float) -> Union[float, str]:
    # Strict JSON has no inf / nan: write them as strings.
    return value if math.isfinite(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf else "nan")


def _csv_text(rows: List[Dict[str, object]], columns: Sequence[str]) -> str:
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row[c] if c == "stem" else repr(float(row[c])) for c in columns])
    return buffer.getvalue()


def size_mismatch(pred_shape: Sequence[int], gt_shape: Sequence[int]) -> Optional[str]:
    """Why a prediction of ``pred_shape`` (H, W) cannot be the ground truth's image, or None.

    A prediction at another resolution is fine (the metrics resize both) as long as it has
    the same aspect ratio, within the one pixel of rounding a resize makes.
    """
    ph, pw = pred_shape[:2]
    gh, gw = gt_shape[:2]
    if abs(ph * gw / gh - pw) <= 1.0 + 1e-9 or abs(pw * gh / gw - ph) <= 1.0 + 1e-9:
        return None
    return (f"wrong size: the prediction is {pw}x{ph} px, the ground truth {gw}x{gh} px "
            "(not the same aspect ratio, so not a resized copy)")


def evaluate_folders(
    cxr_dir: PathLike,
    gt_dir: PathLike,
    pred_dir: PathLike,
    out_dir: PathLike,
    stems: Optional[Sequence[str]] = None,
    image_size: Optional[int] = 1024,
    lpips_metric: Optional[LPIPSMetric] = None,
    progress: bool = True,
    method_name: Optional[str] = None,
) -> Dict[str, object]:
    """Evaluate predictions in ``pred_dir`` against ground truth, matched by stem.

    cxr_dir / gt_dir must pair up (for ``stems`` when given, else for all files);
    predictions missing for some stems are listed by name in ``missing.txt`` and the
    summary and counted, never silently dropped. A prediction (or input) that cannot be read,
    is corrupt or has the wrong size (:func:`size_mismatch`) is recorded for that image in
    ``errors.csv`` (image, stage, reason), counted in the summary and named in the table's
    notes; the table is computed on the rest. Writes atomically into out_dir:
    ``per_image.csv`` (stem, bsr, mse, psnr[, lpips]), ``summary.json`` (mean and
    population std per metric, counts, missing stems, LPIPS protocol; inf as the
    string "inf"), ``table.md`` (:func:`markdown_table`, one row named
    ``method_name``, default the pred folder name) and ``missing.txt``.
    Returns dict(metrics=metric -> (mean, std), count, missing, missing_count, failed,
    failed_count, unused_predictions, lpips_protocol, image_size).
    """
    from tqdm import tqdm

    from gl_lcm.data.io import list_images, read_image
    from gl_lcm.data.pairs import find_pairs

    pairs = find_pairs(cxr_dir, gt_dir, stems=stems)
    predictions = list_images(pred_dir)
    missing = [p.stem for p in pairs if p.stem not in predictions]
    wanted = {p.stem for p in pairs}
    unused = sorted(s for s in predictions if s not in wanted)
    present = [p for p in pairs if p.stem in predictions]

    rows: List[Dict[str, object]] = []
    failed: Dict[str, Tuple[str, str]] = {}  # stem -> (stage, reason): recorded, the rest goes on
    for pair in tqdm(present, desc="evaluate", disable=not progress, unit="img"):
        stage = "read input"
        try:
            cxr, _ = read_image(pair.cxr)
            gt, _ = read_image(pair.bs)
            stage = "read prediction"
            pred, _ = read_image(predictions[pair.stem])
            stage = "prediction size"
            problem = size_mismatch(pred.shape, gt.shape)
            if problem:
                raise ValueError(f"{predictions[pair.stem]}: {problem}")
            stage = "metrics"
            values = compute_metrics(cxr, gt, pred, image_size=image_size, lpips_metric=lpips_metric)
        except ValueError as exc:  # ImageReadError is a ValueError
            failed[pair.stem] = (stage, f"{type(exc).__name__}: {exc}")
            if progress:
                tqdm.write(f"  {pair.stem}: {stage} failed: {exc}")
            continue
        rows.append({"stem": pair.stem, **values})

    metrics = summarize(rows)
    protocol = lpips_metric.protocol if lpips_metric is not None else None
    columns = ["stem", *(k for k in METRIC_ORDER if k != "lpips" or lpips_metric is not None)]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "per_image.csv", _csv_text(rows, columns))
    atomic_write_text(out_dir / "missing.txt", "".join(f"{s}\n" for s in missing))
    errors = _io.StringIO()
    writer = csv.writer(errors, lineterminator="\n")
    writer.writerow(["image", "stage", "reason"])
    writer.writerows([stem, stage, reason] for stem, (stage, reason) in sorted(failed.items()))
    atomic_write_text(out_dir / "errors.csv", errors.getvalue())
    summary_json = {
        "metrics": {k: {"mean": _json_number(m), "std": _json_number(s)} for k, (m, s) in metrics.items()},
        "count": len(rows),
        "missing_count": len(missing),
        "missing": missing,
        "failed_count": len(failed),
        "failed": {stem: reason for stem, (_, reason) in sorted(failed.items())},
        "unused_predictions": len(unused),
        "lpips_protocol": protocol,
        "image_size": image_size,
        "pred_dir": str(pred_dir),
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary_json, indent=2, allow_nan=False) + "\n")
    name = method_name if method_name is not None else Path(pred_dir).name
    table = markdown_table({name: metrics}, lpips_protocol=protocol)
    table += f"\n{len(rows)} images evaluated; {len(missing)} predictions missing.\n"
    if failed:
        table += (f"{len(failed)} images failed and are left out of the table (reasons in errors.csv): "
                  + ", ".join(sorted(failed)) + ".\n")
    atomic_write_text(out_dir / "table.md", table)
    return {
        "metrics": metrics,
        "count": len(rows),
        "missing": missing,
        "missing_count": len(missing),
        "failed": sorted(failed),
        "failed_count": len(failed),
        "unused_predictions": len(unused),
        "lpips_protocol": protocol,
        "image_size": image_size,
    }
