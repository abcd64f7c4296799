"""Intensities in and out (``fusecare/restoration/intensities.py``): the uint16 map with its headroom,
the input as uint16, non-finite voxels replaced and extreme floats rescaled."""

from __future__ import annotations

import numpy as np
import pytest

from fusecare.restoration.intensities import HEADROOM, Uint16Map, input_as_uint16, replace_non_finite


@pytest.fixture
def volume(rng) -> np.ndarray:
    """Intensities with room for the output headroom, so the output keeps the input's scale."""
    return rng.integers(2000, 5000, size=(20, 50, 40)).astype(np.uint16)


def test_uint16_map_identity_when_room_else_stretch():
    assert Uint16Map.for_input(1000, 2000) == Uint16Map()
    stretched = Uint16Map.for_input(0, 60000)
    low, high = -HEADROOM * 60000, 60000 * (1 + HEADROOM)
    out, clipped = stretched.apply(np.array([low, high, high * 1.01]))
    assert out.tolist()[:2] == [0, 65535] and clipped == 1


def test_input_as_uint16_keeps_values_or_maps_positively(rng):
    u16 = rng.integers(0, 65535, size=(3, 8, 8)).astype(np.uint16)
    assert input_as_uint16(u16) is u16
    u8 = rng.integers(0, 255, size=(3, 8, 8)).astype(np.uint8)
    np.testing.assert_array_equal(input_as_uint16(u8), u8)
    f32 = rng.normal(size=(3, 8, 8)).astype(np.float32)
    mapped = input_as_uint16(f32)
    assert mapped.dtype == np.uint16
    assert np.corrcoef(mapped.ravel(), f32.ravel())[0, 1] > 0.9999


def test_non_finite_voxels_are_replaced_with_finite_extremes(caplog):
    volume = np.array([[[1.0, np.nan, np.inf, -np.inf, 3.0]]], dtype=np.float32)
    fixed = replace_non_finite(volume, "x.tif")
    np.testing.assert_array_equal(fixed, [[[1.0, 1.0, 3.0, 1.0, 3.0]]])
    assert "3 non-finite voxel(s)" in caplog.text


@pytest.mark.parametrize(("scale", "offset", "dtype"), [(1e300, 0.0, np.float64), (1e-42, 0.0, np.float32),
                                                         (1e-12, 0.0, np.float64), (1e-9, 1.0, np.float64),
                                                         (1e308, -1e308, np.float64)])
def test_rescale_float_keeps_the_structure_of_extreme_float_inputs(rng, scale, offset, dtype):
    from fusecare.restoration.intensities import rescale_float

    base = rng.random((4, 16, 16))
    volume = (base * scale + offset).astype(dtype)
    out = rescale_float(volume, "x.tif")
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert np.corrcoef(out.ravel(), base.ravel())[0, 1] > 0.99
    assert len(np.unique(input_as_uint16(out))) > 500


def test_rescale_float_leaves_ordinary_volumes_alone(volume):
    from fusecare.restoration.intensities import rescale_float

    floats = volume.astype(np.float32)
    assert rescale_float(floats, "x") is floats
    assert rescale_float(volume, "x") is volume
