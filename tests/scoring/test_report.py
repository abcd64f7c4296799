"""fusecare.scoring.report: CSV rows, per-channel summary and leaderboard, table, index.html."""

from __future__ import annotations

import csv
import json
import math

import pytest

from fusecare.scoring.evaluate import ScoredCase
from fusecare.scoring.metrics import SsimScores
from fusecare.scoring.report import (
    CSV_COLUMNS,
    LEADERBOARD,
    format_table,
    result_row,
    summarize,
    write_csv,
    write_html,
    write_json,
)
from fusecare.scoring.segment import IouScores, SegScores


def seg(iou_input: float, iou_pred: float, n: float) -> SegScores:
    fit = IouScores(foreground=iou_input, instance=0.5, n_target=3, n_pred=4, n_matched=3)
    return SegScores(iou_input=iou_input, iou_pred=iou_pred, n_iou=n, mode="foreground", best_iou=1.0,
                     input=fit, pred=fit, diameter=12.0, spacing=0.2, iso_shape=(5, 5, 5), seconds=1.0)


def results() -> list[ScoredCase]:
    def ok(name: str, channel: str, n_ssim: float, n_iou: float | None) -> ScoredCase:
        return ScoredCase(case=name, channel=channel, study=1, ssim=SsimScores(0.5, 0.5 + n_ssim / 2, n_ssim),
                          seg=None if n_iou is None else seg(0.4, 0.5, n_iou), seconds=2.0)

    return [
        ok("a.tif", "nucleus", 0.1, 0.2),
        ok("b.tif", "nucleus", -0.3, 0.4),
        ok("c.tif", "nucleus", 0.5, None),
        ok("d.tif", "membrane", 0.05, -0.1),
        ScoredCase(case="e.tif", channel="membrane", error="no prediction in /p"),
        ScoredCase(case="f.tif", error="f.tif: empty file (0 bytes)"),
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
    worst = ScoredCase(case="x.tif", channel="nucleus", ssim=SsimScores(1.0, 0.9, -math.inf))
    summary = summarize([worst, ScoredCase(case="y.tif", channel="nucleus", ssim=SsimScores(0.5, 0.6, 0.2))])
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


def test_excluded_cases_are_counted_listed_and_left_out_of_the_means():
    kept = ScoredCase(case="y.tif", channel="nucleus", ssim=SsimScores(0.5, 0.6, 0.2))
    swapped = ScoredCase(case="x.tif", channel="nucleus", ssim=SsimScores(1.0, 0.9, -math.inf),
                         excluded="target equals input")
    summary = summarize([swapped, kept])
    assert summary["channels"]["nucleus"]["n_ssim"] == {"mean": 0.2, "median": 0.2, "min": 0.2, "count": 1}
    assert summary["cases"] == {"total": 2, "scored": 2, "failed": 0, "excluded": 1, "counted": 1}
    assert summary["excluded"] == [{"case": "x.tif", "reason": "target equals input"}]
    table = format_table(summary)
    assert "1 scored case(s) excluded from the means, 1 counted" in table
    assert "EXCLUDED x.tif: target equals input" in table
    assert result_row(swapped)["status"] == "excluded" and result_row(swapped)["error"] == "target equals input"


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
