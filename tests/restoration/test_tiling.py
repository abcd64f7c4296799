"""Tiled prediction: the Splitter and CoreMerger stitch analytic predictors exactly, tiled == untiled
for the net, and training, calibration and export share one whole-volume prediction."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fusecare.constants import DEFAULT_TILE
from fusecare.normalize import FMC_PERCENTILES, PercentileNorm
from fusecare.restoration.model import CareUNet, ModelConfig
from fusecare.restoration.tiling import (
    CoreMerger,
    Splitter,
    axis_tiles,
    pad_to_multiple,
    predict_normalised,
    predict_tiled,
    tile_grid,
)


@pytest.mark.parametrize("size", [1, 7, 64, 65, 100, 203])
@pytest.mark.parametrize(("tile", "margin", "align"), [(64, 24, 4), (32, 8, 4), (16, 3, 1), (48, 10, 8)])
def test_cores_partition_the_axis_with_full_context(size, tile, margin, align):
    tiles = axis_tiles(size, tile, margin, align)
    assert tiles[0].core_start == 0 and tiles[-1].core_stop == size
    for a, b in zip(tiles, tiles[1:]):
        assert a.core_stop == b.core_start  # no gap, no overlap
    for i, t in enumerate(tiles):
        assert t.start % align == 0 and (t.stop - t.start) % align == 0
        assert t.start <= t.core_start < t.core_stop <= t.stop
        if i > 0:
            assert t.core_start - t.start >= margin  # context before the core
        if i < len(tiles) - 1:
            assert t.stop - t.core_stop >= margin  # context after the core
    assert tiles[-1].stop == -(-size // align) * align  # never past the aligned end


def test_tile_smaller_than_twice_the_margin_is_refused():
    with pytest.raises(ValueError, match="too small for a context margin"):
        axis_tiles(200, 32, 16, 4)


@pytest.mark.parametrize("shape", [(37, 91, 70), (5, 16, 200), (1, 1, 1)])
def test_analytic_predictor_is_stitched_exactly(rng, shape):
    volume = rng.random(shape).astype(np.float32)
    out = predict_tiled(volume, lambda x: x + 1, tile=(16, 32, 32), margin=(4, 8, 8))
    np.testing.assert_array_equal(out, volume + 1)


def test_channel_predictor_and_custom_transform(rng):
    volume = rng.integers(0, 100, size=(20, 40, 30)).astype(np.uint16)
    out = predict_tiled(volume, lambda x: np.stack([x, 2 * x]), tile=(8, 16, 16), margin=2,
                        transform=lambda b: b.astype(np.float32) / 10)
    np.testing.assert_allclose(out, np.stack([volume / 10, volume / 5]).astype(np.float32), rtol=1e-6)


def test_position_dependent_predictor_sees_its_context():
    """A local 3-tap mean is exact when margin >= 1: tile borders never leak padding."""
    volume = np.arange(30 * 31 * 29, dtype=np.float32).reshape(30, 31, 29) % 17

    def box(x: np.ndarray) -> np.ndarray:
        p = np.pad(x, 1, mode="reflect")
        return sum(p[dz:dz + x.shape[0], 1:-1, 1:-1] for dz in range(3)) / 3

    expected = box(volume)
    tiled = predict_tiled(volume, box, tile=8, margin=1)
    np.testing.assert_allclose(tiled, expected, rtol=1e-6)
    leaky = predict_tiled(volume, box, tile=8, margin=0)
    assert not np.allclose(leaky, expected)  # without context the seams show: the test can fail


def test_sink_receives_each_voxel_once(rng):
    volume = rng.random((23, 50, 41)).astype(np.float32)
    hits = np.zeros(volume.shape, np.int32)

    def sink(region, block):
        hits[region] += 1
        assert block.shape == hits[region].shape

    assert predict_tiled(volume, lambda x: x, tile=(12, 24, 16), margin=2, align=4, sink=sink) is None
    assert np.all(hits == 1)
    assert len(tile_grid(volume.shape, (12, 24, 16), (2, 2, 2), 4)) > 10


@pytest.mark.parametrize("sink_context", [0, 3])
def test_overlapped_reading_and_writing_give_the_same_output(rng, sink_context):
    """With ``overlap`` (the next tile read in a thread, the sink in a writer thread) every core is
    written once with the same values as without; with ``sink_context`` the sink sees the core
    widened within the block and finds the core where it says."""
    volume = rng.random((23, 50, 41)).astype(np.float32)
    expected = predict_tiled(volume, lambda x: np.sin(x), tile=(12, 24, 16), margin=4, align=4)
    outputs = {}
    for overlap in (False, True):
        out = np.full(volume.shape, np.nan, np.float32)

        def sink(region, block, core=(slice(None),) * 3, out=out):
            assert np.all(np.isnan(out[region]))
            out[region] = block[core]
            if sink_context:
                assert all(c.start <= sink_context and b - c.stop <= sink_context
                           for c, b in zip(core, block.shape))

        predict_tiled(volume, lambda x: np.sin(x), tile=(12, 24, 16), margin=4, align=4, sink=sink,
                      sink_context=sink_context, overlap=overlap)
        outputs[overlap] = out
    np.testing.assert_array_equal(outputs[True], outputs[False])
    np.testing.assert_allclose(outputs[True], expected, atol=1e-6)


def test_an_error_in_the_writer_thread_is_raised_to_the_caller(rng):
    volume = rng.random((23, 50, 41)).astype(np.float32)
    calls = []

    def failing_sink(region, block):
        calls.append(region)
        if len(calls) == 2:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        predict_tiled(volume, lambda x: x, tile=(12, 24, 16), margin=2, align=4, sink=failing_sink, overlap=True)
    assert len(calls) <= 3  # the writer stops the run at the next tile, not at the end


def _net_predictor(model: CareUNet):
    def predict(block: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(block)[None, None])[0, 0].numpy()
    return predict


@pytest.mark.parametrize("shape", [pytest.param((30, 101, 90), marks=pytest.mark.slow), (9, 70, 33)])
def test_tiled_equals_untiled_for_the_care_net(rng, shape):
    torch.manual_seed(0)
    config = ModelConfig(first_filters=8)
    model = CareUNet(config).eval()
    predict = _net_predictor(model)
    volume = rng.random(shape).astype(np.float32)
    untiled = predict(pad_to_multiple(volume, config.alignment))[tuple(slice(n) for n in shape)]
    margin = config.tiling_margin
    tiled = predict_tiled(volume, predict, tile=(56, 56, 64), margin=margin, align=config.alignment)
    assert np.abs(tiled - untiled).max() < 1e-4


@pytest.mark.slow
def test_margin_below_receptive_field_shows_seams(rng):
    """The equality above has teeth: with too little context the tiles differ from untiled."""
    torch.manual_seed(0)
    config = ModelConfig(first_filters=8)
    predict = _net_predictor(CareUNet(config).eval())
    volume = rng.random((24, 64, 64)).astype(np.float32)
    untiled = predict(volume)
    short = predict_tiled(volume, predict, tile=16, margin=4, align=config.alignment)
    assert np.abs(short - untiled).max() > 1e-4  # the tolerance of the equality test above


def test_predictor_returning_wrong_shape_is_an_error(rng):
    with pytest.raises(ValueError, match="predictor returned shape"):
        predict_tiled(rng.random((8, 8, 8)).astype(np.float32), lambda x: x[:-1], tile=8, margin=0)


# --------------------------------------------------------------------------- Splitter and CoreMerger

# (shape, tile, margin, align): shapes not divisible by the tile, tiles bigger than the volume,
# margin 0, alignment 1, 4 and 8.
GEOMETRIES = [
    ((37, 91, 70), (16, 32, 32), (4, 8, 8), 1),
    ((23, 50, 41), (12, 24, 16), 2, 4),
    ((19, 45, 60), (16, 24, 32), 0, 4),
    ((30, 70, 53), (24, 32, 40), 8, 8),
    ((5, 16, 20), 64, 3, 8),  # one tile bigger than the volume on every axis
    ((1, 1, 1), 8, 0, 8),
    ((9, 100, 7), (16, 32, 8), (0, 4, 0), 4),  # tiled on one axis only
]


def _neighbourhood(reach: int):
    """A predictor whose output depends on each voxel's neighbours up to ``reach`` with weights
    that differ per axis and offset (a misplaced core or a core that saw padding instead of
    context changes it); integer weights on integer data, so float32 sums are exact."""
    def predict(x: np.ndarray) -> np.ndarray:
        p = np.pad(x, reach, mode="reflect") if reach else x
        out = np.zeros_like(x)
        inner = [slice(reach, reach + n) for n in x.shape]
        for axis in range(3):
            for offset in range(-reach, reach + 1):
                window = list(inner)
                window[axis] = slice(reach + offset, reach + offset + x.shape[axis])
                out += (1 + axis + 3 * (offset + reach)) * p[tuple(window)]
        return out
    return predict


def _untiled(volume: np.ndarray, predict, align: int) -> np.ndarray:
    """The whole-volume pass: padded at its end to the alignment, predicted once, cropped."""
    return predict(pad_to_multiple(volume, align))[(Ellipsis, *(slice(n) for n in volume.shape))]


@pytest.mark.parametrize(("shape", "tile", "margin", "align"), GEOMETRIES)
def test_splitter_cores_cover_the_volume_exactly_once(shape, tile, margin, align):
    splitter = Splitter(tile, margin, align)
    counts = np.zeros(shape, np.int32)
    volume = np.zeros(shape, np.uint16)
    padded = [-(-n // align) * align for n in shape]
    tiles = []
    for t, block in splitter(volume):
        counts[t.core] += 1
        tiles.append(t)
        assert block.dtype == np.float32
        assert block.shape == tuple(r.stop - r.start for r in t.read)
        assert all(n % align == 0 for n in block.shape) and all(r.start % align == 0 for r in t.read)
        for r, c, inner, m, n in zip(t.read, t.core, t.core_in_block, splitter.margin, padded):
            assert 0 <= r.start <= c.start < c.stop <= r.stop <= n  # core inside the block, block inside the volume
            assert (inner.start, inner.stop) == (c.start - r.start, c.stop - r.start)
            assert c.start == 0 or c.start - r.start >= m  # context before the core, except at the border
            assert r.stop == n or r.stop - c.stop >= m  # and after it
    np.testing.assert_array_equal(counts, np.ones(shape, np.int32))
    assert tiles == splitter.tiles(shape)


def test_a_tile_bigger_than_the_volume_reads_the_aligned_volume_once():
    [t] = Splitter(64, 3, 8).tiles((5, 16, 20))
    assert t.read == (slice(0, 8), slice(0, 16), slice(0, 24))
    assert t.core == t.core_in_block == (slice(0, 5), slice(0, 16), slice(0, 20))


@pytest.mark.parametrize(("shape", "tile", "margin", "align"), GEOMETRIES)
@pytest.mark.parametrize("predictor", ["plus_one", "neighbourhood"])
def test_splitter_and_merger_stitch_analytic_predictors_exactly(rng, shape, tile, margin, align, predictor):
    """Tiled equals untiled bit for bit: ``x + 1`` with any margin, a neighbourhood predictor
    whenever the margin covers its reach (as the network's receptive field must)."""
    volume = rng.integers(0, 16, shape).astype(np.float32)
    reach = min(Splitter(tile, margin, align).margin)
    predict = (lambda x: x + 1) if predictor == "plus_one" else _neighbourhood(min(reach, 2))
    merger = CoreMerger(shape)
    for t, block in Splitter(tile, margin, align)(volume):
        merger.aggregate(t, predict(block))
    stitched = merger.finalize()
    np.testing.assert_array_equal(stitched, _untiled(volume, predict, align))
    np.testing.assert_array_equal(predict_tiled(volume, predict, tile=tile, margin=margin, align=align), stitched)


def test_neighbourhood_predictor_shows_seams_without_context(rng):
    """The exactness above has teeth: a reach beyond the margin differs from untiled."""
    volume = rng.integers(0, 16, (19, 45, 60)).astype(np.float32)
    leaky = predict_tiled(volume, _neighbourhood(1), tile=(16, 24, 32), margin=0, align=4)
    assert not np.array_equal(leaky, _untiled(volume, _neighbourhood(1), 4))


def test_merger_keeps_leading_channels_and_hands_cores_to_a_sink(rng):
    volume = rng.integers(0, 16, (23, 50, 41)).astype(np.float32)
    splitter = Splitter((12, 24, 16), 2, 4)
    stacked, received = CoreMerger(volume.shape), []
    sink_merger = CoreMerger(volume.shape, lambda region, core: received.append((region, core)))
    for t, block in splitter(volume):
        prediction = np.stack([block, -block])
        stacked.aggregate(t, prediction)
        sink_merger.aggregate(t, prediction)
    np.testing.assert_array_equal(stacked.finalize(), np.stack([volume, -volume]))
    assert sink_merger.finalize() is None
    assert [region for region, _ in received] == [t.core for t in splitter.tiles(volume.shape)]
    for region, core in received:
        np.testing.assert_array_equal(core[0], volume[region])


def test_merger_without_a_sink_refuses_a_sink_context():
    with pytest.raises(ValueError, match="sink_context needs a sink"):
        CoreMerger((4, 4, 4), sink_context=2)


# --------------------------------------------------------------------------- one whole-volume path


def test_predict_normalised_is_the_former_validation_path(rng):
    """Training's validation and calibration predicted with ``DEFAULT_TILE`` and the volume's own
    percentiles through ``predict_tiled``: the shared path gives the same values, bit for bit."""
    volume = rng.gamma(2.0, 150.0, (70, 150, 140)).astype(np.float32)
    predict = _with_channels(_neighbourhood(2))
    former = predict_tiled(volume, predict, tile=DEFAULT_TILE["cpu"], margin=8, align=4,
                           transform=PercentileNorm.fit(volume).forward)
    np.testing.assert_array_equal(predict_normalised(volume, predict, margin=8, align=4, device_type="cpu"), former)
    assert len(Splitter(DEFAULT_TILE["cpu"], 8, 4).tiles(volume.shape)) > 1  # it did tile


def test_export_test_output_is_the_former_single_block_prediction(rng):
    """The bioimage.io test output: one block over the (aligned) test input, as before."""
    from fusecare.export.bioimageio import test_output

    volume = rng.gamma(2.0, 150.0, (24, 40, 32)).astype(np.float32)
    ensemble = SimpleNamespace(predict_block=_with_channels(_neighbourhood(2)), margin=4, alignment=8)
    former = ensemble.predict_block(PercentileNorm.fit(volume, FMC_PERCENTILES).forward(volume))[0]
    np.testing.assert_array_equal(test_output(ensemble, volume), former.astype(np.float32))


def _with_channels(predict):
    """A predictor returning (mean, spread) as the ensemble does."""
    return lambda x: np.stack([predict(x), np.abs(x)])
