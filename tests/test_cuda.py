"""CUDA-only checks not tied to one module (run by benchmarks/gpu_check.sh via `pytest -m cuda`):
DDP over nccl on one rank gives the gradients of the plain module; bf16 autocast training step of the
trainer's kind runs. Every test here skips without CUDA."""
from __future__ import annotations

import socket

import pytest
import torch

pytestmark = pytest.mark.cuda


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_nccl_one_rank_matches_plain_module():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 1, 3)).to(dev)
    x = torch.randn(4, 1, 16, 16, device=dev)
    net(x).square().mean().backward()
    plain = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(net, device_ids=[0])
        ddp(x).square().mean().backward()
        for a, b in zip(plain, [p.grad for p in net.parameters()]):
            torch.testing.assert_close(a, b)
        t = torch.ones(3, device=dev)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


def test_bf16_autocast_training_step():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from gl_lcm.config import load_config
    from gl_lcm.models.factory import build_unet

    cfg = load_config(None, ["unet.model_channels=16", "unet.channel_mult=[1,2]", "unet.num_res_blocks=1",
                             "unet.attention_resolutions=[8]", "unet.latent_size=16", "unet.num_heads=2"])
    dev = torch.device("cuda")
    unet = build_unet(cfg.unet, 4).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    x = torch.randn(4, 4, 16, 16, device=dev)
    t = torch.randint(0, 1000, (4,), device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = (unet(x, t, x) - x).square().mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in unet.parameters())
