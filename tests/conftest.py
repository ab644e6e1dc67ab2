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


@pytest.fixture(scope="session")
def szch_dir() -> Path:
    """Folder with CXR/ and BS/ subfolders of three real 1024x1024 pairs."""
    if not (SZCH_DIR / "CXR").is_dir() or not (SZCH_DIR / "BS").is_dir():
        pytest.skip(f"real sample data not found at {SZCH_DIR} (needs ../shared/data/szch-sample)")
    return SZCH_DIR
