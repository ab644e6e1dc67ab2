"""Global-local fusion: exact Poisson solve, parity with cv2.seamlessClone, alpha/none modes, edge cases."""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import scipy.fft
import torch

from gl_lcm.data.phantom import generate_phantom
from gl_lcm.fusion import (
    FUSION_MODES,
    alpha_fuse,
    discrete_laplacian,
    fuse,
    interior_mask,
    poisson_fuse,
    poisson_fuse_opencv,
    poisson_fuse_torch,
    seamless_clone_center,
)
from gl_lcm import fusion as fusion_module


def _scene(size=128, seed=3):
    """Global = phantom soft tissue; local = global + smooth offset + fine texture; mask = phantom lungs."""
    phantom = generate_phantom(size, seed)
    global_img = phantom.soft_tissue.astype(np.float64)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    texture = cv2.GaussianBlur(rng.standard_normal((size, size)), (0, 0), 1.5)
    local_img = np.clip(global_img + 0.05 * np.sin(3 * xx + 1) * np.cos(2 * yy) + 0.03 * texture, 0, 1)
    return global_img, local_img, phantom.lung_mask


def _dense_reference(global_img, local_img, mask):
    """Independent Poisson solve: dense matrix built pixel by pixel (tiny images only)."""
    coords = [tuple(p) for p in np.argwhere(mask)]
    index = {p: i for i, p in enumerate(coords)}
    a = np.zeros((len(coords), len(coords)))
    b = np.zeros(len(coords))
    for i, (y, x) in enumerate(coords):
        a[i, i] = -4.0
        b[i] = -4.0 * local_img[y, x]
        for q in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            b[i] += local_img[q]
            if q in index:
                a[i, index[q]] = 1.0
            else:
                b[i] -= global_img[q]
    out = global_img.copy()
    for (y, x), value in zip(coords, np.linalg.solve(a, b)):
        out[y, x] = value
    return out


def test_poisson_matches_dense_reference():
    rng = np.random.default_rng(0)
    global_img = rng.random((12, 14))
    local_img = rng.random((12, 14))
    mask = np.zeros((12, 14), bool)
    mask[2:9, 3:11] = True
    mask[5, 11:13] = True  # a thin protrusion
    mask[4, 5] = False  # a hole: a fixed pixel inside the region
    fused = poisson_fuse(global_img, local_img, mask, clip=False)
    np.testing.assert_allclose(fused, _dense_reference(global_img, local_img, mask), atol=1e-6)


def test_poisson_equation_holds_and_outside_is_global():
    global_img, local_img, mask = _scene(128)
    fused = poisson_fuse(global_img, local_img, mask, clip=False)
    assert fused.dtype == np.float32 and fused.shape == global_img.shape
    inside = interior_mask(mask)
    residual = (discrete_laplacian(fused) - discrete_laplacian(local_img))[inside]
    print(f"max |laplacian residual| inside the mask: {np.abs(residual).max():.2e}")
    assert np.abs(residual).max() < 1e-6
    assert np.array_equal(fused[~mask], global_img.astype(np.float32)[~mask])
    # the seam is invisible: across the mask edge the fused image is continuous with the global one
    clipped = poisson_fuse(global_img, local_img, mask)
    assert clipped.min() >= 0.0 and clipped.max() <= 1.0


def test_poisson_removes_constant_offset():
    global_img, _, mask = _scene(96)
    fused = poisson_fuse(global_img, global_img + 0.2, mask, clip=False)
    np.testing.assert_allclose(fused, global_img, atol=1e-6)


@pytest.mark.parametrize("size", [(101, 141), (100, 140), (100, 141), (101, 140)])
def test_seamless_clone_center_lands_on_mask(size):
    width, height = size
    rng = np.random.default_rng(1)
    image = cv2.GaussianBlur(rng.random((256, 256)), (0, 0), 1.5)
    image = (image - image.min()) / np.ptp(image) * 0.6 + 0.2
    mask = np.zeros((256, 256), np.uint8)
    cv2.ellipse(mask, (110, 130), (60, 80), 0, 0, 360, 255, -1)
    mask[:, :60] = 0
    mask[:, 60 + width:] = 0
    mask[:50] = 0
    mask[50 + height:] = 0
    assert cv2.boundingRect(mask)[2:] == (width, height)
    mask_before = mask.copy()
    # cloning an image onto itself changes nothing when the placement is exact
    fused = poisson_fuse_opencv(image, image, mask)
    assert np.array_equal(mask, mask_before), "the caller's mask must not be modified"
    grey = np.rint(image * 255)
    assert np.abs(fused * 255 - grey).mean() < 0.5
    # a one-pixel placement error is clearly visible with the same measure
    cx, cy = seamless_clone_center(mask)
    src = np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)
    shifted = cv2.seamlessClone(src, src.copy(), mask.copy(), (cx + 1, cy), cv2.MONOCHROME_TRANSFER)[:, :, 0]
    assert np.abs(shifted.astype(float) - grey).mean() > 0.8


def test_float_solver_agrees_with_opencv_in_interior():
    global_img, local_img, mask = _scene(256)
    exact = poisson_fuse(global_img, local_img, mask, clip=False)
    opencv = poisson_fuse_opencv(global_img, local_img, mask)
    interior = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=6) > 0
    diff = np.abs(exact - opencv)[interior] * 255
    print(f"float vs OpenCV in the mask interior (6 px from the edge): mean {diff.mean():.3f}/255, "
          f"max {diff.max():.3f}/255")
    # OpenCV works on 8-bit input, truncates its output and erodes the mask by 3 px
    assert diff.mean() < 1.0
    assert diff.max() < 5.0
    # both differ clearly from a plain paste of the local image (the test is sensitive)
    assert np.abs(exact - local_img)[interior].mean() * 255 > 3 * diff.mean()


def test_mask_touching_border_and_empty_mask():
    global_img, local_img, _ = _scene(64)
    full = np.ones_like(global_img, dtype=bool)
    for backend in ("float", "opencv"):
        fused = fuse("poisson", global_img, local_img, full, backend=backend)
        assert np.all(np.isfinite(fused)) and fused.shape == global_img.shape
        # the border ring is the boundary condition: it keeps the global values
        np.testing.assert_allclose(fused[0], global_img[0], atol=1 / 255 + 1e-6)
        np.testing.assert_allclose(fused[:, -1], global_img[:, -1], atol=1 / 255 + 1e-6)
    exact = poisson_fuse(global_img, local_img, full, clip=False)
    residual = (discrete_laplacian(exact) - discrete_laplacian(local_img))[interior_mask(full)]
    assert np.abs(residual).max() < 1e-6
    empty = np.zeros_like(full)
    for mode, kw in (("poisson", {}), ("poisson", {"backend": "opencv"}), ("alpha", {}), ("none", {})):
        np.testing.assert_array_equal(fuse(mode, global_img, local_img, empty, **kw), global_img.astype(np.float32))


def test_alpha_and_none_modes():
    global_img, local_img, mask = _scene(128)
    hard = alpha_fuse(global_img, local_img, mask, feather_px=0)
    np.testing.assert_allclose(hard, np.where(mask, local_img, global_img), atol=1e-6)
    soft = fuse("alpha", global_img, local_img, mask, feather_px=4.0)
    deep = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=12) > 0
    far = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=12) == 0
    np.testing.assert_allclose(soft[deep], local_img[deep], atol=1e-4)
    np.testing.assert_allclose(soft[far], global_img[far], atol=1e-4)
    # on the mask edge the blend is half-way
    edge = mask & ~(cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)
    weight = (soft[edge] - global_img[edge]) / np.where(np.abs(local_img - global_img)[edge] > 1e-3,
                                                         (local_img - global_img)[edge], np.nan)
    assert 0.35 < np.nanmedian(weight) < 0.75
    assert soft.min() >= 0 and soft.max() <= 1
    np.testing.assert_array_equal(fuse("none", global_img, local_img, mask), global_img.astype(np.float32))
    with pytest.raises(ValueError, match="feather_px"):
        alpha_fuse(global_img, local_img, mask, feather_px=-1)


def test_fuse_dispatch_and_validation():
    global_img, local_img, mask = _scene(64)
    # backend names are the config's (fusion.backend); the default is the config's default, torch
    np.testing.assert_array_equal(fuse("poisson", global_img, local_img, mask, backend="float"),
                                  poisson_fuse(global_img, local_img, mask))
    np.testing.assert_array_equal(fuse("poisson", global_img, local_img, mask),
                                  poisson_fuse_torch(global_img, local_img, mask))
    from gl_lcm.config import Config

    assert fuse.__kwdefaults__["backend"] == Config().fusion.backend
    with pytest.raises(ValueError, match=", ".join(FUSION_MODES)):
        fuse("laplacian", global_img, local_img, mask)
    with pytest.raises(ValueError, match="torch, float, opencv, published"):
        fuse("poisson", global_img, local_img, mask, backend="gpu")
    with pytest.raises(ValueError, match="shape"):
        poisson_fuse(global_img, local_img[:10], mask)
    with pytest.raises(ValueError, match="mask shape"):
        poisson_fuse(global_img, local_img, mask[:, :10])


def _two_lungs_with_hole(size=128, seed=3):
    """Phantom scene whose mask has two components, a hole and a component touching the image border."""
    global_img, local_img, mask = _scene(size, seed)
    mask = mask.copy()
    mask[size // 2, size // 4:size // 4 + 3] = False  # a hole (fixed pixels inside the region)
    mask[size - 12:, size - 10:] = True  # a third component reaching the border ring
    return global_img, local_img, mask


def test_torch_poisson_equals_float_solver():
    global_img, local_img, mask = _two_lungs_with_hole(128)
    exact = poisson_fuse(global_img, local_img, mask, clip=False)
    # float64 and a tight tolerance: the same solution as the sparse direct solve
    tight = poisson_fuse_torch(global_img, local_img, mask, clip=False, dtype=torch.float64, tol=1e-12)
    assert tight.dtype == np.float32 and tight.shape == global_img.shape
    assert len(poisson_fuse_torch.last_iterations) == 3  # one CG solve per 4-connected component
    np.testing.assert_allclose(tight, exact, atol=1e-6)
    # the defaults (float32, tol 3e-5) stay within 1e-4 of it
    default = poisson_fuse_torch(global_img, local_img, mask, clip=False)
    diff = np.abs(default - exact).max()
    print(f"torch float32 defaults vs sparse float64: max |diff| {diff:.2e}")
    assert diff < 1e-4
    # outside the mask: exactly the global image
    assert np.array_equal(default[~mask], global_img.astype(np.float32)[~mask])
    # the dense pixel-by-pixel reference of the small irregular case, too
    rng = np.random.default_rng(0)
    g, l = rng.random((12, 14)), rng.random((12, 14))
    m = np.zeros((12, 14), bool)
    m[2:9, 3:11] = True
    m[5, 11:13] = True
    m[4, 5] = False
    np.testing.assert_allclose(poisson_fuse_torch(g, l, m, clip=False, dtype=torch.float64, tol=1e-12),
                               _dense_reference(g, l, m), atol=1e-6)


def test_torch_dst_matches_scipy_and_device_path_agrees(monkeypatch):
    """The torch.fft DSTs used on GPUs equal scipy's; the solver gives the same result with them."""
    for shape in ((7, 12), (8, 5)):
        x = torch.from_numpy(np.random.default_rng(1).standard_normal(shape))
        for dim in (0, 1):
            np.testing.assert_allclose(fusion_module._dst2_torch(x, dim).numpy(),
                                       scipy.fft.dst(x.numpy(), type=2, norm="ortho", axis=dim), atol=1e-10)
            np.testing.assert_allclose(fusion_module._dst3_torch(x, dim).numpy(),
                                       scipy.fft.dst(x.numpy(), type=3, norm="ortho", axis=dim), atol=1e-10)
    global_img, local_img, mask = _two_lungs_with_hole(96)
    cpu = poisson_fuse_torch(global_img, local_img, mask, dtype=torch.float64, tol=1e-10)
    def torch_box_solve(r, inv_eig):
        spec = fusion_module._dst2_torch(fusion_module._dst2_torch(r, 0), 1) * inv_eig
        return fusion_module._dst3_torch(fusion_module._dst3_torch(spec, 0), 1)

    monkeypatch.setattr(fusion_module, "_box_solve", torch_box_solve)
    device_path = poisson_fuse_torch(global_img, local_img, mask, dtype=torch.float64, tol=1e-10)
    np.testing.assert_allclose(device_path, cpu, atol=1e-7)
    # tensors in -> tensor out on their device
    out = poisson_fuse_torch(torch.from_numpy(global_img), torch.from_numpy(local_img), torch.from_numpy(mask))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), cpu, atol=1e-4)


def test_torch_poisson_agrees_with_opencv_and_dispatch():
    global_img, local_img, mask = _scene(256)
    fast = fuse("poisson", global_img, local_img, mask, backend="torch", clip=False)
    opencv = poisson_fuse_opencv(global_img, local_img, mask)
    interior = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=6) > 0
    diff = np.abs(fast - opencv)[interior] * 255
    assert diff.mean() < 1.0 and diff.max() < 5.0  # the same bounds as the float solver's test above
    # degenerate masks
    full = np.ones_like(mask)
    np.testing.assert_allclose(poisson_fuse_torch(global_img, local_img, full)[0], global_img[0], atol=1e-7)
    empty = np.zeros_like(mask)
    np.testing.assert_array_equal(poisson_fuse_torch(global_img, local_img, empty), global_img.astype(np.float32))
    np.testing.assert_allclose(poisson_fuse_torch(global_img, global_img + 0.2, mask, clip=False), global_img,
                               atol=1e-5)  # float32 rounding of the right-hand side
    with pytest.raises(ValueError, match="shape"):
        poisson_fuse_torch(global_img, local_img[:10], mask)


@pytest.mark.cuda
def test_torch_poisson_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    global_img, local_img, mask = _scene(512)
    cpu = poisson_fuse(global_img, local_img, mask)
    dev = torch.device("cuda")
    out = poisson_fuse_torch(torch.from_numpy(global_img).to(dev), torch.from_numpy(local_img).to(dev),
                             torch.from_numpy(mask).to(dev))
    assert out.device.type == "cuda"
    np.testing.assert_allclose(out.cpu().numpy(), cpu, atol=1e-4)


@pytest.mark.slow
def test_poisson_full_resolution_speed():
    phantom = generate_phantom(1024, 5)
    mask = cv2.dilate(phantom.lung_mask.astype(np.uint8), np.ones((15, 15), np.uint8)) > 0
    start = time.perf_counter()
    fused = poisson_fuse(phantom.soft_tissue, phantom.cxr, mask)
    print(f"poisson_fuse 1024x1024, mask {100 * mask.mean():.0f}%: {time.perf_counter() - start:.2f} s")
    assert fused.shape == (1024, 1024)


def test_fixed_cg_iterations_match_the_float_solver_without_reading_back(monkeypatch):
    """fusion.cg_iterations: N CG iterations with every scalar kept on the device give the float (sparse
    direct) solution, and the solve never reads a value back to the host (no float(tensor) / .item())."""
    import torch

    global_img, local_img, mask = _scene(128)
    exact = poisson_fuse(global_img, local_img, mask)
    for name in ("item", "__float__"):
        def refuse(*_a, name=name, **_k):
            raise AssertionError(f"Tensor.{name} inside the fixed-iteration solve")
        monkeypatch.setattr(torch.Tensor, name, refuse)
    fixed = poisson_fuse_torch(global_img, local_img, mask, fixed_iterations=30)
    few = poisson_fuse_torch(global_img, local_img, mask, fixed_iterations=3)
    monkeypatch.undo()
    assert np.abs(fixed - exact).max() < 1e-4
    assert np.abs(few - exact).max() > 1e-3  # the count matters: three iterations are not enough
    with pytest.raises(AssertionError, match="inside the fixed-iteration solve"):
        monkeypatch.setattr(torch.Tensor, "__float__", lambda *_: (_ for _ in ()).throw(
            AssertionError("Tensor.__float__ inside the fixed-iteration solve")))
        poisson_fuse_torch(global_img, local_img, mask)  # the tolerance loop does read back


def test_cg_iterations_key_reaches_the_solver():
    from gl_lcm.config import load_config
    from gl_lcm.inference import FusionSettings

    global_img, local_img, mask = _scene(128)
    settings = FusionSettings.from_config(load_config(None, ["fusion.cg_iterations=3", "fusion.erode_px=0"]))
    np.testing.assert_array_equal(settings.fuse(global_img, local_img, mask),
                                  poisson_fuse_torch(global_img, local_img, mask, fixed_iterations=3))
    default = FusionSettings.from_config(load_config(None, ["fusion.erode_px=0"]))
    np.testing.assert_array_equal(default.fuse(global_img, local_img, mask),
                                  poisson_fuse_torch(global_img, local_img, mask))
