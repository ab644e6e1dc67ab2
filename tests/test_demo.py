"""The `gl-lcm demo --fast` smoke run end to end: every stage, the report, and resuming."""
import json

from gl_lcm.cli import main


def test_fast_demo_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    for row in ("Identity (prediction = CXR)", "VQGAN round trip of the CXR", "DDPM-1000",
                "GL-LCM published: teacher, LCM-50, LEG", "Consistency-distilled student, 4 steps",
                "GL-LCM ours: one-step student, 1 step", "Ceiling: VQGAN round trip of the soft-tissue truth",
                "Plain supervised baseline, one pass (global)"):
        assert row in report
    assert "| BSR (%) ↑ | MSE (10⁻³) ↓ | PSNR ↑ | LPIPS ↓ | SSIM ↑ | MS-SSIM ↑ |" in report
    assert (out / "demo_figure.png").stat().st_size > 1000
    assert (out / "psnr_vs_unet_calls.png").stat().st_size > 1000
    assert "| GL-LCM ours: one-step student, 1 step | 2 |" in report  # UNet calls per image: 1 step x 2 paths
    assert "| Plain supervised baseline, one pass (global) | 1 |" in report  # one pass, whole film
    assert "| Method - Plain supervised baseline, one pass (global) |" in report  # one-step vs baseline, paired
    for stage in ("vqgan", "teacher", "student", "onestep", "baseline"):
        assert (out / stage / "model.pt").is_file() and (out / stage / "logs" / "curves.png").is_file()
    # the machine line: this process's torch threads and version, and a positive matmul rate
    import re

    import torch

    machine = re.search(r"^Machine: .*$", report, re.M).group(0)
    assert f"({torch.get_num_threads()} torch threads)" in machine and f"torch {torch.__version__}" in machine
    assert float(re.search(r"float32 matmul (\d+) GFLOP/s", machine).group(1)) > 0
    numbers = json.loads((out / "report.json").read_text())
    psnr = numbers["summaries"]["GL-LCM ours: one-step student, 1 step"]["psnr"][0]
    assert 5 < psnr < 60
    # a rerun skips every finished stage
    capsys.readouterr()
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for stage in ("phantoms", "vqgan", "teacher", "student", "one-step student", "plain supervised baseline"):
        assert f"[demo] {stage}: done already" in printed
