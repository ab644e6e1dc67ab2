"""One trainer for every model: DDP, mixed precision, accumulation, clipping, EMA hooks,
atomic checkpoints, exact resume, logs, curves and validation hooks.

A model family plugs in as a :class:`TrainTask` that builds its modules and data and
computes losses for one micro-batch; everything about *how* training runs lives here.

Exact resume: the random numbers of step ``s`` come from seeds derived from
(config seed, rank, step), and the data order of epoch ``e`` from (config seed, epoch),
so a run resumed from a checkpoint at step ``s`` repeats the uninterrupted run's
steps ``s+1, s+2, ...`` bit for bit (on the same hardware and thread settings).
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from gl_lcm.config import Config, check_consistency, save_config
from gl_lcm.utils.checkpoint import (
    find_latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gl_lcm.utils.atomic import ensure_writable
from gl_lcm.utils.dist import DistInfo, barrier, cleanup_distributed, init_distributed
from gl_lcm.utils import seeding
from gl_lcm.utils.seeding import derive_seed, make_generator, seed_everything

KILL_ENV = "GL_LCM_KILL_AFTER_STEP"  # test hook: SIGKILL this process right after that step


class ResumableSampler(Sampler[int]):
    """Shuffled, rank-sharded indices; epoch ``e`` is a permutation seeded by (seed, e).

    Like DistributedSampler (indices padded so every rank gets the same count), plus a
    start offset so a resumed run skips the samples of batches it already trained on.
    """

    def __init__(self, length: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        self.length, self.rank, self.world_size = length, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(length / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = make_generator(derive_seed(self.seed, "epoch", self.epoch))
            order = seeding.randperm(self.length, g).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / self.length))[:total]
        return iter(order[self.rank:total:self.world_size][self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


class TrainTask:
    """What the trainer needs from one model family (subclass and fill in).

    ``build`` creates modules and data; ``micro_step`` returns the loss of one micro-batch
    (the trainer does backward, accumulation, clipping and optimizer steps).
    """

    name = "task"  # checkpoint kind

    @property
    def label(self) -> str:
        """What progress bars and logs call this task (default: its checkpoint kind)."""
        return self.name

    def build(self, trainer: "Trainer") -> None:
        raise NotImplementedError

    def train_dataset(self) -> Dataset:
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        """Every module whose state goes into the checkpoint (trained, EMA, target...)."""
        raise NotImplementedError

    def optimizer_groups(self) -> dict[str, dict[str, Any]]:
        """optimizer name -> {'modules': [module names], 'lr': float}. Listed modules are DDP-wrapped."""
        raise NotImplementedError

    def micro_step(self, batch: Any, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch (scalar, graph attached) and floats to log."""
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """Hook after every optimizer step (EMA updates, ...)."""

    def validate(self, step: int, out_dir: Path) -> dict[str, float]:
        """Rank 0 only: write sample grids, return validation numbers to log."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Plain data saved in the checkpoint (e.g. the latent scale)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def on_resume(self) -> None:
        """Called after a checkpoint has been loaded."""

    def inference_modules(self) -> list[str]:
        """Modules written to the slim ``model.pt`` at the end (default: all)."""
        return list(self.modules())


def lr_lambda(warmup_steps: int, milestones: list[int], gamma: float):
    """Multiplier of the peak LR at step s: linear warm-up, then x gamma at each milestone."""

    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return warm * gamma ** sum(step >= m for m in milestones)

    return f


class MetricLog:
    """Long-format CSV (step, name, value) of every logged number, plus a PNG of the curves."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[tuple[int, str, float]] = []
        if path.exists():
            with open(path, newline="") as f:
                self.rows = [(int(r["step"]), r["name"], float(r["value"])) for r in csv.DictReader(f)]

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a killed run may have logged past its last checkpoint)."""
        self.rows = [r for r in self.rows if r[0] <= step]
        self.flush()

    def add(self, step: int, values: dict[str, float]) -> None:
        self.rows.extend((step, k, float(v)) for k, v in values.items())

    def flush(self) -> None:
        from gl_lcm.utils.atomic import atomic_path

        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["step", "name", "value"])
                w.writerows(self.rows)

    def plot(self, path: Path) -> None:
        from gl_lcm.utils.plotting import plot_curves

        series: dict[str, list[tuple[int, float]]] = {}
        for step, name, value in self.rows:
            series.setdefault(name, []).append((step, value))
        if series:
            plot_curves(series, path)


class Trainer:
    """Runs a TrainTask. ``resume``: 'auto' (newest checkpoint in output_dir if any), 'none', or a path."""

    def __init__(self, cfg: Config, task: TrainTask, resume: str = "auto", progress: bool = True):
        check_consistency(cfg)  # configs built in code skip load_config's checks
        self.cfg, self.task, self.resume, self.progress = cfg, task, resume, progress
        self.out_dir = Path(cfg.train.output_dir)
        ensure_writable(self.out_dir, "train.output_dir")
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.dist: DistInfo = init_distributed(cfg.device)
        self.device = self.dist.device
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.nets: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------ helpers for tasks
    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def net(self, name: str) -> nn.Module:
        """The module to call in forward passes (DDP-wrapped when distributed and trained)."""
        return self.nets.get(name) or self.task.modules()[name]

    def autocast(self):
        """bf16/fp16 autocast on CUDA as configured; a no-op on CPU."""
        mp = self.cfg.train.mixed_precision
        if self.device.type != "cuda" or mp == "no":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if mp == "bf16" else torch.float16)

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message, file=sys.stderr)

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = self.cfg
        seed_everything(derive_seed(cfg.seed, "build"))  # identical initial weights on every rank
        self.task.build(self)
        modules = self.task.modules()
        for m in modules.values():
            m.to(self.device)
            if self.device.type == "cuda" and cfg.train.channels_last:
                m.to(memory_format=torch.channels_last)
        groups = self.task.optimizer_groups()
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        self.group_modules: dict[str, list[str]] = {}
        t = cfg.train
        for opt_name, spec in groups.items():
            params = [p for n in spec["modules"] for p in modules[n].parameters() if p.requires_grad]
            # the fused kernel updates all tensors in one pass: on the CPU it is about 5x faster than the
            # per-tensor loop for these small models, which is a few per cent of each step
            opt = torch.optim.AdamW(params, lr=spec.get("lr", t.lr), betas=tuple(t.adam_betas),
                                    weight_decay=spec.get("weight_decay", t.weight_decay),
                                    fused=self.device.type in ("cpu", "cuda"))
            self.optimizers[opt_name] = opt
            # each optimizer gets its own schedule (never share one across optimizers)
            self.schedulers[opt_name] = torch.optim.lr_scheduler.LambdaLR(
                opt, lr_lambda(t.warmup_steps, list(t.lr_milestones), t.lr_gamma))
            self.group_modules[opt_name] = list(spec["modules"])
            for n in spec["modules"]:
                if self.dist.distributed:
                    ids = [self.device.index] if self.device.type == "cuda" else None
                    self.nets[n] = DDP(modules[n], device_ids=ids)
        self.scaler = torch.amp.GradScaler("cuda") if (self.device.type == "cuda" and t.mixed_precision == "fp16") else None

        dataset = self.task.train_dataset()
        need = t.batch_size * self.dist.world_size
        if len(dataset) < need:
            raise ValueError(f"the training split ({cfg.data.root}/{cfg.data.train_list}) gives {len(dataset)} "
                             f"samples, fewer than one batch per process: train.batch_size={t.batch_size} x "
                             f"{self.dist.world_size} process(es) = {need}; lower train.batch_size or add data")
        self.sampler = ResumableSampler(len(dataset), self.dist.rank, self.dist.world_size, cfg.seed)
        self.loader = DataLoader(dataset, batch_size=t.batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=False)
        self.batches_per_epoch = len(self.sampler) // t.batch_size
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        self.metric_log = MetricLog(self.out_dir / "logs" / "metrics.csv")

    def _maybe_resume(self) -> None:
        if self.resume == "none":
            if self.is_main and self.metric_log.rows:
                self.metric_log.truncate_after(-1)
            return
        path = find_latest_checkpoint(self.ckpt_dir) if self.resume == "auto" else Path(self.resume)
        if path is None:
            if self.is_main and self.metric_log.rows:
                self.metric_log.truncate_after(-1)
            return
        ckpt = load_checkpoint(path, map_location=self.device, expect_kind=self.task.name)
        for name, module in self.task.modules().items():
            if name not in ckpt["modules"]:
                raise ValueError(f"{path}: checkpoint has no module '{name}' (it holds {sorted(ckpt['modules'])})")
            try:
                module.load_state_dict(ckpt["modules"][name])
            except RuntimeError as exc:
                raise ValueError(f"{path}: module '{name}' does not match this config's architecture: "
                                 f"{str(exc).splitlines()[0]}. Use the config the checkpoint was trained with "
                                 f"or start a new output_dir.") from None
        for name, opt in self.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        for name, sched in self.schedulers.items():
            sched.load_state_dict(ckpt["schedulers"][name])
        if self.scaler is not None and "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        self.task.load_extra_state(ckpt.get("extra", {}))
        set_rng_state(ckpt.get("rng"))
        self.task.on_resume()
        if self.is_main:
            self.metric_log.truncate_after(self.step)
        self.log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ checkpoints
    def save(self, final: bool = False) -> Optional[Path]:
        if not self.is_main:
            return None
        modules = self.task.modules()
        state = {
            "kind": self.task.name,
            "config": _config_dict(self.cfg),
            "modules": {n: _unwrap(m).state_dict() for n, m in modules.items()},
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "rng": rng_state(),
            "extra": self.task.extra_state(),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        path = self.ckpt_dir / f"step_{self.step:08d}.pt"
        save_checkpoint(state, path)
        prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_last)
        if final:
            slim = {k: state[k] for k in ("kind", "config", "step", "extra")}
            slim["modules"] = {n: state["modules"][n] for n in self.task.inference_modules()}
            save_checkpoint(slim, self.out_dir / "model.pt")
        return path

    # ------------------------------------------------------------------ loop
    def _batches(self) -> Iterator[Any]:
        while True:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch * self.cfg.train.batch_size)
            for batch in self.loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    def _to_device(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(v) for v in batch)
        return batch

    def fit(self) -> dict[str, float]:
        """Train to ``train.max_steps``; returns the last logged values."""
        try:
            return self._fit()
        finally:
            cleanup_distributed()

    def _fit(self) -> dict[str, float]:
        t = self.cfg.train
        self._setup()
        self._maybe_resume()
        kill_after = int(os.environ.get(KILL_ENV, "-1"))
        ddp_modules = list(self.nets.values())
        batches = self._batches()
        bar = tqdm(total=t.max_steps, initial=self.step, desc=f"train {self.task.label}", dynamic_ncols=True,
                   disable=not (self.progress and self.is_main))
        running: dict[str, float] = {}
        last: dict[str, float] = {}
        start = time.time()
        for m in self.task.modules().values():
            m.train()
        while self.step < t.max_steps:
            step = self.step + 1
            logs: dict[str, float] = {}
            for micro in range(t.grad_accum):
                seed = derive_seed(self.cfg.seed, "rank", self.dist.rank, "step", step, "micro", micro)
                seed_everything(seed)
                gen = make_generator(seed, self.device)
                batch = self._to_device(next(batches))
                sync = micro == t.grad_accum - 1
                with contextlib.ExitStack() as stack:
                    if not sync:
                        for m in ddp_modules:
                            stack.enter_context(m.no_sync())
                    with self.autocast():
                        loss, micro_logs = self.task.micro_step(batch, step, gen)
                    loss = loss / t.grad_accum
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                for k, v in micro_logs.items():
                    logs[k] = logs.get(k, 0.0) + float(v) / t.grad_accum
            for name, opt in self.optimizers.items():
                if self.scaler:
                    self.scaler.unscale_(opt)
                if t.grad_clip > 0:
                    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
                    if params:
                        norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                        logs[f"grad_norm/{name}"] = float(norm)
                if self.scaler:
                    self.scaler.step(opt)
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                self.schedulers[name].step()
                logs[f"lr/{name}"] = self.schedulers[name].get_last_lr()[0]
            if self.scaler:
                self.scaler.update()
            self.step = step
            self.task.after_optimizer_step(step)
            for k, v in logs.items():
                running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
            if step % t.log_every == 0 or step == t.max_steps or step == 1:
                last = dict(logs)
                if self.is_main:
                    self.metric_log.add(step, logs)
                    shown = {k: f"{v:.4g}" for k, v in running.items() if "/" not in k}
                    bar.set_postfix(shown, refresh=False)
            bar.update(1)
            if step % t.val_every == 0 or step == t.max_steps:
                self._validate(step)
            if step % t.ckpt_every == 0 or step == t.max_steps:
                self.save(final=step == t.max_steps)
                if self.is_main:
                    self.metric_log.flush()
                barrier()
            if step == kill_after:
                bar.close()
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        if self.is_main:
            self.metric_log.flush()
            self.metric_log.plot(self.out_dir / "logs" / "curves.png")
            self.log(f"trained {self.task.label} to step {self.step} in {time.time() - start:.1f} s; "
                     f"outputs in {self.out_dir}")
        print(f"[rank {self.dist.rank}] weights checksum {weights_checksum(self.task.modules()):.10e}", flush=True)
        return last

    def _validate(self, step: int) -> None:
        if self.is_main:
            for m in self.task.modules().values():
                m.eval()
            with torch.no_grad(), self.autocast():
                values = self.task.validate(step, self.out_dir / "samples")
            for m in self.task.modules().values():
                m.train()
            if values:
                self.metric_log.add(step, {f"val/{k}": v for k, v in values.items()})
                self.log(f"step {step} validation: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
            self.metric_log.flush()
            self.metric_log.plot(self.out_dir / "logs" / "curves.png")
        barrier()


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DDP) else module


def _config_dict(cfg: Config) -> dict:
    from gl_lcm.config import to_dict

    return to_dict(cfg)


def weights_checksum(modules: dict[str, nn.Module]) -> float:
    """Sum of |w| * position weights over all parameters: equal across ranks iff weights agree."""
    total = 0.0
    for name in sorted(modules):
        for i, p in enumerate(_unwrap(modules[name]).parameters()):
            total += float((p.detach().double().abs().sum()) * (i + 1))
    return total
