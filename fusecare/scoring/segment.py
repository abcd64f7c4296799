"""Cellpose segmentation for the Fuse My Cells N-IoU score: isotropic grid, models offline, IoU.

The organisers segment the target, the input and the prediction with Cellpose 3 (``nuclei`` for
nucleus volumes, ``cyto3`` for membrane), after making each volume isotropic by linear
interpolation, with the cell diameter estimated on the target, and compare the segmentations by
IoU. What they did not publish is chosen here and documented (the challenge contract,
``../shared/docs/fmc_contract.md`` beside the repository):

* **Grid.** Voxel ``i`` of an axis with voxel size ``s`` has its centre at ``i * s`` (origin at
  the centre of voxel 0, SimpleITK's convention with origin 0). The isotropic grid of spacing
  ``t`` has its samples at ``j * t`` for ``j = 0 .. floor((n - 1) * s / t)``: every sample lies
  inside the input's span of centres, so resampling only interpolates, never extrapolates. The
  same convention maps labels back (``from_isotropic``, nearest neighbour). The default ``t``
  is the smallest voxel size (usually X/Y: only Z is interpolated). IoU is computed on the
  isotropic grid, where all three segmentations live.
* **Diameter** (isotropic voxels). Cellpose's size model is 2-D only (``Cellpose.eval`` with
  ``do_3D`` falls back to the model's mean diameter), so it is run on the few XY planes of the
  isotropic target with the most structure, and the median is kept. The 3-D network also works
  plane by plane (YX, ZY, ZX), so planar cross-sections are the sizes it sees. A model given by
  path has no size model unless ``PATH_size.npy`` exists; then the planes are segmented at the
  model's own scale and cellpose's ``utils.diameters`` of the masks is used, i.e. the second
  step of cellpose's size model without its style regression. Estimates below 5 voxels are
  raised to 5, the floor of cellpose's size model (cellpose upsamples by ``diam_mean /
  diameter`` per axis, so a small estimate costs its cube in time).
* **IoU.** ``foreground`` (default): IoU of the masks ``labels > 0``, the plain reading of
  "IoU of two segmentations", and robust to cellpose splitting or merging cells. ``instance``:
  target and predicted cells matched one to one (``linear_sum_assignment`` maximising total
  IoU); the sum of matched IoUs divided by the number of target cells plus unmatched predicted
  cells, so missed cells and spurious cells both count 0.

Cellpose downloads its weights on first use (from ``CELLPOSE_LOCAL_MODELS_PATH``, default
``~/.cellpose/models``); here a model that is neither cached nor downloadable is one
``WeightsError`` line, never a urllib traceback.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage, sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components

from fusecare.config import Config
from fusecare.constants import IOU_MODES, MEMBRANE, MODELS_ENV, NUCLEUS
from fusecare.errors import ConfigError, InputError, WeightsError

log = logging.getLogger(__name__)

IouMode = Literal["foreground", "instance"]

BUILTIN_MODELS: dict[str, str] = {NUCLEUS: "nuclei", MEMBRANE: "cyto3"}
"""Cellpose model per channel, as the organisers use them."""

_BUILTIN_FILES: dict[str, tuple[str, str]] = {
    "nuclei": ("nucleitorch_0", "size_nucleitorch_0.npy"),
    "cyto3": ("cyto3", "size_cyto3.npy"),
}
"""Weights and size-model file names, as ``cellpose.models.model_path`` names them (3.1.1.3)."""

MIN_DIAMETER = 5.0
"""Smallest diameter estimate kept (voxels), the floor of cellpose's own size model."""

_CONTINGENCY_SLAB = 1 << 24
"""Voxels per slab when counting label overlaps (bounded int64 temporaries)."""
_LARGE_ISO_VOXELS = 512 * 1024**2


# --------------------------------------------------------------------------- isotropic grid


def isotropic_shape(shape: Sequence[int], voxel_size: Sequence[float], spacing: float) -> tuple[int, ...]:
    """Samples per axis of the isotropic grid: ``floor((n - 1) * s / t) + 1`` (centres inside)."""
    if not spacing > 0:
        raise ValueError(f"isotropic spacing must be > 0, got {spacing}")
    # the small epsilon keeps an exact multiple (e.g. 4 * 0.25 / 0.25) from rounding down
    return tuple(int(math.floor((n - 1) * s / spacing + 1e-9)) + 1 for n, s in zip(shape, voxel_size))


def _resample(volume: np.ndarray, src: Sequence[float], dst: Sequence[float],
              shape: Sequence[int], order: int, dtype: np.dtype | type) -> np.ndarray:
    """Sample ``volume`` (voxel centres at ``i * src``) at the centres ``j * dst`` of ``shape``."""
    matrix = np.array([d / s for s, d in zip(src, dst)], dtype=np.float64)
    return ndimage.affine_transform(volume, matrix, offset=0.0, output_shape=tuple(shape),
                                    order=order, mode="nearest", output=dtype, prefilter=False)


def to_isotropic(volume: np.ndarray, voxel_size: Sequence[float], spacing: float | None = None) -> np.ndarray:
    """``volume`` linearly interpolated onto the isotropic grid (float32); see the module doc.

    ``spacing`` defaults to the smallest voxel size; the physical extent between the first and
    last sample shrinks by less than one ``spacing`` per axis.
    """
    if volume.ndim != 3 or len(voxel_size) != 3:
        raise InputError(f"isotropic resampling needs a 3-D volume and 3 voxel sizes, got {volume.shape}")
    spacing = min(voxel_size) if spacing is None else spacing
    shape = isotropic_shape(volume.shape, voxel_size, spacing)
    voxels = math.prod(shape)
    if voxels > _LARGE_ISO_VOXELS:
        log.warning("isotropic volume %s is %.2f G voxels (%.1f GB float32): cellpose will be slow "
                    "and memory hungry; a coarser --iso-spacing keeps it tractable",
                    "x".join(map(str, shape)), voxels / 1e9, voxels * 4 / 1e9)
    if tuple(shape) == tuple(volume.shape) and all(s == spacing for s in voxel_size):
        return np.asarray(volume, dtype=np.float32)
    return _resample(volume, voxel_size, (spacing,) * 3, shape, order=1, dtype=np.float32)


def from_isotropic(labels: np.ndarray, shape: Sequence[int], voxel_size: Sequence[float],
                   spacing: float | None = None) -> np.ndarray:
    """Labels of the isotropic grid back onto the original grid (nearest neighbour, same grid)."""
    spacing = min(voxel_size) if spacing is None else spacing
    return _resample(labels, (spacing,) * 3, voxel_size, shape, order=0, dtype=labels.dtype)


# --------------------------------------------------------------------------- IoU


@dataclass(frozen=True)
class IouScores:
    """Overlap of a segmentation with the target's: both IoUs and the instance counts."""

    foreground: float
    instance: float
    n_target: int
    n_pred: int
    n_matched: int

    def get(self, mode: IouMode) -> float:
        return self.foreground if mode == "foreground" else self.instance


def contingency(target: np.ndarray, labels: np.ndarray) -> sparse.csr_matrix:
    """Voxel counts of every (target label, label) pair, background pairs (0, 0) left out.

    Built slab by slab in a sparse matrix, so memory follows the number of overlapping pairs,
    not the volume.
    """
    if target.shape != labels.shape:
        raise InputError(f"label volumes differ in shape: {target.shape} and {labels.shape}")
    for arr in (target, labels):
        if arr.dtype.kind not in "uib":
            raise TypeError(f"labels must be integers, got {arr.dtype}")
    n_rows = int(target.max(initial=0)) + 1
    n_cols = int(labels.max(initial=0)) + 1
    a, b = target.reshape(-1), labels.reshape(-1)
    total = sparse.csr_matrix((n_rows, n_cols), dtype=np.int64)
    for start in range(0, a.size, _CONTINGENCY_SLAB):
        sa = a[start:start + _CONTINGENCY_SLAB].astype(np.int64)
        sb = b[start:start + _CONTINGENCY_SLAB].astype(np.int64)
        keep = (sa != 0) | (sb != 0)
        sa, sb = sa[keep], sb[keep]
        ones = np.ones(sa.size, dtype=np.int64)
        total = total + sparse.coo_matrix((ones, (sa, sb)), shape=(n_rows, n_cols)).tocsr()
    return total


def _matched_iou(iou: sparse.coo_matrix) -> tuple[float, int]:
    """Maximum total IoU of a one-to-one matching and its number of pairs.

    The matching decomposes over connected components of the overlap graph (non-overlapping
    pairs add nothing), so ``linear_sum_assignment`` only ever sees small blocks.
    """
    if iou.nnz == 0:
        return 0.0, 0
    n_rows, n_cols = iou.shape
    graph = sparse.coo_matrix((np.ones(iou.nnz), (iou.row, iou.col + n_rows)),
                              shape=(n_rows + n_cols,) * 2)
    _, component = connected_components(graph, directed=False)
    edge_comp = component[iou.row]
    edges_per_comp = np.bincount(edge_comp)
    single = edges_per_comp[edge_comp] == 1
    total, matched = float(iou.data[single].sum()), int(single.sum())
    multi = np.flatnonzero(~single)
    order = multi[np.argsort(edge_comp[multi], kind="stable")]
    bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
    for group in np.split(order, bounds) if order.size else []:
        rows, r_idx = np.unique(iou.row[group], return_inverse=True)
        cols, c_idx = np.unique(iou.col[group], return_inverse=True)
        block = np.zeros((rows.size, cols.size))
        block[r_idx, c_idx] = iou.data[group]
        r, c = linear_sum_assignment(block, maximize=True)
        values = block[r, c]
        total += float(values.sum())
        matched += int((values > 0).sum())
    return total, matched


def iou_scores(target: np.ndarray, labels: np.ndarray) -> IouScores:
    """Foreground and instance IoU of ``labels`` against ``target`` (see the module doc).

    Both empty: IoU 1 (nothing to find, nothing found); one empty: 0.
    """
    table = contingency(target, labels)
    target_sizes = np.asarray(table.sum(axis=1)).ravel()
    label_sizes = np.asarray(table.sum(axis=0)).ravel()
    inter = table[1:, 1:].tocoo()
    union_fg = int(table.sum())
    inter_fg = int(inter.sum())
    foreground = inter_fg / union_fg if union_fg else 1.0
    n_target = int(np.count_nonzero(target_sizes[1:]))
    n_pred = int(np.count_nonzero(label_sizes[1:]))
    union = target_sizes[1:][inter.row] + label_sizes[1:][inter.col] - inter.data
    iou = sparse.coo_matrix((inter.data / union, (inter.row, inter.col)), shape=inter.shape)
    matched_sum, n_matched = _matched_iou(iou)
    denominator = n_target + n_pred - n_matched
    instance = matched_sum / denominator if denominator else 1.0
    return IouScores(foreground=foreground, instance=instance, n_target=n_target,
                     n_pred=n_pred, n_matched=n_matched)


def n_iou(iou_pred: float, iou_input: float, best_iou: float = 1.0) -> float:
    """``(iou_pred - iou_input) / (best_iou - iou_input)``: 0 = as good as the input.

    When ``best_iou == iou_input`` there is nothing to gain: 0.0 for an equal prediction,
    +-inf for a better or worse one (as ``metrics.n_ssim`` does).
    """
    gain = iou_pred - iou_input
    room = best_iou - iou_input
    if room == 0:
        return 0.0 if gain == 0 else math.copysign(math.inf, gain)
    return gain / room


# --------------------------------------------------------------------------- models


def models_dir() -> Path:
    """Where cellpose keeps its weights: ``$CELLPOSE_LOCAL_MODELS_PATH``, else ~/.cellpose/models.

    Read at call time (cellpose itself reads the variable once, at import).
    """
    env = os.environ.get(MODELS_ENV)
    return Path(env) if env else Path.home() / ".cellpose" / "models"


@contextlib.contextmanager
def _cellpose_model_dir(folder: Path) -> Iterator[Any]:
    """cellpose.models with its module-level MODEL_DIR pointed at ``folder`` for the duration."""
    from cellpose import models as cp_models

    before = cp_models.MODEL_DIR
    cp_models.MODEL_DIR = folder
    try:
        yield cp_models
    finally:
        cp_models.MODEL_DIR = before


def _fetch(folder: Path, basename: str, name: str, allow_download: bool) -> Path:
    """``folder/basename``, downloaded by cellpose when missing; WeightsError when impossible."""
    path = folder / basename
    if path.is_file():
        return path
    hint = (f"put {', '.join(_BUILTIN_FILES[name])} in {folder}, point {MODELS_ENV} at a folder "
            "holding them, or pass --cellpose-model PATH")
    if not allow_download:
        raise WeightsError(f"cellpose model {name!r}: {basename} not found in {folder} "
                           f"(downloads disabled); {hint}")
    log.info("cellpose model %r: downloading %s to %s", name, basename, folder)
    try:
        with _cellpose_model_dir(folder) as cp_models:
            cp_models.cache_model_path(basename)
    except (OSError, ValueError) as exc:  # URLError, HTTPError, socket errors, read-only folder
        reason = getattr(exc, "reason", None) or exc
        raise WeightsError(f"cellpose model {name!r}: {basename} is not in {folder} and could not "
                           f"be downloaded ({reason}); {hint}") from None
    if not path.is_file():
        raise WeightsError(f"cellpose model {name!r}: download of {basename} left no file; {hint}")
    return path


class CellposeSegmenter:
    """One cellpose model (and its size model when it has one) on one device.

    ``model`` is a built-in name (``nuclei``, ``cyto3``) resolved offline-first, or the path of
    a cellpose 3 model file (as written by ``cellpose.train.train_seg``).
    """

    def __init__(self, model: str | Path, *, device: str = "auto", allow_download: bool = True,
                 batch_size: int = 32) -> None:
        from cellpose import models as cp_models

        from fusecare.device import resolve_device  # torch only once a model is made

        self.device = resolve_device(device)
        self.batch_size = batch_size
        gpu = self.device.type == "cuda"
        size_file: Path | None = None
        try:
            if str(model) in _BUILTIN_FILES:
                name = str(model)
                folder = models_dir()
                weights_file, size_basename = _BUILTIN_FILES[name]
                _fetch(folder, weights_file, name, allow_download)
                size_file = _fetch(folder, size_basename, name, allow_download)
                with _cellpose_model_dir(folder):
                    self.model = cp_models.CellposeModel(gpu=gpu, device=self.device, model_type=name)
            else:
                path = Path(model)
                if not path.is_file():
                    known = ", ".join(sorted(_BUILTIN_FILES))
                    raise WeightsError(f"cellpose model not found: {path} (a file, or one of {known})")
                name = path.name
                candidate = Path(f"{path}_size.npy")
                size_file = candidate if candidate.is_file() else None
                self.model = cp_models.CellposeModel(gpu=gpu, device=self.device, pretrained_model=str(path))
            self.size_model = (cp_models.SizeModel(self.model, device=self.device, pretrained_size=str(size_file))
                               if size_file is not None else None)
        except WeightsError:
            raise
        except (OSError, RuntimeError, ValueError, KeyError, AssertionError, EOFError,
                pickle.UnpicklingError) as exc:
            raise WeightsError(f"cellpose model {model}: cannot be loaded ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        self.name = name
        self._warned: set[float] = set()
        log.debug("cellpose %s on %s, diam_mean %.1f, size model %s", name, self.device,
                  self.diam_mean, size_file)

    @property
    def diam_mean(self) -> float:
        return float(self.model.diam_mean)

    def _planes(self, volume: np.ndarray, count: int) -> list[np.ndarray]:
        """The ``count`` XY planes with the largest standard deviation (most structure)."""
        spread = np.array([float(np.std(plane)) for plane in volume])
        picks = np.sort(np.argsort(spread, kind="stable")[::-1][:max(1, count)])
        return [np.ascontiguousarray(volume[z], dtype=np.float32) for z in picks]

    def estimate_diameter(self, volume: np.ndarray, planes: int = 3) -> float:
        """Cell diameter in voxels of ``volume`` (isotropic), from 2-D planes; see the module doc."""
        diameters = []
        for plane in self._planes(volume, planes):
            if self.size_model is not None:
                diam, _ = self.size_model.eval(plane, channels=[0, 0], batch_size=self.batch_size)
                diameters.append(float(diam))
            else:
                from cellpose import utils

                masks = np.asarray(self.model.eval(plane, channels=[0, 0], diameter=None,
                                                   batch_size=self.batch_size)[0])
                if masks.max() > 0:
                    diameters.append(float(utils.diameters(masks)[0]))
        diameter = float(np.median(diameters)) if diameters else self.diam_mean
        if not math.isfinite(diameter) or diameter <= 0:
            diameter = self.diam_mean
        diameter = max(diameter, MIN_DIAMETER)
        log.debug("%s: diameter %.2f voxels from planes %s", self.name, diameter,
                  [round(d, 2) for d in diameters])
        return diameter

    def segment(self, volume: np.ndarray, diameter: float) -> np.ndarray:
        """3-D labels of ``volume`` (ZYX, isotropic) at ``diameter`` voxels; 0 = background."""
        zoom = self.diam_mean / diameter
        if zoom > 2 and diameter not in self._warned:
            self._warned.add(diameter)
            log.warning("cell diameter %.1f voxels is small for cellpose model %s (trained at %.0f): it "
                        "upsamples the volume %.1fx per axis, %.0fx the voxels and the time; check the "
                        "estimate or set the diameter (--diameter)", diameter, self.name, self.diam_mean,
                        zoom, zoom**3)
        with warnings.catch_warnings():  # torch's, from cellpose's mask dynamics: harmless noise
            warnings.filterwarnings("ignore", "Sparse invariant checks", UserWarning)
            masks = self.model.eval(np.asarray(volume, dtype=np.float32), channels=[0, 0], z_axis=0,
                                    do_3D=True, diameter=diameter, batch_size=self.batch_size)[0]
        return np.asarray(masks).reshape(volume.shape)


def builtin_model(channel: str) -> str:
    """The cellpose model the organisers use for ``channel``."""
    return BUILTIN_MODELS[NUCLEUS if channel == NUCLEUS else MEMBRANE]


@dataclass
class SegmenterCache:
    """Loads each channel's cellpose model once. ``models`` maps a channel (or ``"*"``) to a path."""

    models: Mapping[str, str | Path] = field(default_factory=dict)
    device: str = "auto"
    allow_download: bool = True
    batch_size: int = 32
    _loaded: dict[str, CellposeSegmenter] = field(default_factory=dict, init=False, repr=False)

    def model_for(self, channel: str) -> str | Path:
        return self.models.get(channel) or self.models.get("*") or builtin_model(channel)

    def get(self, channel: str) -> CellposeSegmenter:
        key = str(self.model_for(channel))
        if key not in self._loaded:
            self._loaded[key] = CellposeSegmenter(key, device=self.device, allow_download=self.allow_download,
                                                  batch_size=self.batch_size)
        return self._loaded[key]


# --------------------------------------------------------------------------- one case


class SegOptions(Config):
    """Choices of the N-IoU score (defaults: the documented reading of the organisers')."""

    iou: IouMode = "foreground"
    best_iou: float = 1.0
    iso_spacing: float | None = None
    """Isotropic voxel size in um; None = the smallest voxel size of the target."""
    diameter: float | None = None
    """Cell diameter in isotropic voxels; None = estimated on the target."""
    diameter_planes: int = 3

    def validate(self) -> None:
        if self.iou not in IOU_MODES:
            raise ConfigError(f"iou must be one of {IOU_MODES}, got {self.iou!r}")
        if self.iso_spacing is not None and not self.iso_spacing > 0:
            raise ConfigError(f"iso_spacing must be > 0, got {self.iso_spacing}")
        if self.diameter is not None and not self.diameter > 0:
            raise ConfigError(f"diameter must be > 0, got {self.diameter}")


@dataclass(frozen=True)
class SegScores:
    """The N-IoU of one case, with what it was computed from."""

    iou_input: float
    iou_pred: float
    n_iou: float
    mode: IouMode
    best_iou: float
    input: IouScores
    pred: IouScores
    diameter: float
    spacing: float
    iso_shape: tuple[int, ...]
    seconds: float


def score_segmentation(
    target: np.ndarray, pred: np.ndarray, input: np.ndarray, *,
    voxel_size: Sequence[float], segmenter: CellposeSegmenter, options: SegOptions = SegOptions(),
    step: Callable[[str], None] | None = None, keep_labels: dict[str, np.ndarray] | None = None,
) -> SegScores:
    """Segment the three volumes on one isotropic grid and score input and prediction by IoU.

    The diameter is estimated on the target (unless given) and reused for input and prediction.
    A volume equal to one already segmented reuses its labels (so copying the input scores an
    N-IoU of exactly 0, even where cellpose is not bitwise deterministic, e.g. on CUDA).
    ``step`` is told each stage (for a progress bar); ``keep_labels``, when given, receives the
    isotropic labels under "target", "input" and "pred".
    """
    start = time.perf_counter()
    report = step or (lambda _stage: None)
    spacing = options.iso_spacing or min(voxel_size)
    labels: dict[str, np.ndarray] = {}
    volumes = {"target": target, "input": input, "pred": pred}
    diameter = options.diameter
    for role, volume in volumes.items():
        same = next((r for r in labels if volumes[r] is volume or np.array_equal(volumes[r], volume)), None)
        if same is not None:  # identical volumes get identical masks, on any device, for free
            report(f"{role}: same as {same}")
            labels[role] = labels[same]
            continue
        report(f"{role}: isotropic")
        iso = to_isotropic(volume, voxel_size, spacing)
        if diameter is None:
            report("target: diameter")
            diameter = segmenter.estimate_diameter(iso, options.diameter_planes)
        report(f"{role}: cellpose")
        labels[role] = segmenter.segment(iso, diameter)
        del iso
    if labels["target"].max() == 0:
        log.warning("cellpose found no cell in the target: IoU is 1 only for an empty segmentation")
    s_input = iou_scores(labels["target"], labels["input"])
    s_pred = iou_scores(labels["target"], labels["pred"])
    if keep_labels is not None:
        keep_labels.update(labels)
    iou_in, iou_pr = s_input.get(options.iou), s_pred.get(options.iou)
    return SegScores(
        iou_input=iou_in, iou_pred=iou_pr, n_iou=n_iou(iou_pr, iou_in, options.best_iou),
        mode=options.iou, best_iou=options.best_iou, input=s_input, pred=s_pred,
        diameter=float(diameter), spacing=float(spacing), iso_shape=tuple(labels["target"].shape),
        seconds=time.perf_counter() - start,
    )
