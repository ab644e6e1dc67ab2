"""`gl-lcm segment`: lung masks and overlays for one image or a folder."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from gl_lcm.config import Config
from gl_lcm.inference.segmenter import Segmenter
from gl_lcm.jobs.runner import ErrorLog, discover_inputs, read_chest_input
from gl_lcm.utils.atomic import ensure_writable, remove_stale_temporaries


def segment_path(cfg: Config, input_path: str, out_dir: str, allow_non_chest: bool = False) -> dict[str, int]:
    """masks/ and overlays/ under ``out_dir`` for one image or a folder; errors.csv for failures.

    Non-chest inputs are refused (errors.csv names the reason); ``allow_non_chest`` skips the
    DICOM metadata part of that check."""
    out = Path(out_dir)
    ensure_writable(out, "--out")
    remove_stale_temporaries(out)
    seg = Segmenter.from_config(cfg)
    errors = ErrorLog(out / "errors.csv")
    ok = 0
    files = discover_inputs(input_path)
    for name, path in tqdm(sorted(files.items()), desc="segment", unit="img"):
        try:
            seg(name, read_chest_input(name, path, allow_non_chest).image, cache_dir=out)
            errors.clear(name)
            ok += 1
        except (ValueError, FileNotFoundError) as exc:
            errors.add(name, "segmentation", exc)
    print(f"segment: {ok} succeeded, {len(files) - ok} failed -> {out}")
    return {"succeeded": ok, "failed": len(files) - ok}
