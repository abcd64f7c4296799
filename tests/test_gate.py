"""Do-no-harm gate: weights, candidates and the choice rule."""

from __future__ import annotations

import numpy as np
import pytest

from fusecare.gate import GateCandidate, ValidationPrediction, calibrate_gate, choose_gate, gate_weight, gated


def test_gate_weight_and_blend():
    np.testing.assert_allclose(gate_weight(np.array([0.0, 0.05, 0.1]), 0.05), [1.0, 0.5, 0.2])
    x, mean, spread = np.zeros(3), np.ones(3), np.array([0.0, 0.05, 1e6])
    np.testing.assert_allclose(gated(x, mean, spread, 0.05), [1.0, 0.5, 0.0], atol=1e-9)
    np.testing.assert_array_equal(gated(x, mean, spread, None), mean)


def test_choice_prefers_best_mean_among_safe_candidates():
    table = [GateCandidate(None, (0.5, -0.3)), GateCandidate(0.1, (0.4, -0.01)),
             GateCandidate(0.05, (0.3, 0.01)), GateCandidate(0.02, (0.1, 0.02))]
    assert choose_gate(table).spread_scale == 0.05
    unsafe = [GateCandidate(0.1, (0.4, -0.2)), GateCandidate(0.01, (0.1, -0.05))]
    assert choose_gate(unsafe).spread_scale == 0.01  # the most cautious when none is safe


def _case(rng, *, good: bool) -> ValidationPrediction:
    """A case where the 'ensemble' is right (good) or confidently-looking wrong but disagreeing."""
    from scipy import ndimage

    target = ndimage.gaussian_filter(rng.random((16, 40, 40)), 2).astype(np.float32)
    source = (target + 0.02 * rng.standard_normal(target.shape)).astype(np.float32)
    from fusecare.normalize import PercentileNorm

    t = PercentileNorm.fit(target).forward(target)
    mean = t if good else PercentileNorm.fit(source).forward(source) + rng.standard_normal(target.shape).astype(np.float32)
    spread = np.full(target.shape, 0.01 if good else 1.0, np.float32)
    return ValidationPrediction("c", source, target, mean, spread)


def test_calibration_keeps_every_case_at_or_above_zero(rng):
    cases = [_case(rng, good=True), _case(rng, good=False)]
    gate, table = calibrate_gate(cases)
    ungated = table[0]
    assert ungated.spread_scale is None and ungated.worst < 0  # ungated, the bad case hurts
    chosen = next(c for c in table if c.spread_scale == gate.spread_scale)
    assert chosen.worst >= 0 and chosen.mean > 0
    with pytest.raises(ValueError):
        calibrate_gate([])
