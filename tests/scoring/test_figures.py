"""fusecare.scoring.figures: projections, the PNG of a case, shared scales over a run."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fusecare.normalize import PercentileNorm
from fusecare.scoring import figures
from fusecare.scoring.figures import case_picture, png_size, projections, render_case_png, run_scales, write_case_png


def test_projections_match_numpy(rng, monkeypatch):
    monkeypatch.setattr(figures, "_SLAB_VOXELS", 50)  # several slabs
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
    monkeypatch.setattr(figures, "_SLAB_VOXELS", 200)  # several slabs

    class Counting(np.ndarray):
        planes = 0

        def __getitem__(self, key):
            if isinstance(key, slice):
                Counting.planes += len(range(*key.indices(self.shape[0])))
            return np.asarray(self).__getitem__(key)

    volumes = [rng.integers(0, 4000, (9, 16, 16)).astype(np.uint16).view(Counting) for _ in range(3)]
    norms = dict(zip(figures.PANEL_ROLES, (PercentileNorm.fit(np.asarray(v)) for v in volumes)))
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


def test_title_names_case_channel_and_scores(rng):
    volume = rng.integers(100, 4000, (8, 16, 16)).astype(np.uint16)
    picture = case_picture(volume, volume, volume, (1.0, 1.0, 1.0), case="image_3.tif", channel="nucleus")
    picture.scores.update(n_ssim=0.4321, n_iou=-0.05)
    assert figures._title(picture) == "image_3.tif   |   nucleus   |   N-SSIM +0.432   |   N-IoU -0.050"
    assert figures.FONT_PT * figures.DPI / 72 >= 12  # the smallest text is at least 12 px


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
    from fusecare.constants import UNCERTAINTY_UNIT

    assert figures.UNCERTAINTY_UNIT == UNCERTAINTY_UNIT  # the unit inference.py writes
    volume = rng.integers(100, 4000, (8, 16, 16)).astype(np.uint16)
    uncertainty = np.full(volume.shape, 500, np.uint16)
    picture = case_picture(volume, volume, volume, (1.0, 1.0, 1.0), uncertainty=uncertainty)
    assert np.allclose(picture.panels["uncertainty"][0], 0.05)
    assert run_scales([picture])["uncertainty"] == pytest.approx(0.05)


def test_stored_projections_are_display_sized(rng, monkeypatch):
    monkeypatch.setattr(figures, "STORED_MAX", 8)
    volume = rng.integers(0, 4000, (6, 20, 33)).astype(np.uint16)
    picture = case_picture(volume, volume, volume, (1.0, 1.0, 1.0))
    xy, xz = picture.panels["target"]
    norm = PercentileNorm.fit(volume)
    assert xy.shape == (7, 7) and xz.shape == (6, 7)
    assert xy.max() == pytest.approx(norm.forward(volume).max())  # block maximum keeps the brightest voxel
    assert picture.extent_um == (6.0, 20.0, 33.0)
