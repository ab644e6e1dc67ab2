"""Importing the published checkpoints: pickled whole modules (and plain state dicts) in the published
class paths and key layout become gl-lcm checkpoints that compute the same outputs; crafted pickles
are refused without running anything."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gl_lcm.config import load_config
from gl_lcm.models.factory import load_denoiser, load_vqgan
from gl_lcm.models.reference_import import import_reference, load_published, read_safetensors_config
from gl_lcm.models.published_standins import published_unet, published_vqvae

REPO = Path(__file__).resolve().parents[1]


def _unet_outputs(pub, ours, seed=0, b=2, size=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, pub.in_channels, size, size, generator=g)
    t = torch.tensor([999, 37][:b])
    with torch.no_grad():
        return pub(x, t), ours(x[:, :pub.in_channels // 2], t, x[:, pub.in_channels // 2:])


# a paper-like layout and a different one (never assume the paper's sizes)
UNET_VARIANTS = {
    "paper_like": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,), num_heads=2),
    "other": dict(model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=2, attention_ds=(1, 4), num_heads=4,
                  resblock_updown=False),
}


@pytest.mark.parametrize("variant", sorted(UNET_VARIANTS))
def test_pickled_unet_imports_with_same_outputs(tmp_path, variant, capsys):
    kw = UNET_VARIANTS[variant]
    pub = published_unet(**kw)
    torch.save(pub, tmp_path / "UNet.pth")  # whole module, as the published lcm_train.py
    result = import_reference(tmp_path / "UNet.pth", None, tmp_path / "out")
    text = "\n".join(result["summary"])
    assert "UNetModel x1" in text and "ResBlock x" in text and "4 output channels dropped" in text
    ours, cfg = load_denoiser(result["paths"]["unet"])
    a, b = _unet_outputs(pub, ours)
    torch.testing.assert_close(b, a[:, :4], atol=1e-5, rtol=1e-5)
    assert torch.equal(a[:, 4:], torch.zeros_like(a[:, 4:]))  # the sliced-off channels are exactly 0
    assert cfg.unet.channel_mult == list(kw["channel_mult"])
    assert cfg.unet.num_res_blocks == kw["num_res_blocks"] and cfg.unet.num_heads == kw["num_heads"]
    assert cfg.unet.resblock_updown == kw.get("resblock_updown", True)
    assert sorted(cfg.unet.latent_size // r for r in cfg.unet.attention_resolutions) == sorted(kw["attention_ds"])
    meta = read_safetensors_config(result["paths"]["unet_safetensors"])
    assert meta["kind"] == "ldm" and meta["config"]["unet"] == result["config"].unet.__dict__


def test_pickled_vqvae_imports_with_same_outputs(tmp_path):
    pub = published_vqvae()
    assert type(pub).__module__ == "generative.networks.nets.vqvae"  # pickled under the published path
    torch.save(pub, tmp_path / "VQGAN.pth")
    result = import_reference(None, tmp_path / "VQGAN.pth", tmp_path / "out")
    ours = load_vqgan(result["paths"]["vqgan"])
    cfg = result["config"].vqgan
    assert (cfg.arch, cfg.channels, cfg.res_channels, cfg.ema_decay) == ("monai_vqvae", [32, 64, 64], 32, 0.5)
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z_pub, z = pub.encode_stage_2_inputs(x), ours.encode(x)
        torch.testing.assert_close(z, z_pub, atol=1e-5, rtol=1e-5)
        w = z_pub + 0.3 * torch.randn_like(z_pub)  # a sampled latent: off the codebook
        torch.testing.assert_close(ours.decode(w, requantize=False), pub.decode(w), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(w, requantize=True), pub.decode(pub.quantize(w)[0]), atol=1e-5,
                                   rtol=1e-5)
        assert not torch.allclose(ours.decode(w, requantize=True), pub.decode(w), atol=1e-3)
        rec_pub, q_pub = pub(x)
        rec, q, info = ours(x)
        torch.testing.assert_close(rec, rec_pub, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(q, q_pub, atol=1e-6, rtol=1e-5)


def test_plain_state_dicts_import(tmp_path):
    pub_u, pub_v = published_unet(seed=3), published_vqvae(seed=3)
    torch.save(pub_u.state_dict(), tmp_path / "u.pth")
    torch.save(pub_v.state_dict(), tmp_path / "v.pth")
    with pytest.raises(ValueError, match="--num-heads"):
        import_reference(tmp_path / "u.pth", None, tmp_path / "x")
    result = import_reference(tmp_path / "u.pth", tmp_path / "v.pth", tmp_path / "out", num_heads=2)
    ours, _ = load_denoiser(result["paths"]["unet"])
    a, b = _unet_outputs(pub_u, ours)
    torch.testing.assert_close(b, a[:, :4], atol=1e-5, rtol=1e-5)
    x = torch.rand(1, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(load_vqgan(result["paths"]["vqgan"]).encode(x), pub_v.encode_stage_2_inputs(x))


def test_swapped_files_are_named(tmp_path):
    torch.save(published_vqvae(), tmp_path / "v.pth")
    with pytest.raises(ValueError, match="not a guided-diffusion UNetModel"):
        import_reference(tmp_path / "v.pth", None, tmp_path / "out")


# ------------------------------------------------------------------------------ crafted pickles
class _Payload:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _payloads(marker: Path):
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": (os.system, f"touch {marker}"),
        "eval": (eval, touch),
        "exec": (exec, touch),
        "subprocess": (subprocess.check_call, ["touch", str(marker)]),
    }


@pytest.mark.parametrize("name", ["os.system", "eval", "exec", "subprocess"])
@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle", "inside_module"])
def test_crafted_pickle_is_refused_and_nothing_runs(tmp_path, name, container):
    marker = tmp_path / "pwned"
    func, arg = _payloads(marker)[name]
    path = tmp_path / "evil.pth"
    if container == "torch_zip":
        torch.save({"state_dict": _Payload(func, arg)}, path)
    elif container == "raw_pickle":
        path.write_bytes(pickle.dumps(_Payload(func, arg), protocol=2))
    else:  # a published-looking module with the payload hidden in an attribute
        m = published_unet()
        m.hidden = _Payload(func, arg)
        torch.save(m, path)
    with pytest.raises(ValueError, match=r"refused to load: the file asks for '[\w.]+'.*nothing from it was run"):
        import_reference(path, None, tmp_path / "out")
    with pytest.raises(ValueError, match="refused"):
        load_published(path)
    assert not marker.exists()
    assert not (tmp_path / "out" / "unet.pt").exists()


def test_marker_payload_really_runs_with_plain_pickle(tmp_path):
    """Control: the same payload does run when unpickled the ordinary way (so the test above can fail)."""
    marker = tmp_path / "pwned"
    func, arg = _payloads(marker)["exec"]
    pickle.loads(pickle.dumps(_Payload(func, arg)))
    assert marker.exists()


def test_models_do_not_import_training():
    code = ("import sys; import gl_lcm.models.factory, gl_lcm.models.reference_import; "
            "bad = [m for m in sys.modules if m.startswith('gl_lcm.train')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})


def test_monai_vqvae_trains_with_our_loss_and_keeps_scale_one(tmp_path):
    """vqgan.arch=monai_vqvae goes through the VQGAN trainer (published loss terms) and stays unscaled."""
    from gl_lcm.data.phantom import write_phantom_dataset
    from gl_lcm.train.vqgan import train_vqgan

    write_phantom_dataset(tmp_path / "data", n=6, size=32, seed=0, progress=False)
    cfg = load_config(None, [f"data.root={tmp_path / 'data'}", "data.image_size=32", "vqgan.arch=monai_vqvae",
                             "vqgan.channels=[8,8]", "vqgan.res_channels=8", "vqgan.num_res_blocks=1",
                             "vqgan.codebook_size=16", "vqgan.ema_decay=0.5", "vqgan.perceptual_weight=0",
                             "vqgan.adversarial_start_step=0", "vqgan.disc_channels=8", "vqgan.disc_layers=1",
                             f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3", "train.batch_size=2",
                             "train.val_every=3", "train.ckpt_every=3", "train.ema_decay=0",
                             "device=cpu"])
    train_vqgan(cfg, resume="none", progress=False)
    model = load_vqgan(tmp_path / "run" / "model.pt")
    assert type(model).__name__ == "PublishedVQVAE" and float(model.latent_scale) == 1.0
    before = published_vqvae(channels=(8, 8), res_channels=8, num_res_layers=1, codebook_size=16)
    assert set(model.state_dict()) == set(before.state_dict())  # the published key layout
