"""How the inference networks run: fp32 default untouched, bf16/fp16 autocast really lowers the UNet's
precision and stays close to fp32, torch.compile wiring; CUDA-only checks are marked ``cuda``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gl_lcm.data.phantom import generate_phantom
from gl_lcm.models.factory import load_denoiser, load_vqgan
from gl_lcm.inference import InferenceEngine
from gl_lcm.runtime import Autocast, autocast_dtype, prepare_denoiser

from tiny_models import tiny_config, write_tiny_checkpoints

SIZE = 64


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    cfg = tiny_config([f"data.image_size={SIZE}", "lcm.num_inference_steps=3"])
    paths = write_tiny_checkpoints(tmp_path_factory.mktemp("ckpt"), cfg)
    phantoms = [generate_phantom(SIZE, s) for s in (0, 1)]
    return cfg, paths, [p.cxr for p in phantoms], [p.lung_mask for p in phantoms]


def _pipeline(parts, extra=(), device="cpu"):
    cfg, paths, _, _ = parts
    cfg = tiny_config([f"data.image_size={SIZE}", "lcm.num_inference_steps=3", *extra])
    dev = torch.device(device)
    unet, _ = load_denoiser(paths["student"], dev)
    return InferenceEngine.from_parts(load_vqgan(paths["vqgan"], dev), unet, cfg, dev)


def _conv_dtypes(module) -> list:
    """Record the output dtype of every Conv2d call of ``module``."""
    seen = []
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_fp32_default_runs_the_plain_modules(parts):
    _, _, cxrs, masks = parts
    pipe = _pipeline(parts)
    assert tiny_config().eval.precision == "fp32" and tiny_config().eval.vqgan_precision == "fp32"
    # no wrapper at all: fp32 results are those of the modules themselves, bit for bit
    assert pipe.denoiser is pipe.unet and pipe.codec is pipe.vqgan
    seen = _conv_dtypes(pipe.unet)
    a = pipe.run(["a", "b"], cxrs, masks)
    assert seen and set(seen) == {torch.float32}
    b = _pipeline(parts, ["eval.precision=fp32"]).run(["a", "b"], cxrs, masks)
    for ra, rb in zip(a, b):
        assert np.array_equal(ra.fused, rb.fused) and np.array_equal(ra.local_img, rb.local_img)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_reduced_precision_on_cpu_runs_and_stays_close(parts, precision, dtype):
    _, _, cxrs, masks = parts
    ref = _pipeline(parts).run(["a", "b"], cxrs, masks)
    pipe = _pipeline(parts, [f"eval.precision={precision}"])
    assert isinstance(pipe.denoiser, Autocast) and pipe.codec is pipe.vqgan  # VQGAN stays fp32 by default
    unet_convs, vqgan_convs = _conv_dtypes(pipe.unet), _conv_dtypes(pipe.vqgan)
    low = pipe.run(["a", "b"], cxrs, masks)
    assert set(unet_convs) == {dtype}, "the UNet must run under autocast"
    assert set(vqgan_convs) == {torch.float32}
    diffs = [np.abs(r.global_img - l.global_img).mean() for r, l in zip(ref, low)]
    print(f"{precision} vs fp32, mean |global diff| per image: {diffs}")
    assert max(diffs) > 0 and all(d < 0.02 for d in diffs)  # really different arithmetic, yet close
    for r in low:
        assert r.fused.dtype == np.float32 and np.isfinite(r.fused).all()


def test_autocast_wrapper_returns_float32_and_rejects_unknown_precision(parts):
    _, paths, _, _ = parts
    unet, _ = load_denoiser(paths["student"], torch.device("cpu"))
    fn = prepare_denoiser(unet, torch.device("cpu"), "bf16")
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([999, 999])
    out = fn(x, t, x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    with torch.no_grad():
        ref = unet(x, t, x)
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"bf16 UNet vs fp32: relative L2 difference {rel:.2e}")
    assert 1e-5 < rel < 5e-2  # bf16 has an 8-bit mantissa: about 1e-2 relative, not 0
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        autocast_dtype("int8")


def test_compile_flag_compiles_the_unet_with_static_shapes(parts, monkeypatch):
    calls = []

    def fake_compile(module, **kwargs):
        calls.append((module, kwargs))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    pipe = _pipeline(parts, ["eval.compile=true"])
    assert len(calls) == 1 and calls[0][0] is pipe.unet and calls[0][1] == {"dynamic": False}
    _pipeline(parts)
    assert len(calls) == 1  # off by default


@pytest.mark.cuda
def test_cuda_bf16_autocast_compile_and_channels_last(parts):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _, _, cxrs, masks = parts
    ref = _pipeline(parts, ["device=cuda"], device="cuda").run(["a", "b"], cxrs, masks)
    pipe = _pipeline(parts, ["device=cuda", "eval.precision=bf16", "eval.compile=true"], device="cuda")
    conv = next(m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    low = pipe.run(["a", "b"], cxrs, masks)
    low2 = pipe.run(["a", "b"], cxrs, masks)  # compiled graph reused
    for r, l, l2 in zip(ref, low, low2):
        assert np.abs(r.global_img - l.global_img).mean() < 0.02
        np.testing.assert_array_equal(l.fused, l2.fused)
    cpu = _pipeline(parts).run(["a", "b"], cxrs, masks)
    for c, r in zip(cpu, ref):  # fp32 on the GPU vs the CPU: same method, float round-off only
        assert np.abs(c.fused - r.fused).mean() < 1e-3
