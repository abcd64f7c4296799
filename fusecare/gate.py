"""Do-no-harm gating: blend the ensemble's prediction toward the input where members disagree.

``output = f + blend * w * (prediction - f)``, ``w = 1 / (1 + (spread / spread_scale)**2)``, all in
the challenge's normalised scale, where ``f`` is the fallback: the input itself, or the input
lightly Gaussian-smoothed (``fallback_sigma`` voxels; light smoothing alone already beats copying
the input on most volumes, and it errs differently from the networks, so the blend gains from
both), and the prediction is the members' mean, optionally lightly smoothed (``prediction_sigma``:
networks trained for minutes on a CPU keep some of the input's noise, which SSIM punishes in the
background). The members' spread is optionally smoothed first (``spread_sigma`` voxels) so the weight map
is not a voxel-wise patchwork of prediction and input, which SSIM punishes. ``blend = 0`` with no
fallback smoothing is the input itself: a candidate that always scores 0.

The gate is calibrated on validation volumes: among the candidates whose worst case is not
below 0, the one with the best mean N-SSIM (so the input-only candidate is chosen when nothing
else is safe). Public FMC entries found that ungated restoration hurts on unseen content; this
keeps a bad case from dominating a channel's mean.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from fusecare.config import Config, param
from fusecare.metrics import fmc_ssim, n_ssim
from fusecare.normalize import PercentileNorm


class GateConfig(Config):
    """The calibrated gate of an ensemble, stored in its manifest."""

    spread_scale: float = param(0.05, doc="Spread (normalised units) at which the prediction and the "
                                "input get equal weight.", gt=0.0, le=10.0)
    blend: float = param(1.0, doc="Share of the gated correction applied (0 = the input itself).",
                         ge=0.0, le=1.0)
    spread_sigma: float = param(0.0, doc="Gaussian smoothing of the spread map before weighting "
                                "(voxels; tiles widen by its reach, see ``context``).", ge=0.0, le=4.0)
    fallback_sigma: float = param(0.0, doc="Gaussian smoothing of the input that the gate falls back to "
                                  "(voxels; 0 = the input itself).", ge=0.0, le=4.0)
    prediction_sigma: float = param(0.0, doc="Gaussian smoothing of the members' mean before blending "
                                    "(voxels; briefly trained networks leave noise that the targets lack).",
                                    ge=0.0, le=4.0)

    @property
    def keeps_input(self) -> bool:
        """The output is the input itself: predicting would change nothing."""
        return self.blend == 0.0 and self.fallback_sigma == 0.0

    @property
    def context(self) -> float:
        """How far (voxels) the gate's smoothing reaches: tiles need this much more margin."""
        return SMOOTHING_TRUNCATE * max(self.spread_sigma, self.fallback_sigma, self.prediction_sigma)


SCALES: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
BLENDS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
SIGMAS: tuple[float, ...] = (0.0, 2.0)
FALLBACK_SIGMAS: tuple[float, ...] = (0.0, 0.5, 0.8)
PREDICTION_SIGMAS: tuple[float, ...] = (0.0, 0.5, 1.0)
INPUT_ONLY = GateConfig(blend=0.0)
SMOOTHING_TRUNCATE = 4.0
"""Gaussian smoothing reaches this many sigmas (``smooth``); tiles widen by as much (``context``)."""
SAFETY_TOLERANCE = 1e-6
"""A worst-case N-SSIM above -1e-6 counts as not below 0 (float rounding of the metric)."""


def default_candidates() -> list[GateConfig]:
    """The input itself, the smoothed inputs, then every (scale, blend, sigmas) of the grid."""
    return ([INPUT_ONLY] + [GateConfig(blend=0.0, fallback_sigma=f) for f in FALLBACK_SIGMAS if f > 0]
            + [GateConfig(spread_scale=s, blend=b, spread_sigma=g, fallback_sigma=f, prediction_sigma=p)
               for s, b, g, f, p in itertools.product(SCALES, BLENDS, SIGMAS, FALLBACK_SIGMAS, PREDICTION_SIGMAS)])


def gate_weight(spread: np.ndarray, spread_scale: float) -> np.ndarray:
    """Weight of the prediction against the input: 1 where members agree, -> 0 as they disagree."""
    ratio = spread / np.float32(spread_scale)
    return 1.0 / (1.0 + ratio * ratio)


def smooth(volume: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing as the gate does it (reflect, ``SMOOTHING_TRUNCATE`` sigmas); the volume
    itself at sigma 0."""
    if sigma <= 0:
        return volume
    return ndimage.gaussian_filter(volume, sigma, mode="reflect", truncate=SMOOTHING_TRUNCATE)


def gated(fallback: np.ndarray, mean: np.ndarray, spread: np.ndarray, gate: GateConfig | None) -> np.ndarray:
    """The gated prediction (all normalised; mean, spread and fallback already smoothed by the
    gate's sigmas, see ``smooth``); ``None`` is no gate."""
    if gate is None:
        return mean
    if gate.blend == 0.0:
        return fallback
    return fallback + (np.float32(gate.blend) * gate_weight(spread, gate.spread_scale)) * (mean - fallback)


@dataclass(frozen=True)
class GateCandidate:
    """N-SSIM over the validation cases for one gate (``None`` = ungated)."""

    gate: GateConfig | None
    n_ssim: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.n_ssim))

    @property
    def worst(self) -> float:
        return float(np.min(self.n_ssim))

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


def score_gate(target: np.ndarray, target_norm: PercentileNorm, ssim_input: float, fallback: np.ndarray,
               mean: np.ndarray, spread: np.ndarray, gate: GateConfig | None) -> float:
    """N-SSIM of a gated prediction against a target whose input scores ``ssim_input``.

    ``fallback``, ``mean`` and ``spread`` are already smoothed by the gate's sigmas. The input-only gate
    is the input itself: exactly 0, without scoring it again.
    """
    if gate is not None and gate.keeps_input:
        return 0.0
    return n_ssim(fmc_ssim(target, gated(fallback, mean, spread, gate), target_norm=target_norm), ssim_input)


def evaluate_candidates(cases: Sequence[ValidationPrediction], candidates: Sequence[GateConfig] | None = None,
                        *, progress: bool = False) -> list[GateCandidate]:
    """N-SSIM of every case without a gate and with each candidate gate.

    Per case, the target's normalisation, the input's SSIM and each smoothing of the mean, the
    spread and the input are computed once, not once per candidate. ``progress`` shows a bar over
    the candidates (the default grid has 723: about 105 s per 64x256x256 case on 2 CPU cores).
    """
    candidates = default_candidates() if candidates is None else candidates
    prepared = []
    for case in cases:
        target_norm = PercentileNorm.fit(case.target)
        prepared.append((target_norm, fmc_ssim(case.target, case.source, target_norm=target_norm),
                         PercentileNorm.fit(case.source).forward(case.source)))
    smoothed: dict[tuple[str, int, float], np.ndarray] = {}

    def cached(kind: str, i: int, sigma: float, volume: np.ndarray) -> np.ndarray:
        if (kind, i, sigma) not in smoothed:
            smoothed[kind, i, sigma] = smooth(volume, sigma)
        return smoothed[kind, i, sigma]

    results = []
    for gate in tqdm((None, *candidates), desc="gate calibration", unit="gate", disable=not progress, leave=False):
        spread_sigma, fallback_sigma, prediction_sigma = (
            (gate.spread_sigma, gate.fallback_sigma, gate.prediction_sigma) if gate else (0.0, 0.0, 0.0))
        scores = []
        for i, (case, (target_norm, ssim_input, x)) in enumerate(zip(cases, prepared)):
            scores.append(score_gate(case.target, target_norm, ssim_input, cached("input", i, fallback_sigma, x),
                                     cached("mean", i, prediction_sigma, case.mean),
                                     cached("spread", i, spread_sigma, case.spread), gate))
        results.append(GateCandidate(gate, tuple(scores)))
    return results


def choose_gate(results: Sequence[GateCandidate]) -> GateCandidate:
    """Best mean among gates whose worst case is >= 0, else the best worst case."""
    gated_results = [r for r in results if r.gate is not None]
    safe = [r for r in gated_results if r.worst >= -SAFETY_TOLERANCE]
    if safe:
        return max(safe, key=lambda r: r.mean)
    return max(gated_results, key=lambda r: r.worst)


def calibrate_gate(cases: Sequence[ValidationPrediction], candidates: Sequence[GateConfig] | None = None,
                   *, progress: bool = False) -> tuple[GateConfig, list[GateCandidate]]:
    """The calibrated gate and the whole table (for the model card and the manifest)."""
    if not cases:
        raise ValueError("gate calibration needs at least one validation case")
    results = evaluate_candidates(cases, candidates, progress=progress)
    chosen = choose_gate(results).gate
    assert chosen is not None
    return chosen, results


def predict_validation(name: str, source: np.ndarray, target: np.ndarray,
                       predict_volume: Callable[[np.ndarray], np.ndarray]) -> ValidationPrediction:
    """Wrap an ensemble's whole-volume (2, Z, Y, X) prediction of ``source`` for calibration."""
    mean, spread = predict_volume(source)
    return ValidationPrediction(name, source, target, mean, spread)
