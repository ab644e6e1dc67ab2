"""Import the published GL-LCM checkpoints (whole pickled modules) without running code from them.

The published code (github.com/diaoquesang/GL-LCM, ``codes/``) saves its models with
``torch.save(model)``: a pickle of the module objects. Loading such a file the usual way imports
the published packages and lets the file call any function it names. Here a restricted
unpickler resolves only

- an allowlist of the published class names (guided-diffusion's ``UNetModel`` family as vendored
  in ``codes/modules``, MONAI Generative 0.2.2's / MONAI's ``VQVAE`` family, and the
  ``torch.nn`` layers they contain), each to an inert stand-in that only records the state the
  pickle hands it (``_modules``, ``_parameters``, ``_buffers``, plain attributes); and
- torch's tensor-rebuild functions, ``collections.OrderedDict``, ``set``, dtypes.

Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) stops the load
with :class:`RefusedPickle` naming it; nothing from the published packages needs to be installed.

From the recorded modules the architecture is read (attributes, cross-checked against the
weight shapes; never the paper's sizes assumed), the weights are renamed to this project's
layout, and the models are written as ordinary gl-lcm checkpoints (``unet.pt``: kind 'ldm';
``vqgan.pt``: kind 'vqgan', vqgan.arch=monai_vqvae) plus ``.safetensors`` copies with the config
in the metadata. Plain state-dict files in the published key layout import too (the UNet's
attention heads cannot be read from weights alone: ``num_heads`` then comes from the caller).

UNet key mapping (guided-diffusion -> ``gl_lcm.models.unet.UNet``): inside ResBlocks
``in_layers.0`` -> ``in_norm``, ``in_layers.2`` -> ``in_conv``, ``emb_layers.1`` -> ``emb_proj``,
``out_layers.0`` -> ``out_norm``, ``out_layers.3`` -> ``out_conv``, ``skip_connection`` -> ``skip``;
everything else keeps its name. The published UNet has as many output channels as input
channels (8: 4 latent + 4 condition); only the first 4 are trained (the rest stay zero), so the
output convolution is sliced to the latent channels.
"""
from __future__ import annotations

import collections
import json
import pickle
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

# ----------------------------------------------------------------------------- allowlist
_TORCH_LAYERS = ("Conv1d", "Conv2d", "ConvTranspose2d", "Linear", "Identity", "SiLU", "ReLU", "LeakyReLU", "PReLU",
                 "Dropout", "GroupNorm", "Sequential", "ModuleList", "AvgPool2d", "Embedding")
_VQVAE_NETS = ("VQVAE", "Encoder", "Decoder", "VQVAEResidualUnit")
_VQ_LAYERS = ("VectorQuantizer", "EMAQuantizer")
PUBLISHED_CLASSES: dict[str, tuple[str, ...]] = {
    # guided-diffusion UNet as vendored in the published codes/modules
    "modules.unet": ("UNetModel", "TimestepEmbedSequential", "ResBlock", "AttentionBlock", "QKVAttention",
                     "QKVAttentionLegacy", "Downsample", "Upsample"),
    "modules.nn": ("GroupNorm32",),
    # MONAI Generative 0.2.2 (published) and MONAI >= 1.4 (same classes, new home)
    "generative.networks.nets.vqvae": _VQVAE_NETS,
    "generative.networks.layers.vector_quantizer": _VQ_LAYERS,
    "monai.networks.nets.vqvae": _VQVAE_NETS,
    "monai.networks.layers.vector_quantizer": _VQ_LAYERS,
    "monai.networks.blocks.convolutions": ("Convolution",),
    "monai.networks.blocks.acti_norm": ("ADN",),
    **{f"torch.nn.modules.{m}": _TORCH_LAYERS for m in ("conv", "linear", "activation", "dropout", "normalization",
                                                         "container", "pooling", "sparse")},
}
_SAFE_FUNCTIONS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("torch", "Size"): torch.Size,
    **{("torch", n): getattr(torch, n) for n in ("float16", "bfloat16", "float32", "float64", "int64", "int32",
                                                  "uint8", "bool")},
}


class RefusedPickle(pickle.UnpicklingError):
    """The file names a global that is not a published GL-LCM class nor a tensor-rebuild function."""


class PickledObject:
    """Inert stand-in for a class named in a published pickle: it only records its pickled state.

    ``qualified_name`` is the class path the pickle gave (e.g. ``modules.unet.ResBlock``).
    """

    qualified_name = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE-style construction: record, run nothing
        self.__dict__["_init_args"] = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
            state = {**(state or {}), **(slots or {})}
        if state:
            self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<pickled {self.qualified_name}>"


_STANDINS: dict[tuple[str, str], type] = {}


def _standin(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STANDINS:
        _STANDINS[key] = type(name, (PickledObject,), {"qualified_name": f"{module}.{name}"})
    return _STANDINS[key]


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose ``find_class`` resolves only the allowlist above (stand-ins / tensor rebuilds).

    Every object a pickle can call or construct comes from ``find_class`` (GLOBAL, STACK_GLOBAL and
    the extension registry all go through it), so refusing here means nothing else can run.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_FUNCTIONS:
            return _SAFE_FUNCTIONS[(module, name)]
        if name in PUBLISHED_CLASSES.get(module, ()):
            return _standin(module, name)
        raise RefusedPickle(f"{module}.{name}")


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


#: A module object to pass as ``torch.load(pickle_module=...)``.
restricted_pickle = types.ModuleType("gl_lcm_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]
restricted_pickle.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
restricted_pickle.__doc__ = "pickle replacement for torch.load that resolves only the published GL-LCM classes"


def load_published(path: str | Path) -> Any:
    """Read a published checkpoint (torch.save zip or legacy format) into stand-ins / tensors, on the CPU.

    Raises FileNotFoundError, or ValueError naming the file and the refused global (nothing was run).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"published checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except RefusedPickle as exc:
        raise ValueError(
            f"{path}: refused to load: the file asks for '{exc}', which is not one of the published GL-LCM classes "
            f"or a tensor function; nothing from it was run. Only the released GL-LCM/BS-LDM checkpoints (or state "
            f"dicts in their key layout) can be imported.") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


# ----------------------------------------------------------------------------- module tree
@dataclass
class ModuleNode:
    """One pickled module: its dotted path, class path, plain attributes and children."""

    path: str
    cls: str
    attrs: dict
    children: dict = field(default_factory=dict)


def _tree(obj: PickledObject, path: str = "") -> ModuleNode:
    d = obj.__dict__
    attrs = {k: v for k, v in d.items() if not k.startswith("_") and k != "training"}
    node = ModuleNode(path, type(obj).qualified_name, attrs)
    for name, child in (d.get("_modules") or {}).items():
        if isinstance(child, PickledObject):
            node.children[name] = _tree(child, f"{path}.{name}" if path else name)
    return node


def _walk(node: ModuleNode):
    yield node
    for child in node.children.values():
        yield from _walk(child)


def pickled_state_dict(obj: PickledObject) -> dict[str, torch.Tensor]:
    """The state dict ``obj.state_dict()`` would give: parameters and persistent buffers, dotted names."""
    out: dict[str, torch.Tensor] = collections.OrderedDict()

    def visit(o: PickledObject, prefix: str) -> None:
        d = o.__dict__
        for name, p in (d.get("_parameters") or {}).items():
            if p is not None:
                out[prefix + name] = p.detach()
        skip = d.get("_non_persistent_buffers_set") or set()
        for name, b in (d.get("_buffers") or {}).items():
            if b is not None and name not in skip:
                out[prefix + name] = b.detach()
        for name, child in (d.get("_modules") or {}).items():
            if isinstance(child, PickledObject):
                visit(child, f"{prefix}{name}.")

    visit(obj, "")
    return out


def class_counts(obj: PickledObject) -> dict[str, int]:
    """Class path -> number of modules of that class in the pickled tree."""
    return dict(collections.Counter(n.cls for n in _walk(_tree(obj))))


def _as_state_dict(loaded: Any, path: Path) -> tuple[dict[str, torch.Tensor], Optional[PickledObject]]:
    if isinstance(loaded, PickledObject):
        return pickled_state_dict(loaded), loaded
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):  # common wrappers around a state dict
            if key in loaded and isinstance(loaded[key], dict):
                loaded = loaded[key]
        if loaded and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
            return {k.removeprefix("module."): v for k, v in loaded.items()}, None
    raise ValueError(f"{path}: neither a pickled published model nor a state dict (found {type(loaded).__name__})")


# ----------------------------------------------------------------------------- UNet
_RESBLOCK_RENAMES = (("in_layers.0.", "in_norm."), ("in_layers.2.", "in_conv."), ("emb_layers.1.", "emb_proj."),
                     ("out_layers.0.", "out_norm."), ("out_layers.3.", "out_conv."), ("skip_connection.", "skip."))


def published_unet_key(key: str) -> str:
    """guided-diffusion UNetModel state-dict key -> gl_lcm UNet key (see module doc)."""
    for old, new in _RESBLOCK_RENAMES:
        key = key.replace("." + old, "." + new)
    return key


def _block_keys(sd: dict, prefix: str) -> set[str]:
    return {k[len(prefix):] for k in sd if k.startswith(prefix)}


def _count_indexed(sd: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _is_resblock(sd: dict, prefix: str) -> bool:
    return f"{prefix}in_layers.2.weight" in sd


def infer_unet_arch(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture of a guided-diffusion UNetModel from its state dict (published key layout).

    Returns in/out channels, model_channels, channel_mult, num_res_blocks, attention downsample
    factors, use_scale_shift_norm, resblock_updown. Raises ValueError for layouts this project's
    UNet cannot express.
    """
    if "input_blocks.0.0.weight" not in sd or "out.2.weight" not in sd:
        raise ValueError("not a guided-diffusion UNetModel state dict (no input_blocks.0.0 / out.2 weights)")
    if "label_emb.weight" in sd:
        raise ValueError("class-conditional UNetModel (label_emb) is not supported")
    mc = int(sd["input_blocks.0.0.weight"].shape[0])
    in_ch = int(sd["input_blocks.0.0.weight"].shape[1])
    out_ch = int(sd["out.2.weight"].shape[0])
    n_out = _count_indexed(sd, "output_blocks.")
    n_in = _count_indexed(sd, "input_blocks.")

    def has_upsampler(k: int) -> bool:
        subs = _count_indexed(sd, f"output_blocks.{k}.")
        last = f"output_blocks.{k}.{subs - 1}."
        return subs > 1 and (_is_resblock(sd, last) or f"{last}conv.weight" in sd)

    ups = [k for k in range(n_out) if has_upsampler(k)]
    per_level = ups[0] + 1 if ups else n_out
    if per_level < 2 or n_out % per_level:
        raise ValueError(f"cannot read the level structure of the UNet ({n_out} output blocks)")
    levels, nrb = n_out // per_level, per_level - 1
    if n_in != levels * nrb + levels:
        raise ValueError(f"input blocks ({n_in}) do not match {levels} levels of {nrb} ResBlocks")
    mult, attn_ds, updown = [], set(), None
    k = 1
    for level in range(levels):
        width = int(sd[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0])
        if width % mc:
            raise ValueError(f"level {level} width {width} is not a multiple of model_channels {mc}")
        mult.append(width // mc)
        for _ in range(nrb):
            if f"input_blocks.{k}.1.qkv.weight" in sd:
                attn_ds.add(2**level)
            k += 1
        if level != levels - 1:
            is_res = _is_resblock(sd, f"input_blocks.{k}.0.")
            if not is_res and f"input_blocks.{k}.0.op.weight" not in sd:
                raise ValueError("downsampling without a convolution (conv_resample=False) is not supported")
            updown = is_res if updown is None else updown
            k += 1
    emb_out = int(sd["input_blocks.1.0.emb_layers.1.weight"].shape[0])
    return {"in_channels": in_ch, "out_channels": out_ch, "model_channels": mc, "channel_mult": mult,
            "num_res_blocks": nrb, "attention_ds": sorted(attn_ds), "use_scale_shift_norm": emb_out == 2 * mult[0] * mc,
            "resblock_updown": bool(updown) if updown is not None else True}


def _unet_attrs_check(root: ModuleNode, arch: dict, path: Path) -> dict[str, Any]:
    """Cross-check the pickled UNetModel's attributes with the weights; returns heads info and extras."""
    a = root.attrs
    for key in ("in_channels", "out_channels", "model_channels", "num_res_blocks"):
        if key in a and int(a[key]) != arch[key]:
            raise ValueError(f"{path}: UNetModel.{key}={a[key]} disagrees with its weights ({arch[key]})")
    if "channel_mult" in a and [int(m) for m in a["channel_mult"]] != arch["channel_mult"]:
        raise ValueError(f"{path}: UNetModel.channel_mult={a['channel_mult']} disagrees with its weights "
                         f"({arch['channel_mult']})")
    if a.get("num_classes") is not None:
        raise ValueError(f"{path}: class-conditional UNetModel (num_classes={a['num_classes']}) is not supported")
    nodes = list(_walk(root))
    attn = [n for n in nodes if n.cls.endswith(".AttentionBlock")]
    if any(c.cls.endswith("QKVAttentionLegacy") for n in attn for c in n.children.values()):
        raise ValueError(f"{path}: the UNet uses the legacy attention order (use_new_attention_order=False); only "
                         f"the published new order (QKVAttention) is supported")
    heads = {(int(n.attrs["channels"]), int(n.attrs["num_heads"])) for n in attn if "num_heads" in n.attrs}
    num_head_channels = int(a.get("num_head_channels", -1) or -1)
    num_heads = int(a.get("num_heads", 1))
    if int(a.get("num_heads_upsample", -1)) not in (-1, num_heads):
        raise ValueError(f"{path}: num_heads_upsample={a['num_heads_upsample']} differs from num_heads={num_heads}; "
                         f"this project's UNet uses one head count")
    for ch, h in heads:
        expect = ch // num_head_channels if num_head_channels > 0 else num_heads
        if h != expect:
            raise ValueError(f"{path}: an attention block at width {ch} has {h} heads, expected {expect}")
    from gl_lcm.models.layers import num_groups_for

    for n in nodes:
        if n.cls.endswith("GroupNorm32") or n.cls.endswith(".GroupNorm"):
            c, g = int(n.attrs["num_channels"]), int(n.attrs["num_groups"])
            if g != num_groups_for(c) or float(n.attrs.get("eps", 1e-5)) != 1e-5:
                raise ValueError(f"{path}: GroupNorm at {n.path} has {g} groups / eps {n.attrs.get('eps')}; this "
                                 f"project's UNet uses {num_groups_for(c)} groups and eps 1e-5 for {c} channels")
    dropouts = {float(n.attrs["dropout"]) for n in nodes if n.cls.endswith(".ResBlock") and "dropout" in n.attrs}
    ssn = {bool(n.attrs["use_scale_shift_norm"]) for n in nodes if "use_scale_shift_norm" in n.attrs}
    if ssn and ssn != {arch["use_scale_shift_norm"]}:
        raise ValueError(f"{path}: use_scale_shift_norm attributes {ssn} disagree with the weights")
    return {"num_heads": num_heads, "num_head_channels": max(num_head_channels, 0),
            "dropout": max(dropouts) if dropouts else 0.0, "image_size": a.get("image_size")}


def convert_unet(sd: dict[str, torch.Tensor], arch: dict, latent_channels: int) -> tuple[dict, dict]:
    """Rename keys to this project's UNet and keep the first ``latent_channels`` output channels.

    Returns (state dict, report) where report says how many output channels were dropped and
    the largest absolute weight among them (0 for the published models)."""
    out = {published_unet_key(k): v for k, v in sd.items()}  # the loaded tensors are ours: no copies
    w, b = out["out.2.weight"], out["out.2.bias"]
    dropped = w[latent_channels:]
    report = {"dropped_output_channels": int(w.shape[0] - latent_channels),
              "dropped_max_abs": float(max(dropped.abs().max().item() if dropped.numel() else 0.0,
                                           b[latent_channels:].abs().max().item() if dropped.numel() else 0.0))}
    out["out.2.weight"] = w[:latent_channels].contiguous()
    out["out.2.bias"] = b[:latent_channels].contiguous()
    return out, report


# ----------------------------------------------------------------------------- VQ-VAE
def infer_vqvae_arch(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """channels, res_channels, num_res_layers, embed_dim, codebook_size of a MONAI VQVAE state dict."""
    if "quantizer.quantizer.embedding.weight" not in sd:
        raise ValueError("not a MONAI VQVAE state dict (no quantizer.quantizer.embedding.weight)")
    n_blocks = _count_indexed(sd, "encoder.blocks.")
    channels, res_layers, res_ch = [], [], set()
    count = 0
    for k in range(n_blocks - 1):  # the last block maps to the embedding width
        if f"encoder.blocks.{k}.conv.weight" in sd:
            w = sd[f"encoder.blocks.{k}.conv.weight"]
            if tuple(w.shape[-2:]) != (4, 4):
                raise ValueError(f"encoder.blocks.{k} has a {tuple(w.shape[-2:])} kernel; only the published 4 x 4 "
                                 f"stride-2 downsampling is supported")
            if channels:
                res_layers.append(count)
            channels.append(int(w.shape[0]))
            count = 0
        elif f"encoder.blocks.{k}.conv1.conv.weight" in sd:
            res_ch.add(int(sd[f"encoder.blocks.{k}.conv1.conv.weight"].shape[0]))
            count += 1
    res_layers.append(count)
    if len(set(res_layers)) != 1 or len(res_ch) > 1:
        raise ValueError(f"uneven residual layers {res_layers} / widths {sorted(res_ch)} are not supported")
    emb = sd["quantizer.quantizer.embedding.weight"]
    return {"channels": channels, "num_res_layers": res_layers[0], "res_channels": res_ch.pop() if res_ch else 1,
            "embed_dim": int(emb.shape[1]), "codebook_size": int(emb.shape[0]),
            "in_channels": int(sd["encoder.blocks.0.conv.weight"].shape[1])}


def _vqvae_attrs_check(root: ModuleNode, arch: dict, path: Path) -> dict[str, Any]:
    """Cross-check the pickled VQVAE's attributes (structure, activation, quantiser settings)."""
    a = root.attrs
    chans = a.get("num_channels", a.get("channels"))
    if chans is not None and [int(c) for c in chans] != arch["channels"]:
        raise ValueError(f"{path}: VQVAE channels {list(chans)} disagree with its weights ({arch['channels']})")
    rc = a.get("num_res_channels")
    if rc is not None and {int(c) for c in (rc if isinstance(rc, (list, tuple)) else [rc])} != {arch["res_channels"]}:
        raise ValueError(f"{path}: VQVAE num_res_channels {rc} disagree with its weights ({arch['res_channels']})")
    nodes = {n.path: n for n in _walk(root)}
    enc, dec = nodes.get("encoder"), nodes.get("decoder")
    n = len(arch["channels"])
    checks = [(enc, "downsample_parameters", [(2, 4, 1, 1)] * n), (dec, "upsample_parameters", [(2, 4, 1, 1, 0)] * n)]
    for node, key, want in checks:
        if node is not None and key in node.attrs and [tuple(p) for p in node.attrs[key]] != want:
            raise ValueError(f"{path}: {node.path}.{key}={node.attrs[key]}; only the published {want[0]} per level "
                             f"is supported")
    for node in (enc, dec):
        if node is None:
            continue
        act = node.attrs.get("act", "RELU")
        if str(act[0] if isinstance(act, (list, tuple)) else act).upper() != "RELU":
            raise ValueError(f"{path}: {node.path}.act={act}; only the published ReLU is supported")
        if float(node.attrs.get("dropout", 0.0) or 0.0) != 0.0:
            raise ValueError(f"{path}: {node.path}.dropout={node.attrs['dropout']}; only dropout 0 is supported")
    if dec is not None and dec.attrs.get("output_act") is not None:
        raise ValueError(f"{path}: decoder.output_act={dec.attrs['output_act']}; only None (published) is supported")
    q = nodes.get("quantizer.quantizer")
    qa = q.attrs if q is not None else {}
    if float(qa.get("epsilon", 1e-5)) != 1e-5:
        raise ValueError(f"{path}: EMA quantiser epsilon {qa['epsilon']}; only MONAI's 1e-5 is supported")
    return {"beta": float(qa.get("commitment_cost", 0.25)), "ema_decay": float(qa.get("decay", 0.5)),
            "decay_from_file": "decay" in qa}


# ----------------------------------------------------------------------------- import
def _param_count(sd: dict) -> int:
    return int(sum(v.numel() for v in sd.values()))


def import_unet(path: str | Path, num_heads: Optional[int] = None) -> tuple[dict, dict, list[str]]:
    """Read a published UNet (pickle or state dict). Returns (our state dict, config overrides, summary lines).

    ``num_heads``: attention heads for a plain state dict (read from the file for a pickle).
    """
    path = Path(path)
    loaded = load_published(path)
    sd, obj = _as_state_dict(loaded, path)
    arch = infer_unet_arch(sd)
    lines = [f"UNet  {path}"]
    if obj is not None:
        root = _tree(obj)
        if not root.cls.endswith(".UNetModel"):
            raise ValueError(f"{path}: holds a {root.cls}, not a UNetModel (is this the VQGAN file?)")
        extra = _unet_attrs_check(root, arch, path)
        counts = class_counts(obj)
        lines.append("  classes: " + ", ".join(f"{c.rsplit('.', 1)[-1]} x{n}" for c, n in sorted(counts.items())))
    else:
        if num_heads is None:
            raise ValueError(f"{path} is a plain state dict: the attention heads cannot be read from weights; pass "
                             f"--num-heads (the published UNet uses 8)")
        extra = {"num_heads": int(num_heads), "num_head_channels": 0, "dropout": 0.0, "image_size": None}
        lines.append("  plain state dict (no class information)")
    if arch["in_channels"] % 2:
        raise ValueError(f"{path}: {arch['in_channels']} input channels; expected latent + condition (even)")
    latent = arch["in_channels"] // 2
    ours, report = convert_unet(sd, arch, latent)
    levels = len(arch["channel_mult"])
    image_size = extra.get("image_size")
    latent_size = int(image_size) if image_size and all(int(image_size) % d == 0 for d in arch["attention_ds"]) \
        else 2 ** (levels - 1)
    overrides = {"unet": {"model_channels": arch["model_channels"], "channel_mult": arch["channel_mult"],
                          "num_res_blocks": arch["num_res_blocks"], "latent_size": latent_size,
                          "attention_resolutions": [latent_size // d for d in arch["attention_ds"]],
                          "num_heads": extra["num_heads"], "num_head_channels": extra["num_head_channels"],
                          "dropout": extra["dropout"], "use_scale_shift_norm": arch["use_scale_shift_norm"],
                          "resblock_updown": arch["resblock_updown"]},
                 "vqgan": {"embed_dim": latent}}
    lines += [f"  in/out channels {arch['in_channels']}/{arch['out_channels']} (latent {latent}), model_channels "
              f"{arch['model_channels']}, channel_mult {arch['channel_mult']}, {arch['num_res_blocks']} ResBlocks "
              f"per level, attention at downsampling {arch['attention_ds']}, heads {extra['num_heads']}"
              + (f" ({extra['num_head_channels']} channels each)" if extra["num_head_channels"] else "")
              + f", scale-shift norm {arch['use_scale_shift_norm']}, resblock up/down {arch['resblock_updown']}",
              f"  parameters: {_param_count(sd):,} in the file, {_param_count(ours):,} imported "
              f"({report['dropped_output_channels']} output channels dropped, largest weight there "
              f"{report['dropped_max_abs']:.3g})"]
    if report["dropped_max_abs"] != 0.0:
        lines.append("  WARNING: the dropped output channels are not zero; reference.leg_std=published assumes they "
                     "are (as in the released models)")
    return ours, {**overrides, "_report": report}, lines


def import_vqvae(path: str | Path) -> tuple[dict, dict, list[str]]:
    """Read a published MONAI (Generative) VQVAE (pickle or state dict). Returns (state dict, config overrides, lines)."""
    path = Path(path)
    loaded = load_published(path)
    sd, obj = _as_state_dict(loaded, path)
    arch = infer_vqvae_arch(sd)
    lines = [f"VQ-VAE  {path}"]
    if obj is not None:
        root = _tree(obj)
        if not root.cls.endswith(".VQVAE"):
            raise ValueError(f"{path}: holds a {root.cls}, not a VQVAE (is this the UNet file?)")
        extra = _vqvae_attrs_check(root, arch, path)
        counts = class_counts(obj)
        lines.append("  classes: " + ", ".join(f"{c.rsplit('.', 1)[-1]} x{n}" for c, n in sorted(counts.items())))
    else:
        extra = {"beta": 0.25, "ema_decay": 0.5, "decay_from_file": False}
        lines.append("  plain state dict (quantiser settings not in the file: MONAI VQVAE defaults, decay 0.5, "
                     "commitment 0.25)")
    if arch["in_channels"] != 1:
        raise ValueError(f"{path}: the VQ-VAE takes {arch['in_channels']} image channels; gl-lcm works on 1")
    sd = {k: v.contiguous() for k, v in sd.items()}
    overrides = {"vqgan": {"arch": "monai_vqvae", "channels": arch["channels"], "res_channels": arch["res_channels"],
                           "num_res_blocks": arch["num_res_layers"], "embed_dim": arch["embed_dim"],
                           "codebook_size": arch["codebook_size"], "beta": extra["beta"],
                           "ema_decay": extra["ema_decay"], "use_ema": True}}
    lines += [f"  channels {arch['channels']}, residual width {arch['res_channels']}, {arch['num_res_layers']} "
              f"residual layers per level, {arch['codebook_size']} codes of dimension {arch['embed_dim']}, EMA decay "
              f"{extra['ema_decay']}, commitment {extra['beta']}; latent scale 1",
              f"  parameters: {_param_count({k: v for k, v in sd.items() if 'ema_' not in k}):,}"]
    return sd, overrides, lines


def _merge(base: dict, over: dict) -> dict:
    """Merge config sections ``over`` ({section: {key: value}}) into the nested dict ``base``."""
    for section, values in over.items():
        if not section.startswith("_"):
            base.setdefault(section, {}).update(values)
    return base


def import_reference(unet: Optional[str | Path], vqgan: Optional[str | Path], out_dir: str | Path,
                     num_heads: Optional[int] = None, base_config: Optional[str | Path] = None) -> dict[str, Any]:
    """Import published checkpoints into ``out_dir`` (unet.pt / vqgan.pt + .safetensors copies).

    The configs stored in the checkpoints start from ``base_config`` (a YAML, e.g.
    configs/reference_szch.yaml) or the defaults, with the architecture read from the files.
    Returns {"paths": {...}, "summary": [lines]}; verifies each written checkpoint loads with the
    project's own loaders (``weights_only=True``) and builds the same tensors.
    """
    from gl_lcm.config import Config, check_consistency, from_dict, load_config, to_dict
    from gl_lcm.utils.checkpoint import save_checkpoint

    if unet is None and vqgan is None:
        raise ValueError("nothing to import: give --unet and/or --vqgan")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = to_dict(load_config(base_config) if base_config else load_config(None))
    parts = []
    summary: list[str] = []
    if vqgan is not None:
        sd, over, lines = import_vqvae(vqgan)
        _merge(data, over)
        parts.append(("vqgan", sd, {"latent_scale": 1.0, "latent_channels": over["vqgan"]["embed_dim"],
                                    "downsample_factor": 2 ** len(over["vqgan"]["channels"]),
                                    "imported_from": str(vqgan)}))
        summary += lines
    if unet is not None:
        sd, over, lines = import_unet(unet, num_heads=num_heads)
        if vqgan is not None and over["vqgan"]["embed_dim"] != data["vqgan"]["embed_dim"]:
            raise ValueError(f"{unet} works on {over['vqgan']['embed_dim']}-channel latents but {vqgan} makes "
                             f"{data['vqgan']['embed_dim']}-channel ones: these files do not belong together")
        report = over.pop("_report")
        _merge(data, over)
        parts.append(("ldm", sd, {"latent_channels": over["vqgan"]["embed_dim"], "imported_from": str(unet),
                                  "published_out_channels": over["vqgan"]["embed_dim"] +
                                  report["dropped_output_channels"],
                                  "dropped_output_max_abs": report["dropped_max_abs"]}))
        summary += lines
    cfg: Config = from_dict(Config, data, "imported checkpoint")
    check_consistency(cfg, "imported checkpoint")
    cfg_dict = to_dict(cfg)
    paths = {}
    for kind, sd, extra in parts:
        name = "vqgan" if kind == "vqgan" else "unet"
        module_name = "vqgan" if kind == "vqgan" else "unet"
        ckpt = {"kind": kind, "config": cfg_dict, "modules": {module_name: sd}, "step": 0, "extra": extra}
        pt = out / f"{name}.pt"
        save_checkpoint(ckpt, pt)
        st = out / f"{name}.safetensors"
        _save_safetensors(sd, st, {"kind": kind, "config": cfg_dict, "extra": extra})
        _verify(pt, kind, sd)
        paths[name] = str(pt)
        paths[f"{name}_safetensors"] = str(st)
        summary.append(f"  wrote {pt} and {st}")
    return {"paths": paths, "summary": summary, "config": cfg}


def _save_safetensors(sd: dict, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    from gl_lcm.utils.atomic import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in meta.items()})


def _verify(path: Path, kind: str, sd: dict) -> None:
    """Load ``path`` back with the project's loaders (weights_only) and compare every tensor."""
    from gl_lcm.models.factory import load_denoiser, load_vqgan

    model = load_vqgan(path) if kind == "vqgan" else load_denoiser(path)[0]
    got = model.state_dict()
    for k, v in sd.items():
        if not torch.equal(got[k], v):
            raise RuntimeError(f"{path}: tensor {k} changed on the way through the checkpoint")


def read_safetensors_config(path: str | Path) -> dict:
    """The metadata (kind, config, extra) of a .safetensors file written here, JSON-decoded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items()}
