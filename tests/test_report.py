"""fusecare.report: CSV rows, per-channel summary and leaderboard, table, projections, PNG, index.html."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from fusecare import report
from fusecare.evaluate import CaseResult
from fusecare.metrics import SsimScores
from fusecare.normalize import PercentileNorm
from fusecare.report import (
    CSV_COLUMNS, LEADERBOARD, case_picture, format_table, png_size, projections, render_case_png, result_row,
    run_scales, summarize, write_case_png, write_csv, write_html, write_json,
)
from fusecare.segment import IouScores, SegScores


def seg(iou_input: float, iou_pred: float, n: float) -> SegScores:
    fit = IouScores(foreground=iou_input, instance=0.5, n_target=3, n_pred=4, n_matched=3)
    return SegScores(iou_input=iou_input, iou_pred=iou_pred, n_iou=n, mode="foreground", best_iou=1.0,
                     input=fit, pred=fit, diameter=12.0, spacing=0.2, iso_shape=(5, 5, 5), seconds=1.0)


def results() -> list[CaseResult]:
    def ok(name: str, channel: str, n_ssim: float, n_iou: float | None) -> CaseResult:
        return CaseResult(case=name, channel=channel, study=1, ssim=SsimScores(0.5, 0.5 + n_ssim / 2, n_ssim),
                          seg=None if n_iou is None else seg(0.4, 0.5, n_iou), seconds=2.0)

    return [
        ok("a.tif", "nucleus", 0.1, 0.2),
        ok("b.tif", "nucleus", -0.3, 0.4),
        ok("c.tif", "nucleus", 0.5, None),
        ok("d.tif", "membrane", 0.05, -0.1),
        CaseResult(case="e.tif", channel="membrane", error="no prediction in /p"),
        CaseResult(case="f.tif", error="f.tif: empty file (0 bytes)"),
    ]


def test_summary_statistics_and_leaderboard():
    summary = summarize(results(), settings={"iou": "foreground"})
    nucleus, membrane = summary["channels"]["nucleus"], summary["channels"]["membrane"]
    assert nucleus["n_ssim"] == {"mean": pytest.approx(0.1), "median": 0.1, "min": -0.3, "count": 3}
    assert nucleus["n_iou"] == {"mean": pytest.approx(0.3), "median": pytest.approx(0.3), "min": 0.2, "count": 2}
    assert membrane["n_ssim"] == {"mean": 0.05, "median": 0.05, "min": 0.05, "count": 1}
    assert tuple(summary["leaderboard"]) == LEADERBOARD
    assert summary["leaderboard"] == {"N_SSIM_nucleus": pytest.approx(0.1), "N_SSIM_membrane": 0.05,
                                      "N_IOU_nucleus": pytest.approx(0.3), "N_IOU_membrane": -0.1}
    assert summary["cases"] == {"total": 6, "scored": 4, "failed": 2, "excluded": 0, "counted": 4}
    assert summary["errors"] == [{"case": "e.tif", "error": "no prediction in /p"},
                                 {"case": "f.tif", "error": "f.tif: empty file (0 bytes)"}]
    assert summary["settings"] == {"iou": "foreground"}


def test_empty_channel_and_non_finite_values(tmp_path):
    worst = CaseResult(case="x.tif", channel="nucleus", ssim=SsimScores(1.0, 0.9, -math.inf))
    summary = summarize([worst, CaseResult(case="y.tif", channel="nucleus", ssim=SsimScores(0.5, 0.6, 0.2))])
    assert summary["channels"]["nucleus"]["n_ssim"] == {"mean": None, "median": None, "min": None, "count": 2}
    assert summary["channels"]["membrane"]["n_ssim"] == {"mean": None, "median": None, "min": None, "count": 0}
    assert summary["leaderboard"]["N_SSIM_membrane"] is None
    path = write_json(summary, tmp_path / "out" / "summary.json")  # strict JSON: no Infinity
    assert json.loads(path.read_text())["channels"]["nucleus"]["n_ssim"]["count"] == 2


def test_csv_rows(tmp_path):
    path = write_csv(results(), tmp_path / "scores.csv")
    with path.open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert [r["case"] for r in rows] == ["a.tif", "b.tif", "c.tif", "d.tif", "e.tif", "f.tif"]
    a = rows[0]
    assert (a["channel"], a["study"], a["status"], a["error"]) == ("nucleus", "1", "ok", "")
    assert float(a["ssim_input"]) == 0.5 and float(a["ssim_pred"]) == 0.55 and float(a["n_ssim"]) == 0.1
    assert (float(a["iou_input"]), float(a["iou_pred"]), float(a["n_iou"]), float(a["seconds"])) == (0.4, 0.5, 0.2, 2.0)
    assert rows[2]["iou_input"] == rows[2]["n_iou"] == ""  # scored without segmentation
    assert (rows[4]["status"], rows[4]["error"], rows[4]["n_ssim"]) == ("failed", "no prediction in /p", "")
    assert rows[5]["channel"] == ""


def test_table_lists_every_number_and_failure():
    table = format_table(summarize(results()))
    lines = table.splitlines()
    assert lines[0].split() == ["channel", "metric", "mean", "median", "min", "count"]
    assert lines[1].split() == ["nucleus", "N_SSIM", "+0.1000", "+0.1000", "-0.3000", "3"]
    assert lines[4].split() == ["membrane", "N_IOU", "-0.1000", "-0.1000", "-0.1000", "1"]
    assert "N_IOU_nucleus    +0.3000" in table
    assert "4 of 6 cases scored" in table
    assert "FAILED e.tif: no prediction in /p" in table


def test_projections_match_numpy(rng, monkeypatch):
    monkeypatch.setattr(report, "_SLAB_VOXELS", 50)  # several slabs
    a = rng.integers(0, 4000, (9, 7, 11)).astype(np.uint16)
    b = rng.integers(0, 4000, (9, 7, 11)).astype(np.uint16)
    na, nb = PercentileNorm.fit(a), PercentileNorm.fit(b)
    [(xy, xz)] = projections([a], norms=[na])
    np.testing.assert_allclose(xy, na.forward(a).max(axis=0))
    np.testing.assert_allclose(xz, na.forward(a).max(axis=1))
    (xy_a, _), (xy_b, xz_b), (xy, xz) = projections([a, b], norms=[na, nb], difference=(0, 1))
    diff = np.abs(na.forward(a) - nb.forward(b))
    np.testing.assert_allclose(xy, diff.max(axis=0))
    np.testing.assert_allclose(xz, diff.max(axis=1))
    np.testing.assert_allclose(xy_a, na.forward(a).max(axis=0))
    np.testing.assert_allclose(xz_b, nb.forward(b).max(axis=1))
    [(xy, _)] = projections([a])
    np.testing.assert_array_equal(xy, a.max(axis=0).astype(np.float32))


def test_case_png_reads_each_volume_once_when_given_its_norms(rng, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_SLAB_VOXELS", 200)  # several slabs

    class Counting(np.ndarray):
        planes = 0

        def __getitem__(self, key):
            if isinstance(key, slice):
                Counting.planes += len(range(*key.indices(self.shape[0])))
            return np.asarray(self).__getitem__(key)

    volumes = [rng.integers(0, 4000, (9, 16, 16)).astype(np.uint16).view(Counting) for _ in range(3)]
    norms = dict(zip(report.ROLES, (PercentileNorm.fit(np.asarray(v)) for v in volumes)))
    write_case_png(tmp_path / "c.png", *volumes, (1.0, 1.0, 1.0), norms=norms)
    assert Counting.planes == 3 * 9


@pytest.mark.parametrize(("shape", "voxel", "columns", "expected"), [
    # 2.6-inch columns at 100 dpi; rows at physical aspect: XY 32x48 -> 173 px, XZ 16/48 -> clipped to 0.4 columns
    ((8, 32, 48), (2.0, 1.0, 1.0), 4, (60 + 4 * 260 + 3 * 15 + 20, 95 + 173 + 15 + 104 + 100)),
    ((10, 300, 200), (1.0, 0.5, 0.5), 5, (60 + 5 * 260 + 4 * 15 + 20, 95 + 390 + 15 + 104 + 100)),
])
def test_png_layout(tmp_path, rng, shape, voxel, columns, expected):
    assert png_size(shape, voxel, columns) == expected
    target = rng.integers(100, 4000, shape).astype(np.uint16)
    pred = (target * 0.9).astype(np.uint16)
    uncertainty = rng.integers(0, 50, shape).astype(np.uint16) if columns == 5 else None
    path = write_case_png(tmp_path / "png" / "case.png", target // 2, pred, target, voxel, uncertainty=uncertainty)
    with Image.open(path) as image:
        assert image.size == expected
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # something was drawn


def test_excluded_cases_are_counted_listed_and_left_out_of_the_means():
    kept = CaseResult(case="y.tif", channel="nucleus", ssim=SsimScores(0.5, 0.6, 0.2))
    swapped = CaseResult(case="x.tif", channel="nucleus", ssim=SsimScores(1.0, 0.9, -math.inf),
                         excluded="target equals input")
    summary = summarize([swapped, kept])
    assert summary["channels"]["nucleus"]["n_ssim"] == {"mean": 0.2, "median": 0.2, "min": 0.2, "count": 1}
    assert summary["cases"] == {"total": 2, "scored": 2, "failed": 0, "excluded": 1, "counted": 1}
    assert summary["excluded"] == [{"case": "x.tif", "reason": "target equals input"}]
    table = format_table(summary)
    assert "1 scored case(s) excluded from the means, 1 counted" in table
    assert "EXCLUDED x.tif: target equals input" in table
    assert result_row(swapped)["status"] == "excluded" and result_row(swapped)["error"] == "target equals input"


def test_title_names_case_channel_and_scores(rng):
    volume = rng.integers(100, 4000, (8, 16, 16)).astype(np.uint16)
    picture = case_picture(volume, volume, volume, (1.0, 1.0, 1.0), case="image_3.tif", channel="nucleus")
    picture.scores.update(n_ssim=0.4321, n_iou=-0.05)
    assert report._title(picture) == "image_3.tif   |   nucleus   |   N-SSIM +0.432   |   N-IoU -0.050"
    assert report.FONT_PT * report.DPI / 72 >= 12  # the smallest text is at least 12 px


def test_difference_shares_one_scale_over_the_run(rng, tmp_path):
    """A bad case must look worse than a good one: both drawn on the run's 99th percentile."""
    target = rng.integers(100, 4000, (8, 32, 32)).astype(np.uint16)
    good = case_picture(target, target + rng.integers(0, 40, target.shape).astype(np.uint16), target, (1, 1, 1))
    bad = case_picture(target, rng.integers(100, 4000, target.shape).astype(np.uint16), target, (1, 1, 1))
    scales = run_scales([good, bad])
    pooled = np.concatenate([p.ravel() for c in (good, bad) for p in c.panels["difference"]])
    assert scales["difference"] == pytest.approx(np.percentile(pooled, 99))
    brightness = {}
    for name, picture in (("good", good), ("bad", bad)):
        path = render_case_png(tmp_path / f"{name}.png", picture, scales)
        with Image.open(path) as image:
            width, height = image.size
            column = np.asarray(image.convert("L"))[int(0.15 * height):int(0.75 * height), int(0.77 * width):]
        brightness[name] = column.mean()
    assert brightness["bad"] > brightness["good"] + 30


def test_uncertainty_in_normalised_units(rng):
    from fusecare.pipeline import UNCERTAINTY_UNIT

    assert report.UNCERTAINTY_UNIT == UNCERTAINTY_UNIT  # the unit inference.py writes
    volume = rng.integers(100, 4000, (8, 16, 16)).astype(np.uint16)
    uncertainty = np.full(volume.shape, 500, np.uint16)
    picture = case_picture(volume, volume, volume, (1.0, 1.0, 1.0), uncertainty=uncertainty)
    assert np.allclose(picture.panels["uncertainty"][0], 0.05)
    assert run_scales([picture])["uncertainty"] == pytest.approx(0.05)


def test_stored_projections_are_display_sized(rng, monkeypatch):
    monkeypatch.setattr(report, "STORED_MAX", 8)
    volume = rng.integers(0, 4000, (6, 20, 33)).astype(np.uint16)
    picture = case_picture(volume, volume, volume, (1.0, 1.0, 1.0))
    xy, xz = picture.panels["target"]
    norm = PercentileNorm.fit(volume)
    assert xy.shape == (7, 7) and xz.shape == (6, 7)
    assert xy.max() == pytest.approx(norm.forward(volume).max())  # block maximum keeps the brightest voxel
    assert picture.extent_um == (6.0, 20.0, 33.0)


def test_index_html_has_leaderboard_cases_and_pictures(tmp_path):
    runs = results()
    runs[0].png = tmp_path / "png" / "a.png"
    page = write_html(runs, summarize(runs), tmp_path / "index.html")
    text = page.read_text()
    for key in LEADERBOARD:
        assert key in text
    for result in runs:
        assert result.case in text
    assert '<img src="png/a.png"' in text and 'href="#a"' in text
    assert 'class="sortable"' in text and "<script>" in text
    assert "failed: no prediction in /p" in text
    assert 'data-v="0.1"' in text  # numbers sort as numbers
