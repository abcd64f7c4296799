"""Choosing the safety net's parameters on validation volumes, by cross-validation over them.

A few candidates (the input itself, the Gaussian-smoothed input, and a small grid over how much
the gate trusts disagreeing members and region-wide intensity shifts), each without and with the
attenuation correction (the field is estimated once per case, ``view_field``, unless the case
brings its own, ``ValidationPrediction.field``), are
scored on every validation case. Two choice rules pick one of them: ``SAFE`` (among the candidates whose worst
case is not below 0, the best mean N-SSIM; when none is safe, the best worst case) and ``MEAN``
(the best mean). ``SAFE`` lets a single validation case veto every candidate that trusts the
networks, even where they help every other volume; ``MEAN`` can keep a prediction that harms
one. Which of the two applies is itself decided by cross-validation: ``cross_validate`` scores
each rule on volumes it did not choose on (leave one volume out), the rule with the better
held-out mean is applied to all validation volumes, and its leave-one-volume-out numbers are the
estimate of what the chosen gate does on unseen content (slightly optimistic: the same folds
chose the rule; choosing the rule inside each fold gave the same numbers on the shipped
ensembles' tables).

``recalibrate_gate`` does this for an ensemble saved on disk (after training, or on its own with
``fusecare train --calibrate-only``) and writes the chosen gate and the whole table into its
manifest, so inference reads the gate with the members.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fusecare.config import strict_json
from fusecare.errors import WeightsError
from fusecare.normalize import PercentileNorm
from fusecare.restoration.attenuation import AttenuationField, CorrectedView, view_field
from fusecare.restoration.ensemble import MANIFEST, Ensemble, load_ensemble, read_manifest, write_manifest
from fusecare.restoration.gate import INPUT_ONLY, GateConfig, consistency_map, gated, smooth
from fusecare.restoration.tiling import predict_normalised
from fusecare.scoring.metrics import fmc_ssim, n_ssim
from fusecare.training.sources import ValidationCase, volume_of

log = logging.getLogger(__name__)

FALLBACK_SIGMAS: tuple[float, ...] = (0.0, 0.5)
"""0: the input itself, for targets whose texture (noise included) any smoothing would lose."""
PREDICTION_SIGMAS: tuple[float, ...] = (0.0, 0.5)
SPREAD_SCALES: tuple[float, ...] = (0.2, 10.0)
"""10 normalised units: members never disagree that much, so the spread term is off."""
CONSISTENCY_SCALES: tuple[float, ...] = (0.0, 0.05)
CORRECTIONS: tuple[bool, ...] = (False, True)
"""Without and with the attenuation correction (``GateConfig.correct_attenuation``)."""
BLENDS: tuple[float, ...] = (0.5, 1.0)
"""0.5 applies half the gated correction everywhere: a prediction whose mean gain on validation
is positive but whose worst case is not may be safe half-way (the best public entry weighted its
output toward the input for the same reason)."""
SPREAD_SIGMA = 2.0
SAFETY_TOLERANCE = 1e-6
"""A worst-case N-SSIM above -1e-6 counts as not below 0 (float rounding of the metric)."""


class _Scores:
    """Mean and worst case of a sequence of per-case N-SSIM (``n_ssim``)."""

    n_ssim: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.n_ssim))

    @property
    def worst(self) -> float:
        return float(np.min(self.n_ssim))


@dataclass(frozen=True)
class GateCandidate(_Scores):
    """N-SSIM over the validation cases for one gate (``None`` = ungated)."""

    gate: GateConfig | None
    n_ssim: tuple[float, ...]

    def to_dict(self) -> dict[str, object]:
        return {"gate": self.gate.to_dict() if self.gate else None, "n_ssim_mean": self.mean,
                "n_ssim_worst": self.worst, "n_ssim": list(self.n_ssim)}


@dataclass(frozen=True)
class ValidationPrediction:
    """One validation case with the ensemble's normalised mean and (unsmoothed) spread."""

    name: str
    source: np.ndarray
    target: np.ndarray
    mean: np.ndarray
    spread: np.ndarray
    voxel_size_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)
    field: np.ndarray | None = None
    """The view's attenuation field when the caller has it (else ``evaluate_candidates`` estimates
    it): members that read the corrected view were divided by this very field."""


def score_gate(target: np.ndarray, target_norm: PercentileNorm, ssim_input: float, fallback: np.ndarray,
               mean: np.ndarray, spread: np.ndarray, gate: GateConfig | None,
               consistency: np.ndarray | None = None, attenuation: np.ndarray | None = None) -> float:
    """N-SSIM of a gated prediction against a target whose input scores ``ssim_input``.

    ``fallback``, ``mean`` and ``spread`` are already smoothed by the gate's sigmas. The input-only gate
    is the input itself: exactly 0, without scoring it again.
    """
    if gate is not None and gate.keeps_input:
        return 0.0
    prediction = gated(fallback, mean, spread, gate, consistency, attenuation)
    return n_ssim(fmc_ssim(target, prediction, target_norm=target_norm), ssim_input)


def default_candidates() -> list[GateConfig]:
    """The input itself, the Gaussian-smoothed inputs, then the (fallback, prediction smoothing,
    spread scale, consistency scale, blend) grid, each without and then with the attenuation
    correction: 68 in all, two values per parameter, so a handful of validation volumes choose
    among few gates (a 196-gate grid chose no better held-out gate on the shipped ensembles'
    validation tables: leave-one-volume-out 0.011 against 0.016 for membrane, 0.080 against 0.083
    for nucleus)."""
    return [gate.replace(correct_attenuation=a) for a in CORRECTIONS for gate in (
        [INPUT_ONLY] + [GateConfig(blend=0.0, fallback_sigma=f) for f in FALLBACK_SIGMAS if f > 0]
        + [GateConfig(spread_scale=s, spread_sigma=SPREAD_SIGMA, fallback_sigma=f, prediction_sigma=p,
                      consistency_scale=c, blend=b)
           for f, p, s, c, b in itertools.product(FALLBACK_SIGMAS, PREDICTION_SIGMAS, SPREAD_SCALES,
                                                  CONSISTENCY_SCALES, BLENDS)])]


def corrected_input_candidates() -> list[GateConfig]:
    """The candidates for an ensemble whose members read the corrected view: inference puts the
    field back on whatever such a gate blends (``restore_volume``), so every candidate corrects
    attenuation, but the input itself (35)."""
    return [gate for gate in default_candidates() if gate.correct_attenuation or gate.keeps_input]


def evaluate_candidates(cases: Sequence[ValidationPrediction], candidates: Sequence[GateConfig] | None = None,
                        *, progress: bool = False, corrected_input: bool = False,
                        ungated: bool = True) -> list[GateCandidate]:
    """N-SSIM of every case without a gate (first; ``ungated=False`` skips it, for a caller that
    scored it already) and with each candidate gate.

    Per case, the target's normalisation, the input's SSIM and each smoothing of the mean, the
    spread and the input (and each consistency map) are computed once, not once per candidate,
    with the functions inference uses (``fusecare.restoration.gate``). ``progress`` shows a bar over the
    candidates. ``corrected_input``: the members read the corrected view and their mean was
    divided by the field (``predict_ensemble_volume``, or training's gated validation with the
    case's ``ValidationPrediction.field``); ungated, inference writes the mean as they
    predicted it, the field multiplied back, and so is it scored.
    """
    candidates = default_candidates() if candidates is None else candidates
    prepared = []
    for case in cases:
        target_norm = PercentileNorm.fit(case.target)
        prepared.append((target_norm, fmc_ssim(case.target, case.source, target_norm=target_norm),
                         PercentileNorm.fit(case.source).forward(case.source)))
    fields: dict[int, np.ndarray] = {}

    def field(i: int, x: np.ndarray) -> np.ndarray:
        """The case's attenuation field: its own, or estimated once."""
        if i not in fields:
            given = cases[i].field
            fields[i] = view_field(cases[i].source, cases[i].voxel_size_zyx).full() if given is None else given
        return fields[i]

    def attenuation(i: int, gate: GateConfig | None, x: np.ndarray) -> np.ndarray | None:
        """The field for the gates that correct it."""
        return field(i, x) if gate is not None and gate.correct_attenuation else None
    smoothed: dict[tuple[str, int, float], np.ndarray] = {}

    def cached(kind: str, i: int, sigma: float, volume: np.ndarray) -> np.ndarray:
        if (kind, i, sigma) not in smoothed:
            smoothed[kind, i, sigma] = smooth(volume, sigma)
        return smoothed[kind, i, sigma]

    consistencies: dict[tuple[int, float, float, float], np.ndarray] = {}

    def consistency(i: int, gate: GateConfig, mean: np.ndarray, fallback: np.ndarray) -> np.ndarray | None:
        if gate.consistency_scale <= 0:
            return None
        key = (i, gate.prediction_sigma, gate.fallback_sigma, gate.consistency_sigma)
        if key not in consistencies:
            consistencies[key] = consistency_map(mean, fallback, gate.consistency_sigma)
        return consistencies[key]

    results = []
    gates: tuple[GateConfig | None, ...] = ((None,) if ungated else ()) + tuple(candidates)
    for gate in tqdm(gates, desc="gate calibration", unit="gate", disable=not progress, leave=False):
        spread_sigma, fallback_sigma, prediction_sigma = (
            (gate.spread_sigma, gate.fallback_sigma, gate.prediction_sigma) if gate else (0.0, 0.0, 0.0))
        scores = []
        for i, (case, (target_norm, ssim_input, x)) in enumerate(zip(cases, prepared)):
            fallback = cached("input", i, fallback_sigma, x)
            mean = cached("mean", i, prediction_sigma, case.mean)
            if gate is None and corrected_input:
                mean = mean * field(i, x)
            scores.append(score_gate(case.target, target_norm, ssim_input, fallback, mean,
                                     cached("spread", i, spread_sigma, case.spread), gate,
                                     consistency(i, gate, mean, fallback) if gate else None,
                                     attenuation(i, gate, x)))
        results.append(GateCandidate(gate, tuple(scores)))
    return results


def choose_gate(results: Sequence[GateCandidate]) -> GateCandidate:
    """``SAFE``: best mean among gates whose worst case is >= 0, else the best worst case."""
    gated_results = [r for r in results if r.gate is not None]
    safe = [r for r in gated_results if r.worst >= -SAFETY_TOLERANCE]
    if safe:
        return max(safe, key=lambda r: r.mean)
    return max(gated_results, key=lambda r: r.worst)


def choose_best_mean(results: Sequence[GateCandidate]) -> GateCandidate:
    """``MEAN``: the gate with the best mean N-SSIM, whatever its worst case."""
    return max((r for r in results if r.gate is not None), key=lambda r: r.mean)


@dataclass(frozen=True)
class ChoiceRule:
    """A named way of choosing one gate from an ``evaluate_candidates`` table."""

    name: str
    choose: Callable[[Sequence[GateCandidate]], GateCandidate]


SAFE = ChoiceRule("safe", choose_gate)
MEAN = ChoiceRule("mean", choose_best_mean)
RULES: tuple[ChoiceRule, ...] = (SAFE, MEAN)
"""In order of preference when their held-out means tie (or nothing can be held out)."""


@dataclass(frozen=True)
class Calibration:
    """A calibrated gate, the table it was chosen from, the rule that chose it and each rule's
    leave-one-volume-out estimate (``None`` with fewer than two validation volumes)."""

    gate: GateConfig
    table: list[GateCandidate]
    rule: ChoiceRule
    cross_validation: dict[str, CrossValidation | None]


def calibrate_gate(cases: Sequence[ValidationPrediction], candidates: Sequence[GateConfig] | None = None,
                   *, progress: bool = False, corrected_input: bool = False) -> Calibration:
    """The calibrated gate with its table and rule (for the model card and the manifest);
    ``corrected_input`` as ``evaluate_candidates``'."""
    if not cases:
        raise ValueError("gate calibration needs at least one validation case")
    results = evaluate_candidates(cases, candidates, progress=progress, corrected_input=corrected_input)
    rule, estimates = choose_rule([c.name for c in cases], results)
    chosen = rule.choose(results).gate
    assert chosen is not None
    return Calibration(chosen, results, rule, estimates)


def predict_validation(ensemble: Ensemble, name: str, source: np.ndarray, target: np.ndarray,
                       voxel_size_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0), *,
                       attenuation: AttenuationField | None = None) -> ValidationPrediction:
    """An ensemble's whole-volume prediction of ``source`` for calibration (``predict_ensemble_volume``);
    members that read the corrected view read it through ``attenuation`` (a validation case's own
    estimate, ``ValidationCase.attenuation``), else through one estimated here, once."""
    if not ensemble.corrected_input:
        attenuation = None
    elif attenuation is None:
        attenuation = view_field(source, voxel_size_zyx)
    mean, spread = predict_ensemble_volume(ensemble, source, voxel_size_zyx, attenuation=attenuation)
    return ValidationPrediction(name, source, target, mean, spread, voxel_size_zyx,
                                None if attenuation is None else attenuation.full())


@dataclass(frozen=True)
class CrossValidation(_Scores):
    """Leave-one-volume-out: for each held-out volume, the gate chosen on the others and its
    N-SSIM on the held-out volume's cases."""

    folds: tuple[tuple[str, GateConfig, tuple[float, ...]], ...]

    @property  # type: ignore[override]
    def n_ssim(self) -> tuple[float, ...]:
        return tuple(v for _, _, scores in self.folds for v in scores)


def cross_validate(names: Sequence[str], table: Sequence[GateCandidate],
                   rule: ChoiceRule = SAFE) -> CrossValidation | None:
    """Leave-one-volume-out estimate of a choice rule from an ``evaluate_candidates`` table
    (``names``: the validation case names, in the table's order); None with fewer than 2 volumes."""
    volumes = sorted({volume_of(n) for n in names})
    if len(volumes) < 2:
        return None
    folds = []
    for held in volumes:
        inside = [i for i, n in enumerate(names) if volume_of(n) != held]
        outside = [i for i, n in enumerate(names) if volume_of(n) == held]
        chosen = rule.choose([GateCandidate(c.gate, tuple(c.n_ssim[i] for i in inside)) for c in table]).gate
        row = next(c for c in table if c.gate == chosen)
        folds.append((held, chosen, tuple(row.n_ssim[i] for i in outside)))
    return CrossValidation(tuple(folds))


def choose_rule(names: Sequence[str], table: Sequence[GateCandidate]
                ) -> tuple[ChoiceRule, dict[str, CrossValidation | None]]:
    """The rule whose leave-one-volume-out mean is best (``RULES`` order breaks ties; ``SAFE``
    when nothing can be held out), with every rule's estimate by name."""
    estimates = {rule.name: cross_validate(names, table, rule) for rule in RULES}
    scored = [(estimates[rule.name].mean, -i, rule) for i, rule in enumerate(RULES)  # type: ignore[union-attr]
              if estimates[rule.name] is not None]
    return (max(scored, key=lambda t: t[:2])[2] if scored else SAFE), estimates


# --------------------------------------------------------------------------- a saved ensemble


def recalibrate_gate(folder: Path, validation: Sequence[ValidationCase], *, channel: str, device: str = "cpu",
                     info: dict[str, Any] | None = None, progress: bool = False) -> GateConfig:
    """Calibrate an ensemble's gate and rewrite its manifest with the gate and the whole table.

    ``channel`` is the channel whose validation ``validation`` is: the manifest records it, since a
    gate belongs to the channel it was calibrated for (members copied from another channel's
    ensemble, as the shipped nucleus members are, take the new channel with their new gate).
    ``WeightsError`` when ``folder`` holds no ensemble (no readable manifest).
    """
    if not (folder / MANIFEST).is_file():
        raise WeightsError(f"no ensemble to calibrate in {folder} (no {MANIFEST}); train one first")
    manifest = read_manifest(folder)
    if info is None:
        info = manifest.get("info", {})
    calibration = calibrate_ensemble_gate(folder, validation, device=device, progress=progress)
    for name, cv in calibration.cross_validation.items():
        if cv is not None:
            log.info("leave-one-volume-out N-SSIM of the %r rule: mean %.4f, worst %.4f", name, cv.mean, cv.worst)
    cv = calibration.cross_validation[calibration.rule.name]
    if manifest.get("channel", channel) != channel:
        log.info("%s: manifest channel %s -> %s (the gate is calibrated on the %s validation)",
                 folder, manifest["channel"], channel, channel)
    write_manifest(folder, channel, gate=calibration.gate, info=strict_json({
        **info, "gate_cases": [v.name for v in validation], "gate_rule": calibration.rule.name,
        "gate_calibration": [c.to_dict() for c in calibration.table],
        "gate_cross_validation": None if cv is None else [
            {"held_out": held, "gate": g.to_dict(), "n_ssim": list(scores)} for held, g, scores in cv.folds],
        "gate_rule_cross_validation": {name: None if e is None else {"mean": e.mean, "worst": e.worst}
                                       for name, e in calibration.cross_validation.items()}}))
    return calibration.gate


def predict_ensemble_volume(ensemble: Ensemble, volume: np.ndarray,
                            voxel_size_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0), *,
                            attenuation: AttenuationField | None = None) -> np.ndarray:
    """Normalised (2, Z, Y, X) mean and spread of an ensemble over a whole volume, in the view's
    own brightness: members that read the corrected view (``Ensemble.corrected_input``) are fed
    it (``attenuation``, or the field estimated as inference estimates it, with the physical
    ``voxel_size_zyx``), and their mean and spread are divided by the field, as inference does
    before the gate."""
    norm = PercentileNorm.fit(volume)
    source, field = volume, None
    if ensemble.corrected_input:
        attenuation = view_field(volume, voxel_size_zyx, norm) if attenuation is None else attenuation
        source, field = CorrectedView(volume, attenuation, norm.low), attenuation.full()
    prediction = predict_normalised(source, ensemble.predict_block, margin=ensemble.margin, norm=norm,
                                    align=ensemble.alignment, device_type=ensemble.device.type)
    return prediction if field is None else prediction / field  # type: ignore[operator]


def calibrate_ensemble_gate(folder: Path, cases: Sequence[ValidationCase], *, device: str = "cpu",
                            progress: bool = False) -> Calibration:
    """Calibrate the do-no-harm gate of a saved ensemble on validation volumes; logs the table."""
    ensemble = load_ensemble(folder, device=device)
    predictions = [predict_validation(ensemble, c.name, c.source, c.target, c.voxel_size_zyx,
                                      attenuation=c.attenuation) for c in cases]
    corrected = ensemble.corrected_input
    calibration = calibrate_gate(predictions, corrected_input_candidates() if corrected else None,
                                 progress=progress, corrected_input=corrected)
    ungated = calibration.table[0]
    chosen = next(c for c in calibration.table if c.gate == calibration.gate)
    log.info("validation N-SSIM ungated: mean %.4f, worst %.4f; gated (%s rule) %s: mean %.4f, worst %.4f",
             ungated.mean, ungated.worst, calibration.rule.name, calibration.gate.to_dict(), chosen.mean,
             chosen.worst)
    return calibration
