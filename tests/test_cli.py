"""The ``fusecare`` command, its Python API and the weights lookup: answers before torch, bad input
in one line, a single file restored, ``fusecare.restore``/``fusecare.score`` on arrays."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import REPO, beer_lambert, blob_specimen, write_fmc_tif

from fusecare.cli import number

PROBE = """
import sys
from fusecare.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("TORCH" if "torch" in sys.modules else "NO-TORCH")
sys.exit(code)
"""


def probe(*args: object, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``fusecare ARGS`` in a fresh interpreter; its stdout ends with whether torch got imported."""
    return subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("args", [["--help"], ["predict", "--help"], ["score", "--help"], ["train", "--help"],
                                  ["export", "bioimageio", "--help"], ["--version"]])
def test_help_answers_without_importing_torch(args):
    result = probe(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "NO-TORCH"
    assert "usage: fusecare" in result.stdout or args == ["--version"]


def test_container_entry_point_help_answers_without_importing_torch():
    code = ("import sys, inference\ntry:\n    inference.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "NO-TORCH", result.stderr
    assert "--input" in result.stdout and "--time-budget" in result.stdout


@pytest.fixture
def bad_paths(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no tif here")
    (tmp_path / "notes.txt").write_text("not a tif")
    return {"empty": tmp_path / "empty", "text": tmp_path / "notes.txt", "missing": tmp_path / "missing.tif"}


@pytest.mark.parametrize(("case", "expected"), [
    ("text", "is neither a .tif/.tiff file nor a folder"),
    ("empty", "no .tif/.tiff file in input folder"),
    ("missing", "input not found"),
])
def test_bad_input_is_one_line_exit_2_before_torch(tmp_path, bad_paths, case, expected):
    result = probe("predict", bad_paths[case], "-o", tmp_path / "out")
    assert result.returncode == 2
    assert result.stdout.strip() == "NO-TORCH"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(bad_paths[case]) in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["predict", "x.tif"], "the following arguments are required: -o/--output"),
    (["score", "--pred", "p", "--gt", "g"], "the following arguments are required: --input"),
    (["export", "bioimageio", "-o", "out"], "the following arguments are required: --channel"),
    (["predict", "x.tif", "-o", "o", "--tile", "big"], "tile must be Z,Y,X integers"),
    ([], "the following arguments are required: COMMAND"),
])
def test_usage_errors_are_one_line_exit_2_before_torch(args, expected):
    result = probe(*args)
    assert result.returncode == 2
    assert result.stdout.strip() == "NO-TORCH"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert lines[0].startswith("fusecare")


def test_score_missing_folder_is_one_line_before_torch(tmp_path):
    (tmp_path / "p").mkdir()
    result = probe("score", "--pred", tmp_path / "p", "--gt", tmp_path / "nope", "--input", tmp_path / "p")
    assert result.returncode == 2 and result.stdout.strip() == "NO-TORCH"
    assert result.stderr.strip().splitlines() == [f"fusecare ERROR: folder not found: {tmp_path / 'nope'}"]


def test_explicit_missing_weights_is_a_usage_error_before_torch(tmp_path):
    write_fmc_tif(tmp_path / "a.tif", np.ones((8, 16, 16), np.uint16))
    result = probe("predict", tmp_path / "a.tif", "-o", tmp_path / "out", "--weights", tmp_path / "nope")
    assert result.returncode == 2 and result.stdout.strip() == "NO-TORCH"
    assert "no such folder" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- predict


def volume(seed: int, shape: tuple[int, int, int] = (8, 32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(100, 3000, shape).astype(np.uint16)


def test_predict_restores_a_single_file_and_a_folder(tmp_path, tiny_weights):
    from fusecare.cli import main

    write_fmc_tif(tmp_path / "one" / "a.tif", volume(1))
    write_fmc_tif(tmp_path / "many" / "b.tif", volume(2))
    write_fmc_tif(tmp_path / "many" / "c.tiff", volume(3), channel="nucleus")
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "one" / "a.tif"), str(tmp_path / "many"), "-o", str(out),
                 "--weights", str(tiny_weights), "--no-gate", "--device", "cpu", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.tif", "b.tif", "c.tiff"]
    restored = tifffile.imread(out / "a.tif")
    assert restored.dtype == np.uint16 and restored.shape == (8, 32, 32)


def test_predict_refuses_to_overwrite_an_input_file_or_mix_two_of_one_name(tmp_path, tiny_weights, caplog):
    from fusecare.cli import main

    write_fmc_tif(tmp_path / "x" / "a.tif", volume(1))
    write_fmc_tif(tmp_path / "y" / "a.tif", volume(2))
    common = ["--weights", str(tiny_weights), "--device", "cpu", "--quiet"]
    assert main(["predict", str(tmp_path / "x" / "a.tif"), "-o", str(tmp_path / "x"), *common]) == 2
    assert "its output would replace it" in caplog.text
    assert main(["predict", str(tmp_path / "x"), str(tmp_path / "y"), "-o", str(tmp_path / "out"), *common]) == 2
    assert "two inputs named a.tif" in caplog.text
    assert not (tmp_path / "out").exists()
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "x" / "a.tif"), volume(1))


def test_inference_accepts_a_single_file(tmp_path, tiny_weights, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import inference

    write_fmc_tif(tmp_path / "in" / "a.tif", volume(4))
    assert inference.main(["--input", str(tmp_path / "in" / "a.tif"), "--output", str(tmp_path / "out"),
                           "--weights", str(tiny_weights), "--device", "cpu", "--quiet"]) == 0
    assert tifffile.imread(tmp_path / "out" / "a.tif").dtype == np.uint16


# --------------------------------------------------------------------------- Python API


def test_restore_an_array_in_memory(tiny_weights):
    import fusecare

    data = volume(5).astype(np.float32)
    out = fusecare.restore(data, channel="membrane", voxel_size=(2.0, 0.5, 0.5), weights=tiny_weights,
                           device="cpu", gate=False)
    assert out.dtype == np.uint16 and out.shape == data.shape
    out2, spread = fusecare.restore(data, weights=tiny_weights, device="cpu", uncertainty=True, gate=False)
    np.testing.assert_array_equal(out, out2)
    assert spread.dtype == np.uint16 and spread.shape == data.shape


def test_restore_feeds_corrected_input_members_the_corrected_view_unless_the_correction_is_off(tmp_path, caplog):
    """The API (the command line's path) reads ``corrected_input`` from the members: such an
    ensemble restores as ``restore_volume(corrected_input=True)`` does; with the correction off,
    as members that read the view itself."""
    from conftest import make_tiny_ensemble

    import fusecare
    from fusecare.restoration.ensemble import load_ensemble
    from fusecare.restoration.pipeline import restore_volume

    weights = tmp_path / "weights"
    ensemble = load_ensemble(make_tiny_ensemble(weights, "membrane", corrected_input=True))
    data = (1000 + 8000 * beer_lambert(blob_specimen(np.random.default_rng(4), (24, 48, 64), (2, 4, 4)),
                                       2, True, 0.1, 0.5)).astype(np.uint16)
    voxel = (1.0, 0.5, 0.5)
    kwargs = {"tile": (24, 48, 64), "margin": ensemble.margin, "align": ensemble.alignment, "voxel_size_zyx": voxel}
    for correction, expected in ((True, restore_volume(data, ensemble.predict_block, corrected_input=True, **kwargs)),
                                 (False, restore_volume(data, ensemble.predict_block, **kwargs))):
        out = fusecare.restore(data, voxel_size=voxel, weights=weights, device="cpu", gate=False,
                               tile=(24, 48, 64), attenuation_correction=correction)
        assert np.abs(out.astype(int) - expected.output.astype(int)).max() <= 1, correction
        assert ("trained on attenuation-corrected views; with the correction off" in caplog.text) != correction
    assert np.abs(restore_volume(data, ensemble.predict_block, corrected_input=True, **kwargs).output.astype(int)
                  - restore_volume(data, ensemble.predict_block, **kwargs).output.astype(int)).max() > 100


def test_restore_refuses_what_it_cannot_restore(tiny_weights):
    import fusecare
    from fusecare.errors import InputError

    with pytest.raises(InputError, match="3-D"):
        fusecare.restore(np.zeros((4, 4)), weights=tiny_weights)
    with pytest.raises(InputError, match="voxel_size"):
        fusecare.restore(volume(6), voxel_size=(1, 0, 1), weights=tiny_weights)
    with pytest.raises(InputError, match="channel"):
        fusecare.restore(volume(6), channel="cyto", weights=tiny_weights)


def test_score_arrays_as_the_command_scores_a_case():
    import fusecare

    target, single = volume(7).astype(np.float32), volume(8).astype(np.float32)
    scores = fusecare.score(single, target, single, device="cpu")
    assert scores["n_ssim"] == pytest.approx(0.0, abs=1e-9)
    better = fusecare.score(0.5 * target + 0.5 * single, target, single, device="cpu")
    assert better["n_ssim"] > 0 and set(better) == {"ssim_input", "ssim_pred", "n_ssim"}


@pytest.mark.slow
def test_the_readme_python_example_runs():
    """The README's example, as written there, on the shipped weights."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    result = subprocess.run([sys.executable, "-c", block], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "(32, 64, 56) uint16" in result.stdout


# --------------------------------------------------------------------------- weights and packaging


def test_weights_lookup_order(tmp_path, monkeypatch):
    from fusecare.restoration import weights

    monkeypatch.setenv(weights.WEIGHTS_ENV, str(tmp_path / "env"))
    assert weights.find_weights(tmp_path / "given") == tmp_path / "given"
    assert weights.find_weights() == tmp_path / "env"
    monkeypatch.delenv(weights.WEIGHTS_ENV)
    assert weights.find_weights() == REPO / "model_weights"  # a checkout: its own
    monkeypatch.setattr(weights, "REPO_WEIGHTS", tmp_path / "no_checkout")
    monkeypatch.setattr(weights, "INSTALLED_WEIGHTS", tmp_path / "installed")
    (tmp_path / "installed").mkdir()
    assert weights.find_weights() == tmp_path / "installed"


def test_pyproject_installs_the_command_and_the_weights():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"fusecare": "fusecare.cli:main"}
    setuptools = project["tool"]["setuptools"]
    assert setuptools["package-dir"]["fusecare.model_weights"] == "model_weights"
    patterns = setuptools["package-data"]["fusecare.model_weights"]
    shipped = {p.relative_to(REPO / "model_weights") for p in (REPO / "model_weights").rglob("*") if p.is_file()}
    covered = {p for p in shipped if any(p.match(pattern) for pattern in patterns)}
    assert covered == shipped


@pytest.mark.slow
def test_wheel_carries_the_weights_and_the_command(tmp_path):
    """``pip wheel .``: the wheel holds every shipped weight file and the console script, and stays small."""
    import shutil
    import zipfile

    source = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "tests", "train", "bench", "docs", "samples", "out"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True, timeout=600,
                   cwd=tmp_path)
    [wheel] = tmp_path.glob("fusecare-*.whl")
    assert wheel.stat().st_size < 10_000_000
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"fusecare/model_weights/{p.relative_to(REPO / 'model_weights').as_posix()}"
               for p in (REPO / "model_weights").rglob("*") if p.is_file()}
    assert shipped <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fusecare = fusecare.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_ci_runs_the_readme_test_command_then_the_slow_tests():
    """CI = the README's command (all but slow) + the slow tests: the whole suite, the README's
    command verbatim, so the two cannot drift apart."""
    readme = (REPO / "README.md").read_text()
    [command] = [line for line in readme.splitlines() if line.startswith("python3 -m venv") and "pytest" in line]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert command in ci and '-m "not slow"' in command
    assert ".venv/bin/python -m pytest -q -m slow" in ci[ci.index(command) + 1:]


def test_predict_imagej_writes_calibrated_hyperstacks_and_the_container_keeps_its_format(tmp_path, tiny_weights):
    """``fusecare predict --imagej``: Fiji-readable, to scale; ``inference.py`` has no such flag
    and keeps the challenge's BigTIFF layout."""
    from fusecare.cli import main
    from fusecare.cli.predict import build_container_parser

    write_fmc_tif(tmp_path / "in" / "a.tif", volume(4))
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "in"), "-o", str(out), "--imagej", "--weights", str(tiny_weights),
                 "--no-gate", "--device", "cpu", "--quiet"]) == 0
    with tifffile.TiffFile(out / "a.tif") as tif:
        assert tif.is_imagej and tif.imagej_metadata["unit"] == "um"
        source = tifffile.TiffFile(tmp_path / "in" / "a.tif")
        sizes = source.shaped_metadata[0]
        assert tif.imagej_metadata["spacing"] == pytest.approx(sizes["PhysicalSizeZ"])
        x_num, x_den = tif.pages[0].tags["XResolution"].value
        assert x_num / x_den == pytest.approx(1 / sizes["PhysicalSizeX"], rel=1e-6)
        source.close()
    with pytest.raises(SystemExit):
        build_container_parser().parse_args(["--imagej"])


@pytest.mark.parametrize("kind,minimum,strict,text,ok", [
    (float, 0, True, "0.5", True), (float, 0, True, "0", False), (float, 0, False, "0", True),
    (float, 0, False, "-1", False), (float, 0, True, "nan", False), (float, 0, True, "inf", False),
    (float, None, False, "-3", True), (float, 0, False, "abc", False),
    (int, 1, False, "2", True), (int, 1, False, "0", False), (int, 1, False, "1.5", False),
])
def test_number_types_refuse_what_would_refuse_every_case(kind, minimum, strict, text, ok) -> None:
    parse = number(kind, what="a count", minimum=minimum, strict=strict)
    if ok:
        assert parse(text) == kind(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected a count.*{text}"):
            parse(text)


def _write_dimmed_case(path: Path) -> np.ndarray:
    """A membrane case of bright blobs dimmed from the start of X (about 4x at the far side):
    a view the attenuation correction has something to do on; returns the volume written."""
    dimmed = (1000 + 8000 * beer_lambert(blob_specimen(np.random.default_rng(5), (16, 48, 64), (0, 4, 4)),
                                         2, True, 0.5, 0.2)).astype(np.uint16)
    write_fmc_tif(path, dimmed, channel="membrane")
    return dimmed


def test_no_attenuation_correction_keeps_the_gate_without_its_correction(tmp_path, tiny_weights, caplog):
    """A manifest gate that corrects attenuation: ``predict`` applies it (and logs the field);
    ``--no-attenuation-correction`` writes what the same gate without the correction writes."""
    from fusecare.cli import main
    from fusecare.restoration.ensemble import read_manifest, write_manifest
    from fusecare.restoration.gate import GateConfig

    _write_dimmed_case(tmp_path / "in" / "a.tif")
    ensemble = tiny_weights / "membrane"
    gate = GateConfig(spread_scale=10.0, blend=1.0)

    def predict(out: str, *flags: str) -> np.ndarray:
        assert main(["predict", str(tmp_path / "in"), "-o", str(tmp_path / out), "--weights", str(tiny_weights),
                     "--device", "cpu", "--quiet", *flags]) == 0
        return tifffile.imread(tmp_path / out / "a.tif")

    write_manifest(ensemble, read_manifest(ensemble)["channel"], gate=gate.replace(correct_attenuation=True))
    with caplog.at_level("INFO", logger="fusecare"):
        corrected = predict("corrected")
    assert "attenuation correction: light from x start" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="fusecare"):
        switched_off = predict("switched_off", "--no-attenuation-correction")
    assert "attenuation correction" not in caplog.text
    write_manifest(ensemble, read_manifest(ensemble)["channel"], gate=gate)
    np.testing.assert_array_equal(switched_off, predict("plain"))
    assert not np.array_equal(corrected, switched_off)


def test_a_gate_without_prediction_skips_the_network(tmp_path, tiny_weights, caplog, monkeypatch):
    """A calibrated gate with blend 0 that corrects attenuation writes the smoothed input times the
    field without running a member; with ``--no-attenuation-correction`` such a gate with no
    fallback smoothing keeps the input, and the fallback line says why."""
    from fusecare.cli import main
    from fusecare.normalize import PercentileNorm
    from fusecare.restoration.attenuation import estimate_attenuation
    from fusecare.restoration.ensemble import Ensemble, read_manifest, write_manifest
    from fusecare.restoration.gate import GateConfig, smooth
    from fusecare.restoration.intensities import Uint16Map

    def no_network(*args, **kwargs):
        raise AssertionError("a member ran")

    monkeypatch.setattr(Ensemble, "predict_tensor", no_network)
    dimmed = _write_dimmed_case(tmp_path / "in" / "a.tif")
    ensemble = tiny_weights / "membrane"
    gate = GateConfig(blend=0.0, fallback_sigma=0.5, correct_attenuation=True)
    write_manifest(ensemble, read_manifest(ensemble)["channel"], gate=gate)
    args = ["predict", str(tmp_path / "in"), "--weights", str(tiny_weights), "--device", "cpu", "--quiet"]
    with caplog.at_level("INFO", logger="fusecare"):
        assert main([*args, "-o", str(tmp_path / "out")]) == 0
    assert "the network is skipped" in caplog.text
    norm = PercentileNorm.fit(dimmed)
    field = estimate_attenuation(dimmed, (1.0, 0.2, 0.2), norm.forward).region((slice(None),) * 3)  # its voxel
    expected, _ = Uint16Map.for_input(float(dimmed.min()), float(dimmed.max())).apply(
        norm.inverse(smooth(norm.forward(dimmed), 0.5) * field))
    written = tifffile.imread(tmp_path / "out" / "a.tif")
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1
    write_manifest(ensemble, read_manifest(ensemble)["channel"], gate=gate.replace(fallback_sigma=0.0))
    caplog.clear()
    assert main([*args, "-o", str(tmp_path / "off"), "--no-attenuation-correction"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "off" / "a.tif"), dimmed)
    assert "uses no prediction, and its attenuation correction is switched off" in caplog.text


def test_light_from_names_the_entry_face_the_correction_fits(tmp_path, tiny_weights, caplog):
    """``--light-from`` reaches the estimate (the log names that face, whatever the view suggests);
    a face that does not exist is a usage error."""
    from fusecare.cli import main
    from fusecare.restoration.ensemble import read_manifest, write_manifest
    from fusecare.restoration.gate import GateConfig

    _write_dimmed_case(tmp_path / "in" / "a.tif")
    ensemble = tiny_weights / "membrane"
    write_manifest(ensemble, read_manifest(ensemble)["channel"],
                   gate=GateConfig(spread_scale=10.0, blend=1.0, correct_attenuation=True))
    args = ["predict", str(tmp_path / "in"), "--weights", str(tiny_weights), "--device", "cpu", "--quiet"]
    with caplog.at_level("INFO", logger="fusecare"):
        assert main([*args, "-o", str(tmp_path / "told"), "--light-from", "y-end"]) == 0
    assert "attenuation correction: light from y end" in caplog.text
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "-o", str(tmp_path / "bad"), "--light-from", "left"])
    assert exit_info.value.code == 2
    for off in ("--no-gate", "--no-attenuation-correction"):  # nothing would use the face: said, not ignored
        caplog.clear()
        assert main([*args, "-o", str(tmp_path / "off"), "--light-from", "y-end", off]) == 2
        assert f"which {off} turns off" in caplog.text
    assert not (tmp_path / "off").exists()


def test_the_python_api_takes_the_light_sheets_face(tmp_path, tiny_weights, caplog):
    """``fusecare.restore(..., light_from=...)`` reaches the estimate as the command line's flag
    does; a face that does not exist is refused when the options are built, before any case."""
    import fusecare
    from fusecare.errors import ConfigError
    from fusecare.restoration.ensemble import read_manifest, write_manifest
    from fusecare.restoration.gate import GateConfig
    from fusecare.restoration.pipeline import RestoreOptions

    dimmed = _write_dimmed_case(tmp_path / "a.tif")
    ensemble = tiny_weights / "membrane"
    write_manifest(ensemble, read_manifest(ensemble)["channel"],
                   gate=GateConfig(spread_scale=10.0, blend=1.0, correct_attenuation=True))
    with caplog.at_level("INFO", logger="fusecare"):
        fusecare.restore(dimmed, weights=tiny_weights, device="cpu", light_from="y end")
    assert "attenuation correction: light from y end" in caplog.text
    caplog.clear()
    fusecare.restore(dimmed, weights=tiny_weights, device="cpu", light_from="y end", attenuation_correction=False)
    assert "light from y end ignored: the membrane gate has no attenuation correction" in caplog.text
    with pytest.raises(ConfigError, match="light_from"):
        RestoreOptions(light_from="left")
    with pytest.raises(ConfigError, match="light_from"):
        fusecare.restore(dimmed, weights=tiny_weights, device="cpu", light_from="left")
