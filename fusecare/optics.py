"""Light in a specimen, shared by the single-view simulator and the attenuation correction.

Both model the same physics (``fusecare.training.simulate`` renders Beer-Lambert attenuation along
specimen path lengths; ``fusecare.restoration.attenuation`` estimates it back from a single view),
so both use these helpers: smoothing with a physical sigma, linear resampling of a coarse grid,
and the specimen path length light travels from a face of the volume.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

VoxelSizeZYX = tuple[float, float, float]


def sigma_voxels(
    sigma_um: float | tuple[float, float, float], voxel_size_zyx: VoxelSizeZYX
) -> tuple[float, ...]:
    """A physical sigma (um, one or per axis) in voxels of each axis."""
    s = (sigma_um,) * 3 if np.isscalar(sigma_um) else sigma_um
    return tuple(float(a) / float(v) for a, v in zip(s, voxel_size_zyx))  # type: ignore[arg-type]


def resample_linear(coarse: np.ndarray, coords: list[np.ndarray]) -> np.ndarray:
    """Separable linear interpolation of ``coarse`` at per-axis coordinates (edge-clamped)."""
    out = coarse
    for axis, c in enumerate(coords):
        n = out.shape[axis]
        c = np.clip(np.asarray(c, dtype=np.float32), 0, n - 1)
        i0 = np.minimum(np.floor(c).astype(np.intp), max(n - 2, 0))
        i1 = np.minimum(i0 + 1, n - 1)
        shape = [1] * out.ndim
        shape[axis] = -1
        f = (c - i0).reshape(shape)
        out = np.take(out, i0, axis=axis) * (1 - f) + np.take(out, i1, axis=axis) * f
    return out.astype(np.float32, copy=False)


def smooth_um(volume: np.ndarray, sigma_um: float, voxel_size_zyx: VoxelSizeZYX) -> np.ndarray:
    """Gaussian smoothing with a physical sigma; wide kernels run on a block-averaged grid.

    A sigma of tens of voxels would make a direct convolution slow, and the density map it
    feeds is smooth anyway, so axes whose sigma exceeds 4 voxels are reduced first.
    """
    sig = sigma_voxels(sigma_um, voxel_size_zyx)
    factors = tuple(max(1, int(s // 2)) if s > 4 else 1 for s in sig)
    if all(f == 1 for f in factors):
        return ndimage.gaussian_filter(volume.astype(np.float32, copy=False), sig, mode="nearest")
    small_shape = tuple(-(-n // f) for n, f in zip(volume.shape, factors))
    pad = [(0, s * f - n) for s, f, n in zip(small_shape, factors, volume.shape)]
    padded = np.pad(volume.astype(np.float32, copy=False), pad, mode="edge")
    blocks = padded.reshape(
        small_shape[0], factors[0], small_shape[1], factors[1], small_shape[2], factors[2]
    ).mean(axis=(1, 3, 5))
    blurred = ndimage.gaussian_filter(blocks, [s / f for s, f in zip(sig, factors)], mode="nearest")
    # Sample the coarse grid back at the fine voxel centres (linear interpolation).
    coords = [(np.arange(n) + 0.5) / f - 0.5 for n, f in zip(volume.shape, factors)]
    return resample_linear(blurred, coords)


def path_length_um(density: np.ndarray, axis: int, from_start: bool, step_um: float) -> np.ndarray:
    """Specimen path length (um) light travels from the entry face to each voxel's centre."""
    d = density if from_start else np.flip(density, axis=axis)
    path = np.cumsum(d, axis=axis, dtype=np.float32)
    path -= np.float32(0.5) * d  # to the voxel centre, not its far face
    path *= np.float32(step_um)
    return path if from_start else np.flip(path, axis=axis)
