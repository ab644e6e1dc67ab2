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


@pytest.fixture(scope="module")
def tiny_vqgan(phantoms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqgan")
    r = run_cli(vqgan_args(phantoms, out, 3))
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "model.pt"


@pytest.fixture(scope="module")
def tiny_teacher(phantoms, tiny_vqgan, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    r = run_cli(ldm_args(phantoms, out, 2, tiny_vqgan))
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "model.pt"


def ldm_args(root: Path, out: Path, steps: int, vqgan: Path, extra=()):
    return ["train-ldm", "--config", "configs/ldm_tiny.yaml", f"data.root={root}", f"train.output_dir={out}",
            f"train.max_steps={steps}", f"checkpoints.vqgan={vqgan}", *LDM_TINY, *extra]


# Each trainer with about 3 batches per epoch (12-13 training phantoms; the VQGAN sees 4 images per
# phantom), a checkpoint every 2 steps and a kill after step 3: the resumed run (steps 3-5) starts
# mid-epoch and crosses into the next epoch.
def _resume_args(kind: str, root: Path, out: Path, fixtures: dict) -> list[str]:
    common = ["train.max_steps=5", "train.ckpt_every=2", "train.log_every=1"]
    if kind == "vqgan":
        return vqgan_args(root, out, 5, extra=["train.batch_size=16", *common])
    if kind == "ldm":
        return ldm_args(root, out, 5, fixtures["vqgan"], extra=["diffusion.paths=[global]", *common])
    if kind == "distill":
        return ["distill", "--config", "configs/distill_tiny.yaml", f"data.root={root}", f"train.output_dir={out}",
                f"checkpoints.vqgan={fixtures['vqgan']}", f"checkpoints.teacher={fixtures['teacher']}", *LDM_TINY,
                "train.batch_size=8", "train.val_every=100", *common]  # the teacher's paths: global + local
    if kind == "onestep":
        return ["train-onestep", "--config", "configs/onestep_tiny.yaml", f"data.root={root}",
                f"train.output_dir={out}", f"checkpoints.vqgan={fixtures['vqgan']}",
                f"checkpoints.teacher={fixtures['teacher']}", "checkpoints.student=", *LDM_TINY,
                "train.batch_size=8", "train.val_every=100", "onestep.latent_only_steps=2",  # both phases
                "train.lr_milestones=[2]", *common]
    return ["train-seg", "--config", "configs/segnet_tiny.yaml", f"data.root={root}", f"train.output_dir={out}",
            "segmentation.image_size=32", "segmentation.depth=2", "segmentation.base_channels=8",
            "train.batch_size=4", "train.val_every=100", "device=cpu", "segmentation.augment=true",
            "segmentation.outputs=[visible,full]", "data.full_mask_dir=Mask", *common]  # random augmentation, 2 outputs


@pytest.mark.parametrize("kind", ["vqgan", "ldm", "distill", "onestep", "segnet"])
def test_exact_resume_after_sigkill_across_an_epoch(kind, phantoms, tiny_vqgan, tiny_teacher, tmp_path):
    fixtures = {"vqgan": tiny_vqgan, "teacher": tiny_teacher}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = run_cli(_resume_args(kind, phantoms, straight, fixtures))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(_resume_args(kind, phantoms, killed, fixtures), env_extra={"GL_LCM_KILL_AFTER_STEP": "3"})
    assert r.returncode == -9, r.stderr[-3000:]  # SIGKILL after step 3; newest checkpoint is step 2
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_00000002.pt"]
    resumed_from = load_checkpoint(killed / "checkpoints" / "step_00000002.pt")
    r = run_cli(_resume_args(kind, phantoms, killed, fixtures) + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    final = load_checkpoint(killed / "checkpoints" / "step_00000005.pt")
    assert final["epoch"] > resumed_from["epoch"]  # the resumed part crossed an epoch boundary
    a, b = losses(straight), losses(killed)
    assert a.keys() == b.keys() and {k[0] for k in a} == {1, 2, 3, 4, 5}
    if kind == "vqgan":
        assert any(k[1] == "adversarial" for k in a)  # the resumed part includes GAN steps
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-6, rel=1e-6), key
    wa, wb = load_checkpoint(straight / "model.pt")["modules"], load_checkpoint(killed / "model.pt")["modules"]
    assert wa.keys() == wb.keys()
    for name in wa:
        for k in wa[name]:
            torch.testing.assert_close(wa[name][k], wb[name][k], atol=1e-6, rtol=1e-6)


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
    with pytest.raises(ValueError, match="image_size=30 is not divisible by 2\\^2=4"):
        load_config(REPO / "configs/vqgan_tiny.yaml", [f"data.root={phantoms}", *TINY, "data.image_size=30"])
    # a training split smaller than one batch: the keys are named, before any step
    cfg = load_config(REPO / "configs/vqgan_tiny.yaml", [f"data.root={phantoms}", f"train.output_dir={tmp_path / 'o'}",
                                                        *TINY, "train.batch_size=64"])
    with pytest.raises(ValueError, match=r"train.txt\) gives \d+ samples, fewer than one batch per process: "
                                         r"train.batch_size=64 x 1 process\(es\) = 64"):
        train_vqgan(cfg, progress=False)
    assert not (tmp_path / "o" / "checkpoints").exists()
    # an output folder that cannot be written (its parent is a file; root ignores permission bits)
    (tmp_path / "file").write_text("x")
    cfg = load_config(REPO / "configs/vqgan_tiny.yaml", [f"data.root={phantoms}",
                                                        f"train.output_dir={tmp_path / 'file' / 'run'}", *TINY])
    with pytest.raises(ValueError, match=r"train.output_dir=.*file/run cannot be written"):
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
    from gl_lcm.jobs.segment import segment_path
    from gl_lcm.train.segnet import train_segnet

    cfg = load_config(REPO / "configs/segnet_tiny.yaml", [
        f"data.root={phantoms}", f"train.output_dir={tmp_path / 'seg'}", "segmentation.image_size=32",
        "segmentation.depth=2", "segmentation.base_channels=8", "train.max_steps=60", "train.val_every=60",
        "train.ckpt_every=60", "train.batch_size=4", "train.lr=0.003", "device=cpu"])
    train_segnet(cfg, progress=False)
    with open(tmp_path / "seg" / "logs" / "metrics.csv") as f:
        dice = [float(r["value"]) for r in csv.DictReader(f) if r["name"] == "val/dice_visible"]
    assert dice and dice[-1] > 0.7
    use = load_config(None, ["segmentation.method=unet", f"checkpoints.segnet={tmp_path / 'seg' / 'model.pt'}",
                             "segmentation.image_size=32", "device=cpu", "segmentation.min_area=0"])
    counts = segment_path(use, str(phantoms / "CXR"), str(tmp_path / "masks"))
    assert counts["succeeded"] >= 12  # a net trained for 60 steps finds lungs in most phantoms


# ----------------------------------------------------------------------------- data sharding and EMA
def test_resumable_sampler_shards_are_disjoint_and_cover_the_epoch():
    from gl_lcm.train.loop import ResumableSampler

    for length, world in ((10, 2), (11, 2), (12, 3)):
        shards = []
        for rank in range(world):
            s = ResumableSampler(length, rank, world, seed=5)
            s.set_epoch(3)
            shards.append(list(s))
        assert len({len(x) for x in shards}) == 1  # same count on every rank
        flat = [i for x in shards for i in x]
        assert set(flat) == set(range(length))  # every sample seen in the epoch
        padding = world * len(shards[0]) - length
        assert len(flat) - len(set(flat)) == padding  # repeats only to pad the last round
        if padding == 0:
            assert all(set(a).isdisjoint(b) for a in shards for b in shards if a is not b)
        s = ResumableSampler(length, 1, world, seed=5)
        s.set_epoch(3, start=2)
        assert list(s) == shards[1][2:]  # a resumed epoch skips what was trained


DDP_SCRIPT = r'''
import json, os, sys
import torch
from torch.utils.data import Dataset
from gl_lcm.config import load_config
from gl_lcm.models.factory import update_ema
from gl_lcm.train.loop import Trainer, TrainTask

DECAY = 0.8

class Indexed(Dataset):
    def __len__(self):
        return 16
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(3, generator=g), "index": torch.tensor(i)}

class Task(TrainTask):
    name = "probe"
    def build(self, trainer):
        self.trainer = trainer
        self.model = torch.nn.Linear(3, 2)
        self.ema = torch.nn.Linear(3, 2).requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.seen, self.history = [], [{k: v.tolist() for k, v in self.model.state_dict().items()}]
    def train_dataset(self):
        return Indexed()
    def modules(self):
        return {"net": self.model, "ema": self.ema}
    def optimizer_groups(self):
        return {"net": {"modules": ["net"], "lr": 0.1}}
    def micro_step(self, batch, step, generator):
        self.seen.append(batch["index"].tolist())
        return self.trainer.net("net")(batch["x"]).pow(2).mean(), {}
    def after_optimizer_step(self, step):
        self.history.append({k: v.tolist() for k, v in self.model.state_dict().items()})
        update_ema(self.ema, self.model, DECAY)

out = sys.argv[1]
cfg = load_config(None, [f"train.output_dir={out}", "train.batch_size=2", "train.max_steps=4", "device=cpu",
                         "train.ckpt_every=100", "train.val_every=100", "train.grad_clip=0"])
task = Task()
Trainer(cfg, task, resume="none", progress=False).fit()
rank = int(os.environ.get("RANK", 0))
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"seen": task.seen, "history": task.history, "decay": DECAY,
               "ema": {k: v.tolist() for k, v in task.ema.state_dict().items()}}, f)
'''


def test_torchrun_ranks_see_disjoint_data_and_ema_equals_direct_computation(tmp_path):
    """Two gloo ranks on a 16-sample set, batch 2, 4 steps (one epoch = 4 steps): in the epoch the
    ranks' samples are disjoint and together cover the set; the EMA after training equals
    ema_k = d * ema_{k-1} + (1 - d) * w_k computed here from the recorded weights."""
    import json

    script = tmp_path / "probe.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{k}.json").read_text()) for k in (0, 1)]
    seen = [[i for batch in rk["seen"] for i in batch] for rk in ranks]
    assert len(seen[0]) == len(seen[1]) == 8
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(16))
    for rk in ranks:
        d = rk["decay"]
        ema = {k: torch.tensor(v, dtype=torch.float64) for k, v in rk["history"][0].items()}
        for weights in rk["history"][1:]:
            ema = {k: d * ema[k] + (1 - d) * torch.tensor(weights[k], dtype=torch.float64) for k in ema}
        for k, v in rk["ema"].items():
            torch.testing.assert_close(torch.tensor(v, dtype=torch.float64), ema[k], atol=1e-6, rtol=0)
        assert not torch.allclose(torch.tensor(rk["history"][-1]["weight"]), torch.tensor(rk["ema"]["weight"]))
    assert ranks[0]["history"] == ranks[1]["history"]  # DDP keeps the weights equal


def test_update_ema_closed_form():
    from gl_lcm.models.factory import update_ema

    torch.manual_seed(0)
    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.normal_(), ema.weight.normal_()
        model.running_mean.normal_()
    expected = 0.9 * ema.weight.detach().clone() + 0.1 * model.weight.detach()
    update_ema(ema, model, 0.9)
    torch.testing.assert_close(ema.weight.detach(), expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(ema.running_mean, model.running_mean)  # buffers are copied


def test_load_checkpoint_refuses_code_in_a_pickle(tmp_path):
    """A file whose unpickling would run code is refused, and the code never runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pt"
    torch.save({"kind": "vqgan", "modules": {}, "config": {}, "payload": Payload()}, path)
    with pytest.raises(ValueError, match="not a readable gl-lcm checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
