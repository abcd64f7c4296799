"""Percentile normalisation: exact histogram percentiles, forward/inverse maps, degenerate volumes."""

from __future__ import annotations

import numpy as np
import pytest

from fusecare import normalize as nz
from fusecare.normalize import PercentileNorm, integer_histogram, percentiles


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int8])
def test_histogram_percentiles_equal_numpy(rng, dtype):
    info = np.iinfo(dtype)
    volume = rng.integers(info.min, info.max, size=(7, 33, 29), endpoint=True).astype(dtype)
    qs = (0.0, 2.0, 37.3, 50.0, 99.8, 100.0)
    expected = np.percentile(volume.astype(np.float64), qs)
    np.testing.assert_allclose(percentiles(volume, qs), expected, rtol=0, atol=1e-9)


def test_histogram_is_accumulated_over_slabs(monkeypatch, rng):
    monkeypatch.setattr(nz, "_SLAB_VOXELS", 50)  # forces many slabs of one plane each
    volume = rng.integers(0, 4000, size=(9, 10, 11)).astype(np.uint16)
    counts, offset = integer_histogram(volume)
    assert offset == 0 and counts.sum() == volume.size
    np.testing.assert_array_equal(counts[:4000], np.bincount(volume.ravel(), minlength=4000))


def test_float_percentiles_ignore_non_finite(rng):
    volume = rng.normal(size=(4, 20, 20)).astype(np.float32)
    volume[0, 0, :5] = np.nan
    volume[1, 1, 1] = np.inf
    finite = volume[np.isfinite(volume)]
    np.testing.assert_allclose(percentiles(volume), np.percentile(finite, (2, 99.8)), rtol=1e-6)


def test_forward_maps_percentiles_to_zero_and_one_without_clipping(rng):
    volume = rng.integers(0, 1000, size=(5, 40, 40)).astype(np.uint16)
    norm = PercentileNorm.fit(volume)
    low, high = np.percentile(volume, (2, 99.8))
    y = norm.forward(volume)
    assert y.dtype == np.float32
    np.testing.assert_allclose(norm.forward(np.array([low, high])), [0.0, 1.0], atol=1e-6)
    assert y.min() < 0 and y.max() > 1  # no clipping
    np.testing.assert_allclose(norm.inverse(y), volume, atol=1e-3 * high)


def test_constant_volume_is_degenerate_but_invertible():
    norm = PercentileNorm.fit(np.full((3, 8, 8), 7, np.uint16))
    assert norm.is_degenerate and norm.scale == 1.0
    np.testing.assert_array_equal(norm.inverse(norm.forward(np.array([7.0, 9.0]))), [7.0, 9.0])


@pytest.mark.parametrize(("scale", "dtype"), [(1e296, np.float64), (1e-42, np.float32)])
def test_forward_of_extreme_float_volumes_stays_finite(scale, dtype):
    """Float32 arithmetic overflowed on values near 1e300 and on 1 / scale of subnormal ones."""
    base = np.linspace(0.0, 1000.0, 4096).reshape(4, 32, 32)
    volume = (base * scale).astype(dtype)
    out = PercentileNorm.fit(volume).forward(volume)
    reference = PercentileNorm.fit(base).forward(base)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, reference, atol=1e-3)
