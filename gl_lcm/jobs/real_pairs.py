"""`gl-lcm real-pairs`: the whole chain trained and evaluated on real BSE-JSRT pairs (a job on the engine).

From a folder written by `gl-lcm prepare-bse-jsrt`, with the ``configs/bse_*.yaml`` recipes:

    VQGAN -> teacher -> for each seed: consistency student -> one-step student;  plain supervised baseline
    per seed -> evaluation on the held-out films and on the out-of-domain pairs of ../shared/data
    -> <out>/report.md (tables with paired bootstrap intervals, per-image CSVs, figure)

Besides the models' rows, the report has rows with a bone gain (ours, a calibration, not a model): the
least-squares gain of a row's bone image (CXR - prediction), fitted on the validation films and applied to
every set (:func:`add_bone_gain_rows`).

Each stage resumes (a finished stage is skipped, a killed training resumes from its checkpoint). The student
stages and the baseline train at every seed of ``seeds`` (same VQGAN and teacher), so the report can show
whether a difference survives a change of seed.
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from gl_lcm.config import Config
from gl_lcm.jobs.demo import _config, _stage
from gl_lcm.jobs.paired import paired_differences, paired_table
from gl_lcm.utils.atomic import atomic_write_text

PUBLISHED = "GL-LCM published: teacher, LCM-50, LEG"
IDENTITY = "Identity (prediction = CXR)"
CEILING = "Ceiling: VQGAN round trip of the soft-tissue truth"
BSE_NOTE = ("BSE-JSRT targets are software bone-shadow elimination: only ribs and clavicles are removed, and only "
            "inside the lungs. Dual-energy soft-tissue images (Gusarev DES, SZCH) also remove the spine, the "
            "scapulae and bone outside the lungs, and differ in contrast and noise, so a model trained on BSE-JSRT "
            "is not expected to reach them: these tables measure transfer, not the method.")


def onestep_name(seed: int, steps: int, subtract: bool = False) -> str:
    return f"GL-LCM ours: one-step student (seed {seed}), {steps} step{'s' if steps > 1 else ''}" + (
        ", CXR - bone" if subtract else "")


def baseline_name(seed: int, how: str) -> str:
    return f"Plain supervised baseline (seed {seed}), {how}"


def real_pairs_configs(data: Path, runs: Path, seeds: Sequence[int], out: Path,
                       overrides: Sequence[str] = ()) -> dict[str, Config]:
    """Configs of every stage, with paths inside ``runs`` (trainings) and ``out`` (evaluation)."""
    common = [f"data.root={data}", *overrides]
    vq, teacher = runs / "vqgan" / "model.pt", runs / "teacher" / "model.pt"
    cfgs = {"vqgan": _config("bse_vqgan.yaml", common + [f"train.output_dir={runs / 'vqgan'}"]),
            "teacher": _config("bse_ldm.yaml", common + [f"train.output_dir={runs / 'teacher'}",
                                                         f"checkpoints.vqgan={vq}"])}
    for s in seeds:
        student = runs / f"student_seed{s}" / "model.pt"
        cfgs[f"student_seed{s}"] = _config("bse_distill.yaml", common + [
            f"seed={s}", f"train.output_dir={student.parent}", f"checkpoints.vqgan={vq}",
            f"checkpoints.teacher={teacher}"])
        cfgs[f"onestep_seed{s}"] = _config("bse_onestep.yaml", common + [
            f"seed={s}", f"train.output_dir={runs / f'onestep_seed{s}'}", f"checkpoints.vqgan={vq}",
            f"checkpoints.teacher={teacher}", f"checkpoints.student={student}"])
        cfgs[f"baseline_seed{s}"] = _config("bse_baseline.yaml", common + [
            f"seed={s}", f"train.output_dir={runs / f'baseline_seed{s}'}", f"checkpoints.vqgan={vq}",
            f"checkpoints.teacher={teacher}"])
    cfgs["eval"] = _config("bse_eval.yaml", common + [f"checkpoints.vqgan={vq}", f"checkpoints.teacher={teacher}",
                                                      f"eval.output_dir={out}"])
    return cfgs


def run_real_pairs(data: str, runs: str = "runs/bse", out: str = "results/bse_jsrt", seeds: Sequence[int] = (0, 1),
                   shared: Optional[str] = "../shared/data", overwrite: bool = False, progress: bool = True,
                   overrides: Sequence[str] = ()) -> dict:
    """Train every stage that is not done yet, then evaluate; returns the report's numbers."""
    from gl_lcm.train.distill import train_distill
    from gl_lcm.train.ldm import train_ldm
    from gl_lcm.train.onestep import train_onestep
    from gl_lcm.train.supervised import train_baseline
    from gl_lcm.train.vqgan import train_vqgan
    from gl_lcm.utils.dist import resolve_device
    from gl_lcm.utils.machine import machine_line, matmul_gflops

    data_p, runs_p, out_p = Path(data), Path(runs), Path(out)
    if not (data_p / "test.txt").is_file():
        raise FileNotFoundError(f"{data_p / 'test.txt'} not found: prepare the pairs first with "
                                f"`gl-lcm prepare-bse-jsrt --repo CLONE --out {data_p} --size 128`")
    out_p.mkdir(parents=True, exist_ok=True)
    cfgs = real_pairs_configs(data_p, runs_p, seeds, out_p, overrides)
    machine = f"{machine_line(resolve_device(cfgs['eval'].device))}; float32 matmul {matmul_gflops():.0f} GFLOP/s"
    print(f"[real-pairs] {machine}")
    timing_path = runs_p / "stage_times.json"
    times: dict = json.loads(timing_path.read_text()) if timing_path.is_file() and not overwrite else {}
    resume = "none" if overwrite else "auto"

    def stage(name: str, train: Callable, cfg: Config) -> None:
        _stage(name, Path(cfg.train.output_dir) / "model.pt", overwrite,
               lambda: train(cfg, resume=resume, progress=progress), times, tag="real-pairs")
        atomic_write_text(timing_path, json.dumps(times, indent=2))

    stage("vqgan", train_vqgan, cfgs["vqgan"])
    stage("teacher", train_ldm, cfgs["teacher"])
    for s in seeds:
        stage(f"student_seed{s}", train_distill, cfgs[f"student_seed{s}"])
        stage(f"onestep_seed{s}", train_onestep, cfgs[f"onestep_seed{s}"])
    for s in seeds:
        stage(f"baseline_seed{s}", train_baseline, cfgs[f"baseline_seed{s}"])
    t0 = time.time()
    results = evaluate_real_pairs(cfgs["eval"], runs_p, out_p, seeds, shared=Path(shared) if shared else None,
                                  progress=progress)
    results["evaluation_s"] = time.time() - t0
    write_report(out_p, results, times, cfgs, machine)
    print(f"[real-pairs] report: {out_p / 'report.md'}")
    return results


# ---------------------------------------------------------------------------- evaluation sets
@dataclass
class PairSet:
    """Films of one evaluation set: names, CXRs, truths and lung masks (H x W, [0, 1] / bool, any size)."""

    name: str
    names: list
    cxrs: list
    truths: list
    masks: list
    mask_note: str


def _read(path: Path) -> np.ndarray:
    from gl_lcm.data.io import read_image

    return read_image(path)[0]


def held_out_set(cfg: Config, split: str = "test", title: str = "held-out BSE-JSRT") -> PairSet:
    """A prepared split (the held-out test films by default) with the masks prepare-bse-jsrt wrote."""
    from gl_lcm.data.datasets import pairs_for_split

    pairs = pairs_for_split(cfg, split, require_masks=True)
    note = (Path(cfg.data.root) / "masks.txt").read_text().splitlines()[0] if (
        Path(cfg.data.root) / "masks.txt").is_file() else "lung masks: as prepared"
    return PairSet(title, [p.stem for p in pairs], [_read(p.cxr) for p in pairs],
                   [_read(p.bs) for p in pairs], [_read(p.mask) > 0.5 for p in pairs], note)


def folder_set(name: str, root: Path, segment, prior: np.ndarray) -> Optional[PairSet]:
    """Pairs ``root/CXR/*.png`` with ``root/BS/*.png``; lung masks by ``segment`` (the population prior
    where it finds no lung). None when the folder is absent."""
    import cv2

    if not (root / "CXR").is_dir():
        return None
    names = sorted(p.stem for p in (root / "CXR").glob("*.png") if (root / "BS" / p.name).is_file())
    cxrs = [_read(root / "CXR" / f"{n}.png") for n in names]
    truths = [_read(root / "BS" / f"{n}.png") for n in names]
    masks, fallback = [], []
    for n, c in zip(names, cxrs):
        try:
            masks.append(segment(n, c))
        except ValueError:
            fallback.append(n)
            masks.append(cv2.resize(prior.astype(np.uint8), c.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0)
    note = f"lung masks: {getattr(segment, 'method', 'segmenter')}" + (
        f"; population prior for {', '.join(fallback)}" if fallback else "")
    return PairSet(name, names, cxrs, truths, masks, note)


def training_prior(cfg: Config) -> np.ndarray:
    """The population prior (:func:`gl_lcm.data.bse_jsrt.population_prior`) of the training masks: S x S bool."""
    from gl_lcm.data.bse_jsrt import population_prior
    from gl_lcm.data.datasets import pairs_for_split

    return population_prior([_read(p.mask) > 0.5 for p in pairs_for_split(cfg, "train", require_masks=True)])


# ---------------------------------------------------------------------------- methods
def method_runs(cfg: Config, runs: Path, seeds: Sequence[int], device) -> dict[str, Callable]:
    """Row name -> fn(names, cxrs, masks) -> predictions (S x S in [0, 1]), every model through the engine."""
    from gl_lcm.inference.engine import InferenceEngine
    from gl_lcm.inference.postprocess import resize_square

    size = cfg.data.image_size
    subtract_cfg = _with(cfg, eval_output="cxr_minus_bone")
    engines: dict = {}

    def engine(key: str, checkpoint: Path, subtract: bool = False) -> InferenceEngine:
        if (key, subtract) not in engines:
            engines[(key, subtract)] = InferenceEngine.from_config(subtract_cfg if subtract else cfg,
                                                                   checkpoint=str(checkpoint), device=device,
                                                                   segmenter=False)
        return engines[(key, subtract)]

    def dual(key, ckpt, steps, guidance, subtract=False):
        return lambda names, cxrs, masks: [r.fused for r in engine(key, ckpt, subtract).run(
            names, cxrs, masks, num_steps=steps, guidance_mode=guidance)]

    def plain(key, ckpt):
        return lambda names, cxrs, masks: engine(key, ckpt).run_global(
            names, [resize_square(c, size) for c in cxrs], 1, sampler="lcm")

    teacher = Path(cfg.checkpoints.teacher)
    rows: dict[str, Callable] = {
        IDENTITY: lambda names, cxrs, masks: [resize_square(c, size) for c in cxrs],
        PUBLISHED: dual("teacher", teacher, 50, "leg"),
        "Published setting, CXR - bone (ours)": dual("teacher", teacher, 50, "leg", subtract=True),
    }
    for s in seeds:
        student, onestep = runs / f"student_seed{s}" / "model.pt", runs / f"onestep_seed{s}" / "model.pt"
        baseline = runs / f"baseline_seed{s}" / "model.pt"
        rows[f"Consistency student (seed {s}), 4 steps"] = dual(f"student{s}", student, 4, "vanilla")
        for steps in (1, 2, 4):
            rows[onestep_name(s, steps)] = dual(f"onestep{s}", onestep, steps, "vanilla")
        rows[onestep_name(s, 1, subtract=True)] = dual(f"onestep{s}", onestep, 1, "vanilla", subtract=True)
        rows[baseline_name(s, "one pass, global")] = plain(f"baseline{s}", baseline)
        rows[baseline_name(s, "dual path + fusion")] = dual(f"baseline{s}", baseline, 1, "vanilla")
        rows[baseline_name(s, "dual path + fusion, CXR - bone")] = dual(f"baseline{s}", baseline, 1, "vanilla",
                                                                         subtract=True)
    return rows


def gained_name(base: str) -> str:
    return f"{base}, bone gain (fitted on validation)"


def add_bone_gain_rows(rows: dict, validation: PairSet, bases: Sequence[str], size: int, batch: int) -> dict:
    """For each row of ``bases``: fit the least-squares gain of its bone image on the validation films
    (:func:`gl_lcm.metrics.fit_bone_gain`) and add the row that applies it (ours, a calibration, not a model).
    Returns base row -> gain."""
    from gl_lcm.metrics import fit_bone_gain

    cxrs, truths, masks = _at_size(validation, size)
    gains = {}
    for base in bases:
        preds = _predict(rows[base], validation.names, validation.cxrs, validation.masks, batch)
        gains[base] = fit_bone_gain(cxrs, preds, truths, masks)
        rows[gained_name(base)] = _with_bone_gain(rows[base], gains[base], size)
    return gains


def _with_bone_gain(row: Callable, gain: float, size: int) -> Callable:
    """The row whose outputs have ``gain`` x its bone image (:func:`gl_lcm.metrics.apply_bone_gain`)."""
    from gl_lcm.inference.postprocess import resize_square
    from gl_lcm.metrics import apply_bone_gain

    def gained(names, films, masks):
        preds = _clip01(row(names, films, masks))
        return [apply_bone_gain(resize_square(c, size), q, gain) for c, q in zip(films, preds)]

    return gained


def _clip01(preds) -> list:
    return [np.clip(np.asarray(p, np.float64), 0, 1) for p in preds]


def _predict(row: Callable, names: list, films: list, masks: list, batch: int) -> list:
    """A row's outputs (S x S float64 in [0, 1]) for ``films``, ``batch`` at a time."""
    out = []
    for i in range(0, len(films), batch):
        sl = slice(i, i + batch)
        out += list(row(names[sl], films[sl], masks[sl]))
    return _clip01(out)


def _at_size(pair_set: PairSet, size: int) -> tuple[list, list, list]:
    """A set's CXRs and truths resized to size x size, and its lung masks (nearest neighbour): metrics' inputs."""
    import cv2

    from gl_lcm.inference.postprocess import resize_square

    return ([resize_square(c, size) for c in pair_set.cxrs], [resize_square(t, size) for t in pair_set.truths],
            [cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0 for m in pair_set.masks])


def _with(cfg: Config, eval_output: str) -> Config:
    import copy

    other = copy.deepcopy(cfg)
    other.eval.output = eval_output
    return other


def evaluate_set(pair_set: PairSet, rows: dict, ceiling: Callable, size: int, batch: int, lpips_metric,
                 progress: bool = True) -> tuple[dict, dict]:
    """Every row on one set: (row -> per-image metric dicts, row -> predictions). Metrics at ``size``:
    the paper's and SSIM / MS-SSIM, plus the bone image inside the lung mask."""
    from tqdm import tqdm

    from gl_lcm.metrics import bone_metrics, compute_metrics

    cxrs, truths, masks = _at_size(pair_set, size)
    all_rows = {IDENTITY: rows[IDENTITY], CEILING: ceiling, **{k: v for k, v in rows.items() if k != IDENTITY}}
    per_image, preds = {}, {}
    for name, fn in tqdm(all_rows.items(), desc=f"evaluate {pair_set.name}", disable=not progress):
        preds[name] = _predict(fn, pair_set.names, truths if fn is ceiling else pair_set.cxrs, pair_set.masks, batch)
        per_image[name] = [{**compute_metrics(c, t, p, image_size=None, lpips_metric=lpips_metric),
                            **bone_metrics(c, t, p, m)}
                           for c, t, p, m in zip(cxrs, truths, preds[name], masks)]
    return per_image, preds


def evaluate_real_pairs(cfg: Config, runs: Path, out: Path, seeds: Sequence[int], shared: Optional[Path] = None,
                        progress: bool = True) -> dict:
    """The held-out films and (when ``shared`` holds them) the out-of-domain pairs through every row."""
    from gl_lcm.inference.engine import InferenceEngine
    from gl_lcm.inference.segmenter import Segmenter
    from gl_lcm.jobs.evaluate import build_lpips
    from gl_lcm.metrics import summarize
    from gl_lcm.utils.dist import resolve_device

    device = resolve_device(cfg.device)
    size, batch = cfg.data.image_size, cfg.eval.batch_size
    lpips_metric = build_lpips(cfg)
    rows = method_runs(cfg, runs, seeds, device)
    validation = held_out_set(cfg, "val", "validation")
    gains = add_bone_gain_rows(rows, validation, [b for s in seeds for b in (
        onestep_name(s, 1), onestep_name(s, 1, subtract=True), baseline_name(s, "one pass, global"))], size, batch)
    codec = InferenceEngine.from_config(cfg, model="teacher", device=device, segmenter=False)
    ceiling = lambda names, truths, masks: codec.round_trip(truths)  # noqa: E731
    sets = [held_out_set(cfg)]
    if shared is not None:
        segment = Segmenter.from_config(cfg, device)
        prior = training_prior(cfg)
        for name, root in (("Gusarev dual-energy (real-cxr)", shared / "real-cxr" / "pairs" / "gusarev-des"),
                           ("SZCH dual-energy (szch-sample)", shared / "szch-sample")):
            found = folder_set(name, root, segment, prior)
            if found is None:
                print(f"[real-pairs] {root} not found: the {name} table is left out")
            else:
                sets.append(found)
    results = {"sets": {}, "image_size": size, "seeds": list(seeds), "bone_gains": gains,
               "validation_films": len(validation.names),
               "lpips": lpips_metric.protocol if lpips_metric else None}
    for k, pair_set in enumerate(sets):
        per_image, preds = evaluate_set(pair_set, rows, ceiling, size, batch, lpips_metric, progress)
        names = [n for n in per_image if n not in (IDENTITY, CEILING)]
        results["sets"][pair_set.name] = {
            "n": len(pair_set.names), "mask_note": pair_set.mask_note,
            "summaries": {n: summarize(r) for n, r in per_image.items()},
            "paired": paired_differences(per_image, PUBLISHED, [IDENTITY, CEILING, *names]),
            "paired_identity": paired_differences(per_image, IDENTITY, [n for n in names if "one-step" in n
                                                                        or "baseline" in n]),
            "paired_baseline": against_baseline(per_image, seeds),
        }
        write_per_image_csv(out / f"per_image_{k}.csv", pair_set, per_image)
        if k == 0:
            figure(out / "figure.png", pair_set, preds, size, seeds[0])
    return results


def against_baseline(per_image: dict, seeds: Sequence[int]) -> dict:
    """The one-step student (1 step) minus the plain baseline of the same seed, per output: the soft-tissue
    outputs (student: dual path; baseline: one global pass) and the 'CXR - bone' outputs (both dual path)."""
    out = {}
    for s in seeds:
        for ours, theirs in ((onestep_name(s, 1), baseline_name(s, "one pass, global")),
                             (onestep_name(s, 1, subtract=True), baseline_name(s, "dual path + fusion, CXR - bone")),
                             (gained_name(onestep_name(s, 1)), gained_name(baseline_name(s, "one pass, global")))):
            diff = paired_differences({ours: per_image[ours], theirs: per_image[theirs]}, theirs, [ours])[ours]
            out[f"{ours} - {theirs}"] = diff
    return out


def write_per_image_csv(path: Path, pair_set: PairSet, per_image: dict) -> None:
    """One line per (row, film): every metric, full precision."""
    keys = list(next(iter(per_image.values()))[0])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["set", "method", "film", *keys])
    for method, metrics in per_image.items():
        for film, m in zip(pair_set.names, metrics):
            w.writerow([pair_set.name, method, film, *(repr(float(m[k])) for k in keys)])
    atomic_write_text(path, buf.getvalue())


def figure(path: Path, pair_set: PairSet, preds: dict, size: int, seed: int, k: int = 4) -> None:
    """CXR | published | one-step (1 step) | baseline | truth | |difference| maps x4 for the first k films."""
    from gl_lcm.inference.postprocess import resize_square
    from gl_lcm.utils.plotting import save_grid

    cols = [PUBLISHED, onestep_name(seed, 1), baseline_name(seed, "one pass, global")]
    rows = []
    for i in range(min(k, len(pair_set.names))):
        truth = resize_square(pair_set.truths[i], size)
        row = [resize_square(pair_set.cxrs[i], size), *(preds[c][i] for c in cols), truth]
        row += [np.clip(4 * np.abs(preds[c][i] - truth), 0, 1) for c in cols]
        rows.append(row)
    save_grid(path, rows, labels=["CXR", "published", "one-step", "baseline", "truth",
                                  "|pub-truth|x4", "|one-step-truth|x4", "|baseline-truth|x4"])


# ---------------------------------------------------------------------------- report
def write_report(out: Path, res: dict, times: dict, cfgs: dict, machine: str) -> None:
    from gl_lcm.metrics import markdown_table

    size = res["image_size"]
    lines = ["# GL-LCM on real pairs (BSE-JSRT)", "",
             f"Everything trained at {size} x {size} px on the prepared BSE-JSRT training films "
             f"(`gl-lcm real-pairs`); student stages and the plain baseline at seeds {res['seeds']}. Metrics at "
             f"{size} px; LPIPS: " + (f"AlexNet, {res['lpips']} protocol." if res["lpips"] else "not computed "
                                      "(no weights; `gl-lcm weights lpips`)."), "",
             "Rows: 'CXR - bone' (ours) subtracts the bone image D(E(CXR)) - prediction from the CXR itself instead "
             "of writing the decoded prediction, so what the VQGAN loses of the film stays. The plain baseline "
             "is the teacher's UNet trained from scratch to regress the soft-tissue latent in one pass "
             "(`gl-lcm train-baseline`). Bone metrics: predicted bone (CXR - prediction) against true bone "
             "(CXR - truth) inside the lung mask, PSNR and SSIM against the true bone's range.", "",
             f"Rows with a bone gain (ours, a calibration): the least-squares gain k of the row's bone image, "
             f"fitted on the {res['validation_films']} validation films (never the held-out ones), applied as "
             "CXR - k (CXR - prediction); the same k on every set:", "", "| row | k |", "|:--|--:|",
             *[f"| {name} | {k:.3f} |" for name, k in res["bone_gains"].items()], "",
             "## Training time per stage (s)", "", "| stage | seconds |", "|:--|--:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in times.items()]
    lines += ["", f"{machine}", ""]
    for k, (set_name, r) in enumerate(res["sets"].items()):
        lines += [f"## {set_name}: {r['n']} films", "", r["mask_note"], ""]
        if k == 1:
            lines += [BSE_NOTE, ""]
        lines += [markdown_table(r["summaries"], lpips_protocol=res["lpips"]).strip(), "",
                  "Paired differences against the published setting (per film, mean and 95 % bootstrap interval; "
                  "'better' / 'worse' only where the interval excludes 0):", "",
                  *paired_table(r["paired"], PUBLISHED), "",
                  "Against identity (prediction = CXR):", "", *paired_table(r["paired_identity"], IDENTITY), "",
                  "The one-step student against the plain baseline of the same seed:", "",
                  *paired_table(r["paired_baseline"], ""), "",
                  f"Per film: `per_image_{k}.csv`.", ""]
        if k == 0:
            lines += ["![CXR | published | one-step | baseline | truth | |differences| x4](figure.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    atomic_write_text(out / "report.json", json.dumps(
        {"sets": {n: {"n": r["n"], "summaries": {m: {k: list(x) for k, x in s.items()} for m, s in r["summaries"].items()},
                      "paired_vs_published": {m: {k: list(x) for k, x in d.items()} for m, d in r["paired"].items()}}
                  for n, r in res["sets"].items()},
         "stage_times": times, "image_size": size, "seeds": res["seeds"], "machine": machine},
        indent=2, default=float))
