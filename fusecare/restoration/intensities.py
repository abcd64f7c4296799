"""Intensities in and out: inputs that float32 arithmetic can handle, outputs in uint16.

The challenge wants uint16 outputs and scores every volume after its own percentile
normalisation, so each map here is the identity or positive-affine: invisible to the score.
``restore_volume`` maps its predictions with ``Uint16Map``, and the case runners repair an input
(``replace_non_finite``, ``rescale_float``) and write it back on a fallback (``input_as_uint16``):
one module says how intensities become uint16 for all of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from fusecare.errors import InputError
from fusecare.normalize import z_slabs

log = logging.getLogger(__name__)

UINT16_MAX = 65535
HEADROOM = 0.25
"""Fraction of the input's intensity span kept free above and below it in the uint16 output."""


@dataclass(frozen=True)
class Uint16Map:
    """Affine map from raw intensities to uint16: ``round(gain * v + offset)``, clipped.

    The output keeps the input's own scale when the input's range, widened by ``HEADROOM`` on
    both sides, fits in uint16; otherwise that widened range is stretched over 0..65535. So a
    prediction that over- or undershoots the input's range is not clipped, and the scale is
    positive-affine, to which the challenge's percentile normalisation is blind.
    """

    gain: float = 1.0
    offset: float = 0.0

    @classmethod
    def for_input(cls, low: float, high: float) -> Uint16Map:
        span = max(high - low, 1e-12)
        lo, hi = low - HEADROOM * span, high + HEADROOM * span
        if lo >= 0 and hi <= UINT16_MAX:
            return cls()
        gain = UINT16_MAX / (hi - lo)
        return cls(gain=gain, offset=-lo * gain)

    def apply(self, values: np.ndarray) -> tuple[np.ndarray, int]:
        """uint16 values and the number of voxels that had to be clipped."""
        scaled = np.asarray(values, dtype=np.float32)
        if self.gain != 1.0 or self.offset != 0.0:
            scaled = scaled * np.float32(self.gain) + np.float32(self.offset)
        rounded = np.rint(scaled)
        clipped = int(np.count_nonzero((rounded < 0) | (rounded > UINT16_MAX)))
        return np.clip(rounded, 0, UINT16_MAX).astype(np.uint16), clipped

    def apply_tensor(self, values: torch.Tensor) -> tuple[np.ndarray, int]:
        """``apply`` on the tensor's device: only the uint16 result crosses to the host."""
        scaled = values.float()
        if self.gain != 1.0 or self.offset != 0.0:
            scaled = scaled * float(np.float32(self.gain)) + float(np.float32(self.offset))
        rounded = torch.round(scaled)  # half to even, as np.rint
        clipped = int(((rounded < 0) | (rounded > UINT16_MAX)).sum())
        return rounded.clamp_(0, UINT16_MAX).to(torch.uint16).cpu().numpy(), clipped


def input_as_uint16(volume: np.ndarray) -> np.ndarray:
    """The input itself as uint16: unchanged values for uint16 (and any non-negative integer
    that fits); other dtypes through ``Uint16Map`` (positive-affine, so it scores N-SSIM 0)."""
    if volume.dtype == np.uint16:
        return volume
    low, high = float(volume.min()), float(volume.max())  # finite: replace_non_finite ran first
    if volume.dtype.kind in "ui" and low >= 0 and high <= UINT16_MAX:
        return volume.astype(np.uint16)
    out, _ = Uint16Map.for_input(low, high).apply(volume)
    return out


FLOAT_COMFORT = (1e-6, 1e9, 1e-4)
"""A float input is used as it is when its span is at least 1e-6, its largest magnitude at most
1e9 and its span at least 1e-4 of that magnitude; otherwise float32 arithmetic (normalisation,
the uint16 map) would overflow, underflow or round it to a constant: see ``rescale_float``."""

RESCALED_MAX = 60000.0
"""``rescale_float`` maps an input's [min, max] onto [0, RESCALED_MAX]."""


def rescale_float(volume: np.ndarray, name: str) -> np.ndarray:
    """A float volume whose values float32 arithmetic cannot handle, rescaled affinely.

    Inputs near 1e300, subnormal ones, or ones spanning 1e-12 came out constant: float32 casts
    overflow to Inf, ``1 / scale`` overflows, or the span rounds away. The metric normalises
    every volume by its own percentiles, so a positive-affine map is invisible to it: the
    [min, max] of such an input is mapped onto [0, ``RESCALED_MAX``] in float64, slab by slab,
    with one warning. Other volumes (and constant ones) are returned unchanged.
    """
    if volume.dtype.kind != "f" or volume.size == 0:
        return volume
    low, high = float(volume.min()), float(volume.max())
    span, magnitude = high - low, max(abs(low), abs(high))
    min_span, max_magnitude, min_relative = FLOAT_COMFORT
    if span == 0 or (span >= min_span and magnitude <= max_magnitude and span >= min_relative * magnitude):
        return volume
    if not np.isfinite(span):  # e.g. -1e308 .. 1e308: halve first
        low, high = low / 2, high / 2
        span = high - low
        halve = True
    else:
        halve = False
    out = np.empty(volume.shape, dtype=np.float32)
    plane = int(np.prod(volume.shape[1:])) if volume.ndim > 1 else 1
    for z0, z1 in z_slabs(volume.shape[0], plane):
        slab = np.asarray(volume[z0:z1], dtype=np.float64)
        if halve:
            slab = slab / 2
        out[z0:z1] = (slab - low) / span * RESCALED_MAX
    log.warning("%s: float input spans [%g, %g], beyond what float32 arithmetic keeps: rescaled "
                "affinely to [0, %g] (the metric's normalisation is blind to it)", name,
                float(volume.min()), float(volume.max()), RESCALED_MAX)
    return out


def replace_non_finite(volume: np.ndarray, name: str) -> np.ndarray:
    """NaN and -Inf -> the lowest finite value, +Inf -> the highest; one warning with counts."""
    if volume.dtype.kind != "f":
        return volume
    finite = np.isfinite(volume)
    bad = finite.size - int(np.count_nonzero(finite))
    if not bad:
        return volume
    if not finite.any():
        raise InputError(f"{name}: no finite voxel (all NaN/Inf)")
    low, high = float(volume[finite].min()), float(volume[finite].max())
    volume = np.array(volume, copy=True)
    volume[np.isposinf(volume)] = high
    volume[~np.isfinite(volume)] = low
    log.warning("%s: %d non-finite voxel(s) (NaN/Inf) replaced by the finite min/max", name, bad)
    return volume
