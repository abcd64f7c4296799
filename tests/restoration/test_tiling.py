"""Tiled prediction: exact stitching with analytic predictors, and tiled == untiled for the net."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusecare.restoration.model import CareUNet, ModelConfig
from fusecare.restoration.tiling import axis_tiles, pad_to_multiple, predict_tiled, tile_grid


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
