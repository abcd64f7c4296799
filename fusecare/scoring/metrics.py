"""SSIM and N-SSIM as the Fuse My Cells leaderboard scores them, in bounded memory.

``skimage.metrics.structural_similarity`` holds over a dozen float copies of the volume at its
peak (~120 GB in float64 for a 1.1 G-voxel challenge pair) and takes minutes per case. This
module computes the same number (to ~1e-8) tile by tile. Each tile of output voxels reads its
input voxels plus a halo of the filter radius (mirrored at the true volume ends exactly like
``scipy.ndimage``'s ``mode='reflect'``), converts only that tile to float, filters it with
separable "valid" window sums in torch (tiles on parallel threads, or CUDA), and adds the SSIM
map's sum over skimage's cropped region to a float64 total. Memory is O(tile), whatever the
volume's size.

The defaults reproduce ``structural_similarity(reference, x, data_range=1)``: K1=0.01, K2=0.03,
7-voxel uniform window, sample covariance, ``(win_size - 1) // 2`` voxels cropped from every
border before the mean. See the challenge contract, ``../shared/docs/fmc_contract.md`` beside
the repository, section "Metric".
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fusecare.device import resolve_device
from fusecare.errors import InputError
from fusecare.io import Volume
from fusecare.normalize import PercentileNorm

log = logging.getLogger(__name__)

K1 = 0.01
K2 = 0.03
GAUSSIAN_TRUNCATE = 3.5
"""skimage's truncation for ``gaussian_weights=True`` (an 11-tap filter at sigma 1.5)."""

_TILE_VOXELS = 1 << 20
"""Input voxels per CPU tile (~40 MB of float32 work arrays); tests shrink it to force tiling."""
_TILE_VOXELS_CUDA = 1 << 25
_MAX_CPU_WORKERS = 4
_MIN_SLAB = 16
"""Output planes per tile when the caller gives no slab: the z halo is re-read per tile."""
_SLAB_BYTES = 1 << 28
"""Raw bytes of one read slab (all volumes, halo included); two are held at a time."""

Window = Literal["uniform", "gaussian"]
Transform = Callable[[np.ndarray], np.ndarray]
Ranges = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class _Axis:
    """How one axis is filtered: 1-D kernel (None = uniform of ``size``) and border crop."""

    size: int
    crop: int
    weights: tuple[float, ...] | None = None

    @property
    def radius(self) -> int:
        return self.size // 2


@dataclass(frozen=True)
class _Spec:
    axes: tuple[_Axis, _Axis, _Axis]
    c1: float
    c2: float
    cov_norm: float
    scale: float
    """Multiplier turning window sums into means (1 for normalised Gaussian weights)."""


@dataclass(frozen=True)
class SsimScores:
    """SSIM of the input and of the prediction against the target, and the resulting N-SSIM."""

    ssim_input: float
    ssim_pred: float
    n_ssim: float


def _gaussian_weights(sigma: float) -> tuple[float, ...]:
    """``scipy.ndimage._gaussian_kernel1d`` at skimage's truncate: the weights agree bit for bit."""
    radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    return tuple(float(v) for v in phi / phi.sum())


def _make_spec(
    *, window: Window = "uniform", win_size: int | None = None, sigma: float = 1.5,
    per_slice: bool = False, data_range: float = 1.0,
) -> _Spec:
    """Translate skimage's options into per-axis kernels, crops and constants."""
    ndim = 2 if per_slice else 3
    if window == "uniform":
        win = 7 if win_size is None else win_size
        plane = _Axis(win, (win - 1) // 2)
        cov_norm = win**ndim / (win**ndim - 1)  # skimage's default use_sample_covariance=True
        scale = 1.0 / win**ndim
    elif window == "gaussian":
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        weights = _gaussian_weights(sigma)
        win = len(weights) if win_size is None else win_size
        plane = _Axis(len(weights), (win - 1) // 2, weights)
        cov_norm, scale = 1.0, 1.0  # Wang et al. 2004: population covariance
    else:
        raise ValueError(f"window must be 'uniform' or 'gaussian', got {window!r}")
    if win < 3 or win % 2 == 0:
        raise ValueError(f"win_size must be odd and >= 3, got {win}")
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    z_axis = _Axis(1, 0) if per_slice else plane
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    return _Spec((z_axis, plane, plane), c1, c2, cov_norm, scale)


def _check_volumes(a: np.ndarray, b: np.ndarray, spec: _Spec) -> None:
    if a.ndim != 3 or a.shape != b.shape:
        raise InputError(f"SSIM needs two 3-D volumes of one shape, got {a.shape} and {b.shape}")
    win = 2 * spec.axes[1].crop + 1
    too_small = [n for n, ax in zip(a.shape, spec.axes) if ax.size > 1 and n < win]
    if too_small:
        raise InputError(f"volume {a.shape} is smaller than the {win}-voxel SSIM window")


def _reflect(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices mirrored like scipy.ndimage's 'reflect' (d c b a | a b c d | d c b a)."""
    i = np.mod(idx, 2 * n)
    return np.where(i >= n, 2 * n - 1 - i, i)


def _axis_index(start: int, stop: int, n: int) -> slice | np.ndarray:
    """A slice when [start, stop) lies inside the axis (no copy), else mirrored indices."""
    if start >= 0 and stop <= n:
        return slice(start, stop)
    return _reflect(np.arange(start, stop), n)


def _read(volume: np.ndarray, ranges: Ranges, axes: tuple[_Axis, ...]) -> np.ndarray:
    """The raw input block needed for the output block ``ranges``, halo included."""
    block = volume
    for dim, ((start, stop), ax) in enumerate(zip(ranges, axes)):
        index = _axis_index(start - ax.radius, stop + ax.radius, volume.shape[dim])
        block = block[(slice(None),) * dim + (index,)]
    return block


def _tiles(shape: tuple[int, ...], spec: _Spec, z_range: tuple[int, int], slab: int | None,
           budget: int) -> Iterator[Ranges]:
    """Output blocks ((z0, z1), (y0, y1), (x0, x1)) covering planes ``z_range`` of a block of
    ``shape`` (cropped in y and x).

    ``slab`` output planes per block (default: fill ``budget`` input voxels, at least
    ``_MIN_SLAB``); rows are split too when a slab of whole planes would exceed ``budget``.
    """
    (az, ay, ax) = spec.axes
    x_range = (ax.crop, shape[2] - ax.crop)
    x_in = x_range[1] - x_range[0] + 2 * ax.radius
    n_z = z_range[1] - z_range[0]
    plane_in = (shape[1] - 2 * ay.crop + 2 * ay.radius) * x_in
    thick = slab if slab is not None else max(_MIN_SLAB, budget // plane_in - 2 * az.radius)
    thick = max(1, min(thick, n_z))
    rows = max(1, budget // ((thick + 2 * az.radius) * x_in) - 2 * ay.radius)
    for z0 in range(z_range[0], z_range[1], thick):
        z1 = min(z0 + thick, z_range[1])
        for y0 in range(ay.crop, shape[1] - ay.crop, rows):
            yield (z0, z1), (y0, min(y0 + rows, shape[1] - ay.crop)), x_range


def _read_slabs(volumes: Sequence[Volume], spec: _Spec, planes: int
                ) -> Iterator[tuple[tuple[int, int], list[np.ndarray]]]:
    """((z0, z1), blocks): every volume's planes for output planes [z0, z1) plus the z halo.

    Blocks start at ``max(0, z0 - radius)``; where the halo would leave the volume the block
    stops at the volume's end, so mirroring at the block's end is mirroring at the volume's.
    A lazily read volume is read here, one slab at a time; an in-memory one is only viewed.
    """
    az = spec.axes[0]
    n_z = volumes[0].shape[0]
    for z0 in range(az.crop, n_z - az.crop, planes):
        z1 = min(z0 + planes, n_z - az.crop)
        s0, s1 = max(0, z0 - az.radius), min(n_z, z1 + az.radius)
        yield (z0 - s0, z1 - s0), [np.asarray(v[s0:s1]) for v in volumes]


def _window_filter(t: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """Separable 'valid' filtering; z first, so later passes only see output planes."""
    for dim, ax in enumerate(spec.axes):
        if ax.size == 1:
            continue
        if ax.weights is None:
            t = t.unfold(dim, ax.size, 1).sum(-1)
        else:
            n = t.shape[dim] - ax.size + 1
            out = t.narrow(dim, 0, n) * ax.weights[0]
            for i, w in enumerate(ax.weights[1:], start=1):
                out.add_(t.narrow(dim, i, n), alpha=w)
            t = out
    return t.mul_(spec.scale) if spec.scale != 1.0 else t


def _ssim_map_sum(
    mx: torch.Tensor, my: torch.Tensor, fq: torch.Tensor, fp: torch.Tensor,
    shifts: tuple[float, float], spec: _Spec,
) -> float:
    """Sum of the SSIM map from window means of x', y', x'^2 + y'^2 and x'y' (all overwritten).

    x' and y' are x and y minus their tile means (``shifts``): (co)variances do not change and
    lose far less to float32 cancellation (1e-9 instead of 1e-5 off float64 at an offset of 10).
    Written so that x == y gives exactly 1 per voxel (every term doubles exactly), which makes
    the N-SSIM of the target itself exactly 1.
    """
    t = mx * my
    fp.sub_(t).mul_(2.0 * spec.cov_norm).add_(spec.c2)  # A2 = 2 vxy + C2
    torch.mul(mx, mx, out=t)
    t.add_(my * my)
    fq.sub_(t).mul_(spec.cov_norm).add_(spec.c2)  # B2 = vx + vy + C2
    mx.add_(shifts[0])
    my.add_(shifts[1])
    torch.mul(mx, my, out=t)
    t.mul_(2.0).add_(spec.c1)  # A1 = 2 ux uy + C1
    mx.mul_(mx)
    my.mul_(my)
    mx.add_(my).add_(spec.c1)  # B1 = ux^2 + uy^2 + C1
    t.mul_(fp)
    mx.mul_(fq)
    return float(t.div_(mx).sum(dtype=torch.float64))


def _tile_sum(xa: np.ndarray, ya: np.ndarray, spec: _Spec, device: torch.device) -> float:
    """SSIM-map sum over one tile; ``xa`` and ``ya`` are fresh float arrays, used as scratch."""
    with torch.inference_mode():
        x = torch.from_numpy(xa).to(device)
        y = torch.from_numpy(ya).to(device)
        shifts = (float(x.mean()), float(y.mean()))
        x.sub_(shifts[0])
        y.sub_(shifts[1])
        mx = _window_filter(x, spec)
        my = _window_filter(y, spec)
        fp = _window_filter(x * y, spec)
        x.mul_(x)
        y.mul_(y)
        fq = _window_filter(x.add_(y), spec)
        del x, y
        return _ssim_map_sum(mx, my, fq, fp, shifts, spec)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> CPU; a name as ``device.resolve_device`` reads it ('auto' -> CUDA when available)."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    return resolve_device(device)


@contextmanager
def _one_torch_thread(device: torch.device) -> Iterator[None]:
    """Parallelise over tiles, not inside ops: torch's intra-op threads stall (10x slower here)
    as soon as another process competes for the cores. Process-wide while the SSIM runs."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _workers(device: torch.device) -> int:
    if device.type != "cpu":
        return 2  # overlap the CPU-side read and normalisation with the GPU
    return max(1, min(_MAX_CPU_WORKERS, len(os.sched_getaffinity(0))))


def _slab_planes(volumes: Sequence[Volume], spec: _Spec, slab: int | None) -> int:
    """Output planes per read slab: ``_SLAB_BYTES`` of raw planes over all volumes, halo included."""
    plane_bytes = math.prod(volumes[0].shape[1:]) * sum(v.dtype.itemsize for v in volumes)
    planes = max(_MIN_SLAB, _SLAB_BYTES // max(1, plane_bytes) - 2 * spec.axes[0].radius)
    return planes if slab is None else max(slab, planes // slab * slab)


def _mean_ssims(
    reference: Volume, others: Sequence[Volume], t_ref: Transform, t_others: Sequence[Transform],
    spec: _Spec, slab: int | None, device: str | torch.device | None,
) -> list[float]:
    """Mean SSIM of each of ``others`` against ``reference`` over the cropped region.

    One pass over z-slabs: each slab of every volume is read once (the next one is read while
    this one is scored), then scored tile by tile. ``t_ref``/``t_others`` turn a raw block into
    fresh float.
    """
    for other in others:
        _check_volumes(reference, other, spec)
    if slab is not None and slab < 1:
        raise ValueError(f"slab must be >= 1, got {slab}")
    dev = _resolve_device(device)
    budget = _TILE_VOXELS_CUDA if dev.type == "cuda" else _TILE_VOXELS
    volumes = [reference, *others]
    sums: list[list[float]] = [[] for _ in others]
    n_tiles = 0
    slabs = _read_slabs(volumes, spec, _slab_planes(volumes, spec, slab))

    def tile_sums(blocks: list[np.ndarray], ranges: Ranges) -> list[float]:
        return [_tile_sum(t_ref(_read(blocks[0], ranges, spec.axes)), t(_read(block, ranges, spec.axes)), spec, dev)
                for block, t in zip(blocks[1:], t_others)]

    with _one_torch_thread(dev), ThreadPoolExecutor(_workers(dev)) as pool, ThreadPoolExecutor(1) as reader:
        pending = reader.submit(next, slabs, None)
        while (item := pending.result()) is not None:
            pending = reader.submit(next, slabs, None)
            z_range, blocks = item
            tiles = list(_tiles(blocks[0].shape, spec, z_range, slab, budget))
            n_tiles += len(tiles)
            for parts in pool.map(lambda r: tile_sums(blocks, r), tiles):  # noqa: B023 - consumed here
                for acc, part in zip(sums, parts):
                    acc.append(part)
            del item, blocks
    count = math.prod(n - 2 * ax.crop for n, ax in zip(reference.shape, spec.axes))
    log.debug("ssim of %s against %d volume(s): %d tiles on %s", reference.shape, len(others), n_tiles, dev)
    return [math.fsum(acc) / count for acc in sums]


def _to_float(dtype: np.dtype) -> Transform:
    return lambda block: np.array(block, dtype=dtype, copy=True)


def ssim(
    reference: np.ndarray,
    x: np.ndarray,
    *,
    data_range: float = 1.0,
    window: Window = "uniform",
    win_size: int | None = None,
    sigma: float = 1.5,
    per_slice: bool = False,
    slab: int | None = None,
    device: str | torch.device | None = None,
) -> float:
    """Mean SSIM of two 3-D volumes, equal to scikit-image's without its whole-volume copies.

    ``window='uniform'`` matches ``structural_similarity(reference, x, data_range=...,
    win_size=...)`` (default 7); ``'gaussian'`` matches ``gaussian_weights=True, sigma=sigma,
    use_sample_covariance=False`` (default win_size, used for the crop, is skimage's
    ``2 * int(3.5 * sigma + 0.5) + 1``). ``per_slice`` averages the 2-D SSIM of every z-slice.
    ``slab`` sets the output planes per tile (default: from a memory budget). ``device``: None
    is torch on CPU (tiles on parallel threads; torch's intra-op threads are set to 1 during the
    call), 'auto' picks CUDA when available. Inputs of any real dtype are converted a tile at a
    time to float32 (float64 if either input is float64, as skimage does).
    """
    spec = _make_spec(window=window, win_size=win_size, sigma=sigma, per_slice=per_slice,
                      data_range=data_range)
    dtype = np.dtype(np.float64 if np.float64 in (reference.dtype, x.dtype) else np.float32)
    return _mean_ssims(reference, [x], _to_float(dtype), [_to_float(dtype)], spec, slab, device)[0]


def _fmc_ssims(
    target: Volume,
    target_norm: PercentileNorm,
    xs: Sequence[Volume],
    *,
    x_norms: Sequence[PercentileNorm | None] | None = None,
    slab: int | None = None,
    device: str | torch.device | None = None,
    **window_options: Any,
) -> list[float]:
    """``fmc_ssim`` of each of ``xs``, in one pass over the target (its norm already fitted).

    ``x_norms``: the fitted norms of ``xs`` where known (None entries are fitted here).
    ``window_options`` are ``ssim``'s window, win_size, sigma, per_slice and data_range.
    """
    spec = _make_spec(**window_options)
    x_norms = [n if n is not None else PercentileNorm.fit(x) for x, n in zip(xs, x_norms or [None] * len(xs))]
    if target_norm.is_degenerate or any(n.is_degenerate for n in x_norms):
        log.warning("constant volume in SSIM (p2 == p99.8): normalised with scale 1")
    return _mean_ssims(target, xs, target_norm.forward, [n.forward for n in x_norms], spec, slab, device)


def fmc_ssim(target: Volume, x: Volume, *, target_norm: PercentileNorm | None = None,
             **ssim_kwargs) -> float:
    """SSIM after the challenge's normalisation of each volume (percentiles 2 / 99.8, no clip).

    Each tile is normalised as it is read, so no float copy of either volume is made; either
    volume may be an ``io.PagedVolume`` read slab by slab.
    ``target_norm``: the target's fitted normalisation, when scoring many volumes against it.
    ``ssim_kwargs`` are those of ``ssim``.
    """
    norm = target_norm if target_norm is not None else PercentileNorm.fit(target)
    return _fmc_ssims(target, norm, [x], **ssim_kwargs)[0]


def n_ssim(ssim_pred: float, ssim_input: float) -> float:
    """``(ssim_pred - ssim_input) / (1 - ssim_input)``: 0 = as good as the input, 1 = perfect.

    When the input is already perfect (``ssim_input == 1``) there is nothing to gain: a
    prediction scoring the same gets 0.0, anything worse gets ``-inf``.
    """
    if ssim_input == 1.0:
        return 0.0 if ssim_pred == ssim_input else -math.inf
    return (ssim_pred - ssim_input) / (1.0 - ssim_input)


def score_ssim(target: Volume, pred: Volume, input: Volume, *,
               norms: Mapping[str, PercentileNorm] | None = None, **ssim_kwargs) -> SsimScores:
    """The input's and the prediction's ``fmc_ssim`` against ``target``, and their N-SSIM.

    Both are scored in one pass over the target, tile by tile with the same code, so a
    prediction that copies the input scores exactly 0. ``norms``: fitted normalisations by role
    ("target", "pred", "input") where the caller has them, so no volume is histogrammed twice.
    """
    norms = norms or {}
    target_norm = norms.get("target") or PercentileNorm.fit(target)
    s_input, s_pred = _fmc_ssims(target, target_norm, [input, pred],
                                 x_norms=[norms.get("input"), norms.get("pred")], **ssim_kwargs)
    return SsimScores(ssim_input=s_input, ssim_pred=s_pred, n_ssim=n_ssim(s_pred, s_input))
