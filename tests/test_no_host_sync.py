"""The dual-path sampling loop never synchronises with the host.

On a GPU, reading a value back (``.item()``, ``.cpu()``, ``float(tensor)``, ``.tolist()``) or copying
host memory to the device inside the loop makes the CPU wait for every queued kernel at each step.
This test runs the real loop with its latents on PyTorch's ``meta`` device (shapes only, no data),
which stands in for the GPU on a CPU-only machine: from the first model call on, every read-back and
every copy from a CPU tensor to another device raises. Setup before the loop (drawing the noise,
the clip ranges, the timesteps) may copy; the loop may not.
"""
from __future__ import annotations

import pytest
import torch

from gl_lcm.diffusion.lcm import DynamicClip, LCMScheduler
from gl_lcm.diffusion.noise import PerImageNoise, image_generators
from gl_lcm.diffusion.samplers import sample_dual_path


class HostSyncGuard:
    """Makes host synchronisations raise once ``armed`` (set by the model's first call)."""

    def __init__(self, monkeypatch):
        self.armed = False
        self.caught = []
        real_to = torch.Tensor.to

        def forbid(name, real):
            def wrapper(t, *args, **kwargs):
                if self.armed:
                    self.caught.append(name)
                    raise AssertionError(f"host synchronisation inside the sampling loop: Tensor.{name}")
                return real(t, *args, **kwargs)
            return wrapper

        for name in ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__"):
            monkeypatch.setattr(torch.Tensor, name, forbid(name, getattr(torch.Tensor, name)))

        def to(t, *args, **kwargs):
            if self.armed and t.device.type == "cpu":
                target = next((a for a in args if isinstance(a, (torch.device, str))), kwargs.get("device"))
                if target is not None and torch.device(target).type != "cpu":
                    self.caught.append("to")
                    raise AssertionError("host-to-device copy inside the sampling loop: Tensor.to")
            return real_to(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", to)


@pytest.mark.parametrize("guidance", ["vanilla", "cfg", "leg"])
def test_sampling_loop_has_no_host_synchronisation(monkeypatch, guidance):
    guard = HostSyncGuard(monkeypatch)
    b, shape = 2, (4, 8, 8)
    calls = []

    def model(x, t, cond):
        guard.armed = True  # the loop has begun
        calls.append(x.shape)
        return torch.zeros_like(x)

    cond = torch.zeros(b, *shape, device="meta")
    scheduler = LCMScheduler(prediction_type="epsilon")
    clip = DynamicClip((2.0,) * b + (3.5,) * b, 0.025)
    noise = PerImageNoise(image_generators(0, ["a", "b"]), shape, "meta")
    z_g, z_l = sample_dual_path(model, scheduler, cond, cond, 4, noise, guidance_mode=guidance,
                                clip_range_fn=clip)
    assert len(calls) == 4 and guard.caught == []
    assert z_g.device.type == "meta" and z_g.shape == (b, *shape) == z_l.shape


def test_the_guard_catches_a_host_synchronisation(monkeypatch):
    """The guard is sharp: a loop that copies a CPU tensor to the device or reads a value back is refused."""
    cond = torch.zeros(1, 4, 8, 8, device="meta")
    for bad in (lambda x: torch.zeros_like(x) + torch.ones(1).to(x.device), lambda x: x * float(torch.ones(1).sum())):
        guard = HostSyncGuard(monkeypatch)

        def model(x, t, c, bad=bad, guard=guard):
            guard.armed = True
            return bad(x)

        noise = PerImageNoise(image_generators(0, ["a"]), (4, 8, 8))
        with pytest.raises(AssertionError, match="inside the sampling loop"):
            sample_dual_path(model, LCMScheduler(), cond, cond, 2, noise, guidance_mode="vanilla")
        monkeypatch.undo()
