"""Seeded, reproducible train / val / test splits of image stems.

The split depends only on the set of stems, the fractions, the seed and the group
rule: stems are sorted first, so the order files were listed in never matters.
With ``group_regex`` all stems of one group (e.g. one patient) land in one split.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from gl_lcm.utils.atomic import atomic_write_text

PathLike = Union[str, os.PathLike]

SPLIT_NAMES = ("train", "val", "test")


def _validate_fractions(fractions: Sequence[float]) -> List[float]:
    values = [float(f) for f in fractions]
    if len(values) != 3:
        raise ValueError(f"fractions must have 3 entries (train, val, test), got {len(values)}: {fractions}")
    if any(not math.isfinite(f) or f < 0 for f in values):
        raise ValueError(f"fractions must be finite and non-negative, got {fractions}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {fractions} (sum {sum(values):.6g})")
    return values


def _group_key(stem: str, pattern: Optional["re.Pattern[str]"]) -> Optional[str]:
    if pattern is None:
        return stem
    match = pattern.search(stem)
    if match is None:
        return None
    return match.group(1) if pattern.groups >= 1 else match.group(0)


def make_split(
    stems: Iterable[str],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 42,
    group_regex: Optional[str] = None,
) -> Dict[str, List[str]]:
    """Split stems into dict(train=[...], val=[...], test=[...]), each list sorted.

    Groups (one per stem, or per ``group_regex`` key: capture group 1 when the regex
    has one, else the whole match, found with ``re.search``) are shuffled with
    ``numpy.random.default_rng(seed)`` and laid end to end; a group goes to the split
    whose share of the stem count holds the group's midpoint, so with single-stem
    groups train gets exactly floor(0.5 + f_train * N) stems and val up to
    floor(0.5 + (f_train + f_val) * N). The splits are disjoint and cover every stem.
    Raises ValueError on bad fractions, duplicate stems, or stems the regex misses.
    """
    fraction_values = _validate_fractions(fractions)
    stem_list = list(stems)
    if len(set(stem_list)) != len(stem_list):
        seen, duplicates = set(), set()
        for s in stem_list:
            (duplicates if s in seen else seen).add(s)
        raise ValueError(f"duplicate stems cannot be split: {sorted(duplicates)}")
    stem_list.sort()

    pattern = re.compile(group_regex) if group_regex is not None else None
    groups: Dict[str, List[str]] = {}
    unmatched = []
    for stem in stem_list:
        key = _group_key(stem, pattern)
        if key is None:
            unmatched.append(stem)
        else:
            groups.setdefault(key, []).append(stem)
    if unmatched:
        shown = ", ".join(unmatched[:20]) + (" ..." if len(unmatched) > 20 else "")
        raise ValueError(f"group_regex {group_regex!r} does not match {len(unmatched)} stems: {shown}")

    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    total = len(stem_list)
    train_end = math.floor(0.5 + fraction_values[0] * total)
    val_end = math.floor(0.5 + (fraction_values[0] + fraction_values[1]) * total)

    split: Dict[str, List[str]] = {name: [] for name in SPLIT_NAMES}
    position = 0
    for index in order:
        members = groups[keys[int(index)]]
        midpoint = position + len(members) / 2.0
        if midpoint < train_end:
            name = "train"
        elif midpoint < val_end:
            name = "val"
        else:
            name = "test"
        split[name].extend(members)
        position += len(members)
    return {name: sorted(split[name]) for name in SPLIT_NAMES}


def write_split(out_dir: PathLike, split: Dict[str, Sequence[str]]) -> Dict[str, Path]:
    """Write train.txt / val.txt / test.txt (one stem per line) atomically into out_dir.

    Returns split name -> written path.
    """
    missing = [name for name in SPLIT_NAMES if name not in split]
    if missing:
        raise ValueError(f"split lacks the entries {missing}; expected keys {list(SPLIT_NAMES)}")
    out_dir = Path(out_dir)
    written = {}
    for name in SPLIT_NAMES:
        path = out_dir / f"{name}.txt"
        atomic_write_text(path, "".join(f"{stem}\n" for stem in split[name]))
        written[name] = path
    return written
