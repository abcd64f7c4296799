"""Percentile normalisation, the Fuse My Cells way: ``(x - p_low) / (p_high - p_low)``, no clip.

Percentiles of integer volumes come from a histogram accumulated slab by slab, so a
1.1 G-voxel uint16 volume is never copied to float; the result equals ``np.percentile``
(linear interpolation) exactly. The same ``PercentileNorm`` maps network blocks forward and
predictions back to the input's intensities, and metrics use it to score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FMC_PERCENTILES: tuple[float, float] = (2.0, 99.8)
"""The challenge's normalisation percentiles (min 2, max 99.8)."""

_SLAB_VOXELS = 1 << 24  # about 16 M voxels per histogram slab


def z_slabs(n_z: int, plane_voxels: int, slab_voxels: int | None = None) -> list[tuple[int, int]]:
    """(z0, z1) ranges of whole planes covering ``n_z``, about ``slab_voxels`` voxels each
    (default ``_SLAB_VOXELS``), at least one plane."""
    step = max(1, (slab_voxels or _SLAB_VOXELS) // max(1, plane_voxels))
    return [(z0, min(z0 + step, n_z)) for z0 in range(0, n_z, step)]


def integer_histogram(volume: np.ndarray) -> tuple[np.ndarray, int]:
    """Counts of every value of an integer volume, accumulated over z-slabs.

    Returns ``(counts, offset)`` where ``counts[i]`` is the number of voxels equal to
    ``i + offset``. Works for any integer dtype up to 16 bits without a full-size copy.
    """
    if volume.dtype.kind not in "ui" or volume.dtype.itemsize > 2:
        raise TypeError(f"integer_histogram needs an integer dtype of <= 16 bits, got {volume.dtype}")
    offset = int(np.iinfo(volume.dtype).min)
    size = int(np.iinfo(volume.dtype).max) - offset + 1
    counts = np.zeros(size, dtype=np.int64)
    if volume.ndim == 3:
        vol = volume  # sliced on z only, so a lazily read volume (io.PagedVolume) works too
    else:
        vol = volume.reshape((-1,) + volume.shape[-2:]) if volume.ndim > 3 else volume[None]
    plane = int(np.prod(vol.shape[1:]))
    for z0, z1 in z_slabs(vol.shape[0], plane):
        slab = np.asarray(vol[z0:z1]).ravel()
        if offset:
            slab = slab.astype(np.int32) - offset
        counts += np.bincount(slab, minlength=size)
    return counts, offset


def _percentiles_from_histogram(
    counts: np.ndarray, offset: int, qs: tuple[float, ...]
) -> tuple[float, ...]:
    """``np.percentile(..., method='linear')`` evaluated on a histogram."""
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    out = []
    for q in qs:
        rank = (n - 1) * q / 100.0
        lo = int(np.floor(rank))
        frac = rank - lo
        v_lo = int(np.searchsorted(cumulative, lo, side="right"))
        v_hi = int(np.searchsorted(cumulative, min(lo + 1, n - 1), side="right"))
        out.append(float(v_lo + offset) + frac * float(v_hi - v_lo))
    return tuple(out)


def percentiles(volume: np.ndarray, qs: tuple[float, ...] = FMC_PERCENTILES) -> tuple[float, ...]:
    """Percentiles of all finite voxels, equal to ``np.percentile`` (linear interpolation).

    Integer volumes of <= 16 bits use a histogram (no float copy); other dtypes fall back to
    ``np.nanpercentile`` over the finite voxels.
    """
    if volume.size == 0:
        raise ValueError("cannot take percentiles of an empty volume")
    if volume.dtype.kind in "ui" and volume.dtype.itemsize <= 2:
        counts, offset = integer_histogram(volume)
        return _percentiles_from_histogram(counts, offset, qs)
    values = np.asarray(volume, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        values = values[finite]
        if values.size == 0:
            raise ValueError("volume has no finite voxel")
    return tuple(float(v) for v in np.percentile(values, qs))


@dataclass(frozen=True)
class PercentileNorm:
    """Affine map between raw intensities and the normalised scale where p_low -> 0, p_high -> 1.

    ``scale`` falls back to 1 for a constant volume (``p_low == p_high``) so the map stays
    invertible; callers that care test ``is_degenerate``.
    """

    low: float
    high: float

    @classmethod
    def fit(cls, volume: np.ndarray, qs: tuple[float, float] = FMC_PERCENTILES) -> PercentileNorm:
        low, high = percentiles(volume, qs)
        return cls(low=low, high=high)

    @property
    def is_degenerate(self) -> bool:
        return not self.high > self.low

    @property
    def scale(self) -> float:
        return self.high - self.low if not self.is_degenerate else 1.0

    @property
    def needs_float64(self) -> bool:
        """Whether float32 arithmetic would overflow or underflow this map (levels beyond about
        1e30, or a scale below 1e-30: float inputs near 1e300 or subnormal ones)."""
        return max(abs(self.low), abs(self.high)) > 1e30 or self.scale < 1e-30

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Raw intensities -> normalised float32 (no clipping); in float64 first when float32
        could not hold the raw values or ``1 / scale`` (see ``needs_float64``)."""
        if self.needs_float64:
            return ((np.asarray(x, dtype=np.float64) - self.low) / self.scale).astype(np.float32)
        out = np.asarray(x, dtype=np.float32) - np.float32(self.low)
        out *= np.float32(1.0 / self.scale)
        return out

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Normalised values -> raw intensity scale, float32."""
        out = np.asarray(y, dtype=np.float32) * np.float32(self.scale)
        out += np.float32(self.low)
        return out


def normalize(volume: np.ndarray, qs: tuple[float, float] = FMC_PERCENTILES) -> np.ndarray:
    """The challenge's normalisation of a whole volume, as float32."""
    return PercentileNorm.fit(volume, qs).forward(volume)


NORMALISED = PercentileNorm(low=0.0, high=1.0)
"""The identity map: for volumes already on the normalised scale."""
