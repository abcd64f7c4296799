"""Shared fixtures. Tests never touch the network and never need ../shared to pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def shared_data() -> Path:
    """The real volumes in ../shared/data, or a skip with the reason when they are absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real volumes not found at {SHARED_DATA} (only on development machines and CI)")
    return SHARED_DATA
