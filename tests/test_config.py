"""Config: unknown keys with suggestions, validation, dotted overrides, YAML round trips, shipped files."""
from pathlib import Path

import pytest
import yaml

from gl_lcm.config import Config, ConfigError, from_dict, load_config, save_config, to_dict, to_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.batch_size=8", "data.image_size=512", "unet.channel_mult=[1,2]",
                             "guidance.mode=cfg", "lcm.clip_b=0.5"])
    assert cfg.train.batch_size == 8 and cfg.data.image_size == 512
    assert cfg.unet.channel_mult == [1, 2] and cfg.guidance.mode == "cfg" and cfg.lcm.clip_b == 0.5
    assert load_config().train.batch_size == Config().train.batch_size


def test_unknown_key_names_it_and_suggests(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("train:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.batch_sise' in .*x.yaml; did you mean 'train.batch_size'"):
        load_config(p)
    p.write_text("trian:\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"'trian'.*did you mean 'train'"):
        load_config(p)
    with pytest.raises(ConfigError, match="unknown config key 'lcm.omega_global'"):
        load_config(None, ["lcm.omega_global=2"])


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "must be >= 1"),
    ("train.batch_size=2.5", "must be an integer"),
    ("guidance.mode=strong", "must be one of"),
    ("data.allow_unpaired=maybe", "must be true or false"),
    ("train.ema_decay=1.5", "must be <= 1.0"),
    ("unet.channel_mult=[1, a]", "must be a list of int"),
    ("train.lr", "must look like section.key=value"),
])
def test_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["train.lr=0.003", "vqgan.channels=[8,16]", "checkpoints.vqgan=a/b.pt"])
    path = tmp_path / "effective.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert from_dict(Config, yaml.safe_load(to_yaml(cfg))) == cfg
    assert from_dict(Config, to_dict(cfg)) == cfg
    # every key is written with its help text as a comment
    text = path.read_text()
    assert "batch_size: 4  # images per GPU/process per micro-batch" in text


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_document_every_key(path):
    load_config(path)
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in stripped, f"{path.name}: key without a comment: {line!r}"


@pytest.mark.parametrize("overrides, message", [
    (["lcm.num_inference_steps=60"], r"lcm.num_inference_steps=60 is greater than lcm.original_inference_steps=50"),
    (["diffusion.beta_start=0.5", "diffusion.beta_end=0.1"],
     r"diffusion.beta_start=0.5 must be smaller than diffusion.beta_end=0.1"),
    (["diffusion.beta_start=0.012"], r"diffusion.beta_start=0.012 must be smaller than diffusion.beta_end=0.012"),
    (["data.image_size=1001"], r"data.image_size=1001 is not divisible by 2\^3=8 .*vqgan.channels"),
    (["data.image_size=100", "vqgan.channels=[4,4,4,4]"], r"data.image_size=100 is not divisible by 2\^4=16"),
    (["lcm.global_omega=0"], r"lcm.global_omega=0.0 must be positive while lcm.dynamic_clip is true"),
    (["lcm.local_omega=0"], r"lcm.local_omega=0.0 must be positive"),
    (["segmentation.image_size=100"], r"segmentation.image_size=100 is not divisible by 2\^segmentation.depth=16"),
    (["lcm.step_schedules=[[999, 999]]"], r"lcm.step_schedules entry \[999, 999\].*strictly descending"),
    (["diffusion.num_train_timesteps=500", "lcm.step_schedules=[[999, 99]]"],
     r"lcm.step_schedules entry \[999, 99\].*within \[0, 499\].*diffusion.num_train_timesteps=500"),
    (["lcm.step_schedules=[[999, 99], [899, 9]]"], r"lcm.step_schedules=.*two schedules of the same length"),
])
def test_cross_checks_name_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_cross_checks_accept_consistent_settings():
    load_config(None, ["lcm.num_inference_steps=50", "diffusion.beta_schedule=cosine", "diffusion.beta_start=0.5",
                       "diffusion.beta_end=0.1", "lcm.dynamic_clip=false", "lcm.global_omega=0", "data.image_size=1000"])
    for path in CONFIGS:
        load_config(path)


def test_image_size_the_unet_cannot_divide_is_refused_before_sampling(tmp_path):
    """data.image_size=1000 passes the VQGAN (1000 / 8 = 125) but not a UNet that halves 5 times."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_config, write_tiny_checkpoints

    from gl_lcm.inference import InferenceEngine

    cfg = tiny_config(["unet.channel_mult=[1,1,2,2,4,4]"])
    paths = write_tiny_checkpoints(tmp_path, cfg)
    use = tiny_config([f"checkpoints.vqgan={paths['vqgan']}", f"checkpoints.student={paths['student']}",
                       "data.image_size=1000"])
    with pytest.raises(ValueError, match=r"data.image_size=1000 gives a 125-pixel latent .*divisible by 256"):
        InferenceEngine.from_config(use)
    InferenceEngine.from_config(tiny_config([f"checkpoints.vqgan={paths['vqgan']}",
                                           f"checkpoints.student={paths['student']}", "data.image_size=256"]))


def test_unwritable_output_folder_is_named(tmp_path):
    from gl_lcm.utils.atomic import ensure_writable

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"train.output_dir=.*a_file/run cannot be written"):
        ensure_writable(blocker / "run", "train.output_dir")
    ensure_writable(tmp_path / "new" / "run", "train.output_dir")
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())
