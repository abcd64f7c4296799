"""Do-no-harm gate: weights, smoothing, candidates and the choice rule."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fusecare.gate import (
    INPUT_ONLY,
    GateCandidate,
    GateConfig,
    ValidationPrediction,
    calibrate_gate,
    choose_gate,
    default_candidates,
    evaluate_candidates,
    gate_weight,
    gated,
    score_gate,
    smooth,
)
from fusecare.normalize import PercentileNorm


def test_gate_weight_and_blend():
    np.testing.assert_allclose(gate_weight(np.array([0.0, 0.05, 0.1]), 0.05), [1.0, 0.5, 0.2])
    x, mean, spread = np.zeros(3), np.ones(3), np.array([0.0, 0.05, 1e6])
    np.testing.assert_allclose(gated(x, mean, spread, GateConfig(spread_scale=0.05)), [1.0, 0.5, 0.0], atol=1e-9)
    np.testing.assert_allclose(gated(x, mean, spread, GateConfig(spread_scale=0.05, blend=0.5)),
                               [0.5, 0.25, 0.0], atol=1e-9)
    np.testing.assert_array_equal(gated(x, mean, spread, None), mean)
    np.testing.assert_array_equal(gated(x, mean, spread, INPUT_ONLY), x)


def test_fallback_is_the_smoothed_input(rng):
    x = rng.random((6, 12, 12)).astype(np.float32)
    assert smooth(x, 0.0) is x
    np.testing.assert_allclose(smooth(x, 0.8), ndimage.gaussian_filter(x, 0.8, mode="reflect", truncate=4.0))
    smoothed_input_only = GateConfig(blend=0.0, fallback_sigma=0.8)
    assert INPUT_ONLY.keeps_input and not smoothed_input_only.keeps_input
    assert GateConfig(spread_sigma=1.0, fallback_sigma=0.5).context == 4.0
    assert GateConfig(spread_sigma=1.0, prediction_sigma=1.5).context == 6.0
    mean, spread = np.ones_like(x), np.zeros_like(x)
    fallback = smooth(x, 0.8)
    np.testing.assert_array_equal(gated(fallback, mean, spread, smoothed_input_only), fallback)
    half = GateConfig(spread_scale=0.05, blend=0.5, fallback_sigma=0.8)
    np.testing.assert_allclose(gated(fallback, mean, spread, half), 0.5 * (fallback + 1.0), atol=1e-6)


def test_old_manifest_gates_fall_back_to_the_input():
    """Gates calibrated before fallback smoothing existed keep their meaning."""
    gate = GateConfig.from_dict({"spread_scale": 0.2, "blend": 0.75, "spread_sigma": 0.0})
    assert gate.fallback_sigma == 0.0 and gate.prediction_sigma == 0.0
    assert GateConfig.from_dict({"blend": 0.0}).keeps_input


def test_smoothed_input_scores_like_the_gaussian_baseline(rng):
    target = ndimage.gaussian_filter(rng.random((16, 40, 40)), 2).astype(np.float32)
    source = (target + 0.05 * rng.standard_normal(target.shape)).astype(np.float32)
    norm = PercentileNorm.fit(target)
    from fusecare.metrics import fmc_ssim, score_ssim

    fallback = smooth(PercentileNorm.fit(source).forward(source), 0.8)
    ssim_input = fmc_ssim(target, source, target_norm=norm)
    gate = GateConfig(blend=0.0, fallback_sigma=0.8)
    score = score_gate(target, norm, ssim_input, fallback, np.zeros_like(source), np.zeros_like(source), gate)
    assert score == score_ssim(target, fallback, source).n_ssim > 0


def test_spread_smoothing_is_a_gaussian_and_leaves_its_input_alone(rng):
    spread = rng.random((6, 10, 10)).astype(np.float32)
    before = spread.copy()
    smoothed = smooth(spread, 2.0)
    np.testing.assert_array_equal(spread, before)
    np.testing.assert_allclose(smoothed, ndimage.gaussian_filter(before, 2.0, truncate=4.0), atol=1e-6)
    assert smooth(spread, 0.0) is spread


def _gc(n_ssim, **gate):
    return GateCandidate(GateConfig(**gate) if gate else None, tuple(n_ssim))


def test_choice_prefers_best_mean_among_safe_candidates():
    table = [_gc((0.5, -0.3)), _gc((0.4, -0.01), spread_scale=0.1), _gc((0.3, 0.01), spread_scale=0.05),
             _gc((0.1, 0.02), spread_scale=0.02), _gc((0.0, 0.0), blend=0.0)]
    assert choose_gate(table).gate == GateConfig(spread_scale=0.05)
    unsafe = [_gc((0.4, -0.2), spread_scale=0.1), _gc((0.1, -0.05), spread_scale=0.01)]
    assert choose_gate(unsafe).gate == GateConfig(spread_scale=0.01)  # the most cautious when none is safe


def test_candidates_include_the_input_itself_and_smoothed_fallbacks():
    candidates = default_candidates()
    assert candidates[0] == INPUT_ONLY and len(set(candidates)) == len(candidates)
    assert {c.fallback_sigma for c in candidates} == {0.0, 0.5, 0.8}
    assert {c.prediction_sigma for c in candidates} == {0.0, 0.5, 1.0}
    assert GateConfig(blend=0.0, fallback_sigma=0.5) in candidates


def _case(rng, *, good: bool) -> ValidationPrediction:
    """A case where the 'ensemble' is right (good), or wrong and with members disagreeing."""
    target = ndimage.gaussian_filter(rng.random((16, 40, 40)), 2).astype(np.float32)
    source = (target + 0.02 * rng.standard_normal(target.shape)).astype(np.float32)
    if good:
        mean = PercentileNorm.fit(target).forward(target)
    else:
        mean = PercentileNorm.fit(source).forward(source) + rng.standard_normal(target.shape).astype(np.float32)
    spread = np.full(target.shape, 0.01 if good else 1.0, np.float32)
    return ValidationPrediction("c", source, target, mean, spread)


def test_calibration_keeps_every_case_at_or_above_zero(rng):
    cases = [_case(rng, good=True), _case(rng, good=False)]
    gate, table = calibrate_gate(cases)
    ungated = table[0]
    assert ungated.gate is None and ungated.worst < 0  # ungated, the bad case hurts
    chosen = next(c for c in table if c.gate == gate)
    assert chosen.worst >= 0 and chosen.mean > 0 and gate.blend > 0
    with pytest.raises(ValueError, match="needs at least one validation case"):
        calibrate_gate([])


def test_calibration_falls_back_to_the_input_when_nothing_is_safe(rng):
    target = rng.random((16, 40, 40)).astype(np.float32)  # white noise: smoothing it hurts too
    source = (target + 0.02 * rng.standard_normal(target.shape)).astype(np.float32)
    wrong = rng.random(target.shape).astype(np.float32)
    bad = ValidationPrediction("bad", source, target, wrong, np.zeros_like(wrong))  # confidently wrong
    gate, table = calibrate_gate([bad])
    assert gate == INPUT_ONLY
    assert next(c for c in table if c.gate == gate).worst == 0.0


def test_calibration_scores_the_smoothed_mean(rng):
    """A candidate with ``prediction_sigma`` is scored on the Gaussian-smoothed members' mean, and
    calibration finds it when the networks left noise that the target lacks."""
    target = ndimage.gaussian_filter(rng.random((16, 40, 40)), 2).astype(np.float32)
    source = (target + 0.01 * rng.standard_normal(target.shape)).astype(np.float32)
    noisy_mean = (PercentileNorm.fit(target).forward(target)
                  + 0.3 * rng.standard_normal(target.shape)).astype(np.float32)
    case = ValidationPrediction("noisy", source, target, noisy_mean, np.zeros_like(target))
    gate = GateConfig(spread_scale=1.0, blend=1.0, prediction_sigma=1.0)
    _, unsmoothed, smoothed = (c.n_ssim[0] for c in evaluate_candidates([case], [GateConfig(spread_scale=1.0), gate]))
    from fusecare.metrics import score_ssim

    assert smoothed == pytest.approx(score_ssim(target, smooth(noisy_mean, 1.0), source).n_ssim, abs=1e-9)
    assert smoothed > unsmoothed
    chosen, _ = calibrate_gate([case])
    assert chosen.prediction_sigma > 0


def test_calibration_shows_a_bar_over_candidates_only_when_asked(rng, capsys):
    cases = [_case(rng, good=True)]
    candidates = default_candidates()[:5]
    calibrate_gate(cases, candidates)
    assert "gate calibration" not in capsys.readouterr().err
    calibrate_gate(cases, candidates, progress=True)
    assert "gate calibration" in capsys.readouterr().err
