"""The benchmarks' own parts (``bench/``): how they name faces, read an estimate, score a view or a checkpoint.

The benchmarks themselves need ``../shared/data`` and minutes; these parts run on small synthetic
specimens and phantoms: each row's ``light`` and ``named`` labels, the clean volumes' own light
loss, the summary's cells, and the attenuation bench's scoring of a view and of its mirror.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import beer_lambert, blob_specimen, write_fmc_tif

from fusecare.restoration import attenuation as estimator
from fusecare.restoration.attenuation import AttenuationField
from fusecare.training.phantoms import PHANTOM_VOXEL_SIZE_ZYX, membrane_phantom

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import attenuation as attenuation_bench  # noqa: E402
import quality  # noqa: E402

VOXEL = (1.0, 0.5, 0.5)


def test_face_names_follow_the_views_entry_faces():
    assert [quality.face_name(seed) for seed in range(20_000, 20_004)] == ["y start", "x start", "y end", "x end"]
    assert [quality.entry_face(seed) for seed in range(20_000, 20_004)] == [
        ("y", True), ("x", True), ("y", False), ("x", False)]


def _write(path: Path, volume: np.ndarray) -> Path:
    return write_fmc_tif(path, (1000 * volume).astype(np.uint16), PhysicalSizeZ=VOXEL[0], PhysicalSizeY=VOXEL[1],
                         PhysicalSizeX=VOXEL[2])


def test_each_case_carries_its_own_views_light(tmp_path, rng):
    file = _write(tmp_path / "even.tif", blob_specimen(rng, (16, 48, 48), (2, 4, 4)))
    cases = quality.volume_cases([file], "test", range(20_001, 20_004), "fused")
    assert [(c.name, c.group, c.light) for c in cases] == [
        (f"even.tif view {seed}", "test", quality.face_name(seed)) for seed in range(20_001, 20_004)]
    assert all(c.source.shape == c.target.shape == (16, 48, 48) for c in cases)
    phantoms = quality.phantom_cases("membrane", 2, "fused")
    assert [(c.name, c.light) for c in phantoms] == [
        (f"phantom {quality.PHANTOM_SEED + k}", quality.face_name(quality.PHANTOM_SEED + k)) for k in range(2)]


def test_named_face_is_estimated_on_the_view_not_the_target(rng):
    signal = blob_specimen(rng)
    dimmed = beer_lambert(signal, 2, True, 0.05, VOXEL[2])
    as_view = quality.Case("v", "test", dimmed, signal, VOXEL, "x start")
    as_target = quality.Case("t", "test", signal, dimmed, VOXEL, "x start")
    assert quality.estimated_face(as_view) == "x start"
    assert quality.estimated_face(as_target) != "x start"


def _field(rate: float, *, rejected: bool = False) -> AttenuationField:
    return AttenuationField(np.ones((2, 2, 2), np.float32), (1, 1, 1), (2, 2, 2), "x end", rate, "z start", 0.0,
                            1.5 if rejected else 1.0, rejected)


def test_named_face_says_rejected_and_none_apart_from_a_face():
    assert quality.named_face(_field(0.02)) == "x end"
    assert quality.named_face(_field(0.02, rejected=True)) == "rejected"
    assert quality.named_face(_field(0.0)) == "none"


def test_own_light_loss_names_the_face_a_clean_volume_was_dimmed_from(tmp_path, rng):
    signal = blob_specimen(rng)
    dimmed = write_fmc_tif(tmp_path / "dimmed.tif", (1000 * beer_lambert(signal, 2, True, 0.05, VOXEL[2]))
                           .astype(np.uint16), PhysicalSizeZ=1.0, PhysicalSizeY=0.5, PhysicalSizeX=0.5)
    even = write_fmc_tif(tmp_path / "even.tif", (1000 * signal).astype(np.uint16),
                         PhysicalSizeZ=1.0, PhysicalSizeY=0.5, PhysicalSizeX=0.5)
    losses = quality.own_light_loss([dimmed, even])
    assert losses["dimmed.tif"]["named"] == "x start"
    assert losses["dimmed.tif"]["rate"] == pytest.approx(0.05, rel=0.3)
    assert losses["dimmed.tif"]["max_gain"] > 1.5
    assert losses["even.tif"]["max_gain"] < losses["dimmed.tif"]["max_gain"]


@pytest.fixture(scope="module")
def strong_view_row():
    """A membrane phantom lit from X's start under strong attenuation, scored as the bench scores it."""
    clean = membrane_phantom((32, 96, 96), rng=np.random.default_rng(7))
    seed = 20_001  # x start
    view, target = quality.pair_of(clean, PHANTOM_VOXEL_SIZE_ZYX, seed, "fused", attenuation_bench.STRONG)
    return attenuation_bench.score_view(PHANTOM_VOXEL_SIZE_ZYX, view, target, seed)


def test_bench_scores_the_estimated_field_and_its_mirror_consistently(strong_view_row):
    row = strong_view_row
    assert row["truth"] == "x start" and row["face"] == "x start" and not row["wrong_axis"]
    assert row["shipped"] == (row["gaussian"] if row["rejected"] else row["unguarded"])
    assert row["mirrored_guarded"] == (row["gaussian"] if row["mirrored_rejected"] else row["mirrored"])
    assert row["mirrored_rejected"] == (row["mirrored_ratio"] > estimator.GUARD_RATIO)
    assert 0.0 <= row["fill"] <= 1.0


def test_bench_finds_the_right_field_helps_and_its_mirror_harms(strong_view_row):
    row = strong_view_row
    assert row["shipped"] > row["gaussian"] + 0.1
    assert row["mirrored"] < row["gaussian"]
    assert row["shipped_sqrt"] < row["shipped"]  # half the correction recovers less of a right field


def test_summary_gives_held_out_mean_worst_and_ratio_under_aligned_headers():
    rows = [{"case": f"v{k}", "group": "test", "identity": 0.0, "gaussian": g, "ensemble": 0.1, "gated": s,
             "gaussian_corrected": 0.2} for k, (g, s) in enumerate([(0.2, 0.5), (0.2, -0.1)])]
    rows.append({"case": "p", "group": "phantom", **dict.fromkeys(quality.COLUMNS, 0.0)})
    result = {"channel": "membrane", "rows": rows}
    lines = quality.summarise(result)
    assert len(lines) == 2  # held-out and phantoms; no seen rows, no line
    h = result["heldout"]
    assert h["gated_mean"] == pytest.approx(0.2) and h["worst"] == pytest.approx(-0.1)
    assert h["ratio"] == pytest.approx(1.0) and h["n"] == 2
    header, edge = quality.summary_header(), len(f"{'channel':<9}{'content':<24}{'n':>4}")
    expected = {"identity": "0.000 (0.00)", "gaussian": "0.200 (0.20)", "ensemble": "0.100 (0.10)",
                "gated": "0.200 (-0.10)", "gaussian_corrected": "0.200 (0.20)"}
    for column in quality.COLUMNS:  # each cell ends where its column's name ends
        edge += quality._summary_width(column)
        assert header[:edge].endswith(" " + column) and lines[0][:edge].endswith(" " + expected[column])
    assert edge == len(lines[0]) == len(header)
    result["rows"] = [dict(r, gaussian=-0.1) for r in rows]
    quality.summarise(result)
    assert result["heldout"]["ratio"] is None  # no ratio to a baseline <= 0


def test_held_out_standard_error_treats_the_volume_as_the_unit():
    """Views of one volume share its content: the standard error is that of the per-volume means."""
    rows = [{"case": f"{volume}.tif view {seed}", "gated": value}
            for volume, values in {"a": (0.1, 0.3), "b": (0.5, 0.5), "c": (-0.2, 0.0)}.items()
            for seed, value in zip((20000, 20001), values)]
    means = [0.2, 0.5, -0.1]
    assert quality.volume_standard_error(rows, "gated") == pytest.approx(np.std(means, ddof=1) / np.sqrt(3))
    assert quality.volume_standard_error(rows[:2], "gated") is None  # one volume: no spread to estimate
    result = {"channel": "nucleus", "rows": [dict(r, group="test", **dict.fromkeys(
        ("identity", "gaussian", "ensemble", "gaussian_corrected"), 0.0)) for r in rows]}
    quality.summarise(result)
    assert result["heldout"]["volumes"] == 3
    assert result["heldout"]["gated_volume_se"] == pytest.approx(quality.volume_standard_error(rows, "gated"))


def test_rows_of_an_earlier_run_are_summarised_without_data(tmp_path):
    import json
    import subprocess

    rows = [{"case": f"{v}.tif view 20000", "group": "test", "identity": 0.0, "gaussian": 0.1, "ensemble": 0.2,
             "gated": g, "gaussian_corrected": 0.2} for v, g in (("a", 0.3), ("b", -0.1))]
    stored = tmp_path / "q.json"
    stored.write_text(json.dumps({"results": [{"channel": "membrane", "sigma": 0.45, "gate": None, "rows": rows}]}))
    bench = Path(quality.__file__)
    done = subprocess.run([sys.executable, str(bench), "--rows", str(stored), "--data", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "membrane: held-out gated 0.100 (standard error 0.200 across its 2 volumes), 1.00x" in done.stdout
    bad = subprocess.run([sys.executable, str(bench), "--rows", str(bench)], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "not a bench/quality.py --json file" in bad.stderr


def test_score_channel_labels_every_row_and_reads_own_loss_of_test_and_train(tmp_path, rng, capsys):
    """The whole channel loop on two tiny volumes with the shipped weights: every row names its
    view's light and the estimate's face, and the own-light-loss table covers test and train."""
    import argparse

    signal = blob_specimen(rng)
    split = {"test": [_write(tmp_path / "held.tif", beer_lambert(signal, 2, True, 0.05, VOXEL[2]))],
             "train": [_write(tmp_path / "seen.tif", signal)]}
    args = argparse.Namespace(weights=Path(__file__).resolve().parents[2] / "model_weights", device="cpu",
                              views=2, seen_views=1, phantoms=0, target="fused")
    result = quality.score_channel("membrane", split, args)
    rows = result["rows"]
    assert [(r["case"], r["group"], r["light"]) for r in rows] == [
        ("held.tif view 20000", "test", "y start"), ("held.tif view 20001", "test", "x start"),
        ("seen.tif view 20000", "train", "y start")]
    assert all(r["named"] in {*estimator.ILLUMINATION_FACES, "rejected", "none"} for r in rows)
    assert all(r["identity"] == 0.0 and np.isfinite([r[c] for c in quality.COLUMNS]).all() for r in rows)
    assert set(result["own_light_loss"]) == {"held.tif", "seen.tif"}
    assert result["own_light_loss"]["held.tif"]["named"] == "x start"


def test_validation_cases_score_each_case_as_training_logged_their_mean(tmp_path):
    """``bench/validation_cases.py``: its per-case scores of a checkpoint average to the mean
    N-SSIM training logged for that step (the same validation, scored the same way), ungated and
    through the config's ``validation_gate``."""
    import csv

    import validation_cases

    from fusecare.training.config import TrainConfig
    from fusecare.training.loop import train_member

    config = TrainConfig.from_dict({"model": {"first_filters": 4, "depth": 1}, "patch": [8, 16, 16],
                                    "batch_size": 2, "phantoms": 1, "phantom_shape": [12, 32, 32],
                                    "validation_phantoms": 2, "validation_patches": 2, "device": "cpu",
                                    "steps": 2, "validate_every": 2,
                                    "validation_gate": {"blend": 0.5, "spread_scale": 10.0}})
    train_member(config, tmp_path / "run", progress=False)
    names, columns = validation_cases.case_scores(config, [tmp_path / "run" / "last.pt"])
    assert list(columns) == ["run:2", "run:2 gated"]
    assert len(names) == len(columns["run:2"]) == len(columns["run:2 gated"]) == 2
    with (tmp_path / "run" / "log.csv").open() as log:
        [logged] = [row for row in csv.DictReader(log) if row["step"] == "2"]
    assert np.mean(columns["run:2"]) == pytest.approx(float(logged["val_nssim_mean"]), abs=1e-6)
    assert np.mean(columns["run:2 gated"]) == pytest.approx(float(logged["val_nssim_gated"]), abs=1e-6)
    assert min(columns["run:2 gated"]) == pytest.approx(float(logged["val_nssim_gated_min"]), abs=1e-6)


def test_validation_cases_name_each_checkpoint_apart():
    """Two runs' member_0 at the same step get two columns (the run folder in front), not one
    overwriting the other; one checkpoint given twice is refused."""
    import validation_cases

    first = validation_cases.column_name(Path("a/member_0/best.pt"), 200, [])
    second = validation_cases.column_name(Path("b/member_0/last.pt"), 200, [first])
    assert (first, second) == ("member_0:200", "b/member_0:200")
    with pytest.raises(SystemExit, match="given twice"):
        validation_cases.column_name(Path("b/member_0/last.pt"), 200, [first, second])


def test_field_parts_split_a_light_sheet_loss_from_detection(rng):
    """``bench/field_parts.py`` on a specimen dimmed along X only, against the undimmed specimen:
    the light-sheet part recovers what the full field does, the Z part finds no light-sheet loss
    and changes little."""
    import field_parts

    signal = blob_specimen(rng)
    view = 100 + 1000 * beer_lambert(signal, 2, True, 0.05, VOXEL[2])
    result = field_parts.field_parts(view, 100 + 1000 * signal, VOXEL)
    scores = result["scores"]
    assert list(scores) == ["alone", "x the full field", "x the detection (Z) part", "x the light-sheet part"]
    assert result["view"].startswith("light from x start") and result["z_part"].startswith("light from x end 0.000")
    assert scores["x the light-sheet part"] > scores["alone"] + 0.1
    assert abs(scores["x the light-sheet part"] - scores["x the full field"]) < 0.05
    assert abs(scores["x the detection (Z) part"] - scores["alone"]) < 0.05


@pytest.mark.parametrize("script", sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "bench").glob("*.py")))
def test_every_benchmark_script_imports(script):
    """A benchmark whose imports broke (a name moved or removed in the package) fails here, not
    when someone next runs it."""
    import importlib

    importlib.import_module(script)


def test_ship_decision_rule_needs_a_higher_mean_and_a_worst_case_not_lower():
    """``bench/ship_decision.py``'s rule: a higher leave-one-volume-out mean alone does not ship
    (session 14's membrane contender: 0.715 against 0.690 with a lower worst case); among those
    that pass, the highest mean ships; none passing keeps the shipped ensemble."""
    import ship_decision as sd

    shipped = sd.Estimate(0.690, 0.447, {})
    lower_worst = sd.Estimate(0.715, 0.398, {})
    assert not sd.passes(lower_worst, shipped) and sd.decide(shipped, {"a": lower_worst}) is None
    both = {"a": sd.Estimate(0.693, 0.450, {}), "b": sd.Estimate(0.700, 0.447, {}), "c": lower_worst}
    assert sd.decide(shipped, both) == "b"
    assert sd.decide(shipped, {"same": sd.Estimate(0.690, 0.447, {})}) is None  # not higher: kept


def test_ship_decision_estimates_each_ensemble_on_one_validation_without_writing(tmp_path):
    """End to end on tiny random ensembles and two validation phantoms: each estimate is the
    calibration's leave-one-volume-out (per volume the mean of its held-out cases), the manifests
    are left as they were, and the table names the decision."""
    import ship_decision as sd
    from conftest import make_tiny_ensemble

    from fusecare.training.calibration import calibrate_ensemble_gate
    from fusecare.training.config import TrainConfig
    from fusecare.training.sources import build_data

    shipped = make_tiny_ensemble(tmp_path / "a", "nucleus")
    contender = make_tiny_ensemble(tmp_path / "b", "nucleus", members=1)
    before = (shipped / "manifest.json").read_bytes()
    config = TrainConfig.from_dict({"model": {"first_filters": 4}, "phantoms": 1, "phantom_shape": [12, 32, 32],
                                    "validation_phantoms": 2, "device": "cpu"})
    _, cases = build_data(config, validation_only=True)
    estimates = {str(f): sd.estimate(f, cases) for f in (shipped, contender)}
    assert (shipped / "manifest.json").read_bytes() == before
    calibration = calibrate_ensemble_gate(shipped, cases)
    cv = calibration.cross_validation[calibration.rule.name]
    got = estimates[str(shipped)]
    assert got.mean == pytest.approx(cv.mean) and got.worst == pytest.approx(cv.worst)
    assert set(got.per_volume) == {"validation phantom 0", "validation phantom 1"}
    assert got.per_volume["validation phantom 0"] == pytest.approx(np.mean(cv.folds[0][2]))
    chosen = sd.decide(got, {str(contender): estimates[str(contender)]})
    lines = sd.table(str(shipped), estimates, chosen)
    assert lines[-1] == f"decision: {chosen or 'keep ' + str(shipped)}" and "shipped now" in lines[1]


def test_ship_decision_refuses_a_folder_without_an_ensemble_before_building_validation(tmp_path):
    import subprocess

    script = Path(__file__).resolve().parents[2] / "bench" / "ship_decision.py"
    config = tmp_path / "c.json"
    config.write_text('{"validation_files": ["/nowhere/never_read.tif"]}')
    result = subprocess.run([sys.executable, script, config, "--shipped", tmp_path, "--contender", tmp_path / "x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"{tmp_path}: no ensemble there (no manifest.json)" in result.stderr
    assert "Traceback" not in result.stderr
