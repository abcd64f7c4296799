"""fusecare.io: metadata parsing, atomic template-style writing, listing and rejecting cases."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import write_fmc_tif

from fusecare import io
from fusecare.errors import InputError
from fusecare.io import (
    DEFAULT_VOXEL_SIZE_UM,
    CaseMeta,
    VoxelSize,
    inspect_case,
    list_cases,
    parse_meta,
    read_case,
    write_case,
)


@pytest.fixture
def volume(rng: np.random.Generator) -> np.ndarray:
    """A small uint16 ZYX volume; Y and X not multiples of 128, so the last tiles are partial."""
    return rng.integers(0, 60000, size=(5, 40, 150), dtype=np.uint16)


def _resolution(page: tifffile.TiffPage, tag: str) -> float:
    numerator, denominator = page.tags[tag].value
    return numerator / denominator


# --------------------------------------------------------------------------- reading metadata


def test_shaped_json_metadata_gives_voxel_size_channel_study_unit(tmp_path, volume):
    path = write_fmc_tif(tmp_path / "case.tif", volume, PhysicalSizeX=0.195, PhysicalSizeY=0.39,
                         PhysicalSizeZ=1.01, channel="membrane", study=4, unit="um")
    case = read_case(path)
    assert case.volume.shape == volume.shape
    np.testing.assert_array_equal(case.volume, volume)
    assert case.meta.voxel_size == VoxelSize(z=1.01, y=0.39, x=0.195)
    assert case.meta.channel == "membrane"
    assert case.meta.study == 4
    assert case.meta.unit == "um"
    assert case.meta.raw["PhysicalSizeX"] == 0.195
    assert case.meta.notes == ()


def test_imagej_metadata_gives_z_from_spacing_and_yx_from_resolution_tags(tmp_path, volume):
    path = tmp_path / "image_7_nucleus_angle.tif"
    tifffile.imwrite(path, volume, imagej=True, resolution=(1 / 0.3, 1 / 0.25),
                     metadata={"spacing": 2.5, "unit": "micron", "axes": "ZYX"})
    info = inspect_case(path)
    assert info.shape == volume.shape
    assert info.meta.voxel_size.zyx == pytest.approx((2.5, 0.25, 0.3))
    assert info.meta.unit == "micron"
    assert info.meta.raw["spacing"] == 2.5
    assert info.meta.channel == "nucleus"  # ImageJ metadata has no channel: the file name decides


@pytest.mark.parametrize("spelling", ["PhysicalSize{}", "physicalsize{}", "physical_size_{}"])
def test_every_spelling_of_physical_size_keys_is_read(tmp_path, volume, spelling):
    sizes = {"X": 0.33, "Y": 0.34, "Z": 3.0}
    md = {spelling.format(a if spelling.startswith("P") else a.lower()): v for a, v in sizes.items()}
    keys = {"PhysicalSizeX": None, "PhysicalSizeY": None, "PhysicalSizeZ": None, **md}
    path = write_fmc_tif(tmp_path / "case.tif", volume, **keys)
    with tifffile.TiffFile(path) as tif:
        assert set(md) <= set(tif.shaped_metadata[0])
    meta = inspect_case(path).meta
    assert meta.voxel_size == VoxelSize(z=3.0, y=0.34, x=0.33)
    assert not any("voxel size" in n or "PhysicalSize" in n for n in meta.notes)


def test_spacing_key_gives_z_when_physical_size_z_is_missing():
    meta = parse_meta({"PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2, "spacing": 3.0, "channel": "nucleus"})
    assert meta.voxel_size == VoxelSize(z=3.0, y=0.2, x=0.2)
    assert meta.notes == ()


def test_physical_size_z_wins_over_spacing():
    meta = parse_meta({"PhysicalSizeZ": 1.5, "spacing": 3.0})
    assert meta.voxel_size.z == 1.5


def test_unit_defaults_to_micron_and_is_kept_as_given():
    assert parse_meta({}).unit == "micron"
    assert parse_meta({"unit": "nm"}).unit == "nm"


@pytest.mark.parametrize("value", ["nucleus", "Nucleus", " NUCLEUS "])
def test_channel_nucleus_in_any_case_is_nucleus(value):
    meta = parse_meta({"channel": value})
    assert meta.channel == "nucleus"
    assert not any("channel" in n for n in meta.notes)


def test_channel_membrane_is_membrane_without_note():
    meta = parse_meta({"channel": "membrane"})
    assert meta.channel == "membrane"
    assert not any("channel" in n for n in meta.notes)


def test_unknown_channel_is_treated_as_membrane_with_a_note():
    meta = parse_meta({"channel": "cytoplasm"}, path=Path("image_1_nucleus_angle.tif"))
    assert meta.channel == "membrane"  # the metadata wins over the file name
    assert any("cytoplasm" in n and "membrane" in n for n in meta.notes)


@pytest.mark.parametrize(("name", "expected"), [
    ("image_12_nucleus_angle.tif", "nucleus"),
    ("image_12_membrane_angle.tif", "membrane"),
    ("case.tif", "membrane"),
])
def test_missing_channel_comes_from_the_file_name_or_is_membrane(name, expected):
    meta = parse_meta({"PhysicalSizeX": 0.2}, path=Path(name))
    assert meta.channel == expected
    assert any("no channel" in n for n in meta.notes)


@pytest.mark.parametrize(("raw", "expected"), [({"Channel": "nucleus"}, True), ({"channel_": "x"}, True),
                                             ({}, False), ({"channels": "nucleus"}, False)])
def test_meta_says_whether_the_channel_came_from_the_metadata(raw, expected):
    assert parse_meta(raw, path=Path("image_1_nucleus_angle.tif")).channel_in_metadata is expected


def test_missing_channel_without_a_path_is_membrane():
    assert parse_meta({}).channel == "membrane"


@pytest.mark.parametrize(("value", "expected"), [(3, 3), ("5", 5), (np.int64(2), 2)])
def test_study_as_int_or_integer_string(value, expected):
    meta = parse_meta({"study": value})
    assert meta.study == expected
    assert not any("study" in n for n in meta.notes)


@pytest.mark.parametrize("value", ["drosophila", "", [1, 2]])
def test_non_numeric_study_is_none_with_a_note(value):
    meta = parse_meta({"study": value})
    assert meta.study is None
    assert any("study" in n for n in meta.notes)


def test_missing_study_is_none_without_a_note():
    meta = parse_meta({"channel": "nucleus"})
    assert meta.study is None
    assert not any("study" in n for n in meta.notes)


@pytest.mark.parametrize("bad", ["abc", "", -0.2, 0, "nan", float("inf"), None, [0.2]])
def test_bad_or_missing_physical_size_defaults_to_one_with_a_note(bad):
    raw = {"PhysicalSizeX": bad, "PhysicalSizeY": 0.4, "PhysicalSizeZ": 2.0}
    if bad is None:
        del raw["PhysicalSizeX"]
    meta = parse_meta(raw)
    assert meta.voxel_size == VoxelSize(z=2.0, y=0.4, x=DEFAULT_VOXEL_SIZE_UM)
    assert DEFAULT_VOXEL_SIZE_UM == 1.0
    assert any("X" in n and "assuming 1.0" in n for n in meta.notes)


def test_file_with_bad_physical_sizes_reads_with_defaults_and_notes(tmp_path, volume):
    path = write_fmc_tif(tmp_path / "case.tif", volume, PhysicalSizeX="n/a", PhysicalSizeY=-1,
                         PhysicalSizeZ=None)
    case = read_case(path)
    np.testing.assert_array_equal(case.volume, volume)
    assert case.meta.voxel_size == VoxelSize(1.0, 1.0, 1.0)
    assert any("'n/a'" in n for n in case.meta.notes)
    assert any("-1" in n for n in case.meta.notes)


def test_file_without_any_metadata_reads_with_defaults(tmp_path, volume):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, volume, metadata=None)
    case = read_case(path)
    np.testing.assert_array_equal(case.volume, volume)
    assert case.meta.voxel_size == VoxelSize()
    assert case.meta.channel == "membrane"


def test_singleton_axes_are_squeezed_to_zyx(tmp_path, volume):
    path = tmp_path / "case.tif"
    tifffile.imwrite(path, volume[:, None])  # Z, C=1, Y, X as ImageJ-like tools write it
    case = read_case(path)
    assert case.volume.shape == volume.shape
    np.testing.assert_array_equal(case.volume, volume)


# --------------------------------------------------------------------------- writing


@pytest.fixture
def written(tmp_path, volume):
    """A case written by write_case from metadata carrying a stale 'shape' and odd values."""
    raw = {"PhysicalSizeX": 0.195, "PhysicalSizeY": 0.39, "PhysicalSizeZ": 1.0, "unit": "micron",
           "axes": "ZYX", "channel": "nucleus", "study": np.int64(3), "shape": [9, 9, 9],
           "note": "keep me"}
    meta = parse_meta(raw)
    out = write_case(tmp_path / "case.tif", volume, meta)
    return out, meta, raw


def test_write_case_writes_uint16_bigtiff_with_128_tiles(written, volume):
    path, _, _ = written
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
        page = tif.pages[0]
        assert page.is_tiled
        assert (page.tilelength, page.tilewidth) == (128, 128)
        assert tif.series[0].dtype == np.uint16
        assert tif.series[0].shape == volume.shape
        np.testing.assert_array_equal(tif.asarray(), volume)


def test_write_case_sets_resolution_to_inverse_physical_size(written):
    path, _, _ = written
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert _resolution(page, "XResolution") == pytest.approx(1 / 0.195, rel=1e-6)
        assert _resolution(page, "YResolution") == pytest.approx(1 / 0.39, rel=1e-6)


def test_write_case_round_trips_input_metadata_despite_a_stale_shape(written, volume):
    path, meta, raw = written
    with tifffile.TiffFile(path) as tif:
        md = tif.shaped_metadata[0]
        assert tif.series[0].axes == "ZYX"
    assert md["shape"] == list(volume.shape)  # tifffile's own, not the stale [9, 9, 9]
    assert md["axes"] == "ZYX"
    for key in ("PhysicalSizeX", "PhysicalSizeY", "PhysicalSizeZ", "unit", "channel", "note"):
        assert md[key] == raw[key]
    assert md["study"] == 3
    again = inspect_case(path).meta
    assert again.voxel_size == meta.voxel_size
    assert (again.channel, again.study) == ("nucleus", 3)


def test_write_case_adds_the_voxel_size_used_when_the_input_had_none(tmp_path, volume):
    meta = parse_meta({"channel": "membrane"})
    path = write_case(tmp_path / "case.tif", volume, meta)
    with tifffile.TiffFile(path) as tif:
        md = tif.shaped_metadata[0]
    assert (md["PhysicalSizeX"], md["PhysicalSizeY"], md["PhysicalSizeZ"]) == (1.0, 1.0, 1.0)


def test_write_case_keeps_the_input_spelling_without_adding_a_duplicate(tmp_path, volume):
    meta = parse_meta({"physical_size_x": 0.5, "physicalsizey": 0.5, "PhysicalSizeZ": 2.0})
    path = write_case(tmp_path / "case.tif", volume, meta)
    with tifffile.TiffFile(path) as tif:
        md = tif.shaped_metadata[0]
    assert md["physical_size_x"] == 0.5 and md["physicalsizey"] == 0.5
    assert "PhysicalSizeX" not in md and "PhysicalSizeY" not in md


def test_write_case_output_is_readable_by_others(written):
    path, _, _ = written
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_write_case_leaves_no_temporary_file(written):
    path, _, _ = written
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_write_case_temporary_file_lives_beside_the_destination(tmp_path, volume, monkeypatch):
    """The rename is atomic only within one file system: the temporary file must be created in
    the destination's folder, never in the system temp folder (in the container /tmp is a
    separate, small tmpfs). The system temp folder points elsewhere here, and stays empty."""
    import tempfile

    elsewhere = tmp_path / "system_tmp"
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    written_to: list[Path] = []
    replaced: list[tuple[Path, Path]] = []
    real_imwrite, real_replace = tifffile.imwrite, os.replace

    def spy_imwrite(file, data, **kwargs):
        written_to.append(Path(file))
        assert list(elsewhere.iterdir()) == []
        return real_imwrite(file, data, **kwargs)

    def spy_replace(src, dst):
        replaced.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(tifffile, "imwrite", spy_imwrite)
    monkeypatch.setattr(os, "replace", spy_replace)
    out = tmp_path / "out"
    out.mkdir()
    path = write_case(out / "case.tif", volume, CaseMeta())
    assert replaced == [(written_to[0], path)]
    assert written_to[0].parent == path.parent and written_to[0].name.startswith(".case.tif.")
    assert list(elsewhere.iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == ["case.tif"]


def test_write_case_replaces_an_existing_output(tmp_path, volume):
    path = write_case(tmp_path / "case.tif", np.zeros_like(volume), CaseMeta())
    write_case(path, volume, CaseMeta())
    np.testing.assert_array_equal(tifffile.imread(path), volume)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.tif"]


def test_write_case_failure_leaves_no_partial_or_temporary_file(tmp_path, volume, monkeypatch):
    def fail_midway(file, data, **kwargs):
        Path(file).write_bytes(b"II*\x00" + b"\x00" * 1000)  # half a file, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", fail_midway)
    with pytest.raises(OSError, match="No space left"):
        write_case(tmp_path / "case.tif", volume, CaseMeta())
    assert list(tmp_path.iterdir()) == []


def test_write_case_failure_keeps_a_previous_output_intact(tmp_path, volume, monkeypatch):
    path = write_case(tmp_path / "case.tif", volume, CaseMeta())
    before = path.read_bytes()

    def interrupted(file, data, **kwargs):
        Path(file).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(tifffile, "imwrite", interrupted)
    with pytest.raises(KeyboardInterrupt):  # the very interrupt raised above: nothing to match
        write_case(path, np.zeros_like(volume), CaseMeta())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.tif"]


@pytest.mark.parametrize("bad", [np.zeros((4, 8, 8), np.float32), np.zeros((8, 8), np.uint16),
                                 np.zeros((2, 4, 8, 8), np.uint16)])
def test_write_case_refuses_anything_but_3d_uint16(tmp_path, bad):
    with pytest.raises(ValueError, match="3-D uint16"):
        write_case(tmp_path / "case.tif", bad, CaseMeta())
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- listing


def test_list_cases_sorted_tif_and_tiff_hidden_and_others_skipped(tmp_path):
    for name in ("b.tiff", "a.tif", "C.TIF", ".hidden.tif", "notes.txt", "d.tif.bak"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.tif").mkdir()
    assert [p.name for p in list_cases(tmp_path)] == ["C.TIF", "a.tif", "b.tiff"]


def test_list_cases_empty_folder_is_an_input_error(tmp_path):
    (tmp_path / ".hidden.tif").write_bytes(b"x")
    with pytest.raises(InputError, match="no .tif/.tiff file"):
        list_cases(tmp_path)


def test_list_cases_missing_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        list_cases(tmp_path / "absent")


# --------------------------------------------------------------------------- bad files


def _make_bad(kind: str, path: Path, rng: np.random.Generator) -> Path:
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "not-a-tiff":
        path.write_bytes(b"%PDF-1.7 this is not a TIFF at all\n" * 20)
    elif kind == "truncated":
        full = write_fmc_tif(path.with_name("full.tif"),
                             rng.integers(0, 1000, (8, 64, 64), dtype=np.uint16))
        data = full.read_bytes()
        full.unlink()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "2-D":
        tifffile.imwrite(path, np.zeros((32, 32), np.uint16))
    elif kind == "4-D":
        tifffile.imwrite(path, np.zeros((2, 6, 16, 16), np.uint16))
    elif kind == "RGB":
        tifffile.imwrite(path, np.zeros((4, 16, 16, 3), np.uint8), photometric="rgb")
    else:
        raise AssertionError(kind)
    return path


BAD_KINDS = ["zero-byte", "not-a-tiff", "truncated", "2-D", "4-D", "RGB"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_file_is_an_input_error_with_one_line_naming_it(tmp_path, rng, kind):
    path = _make_bad(kind, tmp_path / f"bad_{kind}.tif", rng)
    with pytest.raises(InputError) as excinfo:
        read_case(path)
    message = str(excinfo.value)
    assert path.name in message
    assert "\n" not in message
    assert excinfo.value.__cause__ is None  # suppressed: the message says it all


@pytest.mark.parametrize(("kind", "words"), [
    ("zero-byte", "empty"), ("not-a-tiff", "not a readable TIFF"), ("truncated", "truncated"),
    ("2-D", "2-D"), ("4-D", "4-D"), ("RGB", "RGB"),
])
def test_bad_file_message_says_what_is_wrong(tmp_path, rng, kind, words):
    path = _make_bad(kind, tmp_path / "bad.tif", rng)
    with pytest.raises(InputError, match=words):
        read_case(path)


@pytest.mark.parametrize("kind", ["zero-byte", "not-a-tiff", "2-D", "4-D", "RGB"])
def test_bad_file_is_rejected_from_its_header_alone(tmp_path, rng, kind):
    path = _make_bad(kind, tmp_path / "bad.tif", rng)
    with pytest.raises(InputError, match=re.escape(path.name)):
        inspect_case(path)


def test_truncated_file_emits_no_stray_tifffile_log_lines(tmp_path, rng, caplog):
    """A truncated case must be reported once, by us: tifffile's own complaints (which do not
    name the file) must not reach the log as separate ERROR lines."""
    path = _make_bad("truncated", tmp_path / "bad.tif", rng)
    with pytest.raises(InputError, match="truncated"):
        read_case(path)
    stray = [r for r in caplog.records if r.name.startswith("tifffile") and r.levelno >= 30]
    assert stray == [], [r.getMessage() for r in stray]


def test_inspect_case_reads_no_pixels(tmp_path, volume, monkeypatch):
    path = write_fmc_tif(tmp_path / "case.tif", volume)

    def no_pixels(*args, **kwargs):
        raise AssertionError("inspect_case read pixel data")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", no_pixels)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_pixels)
    info = inspect_case(path)
    assert info.shape == volume.shape
    assert info.dtype == np.uint16
    assert info.nbytes == volume.nbytes


def test_io_module_does_not_import_torch():
    assert "torch" not in vars(io)
    source = Path(io.__file__).read_text()
    assert "import torch" not in source


def test_output_file_mode_is_independent_of_umask(tmp_path, volume):
    old = os.umask(0o077)
    try:
        path = write_case(tmp_path / "case.tif", volume, CaseMeta())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("z", [1, 3, 4])
def test_thin_volumes_are_not_written_as_rgb(tmp_path, z):
    """tifffile stores (3|4, Y, X) as planar RGB unless told otherwise: outputs must stay ZYX."""
    volume = np.arange(z * 20 * 24, dtype=np.uint16).reshape(z, 20, 24)
    write_case(tmp_path / "thin.tif", volume, CaseMeta())
    with tifffile.TiffFile(tmp_path / "thin.tif") as tif:
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK
    if z > 1:
        np.testing.assert_array_equal(read_case(tmp_path / "thin.tif").volume, volume)


# --------------------------------------------------------------------------- lazy volumes


def _write_formats(folder: Path, volume: np.ndarray) -> dict[str, Path]:
    """The same volume stored the ways a user's files come: template, compressed, ImageJ, plain."""
    paths = {name: folder / f"{name}.tif" for name in ("template", "zlib", "imagej", "plain")}
    write_case(paths["template"], volume, CaseMeta())
    tifffile.imwrite(paths["zlib"], volume, compression="zlib", photometric="minisblack")
    tifffile.imwrite(paths["imagej"], volume, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(paths["plain"], volume, photometric="minisblack")
    return paths


@pytest.mark.parametrize("fmt", ["template", "zlib", "imagej", "plain"])
def test_paged_volume_indexes_like_numpy(tmp_path, volume, fmt):
    path = _write_formats(tmp_path, volume)[fmt]
    with io.open_volume(path) as paged:
        assert isinstance(paged, io.PagedVolume)
        assert (paged.shape, paged.dtype, paged.ndim, len(paged)) == (volume.shape, volume.dtype, 3, 5)
        keys = [
            2, -1, slice(None), slice(1, 4), slice(None, None, 2), slice(4, 0, -2), slice(3, 3),
            (slice(1, 3), slice(5, 30), slice(140, None)), (0, 7), (Ellipsis, 3),
            np.array([2, 1, 0, 0, 1, 4, 4, 3]), (np.array([1, 3]), slice(0, 5)), (slice(None), [3, 0]),
        ]
        for key in keys:
            np.testing.assert_array_equal(paged[key], volume[key], err_msg=f"key {key!r}")
        np.testing.assert_array_equal(np.asarray(paged), volume)


def test_paged_volume_reads_only_the_planes_indexed(tmp_path, volume, monkeypatch):
    path = _write_formats(tmp_path, volume)["template"]
    asked: list[list[int]] = []
    real = tifffile.TiffFile.asarray

    def spy(self, key=None, **kw):
        asked.append(list(key))
        return real(self, key=key, **kw)

    monkeypatch.setattr(tifffile.TiffFile, "asarray", spy)
    with io.open_volume(path) as paged:
        paged[np.array([3, 2, 2, 3])]
        paged[1:2, :4]
    assert asked == [[2, 3], [1]]


def test_paged_volume_out_of_range_is_an_index_error(tmp_path, volume):
    with io.open_volume(_write_formats(tmp_path, volume)["template"]) as paged:
        for key in (5, -6, np.array([0, 5]), (np.array([[0]]),), 1.5, (np.array([0, 1]), slice(None), [1, 2])):
            expected = "out of range for 5 planes|PagedVolume takes an int|cannot be combined"
            with pytest.raises(IndexError, match=expected):
                paged[key]


def test_open_volume_memory_maps_plain_files_when_asked(tmp_path, volume):
    paths = _write_formats(tmp_path, volume)
    mapped = io.open_volume(paths["plain"], memmap=True)
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, volume)
    with io.open_volume(paths["zlib"], memmap=True) as paged:  # compressed: cannot be mapped
        np.testing.assert_array_equal(paged[:], volume)


def test_open_volume_reads_a_file_whose_pages_are_not_planes(tmp_path, volume):
    """A volume stored in one page (volumetric tiles) cannot be read plane by plane: read whole."""
    path = tmp_path / "volumetric.tif"
    tifffile.imwrite(path, volume, tile=(1, 16, 16), volumetric=True, photometric="minisblack")
    assert len(tifffile.TiffFile(path).series[0].pages) == 1
    whole = io.open_volume(path)
    assert type(whole) is np.ndarray
    np.testing.assert_array_equal(whole, volume)


def test_paged_volume_names_the_file_when_its_pixels_are_damaged(tmp_path, volume):
    path = tmp_path / "damaged.tif"
    tifffile.imwrite(path, volume, compression="zlib", photometric="minisblack")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[3].dataoffsets[0], tif.pages[3].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = b"\x00" * count  # not a zlib stream
    path.write_bytes(bytes(data))
    with io.open_volume(path) as paged:
        np.testing.assert_array_equal(paged[:3], volume[:3])
        with pytest.raises(InputError, match="damaged.tif: truncated or corrupt TIFF"):
            paged[2:5]
    with pytest.raises(InputError, match="damaged.tif: truncated or corrupt TIFF"):
        read_case(path)


# --------------------------------------------------------------------------- issue 10: one rule for every reader


@pytest.mark.parametrize("error", [
    __import__("struct").error("unpack requires a buffer of 8 bytes"), ZeroDivisionError("division by zero"),
    TypeError("'NoneType' object is not subscriptable"), KeyError(277), AssertionError(),
    RuntimeError("codec"), MemoryError(), IndexError("list index out of range"), ValueError("bad"),
])
def test_any_exception_opening_a_file_is_one_input_error_naming_it(tmp_path, volume, monkeypatch, error):
    path = write_fmc_tif(tmp_path / "case.tif", volume)

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(io.tifffile, "TiffFile", broken)
    with pytest.raises(InputError, match=r"^case\.tif: not a readable TIFF \(") as caught:
        inspect_case(path)
    assert "\n" not in str(caught.value)
    assert type(error).__name__ in str(caught.value)


@pytest.mark.parametrize("error", [KeyError("PhysicalSizeX"), TypeError("bad"), ZeroDivisionError()])
def test_exception_parsing_metadata_is_an_input_error(tmp_path, volume, monkeypatch, error):
    path = write_fmc_tif(tmp_path / "case.tif", volume)

    def broken(tif):
        raise error

    monkeypatch.setattr(io, "_raw_metadata", broken)
    with pytest.raises(InputError, match=r"^case\.tif: "):
        inspect_case(path)


@pytest.mark.parametrize("error", [__import__("struct").error("short"), MemoryError(), AssertionError()])
def test_exception_decoding_pixels_is_an_input_error(tmp_path, volume, monkeypatch, error):
    path = write_fmc_tif(tmp_path / "case.tif", volume)
    info = inspect_case(path)

    def broken(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", broken)
    with pytest.raises(InputError, match=r"^case\.tif: truncated or corrupt TIFF"):
        read_case(path, info=info)


@pytest.mark.parametrize("size", [1e-12, 2e-10, 1e10, 1e300])
def test_physical_size_the_resolution_tag_cannot_hold_is_the_default_with_a_note(tmp_path, volume, size):
    path = write_fmc_tif(tmp_path / "case.tif", volume, PhysicalSizeX=size, PhysicalSizeY=size)
    case = read_case(path)
    assert case.meta.voxel_size.x == case.meta.voxel_size.y == DEFAULT_VOXEL_SIZE_UM
    assert any("PhysicalSizeX" in n and "assuming 1.0" not in n for n in case.meta.notes)
    (tmp_path / "out").mkdir()
    out = write_case(tmp_path / "out" / "case.tif", volume, case.meta)
    with tifffile.TiffFile(out) as tif:
        assert _resolution(tif.pages[0], "XResolution") == pytest.approx(1.0)
        assert tif.shaped_metadata[0]["PhysicalSizeX"] == size  # the input's value, written back


def test_write_case_never_fails_on_a_voxel_size_out_of_range(tmp_path, volume):
    meta = CaseMeta(voxel_size=VoxelSize(1.0, 1e-12, 1e300), raw={"study": float("inf"), "x": float("nan")})
    path = write_case(tmp_path / "case.tif", volume, meta)
    with tifffile.TiffFile(path) as tif:
        assert _resolution(tif.pages[0], "XResolution") == pytest.approx(1.0)
        md = tif.shaped_metadata[0]
    assert md["study"] == "inf" and md["x"] == "nan"  # strict JSON: non-finite numbers as text


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "Infinity", 2.5, 1e300, True])
def test_study_that_is_not_a_finite_integer_is_missing_with_a_note(value):
    meta = parse_meta({"study": value})
    assert meta.study is None
    assert any("study" in n for n in meta.notes)


def test_study_infinity_in_a_file_is_read_as_missing(tmp_path, volume):
    path = write_fmc_tif(tmp_path / "case.tif", volume, study=float("inf"))
    assert inspect_case(path).meta.study is None


def test_ome_tiff_voxel_sizes_are_read(tmp_path, volume):
    path = tmp_path / "case.ome.tif"
    tifffile.imwrite(path, volume, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.3, "PhysicalSizeZ": 2.0,
        "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm", "PhysicalSizeZUnit": "µm"})
    info = inspect_case(path)
    assert info.meta.voxel_size == VoxelSize(z=2.0, y=0.3, x=0.25)
    assert not any("voxel size unknown" in n for n in info.meta.notes)


def test_ome_voxel_sizes_in_nanometres_are_converted():
    xml = ('<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image><Pixels '
           'PhysicalSizeX="195" PhysicalSizeXUnit="nm" PhysicalSizeY="0.2" PhysicalSizeZ="1" '
           'PhysicalSizeZUnit="furlong"/></Image></OME>')
    assert io.ome_metadata(xml) == {"PhysicalSizeX": pytest.approx(0.195), "PhysicalSizeY": 0.2}
    assert io.ome_metadata("<not xml") == {}


@pytest.mark.parametrize("stored", [(1, 5, 40, 150), (5, 40, 150, 1)])
def test_singleton_axis_is_kept_on_output(tmp_path, volume, stored):
    path = tmp_path / "case.tif"
    tifffile.imwrite(path, volume.reshape(stored), photometric="minisblack", metadata={"channel": "nucleus"})
    case = read_case(path)
    assert case.volume.shape == volume.shape
    out = write_case(tmp_path / "out.tif", case.volume, case.meta)
    with tifffile.TiffFile(out) as tif:
        assert tif.series[0].shape == stored
        np.testing.assert_array_equal(tif.asarray().reshape(volume.shape), volume)
    assert inspect_case(out).shape == volume.shape  # and it reads back as the same case


def test_broken_symlink_is_listed_and_fails_with_its_own_line(tmp_path, volume):
    write_fmc_tif(tmp_path / "a.tif", volume)
    (tmp_path / "b.tif").symlink_to(tmp_path / "gone.tif")
    assert [p.name for p in list_cases(tmp_path)] == ["a.tif", "b.tif"]
    with pytest.raises(InputError, match=r"^b\.tif: broken symbolic link"):
        inspect_case(tmp_path / "b.tif")


def test_very_long_name_is_written_with_a_short_temporary_name(tmp_path, volume, monkeypatch):
    name = "x" * 250 + ".tif"  # the old temporary name, ".<name>.<8>.partial", exceeded 255 bytes
    seen: list[str] = []
    original = tifffile.imwrite

    def spy(file, *args, **kwargs):
        seen.append(Path(file).name)
        return original(file, *args, **kwargs)

    monkeypatch.setattr(io.tifffile, "imwrite", spy)
    write_case(tmp_path / name, volume, CaseMeta())
    assert (tmp_path / name).is_file()
    assert len(seen) == 1 and len(seen[0]) <= 100 and seen[0].endswith(".partial")
    assert os.listdir(tmp_path) == [name]


def test_stale_partials_finds_only_temporary_outputs(tmp_path):
    for name in (".a.tif.abcd1234.partial", ".b.tif.x_Y9z0Q1.partial", "a.tif", ".hidden", "c.partial",
                 ".d.tif.short.partial"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in io.stale_partials(tmp_path)] == [".a.tif.abcd1234.partial",
                                                              ".b.tif.x_Y9z0Q1.partial"]


def test_imagej_output_carries_micron_calibration(tmp_path):
    """``imagej=True`` writes a hyperstack Fiji opens to scale: X/Y resolution in pixels per
    micron, z spacing and unit in the ImageJ metadata; our reader reads the same voxel size back."""
    volume = np.arange(4 * 8 * 6, dtype=np.uint16).reshape(4, 8, 6)
    meta = CaseMeta(voxel_size=VoxelSize(z=2.5, y=0.4, x=0.25))
    path = write_case(tmp_path / "a.tif", volume, meta, imagej=True)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej and not tif.is_bigtiff
        assert tif.imagej_metadata["spacing"] == pytest.approx(2.5)
        assert tif.imagej_metadata["unit"] in ("um", "micron", "\\u00B5m")
        page = tif.pages[0]
        x_num, x_den = page.tags["XResolution"].value
        y_num, y_den = page.tags["YResolution"].value
        assert x_num / x_den == pytest.approx(1 / 0.25, rel=1e-6) and y_num / y_den == pytest.approx(1 / 0.4, rel=1e-6)
        np.testing.assert_array_equal(tif.asarray(), volume)
    case = read_case(path)
    assert case.meta.voxel_size.zyx == pytest.approx((2.5, 0.4, 0.25), rel=1e-6)
