"""The safety net: blend the ensemble's prediction toward the (smoothed) input where it is not trusted.

``output = f + blend * w * (prediction - f)``, all in the challenge's normalised scale, with
``w = w_spread * w_consistency``:

* ``w_spread = 1 / (1 + (spread / spread_scale)**2)``: the members disagree;
* ``w_consistency = 1 / (1 + (c / consistency_scale)**2)``, ``c = |G_consistency_sigma * (prediction - f)|``:
  the prediction moves a whole region's intensity away from the input's. Members trained alike
  share their systematic errors (on unseen content, brightening dim structure and flattening a
  saturated object, so that the metric's own percentile normalisation no longer matches the
  target's), and their spread stays low there; a restoration should sharpen and denoise, which
  changes fine detail, not the local mean over several voxels. This term sees what disagreement
  cannot. ``consistency_scale = 0`` switches it off.

``f`` is the fallback: the input itself, or the input
lightly Gaussian-smoothed (``fallback_sigma`` voxels; light smoothing alone already beats copying
the input on most volumes, and it errs differently from the networks, so the blend gains from
both), and the prediction is the members' mean, optionally lightly smoothed (``prediction_sigma``:
networks trained for minutes on a CPU keep some of the input's noise, which SSIM punishes in the
background). The members' spread is optionally smoothed first (``spread_sigma`` voxels) so the weight map
is not a voxel-wise patchwork of prediction and input, which SSIM punishes. ``blend = 0`` uses no
prediction at all (the network need not run: ``needs_prediction``); with no fallback smoothing and
no attenuation correction either, it is the input itself, a candidate that always scores 0
(``keeps_input``).

A gate may then multiply its output by the view's attenuation field (``correct_attenuation``;
the field comes from a whole-volume pass, ``fusecare.restoration.attenuation``, and is passed
in per region): the blend above decides detail region by region, the field restores the
brightness a single view lost along the light's path. It multiplies after the blend, so the
consistency term compares prediction and input before it, as calibrated.

Both weights are per voxel, so the net decides per region. Everything here works on one whole
tile (``gate_fields``) and then on its core (``gated``); ``GateConfig.radius`` says how far the
smoothing reaches, so tiles widen by as much and stay exact. Inference, training's calibration
and the benchmark all go through these functions; choosing a gate lives in
``fusecare.training.calibration``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from scipy import ndimage

from fusecare.config import Config, param


class GateConfig(Config):
    """The calibrated gate of an ensemble, stored in its manifest."""

    spread_scale: float = param(0.05, doc="Spread (normalised units) at which the prediction and the "
                                "input get equal weight.", gt=0.0, le=10.0)
    blend: float = param(1.0, doc="Share of the gated correction applied (0 = the input itself).",
                         ge=0.0, le=1.0)
    spread_sigma: float = param(0.0, doc="Gaussian smoothing of the spread map before weighting "
                                "(voxels; tiles widen by its reach, see ``radius``).", ge=0.0, le=4.0)
    fallback_sigma: float = param(0.0, doc="Gaussian smoothing of the input that the gate falls back to "
                                  "(voxels; 0 = the input itself).", ge=0.0, le=4.0)
    prediction_sigma: float = param(0.0, doc="Gaussian smoothing of the members' mean before blending "
                                    "(voxels; briefly trained networks leave noise that the targets lack).",
                                    ge=0.0, le=4.0)
    consistency_scale: float = param(0.0, doc="Local-mean shift (normalised units) between prediction and "
                                     "fallback at which the prediction gets half weight (0 = off).",
                                     ge=0.0, le=10.0)
    consistency_sigma: float = param(4.0, doc="Gaussian scale (voxels) of the local mean the consistency "
                                     "term compares: coarser than the detail a restoration adds.",
                                     gt=0.0, le=16.0)
    correct_attenuation: bool = param(False, doc="Multiply the gated output by the view's estimated "
                                      "attenuation field (``fusecare.restoration.attenuation``: a coarse "
                                      "whole-volume pass that brightens the single view's far side as a "
                                      "fused volume is).")

    @property
    def keeps_input(self) -> bool:
        """The output is the input itself: predicting would change nothing."""
        return not self.needs_prediction and self.fallback_sigma == 0.0 and not self.correct_attenuation

    @property
    def needs_prediction(self) -> bool:
        """The output depends on the members' prediction (``blend > 0``); otherwise it is the
        fallback (times the attenuation field) and the network need not run."""
        return self.blend > 0.0

    @property
    def radius(self) -> int:
        """Voxels the gate's smoothing reaches, each kernel's radius as its filter rounds it
        (``kernel_radius``), the consistency term's added to the smoothings it compares: tiles
        widen by this much, and a gate run over a slab of planes is exact at the slab's own
        planes when the slab is read this much wider on both sides."""
        reach = max(kernel_radius(self.spread_sigma), kernel_radius(self.fallback_sigma),
                    kernel_radius(self.prediction_sigma))
        if self.consistency_scale > 0:
            reach = max(reach, kernel_radius(self.consistency_sigma)
                        + max(kernel_radius(self.fallback_sigma), kernel_radius(self.prediction_sigma)))
        return reach


INPUT_ONLY = GateConfig(blend=0.0)
SMOOTHING_TRUNCATE = 4.0
"""Gaussian smoothing reaches this many sigmas (``smooth``); tiles widen by as much (``GateConfig.radius``)."""


def kernel_radius(sigma: float) -> int:
    """Voxels one Gaussian of ``sigma`` reaches as ``smooth`` truncates it (scipy's
    ``int(truncate * sigma + 0.5)``); 0 for no smoothing."""
    return int(SMOOTHING_TRUNCATE * float(sigma) + 0.5) if sigma > 0 else 0


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


def consistency_map(mean: np.ndarray, fallback: np.ndarray, sigma: float) -> np.ndarray:
    """|local mean of (prediction - fallback)|: how far the prediction moves a region's intensity."""
    return np.abs(smooth(mean - fallback, sigma))


FIELDS = ("mean", "gate_spread", "fallback", "consistency")
"""What ``gate_fields`` stacks: the gate's smoothed mean, the gate's smoothed spread, the fallback
and the consistency map (the uncertainty output reads the members' own spread, not these)."""


def gate_fields(gate: GateConfig, block: np.ndarray, mean: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Everything ``gated`` needs for one whole tile (normalised input ``block``, the members'
    mean and spread), stacked as ``FIELDS``; smoothing needs the tile's context, so this runs
    before the tile's margins are cropped. Each field is written straight into the stack (no
    per-field arrays stacked afterwards, no zero map computed when the consistency term is off)."""
    fields = np.empty((len(FIELDS), *mean.shape), dtype=np.float32)
    _smooth_into(fields[0], mean, gate.prediction_sigma)
    _smooth_into(fields[1], spread, gate.spread_sigma)
    _smooth_into(fields[2], block, gate.fallback_sigma)
    if gate.consistency_scale > 0:
        np.subtract(fields[0], fields[2], out=fields[3])
        np.abs(smooth(fields[3], gate.consistency_sigma), out=fields[3])
    else:
        fields[3] = 0.0
    return fields


def _smooth_into(out: np.ndarray, volume: np.ndarray, sigma: float) -> None:
    """``smooth`` written into ``out``."""
    if sigma <= 0:
        out[...] = volume
    else:
        ndimage.gaussian_filter(volume, sigma, mode="reflect", truncate=SMOOTHING_TRUNCATE, output=out)


def gated(fallback: np.ndarray, mean: np.ndarray, spread: np.ndarray, gate: GateConfig | None,
          consistency: np.ndarray | None = None, attenuation: np.ndarray | None = None) -> np.ndarray:
    """The gated prediction (all normalised; mean, spread, fallback and consistency as
    ``gate_fields`` makes them); ``None`` is no gate. A gate that corrects attenuation needs the
    field over the same voxels (``AttenuationField.region``)."""
    if gate is None:
        return mean
    return _blend(fallback, mean, spread, consistency, attenuation, gate, gate_weight)


Field = TypeVar("Field", np.ndarray, torch.Tensor)


def _blend(fallback: Field, mean: Field, spread: Field, consistency: Field | None, attenuation: Field | None,
           gate: GateConfig, weight: Callable[[Field, float], Field]) -> Field:
    """The gate's arithmetic on numpy arrays or tensors alike (``weight``: ``gate_weight`` or its
    torch twin), so the two devices compute one formula."""
    if gate.blend == 0.0:
        out = fallback
    else:
        w = float(np.float32(gate.blend)) * weight(spread, gate.spread_scale)
        if gate.consistency_scale > 0:
            if consistency is None:
                raise ValueError("a gate with a consistency term needs the consistency map")
            w = w * weight(consistency, gate.consistency_scale)
        out = fallback + w * (mean - fallback)
    if gate.correct_attenuation:
        if attenuation is None:
            raise ValueError("a gate that corrects attenuation needs the attenuation field")
        out = out * attenuation
    return out


def gated_fields(fields: np.ndarray, gate: GateConfig, attenuation: np.ndarray | None = None) -> np.ndarray:
    """``gated`` of a ``gate_fields`` stack (or a crop of one)."""
    mean, gate_spread, fallback, consistency = fields
    return gated(fallback, mean, gate_spread, gate, consistency, attenuation)




# --------------------------------------------------------------------------- the same gate in torch
#
# On CUDA the numpy gate would pull every whole widened tile (members' mean and spread, float32)
# to the host and smooth it on the CPU, serially with the GPU: 0.57 s per 112x272x272 tile, about
# 275 s of a membrane case before any network work. These twins run where the tensors are, so only
# the finished core leaves the device. They equal the numpy functions to float32 rounding
# (tests/restoration/test_gate.py), so the calibrated gate means the same thing on either device.


def gaussian_kernel1d(sigma: float, truncate: float = SMOOTHING_TRUNCATE) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian weights (radius ``int(truncate * sigma + 0.5)``), float64."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (x / sigma) ** 2)
    return weights / weights.sum()


def _symmetric_index(size: int, radius: int) -> np.ndarray:
    """Indices padding an axis by ``radius`` on both sides as scipy's ``mode='reflect'`` does
    (``d c b a | a b c d | d c b a``, repeating for radii longer than the axis); torch's own
    'reflect' drops the edge voxel, so it would not match."""
    index = np.arange(-radius, size + radius)
    period = 2 * size
    index = np.mod(index, period)
    return np.where(index >= size, period - 1 - index, index)


def smooth_torch(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """``smooth`` for a float tensor on any device, over its last three axes (a volume, or a batch
    of them, (N, C, Z, Y, X)): separable conv1d per axis."""
    if sigma <= 0:
        return volume
    kernel64 = gaussian_kernel1d(sigma)
    radius = (len(kernel64) - 1) // 2
    kernel = torch.from_numpy(kernel64.astype(np.float32)).to(device=volume.device, dtype=volume.dtype).view(1, 1, -1)
    out = volume
    for axis in range(volume.dim() - 3, volume.dim()):
        size = out.shape[axis]
        index = torch.from_numpy(_symmetric_index(size, radius)).to(volume.device)
        padded = out.index_select(axis, index).movedim(axis, -1)
        shape = padded.shape
        filtered = torch.nn.functional.conv1d(padded.reshape(-1, 1, shape[-1]), kernel)
        out = filtered.reshape(*shape[:-1], size).movedim(-1, axis)
    return out.contiguous()


def gate_weight_torch(spread: torch.Tensor, spread_scale: float) -> torch.Tensor:
    """``gate_weight`` for tensors."""
    ratio = spread / float(np.float32(spread_scale))
    return 1.0 / (1.0 + ratio * ratio)


def gate_fields_torch(gate: GateConfig, block: torch.Tensor, mean: torch.Tensor,
                      spread: torch.Tensor) -> torch.Tensor:
    """``gate_fields`` for float32 tensors on any device (the ensemble's)."""
    mean_s = smooth_torch(mean, gate.prediction_sigma)
    fallback = smooth_torch(block, gate.fallback_sigma)
    consistency = (smooth_torch(mean_s - fallback, gate.consistency_sigma).abs() if gate.consistency_scale > 0
                   else torch.zeros_like(mean_s))
    return torch.stack([mean_s, smooth_torch(spread, gate.spread_sigma), fallback, consistency])


def gated_fields_torch(fields: torch.Tensor, gate: GateConfig,
                       attenuation: torch.Tensor | None = None) -> torch.Tensor:
    """``gated_fields`` for a tensor stack (or a crop of one)."""
    mean, gate_spread, fallback, consistency = fields
    return _blend(fallback, mean, gate_spread, consistency, attenuation, gate, gate_weight_torch)
