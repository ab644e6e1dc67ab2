"""The `gl-lcm` command: thin subcommands, clear errors, metrics table from folders."""

from gl_lcm.cli import main
from gl_lcm.data.io import read_image, write_png
from gl_lcm.data.phantom import write_phantom_dataset


def test_help_lists_every_job(capsys):
    try:
        main(["--help"])
    except SystemExit:
        pass
    text = capsys.readouterr().out
    for cmd in ("split", "phantoms", "metrics", "train-vqgan", "eval-vqgan", "train-ldm", "distill", "train-seg",
                "segment", "evaluate", "suppress", "ablate", "demo", "config"):
        assert cmd in text


def test_config_error_is_reported_with_suggestion(capsys):
    assert main(["config", "train.batch_sise=2"]) == 2
    assert "did you mean 'train.batch_size'" in capsys.readouterr().err


def test_phantoms_split_and_metrics_commands(tmp_path, capsys):
    root = tmp_path / "ph"
    assert main(["phantoms", "--out", str(root), "--n", "10", "--size", "64", "--seed", "1"]) == 0
    assert main(["split", "--cxr-dir", str(root / "CXR"), "--bs-dir", str(root / "BS"), "--out",
                 str(tmp_path / "split"), "--seed", "3"]) == 0
    lists = [(tmp_path / "split" / f"{k}.txt").read_text().split() for k in ("train", "val", "test")]
    assert sorted(sum(lists, [])) == sorted(f"phantom_{i:04d}" for i in range(10))
    # predictions: the ground truth for all but one stem
    pred = tmp_path / "pred"
    for stem in lists[0][1:]:
        gt, _ = read_image(root / "BS" / f"{stem}.png")
        write_png(pred / f"{stem}.png", gt)
    capsys.readouterr()
    assert main(["metrics", "--cxr-dir", str(root / "CXR"), "--gt-dir", str(root / "BS"), "--pred-dir", str(pred),
                 "--list", str(tmp_path / "split" / "train.txt"), "--out", str(tmp_path / "m"), "--no-lpips",
                 "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "| Method | BSR (%) ↑ |" in out and "1 predictions missing" in out
    assert "inf" in out  # PSNR of identical images
    assert (tmp_path / "m" / "missing.txt").read_text().split() == [lists[0][0]]


def test_metrics_without_lpips_weights_names_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    write_phantom_dataset(tmp_path / "ph", n=3, size=32, seed=0)
    assert main(["metrics", "--cxr-dir", str(tmp_path / "ph" / "CXR"), "--gt-dir", str(tmp_path / "ph" / "BS"),
                 "--pred-dir", str(tmp_path / "ph" / "BS"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "alexnet-owt-7be5be79.pth" in err and "--no-lpips" in err
