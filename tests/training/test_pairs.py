"""Training data: FMC pair discovery and validation, study split, patch sampling."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import REPO, write_fmc_tif

from fusecare.errors import InputError
from fusecare.training.pairs import (
    PairPatches,
    PatchSettings,
    augment,
    check_clean_volume,
    discover_fmc_pairs,
    foreground_blocks,
    load_split,
    split_by_study,
)


def _pair(folder, case_id, channel, study, shape=(4, 16, 16), fused_shape=None):
    volume = np.ones(shape, np.uint16)
    write_fmc_tif(folder / f"image_{case_id}_{channel}_angle.tif", volume, channel=channel, study=study)
    write_fmc_tif(folder / f"image_{case_id}_{channel}_fused.tif", np.ones(fused_shape or shape, np.uint16),
                  channel=channel, study=study)


def test_pairs_are_found_by_name_and_filtered_by_channel(tmp_path):
    _pair(tmp_path, 0, "nucleus", 1)
    _pair(tmp_path, 5, "membrane", 2)
    _pair(tmp_path, 12, "nucleus", 3)
    (tmp_path / "notes.tif").write_bytes(b"")  # not an FMC name: ignored
    pairs = discover_fmc_pairs(tmp_path)
    assert [(p.case_id, p.channel, p.study) for p in pairs] == [(0, "nucleus", 1), (5, "membrane", 2),
                                                              (12, "nucleus", 3)]
    assert [p.case_id for p in discover_fmc_pairs(tmp_path, channel="nucleus")] == [0, 12]


def test_unpaired_file_is_one_failed_line_and_left_out(tmp_path, caplog):
    import logging

    _pair(tmp_path, 0, "nucleus", 1)
    write_fmc_tif(tmp_path / "image_3_nucleus_angle.tif", np.ones((4, 8, 8), np.uint16))
    with caplog.at_level(logging.ERROR):
        assert [p.case_id for p in discover_fmc_pairs(tmp_path)] == [0]
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert error.startswith("FAILED image_3_nucleus_angle.tif: has no fused partner")
    (tmp_path / "image_0_nucleus_fused.tif").unlink()  # nothing left: an error naming the folder
    with pytest.raises(InputError, match="no FMC pair"):
        discover_fmc_pairs(tmp_path)


def test_shape_mismatch_names_both_files_and_leaves_the_pair_out(tmp_path, caplog):
    import logging

    _pair(tmp_path, 7, "membrane", 1, shape=(4, 16, 16), fused_shape=(4, 16, 12))
    _pair(tmp_path, 8, "membrane", 1)
    with caplog.at_level(logging.ERROR):
        assert [p.case_id for p in discover_fmc_pairs(tmp_path)] == [8]
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert re.search(r"image_7_membrane_angle.tif is \(4, 16, 16\), image_7_membrane_fused.tif is \(4, 16, 12\)",
                     error)


def test_metadata_disagreement_alone_is_accepted(tmp_path):
    """Nucleus ids 213..399 have angle/fused metadata that disagree: shapes decide."""
    write_fmc_tif(tmp_path / "image_213_nucleus_angle.tif", np.ones((4, 8, 8), np.uint16), PhysicalSizeX=0.39)
    write_fmc_tif(tmp_path / "image_213_nucleus_fused.tif", np.ones((4, 8, 8), np.uint16), PhysicalSizeX=0.195)
    assert len(discover_fmc_pairs(tmp_path)) == 1


def test_empty_or_missing_folder_is_an_error(tmp_path):
    with pytest.raises(InputError, match="no FMC pair"):
        discover_fmc_pairs(tmp_path)
    with pytest.raises(InputError, match="not found"):
        discover_fmc_pairs(tmp_path / "absent")


def test_split_holds_whole_studies_out(tmp_path):
    for i, study in enumerate([1, 1, 2, 3]):
        _pair(tmp_path, i, "nucleus", study)
    train, validation = split_by_study(discover_fmc_pairs(tmp_path), [2])
    assert {p.study for p in train} == {1, 3} and [p.case_id for p in validation] == [2]
    with pytest.raises(InputError, match=r"no pair of validation studies \[5\]; studies present: \[1, 2, 3\]"):
        split_by_study(discover_fmc_pairs(tmp_path), [5])


def test_validation_studies_without_any_study_in_the_metadata_name_the_key(tmp_path):
    for i in range(2):
        for kind in ("angle", "fused"):
            write_fmc_tif(tmp_path / f"image_{i}_nucleus_{kind}.tif", np.ones((4, 16, 16), np.uint16), study=None)
    with pytest.raises(InputError, match=r"\[3\]: no file names its study \(the 'study' key of the TIFF metadata"):
        split_by_study(discover_fmc_pairs(tmp_path), [3])


def test_foreground_blocks_equal_a_direct_block_maximum(rng):
    target = rng.random((10, 21, 19)).astype(np.float32) ** 8
    blocks = foreground_blocks(target, (4, 8, 8))
    maxima = np.zeros(blocks.shape)
    for idx in np.ndindex(blocks.shape):
        region = tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, (4, 8, 8)))
        maxima[idx] = target[region].max()
    level = 0.4 * min(np.percentile(target, 99.9), np.percentile(maxima, 90))
    np.testing.assert_array_equal(blocks, maxima > level)


def test_foreground_survives_a_saturated_outlier():
    """Dim structure everywhere plus one bright object holding the top percentiles: the dim
    structure stays foreground (with the plain 0.4 x p99.9 rule it would all be background)."""
    target = np.zeros((16, 64, 64), np.float32)
    target[:, ::8, :] = 1.0  # dim sheets in every block
    target[2:10, 2:14, 2:14] = 50.0  # a saturated object, 0.9 % of the voxels
    blocks = foreground_blocks(target, (8, 16, 16))
    assert 0.4 * np.percentile(target, 99.9) > 1.0  # the old rule would drop the sheets
    assert blocks.all()


def _sparse_pair(rng):
    target = np.zeros((20, 64, 64), np.uint16)
    target[5:9, 10:18, 40:48] = 1000  # 0.3 % of the volume
    source = (target // 2 + rng.integers(0, 50, target.shape)).astype(np.uint16)
    return source, target


def test_patches_are_drawn_from_foreground_as_configured(rng):
    source, target = _sparse_pair(rng)
    for fraction, low, high in [(0.9, 0.8, 1.0), (0.0, 0.0, 0.25)]:
        patches = PairPatches(source, target, PatchSettings(patch=(8, 16, 16), foreground_fraction=fraction))
        hits = np.mean([patches.sample(rng)[1].max() > 0.5 for _ in range(200)])
        assert low <= hits <= high, (fraction, hits)


def test_patches_use_jittered_volume_percentiles(rng):
    source = rng.integers(100, 1100, (16, 32, 32)).astype(np.uint16)
    settings = PatchSettings(patch=(16, 32, 32), pmin=(2.0, 2.0), pmax=(99.8, 99.8))
    x, y = PairPatches(source, source, settings).sample(rng)
    low, high = np.percentile(source, (2, 99.8))
    np.testing.assert_allclose(np.sort(x.ravel()), np.sort((source.ravel() - low) / (high - low)), atol=1e-5)
    np.testing.assert_array_equal(x, y)  # the same augmentation on both


def test_patches_of_a_view_with_its_field_are_the_normalised_view_times_the_field(rng):
    """``ModelConfig.corrected_input``: the input patch is normalised with the view's own
    percentiles, then multiplied by the field over the same region (augmented alike)."""
    from fusecare.restoration.attenuation import AttenuationField

    source = rng.integers(100, 1100, (8, 32, 32)).astype(np.uint16)
    ramp = np.broadcast_to(np.exp(np.linspace(0.0, 1.0, 32, dtype=np.float32)), source.shape).copy()
    field = AttenuationField(ramp, (1, 1, 1), source.shape, "x start", 0.05, "z start", 0.0)
    # corners drawn anywhere (not from the target's foreground), so both draws read the same region
    settings = PatchSettings(patch=(8, 16, 16), pmin=(0.0, 0.0), pmax=(100.0, 100.0), foreground_fraction=0.0)
    seed = 11
    plain, _ = PairPatches(source, source, settings).sample(np.random.default_rng(seed))
    corrected, ramp_patch = PairPatches(source, ramp, settings, field).sample(np.random.default_rng(seed))
    ramp_patch = ramp_patch * (ramp.max() - ramp.min()) + ramp.min()  # the target's normalisation undone
    np.testing.assert_allclose(corrected, plain * ramp_patch, rtol=1e-5, atol=1e-6)
    assert ramp_patch.max() / ramp_patch.min() > 1.3  # a region of the field, not a constant
    with pytest.raises(ValueError, match="the field covers"):
        PairPatches(source[:4], source[:4], settings, field)


def test_augment_applies_the_same_transform_to_both(rng):
    x = rng.random((4, 8, 8)).astype(np.float32)
    seen = set()
    for _ in range(40):
        a, b = augment(x, x + 1, rng)
        np.testing.assert_allclose(b, a + 1)
        seen.add(a.tobytes())
    assert len(seen) > 8  # flips and rotations vary


def test_sampling_never_modifies_the_volumes(rng):
    """Normalisation is in place on the patch: a float32 volume must not be a view of it."""
    source = rng.random((8, 32, 32)).astype(np.float32)
    target = source.copy()
    before = source.copy()
    patches = PairPatches(source, target, PatchSettings(patch=(8, 16, 16)))
    for _ in range(20):
        patches.sample(rng)
    np.testing.assert_array_equal(source, before)
    np.testing.assert_array_equal(target, before)


# --------------------------------------------------------------------------- splits and clean volumes


def _split(tmp_path, content: dict) -> tuple:
    for name in ("a.tif", "b.tif", "c.tif"):
        (tmp_path / name).write_bytes(b"")
    path = tmp_path / "split.json"
    path.write_text(json.dumps(content))
    return path, tmp_path


def test_split_loads_paths_per_role(tmp_path):
    path, data = _split(tmp_path, {"about": "x", "membrane": {"train": ["a.tif"], "test": ["b.tif", "c.tif"]}})
    split = load_split(path, data)
    expected = {"train": [data / "a.tif"], "validation": [], "test": [data / "b.tif", data / "c.tif"]}
    assert split == {"membrane": expected}


@pytest.mark.parametrize(("content", "message"), [
    ({"membrane": {"train": ["a.tif"], "test": ["a.tif"]}}, "a.tif is listed under both 'train' and 'test'"),
    ({"membrane": {"train": ["missing.tif"]}}, "membrane train volume missing.tif not found"),
    ({"cytoplasm": {"train": ["a.tif"]}}, "unknown channel 'cytoplasm'"),
    ({"nucleus": {"holdout": ["a.tif"]}}, r"unknown role\(s\) \['holdout'\]"),
    (["a.tif"], "expected a JSON object"),
    ({"membrane": {"test": ["a.tif"]}, "nucleus": {"validation": ["a.tif"]}},
     "membrane test volume a.tif is listed under nucleus 'validation'"),
    ({"membrane": {"train": ["b.tif"]}, "nucleus": {"test": ["b.tif"]}},
     "nucleus test volume b.tif is listed under membrane 'train'"),
])
def test_split_refuses_leaks_and_unknown_volumes(tmp_path, content, message):
    path, data = _split(tmp_path, content)
    with pytest.raises(InputError, match=message):
        load_split(path, data)


def test_a_channel_may_validate_on_what_another_trains_on(tmp_path):
    path, data = _split(tmp_path, {"membrane": {"train": ["a.tif"], "test": ["c.tif"]},
                                   "nucleus": {"validation": ["a.tif"], "test": ["b.tif"]}})
    assert load_split(path, data)["nucleus"]["validation"] == [data / "a.tif"]


def test_shipped_split_holds_out_three_volumes_per_channel_with_a_lightsheet_one(shared_data):
    split = load_split(REPO / "train" / "splits" / "heldout.json", shared_data)
    for channel in ("membrane", "nucleus"):
        assert len(split[channel]["test"]) >= 3
        assert any("lateralroot" in p.name or "tribolium" in p.name for p in split[channel]["test"])


@pytest.mark.parametrize(("volume", "message"), [
    (np.full((8, 16, 16), 7, np.uint16), "percentiles collapse"),
    (np.zeros((8, 16, 16), np.float32), "percentiles collapse"),  # no foreground at all
    (np.pad(np.ones((1, 1, 1), np.uint16), ((0, 7), (0, 15), (0, 15))), "percentiles collapse"),
])
def test_clean_volumes_that_cannot_train_are_refused_by_name(volume, message):
    with pytest.raises(InputError, match=f"clean volume v.tif: .*{message}"):
        check_clean_volume("v.tif", volume)
    check_clean_volume("ok.tif", np.arange(8 * 16 * 16, dtype=np.uint16).reshape(8, 16, 16))


def test_unreadable_file_is_one_failed_line_and_its_pair_is_left_out(tmp_path, caplog):
    import logging

    volume = np.arange(4 * 16 * 16, dtype=np.uint16).reshape(4, 16, 16)
    for i in (1, 2, 3):
        for kind in ("angle", "fused"):
            write_fmc_tif(tmp_path / f"image_{i}_nucleus_{kind}.tif", volume)
    data = (tmp_path / "image_2_nucleus_angle.tif").read_bytes()
    (tmp_path / "image_2_nucleus_angle.tif").write_bytes(data[:12])  # cut inside the header
    (tmp_path / "image_3_nucleus_fused.tif").unlink()
    (tmp_path / "image_3_nucleus_fused.tif").symlink_to(tmp_path / "gone.tif")
    with caplog.at_level(logging.ERROR):
        pairs = discover_fmc_pairs(tmp_path)
    assert [p.case_id for p in pairs] == [1]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert errors[0].startswith("FAILED image_2_nucleus_angle.tif: ") and "\n" not in errors[0]
    assert errors[1].startswith("FAILED image_3_nucleus_fused.tif: broken symbolic link")


@pytest.mark.parametrize("compression", [None, "zlib"], ids=["contiguous", "compressed"])
def test_a_file_cut_inside_its_pixels_is_one_failed_line_before_any_pixel_is_read(tmp_path, caplog, compression):
    """A copy cut short keeps a readable header: the header's own offsets find it, so the pair is
    left out at discovery instead of stopping training when its pixels are first read."""
    import logging

    import tifffile

    volume = np.arange(8 * 32 * 32, dtype=np.uint16).reshape(8, 32, 32)
    for i in (1, 2):
        for kind in ("angle", "fused"):
            write_fmc_tif(tmp_path / f"image_{i}_nucleus_{kind}.tif", volume)
    cut = tmp_path / "image_2_nucleus_fused.tif"
    tifffile.imwrite(cut, volume, compression=compression, metadata={"axes": "ZYX"})
    with tifffile.TiffFile(cut) as tif:  # cut 100 bytes before the pixels' end, header kept
        series = tif.series[0]
        end = (series.dataoffset + series.nbytes if series.dataoffset is not None
               else max(o + c for p in series.pages for o, c in zip(p.dataoffsets, p.databytecounts)))
        first_ifd_end = tif.pages[0].offset + 200
    assert end - 100 > first_ifd_end
    cut.write_bytes(cut.read_bytes()[:end - 100])
    with caplog.at_level(logging.ERROR):
        pairs = discover_fmc_pairs(tmp_path)
    assert [p.case_id for p in pairs] == [1]
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert error.startswith("FAILED image_2_nucleus_fused.tif: truncated TIFF") and "\n" not in error
