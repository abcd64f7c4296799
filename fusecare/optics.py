"""Light in a specimen, shared by the single-view simulator and the attenuation correction.

Both model the same physics (``fusecare.training.simulate`` renders Beer-Lambert attenuation along
specimen path lengths; ``fusecare.restoration.attenuation`` estimates it back from a single view),
so both use these helpers: smoothing with a physical sigma, block means and linear resampling of
a coarse grid,
and the specimen path length light travels from a face of the volume.
"""

from __future__ import annotations

from collections.abc import Callable

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
        f = (c - i0.astype(np.float32)).reshape(shape)  # float32: no float64 temporaries
        out = np.take(out, i0, axis=axis) * (1 - f) + np.take(out, i1, axis=axis) * f
    return out.astype(np.float32, copy=False)


def block_mean(volume: np.ndarray, factors: tuple[int, int, int],
               transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Means of ``factors``-sized blocks (edge blocks padded with their last plane), read a slab
    of ``factors[0]`` planes at a time through ``transform`` (e.g. normalisation) as float32."""
    fz, fy, fx = factors
    shape = tuple(-(-n // f) for n, f in zip(volume.shape, factors))
    out = np.empty(shape, dtype=np.float32)
    for i in range(shape[0]):
        slab = np.asarray(volume[i * fz:(i + 1) * fz])
        slab = transform(slab) if transform is not None else slab.astype(np.float32)
        pad = [(0, fz - slab.shape[0]), (0, -slab.shape[1] % fy), (0, -slab.shape[2] % fx)]
        if any(p[1] for p in pad):
            slab = np.pad(slab, pad, mode="edge")
        out[i] = slab.reshape(fz, shape[1], fy, shape[2], fx).mean(axis=(0, 2, 4))
    return out


def smooth_um(volume: np.ndarray, sigma_um: float, voxel_size_zyx: VoxelSizeZYX) -> np.ndarray:
    """Gaussian smoothing with a physical sigma; wide kernels run on a block-averaged grid.

    A sigma of tens of voxels would make a direct convolution slow, and the density map it
    feeds is smooth anyway, so axes whose sigma exceeds 4 voxels are reduced first.
    """
    sig = sigma_voxels(sigma_um, voxel_size_zyx)
    factors = tuple(max(1, int(s // 2)) if s > 4 else 1 for s in sig)
    if all(f == 1 for f in factors):
        return ndimage.gaussian_filter(volume.astype(np.float32, copy=False), sig, mode="nearest")
    blocks = block_mean(volume, factors)  # type: ignore[arg-type]
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
