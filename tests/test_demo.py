"""The `gl-lcm demo --fast` smoke run end to end: every stage, the report, and resuming."""
import json

from gl_lcm.cli import main


def test_fast_demo_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    for row in ("Identity (prediction = CXR)", "VQGAN round trip of the CXR", "DDPM-1000",
                "GL-LCM published: teacher, LCM-50, LEG", "GL-LCM ours: student, 4 steps"):
        assert row in report
    assert "| BSR (%) ↑ | MSE (10⁻³) ↓ | PSNR ↑ | LPIPS ↓ |" in report
    assert (out / "demo_figure.png").stat().st_size > 1000
    for stage in ("vqgan", "teacher", "student"):
        assert (out / stage / "model.pt").is_file() and (out / stage / "logs" / "curves.png").is_file()
    numbers = json.loads((out / "report.json").read_text())
    psnr = numbers["summaries"]["GL-LCM ours: student, 4 steps"]["psnr"][0]
    assert 5 < psnr < 60
    # a rerun skips every finished stage
    capsys.readouterr()
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for stage in ("phantoms", "vqgan", "teacher", "student"):
        assert f"[demo] {stage}: done already" in printed
