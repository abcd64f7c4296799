"""The safety net: weights, smoothing, the consistency term and its reach."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from fusecare.normalize import PercentileNorm
from fusecare.restoration.gate import (
    FIELDS,
    INPUT_ONLY,
    GateConfig,
    consistency_map,
    gate_fields,
    gate_fields_torch,
    gate_weight,
    gated,
    gated_fields,
    gated_fields_torch,
    smooth,
    smooth_torch,
)
from fusecare.scoring.metrics import score_ssim


def test_gate_weight_and_blend():
    np.testing.assert_allclose(gate_weight(np.array([0.0, 0.05, 0.1]), 0.05), [1.0, 0.5, 0.2])
    x, mean, spread = np.zeros(3), np.ones(3), np.array([0.0, 0.05, 1e6])
    np.testing.assert_allclose(gated(x, mean, spread, GateConfig(spread_scale=0.05)), [1.0, 0.5, 0.0], atol=1e-9)
    np.testing.assert_allclose(gated(x, mean, spread, GateConfig(spread_scale=0.05, blend=0.5)),
                               [0.5, 0.25, 0.0], atol=1e-9)
    np.testing.assert_array_equal(gated(x, mean, spread, None), mean)
    np.testing.assert_array_equal(gated(x, mean, spread, INPUT_ONLY), x)


def test_fallback_is_the_smoothed_input(rng):
    x = rng.random((6, 12, 12)).astype(np.float32)
    assert smooth(x, 0.0) is x
    np.testing.assert_allclose(smooth(x, 0.8), ndimage.gaussian_filter(x, 0.8, mode="reflect", truncate=4.0))
    smoothed_input_only = GateConfig(blend=0.0, fallback_sigma=0.8)
    assert INPUT_ONLY.keeps_input and not smoothed_input_only.keeps_input
    assert GateConfig(spread_sigma=1.0, fallback_sigma=0.5).radius == 4
    assert GateConfig(spread_sigma=1.0, prediction_sigma=1.5).radius == 6
    mean, spread = np.ones_like(x), np.zeros_like(x)
    fallback = smooth(x, 0.8)
    np.testing.assert_array_equal(gated(fallback, mean, spread, smoothed_input_only), fallback)
    half = GateConfig(spread_scale=0.05, blend=0.5, fallback_sigma=0.8)
    np.testing.assert_allclose(gated(fallback, mean, spread, half), 0.5 * (fallback + 1.0), atol=1e-6)


def test_old_manifest_gates_fall_back_to_the_input():
    """Gates calibrated before fallback smoothing or the consistency term existed keep their meaning."""
    gate = GateConfig.from_dict({"spread_scale": 0.2, "blend": 0.75, "spread_sigma": 0.0})
    assert gate.fallback_sigma == 0.0 and gate.prediction_sigma == 0.0 and gate.consistency_scale == 0.0
    assert GateConfig.from_dict({"blend": 0.0}).keeps_input


def test_spread_smoothing_is_a_gaussian_and_leaves_its_input_alone(rng):
    spread = rng.random((6, 10, 10)).astype(np.float32)
    before = spread.copy()
    smoothed = smooth(spread, 2.0)
    np.testing.assert_array_equal(spread, before)
    np.testing.assert_allclose(smoothed, ndimage.gaussian_filter(before, 2.0, truncate=4.0), atol=1e-6)
    assert smooth(spread, 0.0) is spread




def test_consistency_reach_covers_both_smoothings():
    gate = GateConfig(spread_sigma=2.0, fallback_sigma=0.8, prediction_sigma=0.5, consistency_scale=0.05,
                      consistency_sigma=4.0)
    assert gate.radius == 16 + 3  # the consistency kernel's radius plus the fallback's (int(3.2 + 0.5))
    assert GateConfig(spread_sigma=2.0, consistency_sigma=4.0).radius == 8  # term off: no reach


def test_gate_fields_follow_the_documented_formula(rng):
    """Each field equals its definition, computed here with scipy directly."""
    block, mean, spread = (rng.random((10, 24, 24)).astype(np.float32) for _ in range(3))
    gate = GateConfig(spread_scale=0.1, blend=0.75, spread_sigma=2.0, fallback_sigma=0.8, prediction_sigma=0.5,
                      consistency_scale=0.05, consistency_sigma=3.0)
    fields = gate_fields(gate, block, mean, spread)
    assert fields.shape == (len(FIELDS), *block.shape)
    g = lambda v, s: ndimage.gaussian_filter(v, s, mode="reflect", truncate=4.0)  # noqa: E731
    mean_s, fallback = g(mean, 0.5), g(block, 0.8)
    expected = [mean_s, g(spread, 2.0), fallback, np.abs(g(mean_s - fallback, 3.0))]
    for name, got, want in zip(FIELDS, fields, expected):
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)
    w = 0.75 / (1 + (expected[1] / 0.1) ** 2) / (1 + (expected[3] / 0.05) ** 2)
    np.testing.assert_allclose(gated_fields(fields, gate), fallback + w * (mean_s - fallback), atol=1e-5)
    with pytest.raises(ValueError, match="needs the consistency map"):
        gated(fallback, mean_s, spread, gate)


def _membrane_pair(rng):
    """A target with dim sheets beside a saturated bright object, and its noisy single view."""
    target = np.zeros((24, 64, 64), np.float32)
    target[:, ::6, :] = 0.25
    target[:, :, ::6] = 0.25
    target[6:18, 20:44, 20:44] = 1.0  # the saturated object
    target = ndimage.gaussian_filter(target, 0.7)
    source = (target + 0.03 * rng.standard_normal(target.shape)).astype(np.float32)
    return target, source


def test_consistency_catches_an_error_all_members_share(rng):
    """Both members brighten the dim sheets and flatten the bright object (their spread is 0, so
    disagreement cannot see it): the consistency term falls back and the result scores above 0,
    where the prediction scores far below; with the same gate a correct prediction keeps most of
    its gain (the term also sees the offset between the input's and the target's normalisation:
    the price calibration weighs when it picks the scale)."""
    target, source = _membrane_pair(rng)
    x = PercentileNorm.fit(source).forward(source)
    t = PercentileNorm.fit(target).forward(target)
    wrong = np.where(t > 0.6, 0.45, np.minimum(2.5 * t, 0.9)).astype(np.float32)  # shared systematic error
    zero = np.zeros_like(x)
    gate = GateConfig(spread_scale=0.2, spread_sigma=2.0, fallback_sigma=0.8, consistency_scale=0.02)
    no_net = gate.replace(consistency_scale=0.0)
    caught = gated_fields(gate_fields(gate, x, wrong, zero), gate)
    missed = gated_fields(gate_fields(no_net, x, wrong, zero), no_net)
    score = lambda v: score_ssim(target, v, source).n_ssim  # noqa: E731
    assert score(missed) < -1.0 and score(caught) > 0.1
    kept = gated_fields(gate_fields(gate, x, t, zero), gate)
    assert score(kept) > 0.5 * score(t)


def test_consistency_map_is_zero_for_a_detail_only_change(rng):
    """A restoration that only sharpens (zero-mean detail) barely moves the local mean."""
    x = ndimage.gaussian_filter(rng.random((16, 48, 48)), 1.5).astype(np.float32)
    detail = (x - ndimage.gaussian_filter(x, 1.0)).astype(np.float32)
    shift = consistency_map(x + 2.0 * detail, x, 4.0)
    bright = consistency_map(x + 0.2, x, 4.0)
    assert shift.max() < 0.1 * bright.min()


# --------------------------------------------------------------------------- the torch twin


@pytest.mark.parametrize("sigma", [0.45, 0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("shape", [(5, 9, 11), (3, 40, 2)])  # axes shorter than the kernel's reach too
def test_torch_smoothing_equals_scipy_reflect(rng, sigma, shape):
    x = rng.random(shape).astype(np.float32) * 3 - 1
    got = smooth_torch(torch.from_numpy(x), sigma).numpy()
    np.testing.assert_allclose(got, smooth(x, sigma), atol=1e-5, rtol=0)
    tensor = torch.from_numpy(x)
    assert smooth_torch(tensor, 0.0) is tensor


@pytest.mark.parametrize("gate", [
    GateConfig(),
    GateConfig(spread_scale=1.0, spread_sigma=2.0, prediction_sigma=0.5),  # the shipped membrane gate
    GateConfig(spread_scale=0.2, blend=0.7, spread_sigma=1.0, fallback_sigma=0.45, prediction_sigma=0.5,
               consistency_scale=0.1, consistency_sigma=4.0),
    GateConfig(spread_scale=0.05, consistency_scale=0.3, consistency_sigma=2.0),
    GateConfig(blend=0.0, fallback_sigma=0.8),
    GateConfig(spread_scale=0.2, blend=0.5, spread_sigma=2.0, prediction_sigma=0.5, consistency_scale=0.05,
               correct_attenuation=True),
    GateConfig(blend=0.0, fallback_sigma=0.5, correct_attenuation=True),
])
def test_torch_gate_equals_the_numpy_gate(rng, gate):
    shape = (12, 30, 26)
    block = rng.normal(0.3, 0.4, shape).astype(np.float32)
    mean = (block + rng.normal(0, 0.1, shape)).astype(np.float32)
    spread = np.abs(rng.normal(0, 0.1, shape)).astype(np.float32)
    fields = gate_fields(gate, block, mean, spread)
    fields_t = gate_fields_torch(gate, *(torch.from_numpy(a) for a in (block, mean, spread)))
    np.testing.assert_allclose(fields_t.numpy(), fields, atol=1e-5, rtol=0)
    core = (slice(None), slice(2, 10), slice(5, 25), slice(3, 20))
    field = rng.uniform(1.0, 3.0, fields[0][core[1:]].shape).astype(np.float32)
    np.testing.assert_allclose(gated_fields_torch(fields_t[core], gate, torch.from_numpy(field)).numpy(),
                               gated_fields(fields[core], gate, field), atol=1e-5, rtol=0)


def test_the_attenuation_correction_multiplies_the_gated_output(rng):
    """The correction is one factor on whatever the gate gives, the Gaussian-smoothed input
    included, so it never changes where the gate trusts the members; without a field it refuses."""
    shape = (6, 10, 12)
    block, mean = rng.random(shape).astype(np.float32), rng.random(shape).astype(np.float32)
    spread = np.abs(rng.normal(0, 0.1, shape)).astype(np.float32)
    field = rng.uniform(1.0, 4.0, shape).astype(np.float32)
    for plain in (GateConfig(spread_scale=0.1, spread_sigma=1.0, consistency_scale=0.05),
                  GateConfig(blend=0.0, fallback_sigma=0.5), INPUT_ONLY):
        corrected = plain.replace(correct_attenuation=True)
        fields = gate_fields(plain, block, mean, spread)
        np.testing.assert_allclose(gated_fields(fields, corrected, field), gated_fields(fields, plain) * field,
                                   rtol=1e-6)
        with pytest.raises(ValueError, match="attenuation field"):
            gated_fields(fields, corrected)
        with pytest.raises(ValueError, match="attenuation field"):
            gated_fields_torch(torch.from_numpy(fields), corrected)
    assert INPUT_ONLY.keeps_input and not INPUT_ONLY.replace(correct_attenuation=True).keeps_input
    old_manifest = INPUT_ONLY.to_dict()
    old_manifest.pop("correct_attenuation")  # written before the correction existed
    assert GateConfig.from_dict(old_manifest).correct_attenuation is False
    assert GateConfig(blend=0.0, fallback_sigma=0.5, correct_attenuation=True).needs_prediction is False
    assert GateConfig(blend=0.25).needs_prediction


def test_gate_radius_covers_each_kernel_as_scipy_truncates_it():
    """Each kernel's radius as scipy rounds it (``int(4 sigma + 0.5)``), not 4 sigmas (1.0 here)."""
    assert GateConfig(spread_sigma=0.125, fallback_sigma=0.125, consistency_scale=0.1,
                      consistency_sigma=0.125).radius == 2
    assert GateConfig(spread_sigma=2.0, consistency_scale=0.02, consistency_sigma=4.0).radius == 16
    assert GateConfig().radius == 0
