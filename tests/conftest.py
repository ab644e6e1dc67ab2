"""Shared pytest fixtures.

Real data: ``../shared/data/szch-sample`` relative to the repository root (three real
CXR / DES soft-tissue pairs, 1024x1024). Tests that need it take the ``szch_dir``
fixture and skip with a clear reason where the folder is absent.
"""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SZCH_DIR = REPO_ROOT.parent / "shared" / "data" / "szch-sample"
LPIPS_EXAMPLES_DIR = REPO_ROOT.parent / "shared" / "data" / "lpips-examples"


@pytest.fixture(autouse=True)
def _no_installed_lpips_weights(tmp_path_factory, monkeypatch):
    """Point GL_LCM_HOME at an empty folder: LPIPS weights installed on this machine by
    ``gl-lcm weights lpips`` (~/.cache/gl_lcm/weights) must not change what a test computes."""
    monkeypatch.setenv("GL_LCM_HOME", str(tmp_path_factory.getbasetemp() / "gl_lcm_home_empty"))


@pytest.fixture(scope="session")
def lpips_examples_dir() -> Path:
    """The original LPIPS example images (ex_ref.png, ex_p0.png, ex_p1.png)."""
    if not all((LPIPS_EXAMPLES_DIR / n).is_file() for n in ("ex_ref.png", "ex_p0.png", "ex_p1.png")):
        pytest.skip(f"LPIPS example images not found at {LPIPS_EXAMPLES_DIR} (needs ../shared/data/lpips-examples)")
    return LPIPS_EXAMPLES_DIR


@pytest.fixture(scope="session")
def szch_dir() -> Path:
    """Folder with CXR/ and BS/ subfolders of three real 1024x1024 pairs."""
    if not (SZCH_DIR / "CXR").is_dir() or not (SZCH_DIR / "BS").is_dir():
        pytest.skip(f"real sample data not found at {SZCH_DIR} (needs ../shared/data/szch-sample)")
    return SZCH_DIR
