"""The time budget (``fusecare/restoration/pacing.py``), through ``restore_volume`` with a fake clock
and fake slow predictors: a cheaper mode, then the input itself, for the tiles that would not
finish in time, and nothing changed within the budget."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import FakeClock, slow_predictor

from fusecare.restoration.gate import GateConfig
from fusecare.restoration.pacing import BUDGET_SAFETY, Cheaper, Deadline
from fusecare.restoration.pipeline import FULL_MODE, INPUT_MODE, restore_volume
from fusecare.restoration.tiling import tile_grid

TILING = {"tile": (16, 32, 32), "margin": 4, "align": 4}


@pytest.fixture
def volume(rng) -> np.ndarray:
    """Intensities with room for the output headroom, so the output keeps the input's scale."""
    return rng.integers(2000, 5000, size=(20, 50, 40)).astype(np.uint16)


def _tiles(volume) -> int:
    return len(tile_grid(volume.shape, TILING["tile"], (TILING["margin"],) * 3, TILING["align"]))


def test_budget_finishes_in_the_cheaper_mode_within_the_deadline(volume, caplog):
    clock = FakeClock()
    n = _tiles(volume)
    assert n >= 4
    # all members cannot finish, half of them can
    deadline = Deadline.after(10.0 * 2 + 5.0 * (n - 2) * BUDGET_SAFETY + 1, clock)
    cheaper = Cheaper("1 of 2 members", slow_predictor(clock, 5.0, 0.1), 0.5)
    restored = restore_volume(volume, slow_predictor(clock, 10.0, 0.2), **TILING, deadline=deadline, cheaper=cheaper,
                              name="slow.tif")
    assert clock.now <= deadline.at
    assert restored.modes == {FULL_MODE: 1, "1 of 2 members": n - 1}  # projected after the first tile
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "case slow.tif over its time budget" in line and "1 of 2 members" in line
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


def test_budget_writes_the_input_for_tiles_that_cannot_fit(volume, caplog):
    clock = FakeClock()
    n = _tiles(volume)
    deadline = Deadline.after(25.0, clock)  # 2 tiles of 10 s, then nothing fits, not even the cheaper mode
    cheaper = Cheaper("fewer members", slow_predictor(clock, 5.0, 0.1), 0.5)
    restored = restore_volume(volume, slow_predictor(clock, 10.0, 0.2), **TILING, deadline=deadline, cheaper=cheaper,
                              name="slow.tif")
    assert clock.now <= deadline.at
    assert restored.modes == {FULL_MODE: 1, INPUT_MODE: n - 1}
    changed = restored.output != volume
    assert changed.any() and not changed.all()  # the first core restored, the rest is the input itself
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "case slow.tif over its time budget" in line and f"remaining {n - 1} of {n} tile(s)" in line


@pytest.mark.parametrize("gate", [None, GateConfig(spread_scale=0.1, spread_sigma=1.0, fallback_sigma=0.5)])
def test_budget_spent_before_the_first_tile_gives_the_input_itself(volume, caplog, gate):
    clock = FakeClock()
    deadline = Deadline.after(-1.0, clock)
    restored = restore_volume(volume, slow_predictor(clock, 10.0, 0.2), **TILING, deadline=deadline, gate=gate,
                              with_uncertainty=True)
    np.testing.assert_array_equal(restored.output, volume)
    assert not restored.uncertainty.any() and list(restored.modes) == [INPUT_MODE]
    assert clock.now == 1000.0 and "before the first tile" in caplog.text


def test_within_budget_nothing_changes(volume, caplog):
    clock = FakeClock()
    plain = restore_volume(volume, slow_predictor(clock, 1.0, 0.2), **TILING)
    timed = restore_volume(volume, slow_predictor(clock, 1.0, 0.2), **TILING, deadline=Deadline.after(1e6, clock))
    np.testing.assert_array_equal(plain.output, timed.output)
    assert timed.modes == {FULL_MODE: _tiles(volume)} and not caplog.records
