"""Calibration of the safety net: candidates, scoring, the choice rule and cross-validation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fusecare.normalize import PercentileNorm
from fusecare.restoration.gate import INPUT_ONLY, GateConfig, smooth
from fusecare.training.calibration import (
    MEAN,
    SAFE,
    GateCandidate,
    ValidationPrediction,
    calibrate_gate,
    choose_gate,
    choose_rule,
    cross_validate,
    default_candidates,
    evaluate_candidates,
    score_gate,
    volume_of,
)


def test_smoothed_input_scores_like_the_gaussian_baseline(rng):
    target = ndimage.gaussian_filter(rng.random((16, 40, 40)), 2).astype(np.float32)
    source = (target + 0.05 * rng.standard_normal(target.shape)).astype(np.float32)
    norm = PercentileNorm.fit(target)
    from fusecare.scoring.metrics import fmc_ssim, score_ssim

    fallback = smooth(PercentileNorm.fit(source).forward(source), 0.8)
    ssim_input = fmc_ssim(target, source, target_norm=norm)
    gate = GateConfig(blend=0.0, fallback_sigma=0.8)
    score = score_gate(target, norm, ssim_input, fallback, np.zeros_like(source), np.zeros_like(source), gate)
    assert score == score_ssim(target, fallback, source).n_ssim > 0


def _gc(n_ssim, **gate):
    return GateCandidate(GateConfig(**gate) if gate else None, tuple(n_ssim))


def test_choice_prefers_best_mean_among_safe_candidates():
    table = [_gc((0.5, -0.3)), _gc((0.4, -0.01), spread_scale=0.1), _gc((0.3, 0.01), spread_scale=0.05),
             _gc((0.1, 0.02), spread_scale=0.02), _gc((0.0, 0.0), blend=0.0)]
    assert choose_gate(table).gate == GateConfig(spread_scale=0.05)
    unsafe = [_gc((0.4, -0.2), spread_scale=0.1), _gc((0.1, -0.05), spread_scale=0.01)]
    assert choose_gate(unsafe).gate == GateConfig(spread_scale=0.01)  # the most cautious when none is safe


def test_candidates_include_the_input_itself_smoothed_fallbacks_and_the_consistency_term():
    candidates = default_candidates()
    assert candidates[0] == INPUT_ONLY and len(set(candidates)) == len(candidates) == 68
    plain = [c for c in candidates if not c.correct_attenuation]
    assert [c.replace(correct_attenuation=True) for c in plain] == candidates[34:]  # each with and without
    assert {c.fallback_sigma for c in candidates} == {0.0, 0.5}
    assert {c.consistency_scale for c in candidates} == {0.0, 0.05}
    assert {c.blend for c in candidates} == {0.0, 0.5, 1.0}
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
    calibration = calibrate_gate(cases)
    gate, table = calibration.gate, calibration.table
    assert calibration.rule == SAFE and calibration.cross_validation == {"safe": None, "mean": None}
    ungated = table[0]
    assert ungated.gate is None and ungated.worst < 0  # ungated, the bad case hurts
    chosen = next(c for c in table if c.gate == gate)
    assert chosen.worst >= 0 and chosen.mean > 0 and gate.blend > 0
    with pytest.raises(ValueError, match="at least one validation case"):
        calibrate_gate([])


def test_calibration_falls_back_to_the_input_when_nothing_is_safe(rng):
    target = rng.random((16, 40, 40)).astype(np.float32)  # white noise: smoothing it hurts too
    source = (target + 0.02 * rng.standard_normal(target.shape)).astype(np.float32)
    wrong = rng.random(target.shape).astype(np.float32)
    bad = ValidationPrediction("bad", source, target, wrong, np.zeros_like(wrong))  # confidently wrong
    calibration = calibrate_gate([bad])
    gate, table = calibration.gate, calibration.table
    assert gate == INPUT_ONLY
    assert next(c for c in table if c.gate == gate).worst == 0.0


def test_calibration_scores_the_smoothed_mean(rng):
    """A candidate with ``prediction_sigma`` is scored on the Gaussian-smoothed members' mean, and
    calibration finds it when the networks left noise that the target lacks (and the input is too
    blurred for smoothing it to compete)."""
    target = ndimage.gaussian_filter(rng.random((16, 40, 40)), 1.0).astype(np.float32)
    source = (ndimage.gaussian_filter(target, 2.0) + 0.02 * rng.standard_normal(target.shape)).astype(np.float32)
    noisy_mean = (PercentileNorm.fit(target).forward(target)
                  + 0.3 * rng.standard_normal(target.shape)).astype(np.float32)
    case = ValidationPrediction("noisy", source, target, noisy_mean, np.zeros_like(target))
    gate = GateConfig(spread_scale=1.0, blend=1.0, prediction_sigma=0.5)
    _, unsmoothed, smoothed = (c.n_ssim[0] for c in evaluate_candidates([case], [GateConfig(spread_scale=1.0), gate]))
    from fusecare.scoring.metrics import score_ssim

    assert smoothed == pytest.approx(score_ssim(target, smooth(noisy_mean, 0.5), source).n_ssim, abs=1e-6)
    assert smoothed > unsmoothed
    chosen = calibrate_gate([case]).gate
    assert chosen.prediction_sigma > 0 and chosen.blend > 0


def test_calibration_shows_a_bar_over_candidates_only_when_asked(rng, capsys):
    cases = [_case(rng, good=True)]
    candidates = default_candidates()[:5]
    calibrate_gate(cases, candidates)
    assert "gate calibration" not in capsys.readouterr().err
    calibrate_gate(cases, candidates, progress=True)
    assert "gate calibration" in capsys.readouterr().err


def test_cross_validation_chooses_without_the_held_out_volume():
    names = ["a.tif (simulated, seed 1)", "a.tif (simulated, seed 2)", "b.tif (simulated, seed 1)",
             "validation phantom 0"]
    assert [volume_of(n) for n in names] == ["a.tif", "a.tif", "b.tif", "validation phantom 0"]
    cautious, bold = GateConfig(spread_scale=0.05), GateConfig(spread_scale=0.5)
    table = [GateCandidate(None, (0.5, 0.5, -0.4, 0.5)),
             GateCandidate(cautious, (0.2, 0.2, 0.1, 0.2)),
             GateCandidate(bold, (0.5, 0.5, -0.4, 0.5))]
    cv = cross_validate(names, table)
    assert cv is not None
    folds = {held: (gate, scores) for held, gate, scores in cv.folds}
    assert folds["b.tif"] == (bold, (-0.4,))  # chosen on a and the phantom, where bold is safe
    assert folds["a.tif"] == (cautious, (0.2, 0.2))  # b's -0.4 rules bold out
    assert cv.worst == -0.4 and len(cv.n_ssim) == 4
    assert cross_validate(names[:2], table) is None  # one volume: nothing to hold out


def _three_volumes(catastrophe: float) -> tuple[list[str], list[GateCandidate], GateConfig, GateConfig]:
    """Volumes a, b, c; a cautious gate gains 0.1 on each, a bold one 0.5 on a and b, ``catastrophe`` on c."""
    cautious, bold = GateConfig(spread_scale=0.05), GateConfig(spread_scale=0.5)
    table = [GateCandidate(None, (0.5, 0.5, catastrophe)), GateCandidate(cautious, (0.1, 0.1, 0.1)),
             GateCandidate(bold, (0.5, 0.5, catastrophe))]
    return ["a.tif", "b.tif", "c.tif"], table, cautious, bold


def test_rule_is_chosen_by_cross_validation_not_fixed():
    """One volume's small loss vetoes the bold gate under SAFE; held out, MEAN does better and is used."""
    names, table, cautious, bold = _three_volumes(-0.05)
    rule, estimates = choose_rule(names, table)
    assert estimates["safe"].mean == pytest.approx((0.1 + 0.1 - 0.05) / 3)  # c held out: bold, chosen on a, b
    assert estimates["mean"].mean == pytest.approx((0.5 + 0.5 - 0.05) / 3)
    assert rule == MEAN and MEAN.choose(table).gate == bold and SAFE.choose(table).gate == cautious


def test_safe_rule_wins_ties_and_single_volumes():
    names, table, cautious, _ = _three_volumes(-0.9)  # held out, both rules pick alike: a tie
    rule, estimates = choose_rule(names, table)
    assert estimates["safe"].mean == estimates["mean"].mean and rule == SAFE
    assert SAFE.choose(table).gate == cautious
    assert choose_rule(["a.tif", "a.tif"], table[:1] + [GateCandidate(cautious, (0.1, 0.1))]) == (
        SAFE, {"safe": None, "mean": None})


def test_calibration_corrects_attenuation_where_the_target_is_not_dimmed(rng):
    """A view dimmed 3x along X from its entry face, against a target that is not (a fused
    volume): the Gaussian with the correction scores far above the Gaussian alone, the chosen
    gate corrects, and an undimmed case keeps its score within a little."""
    target = ndimage.gaussian_filter(rng.random((16, 64, 96)), (1, 2, 2)).astype(np.float32)
    target = np.clip((target - target.mean()) / target.std(), 0, None)
    target[:, :6], target[:, -6:], target[:, :, :6], target[:, :, -6:] = 0, 0, 0, 0
    dimming = np.exp(-np.linspace(0.0, 1.3, target.shape[2], dtype=np.float32))
    source = (target * dimming + 0.01 * rng.standard_normal(target.shape)).astype(np.float32)
    x = PercentileNorm.fit(source).forward(source)
    dimmed = ValidationPrediction("dimmed", source, target, x, np.zeros_like(x), (1.0, 0.5, 0.5))
    smoothed = GateConfig(blend=0.0, fallback_sigma=0.5)
    table = evaluate_candidates([dimmed], [smoothed, smoothed.replace(correct_attenuation=True)])
    assert table[2].n_ssim[0] > table[1].n_ssim[0] + 0.2
    assert calibrate_gate([dimmed]).gate.correct_attenuation
    plain = ValidationPrediction("plain", target + np.float32(0.01) * rng.standard_normal(target.shape).astype(
        np.float32), target, x, np.zeros_like(x), (1.0, 0.5, 0.5))
    flat = evaluate_candidates([plain], [smoothed, smoothed.replace(correct_attenuation=True)])
    assert flat[2].n_ssim[0] > flat[1].n_ssim[0] - 0.05


@pytest.mark.parametrize("gate", [None, GateConfig(spread_scale=0.2, blend=0.5, spread_sigma=2.0,
                                                   prediction_sigma=0.5, correct_attenuation=True)],
                         ids=["ungated", "correcting-gate"])
def test_calibration_predicts_a_corrected_input_ensemble_as_inference_does(tmp_path, rng, gate):
    """Members that read the corrected view: calibration's whole-volume prediction (in the view's
    own brightness; ungated, the field multiplied back), gated as calibration scores it, equals
    what inference writes, tile by tile; its table scores the same formula."""
    from conftest import beer_lambert, blob_specimen, make_tiny_ensemble

    from fusecare.restoration.attenuation import estimate_attenuation
    from fusecare.restoration.ensemble import load_ensemble
    from fusecare.restoration.gate import gate_fields, gated_fields
    from fusecare.restoration.intensities import Uint16Map
    from fusecare.restoration.pipeline import restore_volume
    from fusecare.training.calibration import predict_ensemble_volume

    voxel = (1.0, 0.5, 0.5)
    volume = (1000 + 8000 * beer_lambert(blob_specimen(rng, (24, 48, 64), (2, 4, 4)), 2, True, 0.1, 0.5)
              ).astype(np.uint16)
    ensemble = load_ensemble(make_tiny_ensemble(tmp_path, "membrane", corrected_input=True))
    mean, spread = predict_ensemble_volume(ensemble, volume, voxel)
    norm = PercentileNorm.fit(volume)
    field = estimate_attenuation(norm.forward(volume), voxel).region((slice(None),) * 3)
    values = mean * field
    if gate is not None:
        values = gated_fields(gate_fields(gate, norm.forward(volume), mean, spread), gate, field)
    expected, _ = Uint16Map.for_input(float(volume.min()), float(volume.max())).apply(norm.inverse(values))
    restored = restore_volume(volume, ensemble.predict_block, tile=(16, 32, 32), margin=ensemble.margin,
                              align=ensemble.alignment, gate=gate, voxel_size_zyx=voxel, corrected_input=True)
    difference = np.abs(restored.output.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and np.count_nonzero(difference) < 1e-2 * volume.size
    plain_mean, _ = predict_ensemble_volume(load_ensemble(make_tiny_ensemble(tmp_path / "plain", "membrane")),
                                            volume, voxel)
    assert np.abs(plain_mean - mean).max() > 0.05  # the field reached the members
    target = (norm.forward(volume) * field).astype(np.float32)  # any target: both sides score the same formula
    case = ValidationPrediction("c", volume.astype(np.float32), target, mean, spread, voxel)
    [row] = evaluate_candidates([case], [gate] if gate else [], corrected_input=True)[-1:]
    from fusecare.scoring.metrics import score_ssim

    assert row.n_ssim[0] == pytest.approx(score_ssim(target, values, volume.astype(np.float32)).n_ssim, abs=2e-3)


def test_corrected_input_ensembles_choose_among_gates_that_put_the_field_back():
    from fusecare.training.calibration import corrected_input_candidates

    candidates = corrected_input_candidates()
    assert candidates[0] == INPUT_ONLY and len(candidates) == 35
    assert all(gate.correct_attenuation for gate in candidates[1:])


def test_calibration_reads_a_case_through_its_own_field_estimate_without_estimating_again(tmp_path, rng,
                                                                                           monkeypatch):
    """A validation case that carries its field (``with_field``, as ``build_data`` makes them for
    members that read the corrected view) is predicted through that estimate, not a second one,
    and calibrates to the same table as a case without it."""
    from conftest import beer_lambert, blob_specimen, make_tiny_ensemble

    from fusecare.training import calibration
    from fusecare.training.sources import ValidationCase, with_field

    clean = blob_specimen(rng, (16, 48, 48), (2, 4, 4)).astype(np.float32)
    views = [(1000 + 8000 * beer_lambert(clean, 2, k == 0, 0.1, 0.5) + 50 * rng.standard_normal(clean.shape)
              ).astype(np.float32) for k in range(2)]
    plain = [ValidationCase(f"v{k} (simulated, seed {k})", view, clean, voxel_size_zyx=(1.0, 0.5, 0.5))
             for k, view in enumerate(views)]
    carried = [with_field(c) for c in plain]
    folder = make_tiny_ensemble(tmp_path, "membrane", corrected_input=True)
    estimates = []
    real = calibration.view_field
    monkeypatch.setattr(calibration, "view_field", lambda *a, **k: estimates.append(1) or real(*a, **k))
    fresh = calibration.calibrate_ensemble_gate(folder, plain)
    assert len(estimates) == 2
    reused = calibration.calibrate_ensemble_gate(folder, carried)
    assert len(estimates) == 2  # no estimate beyond the cases' own
    scores = [np.array([c.n_ssim for c in calibrated.table]) for calibrated in (fresh, reused)]
    assert np.isfinite(scores[0]).all()
    np.testing.assert_allclose(scores[1], scores[0], atol=1e-6)
