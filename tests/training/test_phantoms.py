"""Synthetic clean content: determinism, value range, and that the structure is what it claims."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fusecare.training.phantoms import membrane_phantom, nuclei_phantom, smooth_noise

SHAPE = (32, 128, 128)
MAKERS = [nuclei_phantom, membrane_phantom]


@pytest.mark.parametrize("make", MAKERS)
def test_shape_dtype_range(make) -> None:
    vol = make(SHAPE, rng=np.random.default_rng(0))
    assert vol.shape == SHAPE and vol.dtype == np.float32
    assert np.isfinite(vol).all()
    assert vol.min() >= 0.0 and 0.5 < np.percentile(vol, 99.9) < 1.5
    assert np.percentile(vol, 10) < 0.15  # dim background or cell interior exists


@pytest.mark.parametrize("make", MAKERS)
def test_deterministic_per_seed(make) -> None:
    a = make(SHAPE, rng=np.random.default_rng(3))
    b = make(SHAPE, rng=np.random.default_rng(3))
    c = make(SHAPE, rng=np.random.default_rng(4))
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("make", MAKERS)
@pytest.mark.parametrize("shape", [(1, 16, 16), (5, 7, 9), (75, 75, 75)])
def test_odd_shapes(make, shape) -> None:
    vol = make(shape, rng=np.random.default_rng(0))
    assert vol.shape == shape and np.isfinite(vol).all()


@pytest.mark.parametrize("make", MAKERS)
def test_rejects_bad_shape(make) -> None:
    with pytest.raises(ValueError, match="3-D"):
        make((16, 16), rng=np.random.default_rng(0))


def test_nuclei_are_separate_bright_blobs() -> None:
    vol = nuclei_phantom(SHAPE, rng=np.random.default_rng(0), fill_fraction=0.15)
    mask = vol > 0.5 * np.percentile(vol, 99)
    labels, n = ndimage.label(mask)
    assert n >= 5
    covered = mask.mean()
    assert 0.03 < covered < 0.4
    # Background is dim and nuclei are much brighter than it.
    assert np.median(vol[~mask]) < 0.2 * np.median(vol[mask])


def test_nuclei_density_follows_fill_fraction() -> None:
    sparse = nuclei_phantom(SHAPE, rng=np.random.default_rng(1), fill_fraction=0.05, background=0.0)
    dense = nuclei_phantom(SHAPE, rng=np.random.default_rng(1), fill_fraction=0.3, background=0.0)
    assert (dense > 0.2).mean() > 2.5 * (sparse > 0.2).mean()


def test_nuclei_size_follows_radius() -> None:
    def mean_size(radius: tuple[float, float]) -> float:
        vol = nuclei_phantom(
            SHAPE, rng=np.random.default_rng(2), radius=radius, fill_fraction=0.1,
            nucleoli=(0, 0), texture=0.0,
        )
        labels, n = ndimage.label(vol > 0.3)
        return float((labels > 0).sum() / max(n, 1))

    assert mean_size((10.0, 12.0)) > 3 * mean_size((4.0, 5.0))


def test_nuclei_have_inner_texture() -> None:
    def make(texture: float, nucleoli: tuple[int, int]) -> np.ndarray:
        return nuclei_phantom(
            SHAPE, rng=np.random.default_rng(5), texture=texture, nucleoli=nucleoli, intensity=(0.8, 0.8)
        )

    plain, rich = make(0.0, (0, 0)), make(0.3, (2, 3))
    inside = ndimage.binary_erosion(plain > 0.6, iterations=2)
    assert inside.sum() > 1000
    assert rich[inside].std() > 3 * plain[inside].std()


def test_membranes_are_thin_walls_around_many_cells() -> None:
    vol = membrane_phantom(SHAPE, rng=np.random.default_rng(0), cell_radius=10.0)
    walls = vol > 0.4
    assert 0.03 < walls.mean() < 0.35  # thin walls, not filled cells
    # Many closed compartments (dim walls included): about volume / cell volume of them.
    cells, _ = ndimage.label(vol < 0.15)
    sizes = np.bincount(cells.ravel())[1:]
    assert (sizes > 100).sum() >= 50
    # Inside the cells it is dim.
    assert np.median(vol[~walls]) < 0.25


def test_membrane_cell_size_follows_radius() -> None:
    def n_cells(radius: float) -> int:
        vol = membrane_phantom(
            SHAPE, rng=np.random.default_rng(1), cell_radius=radius, size_variation=0.0
        )
        cells, _ = ndimage.label(vol < 0.15)
        return int((np.bincount(cells.ravel())[1:] > 50).sum())

    assert n_cells(7.0) > 4 * n_cells(16.0)


def test_membrane_wall_thickness_parameter() -> None:
    thin = membrane_phantom(SHAPE, rng=np.random.default_rng(2), wall_thickness=0.6)
    thick = membrane_phantom(SHAPE, rng=np.random.default_rng(2), wall_thickness=1.8)
    assert (thick > 0.4).mean() > 1.5 * (thin > 0.4).mean()


def test_smooth_noise_is_standardised_and_correlated() -> None:
    field = smooth_noise(SHAPE, np.random.default_rng(0), sigma=4.0, anisotropy=2.0)
    assert field.shape == SHAPE and field.dtype == np.float32
    assert abs(field.mean()) < 1e-3 and field.std() == pytest.approx(1.0, rel=1e-3)
    neighbour_corr = np.corrcoef(field[:, :, :-1].ravel(), field[:, :, 1:].ravel())[0, 1]
    assert neighbour_corr > 0.9
