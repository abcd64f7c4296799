"""Do-no-harm gating: blend the ensemble's prediction toward the input where members disagree.

``output = input + w * (prediction - input)``, ``w = 1 / (1 + (spread / spread_scale)**2)``, all
in the challenge's normalised scale. The scale is calibrated on validation volumes: among the
candidates, the one with the best mean N-SSIM whose worst case is not below 0; if none keeps
every case >= 0, the one with the best worst case (the most cautious). Public FMC entries found
that ungated restoration hurts on unseen content; this is the mechanism that keeps a bad case
from dominating a channel's mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fusecare.ensemble import GateConfig
from fusecare.metrics import score_ssim
from fusecare.normalize import PercentileNorm

DEFAULT_CANDIDATES: tuple[float, ...] = (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.35, 0.6, 1.0)


def gate_weight(spread: np.ndarray, spread_scale: float) -> np.ndarray:
    """Weight of the prediction against the input: 1 where members agree, -> 0 as they disagree."""
    ratio = spread / np.float32(spread_scale)
    return 1.0 / (1.0 + ratio * ratio)


def gated(x: np.ndarray, mean: np.ndarray, spread: np.ndarray, spread_scale: float | None) -> np.ndarray:
    """The gated prediction (all normalised); ``spread_scale=None`` is no gate."""
    if spread_scale is None:
        return mean
    return x + gate_weight(spread, spread_scale) * (mean - x)


@dataclass(frozen=True)
class GateCandidate:
    """N-SSIM over the validation cases for one spread scale (``None`` = ungated)."""

    spread_scale: float | None
    n_ssim: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.n_ssim))

    @property
    def worst(self) -> float:
        return float(np.min(self.n_ssim))


@dataclass(frozen=True)
class ValidationPrediction:
    """One validation case with the ensemble's normalised mean and spread."""

    name: str
    source: np.ndarray
    target: np.ndarray
    mean: np.ndarray
    spread: np.ndarray


def evaluate_candidates(cases: Sequence[ValidationPrediction],
                        candidates: Sequence[float] = DEFAULT_CANDIDATES) -> list[GateCandidate]:
    """N-SSIM of every case for no gate and for each candidate spread scale."""
    results = []
    for scale in (None, *candidates):
        scores = []
        for case in cases:
            x = PercentileNorm.fit(case.source).forward(case.source)
            scores.append(score_ssim(case.target, gated(x, case.mean, case.spread, scale), case.source).n_ssim)
        results.append(GateCandidate(scale, tuple(scores)))
    return results


def choose_gate(results: Sequence[GateCandidate]) -> GateCandidate:
    """Best mean among candidates whose worst case is >= 0, else the best worst case."""
    gated_results = [r for r in results if r.spread_scale is not None]
    safe = [r for r in gated_results if r.worst >= 0.0]
    if safe:
        return max(safe, key=lambda r: r.mean)
    return max(gated_results, key=lambda r: r.worst)


def calibrate_gate(cases: Sequence[ValidationPrediction],
                   candidates: Sequence[float] = DEFAULT_CANDIDATES
                   ) -> tuple[GateConfig, list[GateCandidate]]:
    """The calibrated gate and the whole table (for the model card and the manifest)."""
    if not cases:
        raise ValueError("gate calibration needs at least one validation case")
    results = evaluate_candidates(cases, candidates)
    chosen = choose_gate(results)
    return GateConfig(spread_scale=chosen.spread_scale), results


def predict_validation(name: str, source: np.ndarray, target: np.ndarray,
                       predict_volume: Callable[[np.ndarray], np.ndarray]) -> ValidationPrediction:
    """Wrap an ensemble's whole-volume (2, Z, Y, X) prediction of ``source`` for calibration."""
    mean, spread = predict_volume(source)
    return ValidationPrediction(name, source, target, mean, spread)
