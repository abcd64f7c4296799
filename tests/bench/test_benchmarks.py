"""The benchmarks' own parts (``bench/``): how they name faces, read an estimate and score a view.

The benchmarks themselves need ``../shared/data`` and minutes; these parts run on synthetic
specimens and phantoms, so a change that mislabels a row or scores the wrong field fails here.
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
    for seed in range(8):
        axis, from_start = quality.entry_face(seed)
        assert quality.face_name(seed) == f"{axis} {'start' if from_start else 'end'}"


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
    assert losses["dimmed.tif"]["named"] == "x start" and losses["dimmed.tif"]["rate"] > 0.02
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
    assert quality.summary_header().index("gaussian_corrected") + len("gaussian_corrected") == len(lines[0])
    result["rows"] = [dict(r, gaussian=-0.1) for r in rows]
    quality.summarise(result)
    assert result["heldout"]["ratio"] is None  # no ratio to a baseline <= 0
