"""Metrics against independent references; LPIPS loader; folder evaluation outputs."""
from __future__ import annotations

import csv
import functools
import json
import math
import warnings

import cv2
import numpy as np
import pytest
import torch

from gl_lcm.data.io import read_image
from gl_lcm.metrics import (
    ALEXNET_WEIGHTS_FILE,
    ALEXNET_WEIGHTS_URL,
    LPIPSMetric,
    LPIPSWeightsMissing,
    bsr,
    compute_metrics,
    evaluate_folders,
    markdown_table,
    mse,
    psnr,
    resize_for_metrics,
    summarize,
)

# ----------------------------------------------------------------------------- references


def mse_loops(gt, pred):
    total, count = 0.0, 0
    for i in range(gt.shape[0]):
        for j in range(gt.shape[1]):
            total += (float(gt[i, j]) - float(pred[i, j])) ** 2
            count += 1
    return total / count


def psnr_ref(mse_value):
    return 10.0 * math.log10(1.0 / mse_value)  # = 20 log10(1 / sqrt(mse))


def bsr_loops(cxr, gt, pred):
    h, w = gt.shape
    offset = sum(float(gt[i, j]) - float(pred[i, j]) for i in range(h) for j in range(w)) / (h * w)
    residual_energy = bone_energy = 0.0
    for i in range(h):
        for j in range(w):
            r = float(gt[i, j]) - (float(pred[i, j]) + offset)
            if r > 0:
                residual_energy += r * r
            bone_energy += (float(cxr[i, j]) - float(gt[i, j])) ** 2
    return 1.0 - residual_energy / bone_energy


def bsr_published_style(cxr_u8, gt_u8, pred_u8):
    """The published script's steps (cv.subtract, resize, clamp) on 8-bit files."""
    cxr, gt, bs = (x / 255 for x in (cxr_u8, gt_u8, pred_u8))
    bone = cv2.subtract(cxr, gt)
    gt, bs, bone = (cv2.resize(x, (1024, 1024)) for x in (gt, bs, bone))
    bs = bs + np.average(cv2.subtract(gt, bs))
    bias = cv2.subtract(gt, bs)
    bias[bias < 0] = 0
    return 1 - np.sum(bias**2) / np.sum(bone**2)


@pytest.fixture
def rng():
    return np.random.default_rng(2025)


# ----------------------------------------------------------------------------- MSE / PSNR / BSR


def test_metrics_match_loop_references_on_random_images(rng):
    for _ in range(3):
        cxr = rng.random((12, 15))
        gt = np.clip(cxr - 0.3 * rng.random((12, 15)), 0, 1)
        pred = np.clip(gt + rng.normal(0, 0.1, (12, 15)) + 0.05, 0, 1)
        m = mse_loops(gt, pred)
        assert mse(gt, pred) == pytest.approx(m, rel=1e-12)
        assert psnr(gt, pred) == pytest.approx(psnr_ref(m), rel=1e-12)
        assert bsr(cxr, gt, pred) == pytest.approx(bsr_loops(cxr, gt, pred), rel=1e-12)


def test_bsr_properties(rng):
    cxr = rng.random((10, 10))
    gt = cxr * 0.6
    assert bsr(cxr, gt, gt) == 1.0
    assert bsr(cxr, gt, gt + 0.25) == pytest.approx(1.0)  # a global offset is forgiven
    # leaving part of the bone in lowers BSR
    assert bsr(cxr, gt, gt + 0.5 * (cxr - gt)) < 1.0


def test_bsr_without_bone_signal_raises(rng):
    image = rng.random((8, 8))
    with pytest.raises(ValueError, match="no bone signal"):
        bsr(image, image, image * 0.5)


def test_identical_images_give_infinite_psnr_without_warning(rng):
    image = rng.random((8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert psnr(image, image) == math.inf
        assert mse(image, image) == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        mse(np.zeros((4, 4)), np.zeros((4, 5)))


def _read_u8(path):
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float64)


@pytest.mark.parametrize("stem", ["0", "1", "2"])
def test_metrics_on_real_images(szch_dir, stem, rng):
    cxr, _ = read_image(szch_dir / "CXR" / f"{stem}.png")
    gt, _ = read_image(szch_dir / "BS" / f"{stem}.png")
    cxr_u8, gt_u8 = _read_u8(szch_dir / "CXR" / f"{stem}.png"), _read_u8(szch_dir / "BS" / f"{stem}.png")

    perfect = compute_metrics(cxr, gt, gt)
    assert perfect == {"bsr": 1.0, "mse": 0.0, "psnr": math.inf, "ssim": pytest.approx(1.0, abs=1e-6),
                       "ms_ssim": pytest.approx(1.0, abs=1e-6)}

    untouched = compute_metrics(cxr, gt, cxr)
    # read_image holds k / 255 in float32: agreement to float32 precision
    assert untouched["bsr"] == pytest.approx(bsr_published_style(cxr_u8, gt_u8, cxr_u8), rel=1e-6)
    diff = ((gt_u8 - cxr_u8) / 255).ravel()
    assert untouched["mse"] == pytest.approx(float(diff @ diff) / diff.size, rel=1e-6)
    assert 0.0 < untouched["bsr"] < 1.0

    noisy = gt + rng.normal(0.0, 0.02, gt.shape)
    result = compute_metrics(cxr, gt, noisy)
    diff = (gt.astype(np.float64) - noisy).ravel()
    expected_mse = float(diff @ diff) / diff.size
    assert result["mse"] == pytest.approx(expected_mse, rel=1e-9)
    assert result["mse"] == pytest.approx(0.02**2, rel=0.02)
    assert result["psnr"] == pytest.approx(psnr_ref(expected_mse), rel=1e-9)
    noisy_u8 = noisy * 255  # published-style reference takes 0..255 values
    assert result["bsr"] == pytest.approx(bsr_published_style(cxr_u8, gt_u8, noisy_u8), rel=1e-6)


# ----------------------------------------------------------------------------- resizing


def bilinear_reference(image, size):
    """Half-pixel-centre bilinear with edge clamping (OpenCV's INTER_LINEAR when enlarging)."""
    h, w = image.shape
    out = np.empty((size, size))
    for i in range(size):
        y = min(max((i + 0.5) * h / size - 0.5, 0.0), h - 1)
        y0 = int(math.floor(y))
        y1, fy = min(y0 + 1, h - 1), y - math.floor(y)
        for j in range(size):
            x = min(max((j + 0.5) * w / size - 0.5, 0.0), w - 1)
            x0 = int(math.floor(x))
            x1, fx = min(x0 + 1, w - 1), x - math.floor(x)
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_resize_for_metrics_is_bilinear(rng):
    image = rng.random((5, 7))
    np.testing.assert_allclose(resize_for_metrics(image, 12), bilinear_reference(image, 12), atol=1e-6)
    same = rng.random((16, 16)).astype(np.float32)
    np.testing.assert_array_equal(resize_for_metrics(same, 16), same)


def test_compute_metrics_resizes_to_image_size(rng):
    cxr = rng.random((6, 6))
    gt = cxr * 0.7
    pred = gt + rng.normal(0, 0.05, gt.shape)
    result = compute_metrics(cxr, gt, pred, image_size=10)
    big = [bilinear_reference(x, 10) for x in (cxr, gt, pred)]
    assert result["bsr"] == pytest.approx(bsr_loops(*big), rel=1e-9)
    assert result["mse"] == pytest.approx(mse_loops(big[1], big[2]), rel=1e-9)
    with pytest.raises(ValueError, match="same shape"):
        compute_metrics(cxr, gt, pred[:5], image_size=None)


# ----------------------------------------------------------------------------- summaries and table


def test_summarize_mean_and_population_std():
    rows = [{"stem": "a", "bsr": 0.9, "psnr": 30.0}, {"stem": "b", "bsr": 0.8, "psnr": 34.0}]
    summary = summarize(rows)
    assert set(summary) == {"bsr", "psnr"}
    assert summary["bsr"][0] == pytest.approx(0.85) and summary["bsr"][1] == pytest.approx(0.05)
    assert summary["psnr"] == pytest.approx((32.0, 2.0))  # population std: sqrt(((-2)^2 + 2^2) / 2)
    assert summarize([]) == {}
    with pytest.raises(ValueError, match="'psnr' missing"):
        summarize([{"psnr": 1.0}, {"bsr": 2.0}])


def test_summarize_infinite_psnr():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert summarize([{"psnr": math.inf}, {"psnr": 30.0}])["psnr"] == (math.inf, math.inf)
        assert summarize([{"psnr": math.inf}, {"psnr": math.inf}])["psnr"] == (math.inf, 0.0)


def test_markdown_table_layout():
    summaries = {
        "GL-LCM": {"bsr": (0.9712, 0.0101), "mse": (0.00123, 0.0004), "psnr": (31.234, 1.5), "lpips": (0.0712, 0.0101),
                   "ssim": (0.91234, 0.01), "ms_ssim": (0.95, 0.005)},
        "Input CXR": {"bsr": (0.5, 0.1), "mse": (0.004, 0.001), "psnr": (math.inf, math.inf)},
    }
    table = markdown_table(summaries, lpips_protocol="published")
    lines = table.splitlines()
    assert lines[0] == "| Method | BSR (%) ↑ | MSE (10⁻³) ↓ | PSNR ↑ | LPIPS ↓ | SSIM ↑ | MS-SSIM ↑ |"
    assert lines[2] == ("| GL-LCM | 97.12 ± 1.01 | 1.230 ± 0.400 | 31.23 ± 1.50 | 0.071 ± 0.010 | 0.9123 ± 0.0100 "
                        "| 0.9500 ± 0.0050 |")
    assert lines[3] == "| Input CXR | 50.00 ± 10.00 | 4.000 ± 1.000 | inf ± inf | – | – | – |"
    assert "protocol 'published'" in table


# ----------------------------------------------------------------------------- LPIPS


@functools.lru_cache(maxsize=1)
def _alexnet_template():
    import torchvision

    return {k: v.shape for k, v in torchvision.models.alexnet(weights=None).features.state_dict().items()}


def _alexnet_trunk_state_dict(seed=0):
    """torchvision AlexNet ``features.*`` tensors with seeded He-style random values."""
    template = {k: torch.empty(shape) for k, shape in _alexnet_template().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in template.items():
        if key.endswith("weight"):
            fan_in = tensor[0].numel()
            state[f"features.{key}"] = torch.randn(tensor.shape, generator=generator) * math.sqrt(2.0 / fan_in)
        else:
            state[f"features.{key}"] = torch.randn(tensor.shape, generator=generator) * 0.01
    return state


@pytest.fixture(scope="module")
def alexnet_weights(tmp_path_factory):
    state = _alexnet_trunk_state_dict()
    state["classifier.1.weight"] = torch.zeros(3, 3)  # a full torchvision dict also has these: ignored
    path = tmp_path_factory.mktemp("weights") / "my_alexnet.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def lpips_metric(alexnet_weights):
    return LPIPSMetric(weights_path=alexnet_weights[0])


def _smooth_image(rng, size=96):
    noise = rng.random((size // 8, size // 8)).astype(np.float32)
    return cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def test_lpips_loads_trunk_from_local_file(lpips_metric, alexnet_weights):
    _, state = alexnet_weights
    net = lpips_metric.model.net
    torch.testing.assert_close(net.slice1[0].weight, state["features.0.weight"])
    torch.testing.assert_close(net.slice2[1].weight, state["features.3.weight"])  # slice2 holds features 2..4
    torch.testing.assert_close(net.slice5[0].bias, state["features.10.bias"])
    assert lpips_metric.protocol == "published"


def test_lpips_zero_for_identical_and_grows_with_noise(lpips_metric, rng):
    image = _smooth_image(rng)
    assert lpips_metric(image, image) == pytest.approx(0.0, abs=1e-7)
    noise = rng.normal(0, 1, image.shape).astype(np.float32)
    distances = [lpips_metric(image, np.clip(image + s * noise, 0, 1)) for s in (0.02, 0.1, 0.3)]
    assert 0.0 < distances[0] < distances[1] < distances[2]


def test_lpips_published_protocol_matches_one_channel_input(lpips_metric, alexnet_weights, rng):
    """The published script passed 1 x 1 x H x W in [0, 1] straight to lpips."""
    a, b = _smooth_image(rng), _smooth_image(rng)
    with torch.no_grad():
        raw = lpips_metric.model(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]).item()
    assert lpips_metric(a, b) == pytest.approx(raw, rel=1e-6)

    standard = LPIPSMetric(protocol="standard", weights_path=alexnet_weights[0])
    rgb = [torch.from_numpy(x)[None, None].repeat(1, 3, 1, 1) for x in (a, b)]
    with torch.no_grad():
        normalized = standard.model(*rgb, normalize=True).item()  # lpips' own [0,1] -> [-1,1] path
    assert standard(a, b) == pytest.approx(normalized, rel=1e-6)
    assert standard(a, b) != pytest.approx(lpips_metric(a, b), rel=1e-3)
    with pytest.raises(ValueError, match="protocol"):
        LPIPSMetric(protocol="fancy", weights_path=alexnet_weights[0])


def test_lpips_finds_weights_in_torch_home_and_keeps_global_rng(tmp_path, monkeypatch, alexnet_weights):
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / ALEXNET_WEIGHTS_FILE).write_bytes(alexnet_weights[0].read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    before = torch.get_rng_state()
    metric = LPIPSMetric()
    assert torch.equal(torch.get_rng_state(), before)
    assert metric.weights_path == checkpoints / ALEXNET_WEIGHTS_FILE
    torch.testing.assert_close(metric.model.net.slice1[0].weight, alexnet_weights[1]["features.0.weight"])


def test_lpips_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    expected = tmp_path / "empty_home" / "hub" / "checkpoints" / ALEXNET_WEIGHTS_FILE
    with pytest.raises(LPIPSWeightsMissing) as info:
        LPIPSMetric()
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(expected) in message and ALEXNET_WEIGHTS_URL in message and "--no-lpips" in message
    with pytest.raises(LPIPSWeightsMissing, match="elsewhere.pth"):
        LPIPSMetric(weights_path=tmp_path / "elsewhere.pth")


def test_lpips_rejects_incomplete_state_dict(tmp_path):
    state = _alexnet_trunk_state_dict()
    del state["features.8.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lack 'features.8.weight'"):
        LPIPSMetric(weights_path=tmp_path / "partial.pth")


# ----------------------------------------------------------------------------- folders


def _make_eval_folders(root, rng, stems, predicted):
    for name in ("CXR", "BS", "pred"):
        (root / name).mkdir()
    for stem in stems:
        soft = _smooth_image(rng, 32) * 0.7
        bone = np.zeros_like(soft)
        bone[::6, :] = 0.25  # "ribs"
        cv2.imwrite(str(root / "CXR" / f"{stem}.png"), np.rint((soft + bone) * 255).astype(np.uint8))
        cv2.imwrite(str(root / "BS" / f"{stem}.png"), np.rint(soft * 255).astype(np.uint8))
        if stem in predicted:
            pred = soft if stem == stems[0] else soft + 0.4 * bone + rng.normal(0, 0.02, soft.shape)
            cv2.imwrite(str(root / "pred" / f"{stem}.png"), np.rint(np.clip(pred, 0, 1) * 255).astype(np.uint8))


def test_evaluate_folders_outputs(tmp_path, rng):
    stems = ["a", "b", "c", "d", "e"]
    _make_eval_folders(tmp_path, rng, stems, predicted={"a", "b", "d", "e"})
    out = tmp_path / "eval"
    result = evaluate_folders(
        tmp_path / "CXR", tmp_path / "BS", tmp_path / "pred", out, image_size=None, progress=False
    )
    assert result["count"] == 4 and result["missing"] == ["c"] and result["missing_count"] == 1
    assert result["lpips_protocol"] is None

    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["stem"] for r in rows] == ["a", "b", "d", "e"]
    assert list(rows[0]) == ["stem", "bsr", "mse", "psnr", "ssim", "ms_ssim"]
    assert float(rows[0]["psnr"]) == math.inf and float(rows[0]["bsr"]) == 1.0
    for row in rows:
        expected = compute_metrics(
            *(read_image(tmp_path / d / f"{row['stem']}.png")[0] for d in ("CXR", "BS", "pred")), image_size=None
        )
        for key in ("bsr", "mse", "psnr"):
            assert float(row[key]) == pytest.approx(expected[key], rel=1e-12)

    assert (out / "missing.txt").read_text() == "c\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 4 and summary["missing_count"] == 1 and summary["missing"] == ["c"]
    assert summary["metrics"]["psnr"] == {"mean": "inf", "std": "inf"}
    bsr_values = [float(r["bsr"]) for r in rows]
    assert summary["metrics"]["bsr"]["mean"] == pytest.approx(np.mean(bsr_values))
    assert summary["metrics"]["bsr"]["std"] == pytest.approx(np.std(bsr_values))

    table = (out / "table.md").read_text()
    assert table.startswith("| Method | BSR (%) ↑ | MSE (10⁻³) ↓ | PSNR ↑ | LPIPS ↓ | SSIM ↑ | MS-SSIM ↑ |")
    assert f"| pred | {np.mean(bsr_values) * 100:.2f} ± {np.std(bsr_values) * 100:.2f} |" in table
    assert "4 images evaluated; 1 predictions missing." in table
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_evaluate_folders_with_stems_and_lpips(tmp_path, rng, lpips_metric):
    _make_eval_folders(tmp_path, rng, ["a", "b", "c"], predicted={"a", "b", "c"})
    result = evaluate_folders(
        tmp_path / "CXR", tmp_path / "BS", tmp_path / "pred", tmp_path / "out",
        stems=["b", "c"], image_size=64, lpips_metric=lpips_metric, progress=False, method_name="Ours",
    )
    assert result["count"] == 2 and result["missing"] == [] and result["unused_predictions"] == 1
    assert result["lpips_protocol"] == "published" and "lpips" in result["metrics"]
    header = (tmp_path / "out" / "per_image.csv").read_text().splitlines()[0]
    assert header == "stem,bsr,mse,psnr,lpips,ssim,ms_ssim"
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| Ours |" in table and "protocol 'published'" in table
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["lpips_protocol"] == "published"
    assert (tmp_path / "out" / "missing.txt").read_text() == ""


# ----------------------------------------------------------------------------- SSIM / MS-SSIM


@pytest.mark.parametrize("size", [64, 256])
def test_ssim_and_ms_ssim_match_pytorch_msssim(rng, size):
    """Against the pytorch_msssim package (5-scale MS-SSIM needs a side > 160, so at 64 px SSIM only)."""
    import pytorch_msssim

    from gl_lcm.metrics import structural_similarity

    gt = rng.uniform(0, 1, (size, size))
    gt = cv2.GaussianBlur(gt, (0, 0), 2.0)
    pred = np.clip(gt + rng.normal(0, 0.05, gt.shape), 0, 1)
    s, ms = structural_similarity(gt, pred)
    g = torch.from_numpy(gt)[None, None].float()
    p = torch.from_numpy(pred)[None, None].float()
    assert s == pytest.approx(float(pytorch_msssim.ssim(p, g, data_range=1.0)), abs=1e-4)
    if size > 160:
        assert ms == pytest.approx(float(pytorch_msssim.ms_ssim(p, g, data_range=1.0)), abs=1e-4)
    assert structural_similarity(gt, gt) == pytest.approx((1.0, 1.0), abs=1e-6)
    assert 0 < s < 1 and 0 < ms < 1


def test_compute_metrics_includes_ssim_columns(rng):
    cxr = rng.uniform(0.2, 1, (32, 32))
    gt = cxr * 0.7
    values = compute_metrics(cxr, gt, gt * 0.98 + 0.01, image_size=None)
    assert set(values) == {"bsr", "mse", "psnr", "ssim", "ms_ssim"}
    assert 0.5 < values["ssim"] <= 1 and 0.5 < values["ms_ssim"] <= 1


def test_paired_bootstrap_interval_against_scipy_and_the_normal_limit():
    """Mean difference exactly; interval against scipy.stats.bootstrap (percentile, paired as one sample of
    differences) and against the normal approximation mean +- 1.96 sd / sqrt(n) for a large sample."""
    from scipy import stats

    from gl_lcm.metrics import paired_bootstrap_ci

    rng = np.random.default_rng(3)
    base = rng.normal(25.0, 1.0, 40)
    other = base + rng.normal(0.3, 0.5, 40)  # paired: the per-image spread cancels
    mean, lo, hi = paired_bootstrap_ci(other, base, n_boot=20000, seed=1)
    d = other - base
    assert mean == pytest.approx(d.mean(), abs=1e-12)
    ref = stats.bootstrap((d,), np.mean, confidence_level=0.95, method="percentile", n_resamples=20000,
                          random_state=np.random.default_rng(2)).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.02) and hi == pytest.approx(ref.high, abs=0.02)
    big = rng.normal(0.1, 1.0, 4000)
    m, lo2, hi2 = paired_bootstrap_ci(big, np.zeros_like(big), n_boot=4000, seed=0)
    half = 1.96 * big.std() / np.sqrt(big.size)
    assert lo2 == pytest.approx(m - half, abs=0.1 * half) and hi2 == pytest.approx(m + half, abs=0.1 * half)
    # an unpaired reading (independent resampling of a and b) would be far wider: the pairing matters
    assert hi - lo < 0.5 * 2 * 1.96 * np.sqrt(2) * base.std() / np.sqrt(base.size)
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap_ci([1.0, 2.0], [[1.0], [2.0]])
