"""Clean synthetic training content: textured nuclei and Voronoi cell-wall membranes.

Real fused volumes are few and none is reachable here, so these phantoms give the network
varied, fused-quality structure to learn from: the two kinds of stain the challenge scores
(nucleus and membrane). Sizes are in lateral voxels; ``anisotropy`` (Z spacing over lateral
spacing, about 2.5 to 5 in the Fuse My Cells studies) flattens objects along Z as the real
sampling does. Every draw comes from the given ``rng``, so a seed reproduces a phantom.
Values are float32, background near 0.02 and the brightest structure near 1.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from fusecare.optics import resample_linear

Shape = tuple[int, int, int]

PHANTOM_VOXEL_SIZE_ZYX: tuple[float, float, float] = (1.0, 0.4, 0.4)
"""Voxel size (um) the default phantom sizes stand for: pass it to the simulator with them."""

PHANTOM_ANISOTROPY = PHANTOM_VOXEL_SIZE_ZYX[0] / PHANTOM_VOXEL_SIZE_ZYX[1]


def _check_shape(shape: Shape) -> Shape:
    shape = tuple(int(n) for n in shape)  # type: ignore[assignment]
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"expected a positive 3-D ZYX shape, got {shape}")
    return shape


def _draw(rng: np.random.Generator, value: float | tuple[float, float]) -> float:
    """A fixed number, or a uniform draw from a ``(low, high)`` range."""
    if isinstance(value, (tuple, list)):
        return float(rng.uniform(value[0], value[1]))
    return float(value)


def smooth_noise(
    shape: Shape, rng: np.random.Generator, sigma: float, anisotropy: float = 1.0
) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``sigma`` (lateral voxels).

    Built on a coarse grid and interpolated up so that wide correlation lengths stay cheap.
    """
    shape = _check_shape(shape)
    sig = np.array([sigma / anisotropy, sigma, sigma], dtype=float)
    step = np.maximum(1, np.floor(sig / 2)).astype(int)
    coarse_shape = tuple(int(-(-n // s)) + 1 for n, s in zip(shape, step))
    field = ndimage.gaussian_filter(
        rng.standard_normal(coarse_shape).astype(np.float32), np.maximum(sig / step, 0.5), mode="wrap"
    )
    coords = [np.arange(n, dtype=np.float32) / s for n, s in zip(shape, step)]
    field = resample_linear(field, coords)
    field -= field.mean()
    std = float(field.std())
    return (field / std if std > 0 else field).astype(np.float32)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    return q


def _psf_blur(volume: np.ndarray, sigma: float, anisotropy: float) -> np.ndarray:
    """The fused image is still band-limited: a small Gaussian PSF, in lateral voxels."""
    return ndimage.gaussian_filter(volume, (sigma / anisotropy, sigma, sigma), mode="nearest")


def _add_ellipsoid(
    volume: np.ndarray,
    centre: np.ndarray,
    radii: np.ndarray,
    rotation: np.ndarray,
    anisotropy: float,
    value: float,
    *,
    edge: float = 0.8,
    mode: str = "max",
) -> None:
    """Paint a soft-edged rotated ellipsoid (isotropic-voxel units) into a ZYX volume in place.

    ``mode='max'`` draws a bright object over others; ``'multiply'`` scales what is there by
    ``value`` inside the ellipsoid (for darker nucleoli carved into a nucleus).
    """
    reach = float(radii.max()) + 2 * edge
    lo = np.floor((centre - reach) / [anisotropy, 1, 1]).astype(int)
    hi = np.ceil((centre + reach) / [anisotropy, 1, 1]).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, volume.shape)
    if np.any(hi <= lo):
        return
    zz, yy, xx = np.meshgrid(
        *(np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)), indexing="ij", sparse=True
    )
    dz, dy, dx = zz * anisotropy - centre[0], yy - centre[1], xx - centre[2]
    # Coordinates in the ellipsoid's frame, scaled by its radii.
    r = rotation.T.astype(np.float32)
    u = (r[0, 0] * dz + r[0, 1] * dy + r[0, 2] * dx) / radii[0]
    v = (r[1, 0] * dz + r[1, 1] * dy + r[1, 2] * dx) / radii[1]
    w = (r[2, 0] * dz + r[2, 1] * dy + r[2, 2] * dx) / radii[2]
    dist = np.sqrt(u * u + v * v + w * w)
    # Signed distance to the surface approximated in voxels along the mean radius.
    inside = 1.0 / (1.0 + np.exp((dist - 1.0) * float(radii.mean()) / edge))
    region = volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    if mode == "max":
        np.maximum(region, (value * inside).astype(np.float32), out=region)
    else:
        region *= (1.0 - (1.0 - value) * inside).astype(np.float32)


def nuclei_phantom(
    shape: Shape,
    *,
    rng: np.random.Generator,
    radius: tuple[float, float] = (5.0, 12.0),
    elongation: tuple[float, float] = (1.0, 1.6),
    fill_fraction: float | tuple[float, float] = (0.08, 0.3),
    intensity: tuple[float, float] = (0.35, 1.0),
    texture: float | tuple[float, float] = (0.1, 0.3),
    nucleoli: tuple[int, int] = (0, 3),
    background: float | tuple[float, float] = (0.01, 0.05),
    anisotropy: float = PHANTOM_ANISOTROPY,
    psf_sigma: float = 0.8,
) -> np.ndarray:
    """Textured, randomly oriented ellipsoid nuclei of varied size, density and brightness.

    ``radius``: mean semi-axis range (lateral voxels); ``elongation``: ratio between the
    longest and shortest semi-axis; ``fill_fraction``: share of the volume the nuclei cover
    (a range draws a density per phantom); ``intensity``: brightness range per nucleus;
    ``texture``: relative amplitude of the chromatin texture; ``nucleoli``: dim inclusions per
    nucleus; ``background``: diffuse level outside nuclei; ``anisotropy``: Z over lateral spacing;
    ``psf_sigma``: final optical blur (lateral voxels).
    """
    shape = _check_shape(shape)
    physical = np.array([shape[0] * anisotropy, shape[1], shape[2]], dtype=float)
    out = np.zeros(shape, dtype=np.float32)
    fill = _draw(rng, fill_fraction)
    mean_r = 0.5 * (radius[0] + radius[1])
    n_nuclei = max(1, int(round(fill * physical.prod() / (4.0 / 3.0 * np.pi * mean_r**3))))
    for _ in range(n_nuclei):
        r = rng.uniform(*radius)
        e = rng.uniform(*elongation)
        radii = r * np.array([e ** (1 / 2), 1.0, e ** (-1 / 2)]) * rng.uniform(0.85, 1.15, 3)
        rotation = _random_rotation(rng)
        centre = rng.uniform(0, 1, 3) * physical
        _add_ellipsoid(out, centre, radii, rotation, anisotropy, rng.uniform(*intensity))
        for _ in range(int(rng.integers(nucleoli[0], nucleoli[1] + 1))):
            offset = rotation @ (rng.uniform(-0.45, 0.45, 3) * radii)
            n_r = np.full(3, r * rng.uniform(0.12, 0.25))
            _add_ellipsoid(
                out, centre + offset, n_r, np.eye(3), anisotropy, rng.uniform(0.35, 0.7), mode="multiply"
            )
    # Chromatin texture: fine and coarse fluctuations multiplying the nuclear stain.
    amp = _draw(rng, texture)
    fine = smooth_noise(shape, rng, 1.0, anisotropy)
    coarse = smooth_noise(shape, rng, 3.0, anisotropy)
    tex = 0.6 * fine + 0.4 * coarse
    out *= np.clip(1.0 + amp * tex, 0.2, None)
    bg = _draw(rng, background)
    out += bg * (1.0 + 0.5 * smooth_noise(shape, rng, 12.0, anisotropy)).clip(0.2, None)
    return _psf_blur(out, psf_sigma, anisotropy).astype(np.float32)


def _voronoi_labels(
    shape: Shape, rng: np.random.Generator, cell_radius: float, size_variation: float, anisotropy: float
) -> np.ndarray:
    """Label map of Voronoi cells around random seeds whose density varies smoothly in space."""
    physical = np.array([shape[0] * anisotropy, shape[1], shape[2]], dtype=float)
    mean_volume = 4.0 / 3.0 * np.pi * cell_radius**3
    n_candidates = max(2, int(round(3 * physical.prod() / mean_volume)))
    pts = rng.uniform(0, 1, (n_candidates, 3)) * physical
    # Thin candidates by a smooth log-normal density: regions of large and of small cells.
    field = smooth_noise(shape, rng, 4.0 * cell_radius, anisotropy)
    idx = np.minimum((pts / [anisotropy, 1, 1]).astype(int), np.array(shape) - 1)
    density = np.exp(size_variation * field[idx[:, 0], idx[:, 1], idx[:, 2]])
    keep = rng.uniform(0, 1, n_candidates) < density / density.max()
    pts = pts[keep]
    target = max(2, int(round(physical.prod() / mean_volume)))
    if len(pts) > target:
        pts = pts[rng.permutation(len(pts))[:target]]
    markers = np.zeros(shape, dtype=np.int32)
    vox = np.minimum((pts / [anisotropy, 1, 1]).astype(int), np.array(shape) - 1)
    markers[vox[:, 0], vox[:, 1], vox[:, 2]] = np.arange(1, len(vox) + 1, dtype=np.int32)
    _, nearest = ndimage.distance_transform_edt(
        markers == 0, sampling=(anisotropy, 1.0, 1.0), return_indices=True
    )
    return markers[nearest[0], nearest[1], nearest[2]]


def membrane_phantom(
    shape: Shape,
    *,
    rng: np.random.Generator,
    cell_radius: float | tuple[float, float] = (8.0, 16.0),
    size_variation: float = 0.8,
    wall_thickness: float | tuple[float, float] = (0.6, 1.4),
    intensity_variation: float | tuple[float, float] = (0.3, 0.6),
    cytoplasm: float | tuple[float, float] = (0.03, 0.1),
    background: float | tuple[float, float] = (0.01, 0.04),
    anisotropy: float = PHANTOM_ANISOTROPY,
    psf_sigma: float = 0.8,
) -> np.ndarray:
    """Thin bright walls between Voronoi cells of varied size, with modulated wall intensity.

    ``cell_radius``: mean cell radius (lateral voxels; a range draws one per phantom);
    ``size_variation``: how strongly cell size varies across the volume (log-density amplitude);
    ``wall_thickness``: Gaussian sigma of a wall (lateral voxels); ``intensity_variation``:
    relative amplitude of per-cell and smooth wall brightness modulation; ``cytoplasm``: dim
    level inside cells; ``background``: diffuse level everywhere; ``anisotropy``: Z over
    lateral spacing; ``psf_sigma``: final optical blur (lateral voxels).
    """
    shape = _check_shape(shape)
    labels = _voronoi_labels(shape, rng, _draw(rng, cell_radius), size_variation, anisotropy)
    # One-sided boundary voxels (label differs from the next voxel along any axis).
    wall = np.zeros(shape, dtype=bool)
    for axis in range(3):
        if shape[axis] < 2:
            continue
        diff = np.diff(labels, axis=axis) != 0
        sl = [slice(None)] * 3
        sl[axis] = slice(0, shape[axis] - 1)
        wall[tuple(sl)] |= diff
    dist = ndimage.distance_transform_edt(~wall, sampling=(anisotropy, 1.0, 1.0)).astype(np.float32)
    thickness = _draw(rng, wall_thickness)
    profile = np.exp(-0.5 * (dist / thickness) ** 2)
    # Brightness: a factor per cell (walls average their two cells after the blur) and a
    # smooth field along the walls, as staining and expression vary between cells.
    amp = _draw(rng, intensity_variation)
    per_cell = rng.uniform(1 - amp, 1 + amp, int(labels.max()) + 1).astype(np.float32)
    along_walls = (1.0 + 0.5 * amp * smooth_noise(shape, rng, 6.0, anisotropy)).clip(0.2, None)
    modulation = per_cell[labels] * along_walls
    out = profile * modulation
    cyto_level = _draw(rng, cytoplasm)
    inside = (1.0 + 0.3 * smooth_noise(shape, rng, 2.0, anisotropy)).clip(0, None)
    out += cyto_level * per_cell[labels] * inside
    out += _draw(rng, background)
    out = _psf_blur(out.astype(np.float32), psf_sigma, anisotropy)
    scale = float(np.percentile(out, 99.9))
    return (out / scale if scale > 0 else out).astype(np.float32)
