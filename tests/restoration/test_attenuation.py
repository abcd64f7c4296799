"""The attenuation correction: which face the light came from, how fast it dimmed, and the field."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import beer_lambert, blob_specimen
from skimage.measure import block_reduce

from fusecare.optics import block_mean
from fusecare.restoration import attenuation as module
from fusecare.restoration.attenuation import (
    MAX_GAIN,
    estimate_attenuation,
    working_factors,
)

VOXEL = (1.0, 0.5, 0.5)


def specimen(rng: np.random.Generator, shape=(24, 96, 96)) -> np.ndarray:
    return blob_specimen(rng, shape)


def attenuate(signal: np.ndarray, axis: int, from_start: bool, rate: float) -> np.ndarray:
    return beer_lambert(signal, axis, from_start, rate, VOXEL[axis])


def trend(view: np.ndarray, axis: int) -> float:
    """90th percentile of the specimen's last third over its first third along ``axis``."""
    inside = view[2:-2, 8:-8, 8:-8]
    n = inside.shape[axis]
    first = np.take(inside, range(n // 3), axis=axis)
    last = np.take(inside, range(n - n // 3, n), axis=axis)
    return float(np.percentile(last[last > 0], 90) / np.percentile(first[first > 0], 90))


@pytest.mark.parametrize(("axis", "from_start"), [(1, True), (1, False), (2, True), (2, False)])
def test_the_entry_face_and_rate_are_found_and_the_far_side_is_brightened_back(rng, axis, from_start):
    clean = specimen(rng)
    view = attenuate(clean, axis, from_start, rate=0.1)
    assert trend(view, axis) < 0.4 if from_start else trend(view, axis) > 2.5  # strongly dimmed
    field = estimate_attenuation(view, VOXEL)
    assert field.illumination == f"{'zyx'[axis]} {'start' if from_start else 'end'}"
    assert 0.04 < field.illumination_rate < 0.15
    assert not field.rejected and field.brightest_gain < module.GUARD_RATIO
    corrected = view * field.region((slice(None),) * 3)
    assert 0.65 < trend(corrected, axis) < 1.5  # the trend is mostly gone, not reversed
    assert abs(np.corrcoef(corrected.ravel(), clean.ravel())[0, 1]) > 0.95


def test_a_view_without_attenuation_is_left_nearly_alone(rng):
    field = estimate_attenuation(specimen(rng), VOXEL)
    assert field.max_gain < 1.3


@pytest.mark.parametrize("volume", [np.zeros((16, 32, 32), np.float32), np.full((16, 32, 32), 7.0, np.float32)],
                         ids=["empty", "constant"])
def test_a_view_with_nothing_to_fit_gets_no_correction(volume):
    field = estimate_attenuation(volume, VOXEL)
    assert field.is_identity and field.max_gain == 1.0


def test_the_gain_is_capped(rng):
    view = attenuate(specimen(rng), 2, True, rate=0.5)  # far beyond the cap
    field = estimate_attenuation(view, VOXEL)
    assert field.max_gain == pytest.approx(MAX_GAIN)


def test_block_mean_is_scikit_images_block_reduce(rng):
    volume = rng.random((12, 20, 18)).astype(np.float32)
    np.testing.assert_allclose(block_mean(volume, (3, 4, 2)), block_reduce(volume, (3, 4, 2), np.mean), rtol=1e-6)
    np.testing.assert_allclose(block_mean(volume, (2, 2, 3), lambda s: 2 * s.astype(np.float32)),
                               block_reduce(2 * volume, (2, 2, 3), np.mean), rtol=1e-6)
    uneven = block_mean(volume[:11, :19], (3, 4, 2))  # edge blocks padded with their last plane
    np.testing.assert_allclose(uneven[-1, -1], np.pad(volume[:11, :19], ((0, 1), (0, 1), (0, 0)), mode="edge")
                               [9:12, 16:20].reshape(3, 4, 9, 2).mean(axis=(0, 1, 3)), rtol=1e-6)


def test_large_volumes_are_estimated_on_a_coarse_grid_and_interpolated_back(rng, monkeypatch):
    view = attenuate(specimen(rng), 2, False, rate=0.05)
    full = estimate_attenuation(view, VOXEL)
    monkeypatch.setattr(module, "WORKING_VOXELS", view.size // 8)
    assert working_factors(view.shape) == (2, 2, 2)
    coarse = estimate_attenuation(view, VOXEL)
    assert coarse.factors == (2, 2, 2) and coarse.coarse.shape == (12, 48, 48)
    assert coarse.illumination == full.illumination == "x end"
    whole = coarse.region((slice(None),) * 3)
    assert whole.shape == view.shape
    part = (slice(3, 17), slice(10, 50), slice(41, 90))
    np.testing.assert_allclose(coarse.region(part), whole[part], rtol=1e-6)  # a region is the whole's crop
    np.testing.assert_allclose(coarse.region((slice(5, 9),)), whole[5:9], rtol=1e-6)  # missing axes are whole
    inside = (slice(4, -4), slice(16, -16), slice(16, -16))
    assert np.median(np.abs(np.log(whole[inside] / full.region(inside)))) < 0.15


def test_working_factors_keep_every_axis_at_least_eight_voxels(monkeypatch):
    monkeypatch.setattr(module, "WORKING_VOXELS", 1000)
    assert working_factors((10, 400, 400)) == (1, 12, 12)  # cube root of 1,600, Z capped
    assert working_factors((5, 8, 8)) == (1, 1, 1)


def test_a_bright_object_near_one_face_is_not_taken_for_attenuation(rng, monkeypatch):
    """A bright object (5x the specimen's brightest, 12 voxels wide) near the start of Y, in an
    undimmed specimen: left out of the fit, the view gets at most a mild correction; fitted with
    it, the far side would be brightened up to the cap. A wider object still fools the fit (see
    ``BRIGHT_OBJECT_LEVEL``)."""
    view = specimen(rng)
    zz, yy, xx = np.mgrid[:24, :96, :96]
    blob = np.exp(-(((zz - 12) / 8.0) ** 2 + ((yy - 12) / 12.0) ** 2 + ((xx - 48) / 12.0) ** 2))
    view = np.maximum(view, 5.0 * view.max() * blob * (view > 0)).astype(np.float32)
    assert estimate_attenuation(view, VOXEL).max_gain < 2.0
    monkeypatch.setattr(module, "BRIGHT_OBJECT_LEVEL", 0.0)
    assert estimate_attenuation(view, VOXEL).max_gain > 5.0


@pytest.mark.parametrize("factor", [1, 2])
def test_a_region_with_steps_is_the_whole_fields_strided_crop(rng, monkeypatch, factor):
    view = attenuate(specimen(rng), 1, True, rate=0.08)
    monkeypatch.setattr(module, "WORKING_VOXELS", view.size // factor**3)
    field = estimate_attenuation(view, VOXEL)
    assert field.factors == (factor,) * 3
    whole = field.region((slice(None),) * 3)
    strided = (slice(1, 20, 3), slice(None, None, 2), slice(90, 10, -4))
    np.testing.assert_allclose(field.region(strided), whole[strided], rtol=1e-6)
    with pytest.raises(TypeError, match="three slices"):
        field.region((3, slice(None)))
    with pytest.raises(TypeError, match="three slices"):
        field.region((slice(None),) * 4)
    with pytest.raises(ValueError, match="read-only"):
        field.coarse[0, 0, 0] = 5.0  # every core reads the same grid


def test_a_field_from_the_wrong_face_is_rejected_and_said_so(rng, monkeypatch):
    """The guard: the right field of a view dimmed from the start of X passes; the same field
    mirrored (what an estimate naming the opposite face gives) would brighten the bright near
    side most, so it is rejected and the view left uncorrected, and ``describe`` says why."""
    view = attenuate(specimen(rng), 2, True, rate=0.1)
    right = module.estimate_on_grid(view, VOXEL)
    coarse = module.coarse_view(view, VOXEL)
    assert module.brightest_gain(coarse, right[0]) < 1.0 < module.GUARD_RATIO
    wrong = (np.flip(right[0], axis=2).copy(), "x end", *right[2:])
    assert module.brightest_gain(coarse, wrong[0]) > 1.5
    monkeypatch.setattr(module, "estimate_on_grid", lambda grid, voxel, faces, coarse=None: wrong)
    field = estimate_attenuation(view, VOXEL)
    assert field.rejected and field.is_identity and field.max_gain == 1.0
    assert field.brightest_gain > module.GUARD_RATIO
    assert field.describe().startswith("REJECTED, no correction") and "x end" in field.describe()


def test_a_named_entry_face_is_the_only_one_fitted(rng):
    """A view dimmed from the start of X: estimated, X start wins; told the light came from the
    end of Y, the estimate fits that face alone (and finds little dimming there). A name that is
    not a face is refused."""
    view = attenuate(specimen(rng), 2, True, rate=0.1)
    assert estimate_attenuation(view, VOXEL, light_from="x start").illumination == "x start"
    told = estimate_attenuation(view, VOXEL, light_from="y end")
    assert told.illumination == "y end" and told.illumination_rate < 0.03
    with pytest.raises(ValueError, match="light_from must be one of"):
        estimate_attenuation(view, VOXEL, light_from="left")
