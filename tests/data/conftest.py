"""Shared fixtures of the data tests: tiny synthetic sites, PNG writers, the real sample path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iopfl_lightning.data import make_synthetic_sites

# The repo sits next to ../shared in CI and in the workspace.
REAL_SAMPLE = Path(__file__).resolve().parents[2].parent / "shared/data/prostate-slices"


@pytest.fixture
def real_sample() -> Path:
    """The real six-site PNG sample, or a clean skip where it is absent."""
    if not REAL_SAMPLE.is_dir():
        pytest.skip(f"real prostate sample not found at {REAL_SAMPLE}")
    return REAL_SAMPLE


@pytest.fixture(scope="session")
def tiny_sites():
    """Two small synthetic sites (seeded): 2 train, 1 val, 1 test case of 4 slices, 16x16."""
    return make_synthetic_sites(
        sites=("BIDMC", "HK"), cases_per_split={"train": 2, "val": 1, "test": 1}, slices=4, size=16
    )


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array (H, W) or (H, W, 3) as PNG, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path
