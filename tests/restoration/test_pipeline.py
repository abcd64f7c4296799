"""Restoring volumes and cases (``fusecare/restoration/pipeline.py``): the prediction back on the
input's scale, the gate per core and deferred to z-slabs, the attenuation correction, the device
path, non-finite predictions and out-of-memory retries, the plan a case gets."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import tifffile
import torch
from conftest import FakeClock, beer_lambert, blob_specimen, slow_predictor
from scipy import ndimage

from fusecare.constants import UNCERTAINTY_UNIT
from fusecare.normalize import PercentileNorm
from fusecare.restoration.gate import GateConfig, gate_weight, gated, smooth
from fusecare.restoration.intensities import HEADROOM, Uint16Map
from fusecare.restoration.pacing import Deadline
from fusecare.restoration.pipeline import (
    FULL_MODE,
    INPUT_MODE,
    ConstantVolumeError,
    NonFinitePredictionError,
    restore_volume,
)
from fusecare.restoration.tiling import tile_grid

TILING = {"tile": (16, 32, 32), "margin": 4, "align": 4}


def _tiles(volume) -> int:
    return len(tile_grid(volume.shape, TILING["tile"], (TILING["margin"],) * 3, TILING["align"]))


def _with_spread(fn, spread=0.0):
    return lambda x: np.stack([fn(x), np.full_like(x, spread)])


@pytest.fixture
def volume(rng) -> np.ndarray:
    """Intensities with room for the output headroom, so the output keeps the input's scale."""
    return rng.integers(2000, 5000, size=(20, 50, 40)).astype(np.uint16)


def test_identity_predictor_gives_back_the_input_exactly(volume):
    restored = restore_volume(volume, _with_spread(lambda x: x), **TILING)
    np.testing.assert_array_equal(restored.output, volume)
    assert restored.clipped == 0


def test_identity_without_headroom_is_an_exact_positive_affine_image(rng):
    volume = rng.integers(100, 3000, size=(8, 32, 32)).astype(np.uint16)  # 25% below 100 < 0
    out = restore_volume(volume, _with_spread(lambda x: x), **TILING).output
    mapping = Uint16Map.for_input(float(volume.min()), float(volume.max()))
    assert mapping.gain > 1  # stretched to use the uint16 range
    expected, _ = mapping.apply(volume.astype(np.float32))
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_prediction_is_mapped_back_to_the_input_scale(volume):
    norm = PercentileNorm.fit(volume)
    restored = restore_volume(volume, _with_spread(lambda x: x + 0.1), **TILING)
    expected = volume.astype(np.float64) + 0.1 * (norm.high - norm.low)
    assert np.abs(restored.output - expected).max() <= 0.51


def test_output_range_keeps_headroom_instead_of_clipping(rng):
    volume = rng.integers(0, 60000, size=(8, 32, 32)).astype(np.uint16)  # no room in uint16
    restored = restore_volume(volume, _with_spread(lambda x: 1.15 * x - 0.05), **TILING)
    assert restored.clipped == 0
    # a positive affine image of the prediction: ranks are kept
    corr = np.corrcoef(restored.output.ravel().astype(float), volume.ravel().astype(float))[0, 1]
    assert corr > 0.9999


def test_gate_blends_toward_the_input_where_members_disagree(volume):
    shift = _with_spread(lambda x: x + 0.5, spread=10.0)
    unsure = restore_volume(volume, shift, gate=GateConfig(spread_scale=0.01), **TILING)
    assert np.abs(unsure.output.astype(int) - volume).max() <= 1  # w ~ 1e-6: the input
    sure = restore_volume(volume, _with_spread(lambda x: x + 0.5, spread=0.0), gate=GateConfig(spread_scale=0.01),
                          **TILING)
    ungated = restore_volume(volume, shift, **TILING)
    np.testing.assert_array_equal(sure.output, ungated.output)
    np.testing.assert_allclose(gate_weight(np.array([0.0, 0.05, 0.1]), 0.05), [1.0, 0.5, 0.2])


def test_uncertainty_is_the_spread_in_fixed_units(volume):
    restored = restore_volume(volume, _with_spread(lambda x: x, spread=0.0123), with_uncertainty=True, **TILING)
    assert restored.uncertainty.dtype == np.uint16
    assert np.all(restored.uncertainty == round(0.0123 / UNCERTAINTY_UNIT))


def test_uncertainty_stays_the_members_spread_under_a_smoothing_gate(rng):
    volume = rng.integers(2000, 5000, size=(16, 32, 32)).astype(np.uint16)
    predict = lambda x: np.stack([x + 0.1, np.abs(x - 0.5)])  # noqa: E731 - spread varies per voxel
    gate = GateConfig(spread_scale=0.2, blend=0.5, spread_sigma=2.0, fallback_sigma=0.8)
    gated_run = restore_volume(volume, predict, gate=gate, with_uncertainty=True, **TILING)
    plain_run = restore_volume(volume, predict, with_uncertainty=True, **TILING)
    np.testing.assert_array_equal(gated_run.uncertainty, plain_run.uncertainty)
    assert not np.array_equal(gated_run.output, plain_run.output)


def test_non_finite_prediction_is_an_error(volume):
    with pytest.raises(NonFinitePredictionError, match="NaN/Inf"):
        restore_volume(volume, _with_spread(lambda x: x * np.nan), **TILING)


def test_constant_volume_is_refused():
    with pytest.raises(ConstantVolumeError, match="constant volume"):
        restore_volume(np.full((8, 16, 16), 5, np.uint16), _with_spread(lambda x: x), **TILING)


def _oom_above(limit: int):
    calls = []

    def predict(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape)
        if x.size > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return np.stack([x, np.zeros_like(x)])
    return predict, calls


def _cores(tile, shape, margin=4, align=4):
    return [n if t >= -(-n // align) * align else t - 2 * margin for n, t in zip(shape, tile)]


def test_out_of_memory_shrinks_the_core_and_keeps_the_margins(volume, caplog):
    predict, calls = _oom_above(16 * 24 * 24)
    restored = restore_volume(volume, predict, tile=(16, 48, 48), margin=4, align=4)
    np.testing.assert_array_equal(restored.output, volume)
    assert calls[0] == (16, 48, 40) and restored.tile == (16, 16, 28)  # y core 40 -> 20, x 40 -> 20, y 20 -> 8
    assert all(c >= 2 * 4 for c in _cores(restored.tile, volume.shape))
    assert caplog.text.count("CUDA out of memory with tile") == 3


def test_out_of_memory_at_the_floor_raises(volume):
    predict, calls = _oom_above(100)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="simulated"):
        restore_volume(volume, predict, tile=(16, 48, 48), margin=4, align=4, max_oom_retries=50)
    assert len(calls) <= 6  # cores of 8 per axis reached in a few halvings, then it stops
    assert all(c >= 8 for shape in calls for c, n in zip(_cores(shape, volume.shape), volume.shape) if c < n)


@pytest.mark.parametrize("sigmas", [{"spread_sigma": 2.0}, {"fallback_sigma": 0.8}, {"prediction_sigma": 1.0},
                                    {"spread_sigma": 2.0, "fallback_sigma": 0.5, "prediction_sigma": 0.5}])
def test_smoothed_gate_is_still_exact_across_tiles(rng, sigmas):
    """Spread, fallback and prediction smoothing need context beyond the network's: restore_volume
    widens the margin. A pointwise predictor needs no margin, so any seam comes from the smoothing alone.
    """
    volume = rng.integers(2000, 5000, size=(24, 40, 160)).astype(np.uint16)
    predict = lambda x: np.stack([x + 0.5, np.abs(x - 0.5)])  # noqa: E731 - spread varies per voxel
    kwargs = {"margin": 0, "align": 4, "gate": GateConfig(spread_scale=0.2, blend=0.75, **sigmas)}
    whole = restore_volume(volume, predict, tile=(24, 40, 160), **kwargs).output
    tiled = restore_volume(volume, predict, tile=(24, 40, 32), **kwargs).output
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 1


def test_gate_smooths_the_members_mean_not_the_spread_it_writes(rng):
    """With ``prediction_sigma`` (and a gate that keeps the whole prediction) the output is the
    Gaussian-smoothed network output, while the uncertainty written stays unsmoothed."""
    volume = rng.integers(2000, 5000, size=(16, 32, 32)).astype(np.uint16)
    predict = lambda x: np.stack([x + 0.5, np.abs(x - 0.5)])  # noqa: E731
    gate = GateConfig(spread_scale=10.0, blend=1.0, prediction_sigma=1.0)
    restored = restore_volume(volume, predict, tile=(16, 32, 32), margin=0, align=4, gate=gate,
                              with_uncertainty=True)
    norm = PercentileNorm.fit(volume)
    x = norm.forward(volume)
    spread = np.abs(x - 0.5)
    expected = gated(x, smooth(x + 0.5, 1.0), spread, gate)
    mapped = Uint16Map.for_input(float(volume.min()), float(volume.max())).apply(norm.inverse(expected))[0]
    assert np.abs(restored.output.astype(int) - mapped.astype(int)).max() <= 1
    unsmoothed = np.clip(np.rint(spread / UNCERTAINTY_UNIT), 0, 65535)
    assert np.abs(restored.uncertainty.astype(int) - unsmoothed.astype(int)).max() <= 1


def test_gate_context_grows_the_tiles_instead_of_failing(rng):
    """A tile that fits the network's margin but not the gate's wider one still restores,
    with cores of the size asked for (the tile grows by the gate's extra context)."""
    volume = rng.integers(2000, 5000, size=(40, 40, 40)).astype(np.uint16)
    predict = lambda x: np.stack([x + 0.5, np.abs(x - 0.5)])  # noqa: E731
    gate = GateConfig(spread_scale=0.2, blend=0.5, spread_sigma=2.0, fallback_sigma=0.8)
    seen: list[tuple[int, ...]] = []

    def spy(x):
        seen.append(x.shape)
        return predict(x)

    tiled = restore_volume(volume, spy, tile=(16, 16, 16), margin=4, align=4, gate=gate).output
    whole = restore_volume(volume, predict, tile=(40, 40, 40), margin=4, align=4, gate=gate).output
    assert max(seen) == (32, 32, 32) and len(seen) > 1  # 16 + 2 x 8 voxels of gate context
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 1


@pytest.mark.parametrize("tile", [(10, 30, 50), (4, 4, 4)])
def test_tile_the_tiling_cannot_use_is_rounded_up_not_failed(volume, tile, caplog):
    """A --tile off the alignment or too small for the margin would fail every case."""
    identity = _with_spread(lambda x: x)
    restored = restore_volume(volume, identity, tile=tile, margin=4, align=4)
    np.testing.assert_array_equal(restored.output, volume)
    assert all(t % 4 == 0 and (t >= 12 or t >= n) for t, n in zip(restored.tile, volume.shape))
    assert "rounded up" in caplog.text


def _documented_gate(volume: np.ndarray, mean_of, spread_of, gate: GateConfig) -> np.ndarray:
    """The gate of ``fusecare/restoration/gate.py``'s docstring, computed on the whole volume with scipy alone:
    ``f + blend * w * (mean - f)``, ``w = 1 / (1 + (spread / spread_scale)**2)``, where ``f`` is the
    normalised input smoothed by ``fallback_sigma``, ``mean`` the members' mean smoothed by
    ``prediction_sigma`` and ``spread`` their spread smoothed by ``spread_sigma`` (reflect, 4 sigmas;
    sigma 0 = unsmoothed). Returned as the uint16 output, mapped back like the input's scale."""
    def blur(v: np.ndarray, sigma: float) -> np.ndarray:
        return ndimage.gaussian_filter(v, sigma, mode="reflect", truncate=4.0) if sigma > 0 else v

    low, high = np.percentile(volume, (2.0, 99.8))
    x = ((volume - low) / (high - low)).astype(np.float32)
    f = blur(x, gate.fallback_sigma).astype(np.float64)
    mean = blur(mean_of(x), gate.prediction_sigma).astype(np.float64)
    spread = blur(spread_of(x), gate.spread_sigma).astype(np.float64)
    w = 1.0 / (1.0 + (spread / gate.spread_scale) ** 2)
    out = (f + gate.blend * w * (mean - f)) * (high - low) + low
    assert volume.min() - HEADROOM * (volume.max() - volume.min()) >= 0  # the output keeps the input's scale
    return np.clip(np.rint(out), 0, 65535)


@pytest.mark.parametrize("gate", [
    GateConfig(spread_scale=0.1, blend=0.75, spread_sigma=2.0, fallback_sigma=0.8, prediction_sigma=1.0),
    GateConfig(spread_scale=0.1, blend=1.0, spread_sigma=2.0),
    GateConfig(spread_scale=0.1, blend=0.5, fallback_sigma=0.8),
    GateConfig(spread_scale=0.1, blend=0.75, prediction_sigma=0.5),
], ids=["all-sigmas", "spread-sigma", "fallback-sigma", "prediction-sigma"])
def test_tiled_gated_output_is_the_documented_formula(rng, gate):
    """The gated output of the tiled production path equals the documented formula computed on
    the whole volume, independently of ``fusecare.restoration.gate``: so the weight must see the *smoothed*
    spread and the fallback must be the *smoothed* input (the spread here is voxel-wise noise,
    far from its smoothed self; the input is noise too, far from its smoothing)."""
    volume = rng.integers(2000, 5000, size=(24, 40, 160)).astype(np.uint16)
    mean_of = lambda x: (1.0 - x).astype(np.float32)  # noqa: E731 - pointwise: tiles need no network margin
    spread_of = lambda x: (0.3 * np.abs(x - 0.5)).astype(np.float32)  # noqa: E731 - varies voxel to voxel
    restored = restore_volume(volume, lambda x: np.stack([mean_of(x), spread_of(x)]), tile=(24, 40, 32),
                              margin=0, align=4, gate=gate)
    expected = _documented_gate(volume, mean_of, spread_of, gate)
    assert restored.clipped == 0
    assert np.abs(restored.output.astype(np.int64) - expected.astype(np.int64)).max() <= 1


@pytest.mark.parametrize("cuda", [True, False])
def test_auto_device_picks_its_default_tile(tmp_path, rng, tiny_weights, monkeypatch, request, cuda):
    """``--device auto`` with CUDA reported (faked: tensors stay on the CPU) loads the ensemble on
    CUDA and restores with the CUDA tile default; without CUDA, with the CPU one."""
    from conftest import write_fmc_tif

    from fusecare.constants import DEFAULT_TILE
    from fusecare.restoration import pipeline

    if cuda:
        request.getfixturevalue("fake_cuda")
    write_fmc_tif(tmp_path / "in" / "a.tif", rng.integers(100, 3000, (8, 32, 32)).astype(np.uint16))
    tiles: list[tuple[int, int, int]] = []
    real = pipeline.restore_volume

    def spy(volume, predict_block, **kwargs):
        tiles.append(kwargs["tile"])
        return real(volume, predict_block, **kwargs)

    monkeypatch.setattr(pipeline, "restore_volume", spy)
    options = pipeline.RestoreOptions(device="auto", gate=False, progress=False)
    results = pipeline.restore_folder(tmp_path / "in", tmp_path / "out", tiny_weights, options)
    assert [r.status for r in results] == ["restored"]
    assert tiles == [DEFAULT_TILE["cuda" if cuda else "cpu"]]
    assert DEFAULT_TILE["cuda"] != DEFAULT_TILE["cpu"]


# --------------------------------------------------------------------------- the gate on the device


def _members(x):
    return x + 0.1 * np.sin(3 * x), 0.05 * np.abs(np.cos(5 * x))


def _members_numpy(x: np.ndarray) -> np.ndarray:
    return np.stack(_members(x)).astype(np.float32)


def _members_torch(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([x + 0.1 * torch.sin(3 * x), 0.05 * torch.abs(torch.cos(5 * x))])


@pytest.mark.parametrize("gate", [
    None,
    GateConfig(spread_scale=1.0, spread_sigma=2.0, prediction_sigma=0.5),
    GateConfig(spread_scale=0.05, blend=0.8, spread_sigma=1.0, fallback_sigma=0.5, consistency_scale=0.05,
               consistency_sigma=2.0),
])
def test_device_path_equals_the_host_path(rng, gate):
    volume = rng.integers(100, 40000, size=(20, 50, 40)).astype(np.uint16)  # no headroom: stretched map
    host = restore_volume(volume, _members_numpy, **TILING, gate=gate, with_uncertainty=True)
    device = restore_volume(volume, _members_torch, **TILING, gate=gate, with_uncertainty=True,
                            device=torch.device("cpu"))
    for a, b in ((host.output, device.output), (host.uncertainty, device.uncertainty)):
        difference = np.abs(a.astype(np.int64) - b.astype(np.int64))
        assert difference.max() <= 1 and np.count_nonzero(difference) < 1e-2 * a.size  # float32 rounding flips
    assert host.clipped == device.clipped


def test_device_path_writes_the_input_for_tiles_over_budget(volume):
    clock = FakeClock()
    restored = restore_volume(volume, _members_torch, **TILING, device=torch.device("cpu"),
                              gate=GateConfig(spread_sigma=1.0), deadline=Deadline.after(-1, clock))
    np.testing.assert_array_equal(restored.output, volume)


def test_device_path_refuses_non_finite_predictions(volume):
    with pytest.raises(NonFinitePredictionError):
        restore_volume(volume, lambda x: torch.stack([x / 0.0, x]), **TILING, device=torch.device("cpu"))


def test_a_cuda_ensemble_gates_on_its_device(tmp_path, rng, monkeypatch, request):
    """Under fake CUDA the case goes through ``predict_tensor`` and the torch gate; the output
    matches the host path's to float32 rounding."""
    from conftest import make_tiny_ensemble, write_fmc_tif

    from fusecare.restoration.ensemble import Ensemble
    from fusecare.restoration.pipeline import RestoreOptions, restore_folder

    weights = tmp_path / "weights"
    make_tiny_ensemble(weights, "nucleus", gate_scale=0.05)
    write_fmc_tif(tmp_path / "in" / "a.tif", rng.integers(100, 4000, size=(12, 40, 40)).astype(np.uint16))
    options = RestoreOptions(tile=(8, 32, 32), progress=False)
    [host] = restore_folder(tmp_path / "in", tmp_path / "host", weights, dataclasses.replace(options, device="cpu"))
    request.getfixturevalue("fake_cuda")
    calls = []
    real = Ensemble.predict_tensor
    monkeypatch.setattr(Ensemble, "predict_tensor", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    [device] = restore_folder(tmp_path / "in", tmp_path / "device", weights, options.replace(device="cuda"))
    assert host.status == device.status == "restored" and calls
    a, b = (tifffile.imread(tmp_path / d / "a.tif").astype(np.int64) for d in ("host", "device"))
    assert np.abs(a - b).max() <= 1


def test_fp16_is_the_default_and_no_fp16_turns_it_off(tmp_path, rng, monkeypatch):
    """The container passes no flags, so float16 on CUDA must be the default of the options and of
    the command (its agreement with float32 is measured in the README); ``--no-fp16`` restores float32.
    The ensemble is loaded with what the options say (on CPU the ensemble itself ignores it)."""
    from conftest import make_tiny_ensemble, write_fmc_tif

    from fusecare.cli.predict import build_parser
    from fusecare.restoration import pipeline
    from fusecare.restoration.pipeline import RestoreOptions, restore_paths

    assert RestoreOptions().fp16 is True
    assert build_parser("fusecare predict").parse_args(["x.tif", "-o", "out"]).fp16 is True
    assert build_parser("fusecare predict").parse_args(["x.tif", "-o", "out", "--no-fp16"]).fp16 is False
    weights = tmp_path / "weights"
    make_tiny_ensemble(weights, "nucleus")
    write_fmc_tif(tmp_path / "in" / "a.tif", rng.integers(100, 4000, size=(8, 32, 32)).astype(np.uint16))
    seen = []
    real = pipeline.load_ensemble
    monkeypatch.setattr(pipeline, "load_ensemble", lambda *a, **k: seen.append(k["fp16"]) or real(*a, **k))
    for options in (RestoreOptions(progress=False, device="cpu"), RestoreOptions(progress=False, device="cpu",
                                                                                   fp16=False)):
        restore_paths([tmp_path / "in"], tmp_path / f"out{len(seen)}", weights, options)
    assert seen == [True, False]


def test_restore_volume_predicts_through_the_shared_whole_volume_path(volume, monkeypatch):
    """The pipeline tiles and stitches with ``tiling.predict_normalised``, as training, calibration
    and export do: its uint16 output is that function's stitched mean, mapped back."""
    from fusecare.restoration import pipeline

    real, calls = pipeline.predict_normalised, []
    monkeypatch.setattr(pipeline, "predict_normalised", lambda *a, **k: calls.append(k) or real(*a, **k))
    predict = _with_spread(lambda x: 2 * x - 0.25)
    restored = restore_volume(volume, predict, **TILING)
    assert len(calls) == 1 and calls[0]["tile"] == TILING["tile"] and calls[0]["sink"] is not None
    norm = PercentileNorm.fit(volume)
    stitched = real(volume, predict, margin=TILING["margin"], align=TILING["align"], tile=TILING["tile"], norm=norm)
    expected, _ = Uint16Map.for_input(float(volume.min()), float(volume.max())).apply(norm.inverse(stitched[0]))
    np.testing.assert_array_equal(restored.output, expected)


# --------------------------------------------------------------------------- the gate deferred to z-slabs


SMOOTHING_GATE = GateConfig(spread_scale=0.05, blend=0.8, spread_sigma=1.0, fallback_sigma=0.5, prediction_sigma=0.5,
                            consistency_scale=0.05, consistency_sigma=1.5)
"""Every smoothing on (radius 8: the consistency term's 6 after the prediction's 2)."""


def _shifted_with_spread(x: np.ndarray) -> np.ndarray:
    """x + 0.1 with a spread that varies voxel to voxel: pointwise, so tiles need no network margin
    and any seam is the gate's."""
    return np.stack([x + 0.1, 0.05 * np.abs(np.cos(5 * x))]).astype(np.float32)


@pytest.mark.parametrize(("shape", "tile", "gate_slab"), [
    ((24, 40, 48), (16, 24, 20), 5),  # tiles that do not divide the volume, slabs thinner than the reach
    ((24, 40, 48), (12, 16, 32), 24),  # one slab of the whole depth
    ((21, 37, 43), (16, 24, 20), 4),  # no axis a multiple of the alignment: the end padding
    ((21, 37, 43), (12, 20, 20), 1),  # one plane per slab, its reach read around it
    ((30, 16, 20), (16, 16, 20), 7),  # one tile in y and x, several in z
])
def test_deferred_gate_equals_the_gate_per_core_and_the_whole_volume(rng, shape, tile, gate_slab):
    """Deferred to z-slabs after the tiles (their margins the network's alone), the gate gives the
    output of the gate per core in widened tiles and of one whole-volume tile; at the far ends of
    axes that are not a multiple of the alignment, all three reflect at the volume's own border
    (not into the network's end padding), as calibration gates whole volumes."""
    volume = rng.integers(100, 40000, size=shape).astype(np.uint16)  # no headroom: the stretched map
    kwargs = {"margin": 4, "align": 4, "gate": SMOOTHING_GATE, "with_uncertainty": True}
    whole_tile = tuple(-(-n // 4) * 4 for n in shape)
    whole = restore_volume(volume, _shifted_with_spread, tile=whole_tile, **kwargs)
    seen: list[tuple[int, ...]] = []

    def spy(x: np.ndarray) -> np.ndarray:
        seen.append(x.shape)
        return _shifted_with_spread(x)

    deferred = restore_volume(volume, spy, tile=tile, gate_slab=gate_slab, **kwargs)
    per_core = restore_volume(volume, _shifted_with_spread, tile=tile, **kwargs)
    assert all(s <= max(t, 12) for shape in seen for s, t in zip(shape, tile))  # no tile widened by the gate
    for run in (deferred, per_core):
        assert np.abs(run.output.astype(int) - whole.output.astype(int)).max() <= 1
        np.testing.assert_array_equal(run.uncertainty, whole.uncertainty)
        assert run.clipped == whole.clipped
    assert not np.array_equal(whole.output, restore_volume(volume, _shifted_with_spread, tile=whole_tile,
                                                           margin=4, align=4).output)  # the gate did something


@pytest.mark.parametrize("planes", [1, 3, 8, 21])
@pytest.mark.parametrize("chunk_planes", [2, 64])
def test_gate_in_z_slabs_is_the_whole_volume_gate_in_normalised_units(rng, monkeypatch, planes, chunk_planes):
    """Each slab read with the gate's reach in z (clipped at the ends) and whole planes equals
    ``gated_fields(gate_fields(...))`` of the whole volume to 1e-4 (here: exactly, same float32
    arithmetic per voxel), its blend in chunks of planes or at once."""
    from fusecare.restoration import pipeline
    from fusecare.restoration.gate import gate_fields, gated_fields
    from fusecare.restoration.pipeline import gate_in_z_slabs

    monkeypatch.setattr(pipeline, "BLEND_CHUNK_VOXELS", chunk_planes * 18 * 22)
    volume = rng.integers(100, 4000, size=(21, 18, 22)).astype(np.uint16)
    norm = PercentileNorm.fit(volume)
    mean, spread = _shifted_with_spread(norm.forward(volume))
    expected = gated_fields(gate_fields(SMOOTHING_GATE, norm.forward(volume), mean, spread), SMOOTHING_GATE)
    got = np.full(volume.shape, np.nan, np.float32)
    for z, values in gate_in_z_slabs(volume, mean, spread, SMOOTHING_GATE, norm, planes=planes):
        assert np.isnan(got[z]).all()
        got[z] = values
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(got, expected)  # a plane of reach short would differ by ~1e-9 only


def test_deferred_gate_keeps_input_mode_cores_the_input_itself(volume, monkeypatch):
    """Cores the time budget wrote as the input stay exactly the input after the deferred gate
    (which would otherwise smooth them toward its fallback); the core that was predicted is gated.
    Slabs of 3 planes blended 2 planes at a time: cores cross slabs and chunks."""
    from fusecare.restoration import pipeline

    monkeypatch.setattr(pipeline, "BLEND_CHUNK_VOXELS", 2 * 50 * 40)
    clock = FakeClock()
    deadline = Deadline.after(25.0, clock)  # one tile of 10 s, then the input itself
    gate = GateConfig(spread_scale=0.1, spread_sigma=1.0, fallback_sigma=0.8, consistency_scale=0.05,
                      consistency_sigma=1.0)
    restored = restore_volume(volume, slow_predictor(clock, 10.0, 0.2), **TILING, gate=gate, gate_slab=3,
                              deadline=deadline, with_uncertainty=True)
    n = _tiles(volume)
    assert restored.modes == {FULL_MODE: 1, INPUT_MODE: n - 1}
    first = tile_grid(volume.shape, TILING["tile"], (TILING["margin"],) * 3, TILING["align"])[0].core
    predicted = np.zeros(volume.shape, bool)
    predicted[first] = True
    np.testing.assert_array_equal(restored.output[~predicted], volume[~predicted])
    assert (restored.output[predicted] != volume[predicted]).mean() > 0.9
    assert not restored.uncertainty.any()


def test_deferred_gate_time_is_reserved_from_the_budget_and_not_spent_on_input_only_cases(volume, monkeypatch):
    """The deferred gate runs after the pacer's last decision, so the tiles get the deadline minus
    the gate's reserved time; when that leaves no time, every core is the input and the gate's
    smoothing is not run at all."""
    from fusecare.restoration import pipeline

    clock = FakeClock()
    monkeypatch.setattr(pipeline, "DEFERRED_GATE_SECONDS_PER_VOXEL", 1e3 / volume.size)  # 1000 s reserved
    per_core = restore_volume(volume, slow_predictor(clock, 1.0, 0.2), **TILING, gate=SMOOTHING_GATE,
                              deadline=Deadline.after(500.0, clock))
    assert set(per_core.modes) == {FULL_MODE}  # 500 s is plenty for the tiles alone

    def no_gate(*args, **kwargs):
        raise AssertionError("the gate smoothed a volume that is the input everywhere")

    monkeypatch.setattr(pipeline, "gate_in_z_slabs", no_gate)
    deferred = restore_volume(volume, slow_predictor(clock, 1.0, 0.2), **TILING, gate=SMOOTHING_GATE, gate_slab=4,
                              deadline=Deadline.after(500.0, clock))
    assert deferred.modes == {INPUT_MODE: _tiles(volume)}  # 500 - 1000 s left for the tiles: none
    np.testing.assert_array_equal(deferred.output, volume)
    with pytest.raises(ValueError, match="at least 1 plane"):
        restore_volume(volume, _shifted_with_spread, **TILING, gate=SMOOTHING_GATE, gate_slab=0)


def test_deferred_gate_refuses_non_finite_predictions(volume):
    with pytest.raises(NonFinitePredictionError, match="NaN/Inf"):
        restore_volume(volume, _with_spread(lambda x: x * np.nan), **TILING, gate=SMOOTHING_GATE, gate_slab=4)


def test_deferred_gate_is_host_only(volume):
    with pytest.raises(ValueError, match="host only"):
        restore_volume(volume, _members_torch, **TILING, gate=SMOOTHING_GATE, gate_slab=4, device=torch.device("cpu"))


def test_a_cpu_case_with_a_smoothing_gate_defers_it(tmp_path, rng, monkeypatch):
    """Through ``restore_folder`` on CPU the plan reaches ``restore_volume``: a smoothing gate is
    deferred to z-slabs (with ``--tile``, whose cores stay as asked), and the output is the gate
    per core's."""
    from conftest import make_tiny_ensemble, write_fmc_tif

    from fusecare.restoration import pipeline
    from fusecare.restoration.ensemble import write_manifest

    weights = tmp_path / "weights"
    folder = make_tiny_ensemble(weights, "nucleus")
    write_manifest(folder, "nucleus", gate=GateConfig(spread_scale=0.05, spread_sigma=1.0, fallback_sigma=0.5))
    volume = rng.integers(100, 4000, size=(8, 96, 40)).astype(np.uint16)
    write_fmc_tif(tmp_path / "in" / "a.tif", volume)
    calls = []
    real = pipeline.restore_volume

    def spy(volume, predict_block, **kwargs):
        calls.append((volume, predict_block, kwargs))
        return real(volume, predict_block, **kwargs)

    monkeypatch.setattr(pipeline, "restore_volume", spy)
    # margin 24: along y, tiles of 64 (deferred) compute 3 x 64 voxels, widened to 72 they would compute 3 x 72
    options = pipeline.RestoreOptions(tile=(8, 64, 64), device="cpu", progress=False, time_budget=None)
    [result] = pipeline.restore_folder(tmp_path / "in", tmp_path / "out", weights, options)
    assert result.status == "restored"
    [(seen, predict, kwargs)] = calls
    assert kwargs["gate_slab"] == 8 and kwargs["tile"] == (8, 64, 64)
    per_core = real(seen, predict, **{**kwargs, "gate_slab": None}).output
    assert np.abs(tifffile.imread(tmp_path / "out" / "a.tif").astype(int) - per_core.astype(int)).max() <= 1


def test_an_ensemble_whose_manifest_names_another_channel_is_loaded_with_a_warning(tmp_path, caplog):
    """A gate belongs to the channel it was calibrated for: a folder of one channel holding an
    ensemble whose manifest names the other is used (the folder decides) and said once."""
    from conftest import make_tiny_ensemble

    from fusecare.restoration.ensemble import read_manifest, write_manifest
    from fusecare.restoration.pipeline import EnsembleCache

    folder = make_tiny_ensemble(tmp_path / "weights", "nucleus")
    cache = EnsembleCache(tmp_path / "weights", torch.device("cpu"))
    with caplog.at_level(logging.WARNING):
        assert cache.get("nucleus").channel == "nucleus"
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    write_manifest(folder, "membrane", gate=read_manifest(folder).get("gate"))
    cache = EnsembleCache(tmp_path / "weights", torch.device("cpu"))
    with caplog.at_level(logging.WARNING):
        cache.get("nucleus")
        cache.get("nucleus")
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "its manifest says membrane, yet it restores the nucleus cases" in line


# --------------------------------------------------------------------------- the attenuation correction


def _dimmed_volume(rng: np.random.Generator, shape=(24, 48, 64)) -> np.ndarray:
    """Bright blobs in a box, dimmed along X from the start by Beer-Lambert through the specimen
    (about 4x at the far side): a field worth correcting."""
    return (1000 + 8000 * beer_lambert(blob_specimen(rng, shape, (2, 4, 4)), 2, True, 0.1, 0.5)).astype(np.uint16)


CORRECTING_GATE = GateConfig(spread_scale=0.2, blend=0.5, spread_sigma=2.0, prediction_sigma=0.5,
                             consistency_scale=0.05, correct_attenuation=True)


@pytest.mark.parametrize(("tile", "gate_slab", "coarse"),
                         [((24, 48, 64), None, False), ((16, 24, 32), None, False), ((16, 24, 32), 5, False),
                          ((16, 24, 32), None, True), ((16, 24, 32), 5, True)],
                         ids=["whole", "per-core", "deferred", "per-core-coarse-field", "deferred-coarse-field"])
def test_the_attenuation_correction_is_the_whole_volume_field_on_every_tiling(rng, monkeypatch, tile, gate_slab,
                                                                               coarse):
    """Per core, deferred to z-slabs or in one tile, the output is the documented formula: the
    gate of the whole volume times the field estimated on the whole volume (with the voxel size
    given), mapped back to uint16; the field brightens the dimmed far side. With a working grid
    2x coarser than the volume, each core's field is interpolated from it."""
    from fusecare.restoration import attenuation
    from fusecare.restoration.attenuation import estimate_attenuation
    from fusecare.restoration.gate import gate_fields, gated_fields

    volume, voxel = _dimmed_volume(rng), (1.0, 0.5, 0.5)
    if coarse:
        monkeypatch.setattr(attenuation, "WORKING_VOXELS", volume.size // 8)
    restored = restore_volume(volume, _shifted_with_spread, tile=tile, margin=4, align=4, gate=CORRECTING_GATE,
                              gate_slab=gate_slab, voxel_size_zyx=voxel)
    norm = PercentileNorm.fit(volume)
    x = norm.forward(volume)
    field = estimate_attenuation(volume, voxel, norm.forward)
    assert field.illumination == "x start" and field.max_gain > 2
    assert field.factors == ((2, 2, 2) if coarse else (1, 1, 1))
    expected_values = gated_fields(gate_fields(CORRECTING_GATE, x, *_shifted_with_spread(x)), CORRECTING_GATE,
                                   field.region((slice(None),) * 3))
    low, high = float(volume.min()), float(volume.max())
    expected, _ = Uint16Map.for_input(low, high).apply(norm.inverse(expected_values))
    assert np.abs(restored.output.astype(int) - expected.astype(int)).max() <= 1
    plain = restore_volume(volume, _shifted_with_spread, tile=tile, margin=4, align=4,
                           gate=CORRECTING_GATE.replace(correct_attenuation=False), gate_slab=gate_slab)
    far, near = (slice(4, -4), slice(8, -8), slice(-16, -6)), (slice(4, -4), slice(8, -8), slice(6, 16))
    ratio = lambda v: np.percentile(v[far], 95) / np.percentile(v[near], 95)  # noqa: E731
    assert ratio(restored.output) > 1.5 * ratio(plain.output)


def test_the_attenuation_correction_on_the_device_equals_the_host(rng):
    volume = _dimmed_volume(rng)
    host = restore_volume(volume, _members_numpy, **TILING, gate=CORRECTING_GATE)
    device = restore_volume(volume, _members_torch, **TILING, gate=CORRECTING_GATE, device=torch.device("cpu"))
    difference = np.abs(host.output.astype(np.int64) - device.output.astype(np.int64))
    assert difference.max() <= 1 and np.count_nonzero(difference) < 1e-2 * volume.size


def test_an_undimmed_view_skips_the_field_and_equals_the_gate_alone(rng, monkeypatch):
    """When the estimate finds no dimming (both rates 0), no field is interpolated per core and the
    output is the same gate's without the correction."""
    from fusecare.restoration import attenuation, pipeline

    def no_dimming(volume, voxel_size_zyx, norm=None, light_from=None):
        return attenuation.AttenuationField(np.ones(volume.shape, np.float32), (1, 1, 1), volume.shape,
                                            "y start", 0.0, "z start", 0.0)

    calls = []
    monkeypatch.setattr(pipeline, "view_field", no_dimming)
    monkeypatch.setattr(attenuation.AttenuationField, "region", lambda self, region: calls.append(region))
    volume = rng.integers(2000, 5000, size=(20, 50, 40)).astype(np.uint16)
    corrected = restore_volume(volume, _shifted_with_spread, **TILING, gate=CORRECTING_GATE)
    plain = restore_volume(volume, _shifted_with_spread, **TILING,
                           gate=CORRECTING_GATE.replace(correct_attenuation=False))
    assert calls == []
    np.testing.assert_array_equal(corrected.output, plain.output)


@pytest.mark.parametrize("gate_slab", [None, 3], ids=["per-core", "deferred"])
def test_cores_written_as_the_input_stay_the_input_under_the_attenuation_correction(rng, gate_slab):
    """The field multiplies gated cores only: cores the time budget wrote as the input itself are
    the input, exactly, while the predicted core is corrected."""
    volume = _dimmed_volume(rng)
    clock = FakeClock()
    gate = GateConfig(spread_scale=0.2, blend=0.5, spread_sigma=1.0, correct_attenuation=True)  # short reach
    restored = restore_volume(volume, slow_predictor(clock, 10.0, 0.0), **TILING, gate=gate, gate_slab=gate_slab,
                              deadline=Deadline.after(25.0, clock), voxel_size_zyx=(1.0, 0.5, 0.5))
    _assert_first_core_predicted_and_the_rest_the_input(volume, restored, gate, deferred=gate_slab is not None)


def _assert_first_core_predicted_and_the_rest_the_input(volume, restored, gate, *, deferred=False):
    """The time budget let only the first tile run: every other core is the input (through the
    normalisation's round trip), the first core's specimen voxels are not."""
    from fusecare.restoration.planning import gated_tiling

    tile, margin = (TILING["tile"], TILING["margin"]) if deferred else gated_tiling(
        TILING["tile"], TILING["margin"], TILING["align"], gate)
    grid = tile_grid(volume.shape, tile, (margin,) * 3, TILING["align"])
    assert len(grid) >= 3 and restored.modes == {FULL_MODE: 1, INPUT_MODE: len(grid) - 1}
    predicted = np.zeros(volume.shape, bool)
    predicted[grid[0].core] = True
    as_input, _ = Uint16Map.for_input(float(volume.min()), float(volume.max())).apply(volume.astype(np.float32))
    difference = np.abs(restored.output.astype(int) - as_input.astype(int))
    assert difference[~predicted].max() <= 1  # the input's round trip through the normalisation
    assert (difference[predicted] > 1).mean() > 0.2  # its specimen voxels (the background stays)


@pytest.mark.parametrize("gate_slab", [None, 3], ids=["per-core", "deferred"])
def test_a_spent_budget_skips_the_attenuation_estimate(volume, monkeypatch, caplog, gate_slab):
    """Every tile will be the input itself, which the field never touches: no whole-volume pass.
    Deferred, the budget is spent once what is left would not cover the gate's reserved time."""
    from fusecare.restoration import pipeline

    def fail(*args, **kwargs):
        raise AssertionError("the field was estimated")

    monkeypatch.setattr(pipeline, "view_field", fail)
    clock = FakeClock()
    left = -1.0 if gate_slab is None else 0.5 * pipeline.DEFERRED_GATE_SECONDS_PER_VOXEL * volume.size
    restored = restore_volume(volume, slow_predictor(clock, 10.0, 0.2), **TILING, gate=CORRECTING_GATE,
                              gate_slab=gate_slab, deadline=Deadline.after(left, clock))
    np.testing.assert_array_equal(restored.output, volume)
    assert "before the attenuation estimate" in caplog.text


def test_a_rejected_field_leaves_the_gate_alone_and_is_logged_as_a_warning(rng, monkeypatch, caplog):
    from fusecare.restoration import attenuation

    monkeypatch.setattr(attenuation, "GUARD_RATIO", 0.5)  # every field fails the guard
    volume = _dimmed_volume(rng)
    corrected = restore_volume(volume, _shifted_with_spread, **TILING, gate=CORRECTING_GATE, name="a.tif")
    plain = restore_volume(volume, _shifted_with_spread, **TILING,
                           gate=CORRECTING_GATE.replace(correct_attenuation=False))
    np.testing.assert_array_equal(corrected.output, plain.output)
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line.startswith("a.tif: attenuation correction: REJECTED, no correction")


# --------------------------------------------------------------------------- members that read the corrected view


def _squared_with_spread(x):
    """A pointwise member that is not linear (so reading ``x * field`` and dividing by the field
    after differs from reading ``x``), with a spread that varies voxel to voxel."""
    if isinstance(x, torch.Tensor):
        return torch.stack([x * x, 0.05 * torch.abs(torch.cos(5 * x))])
    return np.stack([x * x, 0.05 * np.abs(np.cos(5 * x))]).astype(np.float32)


@pytest.mark.parametrize(("gate", "gate_slab", "device"), [
    (None, None, None), (CORRECTING_GATE, None, None), (CORRECTING_GATE, 5, None),
    (CORRECTING_GATE.replace(correct_attenuation=False), None, None), (CORRECTING_GATE, None, "cpu")],
    ids=["ungated", "per-core", "deferred", "gate-without-correction", "device"])
def test_corrected_input_members_read_the_view_times_its_field_and_the_gate_sees_the_views_brightness(
        rng, gate, gate_slab, device):
    """The documented formula on every path: members read ``x * field`` (field of the whole
    view); their mean and spread, and the gate's fallback, are divided by the field before the
    gate, which multiplies by it again (a gate that did not correct attenuation is made to);
    ungated, the output is the members' mean as they predicted it."""
    from fusecare.restoration.attenuation import estimate_attenuation
    from fusecare.restoration.gate import gate_fields, gated_fields

    volume, voxel = _dimmed_volume(rng), (1.0, 0.5, 0.5)
    restored = restore_volume(volume, _squared_with_spread, tile=(16, 24, 32), margin=4, align=4, gate=gate,
                              gate_slab=gate_slab, voxel_size_zyx=voxel, corrected_input=True,
                              device=None if device is None else torch.device(device))
    norm = PercentileNorm.fit(volume)
    x = norm.forward(volume)
    field = estimate_attenuation(volume, voxel, norm.forward).region((slice(None),) * 3)
    members = _squared_with_spread(x * field)
    mean, spread = members / field
    expected_values = members[0] if gate is None else gated_fields(
        gate_fields(gate, x, mean, spread), gate.replace(correct_attenuation=True), field)
    expected, _ = Uint16Map.for_input(float(volume.min()), float(volume.max())).apply(norm.inverse(expected_values))
    difference = np.abs(restored.output.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and np.count_nonzero(difference) < 1e-2 * volume.size
    plain, _ = Uint16Map.for_input(float(volume.min()), float(volume.max())).apply(norm.inverse(x * x))
    assert np.abs(restored.output.astype(int) - plain.astype(int)).max() > 100  # the field did reach the member


def test_corrected_input_without_a_field_reads_the_view_itself(rng, monkeypatch):
    """A rejected field (ones) leaves the members reading the view, as in training."""
    from fusecare.restoration import attenuation

    monkeypatch.setattr(attenuation, "GUARD_RATIO", 0.5)  # every field fails the guard
    volume = _dimmed_volume(rng)
    corrected = restore_volume(volume, _squared_with_spread, **TILING, corrected_input=True)
    plain = restore_volume(volume, _squared_with_spread, **TILING)
    np.testing.assert_array_equal(corrected.output, plain.output)


@pytest.mark.parametrize("gate", [None, GateConfig(spread_scale=0.2, blend=0.5, spread_sigma=1.0)],
                         ids=["ungated", "gated"])  # a short reach: the tiles stay several
def test_corrected_input_cores_written_as_the_input_stay_the_input(rng, gate):
    """The time budget's input mode divides the corrected block by the field: the view again,
    while the predicted core (an identity member, which reads the corrected view) is corrected."""
    volume = _dimmed_volume(rng)
    clock = FakeClock()
    restored = restore_volume(volume, slow_predictor(clock, 10.0, 0.0), **TILING, deadline=Deadline.after(25.0, clock),
                              voxel_size_zyx=(1.0, 0.5, 0.5), corrected_input=True, gate=gate)
    _assert_first_core_predicted_and_the_rest_the_input(volume, restored, gate)
