"""Fuzz: damaged and odd TIFFs through inference, scoring and FMC discovery, one run each.

A seeded generator writes a few dozen small files (volumes <= 16x32x32): good ones with odd
dtypes, shapes and metadata values; known-bad ones (empty, cut inside the header, 2-D, 4-D,
RGB, a broken link); and mutants of a good file (cut at every structure boundary of the TIFF,
header and IFD bytes flipped), which may or may not still be readable. The one rule checked
everywhere: every good file gets its output, every known-bad one exactly one ``FAILED`` line and
no output, every mutant one or the other (never both, never neither), no traceback, no stray
temporary file, and the documented exit code.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import REPO, make_tiny_ensemble, write_fmc_tif

from fusecare.restoration.weights import WEIGHTS_ENV
from fusecare.training.pairs import discover_fmc_pairs

SHAPE = (8, 32, 32)
SEED = 20260


def _volume(rng: np.random.Generator, dtype=np.uint16, shape=SHAPE) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    blob = 2000 * np.exp(-(z**2 + (y * 2) ** 2 + (x * 2) ** 2))
    return (300 + blob + rng.normal(0, 30, shape)).clip(0, None).astype(dtype)


def _good(folder: Path, rng: np.random.Generator) -> list[str]:
    """Readable files with odd dtypes, shapes and metadata: each must get an output."""
    v = _volume(rng)
    files = {
        "g_plain.tif": (v, {}),
        "g_uint8.tif": ((v // 16).astype(np.uint8), {}),
        "g_int16_negative.tif": (v.astype(np.int16) - 1000, {}),
        "g_int32.tif": (v.astype(np.int32) * 1000, {}),
        "g_float16.tif": (v.astype(np.float16) / 100, {}),
        "g_float32_nan.tif": (np.where(rng.random(SHAPE) < 0.01, np.nan, v).astype(np.float32), {}),
        "g_float64_1e300.tif": (v.astype(np.float64) * 1e296, {}),
        "g_float32_subnormal.tif": ((v.astype(np.float64) * 1e-42).astype(np.float32), {}),
        "g_float64_1e-12_span.tif": (1.0 + v.astype(np.float64) * 1e-15, {}),
        "g_size_tiny.tif": (v, {"PhysicalSizeX": 1e-12, "PhysicalSizeY": 3e-300}),
        "g_size_huge.tif": (v, {"PhysicalSizeX": 1e300, "PhysicalSizeZ": float("inf")}),
        "g_study_inf.tif": (v, {"study": float("inf")}),
        "g_study_nan.tif": (v, {"study": float("nan"), "channel": 42}),
        "g_study_huge.tif": (v, {"study": 1e300, "channel": None}),
    }
    for name, (data, md) in files.items():
        write_fmc_tif(folder / name, data, **md)
    tifffile.imwrite(folder / "g_leading_1.tif", v[None], photometric="minisblack")
    tifffile.imwrite(folder / "g_trailing_1.tif", v[..., None], photometric="minisblack")
    tifffile.imwrite(folder / "g_imagej.tif", v, imagej=True, metadata={"spacing": 0, "unit": "nm"})
    tifffile.imwrite(folder / "g_ome.ome.tif", v, ome=True, metadata={"axes": "ZYX", "PhysicalSizeX": 1e-13})
    tifffile.imwrite(folder / "g_zlib.tif", v, compression="zlib", metadata={"channel": "nucleus"})
    return sorted([*files, "g_leading_1.tif", "g_trailing_1.tif", "g_imagej.tif", "g_ome.ome.tif", "g_zlib.tif"])


def _bad(folder: Path, rng: np.random.Generator, base: bytes) -> list[str]:
    """Files no reader can use: each must be one FAILED line and no output."""
    v = _volume(rng)
    (folder / "b_empty.tif").write_bytes(b"")
    for cut in (1, 4, 7):
        (folder / f"b_cut_header_{cut}.tif").write_bytes(base[:cut])
    (folder / "b_not_tiff.tif").write_bytes(b"PK\x03\x04" + bytes(rng.integers(0, 256, 200, dtype=np.uint8)))
    (folder / "b_magic_flipped.tif").write_bytes(base[:2] + bytes([base[2] ^ 0xFF]) + base[3:])
    (folder / "b_byteorder_flipped.tif").write_bytes(b"XX" + base[2:])
    tifffile.imwrite(folder / "b_2d.tif", v[0])
    tifffile.imwrite(folder / "b_4d.tif", np.zeros((2, 4, 16, 16), np.uint16), photometric="minisblack")
    tifffile.imwrite(folder / "b_rgb.tif", np.zeros((4, 16, 16, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(folder / "b_one_plane.tif", v[:1])
    (folder / "b_broken_link.tif").symlink_to(folder / "nowhere.tif")
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("b_"))


def _mutants(folder: Path, rng: np.random.Generator, base_path: Path) -> list[str]:
    """A good file cut at every structure boundary and with header/IFD bytes flipped."""
    base = base_path.read_bytes()
    with tifffile.TiffFile(base_path) as tif:
        first, last = tif.pages[0], tif.pages[-1]
        ifd = first.offset
        tag_offsets = [tag.offset for tag in first.tags.values()]
        boundaries = {ifd, ifd + 1, ifd + 2, *tag_offsets, *(t + 8 for t in tag_offsets),
                      first.dataoffsets[0], first.dataoffsets[0] + first.databytecounts[0] // 2,
                      last.offset, last.dataoffsets[0] + last.databytecounts[0] // 2, len(base) - 1}
    names = []
    for cut in sorted(b for b in boundaries if 8 <= b < len(base)):
        name = f"m_cut_{cut:06d}.tif"
        (folder / name).write_bytes(base[:cut])
        names.append(name)
    flips = [4, 5, 6, 7, ifd, ifd + 1] + [int(t) + int(k) for t in rng.choice(tag_offsets, 8) for k in
                                          rng.integers(0, 12, 1)]
    for position in flips:
        data = bytearray(base)
        data[position] ^= int(rng.integers(1, 256))
        name = f"m_flip_{position:06d}.tif"
        (folder / name).write_bytes(bytes(data))
        names.append(name)
    return sorted(set(names))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(SEED)
    folder = root / "in"
    folder.mkdir()
    base_path = write_fmc_tif(root / "base.tif", _volume(rng))
    good = _good(folder, rng)
    bad = _bad(folder, rng, base_path.read_bytes())
    mutants = _mutants(folder, rng, base_path)
    weights = root / "weights"
    for channel in ("nucleus", "membrane"):
        make_tiny_ensemble(weights, channel, members=1)
    return {"root": root, "in": folder, "good": good, "bad": bad, "mutants": mutants, "weights": weights}


def _lines(stderr: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]+", stderr) if line.strip()]


def _failed_lines(stderr: str, name: str) -> list[str]:
    return [line for line in _lines(stderr) if re.search(rf"FAILED {re.escape(name)}: ", line)]


def _check_one_rule(stderr: str, names: list[str], has_output, good: list[str], bad: list[str]) -> None:
    assert "Traceback" not in stderr
    for name in names:
        failed = _failed_lines(stderr, name)
        assert len(failed) <= 1, failed
        if name in good:
            assert has_output(name) and not failed, (name, failed)
        elif name in bad:
            assert not has_output(name) and len(failed) == 1, name
        else:  # a mutant: readable or not, one or the other
            assert has_output(name) != bool(failed), (name, failed)


def test_fuzz_inference(corpus):
    out = corpus["root"] / "out"
    env = {k: v for k, v in os.environ.items() if k != WEIGHTS_ENV}
    result = subprocess.run(
        [sys.executable, "inference.py", "--input", corpus["in"], "--output", out, "--weights", corpus["weights"],
         "--device", "cpu", "--max-memory-gb", "3", "--quiet"],
        cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    names = corpus["good"] + corpus["bad"] + corpus["mutants"]
    _check_one_rule(result.stderr, names, lambda n: (out / n).is_file(), corpus["good"], corpus["bad"])
    assert result.returncode == 1, result.stderr[-3000:]  # some case could not be read at all
    assert sorted(os.listdir(out)) == sorted(n for n in names if (out / n).is_file())  # no stray temp file
    assert not any(p.name.startswith(".") for p in corpus["in"].iterdir())
    for name in corpus["good"]:
        with tifffile.TiffFile(corpus["in"] / name) as source, tifffile.TiffFile(out / name) as written:
            assert written.series[0].shape == source.series[0].shape, name
            restored = written.asarray()
            assert restored.dtype == np.uint16 and restored.min() < restored.max(), name


def test_fuzz_scoring(corpus):
    """The fuzz files as predictions, against good targets and inputs of the same names."""
    root = corpus["root"] / "score"
    rng = np.random.default_rng(SEED + 1)
    gt, inp = root / "gt", root / "input"
    names = corpus["good"] + corpus["bad"] + corpus["mutants"]
    for name in names:
        write_fmc_tif(gt / name, _volume(rng), channel="nucleus")
        write_fmc_tif(inp / name, _volume(rng), channel="nucleus")
    out = root / "report"
    result = subprocess.run(
        [sys.executable, "evaluation/score.py", "--pred", corpus["in"], "--gt", gt, "--input", inp, "--out", out,
         "--no-seg", "--no-png", "--quiet", "--device", "cpu"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    import csv

    with (out / "scores.csv").open() as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    assert set(rows) == set(names)
    stderr = result.stderr
    assert "Traceback" not in stderr
    good = [n for n in corpus["good"] if n != "g_float32_nan.tif"]  # NaN voxels: a failed row by design
    assert "non-finite voxel" in rows["g_float32_nan.tif"]["error"]
    for name, row in rows.items():
        failed = _failed_lines(stderr, name)
        if row["status"] == "failed":
            assert len(failed) == 1 and name not in good, (name, row["error"])
        else:
            assert not failed and name not in corpus["bad"], name
        if name in good:  # a number only where it can be stood behind
            assert row["status"] == "ok", (name, row["error"])
    assert result.returncode == 1
    numbers = [line for line in result.stdout.splitlines() if line.startswith(("nucleus", "membrane", "N_"))]
    assert numbers and not any(re.search(r"nan|inf", line, re.IGNORECASE) for line in numbers), numbers


def test_fuzz_fmc_discovery(corpus, caplog):
    """Every fuzz file as the angle of an FMC pair whose fused partner is good (of the shape the
    angle reads as, so that only reading is under test)."""
    from fusecare.errors import InputError
    from fusecare.io import inspect_case

    folder = corpus["root"] / "fmc"
    folder.mkdir()
    rng = np.random.default_rng(SEED + 2)
    ids = {}
    for i, name in enumerate(corpus["good"] + corpus["bad"] + corpus["mutants"]):
        source = corpus["in"] / name
        try:
            shape = inspect_case(source).shape
        except InputError:
            shape = SHAPE
        if np.prod(shape) > np.prod(SHAPE) * 4:
            continue  # a mutant claiming a large image: not worth writing a partner for
        angle = folder / f"image_{i}_nucleus_angle.tif"
        if source.is_symlink():
            angle.symlink_to(os.readlink(source))
        else:
            angle.write_bytes(source.read_bytes())
        write_fmc_tif(folder / f"image_{i}_nucleus_fused.tif", _volume(rng, shape=shape))
        ids[i] = name
    with caplog.at_level(logging.ERROR):
        pairs = discover_fmc_pairs(folder)
    found = {p.case_id for p in pairs}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert all(m.startswith("FAILED image_") for m in errors), errors
    for i, name in ids.items():
        failed = [m for m in errors if m.startswith(f"FAILED image_{i}_nucleus_angle.tif: ")]
        assert len(failed) <= 1, failed
        if name in corpus["good"]:
            assert i in found and not failed, name
        elif name in corpus["bad"]:
            assert i not in found and len(failed) == 1, name
        else:
            assert (i in found) != bool(failed), (name, failed)
