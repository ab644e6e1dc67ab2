"""Trainer infrastructure on tiny models (CPU): exact resume after SIGKILL, torchrun DDP with 2
processes (identical weights on every rank, files from rank 0 only), clear errors before work."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gl_lcm.config import load_config
from gl_lcm.data.phantom import write_phantom_dataset
from gl_lcm.utils.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.image_size=32", "vqgan.channels=[8,16]", "vqgan.num_res_blocks=1", "vqgan.codebook_size=32",
        "vqgan.attn_at_bottom=false", "vqgan.adversarial_start_step=3", "vqgan.dead_code_steps=2",
        "vqgan.disc_channels=8", "train.batch_size=4", "train.log_every=1", "train.val_every=100",
        "train.ckpt_every=3", "train.lr=0.001", "device=cpu"]
LDM_TINY = ["data.image_size=32", "unet.model_channels=16", "unet.channel_mult=[1,2]", "unet.num_res_blocks=1",
            "unet.attention_resolutions=[2]", "unet.latent_size=4", "unet.num_heads=2", "train.batch_size=4",
            "train.log_every=1", "train.val_every=100", "train.ckpt_every=2", "lcm.num_inference_steps=2",
            "device=cpu"]


def run_cli(args, env_extra=None, torchrun: int = 0):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "gl_lcm.cli", *args]
    else:
        cmd = [sys.executable, "-m", "gl_lcm.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def losses(path: Path) -> dict[tuple[int, str], float]:
    with open(path / "logs" / "metrics.csv", newline="") as f:
        return {(int(r["step"]), r["name"]): float(r["value"]) for r in csv.DictReader(f)
                if not r["name"].startswith("val/")}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(root, n=16, size=32, seed=3)
    return root


def vqgan_args(root: Path, out: Path, steps: int, extra=()):
    return ["train-vqgan", "--config", "configs/vqgan_tiny.yaml", f"data.root={root}", f"train.output_dir={out}",
            f"train.max_steps={steps}", *TINY, *extra]


def test_exact_resume_after_sigkill(phantoms, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = run_cli(vqgan_args(phantoms, straight, 6))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(vqgan_args(phantoms, killed, 6), env_extra={"GL_LCM_KILL_AFTER_STEP": "5"})
    assert r.returncode == -9, r.stderr[-3000:]  # SIGKILL after step 5; newest checkpoint is step 3
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_00000003.pt"]
    r = run_cli(vqgan_args(phantoms, killed, 6) + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    a, b = losses(straight), losses(killed)
    assert a.keys() == b.keys()
    assert any(k[1] == "adversarial" for k in a)  # the resumed part includes GAN steps
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-6, rel=1e-6), key
    wa = load_checkpoint(straight / "model.pt")["modules"]["vqgan"]
    wb = load_checkpoint(killed / "model.pt")["modules"]["vqgan"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_vqgan(phantoms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqgan")
    r = run_cli(vqgan_args(phantoms, out, 3))
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "model.pt"


def test_checkpoint_contents(tiny_vqgan):
    ckpt = load_checkpoint(tiny_vqgan, expect_kind="vqgan")
    assert ckpt["step"] == 3 and ckpt["config"]["vqgan"]["channels"] == [8, 16]
    assert ckpt["extra"]["latent_scale"] > 0
    assert float(ckpt["modules"]["vqgan"]["latent_scale"]) == pytest.approx(ckpt["extra"]["latent_scale"])
    with pytest.raises(ValueError, match="holds a 'vqgan' model, but a 'ldm' checkpoint is needed"):
        load_checkpoint(tiny_vqgan, expect_kind="ldm")


def _checksums(stdout: str) -> dict[int, float]:
    return {int(r): float(v) for r, v in re.findall(r"\[rank (\d)\] weights checksum (\S+)", stdout)}


def test_torchrun_ddp_vqgan_two_ranks(phantoms, tmp_path):
    out = tmp_path / "ddp"
    r = run_cli(vqgan_args(phantoms, out, 4), torchrun=2)
    assert r.returncode == 0, r.stderr[-4000:]
    sums = _checksums(r.stdout)
    assert set(sums) == {0, 1} and sums[0] == sums[1]
    assert r.stderr.count("trained vqgan to step 4") == 1  # only rank 0 logs
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003.pt", "step_00000004.pt"]
    assert not list(out.rglob("*.tmp*"))  # no half-written files


def test_torchrun_ddp_teacher_two_ranks(phantoms, tiny_vqgan, tmp_path):
    out = tmp_path / "ldm"
    args = ["train-ldm", "--config", "configs/ldm_tiny.yaml", f"data.root={phantoms}", f"train.output_dir={out}",
            "train.max_steps=2", f"checkpoints.vqgan={tiny_vqgan}", *LDM_TINY]
    r = run_cli(args, torchrun=2)
    assert r.returncode == 0, r.stderr[-4000:]
    sums = _checksums(r.stdout)
    assert set(sums) == {0, 1} and sums[0] == sums[1]
    ckpt = load_checkpoint(out / "model.pt", expect_kind="ldm")
    assert set(ckpt["modules"]) == {"ema"} and ckpt["extra"]["latent_channels"] == 4


def test_bad_inputs_fail_before_work(phantoms, tmp_path, tiny_vqgan):
    from gl_lcm.train.ldm import train_ldm
    from gl_lcm.train.vqgan import train_vqgan

    cfg = load_config(REPO / "configs/vqgan_tiny.yaml", [f"data.root={tmp_path / 'nothing'}",
                                                        f"train.output_dir={tmp_path / 'o'}", *TINY])
    with pytest.raises(FileNotFoundError, match="nothing"):
        train_vqgan(cfg, progress=False)
    cfg = load_config(REPO / "configs/vqgan_tiny.yaml", [f"data.root={phantoms}", f"train.output_dir={tmp_path / 'o'}",
                                                        *TINY, "data.image_size=30"])
    with pytest.raises(ValueError, match="image_size=30 is not divisible by 2\\^2=4"):
        train_vqgan(cfg, progress=False)
    # a checkpoint of a different architecture: named, before any step
    out = tmp_path / "arch"
    r = run_cli(vqgan_args(phantoms, out, 3))
    assert r.returncode == 0
    r = run_cli(vqgan_args(phantoms, out, 6, extra=["vqgan.channels=[8,8]"]))
    assert r.returncode == 2 and "does not match this config's architecture" in r.stderr
    cfg = load_config(REPO / "configs/ldm_tiny.yaml", [f"data.root={phantoms}", f"train.output_dir={tmp_path / 'l'}",
                                                      "checkpoints.vqgan=" + str(tmp_path / "missing.pt"), *LDM_TINY])
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*missing.pt"):
        train_ldm(cfg, progress=False)


def test_train_segnet_learns_lungs_and_is_used_by_segment(phantoms, tmp_path):
    from gl_lcm.evaluate import segment_path
    from gl_lcm.train.segnet import train_segnet

    cfg = load_config(REPO / "configs/segnet_tiny.yaml", [
        f"data.root={phantoms}", f"train.output_dir={tmp_path / 'seg'}", "segmentation.image_size=32",
        "segmentation.depth=2", "segmentation.base_channels=8", "train.max_steps=60", "train.val_every=60",
        "train.ckpt_every=60", "train.batch_size=4", "train.lr=0.003", "device=cpu"])
    train_segnet(cfg, progress=False)
    with open(tmp_path / "seg" / "logs" / "metrics.csv") as f:
        dice = [float(r["value"]) for r in csv.DictReader(f) if r["name"] == "val/dice"]
    assert dice and dice[-1] > 0.7
    use = load_config(None, ["segmentation.method=unet", f"checkpoints.segnet={tmp_path / 'seg' / 'model.pt'}",
                             "segmentation.image_size=32", "device=cpu", "segmentation.min_area=0"])
    counts = segment_path(use, str(phantoms / "CXR"), str(tmp_path / "masks"))
    assert counts["succeeded"] >= 12  # a net trained for 60 steps finds lungs in most phantoms
