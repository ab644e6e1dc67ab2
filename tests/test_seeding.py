"""Random draws agree with their generator's device by construction (gl_lcm.utils.seeding helpers).

On CUDA the trainer's step generator lives on the GPU (``make_generator(seed, trainer.device)``) and torch
refuses a draw on another device with it. These CPU tests pretend: ``PretendCudaGenerator`` is a CPU
generator whose ``.device`` says cuda, and ``strict_draws`` makes torch's random functions refuse, as
CUDA does, any draw whose device differs from its generator's (running the pretend-cuda draws on the CPU).
"""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gl_lcm.utils import seeding

REPO = Path(__file__).resolve().parents[1]


class PretendCudaGenerator(torch.Generator):
    """A CPU generator that reports ``device == cuda`` (what the step generator is on a GPU)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda")


@pytest.fixture
def strict_draws(monkeypatch):
    """torch.randn/rand/randint/randperm raise when the draw device is not the generator's (as on CUDA)."""
    calls = []

    def strict(fn, name):
        def draw(*args, generator=None, device=None, **kwargs):
            if generator is not None:
                where = torch.device(device) if device is not None else torch.device("cpu")
                if where.type != generator.device.type:
                    raise RuntimeError(f"torch.{name}: Expected a '{where.type}' device type for generator "
                                       f"but found '{generator.device.type}'")
                if isinstance(generator, PretendCudaGenerator):
                    calls.append(name)
                    device = "cpu"  # the pretend-cuda draw runs on the CPU
            return fn(*args, generator=generator, device=device, **kwargs)

        return draw

    for name in ("randn", "rand", "randint", "randperm"):
        monkeypatch.setattr(torch, name, strict(getattr(torch, name), name))
    return calls


def test_helpers_match_torch_with_a_cpu_generator():
    for fn, ref in [
        (lambda g: seeding.randn((2, 3), g, "cpu"), lambda g: torch.randn(2, 3, generator=g)),
        (lambda g: seeding.rand(5, g, "cpu"), lambda g: torch.rand(5, generator=g)),
        (lambda g: seeding.randint(0, 2**62, (1,), g, "cpu"), lambda g: torch.randint(0, 2**62, (1,), generator=g)),
        (lambda g: seeding.randint(3, 9, [4], g), lambda g: torch.randint(3, 9, (4,), generator=g)),
        (lambda g: seeding.randperm(7, g), lambda g: torch.randperm(7, generator=g)),
    ]:
        a, b = fn(torch.Generator().manual_seed(5)), ref(torch.Generator().manual_seed(5))
        assert a.dtype == b.dtype and a.device == b.device
        assert torch.equal(a, b)


def test_helpers_put_the_result_on_the_requested_device_and_dtype():
    g = torch.Generator().manual_seed(1)
    x = seeding.randn((2, 2), g, "meta", torch.bfloat16)  # drawn on the CPU, moved
    assert x.device.type == "meta" and x.dtype == torch.bfloat16
    assert seeding.rand(3, g, torch.device("meta")).device.type == "meta"
    assert seeding.randint(0, 4, 3, g, "meta").dtype == torch.int64
    assert seeding.randperm(4, g, "meta").device.type == "meta"
    # the same draw on the CPU: the numbers do not depend on the target
    a = seeding.randn((2, 2), torch.Generator().manual_seed(1), "cpu", torch.bfloat16)
    assert torch.equal(a, torch.randn(2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16))
    # without a generator: the global generator of the target device
    torch.manual_seed(3)
    a = seeding.randn((4,), None, "cpu")
    torch.manual_seed(3)
    assert torch.equal(a, torch.randn(4))


def test_helpers_draw_on_the_generators_device(strict_draws):
    g = PretendCudaGenerator().manual_seed(2)
    x = seeding.randn((2, 3), g, "cpu")
    i = seeding.randint(0, 10, (4,), g, torch.device("cpu"))
    u = seeding.rand(4, g, "cpu")
    assert x.device.type == i.device.type == u.device.type == "cpu"
    assert strict_draws == ["randn", "randint", "rand"]
    with pytest.raises(RuntimeError, match="Expected a 'cpu' device type"):
        torch.randn(2, generator=g)  # the strict fixture does catch a wrong-device draw


def test_schedule_noise_draws_on_the_generators_device(strict_draws):
    from gl_lcm.diffusion.schedule import offset_noise, randn_like

    a = offset_noise((2, 4, 3, 3), 0.1, generator=PretendCudaGenerator().manual_seed(4), device="cpu")
    b = offset_noise((2, 4, 3, 3), 0.1, generator=torch.Generator().manual_seed(4), device="cpu")
    assert torch.equal(a, b)
    ref = torch.zeros(2, 4, 3, 3, dtype=torch.float64)
    n = randn_like(ref, PretendCudaGenerator().manual_seed(4))
    assert n.dtype == torch.float64 and n.shape == ref.shape
    assert len(strict_draws) == 3


def _tiny_vqgan_task(adversarial_start_step=0):
    from gl_lcm.config import load_config
    from gl_lcm.losses import VQGANLoss
    from gl_lcm.models.factory import build_discriminator, build_vqgan
    from gl_lcm.train.vqgan import VQGANTask

    cfg = load_config(None, ["vqgan.channels=[4,8]", "vqgan.num_res_blocks=1", "vqgan.codebook_size=16",
                             "vqgan.attn_at_bottom=false", "vqgan.disc_channels=4", "vqgan.dead_code_steps=1",
                             "vqgan.perceptual_weight=0", "device=cpu"])
    torch.manual_seed(0)
    task = VQGANTask(cfg)
    task.vqgan, task.disc = build_vqgan(cfg.vqgan).train(), build_discriminator(cfg.vqgan).train()
    nets = {"vqgan": task.vqgan, "disc": task.disc}
    task.trainer = SimpleNamespace(net=lambda name: nets[name], device=torch.device("cpu"))
    v = cfg.vqgan
    task.loss = VQGANLoss(msssim_weight=v.msssim_weight, perceptual_weight=0.0,
                          adversarial_weight=v.adversarial_weight, adversarial_start_step=adversarial_start_step)
    task.vqgan.quantizer.steps_since_used.fill_(100)  # every code dead: the restart draws run
    return task


def test_vqgan_micro_step_draws_only_on_the_generators_device(strict_draws):
    """Issue 20: train-vqgan on CUDA drew torch.randint(generator=<cuda generator>) on the CPU."""
    task = _tiny_vqgan_task()
    batch = {"image": torch.rand(2, 1, 32, 32) * 2 - 1}
    loss, logs = task.micro_step(batch, step=1, generator=PretendCudaGenerator().manual_seed(7))
    assert torch.isfinite(loss) and "adversarial" in logs
    assert "randint" in strict_draws  # the restart seed came from the step generator, on its device
    loss.backward()


def test_vqgan_micro_step_is_unchanged_with_a_cpu_generator():
    """The restart seed is the same number as before the helpers (exact resume across the change)."""
    task = _tiny_vqgan_task()
    seen = []
    quantizer_forward = task.vqgan.quantizer.forward

    def spy(z, generator=None):
        seen.append(generator.initial_seed())
        return quantizer_forward(z, generator=generator)

    task.vqgan.quantizer.forward = spy
    task.micro_step({"image": torch.zeros(2, 1, 32, 32)}, step=1, generator=torch.Generator().manual_seed(7))
    assert seen == [int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(7)))]


def test_ldm_micro_step_draws_only_on_the_generators_device(strict_draws):
    from gl_lcm.config import load_config
    from gl_lcm.diffusion.schedule import alphas_cumprod_from_betas, make_betas
    from gl_lcm.train.ldm import LDMTask

    cfg = load_config(None, ["diffusion.cond_dropout=0.1", "diffusion.offset_noise=0.1"])
    d = cfg.diffusion
    task = LDMTask.__new__(LDMTask)
    task.cfg = cfg
    task.alphas_cumprod = alphas_cumprod_from_betas(make_betas(d.beta_schedule, d.num_train_timesteps, d.beta_start,
                                                               d.beta_end))
    task.trainer = SimpleNamespace(net=lambda name: (lambda x, t, c: 0.5 * x + 0.1 * c))
    batch = {"target": torch.randn(3, 4, 8, 8), "cond": torch.randn(3, 4, 8, 8)}
    loss, _ = task.micro_step(batch, step=1, generator=PretendCudaGenerator().manual_seed(3))
    assert torch.isfinite(loss)
    assert strict_draws.count("randn") == 2 and "randint" in strict_draws and "rand" in strict_draws


def test_no_direct_generator_draws_in_training_code():
    """Every draw with a passed generator goes through gl_lcm.utils.seeding (one place decides the device)."""
    files = [*sorted((REPO / "gl_lcm" / "train").glob("*.py")), *sorted((REPO / "gl_lcm" / "models").glob("*.py")),
             REPO / "gl_lcm" / "data" / "augment.py", REPO / "gl_lcm" / "losses.py",
             REPO / "gl_lcm" / "diffusion" / "schedule.py", REPO / "gl_lcm" / "diffusion" / "distill.py"]
    pattern = re.compile(r"torch\.(randn|rand|randint|randperm|normal|bernoulli|multinomial)\(.*generator=")
    offenders = [f"{f.relative_to(REPO)}: {line.strip()}" for f in files
                 for line in f.read_text().splitlines() if pattern.search(line)]
    assert offenders == []
