"""Tests for gl_lcm.models: layers, VQGAN + quantiser, UNet, discriminator, segmentation net."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gl_lcm.models import (
    VQGAN,
    CodebookUsageMeter,
    LungSegNet,
    PatchDiscriminator,
    UNet,
    VectorQuantizer,
    codebook_usage,
    count_parameters,
    estimate_latent_scale,
)
from gl_lcm.models.layers import (
    AttentionBlock,
    ResBlock,
    multi_head_attention,
    num_groups_for,
    timestep_embedding,
)


def _randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Overwrite every parameter with noise (zero-initialised layers would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ----------------------------------------------------------------------------- layers


def test_num_groups_for():
    assert num_groups_for(128) == 32
    assert num_groups_for(16) == 16
    assert num_groups_for(48) == 24
    assert num_groups_for(3) == 3
    assert num_groups_for(1) == 1


def test_timestep_embedding_matches_formula():
    t = torch.tensor([0, 3, 999])
    emb = timestep_embedding(t, 6)
    half = 3
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    ref = np.concatenate([np.cos(t.numpy()[:, None] * freqs), np.sin(t.numpy()[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(emb.numpy(), ref, rtol=1e-5, atol=1e-5)
    assert timestep_embedding(torch.tensor([2.5]), 7).shape == (1, 7)


def _naive_attention(q, k, v, heads):
    b, c, t = q.shape
    hd = c // heads
    out = torch.empty_like(q)
    for bi in range(b):
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            scores = q[bi, sl].T @ k[bi, sl] / math.sqrt(hd)  # T x T
            out[bi, sl] = (torch.softmax(scores, dim=-1) @ v[bi, sl].T).T
    return out


def test_multi_head_attention_matches_naive_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 10, generator=g) for _ in range(3))
    torch.testing.assert_close(multi_head_attention(q, k, v, 3), _naive_attention(q, k, v, 3), rtol=1e-5, atol=1e-5)


def test_attention_block_matches_manual_composition_and_starts_as_identity():
    block = AttentionBlock(8, num_heads=2)
    x = torch.randn(2, 8, 4, 5)
    torch.testing.assert_close(block(x), x)  # zero-initialised output projection
    _randomize(block, std=0.3)
    tokens = x.reshape(2, 8, 20)
    normed = F.group_norm(tokens, 8, block.norm.weight, block.norm.bias, block.norm.eps)
    qkv = torch.einsum("oc,bct->bot", block.qkv.weight[:, :, 0], normed) + block.qkv.bias[None, :, None]
    q, k, v = qkv[:, :8], qkv[:, 8:16], qkv[:, 16:]
    attn = _naive_attention(q, k, v, 2)
    proj = torch.einsum("oc,bct->bot", block.proj_out.weight[:, :, 0], attn) + block.proj_out.bias[None, :, None]
    torch.testing.assert_close(block(x), (tokens + proj).reshape_as(x), rtol=1e-4, atol=1e-5)


def test_attention_block_num_head_channels():
    assert AttentionBlock(64, num_heads=8, num_head_channels=16).num_heads == 4
    with pytest.raises(ValueError, match="divisible"):
        AttentionBlock(10, num_heads=3)


def test_resblock_shapes_identity_init_and_scale_shift():
    x = torch.randn(2, 8, 8, 8)
    emb = torch.randn(2, 12)
    plain = ResBlock(8, 8)
    torch.testing.assert_close(plain(x), x)  # zero-init out conv + identity skip
    assert ResBlock(8, 16, 12, use_scale_shift_norm=True, down=True)(x, emb).shape == (2, 16, 4, 4)
    assert ResBlock(8, 4, 12, up=True)(x, emb).shape == (2, 4, 16, 16)
    block = ResBlock(8, 8, 12, use_scale_shift_norm=True)
    _randomize(block, std=0.2)
    assert not torch.allclose(block(x, emb), block(x, torch.zeros_like(emb)))  # embedding is used
    with pytest.raises(ValueError, match="emb"):
        block(x)


def test_resblock_checkpointing_same_result_and_gradients():
    a = ResBlock(8, 16, 12, use_scale_shift_norm=True)
    _randomize(a, std=0.2)
    b = ResBlock(8, 16, 12, use_scale_shift_norm=True, use_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    outs = []
    for m in (a, b):
        m.train()
        m.zero_grad()
        y = m(x, emb)
        (y**2).sum().backward()
        outs.append((y.detach(), m.in_conv.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


# ----------------------------------------------------------------------------- quantiser


def _quantizer(codes, **kw) -> VectorQuantizer:
    codes = torch.as_tensor(codes, dtype=torch.float32)
    vq = VectorQuantizer(codes.shape[0], codes.shape[1], **kw)
    vq.reset_codebook(codes)
    return vq


def _as_latent(vectors) -> torch.Tensor:
    """N x D vectors -> 1 x D x 1 x N latent (token order preserved)."""
    v = torch.as_tensor(vectors, dtype=torch.float32)
    return v.T[None, :, None, :].contiguous()


def test_quantizer_nearest_codes_and_commitment_beta_scaling():
    codes = [[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]]
    z_vecs = [[0.1, 0.2], [0.9, 1.3], [-0.8, 1.5], [2.0, 2.0]]
    expected_idx = [0, 1, 2, 1]
    e = torch.tensor(codes)[expected_idx]
    mse = ((torch.tensor(z_vecs) - e) ** 2).mean()
    for use_ema, factor in ((True, 0.3), (False, 1.0 + 0.3)):
        vq = _quantizer(codes, beta=0.3, use_ema=use_ema).eval()
        z_q, loss, info = vq(_as_latent(z_vecs))
        assert info["indices"].reshape(-1).tolist() == expected_idx
        torch.testing.assert_close(loss, factor * mse)  # EMA drops the codebook term
        torch.testing.assert_close(z_q, _as_latent(e.tolist()))


def test_quantizer_straight_through_gradient():
    vq = _quantizer([[0.0, 0.0], [1.0, 1.0]]).eval()
    z = _as_latent([[0.2, 0.1], [0.7, 0.9], [3.0, 1.0]]).requires_grad_(True)
    z_q, _, _ = vq(z)
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)


def test_vqgan_gradient_reaches_encoder():
    model = VQGAN(channels=(8, 16), num_res_blocks=1, codebook_size=16)
    recon, quant_loss, _ = model(torch.rand(1, 1, 16, 16) * 2 - 1)
    (recon.square().mean() + quant_loss).backward()
    assert model.encoder.conv_in.weight.grad is not None
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_ema_update_moves_code_towards_assigned_outputs():
    codes = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    decay, eps = 0.9, 1e-5
    vq = _quantizer(codes, ema_decay=decay, ema_eps=eps, dead_code_threshold_steps=None).train()
    z_vecs = torch.tensor([[1.0, 0.5], [1.5, 1.0], [0.5, 1.5], [1.0, 1.0]])  # all nearest to code 0
    vq(_as_latent(z_vecs))
    # independent reference: EMA of counts and sums, Laplace-smoothed counts
    cs = torch.tensor([decay * 1 + (1 - decay) * 4, decay * 1 + 0.0])
    es = torch.stack([decay * codes[0] + (1 - decay) * z_vecs.sum(0), decay * codes[1]])
    n = cs.sum()
    smoothed = (cs + eps) / (n + 2 * eps) * n
    torch.testing.assert_close(vq.codebook.detach(), es / smoothed[:, None])
    mean = z_vecs.mean(0)
    assert (vq.codebook[0] - mean).norm() < (codes[0] - mean).norm()
    torch.testing.assert_close(vq.codebook[1].detach(), codes[1], rtol=1e-4, atol=1e-4)  # unused code stays
    # eval mode never updates
    before = vq.codebook.detach().clone()
    vq.eval()(_as_latent(z_vecs))
    torch.testing.assert_close(vq.codebook.detach(), before)


def test_non_ema_codebook_is_trained_by_gradient():
    vq = _quantizer([[0.0, 0.0], [5.0, 5.0]], use_ema=False)
    assert vq.codebook.requires_grad
    _, loss, _ = vq(_as_latent([[1.0, 1.0]]))
    loss.backward()
    assert vq.codebook.grad[0].abs().sum() > 0 and vq.codebook.grad[1].abs().sum() == 0


@pytest.mark.parametrize("use_ema", [True, False])
def test_dead_code_restart_replaces_unused_codes(use_ema):
    codes = torch.tensor([[0.0, 0.0], [100.0, 100.0], [200.0, -200.0]])
    vq = _quantizer(codes, use_ema=use_ema, dead_code_threshold_steps=3).train()
    g = torch.Generator().manual_seed(1)
    z_vecs = torch.randn(32, 2, generator=g) * 0.5  # all nearest to code 0
    z = _as_latent(z_vecs)
    for _ in range(2):
        vq(z, generator=g)
    torch.testing.assert_close(vq.codebook[1:].detach(), codes[1:], rtol=1e-3, atol=1e-3)
    assert vq.steps_since_used.tolist() == [0, 2, 2]
    vq(z, generator=g)  # third step without use: codes 1 and 2 restart from encoder outputs
    for k in (1, 2):
        dists = (z_vecs - vq.codebook[k].detach()).norm(dim=1)
        assert dists.min() < 1e-6, "restarted code must be one of the current encoder outputs"
    assert vq.steps_since_used.tolist() == [0, 0, 0]
    if use_ema:
        torch.testing.assert_close(vq.ema_embed_sum[1:], vq.codebook[1:].detach())
        assert vq.ema_cluster_size[1:].tolist() == [1.0, 1.0]


def test_codebook_usage_hand_examples():
    assert codebook_usage(torch.tensor([2, 2, 0, 0])) == pytest.approx((0.5, 2.0))
    assert codebook_usage(torch.tensor([1, 1, 1, 1])) == pytest.approx((1.0, 4.0))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert codebook_usage(torch.tensor([3, 1, 0, 0, 0])) == pytest.approx((0.4, math.exp(entropy)))
    assert codebook_usage(torch.zeros(3)) == (0.0, 0.0)


def test_quantizer_usage_info_and_meter():
    vq = _quantizer([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0], [9.0, 9.0]]).eval()
    _, _, info = vq(_as_latent([[0.1, 0.0], [0.0, 0.1], [1.1, 1.0], [0.9, 1.0]]))
    assert info["used_fraction"] == pytest.approx(0.5)
    assert info["perplexity"] == pytest.approx(2.0)
    meter = CodebookUsageMeter(4)
    meter.update(info["indices"])
    _, _, info2 = vq(_as_latent([[5.0, 5.1], [0.0, 0.0]]))
    meter.update(info2["indices"])
    stats = meter.compute()
    p = np.array([3, 2, 1, 0]) / 6
    assert stats["num_used"] == 3 and stats["used_fraction"] == pytest.approx(0.75)
    assert stats["perplexity"] == pytest.approx(math.exp(-(p[:3] * np.log(p[:3])).sum()))
    meter.reset()
    assert meter.compute()["num_used"] == 0


def _ddp_worker(rank: int, world: int, init_file: str, result_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        codes = torch.tensor([[0.0, 0.0], [4.0, 4.0], [100.0, 100.0]])
        vq = _quantizer(codes, ema_decay=0.8, dead_code_threshold_steps=2, seed=rank).train()
        g = torch.Generator().manual_seed(100 + rank)  # different data and generators per rank
        for _ in range(3):
            vq(_as_latent(torch.randn(16, 2, generator=g) + 2.0 * rank), generator=g)
        torch.save({"codebook": vq.codebook.detach(), "cs": vq.ema_cluster_size}, f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_quantizer_ddp_ranks_keep_identical_codebooks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.testing.assert_close(r0["codebook"], r1["codebook"], rtol=0, atol=0)
    torch.testing.assert_close(r0["cs"], r1["cs"], rtol=0, atol=0)
    assert not torch.allclose(r0["codebook"][2], torch.tensor([100.0, 100.0]))  # dead code restarted


# ----------------------------------------------------------------------------- VQGAN


@pytest.mark.parametrize("channels,latent_hw", [((16, 32), 8), ((16, 32, 64), 4)])
def test_vqgan_shapes_and_round_trip(channels, latent_hw):
    model = VQGAN(channels=channels, num_res_blocks=1, codebook_size=32).eval()
    assert model.num_downsamplings == len(channels)
    assert model.latent_shape(64) == (4, 2 * latent_hw, 2 * latent_hw)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    recon, quant_loss, info = model(x)
    assert recon.shape == x.shape and quant_loss.ndim == 0
    assert info["indices"].shape == (2, latent_hw, latent_hw)
    z = model.encode(x)
    assert z.shape == (2, 4, latent_hw, latent_hw)
    assert model.decode(z).shape == x.shape
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.zeros(1, 1, 30, 32))


def test_vqgan_paper_setting_latent_shape():
    with torch.device("meta"):
        model = VQGAN()  # channels (128, 256, 512), embed_dim 4, 1024 codes
    assert model.num_downsamplings == 3
    assert model.latent_shape(1024) == (4, 128, 128)
    assert model.latent_shape((1024, 512)) == (4, 128, 64)
    assert model.quantizer.codebook.shape == (1024, 4)


def test_vqgan_latent_scale_buffer_and_scaled_round_trip():
    model = VQGAN(channels=(8, 16), num_res_blocks=1, codebook_size=16).eval()
    _randomize(model, std=0.1)
    assert "latent_scale" in model.state_dict()
    model.latent_scale.fill_(2.5)
    restored = VQGAN(channels=(8, 16), num_res_blocks=1, codebook_size=16)
    restored.load_state_dict(model.state_dict())
    assert float(restored.latent_scale) == 2.5
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        z_unscaled = model.encode_unscaled(x)
        torch.testing.assert_close(model.encode(x), 2.5 * z_unscaled)
        torch.testing.assert_close(model.decode(model.encode(x)), model.decode_unscaled(z_unscaled))
        # requantisation snaps perturbed latents back onto the codes
        torch.testing.assert_close(
            model.decode_unscaled(z_unscaled + 1e-4), model.decode_unscaled(z_unscaled), rtol=1e-4, atol=1e-5
        )
    batches = [torch.rand(2, 1, 16, 16) * 2 - 1 for _ in range(3)]
    scale = estimate_latent_scale(model, batches)
    with torch.no_grad():
        all_z = torch.cat([model.encode_unscaled(b) for b in batches]).double()
    assert scale == pytest.approx(1 / all_z.std().item(), rel=1e-6)


def test_vqgan_encode_does_not_update_codebook_in_train_mode():
    model = VQGAN(channels=(8, 16), num_res_blocks=1, codebook_size=16).train()
    before = model.quantizer.codebook.detach().clone()
    model.encode(torch.rand(1, 1, 16, 16))
    torch.testing.assert_close(model.quantizer.codebook.detach(), before)
    model(torch.rand(1, 1, 16, 16))
    assert not torch.equal(model.quantizer.codebook.detach(), before)


# ----------------------------------------------------------------------------- UNet


def test_unet_paper_config_parameter_count():
    with torch.device("meta"):
        model = UNet(
            in_channels=8,
            out_channels=4,
            model_channels=128,
            channel_mult=(1, 1, 2, 2, 4, 4),
            num_res_blocks=8,
            attention_downsample_factors=(8, 16, 32),  # 16x16, 8x8, 4x4 for a 128x128 latent
            num_heads=8,
            use_scale_shift_norm=True,
            resblock_updown=True,
        )
    n = count_parameters(model)
    print(f"paper UNet parameters: {n:,}")
    assert 375e6 <= n <= 390e6


def _tiny_unet(**kw) -> UNet:
    args = dict(
        in_channels=8, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
        attention_downsample_factors=(2,), num_heads=2,
    )
    args.update(kw)
    return UNet(**args)


def test_tiny_unet_forward_backward_all_parameters_get_gradients():
    model = _tiny_unet()
    _randomize(model, std=0.05)
    x_t, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = model(x_t, torch.tensor([10, 500]), cond)
    assert out.shape == (2, 4, 8, 8)
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []
    with torch.no_grad():
        assert not torch.allclose(model(x_t, torch.tensor([10, 500]), cond), model(x_t, torch.tensor([10, 500]), -cond))
        assert not torch.allclose(model(x_t, 10, cond), model(x_t, 900, cond))  # t is used
        torch.testing.assert_close(model(x_t, 10, cond), model(x_t, torch.tensor([10.0, 10.0]), cond))


def test_unet_fresh_output_is_zero_and_checkpointing_matches():
    x_t, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert torch.equal(_tiny_unet(resblock_updown=False)(x_t, 3, cond), torch.zeros(1, 4, 8, 8))
    a = _tiny_unet()
    _randomize(a)
    b = _tiny_unet(gradient_checkpointing=True)
    b.load_state_dict(a.state_dict())
    a.train(), b.train()
    ya, yb = a(x_t, 3, cond), b(x_t, 3, cond)
    ya.sum().backward(), yb.sum().backward()
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(a.time_embed[0].weight.grad, b.time_embed[0].weight.grad)


def test_unet_argument_errors():
    with pytest.raises(ValueError, match="not reachable"):
        _tiny_unet(attention_downsample_factors=(64,))
    model = _tiny_unet()
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 4, 7, 8), 1, torch.randn(1, 4, 7, 8))


# ----------------------------------------------------------------------------- discriminator, segnet


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
def test_patch_discriminator_output_shape(norm):
    d = PatchDiscriminator(in_channels=1, base_channels=64, n_layers=3, norm=norm)
    assert d(torch.randn(2, 1, 64, 64)).shape == (2, 1, 6, 6)  # 64/8 - 2
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]


def test_patch_discriminator_unknown_norm():
    with pytest.raises(ValueError, match="unknown norm"):
        PatchDiscriminator(norm="weird")


@pytest.mark.parametrize("base,depth,size", [(16, 4, 64), (32, 3, 40), (16, 4, 48)])
def test_segnet_shape(base, depth, size):
    net = LungSegNet(base_channels=base, depth=depth)
    assert net(torch.randn(2, 1, size, size)).shape == (2, 1, size, size)


def test_segnet_rejects_indivisible_size():
    with pytest.raises(ValueError, match="divisible by 16"):
        LungSegNet(depth=4)(torch.randn(1, 1, 40, 40))
