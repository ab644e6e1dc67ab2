"""Mutation check: plant known bugs one at a time in a copy of the project and see which tests catch them.

Not part of the default test run (pytest collects ``test_*.py`` only). Run it before saying a change
to the code that joins the pieces is done::

    python tests/mutants.py            # every mutant; exit status 1 if any survives
    python tests/mutants.py --list     # names only
    python tests/mutants.py --only ema # mutants whose name contains 'ema'

Each mutant replaces one exact piece of source text (it must occur exactly once, so a mutant that no
longer applies after a refactor is reported, not silently skipped), runs the named test files in the
copy with ``-x`` and records the first failing test. A mutant is *killed* when some test fails.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant("one-step: the BSR term takes its bone from the unmasked film on the local path",
           "gl_lcm/train/onestep.py",
           '"image": masked(pair["bs"][None], mask)[0], "cxr": masked(pair["cxr"][None], mask)[0],',
           '"image": masked(pair["bs"][None], mask)[0], "cxr": pair["cxr"],',
           ("tests/test_onestep.py",)),
    Mutant("one-step: the chained rollout re-noises the target at every step instead of the last estimate",
           "gl_lcm/train/onestep.py",
           "            x = add_noise(z0[sel] if j == 0 else current[sel], noises[j][sel], t_j, self.alphas_cumprod)",
           "            x = add_noise(z0[sel], noises[j][sel], t_j, self.alphas_cumprod)",
           ("tests/test_onestep.py",)),
    Mutant("one-step: a student sampled without the step schedules it was trained on",
           "gl_lcm/inference/settings.py",
           '                            "lcm.step_schedules": denoiser_cfg.lcm.step_schedules})',
           "                            })",
           ("tests/test_onestep.py",)),
    Mutant("LCM: a step schedule of length n ignored by set_timesteps(n)",
           "gl_lcm/diffusion/lcm.py",
           "        if timesteps is None and num_inference_steps in self.step_schedules:",
           "        if False:",
           ("tests/test_lcm_scheduler.py",)),
    Mutant("dual path: clip index from the sampler's own step count",
           "gl_lcm/diffusion/samplers.py",
           "    clips = [clip_range_fn(t).to(device) if clip_range_fn is not None else None for t in timesteps]",
           "    clips = [clip_range_fn(999 - 20 * j).to(device) if clip_range_fn is not None else None\n"
           "             for j, t in enumerate(timesteps)]",
           ("tests/test_pipeline.py",)),
    Mutant("dual path: global and local predictions swapped in the guidance call",
           "gl_lcm/diffusion/samplers.py",
           "apply_guidance(guidance_mode, eps_global, eps_local, guidance_alpha, noise=leg_noise,",
           "apply_guidance(guidance_mode, eps_local, eps_global, guidance_alpha, noise=leg_noise,",
           ("tests/test_pipeline.py",)),
    Mutant("post-processing: local mean shift measured over the whole image",
           "gl_lcm/inference/postprocess.py",
           "l = np.clip(l + (g[m].mean() - l[m].mean()), 0.0, 1.0)",
           "l = np.clip(l + (g.mean() - l.mean()), 0.0, 1.0)",
           ("tests/test_pipeline.py",)),
    Mutant("DICOM: MONOCHROME1 inverted before the VOI window",
           "gl_lcm/data/io.py",
           "    values = apply_modality_lut(np.asarray(stored), ds)\n    with warnings.catch_warnings():",
           "    values = apply_modality_lut(np.asarray(stored), ds)\n"
           "    if str(ds.get(\"PhotometricInterpretation\", \"\")).upper() == \"MONOCHROME1\":\n"
           "        return -np.asarray(apply_voi_lut(-values, ds), dtype=np.float64) * -1\n"
           "    with warnings.catch_warnings():",
           ("tests/test_io.py", "tests/test_dicom_io.py")),
    Mutant("write_png writes straight to the target path",
           "gl_lcm/data/io.py",
           "    with atomic_path(path) as tmp:\n        if not cv2.imwrite(str(tmp), quantised):",
           "    if True:\n        if not cv2.imwrite(str(path), quantised):",
           ("tests/test_io.py", "tests/test_atomic.py")),
    Mutant("load_checkpoint unpickles arbitrary objects (weights_only=False)",
           "gl_lcm/utils/checkpoint.py",
           "map_location=map_location, weights_only=True)",
           "map_location=map_location, weights_only=False)",
           ("tests/test_training.py",)),
    Mutant("update_ema takes decay where it should take 1 - decay",
           "gl_lcm/models/factory.py",
           "e.lerp_(p.detach(), 1.0 - decay)",
           "e.lerp_(p.detach(), decay)",
           ("tests/test_training.py",)),
    Mutant("every DDP rank trains on the same data shard",
           "gl_lcm/train/loop.py",
           "ResumableSampler(len(dataset), self.dist.rank,",
           "ResumableSampler(len(dataset), 0,",
           ("tests/test_training.py",)),
    Mutant("ErrorLog.clear does nothing",
           "gl_lcm/jobs/runner.py",
           "        if self.rows.pop(name, None) is not None:\n            self.flush()",
           "        pass",
           ("tests/test_pipeline.py",)),
    Mutant("config: more LCM steps than the original grid accepted",
           "gl_lcm/config.py",
           "    if lcm.num_inference_steps > lcm.original_inference_steps:",
           "    if False:",
           ("tests/test_config.py",)),
    Mutant("resume: mid-epoch offset forgotten (a resumed epoch restarts)",
           "gl_lcm/train/loop.py",
           "self.sampler.set_epoch(self.epoch, self.batch_in_epoch * self.cfg.train.batch_size)",
           "self.sampler.set_epoch(self.epoch, 0)",
           ("tests/test_training.py",)),
    Mutant("pipeline ignores the denoiser's own prediction type (one-step student read as epsilon)",
           "gl_lcm/inference/engine.py",
           "return cls.from_parts(vqgan, unet, cfg, device, denoiser_cfg=unet_cfg, source=str(path),",
           "return cls.from_parts(vqgan, unet, cfg, device, denoiser_cfg=None, source=str(path),",
           ("tests/test_onestep.py",)),
    Mutant("consistency output ignores the sampler's clip range",
           "gl_lcm/diffusion/distill.py",
           "    if clip_range is not None:\n        x0_pred = clamp_per_sample(x0_pred, clip_range)",
           "    if False:\n        x0_pred = clamp_per_sample(x0_pred, clip_range)",
           ("tests/test_onestep.py",)),
    Mutant("LEG: noise scaled by the batch's std instead of each sample's",
           "gl_lcm/diffusion/guidance.py",
           "return alpha * eps_local + (1 - alpha) * noise / per_sample_std(eps_local, zero_channels)",
           "return alpha * eps_local + (1 - alpha) * noise / eps_local.std()",
           ("tests/test_guidance.py", "tests/test_pipeline.py")),
    Mutant("sampling loop: the clip range computed inside the loop (a host-to-device copy per step)",
           "gl_lcm/diffusion/samplers.py",
           "        clip = clips[j]\n",
           "        clip = clip_range_fn(t) if clip_range_fn is not None else None\n",
           ("tests/test_no_host_sync.py",)),
    Mutant("CLI: dotted overrides after the options not recognised",
           "gl_lcm/cli.py",
           '_OVERRIDE = re.compile(r"^[A-Za-z_]\\w*(\\.\\w+)*=")',
           '_OVERRIDE = re.compile(r"^NEVER")',
           ("tests/test_cli_docs.py",)),
    Mutant("lung U-Net: a batch segmented film by film",
           "gl_lcm/inference/segmenter.py",
           '        if self.method != "unet":\n            return segment_each(',
           '        if True:\n            return segment_each(',
           ("tests/test_lung_generalisation.py",)),
    Mutant("baseline: its one pass at t = 0 instead of the last timestep",
           "gl_lcm/diffusion/samplers.py",
           "    return model_fn(zeros, _timestep_batch(num_train_timesteps - 1, zeros), cond)",
           "    return model_fn(zeros, _timestep_batch(0, zeros), cond)",
           ("tests/test_real_pairs.py",)),
    Mutant("baseline: the engine samples a supervised checkpoint from noise like a denoiser",
           "gl_lcm/inference/settings.py",
           '                   "diffusion.noise_input": denoiser_cfg.diffusion.noise_input}',
           "                   }",
           ("tests/test_real_pairs.py",)),
    Mutant("CXR - bone: the bone image added to the film instead of subtracted",
           "gl_lcm/inference/postprocess.py",
           "    return np.clip(cxr - (cxr_round_trip - prediction), 0.0, 1.0).astype(np.float32)",
           "    return np.clip(cxr + (cxr_round_trip - prediction), 0.0, 1.0).astype(np.float32)",
           ("tests/test_real_pairs.py",)),
    Mutant("bone metrics: PSNR against a peak of 1 instead of the true bone's range",
           "gl_lcm/metrics.py",
           "    r = float(true_bone[mask].max() - true_bone[mask].min()) or 1.0",
           "    r = 1.0",
           ("tests/test_real_pairs.py",)),
    Mutant("one-step: the pixel loss decodes the estimate snapped to the codebook, unlike the engine",
           "gl_lcm/train/onestep.py",
           "            pred = self.vqgan.decode(z, requantize=self.cfg.reference.requantize).float()",
           "            pred = self.vqgan.decode(z, requantize=True).float()",
           ("tests/test_onestep.py",)),
    Mutant("bone gain: fitted over every pixel instead of the lung",
           "gl_lcm/metrics.py",
           "        m = np.asarray(mask, dtype=bool)\n",
           "        m = np.ones_like(np.asarray(mask, dtype=bool))\n",
           ("tests/test_real_pairs.py",)),
    Mutant("bone gain: the gained row applies the inverse gain",
           "gl_lcm/jobs/real_pairs.py",
           "        rows[gained_name(base)] = _with_bone_gain(rows[base], gains[base], size)",
           "        rows[gained_name(base)] = _with_bone_gain(rows[base], 1 / gains[base], size)",
           ("tests/test_real_pairs.py",)),
    Mutant("loss balance: the warning repeats at every pixel step",
           "gl_lcm/train/onestep.py",
           "                self._balance_checked = True\n",
           "                self._balance_checked = False\n",
           ("tests/test_onestep.py",)),
    Mutant("loss balance: the auxiliary terms compared with their own sum instead of the pixel term",
           "gl_lcm/train/onestep.py",
           "        if key != main and value > limit * base:",
           "        if key != main and value > limit * (sum(terms.values()) - value):",
           ("tests/test_onestep.py",)),
]


def copy_project(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the checkout (no venvs, runs or caches)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    shared = REPO.parent / "shared"
    if shared.is_dir():  # real-data tests look for ../shared beside the repository
        (dest.parent / "shared").symlink_to(shared)


def run_mutant(copy: Path, m: Mutant) -> tuple[str, float]:
    """Plant ``m`` in ``copy``, run its tests, restore. Returns (first failing test or '', seconds)."""
    target = copy / m.path
    original = target.read_text()
    count = original.count(m.old)
    if count != 1:
        raise SystemExit(f"mutant '{m.name}': the text to replace occurs {count} times in {m.path} "
                         f"(expected once); update tests/mutants.py to the current code")
    target.write_text(original.replace(m.old, m.new))
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    start = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests],
                           cwd=copy, env=env, capture_output=True, text=True)
    finally:
        target.write_text(original)
    seconds = time.perf_counter() - start
    if r.returncode == 0:
        return "", seconds
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
    return (failed[0] if failed else f"pytest exit {r.returncode}"), seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the mutant names and exit")
    parser.add_argument("--only", default="", help="run mutants whose name contains this text")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only.lower() in m.name.lower()]
    if args.list:
        print("\n".join(m.name for m in chosen))
        return 0
    survivors = 0
    with tempfile.TemporaryDirectory(prefix="gl-lcm-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        copy.mkdir()
        copy_project(copy)
        print("| mutant | killed by | s |\n|:--|:--|--:|", flush=True)
        for m in chosen:
            killer, seconds = run_mutant(copy, m)
            survivors += not killer
            print(f"| {m.name} | {killer or '**SURVIVED**'} | {seconds:.0f} |", flush=True)
    print(f"\n{len(chosen) - survivors} of {len(chosen)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
