"""`gl-lcm suppress`: one image, a folder or DICOM files -> soft-tissue images at the input's size."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import cv2
import numpy as np
from tqdm import tqdm

from gl_lcm.config import Config
from gl_lcm.data.io import write_png
from gl_lcm.inference.engine import InferenceEngine
from gl_lcm.jobs.runner import (RunCounts, discover_inputs, gather, merge_error_shards, rank_error_log, ranks,
                                read_chest_input)

OUTPUT_FORMATS = ("auto", "png", "dicom")


def model_description(cfg: Config) -> str:
    """Names the model that made a result, for DICOM SeriesDescription / DerivationDescription."""
    ckpt = Path(getattr(cfg.checkpoints, cfg.eval.model) or "").name or "no checkpoint"
    return (f"GL-LCM {cfg.eval.model} {ckpt}, {cfg.lcm.num_inference_steps} steps, guidance {cfg.guidance.mode}, "
            f"fusion {cfg.fusion.mode}")


def suppress_path(cfg: Config, input_path: str, output: str, bit_depth: Optional[int] = None,
                  engine: Optional[InferenceEngine] = None, output_format: str = "auto",
                  allow_non_chest: bool = False) -> RunCounts:
    """One image, a folder or DICOM files -> soft-tissue image at the input's original size.

    A single input file with an output ending in .png or .dcm writes that file; otherwise ``output`` is a
    folder. ``output_format`` "auto" writes a derived DICOM for a DICOM input (:mod:`gl_lcm.data.dicom_out`)
    and a PNG otherwise; "png" / "dicom" force one (DICOM needs a DICOM input). PNG bit depth: ``bit_depth``,
    or by default the input's (8-bit input -> 8, deeper inputs -> 16). Non-chest inputs are refused.
    Under torchrun rank r handles images r, r + N, ... (sorted by name); rank 0 merges errors.csv
    after every rank has finished. Returns this process's counts (rank 0: the totals).
    """
    from gl_lcm.data.dicom_out import write_derived_dicom
    from gl_lcm.utils.dist import barrier

    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    files = discover_inputs(input_path)
    out = Path(output)
    single = len(files) == 1 and Path(input_path).is_file() and out.suffix.lower() in (".png", ".dcm")
    if single:
        output_format = "dicom" if out.suffix.lower() == ".dcm" else "png"
    description = model_description(cfg)
    with ranks(cfg.device) as info:
        engine = engine or InferenceEngine.from_config(cfg, device=info.device)
        counts = RunCounts()
        log_dir = out.parent if single else out
        mine = sorted(files.items())[info.rank::info.world_size]
        errors = rank_error_log(log_dir, info.rank, info.world_size, [n for n, _ in mine])
        for name, path in tqdm(mine, desc="suppress", unit="img"):
            try:
                film = read_chest_input(name, path, allow_non_chest)
                image = film.image
                as_dicom = output_format == "dicom" or (output_format == "auto" and film.dicom is not None)
                if as_dicom and film.dicom is None:
                    raise ValueError(f"{path}: DICOM output needs a DICOM input (this is not one); write PNG instead")
                r = engine.run([name], [image], [engine.segment(name, image)])[0]
                h, w = image.shape
                result = cv2.resize(r.fused, (w, h), interpolation=cv2.INTER_CUBIC) if (h, w) != r.fused.shape else r.fused
                result = np.clip(result, 0, 1)
                if as_dicom:
                    write_derived_dicom(out if single else out / f"{name}.dcm", result, film.dicom, description)
                else:
                    depth = bit_depth or (8 if film.bit_depth <= 8 else 16)
                    write_png(out if single else out / f"{name}.png", result, depth)
                errors.clear(name)
                counts.succeeded += 1
            except (ValueError, FileNotFoundError) as exc:
                errors.add(name, "suppress", exc)
                counts.failed += 1
        all_counts = gather(counts, info.world_size)
        barrier()
        if not info.is_main:
            return counts
        if info.distributed:
            merge_error_shards(log_dir, info.world_size, list(files))
            counts = RunCounts(sum(c.succeeded for c in all_counts), sum(c.failed for c in all_counts), 0)
    print(f"suppress: {counts.succeeded} succeeded, {counts.failed} failed -> {out}")
    return counts
