"""Global-local fusion: paste the lung-region (local) result into the whole-image (global) result.

GL-LCM samples a global path (whole CXR condition) and a local path (lung-masked
condition) and merges them by Poisson image editing (Perez et al. 2003): inside the
lung mask the fused image takes the *gradients* (texture) of the local result, while
its values are pinned to the global result on the mask boundary, so no seam appears.

Images here are numpy arrays H x W, float in [0, 1] (the on-disk/metric convention);
masks are H x W bool (or 0/1, 0/255) arrays of the lung fields.

- ``poisson_fuse``: exact floating-point Poisson editing over the mask pixels (sparse
  direct solve, float64 inside, float32 out): keeps the sub-8-bit precision of the
  model outputs.
- ``poisson_fuse_torch``: the same problem as ``poisson_fuse`` (equal to it to about 1e-5),
  solved in torch on any device by conjugate gradients preconditioned with a direct
  sine-transform (DST) Poisson solve over the mask's bounding box. Ours, not published.
- ``poisson_fuse_opencv``: the published code path, ``cv2.seamlessClone`` with
  ``MONOCHROME_TRANSFER`` on 8-bit images.
- ``poisson_fuse_published``: the published call itself (truncated 8-bit inputs, small
  components dropped, centre of the mask's bounding box), for exact reference runs.
- ``alpha_fuse``: feathered alpha blending (a cheaper baseline).
- ``fuse``: the one entry point: mode and backend names as in the config (``fusion.mode``,
  ``fusion.backend``), lung-mask erosion and feathering.

Differences between the OpenCV path and ``poisson_fuse`` (measured in tests/test_fusion.py):
OpenCV (photo/seamless_cloning) works on 8-bit 3-channel images; with MONOCHROME_TRANSFER
the guidance field is the gradient of the grey version of the source (for a grey image
replicated to 3 channels that is the image itself). It erodes the mask by 3 px (three
3x3 erosions) and uses the destination's gradients outside the eroded mask, solves one
Poisson problem over the mask's bounding box (box border fixed to the destination) with a
float32 sine-transform solver, and *truncates* (not rounds) the result to 8 bits. So in the
mask interior the two agree to about one grey level; near the mask edge they differ by the
3 px ring, and OpenCV may change bounding-box pixels just outside the mask slightly, whereas
``poisson_fuse`` leaves every pixel outside the mask exactly equal to the global image.
"""
from __future__ import annotations

from typing import Tuple

import cv2
import numpy as np
import scipy.fft
import scipy.sparse as sparse
import scipy.sparse.linalg as sparse_linalg
from scipy import ndimage

# The choice lists of the ``fusion`` config section (declared here, referred to by gl_lcm.config).
FUSION_MODES: Tuple[str, ...] = ("poisson", "alpha", "none")
POISSON_BACKENDS: Tuple[str, ...] = ("torch", "float", "opencv", "published")

# 4-neighbour offsets of the 5-point Laplacian.
_NEIGHBOUR_OFFSETS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def _check_images(global_img: np.ndarray, local_img: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate shapes and return (global float64, local float64, mask bool)."""
    global_arr = np.asarray(global_img, dtype=np.float64)
    local_arr = np.asarray(local_img, dtype=np.float64)
    mask_arr = np.asarray(mask)
    if global_arr.ndim != 2:
        raise ValueError(f"global_img must be a 2-D H x W array, got shape {global_arr.shape}")
    if local_arr.shape != global_arr.shape:
        raise ValueError(f"local_img shape {local_arr.shape} != global_img shape {global_arr.shape}")
    if mask_arr.shape != global_arr.shape:
        raise ValueError(f"mask shape {mask_arr.shape} != image shape {global_arr.shape}")
    return global_arr, local_arr, mask_arr > 0


def interior_mask(mask: np.ndarray) -> np.ndarray:
    """Return ``mask`` (H x W, any dtype, nonzero = inside) as bool with its 1-pixel image-border ring cleared.

    A Poisson problem needs boundary values around every unknown pixel; clearing the
    outermost ring makes mask pixels that touch the image border take the global value,
    so they serve as that boundary.
    """
    inner = np.asarray(mask) > 0
    inner = inner.copy()
    inner[0, :] = inner[-1, :] = False
    inner[:, 0] = inner[:, -1] = False
    return inner


def discrete_laplacian(image: np.ndarray) -> np.ndarray:
    """5-point Laplacian of an H x W float array; the 1-pixel border ring is set to 0.

    ``lap[y, x] = img[y-1, x] + img[y+1, x] + img[y, x-1] + img[y, x+1] - 4 img[y, x]``.
    """
    img = np.asarray(image, dtype=np.float64)
    lap = np.zeros_like(img)
    lap[1:-1, 1:-1] = img[:-2, 1:-1] + img[2:, 1:-1] + img[1:-1, :-2] + img[1:-1, 2:] - 4.0 * img[1:-1, 1:-1]
    return lap


def _solve_poisson_component(ys: np.ndarray, xs: np.ndarray, index: np.ndarray,
                             global_arr: np.ndarray, local_laplacian: np.ndarray) -> np.ndarray:
    """Solve the Dirichlet Poisson system on one 4-connected component of unknown pixels.

    ``index[y, x]`` holds the component-local unknown number (or -1 for fixed pixels).
    For each unknown p: 4 f_p - sum_{q in N(p), unknown} f_q = -lap_local(p) + sum_{q in N(p), fixed} g_q,
    which is the SPD form of "discrete Laplacian of f equals that of the local image".
    """
    n = ys.size
    unknown_ids = np.arange(n)
    rows = [unknown_ids]
    cols = [unknown_ids]
    vals = [np.full(n, 4.0)]
    rhs = -local_laplacian[ys, xs]
    for dy, dx in _NEIGHBOUR_OFFSETS:
        ny, nx = ys + dy, xs + dx
        neighbour = index[ny, nx]
        is_unknown = neighbour >= 0
        rows.append(unknown_ids[is_unknown])
        cols.append(neighbour[is_unknown])
        vals.append(np.full(int(is_unknown.sum()), -1.0))
        rhs[~is_unknown] += global_arr[ny[~is_unknown], nx[~is_unknown]]
    system = sparse.csc_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    # The matrix is symmetric positive definite: a symmetric ordering without pivoting is
    # the fastest SuperLU configuration (about 1.5 s for 350k unknowns on 2 cores).
    factor = sparse_linalg.splu(system, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                                options={"SymmetricMode": True})
    return factor.solve(rhs)


def poisson_fuse(global_img: np.ndarray, local_img: np.ndarray, mask: np.ndarray, *, clip: bool = True) -> np.ndarray:
    """Floating-point Poisson image editing of ``local_img`` into ``global_img`` over ``mask``.

    Args:
        global_img: H x W float array in [0, 1], the global-path result (destination).
        local_img: H x W float array in [0, 1], the local-path result (source of gradients).
        mask: H x W array, nonzero inside the lung fields. Pixels on the image border
            ring are treated as outside (they provide the boundary condition).
        clip: clip the result to [0, 1] (the unclipped solution can overshoot slightly).

    Returns:
        H x W float32 array: inside the mask its 5-point Laplacian equals that of
        ``local_img`` (guidance field = local gradients) with Dirichlet boundary values from
        ``global_img``; outside the mask it equals ``global_img`` exactly. An empty mask
        returns a copy of ``global_img``.
    """
    global_arr, local_arr, mask_bool = _check_images(global_img, local_img, mask)
    unknown = interior_mask(mask_bool)
    fused = global_arr.copy()
    if unknown.any():
        local_laplacian = discrete_laplacian(local_arr)
        # 4-connected components are independent systems; solving them apart is faster.
        labels, n_components = ndimage.label(unknown)
        index = np.full(unknown.shape, -1, dtype=np.int64)
        for component in range(1, n_components + 1):
            ys, xs = np.nonzero(labels == component)
            index[ys, xs] = np.arange(ys.size)
            fused[ys, xs] = _solve_poisson_component(ys, xs, index, global_arr, local_laplacian)
            index[ys, xs] = -1
    if clip:
        fused = np.clip(fused, 0.0, 1.0)
    return fused.astype(np.float32)


def _smooth_size(n: int) -> int:
    """Smallest m >= n whose prime factors are 2, 3 and 5 (fast FFT lengths)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _dst2_torch(x, dim: int):
    """Orthonormal DST-II along ``dim`` with torch.fft (runs on any device); equals
    ``scipy.fft.dst(x, type=2, norm="ortho", axis=dim)``.

    DST-II(x)_k = DCT-II((-1)^n x_n)_{N-1-k}; the DCT-II comes from a real FFT of the even
    extension [y, reverse(y)] of length 2N: C_k = Re(exp(-i pi k / 2N) FFT_k).
    """
    import torch

    n = x.shape[dim]
    x = x.movedim(dim, -1)
    sign = torch.ones(n, device=x.device, dtype=x.dtype)
    sign[1::2] = -1.0
    y = x * sign
    spec = torch.fft.rfft(torch.cat([y, y.flip(-1)], -1), dim=-1)[..., :n]
    k = torch.arange(n, device=x.device, dtype=x.dtype)
    twiddle = torch.polar(torch.ones_like(k), -torch.pi * k / (2 * n))
    dct = (spec * twiddle).real
    scale = torch.full((n,), (1.0 / (2 * n)) ** 0.5, device=x.device, dtype=x.dtype)
    scale[0] = (1.0 / (4 * n)) ** 0.5
    return (dct * scale).flip(-1).movedim(-1, dim)


def _dst3_torch(x, dim: int):
    """Orthonormal DST-III along ``dim`` (the inverse of :func:`_dst2_torch`) with torch.fft; equals
    ``scipy.fft.dst(x, type=3, norm="ortho", axis=dim)``.

    DST-III(x)_k = (-1)^k DCT-III(reverse(x))_k, and the DCT-III is the real part of an inverse
    FFT of length 2N of the weighted, twisted coefficients.
    """
    import torch

    n = x.shape[dim]
    x = x.movedim(dim, -1).flip(-1)
    weight = torch.full((n,), (2.0 / n) ** 0.5, device=x.device, dtype=x.dtype)
    weight[0] = (1.0 / n) ** 0.5
    k = torch.arange(n, device=x.device, dtype=x.dtype)
    twisted = (x * weight) * torch.polar(torch.ones_like(k), torch.pi * k / (2 * n))
    dct3 = torch.fft.ifft(twisted, n=2 * n, dim=-1).real[..., :n] * (2 * n)
    sign = torch.ones(n, device=x.device, dtype=x.dtype)
    sign[1::2] = -1.0
    return (dct3 * sign).movedim(-1, dim)


def _box_solve(r, inv_eig):
    """``S^T (S r * inv_eig)`` with S the orthonormal 2-D DST-II: the inverse Laplacian of a box whose
    Dirichlet values sit half a pixel outside it. On the CPU scipy's native transforms (pocketfft,
    about 2x faster); elsewhere torch.fft (the same numbers)."""
    import torch

    if r.device.type == "cpu":
        spec = scipy.fft.dstn(r.numpy(), type=2, norm="ortho", workers=-1)
        spec *= inv_eig.numpy()
        return torch.from_numpy(scipy.fft.dstn(spec, type=3, norm="ortho", workers=-1, overwrite_x=True))
    spec = _dst2_torch(_dst2_torch(r, 0), 1) * inv_eig
    return _dst3_torch(_dst3_torch(spec, 0), 1)


def _as_tensor(a, device, dtype):
    import torch

    if isinstance(a, torch.Tensor):
        return a.detach().to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)


def _pcg_box(g, loc, m, y0: int, y1: int, x0: int, x1: int, tol: float, max_iter: int, fixed_iterations: int = 0):
    """CG for one component: returns (u, iterations), u the n1 x n2 correction over rows y0:y1, cols x0:x1
    (zero where ``m``, the component's 0/1 mask in that box, is 0); see :func:`poisson_fuse_torch`.
    ``fixed_iterations`` > 0: exactly that many iterations with no convergence test, every scalar kept
    on the device (no host synchronisation)."""
    import torch

    device, dtype = g.device, g.dtype
    n1, n2 = y1 - y0, x1 - x0

    def lap(a):  # 5-point Laplacian of the interior of a (n1+2) x (n2+2) array
        return a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] - 4.0 * a[1:-1, 1:-1]

    # Every array lives on the box plus a one-pixel zero frame, (n1+2) x (n2+2): the mask never touches
    # the frame, so A is exactly the principal submatrix (on the mask) of the Laplacian of any larger box.
    # The preconditioner's box is that frame grown to FFT-friendly sizes.
    around = (slice(y0 - 1, y1 + 1), slice(x0 - 1, x1 + 1))
    mf = torch.nn.functional.pad(m, (1, 1, 1, 1))
    r = torch.nn.functional.pad((lap(g[around]) - lap(loc[around])) * m, (1, 1, 1, 1))
    big1, big2 = _smooth_size(n1 + 2), _smooth_size(n2 + 2)
    j = torch.arange(1, big1 + 1, device=device, dtype=torch.float64)
    k = torch.arange(1, big2 + 1, device=device, dtype=torch.float64)
    eig = (4.0 - 2.0 * torch.cos(torch.pi * j / big1)[:, None] - 2.0 * torch.cos(torch.pi * k / big2)[None, :])
    inv_eig = (1.0 / eig).to(dtype)
    box = torch.zeros(big1, big2, device=device, dtype=dtype)

    def precondition(res):
        box[:n1 + 2, :n2 + 2] = res
        return _box_solve(box, inv_eig)[:n1 + 2, :n2 + 2].to(device).mul_(mf)

    u = torch.zeros_like(r)
    ap = torch.zeros_like(r)
    z = precondition(r)
    p = z.clone()
    rz = torch.dot(r.flatten(), z.flatten())
    iterations = 0
    if fixed_iterations > 0:
        for _ in range(fixed_iterations):
            ap[1:-1, 1:-1] = lap(p).neg_().mul_(m)
            pap = torch.dot(p.flatten(), ap.flatten())
            # an exact solution (rz = 0) makes every later update 0 instead of 0/0
            alpha = torch.where(pap > 0, rz / torch.where(pap > 0, pap, torch.ones_like(pap)), torch.zeros_like(pap))
            u.add_(p * alpha)
            r.sub_(ap * alpha)
            z = precondition(r)
            rz_new = torch.dot(r.flatten(), z.flatten())
            beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
            p.mul_(beta).add_(z)
            rz = rz_new
        return u[1:-1, 1:-1], fixed_iterations
    for iterations in range(1, max_iter + 1):
        if float(rz) <= 0.0:  # exact (e.g. local == global + constant): nothing left to solve
            break
        ap[1:-1, 1:-1] = lap(p).neg_().mul_(m)
        alpha = float(rz / torch.dot(p.flatten(), ap.flatten()))
        u.add_(p, alpha=alpha)
        r.sub_(ap, alpha=alpha)
        if float(p.abs().max()) * abs(alpha) < tol:
            break
        z = precondition(r)
        rz_new = torch.dot(r.flatten(), z.flatten())
        p.mul_(rz_new / rz).add_(z)
        rz = rz_new
    else:
        raise RuntimeError(f"poisson_fuse_torch: no convergence to tol={tol} in max_iter={max_iter} "
                           "iterations; raise max_iter or tol")
    return u[1:-1, 1:-1], iterations


def poisson_fuse_torch(global_img, local_img, mask, *, clip: bool = True, device=None, dtype=None,
                       tol: float = 3e-5, max_iter: int = 500, fixed_iterations: int = 0):
    """``poisson_fuse`` in torch: same equations, solved on ``device`` (ours, not published).

    Unknowns are the pixels of ``interior_mask(mask)``; writing the result as ``global + u`` with
    u = 0 outside, u solves ``A u = lap(global) - lap(local)`` on the mask, A = minus the 5-point
    Laplacian restricted to the mask (zero Dirichlet values outside it). A is the principal
    submatrix of the Laplacian of the mask's bounding box, whose inverse is a direct DST solve
    (orthonormal DST-II, Dirichlet values half a pixel outside the box, eigenvalues
    4 - 2 cos(pi j / N1) - 2 cos(pi k / N2)); conjugate gradients
    preconditioned by that box solve, restricted to the mask, converges in a few tens of
    iterations because the preconditioned operator is the identity plus a term living on the
    mask's boundary (the mask is not a rectangle, so one box solve alone is not exact).

    Args:
        global_img, local_img: H x W float arrays or tensors in [0, 1].
        mask: H x W array/tensor, nonzero inside the lung fields (image-border ring cleared).
        clip: clip the result to [0, 1].
        device: torch device to solve on (default: the device of ``global_img`` if a tensor, else cpu).
        dtype: torch dtype of the solve (default float32; float64 for exactness checks).
        tol: stop when the largest CG update is below this (grey levels in [0, 1] units); the result
            is then within about ``tol`` of the exact solution.
        max_iter: CG iteration cap (a RuntimeError names it if reached).
        fixed_iterations: > 0 runs exactly that many CG iterations per component without testing
            convergence, so the solve never waits for the device (ours, for GPUs); 0 iterates to ``tol``.

    Returns:
        H x W float32 numpy array for numpy inputs, or a float32 tensor on ``device`` for tensor
        inputs; outside the mask exactly the global image. An empty mask returns the global image.
    """
    import torch

    tensor_in = isinstance(global_img, torch.Tensor)
    if device is None:
        device = global_img.device if tensor_in else torch.device("cpu")
    device = torch.device(device)
    dtype = dtype or torch.float32
    if not tensor_in:
        global_np, local_np, mask_np = _check_images(global_img, local_img, mask)
        global_img, local_img, mask = global_np, local_np, mask_np
    g = _as_tensor(global_img, device, dtype)
    loc = _as_tensor(local_img, device, dtype)
    m_full = _as_tensor(mask, device, torch.float32) > 0
    if g.ndim != 2 or loc.shape != g.shape or m_full.shape != g.shape:
        raise ValueError(f"global/local/mask must be matching H x W, got {tuple(g.shape)}, {tuple(loc.shape)}, "
                         f"{tuple(m_full.shape)}")
    m_full = m_full.clone()
    m_full[0, :] = m_full[-1, :] = False
    m_full[:, 0] = m_full[:, -1] = False
    fused = g.clone()
    # 4-connected components are independent systems; each gets its own (tighter) box, which
    # makes the box solves cheaper and the preconditioner closer to A. Labelling runs on the CPU.
    labels, n_components = ndimage.label(m_full.cpu().numpy())
    iterations = []
    for component, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        (ys, xs) = found
        comp = torch.from_numpy(labels[ys, xs] == component).to(device=device, dtype=dtype)
        u, its = _pcg_box(g, loc, comp, ys.start, ys.stop, xs.start, xs.stop, tol, max_iter, fixed_iterations)
        fused[ys, xs] += u
        iterations.append(its)
    poisson_fuse_torch.last_iterations = iterations  # for benchmarks and tests
    if clip:
        fused = fused.clamp(0.0, 1.0)
    fused = fused.float()
    return fused if tensor_in else fused.cpu().numpy()


def _to_uint8_bgr(image01: np.ndarray) -> np.ndarray:
    """H x W float [0, 1] -> H x W x 3 uint8 (rounded, grey replicated to 3 channels)."""
    grey = np.clip(np.rint(np.asarray(image01, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def seamless_clone_center(mask: np.ndarray) -> Tuple[int, int]:
    """Center point ``(x, y)`` that makes ``cv2.seamlessClone`` place the clone exactly on ``mask``.

    OpenCV takes the bounding box (x0, y0, w, h) of the nonzero mask pixels in the source
    and pastes it at ``(p.x - w // 2, p.y - h // 2)`` in the destination (integer
    division), so ``p = (x0 + w // 2, y0 + h // 2)`` gives zero offset for odd and even
    sizes (checked against OpenCV 5.0 in tests/test_fusion.py).
    """
    mask_u8 = (np.asarray(mask) > 0).astype(np.uint8)
    x0, y0, width, height = cv2.boundingRect(mask_u8)
    return int(x0 + width // 2), int(y0 + height // 2)


def poisson_fuse_opencv(global_img: np.ndarray, local_img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Poisson fusion as in the published code: ``cv2.seamlessClone(local, global, mask, center, MONOCHROME_TRANSFER)``.

    Args:
        global_img: H x W float array in [0, 1] (destination).
        local_img: H x W float array in [0, 1] (source).
        mask: H x W array, nonzero inside the lung fields; the image-border ring is cleared.

    Returns:
        H x W float32 array in [0, 1] with 8-bit precision (k / 255). An empty mask
        returns a copy of ``global_img``.
    """
    global_arr, local_arr, mask_bool = _check_images(global_img, local_img, mask)
    inner = interior_mask(mask_bool)
    if not inner.any():
        return global_arr.astype(np.float32)
    # seamlessClone erodes the mask array in place (OpenCV 5.0): always hand it a fresh copy.
    mask_u8 = np.ascontiguousarray(inner.astype(np.uint8) * 255)
    center = seamless_clone_center(inner)
    blended = cv2.seamlessClone(_to_uint8_bgr(local_arr), _to_uint8_bgr(global_arr), mask_u8, center,
                                cv2.MONOCHROME_TRANSFER)
    return (blended[:, :, 0].astype(np.float32) / 255.0).astype(np.float32)


def to_uint8_published(image01: np.ndarray) -> np.ndarray:
    """The published 8-bit conversion: ``clip(x * 255, 0, 255)`` in float32, then *truncated* to uint8.

    H x W float (any range) -> H x W x 3 uint8 (grey replicated, as ``cv2.cvtColor(GRAY2BGR)``).
    """
    scaled = np.clip(np.asarray(image01, dtype=np.float32) * np.float32(255.0), 0, 255)
    return np.ascontiguousarray(np.repeat(scaled.astype(np.uint8)[:, :, None], 3, axis=2))


def poisson_fuse_published(global_img: np.ndarray, local_img: np.ndarray, mask: np.ndarray,
                           min_area: int = 100) -> np.ndarray:
    """Fusion exactly as the published evaluation (github.com/diaoquesang/GL-LCM, ``batch_lcm_eval.py``).

    The mask's 8-connected components smaller than ``min_area`` pixels are dropped; both images
    go through :func:`to_uint8_published`; ``cv2.seamlessClone(local, global, mask, p,
    MONOCHROME_TRANSFER)`` with ``p`` the centre ``(x + w // 2, y + h // 2)`` of the mask's bounding
    box; no other erosion, no border-ring clearing.

    Args:
        global_img, local_img: H x W float arrays, about [0, 1] (unclipped values are clipped
            by the 8-bit conversion, as published).
        mask: H x W, nonzero inside the lung fields.

    Returns:
        H x W float32 in [0, 1], multiples of 1/255 (channel 0 of the fused BGR image). When no
        component is left, the 8-bit global image.
    """
    dst = to_uint8_published(global_img)
    if np.asarray(mask).shape != dst.shape[:2] or np.asarray(local_img).shape != dst.shape[:2]:
        raise ValueError(f"mask {np.asarray(mask).shape} / local {np.asarray(local_img).shape} / global "
                         f"{dst.shape[:2]} shapes differ")
    mask_u8 = (np.asarray(mask) > 0).astype(np.uint8) * 255
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask_u8)
    small = np.zeros(n, dtype=bool)
    small[1:] = stats[1:, cv2.CC_STAT_AREA] < min_area
    mask_u8[small[labels]] = 0
    if not mask_u8.any():
        return dst[:, :, 0].astype(np.float32) / 255.0
    x, y, w, h = cv2.boundingRect(mask_u8)
    fused = cv2.seamlessClone(to_uint8_published(local_img), dst, mask_u8, (x + w // 2, y + h // 2),
                              cv2.MONOCHROME_TRANSFER)
    return fused[:, :, 0].astype(np.float32) / 255.0


def alpha_fuse(global_img: np.ndarray, local_img: np.ndarray, mask: np.ndarray, feather_px: float = 8.0) -> np.ndarray:
    """Feathered alpha blending: ``alpha * local + (1 - alpha) * global``.

    Args:
        global_img, local_img: H x W float arrays in [0, 1].
        mask: H x W array, nonzero inside the lung fields.
        feather_px: standard deviation (pixels) of the Gaussian that softens the mask;
            the transition is centred on the mask edge (alpha = 0.5 there). 0 gives a hard
            cut-and-paste.

    Returns:
        H x W float32 array in [0, 1].
    """
    global_arr, local_arr, mask_bool = _check_images(global_img, local_img, mask)
    if feather_px < 0:
        raise ValueError(f"feather_px must be >= 0, got {feather_px}")
    alpha = mask_bool.astype(np.float64)
    if feather_px > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigmaX=float(feather_px), sigmaY=float(feather_px),
                                 borderType=cv2.BORDER_REPLICATE)
    fused = alpha * local_arr + (1.0 - alpha) * global_arr
    return np.clip(fused, 0.0, 1.0).astype(np.float32)


def fusion_mask(mask: np.ndarray, erode_px: int) -> np.ndarray:
    """The lung mask shrunk by ``erode_px`` pixels (disk), the region the local result is fused over.

    The local path decodes an image that is black outside the lungs; the VQGAN decoder blurs
    that edge over about one latent cell, so the outermost pixels of the local result are dark.
    Fusing only inside the shrunk mask keeps that rim out (OpenCV's seamlessClone likewise
    erodes its mask). An erosion that empties the mask leaves nothing to fuse (global result).
    """
    m = mask.astype(bool)
    if erode_px <= 0 or not m.any():
        return m
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * erode_px + 1, 2 * erode_px + 1))
    return cv2.erode(m.astype(np.uint8), k) > 0


def fuse(mode: str, global_img: np.ndarray, local_img: np.ndarray, mask: np.ndarray, *, backend: str = "torch",
         erode_px: int = 0, feather_px: float = 8.0, device=None, **solver_options) -> np.ndarray:
    """Fuse the local-path result into the global-path result: the one dispatcher.

    Args:
        mode: one of :data:`FUSION_MODES`: "poisson", "alpha" (feathered blend) or "none" (the
            global image: no local path).
        global_img, local_img: H x W float arrays in [0, 1].
        mask: H x W lung mask (nonzero inside), first shrunk by ``erode_px`` (:func:`fusion_mask`).
        backend: Poisson solver, one of :data:`POISSON_BACKENDS` (the config's names): "torch"
            (DST-preconditioned CG on ``device``; options ``clip``, ``dtype``, ``tol``), "float"
            (sparse direct solve; option ``clip``), "opencv" (``cv2.seamlessClone``), "published"
            (the published call).
        feather_px: Gaussian sigma of the alpha mode, in pixels of this image.

    Returns:
        H x W float32 array in [0, 1].
    """
    if mode not in FUSION_MODES:
        raise ValueError(f"unknown fusion mode {mode!r}; valid: {', '.join(FUSION_MODES)}")
    mask = fusion_mask(mask, erode_px)
    if mode == "poisson":
        if backend == "float":
            return poisson_fuse(global_img, local_img, mask, **solver_options)
        if backend == "torch":
            return poisson_fuse_torch(global_img, local_img, mask, device=device, **solver_options)
        if backend == "opencv":
            if solver_options:
                raise TypeError(f"poisson backend 'opencv' takes no options, got {sorted(solver_options)}")
            return poisson_fuse_opencv(global_img, local_img, mask)
        if backend == "published":
            return poisson_fuse_published(global_img, local_img, mask, **solver_options)
        raise ValueError(f"unknown poisson backend {backend!r}; valid: {', '.join(POISSON_BACKENDS)}")
    if solver_options:
        raise TypeError(f"fusion mode {mode!r} takes no solver options, got {sorted(solver_options)}")
    if mode == "alpha":
        return alpha_fuse(global_img, local_img, mask, feather_px=feather_px)
    global_arr, _, _ = _check_images(global_img, local_img, mask)
    return global_arr.astype(np.float32)
