"""inference.py end to end, as a user (or Grand Challenge) runs it.

Subprocess runs check what really reaches stderr and the exit status; in-process runs of
``inference.main`` cover what needs monkeypatching (a NaN-producing or out-of-memory model).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import tifffile
import torch
from conftest import REPO, make_tiny_ensemble, write_fmc_tif

from fusecare.restoration.ensemble import Ensemble
from fusecare.restoration.pipeline import MAX_OOM_RETRIES
from fusecare.restoration.weights import WEIGHTS_ENV

GC_INPUT = "/input/images/fluorescence-lightsheet-3D-microscopy"
GC_OUTPUT = "/output/images/fused-fluorescence-lightsheet-3D-microscopy"
SHAPE = (16, 64, 64)


# --------------------------------------------------------------------------- helpers


def run_inference(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python inference.py ARGS`` from the repository root, as a user types it."""
    environment = {k: v for k, v in os.environ.items() if k != WEIGHTS_ENV}
    environment.update(env or {})
    return subprocess.run([sys.executable, "inference.py", *map(str, args)], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=300)


def lines(stderr: str) -> list[str]:
    """stderr split into lines, tqdm's carriage-return redraws included."""
    return [line for line in re.split(r"[\r\n]+", stderr) if line.strip()]


def lines_naming(stderr: str, name: str) -> list[str]:
    return [line for line in lines(stderr) if name in line and "tile/s" not in line]


def volume(seed: int, shape: tuple[int, int, int] = SHAPE, dtype=np.uint16) -> np.ndarray:
    """Blobs on a background with noise: enough structure for percentiles to differ."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    blobs = 3000 * np.exp(-((z * 2) ** 2 + (y * 3 - 0.5) ** 2 + (x * 3) ** 2))
    data = 200 + blobs + rng.normal(0, 40, shape)
    return np.clip(data, 0, None).astype(dtype)


def read(path: Path) -> tuple[np.ndarray, dict]:
    with tifffile.TiffFile(path) as tif:
        return tif.asarray(), dict(tif.shaped_metadata[0]) if tif.shaped_metadata else {}


@pytest.fixture
def inference(monkeypatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    return importlib.import_module("inference")


@pytest.fixture
def membrane_only_weights(tmp_path: Path) -> Path:
    root = tmp_path / "weights_membrane_only"
    make_tiny_ensemble(root, "membrane")
    return root


# --------------------------------------------------------------------------- defaults


def test_default_paths_follow_the_grand_challenge_contract(inference):
    args = inference.build_parser().parse_args([])
    assert args.input == Path(GC_INPUT)
    assert args.output == Path(GC_OUTPUT)
    assert args.weights == REPO / "model_weights"
    assert args.uncertainty is None


def test_weights_folder_comes_from_the_environment(inference, monkeypatch, tmp_path):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    assert inference.build_parser().parse_args([]).weights == tmp_path


# --------------------------------------------------------------------------- the normal path


@pytest.fixture(scope="module")
def normal_run(tmp_path_factory):
    """Two cases (nucleus, membrane) through ``inference.py --uncertainty``, run once."""
    tmp_path = tmp_path_factory.mktemp("normal")
    tiny_weights = tmp_path / "weights"
    for channel in ("nucleus", "membrane"):
        make_tiny_ensemble(tiny_weights, channel)
    inp, out, unc = tmp_path / "in", tmp_path / "out", tmp_path / "unc"
    inputs = {
        "image_1_nucleus_angle.tif": write_fmc_tif(inp / "image_1_nucleus_angle.tif", volume(1),
                                                   channel="nucleus", study=2, PhysicalSizeX=0.195),
        "image_2_membrane_angle.tiff": write_fmc_tif(inp / "image_2_membrane_angle.tiff",
                                                     volume(2, (12, 40, 72)), channel="membrane",
                                                     study="5", note="kept"),
    }
    result = run_inference("--input", inp, "--output", out, "--weights", tiny_weights,
                           "--uncertainty", unc)
    return result, inputs, out, unc


def test_normal_run_exits_0_without_errors(normal_run):
    result, _, _, _ = normal_run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert " ERROR" not in result.stderr and "FALLBACK" not in result.stderr
    assert "done: 2 restored, 0 written back unchanged (fallback), 0 failed" in result.stderr


def test_normal_run_writes_same_names_shapes_as_uint16(normal_run):
    _, inputs, out, _ = normal_run
    assert sorted(p.name for p in out.iterdir()) == sorted(inputs)
    for name, source in inputs.items():
        restored, _ = read(out / name)
        original, _ = read(source)
        assert restored.shape == original.shape
        assert restored.dtype == np.uint16
        assert not np.array_equal(restored, original)  # a prediction, not the input copied


def test_normal_run_round_trips_metadata(normal_run):
    _, inputs, out, _ = normal_run
    for name, source in inputs.items():
        _, md_in = read(source)
        _, md_out = read(out / name)
        for key, value in md_in.items():
            assert md_out[key] == value, key
        assert md_out["axes"] == "ZYX"
    with tifffile.TiffFile(out / "image_1_nucleus_angle.tif") as tif:
        numerator, denominator = tif.pages[0].tags["XResolution"].value
        assert tif.is_bigtiff
    assert numerator / denominator == pytest.approx(1 / 0.195)


def test_uncertainty_option_writes_one_map_per_case(normal_run):
    _, inputs, _, unc = normal_run
    assert sorted(p.name for p in unc.iterdir()) == sorted(inputs)
    for name, source in inputs.items():
        spread, md = read(unc / name)
        assert spread.shape == read(source)[0].shape
        assert spread.dtype == np.uint16
        assert spread.max() > 0  # two differently seeded members disagree somewhere
        assert md["content"] == "ensemble spread"


def test_output_folder_is_created_and_input_untouched(tmp_path, tiny_weights, inference):
    inp = tmp_path / "in"
    source = write_fmc_tif(inp / "a.tif", volume(3))
    before = source.read_bytes()
    out = tmp_path / "deep" / "new" / "out"
    assert inference.main(["--input", str(inp), "--output", str(out), "--weights", str(tiny_weights),
                           "--quiet"]) == 0
    assert (out / "a.tif").is_file()
    assert source.read_bytes() == before
    assert sorted(p.name for p in inp.iterdir()) == ["a.tif"]


# --------------------------------------------------------------------------- model failures


def _nucleus_and_membrane_run(tmp_path: Path, weights: Path, seed: int):
    """Infer one nucleus and one membrane case; (result, output folder, nucleus input, the
    nucleus case's one ERROR line), after checking the run itself succeeded."""
    inp, out = tmp_path / "in", tmp_path / "out"
    original = volume(seed)
    write_fmc_tif(inp / "nuc.tif", original, channel="nucleus")
    write_fmc_tif(inp / "mem.tif", volume(seed + 1), channel="membrane")
    result = run_inference("--input", inp, "--output", out, "--weights", weights)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [x for x in lines_naming(result.stderr, "nuc.tif") if "ERROR" in x]
    return result, out, original, line


def test_channel_without_weights_falls_back_to_the_input_unchanged(tmp_path, membrane_only_weights):
    _, out, original, line = _nucleus_and_membrane_run(tmp_path, membrane_only_weights, 4)
    assert "FALLBACK" in line and "nucleus" in line
    written, _ = read(out / "nuc.tif")
    assert written.dtype == np.uint16
    np.testing.assert_array_equal(written, original)
    assert not np.array_equal(read(out / "mem.tif")[0], volume(5))  # the other channel restored


def test_corrupted_weights_fail_the_checksum_and_fall_back(tmp_path, tiny_weights):
    weights_file = tiny_weights / "nucleus" / "member_0" / "weights.pt"
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    result, out, original, line = _nucleus_and_membrane_run(tmp_path, tiny_weights, 6)
    assert "FALLBACK" in line and "checksum mismatch" in line and "weights.pt" in line
    np.testing.assert_array_equal(read(out / "nuc.tif")[0], original)
    assert not any("ERROR" in x for x in lines_naming(result.stderr, "mem.tif"))


def test_nan_producing_model_falls_back(tmp_path, tiny_weights, inference, monkeypatch, caplog):
    def nan_block(self, block):
        return np.full((2, *block.shape), np.nan, dtype=np.float32)

    monkeypatch.setattr(Ensemble, "predict_block", nan_block)
    inp, out = tmp_path / "in", tmp_path / "out"
    original = volume(8)
    write_fmc_tif(inp / "a.tif", original)
    assert inference.main(["--input", str(inp), "--output", str(out), "--weights", str(tiny_weights),
                           "--quiet"]) == 0
    np.testing.assert_array_equal(read(out / "a.tif")[0], original)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "FALLBACK" in record.getMessage() and "NaN" in record.getMessage()


class OomAbove:
    """Wraps ``Ensemble.predict_block``: CUDA out of memory for blocks larger than a size."""

    def __init__(self, max_voxels: int) -> None:
        self.max_voxels = max_voxels
        self.original = Ensemble.predict_block
        self.raised: list[tuple[int, ...]] = []
        self.predicted: list[tuple[int, ...]] = []

    @property
    def method(self):
        """A plain function, so that it binds to the ensemble like the original method."""
        return lambda ensemble, block: self(ensemble, block)

    def __call__(self, ensemble: Ensemble, block: np.ndarray) -> np.ndarray:
        if block.size > self.max_voxels:
            self.raised.append(block.shape)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        self.predicted.append(block.shape)
        return self.original(ensemble, block)


def _oom_case(tmp_path: Path) -> tuple[Path, Path, Path, np.ndarray]:
    """A depth-1 two-member ensemble (margin 6, alignment 2) so a halved tile stays cheap."""
    from fusecare.restoration.ensemble import save_member, write_manifest
    from fusecare.restoration.model import CareUNet, ModelConfig

    weights = tmp_path / "weights_depth1"
    for k in range(2):
        torch.manual_seed(k)
        save_member(weights / "nucleus" / f"member_{k}",
                    CareUNet(ModelConfig(depth=1, first_filters=2, convs_per_level=1)))
    write_manifest(weights / "nucleus", "nucleus")
    inp, out = tmp_path / "in", tmp_path / "out"
    original = volume(9, (8, 64, 64))
    write_fmc_tif(inp / "big.tif", original, channel="nucleus")
    return inp, out, weights, original


def test_cuda_oom_retries_with_smaller_cores(tmp_path, inference, monkeypatch, caplog):
    inp, out, weights, original = _oom_case(tmp_path)
    fake = OomAbove(max_voxels=8 * 32 * 32)
    monkeypatch.setattr(Ensemble, "predict_block", fake.method)
    assert inference.main(["--input", str(inp), "--output", str(out), "--weights", str(weights),
                           "--tile", "8,64,64", "--device", "cpu", "--quiet"]) == 0
    assert fake.raised[0] == (8, 64, 64) and all(np.prod(s) > 8 * 32 * 32 for s in fake.raised)
    assert len(fake.predicted) > 1 and all(np.prod(s) <= 8 * 32 * 32 for s in fake.predicted)
    assert len({s for s in fake.predicted}) <= 4  # one grid (edge tiles may be clipped)
    assert any("out of memory with tile (8, 64, 64)" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)
    restored, _ = read(out / "big.tif")
    assert restored.shape == original.shape and not np.array_equal(restored, original)


def test_cuda_oom_at_the_core_floor_falls_back_to_the_input(tmp_path, inference, monkeypatch, caplog):
    inp, out, weights, original = _oom_case(tmp_path)
    fake = OomAbove(max_voxels=0)
    monkeypatch.setattr(Ensemble, "predict_block", fake.method)
    assert inference.main(["--input", str(inp), "--output", str(out), "--weights", str(weights),
                           "--tile", "8,64,64", "--device", "cpu", "--quiet"]) == 0
    assert 2 <= len(fake.raised) <= 1 + MAX_OOM_RETRIES  # smaller cores, then the floor or the retries end it
    assert len(set(fake.raised)) == len(fake.raised)
    np.testing.assert_array_equal(read(out / "big.tif")[0], original)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "FALLBACK" in record.getMessage() and "OutOfMemoryError" in record.getMessage()


# --------------------------------------------------------------------------- bad inputs, one run

BAD = {
    "b_truncated.tif": "truncated",
    "c_zero_bytes.tif": "empty file",
    "d_not_a_tiff.tif": "not a readable TIFF",
    "e_2d.tif": "2-D image",
    "f_4d.tif": "4-D image",
    "g_rgb.tif": "RGB",
}
PROCESSED = ["a_good.tif", "h_nan_inf.tif", "i_constant.tif", "j_no_voxel_size.tif",
             "k_unknown_channel.tif"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """One folder holding every kind of bad input beside good ones, run once through inference.py."""
    root = tmp_path_factory.mktemp("zoo")
    weights = root / "weights"
    for channel in ("nucleus", "membrane"):
        make_tiny_ensemble(weights, channel)
    inp, out = root / "in", root / "out"
    good = volume(10)
    write_fmc_tif(inp / "a_good.tif", good)
    data = (inp / "a_good.tif").read_bytes()
    (inp / "b_truncated.tif").write_bytes(data[: len(data) // 2])
    (inp / "c_zero_bytes.tif").write_bytes(b"")
    (inp / "d_not_a_tiff.tif").write_bytes(b"PK\x03\x04 a zip file named .tif\n" * 10)
    tifffile.imwrite(inp / "e_2d.tif", good[0])
    tifffile.imwrite(inp / "f_4d.tif", np.zeros((2, 6, 16, 16), np.uint16))
    tifffile.imwrite(inp / "g_rgb.tif", np.zeros((4, 32, 32, 3), np.uint8), photometric="rgb")
    floats = volume(11, dtype=np.float32)
    floats[0, 0, :5] = np.nan
    floats[1, 1, :3] = -np.inf
    floats[2, 2, :2] = np.inf
    write_fmc_tif(inp / "h_nan_inf.tif", floats)
    write_fmc_tif(inp / "i_constant.tif", np.full(SHAPE, 7, np.uint16))
    write_fmc_tif(inp / "j_no_voxel_size.tif", volume(12), PhysicalSizeX=None, PhysicalSizeY="n/a",
                  PhysicalSizeZ="")
    write_fmc_tif(inp / "k_unknown_channel.tif", volume(13), channel="cytoplasm")
    result = run_inference("--input", inp, "--output", out, "--weights", weights)
    return result, inp, out


def test_zoo_exits_1_without_traceback(zoo):
    result, _, _ = zoo
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{len(PROCESSED) - 1} restored, 1 written back unchanged (fallback), {len(BAD)} failed" \
        in result.stderr


def test_zoo_writes_exactly_the_processable_cases_and_no_partial_file(zoo):
    _, _, out = zoo
    assert sorted(p.name for p in out.iterdir()) == PROCESSED


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_gets_one_clear_error_line(zoo, name):
    result, _, out = zoo
    [line] = lines_naming(result.stderr, name)
    assert line.startswith("fusecare ERROR:")
    assert line.startswith(f"fusecare ERROR: FAILED {name}: ") and "no output written" in line
    assert BAD[name] in line
    assert not (out / name).exists()


def test_every_error_line_names_a_case(zoo):
    result, inp, _ = zoo
    names = [p.name for p in inp.iterdir()]
    orphans = [x for x in lines(result.stderr) if "ERROR" in x and not any(n in x for n in names)]
    assert orphans == []


def test_nan_inf_input_is_processed_with_a_warning(zoo):
    result, inp, out = zoo
    name = "h_nan_inf.tif"
    mine = lines_naming(result.stderr, name)
    assert any("WARNING" in x and "non-finite" in x and "10" in x for x in mine)
    assert not any("ERROR" in x for x in mine)
    assert any(f"case {name} restored" in x for x in mine)
    restored, _ = read(out / name)
    source, _ = read(inp / name)
    assert restored.dtype == np.uint16 and restored.shape == source.shape
    low = np.concatenate([restored[0, 0, :5], restored[1, 1, :3]])
    high = restored[2, 2, :2]
    median = np.median(restored)
    assert (low > 0).all() and (low < median).all()  # NaN and -Inf -> the low end, not clipped
    assert (high < 65535).all() and (high > median).all()  # +Inf -> the high end, not clipped


def test_constant_volume_falls_back_with_a_clear_message(zoo):
    result, inp, out = zoo
    name = "i_constant.tif"
    [line] = [x for x in lines_naming(result.stderr, name) if "ERROR" in x]
    assert "FALLBACK" in line and "constant volume" in line
    np.testing.assert_array_equal(read(out / name)[0], read(inp / name)[0])


def test_missing_voxel_size_is_processed_with_a_warning(zoo):
    result, _, out = zoo
    name = "j_no_voxel_size.tif"
    mine = lines_naming(result.stderr, name)
    assert any("WARNING" in x and "voxel size unknown" in x for x in mine)
    assert any("WARNING" in x and "'n/a'" in x for x in mine)
    assert any(f"case {name} restored" in x for x in mine)
    assert read(out / name)[0].shape == SHAPE


def test_unknown_channel_is_processed_as_membrane(zoo):
    result, _, _ = zoo
    name = "k_unknown_channel.tif"
    mine = lines_naming(result.stderr, name)
    assert any("WARNING" in x and "'cytoplasm'" in x and "membrane" in x for x in mine)
    assert any("channel membrane" in x for x in mine)
    assert any(f"case {name} restored" in x for x in mine)


def test_unknown_channel_uses_the_membrane_weights(tmp_path, membrane_only_weights, inference, caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    original = volume(14)
    write_fmc_tif(inp / "x.tif", original, channel="actin")
    assert inference.main(["--input", str(inp), "--output", str(out), "--weights",
                           str(membrane_only_weights), "--quiet"]) == 0
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)  # no nucleus weights needed
    assert not np.array_equal(read(out / "x.tif")[0], original)


def test_all_nan_case_fails_alone_and_the_folder_goes_on(tmp_path, tiny_weights, inference, caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_fmc_tif(inp / "a_all_nan.tif", np.full(SHAPE, np.nan, np.float32))
    write_fmc_tif(inp / "b_good.tif", volume(18))
    code = inference.main(["--input", str(inp), "--output", str(out), "--weights", str(tiny_weights),
                           "--quiet"])
    assert (out / "b_good.tif").is_file()
    assert code == 1
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "a_all_nan.tif" in record.getMessage() and "no finite voxel" in record.getMessage()


# --------------------------------------------------------------------------- folders and memory


def test_empty_input_folder_exits_2_with_a_clear_message(tmp_path, tiny_weights, inference, caplog):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "readme.txt").write_text("no tif here")
    assert inference.main(["--input", str(inp), "--output", str(tmp_path / "out"),
                           "--weights", str(tiny_weights)]) == 2
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "no .tif/.tiff file" in record.getMessage() and str(inp) in record.getMessage()


def test_missing_input_folder_exits_2_with_a_clear_message(tmp_path, tiny_weights, inference, caplog):
    assert inference.main(["--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"),
                           "--weights", str(tiny_weights)]) == 2
    assert any("input not found" in r.getMessage() for r in caplog.records)


def test_empty_input_folder_subprocess_says_so_on_stderr(tmp_path, tiny_weights):
    (tmp_path / "in").mkdir()
    result = run_inference("--input", tmp_path / "in", "--output", tmp_path / "out",
                           "--weights", tiny_weights)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "no .tif/.tiff file in input folder" in result.stderr


def test_read_only_input_folder_works_and_nothing_is_written_into_it(tmp_path, tiny_weights,
                                                                      inference):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_fmc_tif(inp / "a.tif", volume(15))
    write_fmc_tif(inp / "b.tif", volume(16), channel="membrane")
    before = {p.name: p.read_bytes() for p in inp.iterdir()}
    for p in inp.iterdir():
        p.chmod(0o444)
    inp.chmod(0o555)
    try:
        code = inference.main(["--input", str(inp), "--output", str(out), "--weights", str(tiny_weights),
                               "--quiet"])
    finally:
        inp.chmod(0o755)
    assert code == 0
    assert {p.name: p.read_bytes() for p in inp.iterdir()} == before  # root ignores 0o555: check it
    assert sorted(p.name for p in out.iterdir()) == ["a.tif", "b.tif"]


def test_volume_too_large_for_memory_is_refused_before_reading(tmp_path, tiny_weights, inference,
                                                               monkeypatch, caplog):
    import fusecare.restoration.pipeline

    def must_not_read(*args, **kwargs):
        raise AssertionError("the volume was read despite the memory limit")

    monkeypatch.setattr(fusecare.restoration.pipeline, "read_case", must_not_read)
    inp, out = tmp_path / "in", tmp_path / "out"
    write_fmc_tif(inp / "huge.tif", volume(17))
    assert inference.main(["--input", str(inp), "--output", str(out), "--weights", str(tiny_weights),
                           "--max-memory-gb", "0.001"]) == 1
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = record.getMessage()
    assert "huge.tif" in message and "memory" in message and "refusing before reading" in message
    assert list(out.iterdir()) == []


def test_input_only_gate_writes_the_input_loudly_and_no_gate_overrides_it(tmp_path):
    from conftest import make_tiny_ensemble

    from fusecare.restoration.ensemble import write_manifest
    from fusecare.restoration.gate import INPUT_ONLY

    weights = tmp_path / "weights"
    folder = make_tiny_ensemble(weights, "nucleus")
    write_manifest(folder, "nucleus", gate=INPUT_ONLY)
    inp = tmp_path / "in"
    original = volume(11)
    write_fmc_tif(inp / "nuc.tif", original, channel="nucleus")
    gated_run = run_inference("--input", inp, "--output", tmp_path / "out", "--weights", weights)
    assert gated_run.returncode == 0 and "Traceback" not in gated_run.stderr
    [line] = [x for x in lines_naming(gated_run.stderr, "nuc.tif") if "ERROR" in x]
    assert "FALLBACK" in line and "input-only" in line
    np.testing.assert_array_equal(read(tmp_path / "out" / "nuc.tif")[0], original)
    forced = run_inference("--input", inp, "--output", tmp_path / "out2", "--weights", weights, "--no-gate")
    assert forced.returncode == 0 and "FALLBACK" not in forced.stderr
    assert not np.array_equal(read(tmp_path / "out2" / "nuc.tif")[0], original)


# --------------------------------------------------------------------------- issue 10: never lose a case


def test_unexpected_reader_errors_fail_only_that_case(tmp_path, tiny_weights, inference, monkeypatch, caplog):
    import fusecare.restoration.pipeline

    real = fusecare.restoration.pipeline.inspect_case

    def flaky(path):
        if path.name == "a_bad.tif":
            raise MemoryError()  # not an InputError: what a header claiming a huge image raised
        return real(path)

    monkeypatch.setattr(fusecare.restoration.pipeline, "inspect_case", flaky)
    inp, out = tmp_path / "in", tmp_path / "out"
    write_fmc_tif(inp / "a_bad.tif", volume(20))
    write_fmc_tif(inp / "b_good.tif", volume(21))
    assert inference.main(["--input", str(inp), "--output", str(out), "--weights", str(tiny_weights),
                           "--quiet"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["b_good.tif"]
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage().startswith("FAILED a_bad.tif: MemoryError")


def test_odd_metadata_values_never_crash_a_case_or_its_fallback(tmp_path, membrane_only_weights, inference, caplog):
    """Voxel sizes the resolution tag cannot hold and study=Infinity, through a restored case and
    through the fallback writer (no nucleus weights)."""
    inp, out = tmp_path / "in", tmp_path / "out"
    odd = {"PhysicalSizeX": 1e-12, "PhysicalSizeY": 1e300, "study": float("inf")}
    write_fmc_tif(inp / "mem.tif", volume(22), channel="membrane", **odd)
    write_fmc_tif(inp / "nuc.tif", volume(23), channel="nucleus", **{**odd, "study": float("nan")})
    assert inference.main(["--input", str(inp), "--output", str(out), "--weights", str(membrane_only_weights),
                           "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["mem.tif", "nuc.tif"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("mem.tif" in m and "PhysicalSizeX=1e-12" in m for m in messages)
    assert any("nuc.tif" in m and "study" in m and "finite integer" in m for m in messages)
    assert any("nuc.tif FALLBACK" in m for m in messages)


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_equal_to_or_inside_the_input_is_refused(tmp_path, tiny_weights, inference, caplog, where):
    inp = tmp_path / "in"
    source = write_fmc_tif(inp / "a.tif", volume(24))
    before = source.read_bytes()
    out = inp if where == "same" else inp / "sub" / ".." / "out"
    assert inference.main(["--input", str(inp), "--output", str(out), "--weights", str(tiny_weights)]) == 2
    assert source.read_bytes() == before
    assert sorted(p.name for p in inp.iterdir()) == ["a.tif"]
    assert any("inside it" in r.getMessage() and "refusing" in r.getMessage() for r in caplog.records)


def test_explicit_missing_weights_is_a_usage_error(tmp_path, inference, caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_fmc_tif(inp / "a.tif", volume(25))
    assert inference.main(["--input", str(inp), "--output", str(out), "--weights",
                           str(tmp_path / "wieghts")]) == 2
    assert not out.exists()
    assert any("wieghts" in r.getMessage() and "no such folder" in r.getMessage() for r in caplog.records)


def test_default_missing_weights_keeps_the_do_no_harm_fallback(tmp_path, inference, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "absent"))  # as the Dockerfile sets it
    inp, out = tmp_path / "in", tmp_path / "out"
    original = volume(26)
    write_fmc_tif(inp / "a.tif", original)
    assert inference.main(["--input", str(inp), "--output", str(out), "--quiet"]) == 0
    np.testing.assert_array_equal(read(out / "a.tif")[0], original)


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "lots"])
def test_max_memory_gb_must_be_a_finite_positive_number(inference, value, capsys):
    with pytest.raises(SystemExit) as caught:
        inference.build_parser().parse_args(["--max-memory-gb", value])
    assert caught.value.code == 2
    assert "--max-memory-gb" in capsys.readouterr().err


def test_broken_symlink_gets_a_failed_line(tmp_path, tiny_weights, inference, caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_fmc_tif(inp / "a.tif", volume(27))
    (inp / "b.tif").symlink_to(tmp_path / "gone.tif")
    assert inference.main(["--input", str(inp), "--output", str(out), "--weights", str(tiny_weights),
                           "--quiet"]) == 1
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage().startswith("FAILED b.tif: broken symbolic link")
    assert sorted(p.name for p in out.iterdir()) == ["a.tif"]


def test_very_long_file_name_is_restored_and_logged_once(tmp_path, tiny_weights, inference, caplog):
    name = "n" * 240 + ".tif"
    inp, out = tmp_path / "in", tmp_path / "out"
    write_fmc_tif(inp / name, volume(28))
    assert inference.main(["--input", str(inp), "--output", str(out), "--weights", str(tiny_weights),
                           "--quiet"]) == 0
    assert os.listdir(out) == [name]
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


@pytest.mark.parametrize(("dtype", "scale", "offset"), [
    (np.float64, 1e300, 0.0), (np.float32, 1e-42, 0.0), (np.float64, 1e-12, 0.0), (np.float64, 1e-9, 1.0),
])
def test_extreme_float_inputs_are_restored_not_constant(tmp_path, tiny_weights, inference, caplog,
                                                        dtype, scale, offset):
    inp, out = tmp_path / "in", tmp_path / "out"
    values = (volume(29).astype(np.float64) / 3200.0 * scale + offset).astype(dtype)
    assert len(np.unique(values)) > 100
    write_fmc_tif(inp / "f.tif", values)
    assert inference.main(["--input", str(inp), "--output", str(out), "--weights", str(tiny_weights),
                           "--quiet"]) == 0
    restored, _ = read(out / "f.tif")
    assert len(np.unique(restored)) > 100
    assert any("rescaled affinely" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


@pytest.mark.parametrize("stored", [(1, *SHAPE), (*SHAPE, 1)])
def test_singleton_axis_survives_inference(tmp_path, tiny_weights, inference, stored):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    tifffile.imwrite(inp / "s.tif", volume(30).reshape(stored), photometric="minisblack",
                     metadata={"channel": "nucleus"})
    assert inference.main(["--input", str(inp), "--output", str(out), "--weights", str(tiny_weights),
                           "--quiet"]) == 0
    with tifffile.TiffFile(out / "s.tif") as tif:
        assert tif.series[0].shape == stored


def test_stale_partial_files_of_a_killed_run_are_removed(tmp_path, tiny_weights, inference, caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_fmc_tif(inp / "a.tif", volume(31))
    out.mkdir()
    (out / ".a.tif.k9x2ab_Q.partial").write_bytes(b"half a file")
    assert inference.main(["--input", str(inp), "--output", str(out), "--weights", str(tiny_weights),
                           "--quiet"]) == 0
    assert os.listdir(out) == ["a.tif"]
    assert any(".a.tif.k9x2ab_Q.partial" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


# --------------------------------------------------------------------------- time budget


def test_time_budget_option_defaults_to_the_challenge_fit_and_refuses_nonsense(inference, capsys):
    parser = inference.build_parser()
    assert parser.parse_args([]).time_budget == 480.0
    assert parser.parse_args(["--time-budget", "0"]).time_budget == 0.0
    for value in ("nan", "-5", "soon"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--time-budget", value])
        assert "--time-budget" in capsys.readouterr().err


def test_a_case_too_slow_for_its_budget_finishes_cheaper_and_in_time(tmp_path, monkeypatch, caplog):
    from fusecare.restoration.pipeline import RestoreOptions, restore_folder

    now = [0.0]
    weights = tmp_path / "weights"
    make_tiny_ensemble(weights, "nucleus", members=4)
    real = Ensemble.predict_block

    def slow(self, block, members=None):  # 10 s per member and tile, on a clock that only we move
        now[0] += 10.0 * (members or len(self.members))
        return real(self, block, members)
    monkeypatch.setattr(Ensemble, "predict_block", slow)
    inp, out = tmp_path / "in", tmp_path / "out"
    original = volume(5, (8, 64, 64))
    write_fmc_tif(inp / "slow.tif", original, channel="nucleus")
    options = RestoreOptions(tile=(8, 32, 32), device="cpu", progress=False, time_budget=400.0,
                             clock=lambda: now[0])
    [result] = restore_folder(inp, out, weights, options)
    assert now[0] <= 400.0  # 16 tiles: 40 s each with 4 members would take 640 s
    assert result.status == "restored" and "2 of 4 members" in result.message
    assert "over its time budget" in caplog.text
    restored, _ = read(out / "slow.tif")
    assert restored.shape == original.shape and not np.array_equal(restored, original)
