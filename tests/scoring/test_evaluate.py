"""evaluation/score.py and fusecare.scoring.evaluate: pairing, N-SSIM of the identity, failures, options.

Subprocess runs check what a user sees (stdout table, one stderr line per failed case, exit
status); in-process runs cover what needs monkeypatching (a failing cellpose download, a stand-in
segmenter).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, write_fmc_tif
from PIL import Image
from test_segment import (
    ThresholdSegmenter,
    _offline_one_thread,  # noqa: F401  (autouse here too: no network, one torch thread)
    blob_model_path,
    blobs,
    render,
)

from fusecare.normalize import PercentileNorm
from fusecare.scoring import evaluate
from fusecare.scoring.evaluate import (
    EvalOptions,
    SsimOptions,
    case_key,
    evaluate_folder,
    pair_cases,
    score_volumes,
)
from fusecare.scoring.figures import png_size
from fusecare.scoring.metrics import score_ssim
from fusecare.scoring.segment import MODELS_ENV, SegOptions

SHAPE = (12, 40, 40)
VOXEL = {"PhysicalSizeZ": 1.0, "PhysicalSizeY": 0.5, "PhysicalSizeX": 0.5}


pytestmark = [  # raised inside torch and cellpose when cellpose loads or runs a model
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning"),
]


# --------------------------------------------------------------------------- helpers


def make_pair(seed: int, shape: tuple[int, ...] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """(target, input): blobs on a 0.5 um grid, the input blurred and noisy, z every 1 um."""
    truth = blobs((2 * shape[0] - 1, *shape[1:]), 6, (4.0, 6.0), seed)
    return (render(truth, blur=1.0, noise=0.02, seed=seed)[::2],
            render(truth, blur=2.5, noise=0.2, seed=seed + 1)[::2])


def make_folders(root: Path, cases: dict[str, str], *, identity: bool = True) -> dict[str, Path]:
    """gt/, input/ and pred/ (the input copied: the identity prediction) for {name: channel}."""
    dirs = {name: root / name for name in ("gt", "input", "pred")}
    for k, (name, channel) in enumerate(cases.items()):
        target, single = make_pair(k)
        write_fmc_tif(dirs["gt"] / name.replace("_angle", "_fused"), target, channel=channel, **VOXEL)
        write_fmc_tif(dirs["input"] / name, single, channel=channel, **VOXEL)
        write_fmc_tif(dirs["pred"] / name, single if identity else target, channel=channel, **VOXEL)
    return dirs


def run_score(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python evaluation/score.py ARGS`` from the repository root, as a user types it."""
    environment = {k: v for k, v in os.environ.items() if k != MODELS_ENV}
    environment.update({"OMP_NUM_THREADS": "1"}, **(env or {}))
    return subprocess.run([sys.executable, "evaluation/score.py", *map(str, args)], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=600)


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def folder_args(dirs: dict[str, Path]) -> list[str | Path]:
    return ["--pred", dirs["pred"], "--gt", dirs["gt"], "--input", dirs["input"]]


# --------------------------------------------------------------------------- CLI


def test_identity_prediction_scores_exactly_zero(tmp_path):
    cases = {"image_1_nucleus_angle.tif": "nucleus", "image_2_nucleus_angle.tif": "nucleus",
             "membrane_a.tif": "membrane"}
    dirs = make_folders(tmp_path, cases)
    write_fmc_tif(tmp_path / "unc" / "membrane_a.tif", np.full(SHAPE, 7, np.uint16))
    out = tmp_path / "report"
    proc = run_score(*folder_args(dirs), "--out", out, "--no-seg", "--uncertainty", tmp_path / "unc")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = read_rows(out / "scores.csv")
    assert set(rows) == set(cases)
    for name, row in rows.items():
        assert (row["status"], row["channel"], row["study"]) == ("ok", cases[name], "1")
        assert float(row["n_ssim"]) == 0.0 and row["ssim_input"] == row["ssim_pred"]
        assert 0.2 < float(row["ssim_input"]) < 0.99
        assert row["n_iou"] == ""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["leaderboard"] == {"N_SSIM_nucleus": 0.0, "N_SSIM_membrane": 0.0,
                                      "N_IOU_nucleus": None, "N_IOU_membrane": None}
    assert summary["channels"]["nucleus"]["n_ssim"]["count"] == 2
    assert summary["settings"]["segment"] is False and summary["settings"]["ssim"]["data_range"] == 1.0
    assert "N_SSIM_nucleus   +0.0000" in proc.stdout and "3 of 3 cases scored" in proc.stdout
    for name in cases:
        with Image.open(out / "png" / f"{case_key(name)}.png") as image:
            columns = 5 if name.startswith("membrane") else 4
            assert image.size == png_size(SHAPE, (1.0, 0.5, 0.5), columns)


def test_failed_cases_are_one_line_each_and_the_others_scored(tmp_path):
    dirs = make_folders(tmp_path, {"good.tif": "nucleus", "nopred.tif": "nucleus", "shape.tif": "nucleus",
                                   "broken.tif": "membrane"})
    (dirs["pred"] / "nopred.tif").unlink()
    write_fmc_tif(dirs["pred"] / "shape.tif", np.zeros((12, 40, 38), np.uint16))
    (dirs["pred"] / "broken.tif").write_bytes(b"definitely not a tiff")
    write_fmc_tif(dirs["pred"] / "orphan.tif", np.zeros(SHAPE, np.uint16))
    out = tmp_path / "report"
    proc = run_score(*folder_args(dirs), "--out", out, "--no-seg", "--quiet")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 4, proc.stderr
    for name, reason in [("nopred.tif", "no prediction in"), ("shape.tif", "shapes differ: prediction 12x40x38"),
                         ("broken.tif", "prediction broken.tif: not a readable TIFF"), ("orphan.tif", "no target in")]:
        assert sum(name in line and reason in line for line in errors) == 1, (name, errors)
    rows = read_rows(out / "scores.csv")
    assert rows["good.tif"]["status"] == "ok" and float(rows["good.tif"]["n_ssim"]) == 0.0
    assert {rows[n]["status"] for n in ("nopred.tif", "shape.tif", "broken.tif", "orphan.tif")} == {"failed"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == {"total": 5, "scored": 1, "failed": 4, "excluded": 0, "counted": 1}
    assert "FAILED shape.tif: shapes differ" in proc.stdout


def test_usage_errors_exit_2_with_one_line(tmp_path):
    dirs = make_folders(tmp_path, {"a.tif": "nucleus"})
    proc = run_score("--pred", dirs["pred"], "--gt", tmp_path / "missing", "--input", dirs["input"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"fusecare ERROR: folder not found: {tmp_path / 'missing'}"]
    proc = run_score("--pred", dirs["pred"], "--gt", dirs["gt"])
    assert proc.returncode == 2 and "--input" in proc.stderr
    proc = run_score(*folder_args(dirs), "--offline", "--quiet", env={MODELS_ENV: str(tmp_path / "no_models")})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cellpose model 'nuclei'" in lines[0] and "downloads disabled" in lines[0]


def load_score_cli():
    spec = importlib.util.spec_from_file_location("score_cli", REPO / "evaluation" / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_neither_cached_nor_downloadable(tmp_path, monkeypatch, caplog, capsys):
    import cellpose.utils

    def no_network(url, dst, progress=True):
        raise urllib.error.URLError("Network is unreachable")

    monkeypatch.setattr(cellpose.utils, "download_url_to_file", no_network)
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "models"))
    dirs = make_folders(tmp_path, {"m.tif": "membrane"})
    with caplog.at_level(logging.INFO, logger="fusecare"):
        assert load_score_cli().main([*map(str, folder_args(dirs)), "--quiet"]) == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage()
    assert "cellpose model 'cyto3'" in errors[0].getMessage()
    assert "could not be downloaded (Network is unreachable" in errors[0].getMessage()
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_cli_with_segmentation_offline(tmp_path, tmp_path_factory):
    """Identity prediction with the locally trained cellpose model: N-SSIM and N-IoU exactly 0."""
    model = blob_model_path(tmp_path_factory)
    dirs = make_folders(tmp_path, {"n.tif": "nucleus"})
    out = tmp_path / "report"
    proc = run_score(*folder_args(dirs), "--out", out, "--cellpose-model", f"nucleus={model}", "--offline",
                     "--threads", "1", "--device", "cpu", "--iou", "instance")
    assert proc.returncode == 0, proc.stderr
    row = read_rows(out / "scores.csv")["n.tif"]
    assert float(row["n_ssim"]) == 0.0 and float(row["n_iou"]) == 0.0
    assert row["iou_input"] == row["iou_pred"] and 0.0 < float(row["iou_input"]) < 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["leaderboard"]["N_IOU_nucleus"] == 0.0
    assert summary["settings"]["iou"]["iou"] == "instance"
    assert summary["settings"]["cellpose_models"]["nucleus"] == str(model)
    assert "cellpose" in proc.stderr  # the progress bar names the stage


# --------------------------------------------------------------------------- library


def test_cases_are_read_a_slab_at_a_time_and_closed(tmp_path, monkeypatch):
    """A 300x1920x1920 case is 6.6 GB as three whole uint16 volumes: scoring pages them in."""
    from fusecare import io as fusecare_io
    from fusecare.io import PagedVolume, read_case

    dirs = make_folders(tmp_path, {"a.tif": "nucleus", "b.tif": "membrane"}, identity=False)
    write_fmc_tif(tmp_path / "unc" / "a.tif", np.full(SHAPE, 7, np.uint16))
    from fusecare import normalize

    opened: list[object] = []
    real = fusecare_io.open_volume
    monkeypatch.setattr(fusecare_io, "open_volume", lambda *a, **kw: opened.append(real(*a, **kw)) or opened[-1])
    histograms: list[tuple[int, ...]] = []
    real_histogram = normalize.integer_histogram
    monkeypatch.setattr(normalize, "integer_histogram",
                        lambda v: histograms.append(v.shape) or real_histogram(v))
    options = EvalOptions(segment=False, progress=False, png_dir=tmp_path / "png", uncertainty_dir=tmp_path / "unc")
    results = evaluate_folder(dirs["pred"], dirs["gt"], dirs["input"], options)
    assert len(opened) == 7 and all(isinstance(v, PagedVolume) and v.closed for v in opened)
    assert len(histograms) == 6  # one per volume: scores and pictures share the fitted norms
    for result in results:
        volumes = [read_case(dirs[d] / result.case.replace("_angle", "_fused")).volume for d in ("gt", "pred", "input")]
        assert result.ok and result.ssim == score_ssim(*volumes)


def test_case_keys_and_pairing(tmp_path):
    assert case_key("image_3_nucleus_angle.tif") == case_key("image_3_nucleus_fused.TIFF") == "image_3_nucleus"
    assert case_key("a_angle_b.tif") == "a_angle_b"
    dirs = make_folders(tmp_path, {"x_angle.tif": "nucleus", "y.tif": "nucleus"})
    write_fmc_tif(dirs["pred"] / "y.tiff", np.zeros(SHAPE, np.uint16))
    pairs = {p.name: p for p in pair_cases(dirs["pred"], dirs["gt"], dirs["input"])}
    assert pairs["x_angle.tif"].target == dirs["gt"] / "x_fused.tif" and pairs["x_angle.tif"].problem is None
    assert pairs["y.tif"].problem == "ambiguous prediction: y.tif, y.tiff"


def test_channel_from_metadata_and_override(tmp_path):
    dirs = make_folders(tmp_path, {"a.tif": "nucleus", "b.tif": "membrane", "c.tif": "nucleus"})
    target, single = make_pair(9)
    write_fmc_tif(dirs["input"] / "c.tif", single, channel=None, **VOXEL)  # no key: the target's
    write_fmc_tif(dirs["gt"] / "c.tif", target, channel="membrane", **VOXEL)
    write_fmc_tif(dirs["pred"] / "c.tif", single, channel=None, **VOXEL)
    options = EvalOptions(segment=False, progress=False)
    found = {r.case: r.channel for r in evaluate_folder(dirs["pred"], dirs["gt"], dirs["input"], options)}
    assert found == {"a.tif": "nucleus", "b.tif": "membrane", "c.tif": "membrane"}
    options = EvalOptions(segment=False, progress=False, channel="membrane")
    results = evaluate_folder(dirs["pred"], dirs["gt"], dirs["input"], options)
    assert {r.channel for r in results} == {"membrane"} and all(r.ssim.n_ssim == 0.0 for r in results)
    with pytest.raises(ValueError, match="channel must be one of .* got 'cytoplasm'"):
        EvalOptions(channel="cytoplasm")


@pytest.mark.parametrize("ssim", [SsimOptions(), SsimOptions(per_slice=True), SsimOptions(window="gaussian"),
                                  SsimOptions(data_range="target")])
def test_score_volumes_is_score_ssim_with_the_options(ssim):
    target, single = make_pair(4)
    pred = (0.5 * target + 0.5 * single).astype(np.uint16)
    options = EvalOptions(ssim=ssim, segment=False, device="cpu")
    scores, seg = score_volumes(target, pred, single, channel="nucleus", options=options)
    data_range = ssim.data_range
    if data_range == "target":
        data_range = (float(target.max()) - float(target.min())) / PercentileNorm.fit(target).scale
        assert data_range > 1.0  # max - min of the normalised target, a little over 1 here
    assert seg is None
    assert scores == score_ssim(target, pred, single, window=ssim.window, per_slice=ssim.per_slice,
                                data_range=data_range)
    assert score_volumes(target, single, single, channel="nucleus", options=options)[0].n_ssim == 0.0


def test_segmentation_path_of_a_folder(tmp_path, monkeypatch):
    """N-IoU through evaluate_folder, with a stand-in segmenter: identity 0, the target itself 1."""
    class FakeCache:
        def get(self, channel: str) -> ThresholdSegmenter:
            return ThresholdSegmenter()

    monkeypatch.setattr(evaluate, "make_segmenters", lambda options: FakeCache())
    options = EvalOptions(progress=False, seg=SegOptions(best_iou=1.0))
    dirs = make_folders(tmp_path / "identity", {"a.tif": "nucleus", "b.tif": "membrane"})
    for result in evaluate_folder(dirs["pred"], dirs["gt"], dirs["input"], options):
        assert result.ok and result.seg.n_iou == 0.0 and result.seg.iou_input < 1.0
    dirs = make_folders(tmp_path / "perfect", {"a.tif": "nucleus"}, identity=False)
    (result,) = evaluate_folder(dirs["pred"], dirs["gt"], dirs["input"], options)
    assert result.seg.n_iou == 1.0 and result.ssim.n_ssim == 1.0


# --------------------------------------------------------------------------- issue 10: numbers we stand behind


def test_prediction_with_non_finite_voxels_is_a_failed_row(tmp_path, caplog, capsys):
    dirs = make_folders(tmp_path, {"good.tif": "nucleus", "nan.tif": "nucleus"})
    _, single = make_pair(1)
    bad = single.astype(np.float32)
    bad[3, 5, :4] = np.nan
    bad[4, 6, :2] = np.inf
    write_fmc_tif(dirs["pred"] / "nan.tif", bad, channel="nucleus", **VOXEL)
    out = tmp_path / "report"
    assert load_score_cli().main([*map(str, folder_args(dirs)), "--out", str(out), "--no-seg", "--quiet"]) == 1
    rows = read_rows(out / "scores.csv")
    assert rows["nan.tif"]["status"] == "failed" and rows["nan.tif"]["n_ssim"] == ""
    assert "6 non-finite voxel(s)" in rows["nan.tif"]["error"]
    assert rows["good.tif"]["status"] == "ok"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["leaderboard"]["N_SSIM_nucleus"] == 0.0 and summary["channels"]["nucleus"]["n_ssim"]["count"] == 1
    [record] = [r for r in caplog.records if r.levelno >= 40]
    assert record.getMessage().startswith("FAILED nan.tif: prediction nan.tif has 6 non-finite")


def test_target_equal_to_input_is_excluded_from_the_means_with_a_named_warning(tmp_path, caplog, capsys):
    dirs = make_folders(tmp_path, {"a.tif": "nucleus", "b.tif": "membrane"})
    out = tmp_path / "report"
    # --pred and --gt swapped: the "target" is the identity prediction, i.e. the input itself
    code = load_score_cli().main(["--pred", str(dirs["gt"]), "--gt", str(dirs["pred"]), "--input",
                                  str(dirs["input"]), "--out", str(out), "--no-seg", "--quiet"])
    assert code == 1
    stdout = capsys.readouterr().out
    assert "inf" not in stdout.lower().replace("info", "")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == 30]
    assert sum(m.startswith("EXCLUDED from the means a.tif: target equals input") for m in warnings) == 1
    assert any("swapped" in m for m in warnings)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == {"total": 2, "scored": 2, "failed": 0, "excluded": 2, "counted": 0}
    assert summary["leaderboard"]["N_SSIM_nucleus"] is None
    assert [e["case"] for e in summary["excluded"]] == ["a.tif", "b.tif"]
    assert "2 scored case(s) excluded from the means" in stdout and "EXCLUDED a.tif: target equals input" in stdout
    assert read_rows(out / "scores.csv")["a.tif"]["status"] == "excluded"


def test_out_naming_an_existing_file_is_a_usage_error(tmp_path, caplog):
    dirs = make_folders(tmp_path, {"a.tif": "nucleus"})
    existing = tmp_path / "scores.txt"
    existing.write_text("keep me")
    assert load_score_cli().main([*map(str, folder_args(dirs)), "--out", str(existing), "--no-seg"]) == 2
    assert existing.read_text() == "keep me"
    [record] = [r for r in caplog.records if r.levelno >= 40]
    assert "existing file" in record.getMessage()
