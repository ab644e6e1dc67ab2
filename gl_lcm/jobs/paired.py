"""Paired comparisons of methods on the same images: per-image differences against a reference method with
95 % bootstrap intervals, and their markdown table (the demo and the real-pairs report)."""
from __future__ import annotations


# (metric key, column title, display scale, decimals); LPIPS is the one where lower is better
PAIRED_METRICS = (("psnr", "PSNR (dB)", 1.0, 2), ("bsr", "BSR (points)", 100.0, 2), ("ms_ssim", "MS-SSIM", 1.0, 4),
                  ("lpips", "LPIPS", 1.0, 4), ("bone_psnr", "bone PSNR (dB)", 1.0, 2),
                  ("bone_ssim", "bone SSIM", 1.0, 4))
LOWER_IS_BETTER = ("lpips",)


def paired_differences(per_image: dict, reference: str, names) -> dict:
    """name -> metric -> (mean, lower, upper) of the per-image paired difference row - ``reference``
    (95 % percentile bootstrap, :func:`gl_lcm.metrics.paired_bootstrap_ci`), scaled for display."""
    from gl_lcm.metrics import paired_bootstrap_ci

    out = {}
    for name in names:
        if name == reference:
            continue
        rows, ref = per_image[name], per_image[reference]
        out[name] = {key: tuple(scale * v for v in paired_bootstrap_ci([r[key] for r in rows], [r[key] for r in ref]))
                     for key, _, scale, _ in PAIRED_METRICS if key in rows[0] and key in ref[0]}
    return out


def paired_table(paired: dict, reference: str) -> list[str]:
    """Markdown lines: mean paired difference [95 % interval] per metric; better/worse only where the
    interval excludes 0 (LPIPS: lower is better)."""
    keys = [(k, label, places) for k, label, _, places in PAIRED_METRICS
            if any(k in m for m in paired.values())]
    first = f"Method - {reference}" if reference else "Difference"  # empty: the row names say what minus what
    lines = [f"| {first} | " + " | ".join(label for _, label, _ in keys) + " |",
             "|:--|" + "--:|" * len(keys)]
    for name, metrics in paired.items():
        cells = []
        for key, _, places in keys:
            mean, lo, hi = metrics[key]
            good = (lo > 0) if key not in LOWER_IS_BETTER else (hi < 0)
            bad = (hi < 0) if key not in LOWER_IS_BETTER else (lo > 0)
            verdict = " better" if good else (" worse" if bad else "")
            cells.append(f"{mean:+.{places}f} [{lo:+.{places}f}, {hi:+.{places}f}]{verdict}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
