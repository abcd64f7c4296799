"""Attenuation correction: a coarse whole-volume pass that undoes a single view's dim far side.

A single lightsheet view is dimmed along the light's path through the specimen (Beer-Lambert:
the sheet entering from one side of Y or X, the emitted light leaving along Z toward the
objective), while a fused volume combines views lit from opposite sides and is not. A network
that sees a 32x64x64 patch cannot tell a dim region of a bright specimen from dim structure:
that is the global context patch-only models lack (the best public Fuse My Cells entries found
patch-only models worse than copying the input). Measured on the validation volumes, with the
true attenuation of simulated views, dividing it out lifts N-SSIM from about 0.2-0.3 to 0.7.

The estimate uses the view alone: the specimen's density is the smoothed view relative to its
dense level, path lengths through it are computed from each candidate entry face (``optics``),
and ``log(q-th percentile of the view in equal-count bins of path length) = c - rate * path`` is
fitted by least squares (the sheet's first ``EDGE_PATH_UM`` left out). A high percentile of each
bin compares like with like (the bright structure at each depth) where a mean would mix in the
specimen's own dim edges. Of the four
illumination faces (Y or X, either end) the one whose fit explains most of the trend wins, then
the detection side along Z is fitted on the view corrected for it; both rates are 0 or positive
(light is only lost), and the estimate is refined a few times, because the view's own dimming
hides the far side of the specimen from the first density map. The field is
``exp(rate_ill * path_ill + rate_det * path_det)``, capped at ``MAX_GAIN``.

Bright objects (``BRIGHT_OBJECT_LEVEL``) are left out of the fit, since a saturated object near one
face would otherwise pass for light lost from it.

The field has a safety net of its own (``GUARD_RATIO``): light is lost on its way in, so a single
view's brightest structure lies near the entry face, where the right field is about 1; an
estimate that brightens the specimen's brightest tenth more than the rest names the wrong face,
and is rejected (loudly; the view is then left uncorrected).

Large volumes are estimated on a block-averaged grid (at most ``WORKING_VOXELS``) and the
field is interpolated back per region (``AttenuationField.region``), so the pass reads the volume
once, slab by slab, and holds a few coarse copies. The gate applies it (``GateConfig.correct_attenuation``),
chosen on validation like its other parameters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fusecare.constants import ILLUMINATION_FACES
from fusecare.normalize import PercentileNorm
from fusecare.optics import VoxelSizeZYX, block_mean, path_length_um, resample_linear, smooth_um

log = logging.getLogger(__name__)

WORKING_VOXELS = 1 << 23
"""Voxels of the grid the field is estimated on; larger volumes are block-averaged down to it."""
DENSITY_SIGMA_UM = 2.0
"""Smoothing (um) of the view that stands in for the specimen's density (the simulator's too)."""
MASK_SIGMA_UM = 4.0
"""Smoothing (um) of the view for the specimen mask the fit runs over."""
MASK_LEVEL = 0.25
"""The mask: the coarse view above this share of its 95th percentile."""
FIT_SIGMA_VOXELS = 0.7
"""Light smoothing (voxels of the working grid) of the view whose percentiles the fit compares.
In grid voxels, not um: a large volume's grid is block-averaged (``working_factors``), which
already smooths, while calibration estimates on validation crops at full resolution. The fit
compares percentiles across path bins, a ratio both kinds of light smoothing leave about the same
(the tests check a 2x-coarser grid's field against the full-resolution one's)."""
EDGE_PATH_UM = 2.0
"""Voxels less than this path (um of dense specimen) from the sheet's entry face are left out of
the illumination fit: there the smoothed view still ramps up from the background (the density's
smoothing spans about ``DENSITY_SIGMA_UM`` either side of the specimen's edge), which no
attenuation explains, and a fit through those bins finds no attenuation at all on a specimen
dimmed 3x. The detection fit keeps them: stacks are short in Z (14 planes for one validation
volume), and without its first planes the fit found a false Z trend there (N-SSIM of the
corrected Gaussian on the validation views, Theil-Sen fits: 0.715 keeping them, 0.473 without)."""
BRIGHT_OBJECT_LEVEL = 3.0
"""Regions of the (corrected) coarse view brighter than this many times the specimen's median are
bright objects, left out of the fit: a saturated object near one face looks like light lost
from that face, and the fit would brighten everything behind it (0 = keep them). Chosen on
views of the validation volumes and phantoms (22: plain, and with 1-3 bright objects), scoring
the Gaussian-smoothed view times the field: N-SSIM 0.624 (worst +0.243) against 0.440 (worst
-1.853) without it; with the 75th or 50th percentile per bin instead, 0.507 and 0.421; the gain
capped at 3 instead, 0.556 (worst -0.196). On 46 views that add the training volumes (no net
is involved: this choice trains nothing), 0.619 (worst -0.113) against 0.516 (-1.853); a check
that the correction does not tilt the view more than it was scored 0.617 against 0.647 on 26
views, and applying the field only where the estimates with and without this exclusion name the
same face 0.594 on the 46: neither kept. Under strong attenuation the exclusion can take the
bright near side for an object, and the fit then names the opposite face (one held-out view,
``MODEL_CARD.md``); an object wider than about a sixth of the specimen still passes for
attenuation."""
FIT_QUANTILE = 90.0
FIT_BINS = 12
ITERATIONS = 4
"""Refinements of the density map by the field so far (on the validation views, N-SSIM of the
corrected Gaussian 0.665 after one, 0.737 after two, 0.755 after four). The specimen's own dim
far side hides from the first map. On a view dimmed along the coordinate instead of the path,
the refinements can overshoot up to ``MAX_GAIN``."""
MAX_GAIN = 10.0
"""The largest factor the field brightens any voxel by: beyond it, noise would be amplified more
than structure is recovered (the simulator's diffuse floor, 5 % of the sheet, bounds its own
dimming at 20x)."""
MAX_RATE = 1.0
"""Largest attenuation rate per um of dense specimen fitted (the simulator draws 0.005-0.065)."""

GUARD_RATIO = 1.1
"""The safety net of the field itself: a field that brightens the specimen's brightest tenth more
than this many times the specimen as a whole (geometric means, bright objects left out as in the
fit; ``brightest_gain``) is rejected and the view is left uncorrected. Light is lost on its way
into the specimen, so the brightest structure of a single view lies near the entry face, where
a right field is about 1 and a wrong one (the opposite face named: under strong attenuation the
bright near side can pass for bright objects) is largest. Chosen with ``bench/attenuation.py`` on
its 40 views of the training and validation volumes and phantoms (plain, with bright objects,
4-um planes, strong attenuation): the estimated fields reached at most 1.03 (none rejected, Gaussian x field
N-SSIM 0.627 unchanged), the same fields mirrored along their axis (wrong-face estimates) 0.97
to 2.02; guarded at 1.1 those scored 0.102 (worst -1.11) against -0.577 (worst -2.57) unguarded.
The specimen mask here is the uncorrected view's (``fit_mask``), so under strong attenuation a
near side over ``BRIGHT_OBJECT_LEVEL`` times the median is left out of it, where a wrong field
is largest. The corrected view's mask (the fit's last pass) was tried on the same views and
separated right from wrong faces less well: right fields then score higher ratios too.
A wrong *axis* is not caught: there the bright near side
spans the field's whole axis."""

Region = tuple[slice, ...]


@dataclass(frozen=True)
class AttenuationField:
    """The estimated correction: ``coarse`` on a grid ``factors`` times coarser than ``shape``.

    ``illumination`` names the entry face (``"y start"``, ``"x end"``, ...), with the fitted rates
    (1/um of dense specimen); ``max_gain`` is the field's largest value.
    """

    coarse: np.ndarray
    factors: tuple[int, int, int]
    shape: tuple[int, int, int]
    illumination: str
    illumination_rate: float
    detection: str
    detection_rate: float
    brightest_gain: float = 1.0
    """How much more the estimated field brightens the specimen's brightest tenth than the whole
    specimen (``brightest_gain``); above ``GUARD_RATIO`` the field was rejected."""
    rejected: bool = False
    """The estimate failed the guard: ``coarse`` is ones and the rates are those rejected."""

    @property
    def max_gain(self) -> float:
        return float(self.coarse.max())

    @property
    def is_identity(self) -> bool:
        return self.rejected or (self.illumination_rate == 0.0 and self.detection_rate == 0.0)

    def __post_init__(self) -> None:
        # the field takes the array over: shared by every core's region, it is never edited in place
        self.coarse.flags.writeable = False

    def full(self) -> np.ndarray:
        """The field over the whole volume (``region`` of every voxel): for volumes held whole."""
        return self.region((slice(None),) * 3)

    def region(self, region: Region) -> np.ndarray:
        """The field over ``region`` of the full-resolution volume (float32, linear interpolation
        between the coarse grid's voxel centres); ``region`` is up to three slices (steps allowed),
        missing trailing axes are whole."""
        region = tuple(region)
        if len(region) > 3 or not all(isinstance(s, slice) for s in region):
            raise TypeError(f"a region is up to three slices (Z, Y, X), got {region!r}")
        region = region + (slice(None),) * (3 - len(region))
        if self.factors == (1, 1, 1):
            return self.coarse[region].copy()  # writable, as the interpolated regions are
        coords = [(np.arange(*s.indices(n)) + 0.5) / f - 0.5
                  for s, n, f in zip(region, self.shape, self.factors)]
        return resample_linear(self.coarse, coords)

    def describe(self) -> str:
        estimate = (f"light from {self.illumination} {self.illumination_rate:.3f}/um, detection from "
                    f"{self.detection} {self.detection_rate:.3f}/um")
        if self.rejected:
            return (f"REJECTED, no correction: the estimate ({estimate}) would brighten the specimen's "
                    f"brightest tenth {self.brightest_gain:.2f}x more than the whole (limit {GUARD_RATIO}): "
                    "a field from the wrong face")
        return f"{estimate}, largest gain {self.max_gain:.2f}"


def view_field(view: np.ndarray, voxel_size_zyx: VoxelSizeZYX, norm: PercentileNorm | None = None, *,
               light_from: str | None = None) -> AttenuationField:
    """The field of a whole single view as inference estimates it: on the view's challenge
    normalisation (``norm``, fitted here when not given), read slab by slab."""
    norm = PercentileNorm.fit(view) if norm is None else norm
    return estimate_attenuation(view, voxel_size_zyx, norm.forward, light_from=light_from)


class CorrectedView:
    """A single view with its attenuation field applied, read region by region (a memory map
    stays one): what members with ``ModelConfig.corrected_input`` read. Values stay raw
    intensities, ``low + (x - low) * field``, so that the view's challenge normalisation (``low``
    its p2) maps them to the normalised view times the field, the product training feeds them.
    Indexing takes up to three slices, as ``AttenuationField.region`` does."""

    def __init__(self, volume: np.ndarray, field: AttenuationField, low: float) -> None:
        if tuple(volume.shape) != field.shape:
            raise ValueError(f"the field covers {field.shape}, the view is {tuple(volume.shape)}")
        self.volume, self.field, self.low = volume, field, np.float32(low)
        self.shape, self.ndim, self.dtype = field.shape, 3, np.dtype(np.float32)

    def __getitem__(self, region: Region) -> np.ndarray:
        out = np.asarray(self.volume[region], dtype=np.float32) - self.low
        out *= self.field.region(region)
        out += self.low
        return out


def working_factors(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Block sizes (Z, Y, X) bringing ``shape`` to about ``WORKING_VOXELS``: one factor for all axes,
    each capped so that no axis shrinks below 8 voxels (a capped axis, often Z on thin stacks, leaves
    the grid above ``WORKING_VOXELS``; the other axes are not reduced further to make up for it)."""
    factor = max(1, math.ceil((math.prod(shape) / WORKING_VOXELS) ** (1 / 3)))
    return tuple(max(1, min(factor, n // 8)) for n in shape)  # type: ignore[return-value]


def _fit_rate(view: np.ndarray, mask: np.ndarray, path: np.ndarray, edge_um: float = 0.0) -> tuple[float, float]:
    """The attenuation rate along ``path`` (>= 0; voxels of ``mask`` at least ``edge_um`` along it)
    and how much of the binned trend it explains (the drop in absolute residuals against a flat
    line, so one outlying bin does not decide the face; 0 when there is nothing to fit)."""
    inside = mask & (path >= edge_um) if edge_um > 0 else mask
    lengths, values = path[inside], view[inside]
    if lengths.size < 100 or lengths.max() <= 0:
        return 0.0, 0.0
    edges = np.unique(np.quantile(lengths, np.linspace(0.0, 1.0, FIT_BINS + 1)))
    bins = np.clip(np.digitize(lengths, edges[1:-1]), 0, len(edges) - 2)
    xs, ys = [], []
    for i in range(len(edges) - 1):
        chosen = bins == i
        if chosen.sum() < 20:
            continue
        level = np.percentile(values[chosen], FIT_QUANTILE)
        if level > 0:
            xs.append(lengths[chosen].mean())
            ys.append(math.log(level))
    x, y = np.asarray(xs), np.asarray(ys)
    if len(xs) < 3 or np.ptp(y) == 0:  # a flat trend is no loss, not a least-squares slope of 1e-17
        return 0.0, 0.0
    rate = min(max(-float(np.polyfit(x, y, 1)[0]), 0.0), MAX_RATE)
    centre = float(np.median(y + rate * x))
    flat = float(np.sum(np.abs(y - np.median(y))))
    fitted = float(np.sum(np.abs(y - centre + rate * x)))
    return rate, flat - fitted


def _faces(axis: int) -> tuple[tuple[str, bool], ...]:
    name = "zyx"[axis]
    return ((f"{name} start", True), (f"{name} end", False))


def coarse_view(view: np.ndarray, voxel_size_zyx: VoxelSizeZYX) -> np.ndarray:
    """The view (negative values clipped) smoothed by ``MASK_SIGMA_UM``: what the specimen mask
    (``fit_mask``) and the guard (``brightest_gain``) read."""
    return smooth_um(np.clip(view, 0.0, None).astype(np.float32, copy=False), MASK_SIGMA_UM, voxel_size_zyx)


def estimate_on_grid(view: np.ndarray, voxel_size_zyx: VoxelSizeZYX, faces: Sequence[str] = ILLUMINATION_FACES,
                     *, coarse: np.ndarray | None = None) -> tuple[np.ndarray, str, float, str, float]:
    """The field for a (normalised) view on its own grid, with the chosen faces and rates; the
    light's entry face is chosen among ``faces`` (not empty). ``coarse`` is the view's
    ``coarse_view`` when the caller already has it."""
    if not faces:
        raise ValueError("no illumination face to choose from")
    positive = np.clip(view, 0.0, None).astype(np.float32, copy=False)
    smooth = np.maximum(smooth_um(positive, DENSITY_SIGMA_UM, voxel_size_zyx), 0.0)
    if coarse is None:
        coarse = coarse_view(view, voxel_size_zyx)
    fine = ndimage.gaussian_filter(positive, FIT_SIGMA_VOXELS, mode="nearest")
    field = np.ones_like(smooth)
    choice = (faces[0], 0.0, "z start", 0.0)
    for _ in range(ITERATIONS):
        corrected = smooth * field
        level = float(np.percentile(corrected, 95))
        if not level > 0:
            break
        mask = fit_mask(coarse * field)
        density = np.clip(corrected / np.float32(level), 0.0, 1.0)
        best = None
        for axis in (1, 2):
            for face, from_start in _faces(axis):
                if face not in faces:
                    continue
                path = path_length_um(density, axis, from_start, voxel_size_zyx[axis])
                rate, explained = _fit_rate(fine, mask, path, EDGE_PATH_UM)
                if best is None or explained > best[0]:
                    best = (explained, face, rate, path)
        _, face, rate, path = best  # type: ignore[misc]
        illumination = np.exp(np.float32(rate) * path)
        best_detection = None
        for detection_face, from_start in _faces(0):
            depth = path_length_um(density, 0, from_start, voxel_size_zyx[0])
            detection_rate, explained = _fit_rate(fine * illumination, mask, depth)
            if best_detection is None or explained > best_detection[0]:
                best_detection = (explained, detection_face, detection_rate, depth)
        _, detection_face, detection_rate, depth = best_detection  # type: ignore[misc]
        field = np.minimum(illumination * np.exp(np.float32(detection_rate) * depth), np.float32(MAX_GAIN))
        choice = (face, rate, detection_face, detection_rate)
    return (field.astype(np.float32, copy=False), *choice)


def fit_mask(coarse: np.ndarray) -> np.ndarray:
    """The specimen the fit runs over, from the coarse (``MASK_SIGMA_UM``) view: above ``MASK_LEVEL``
    of its 95th percentile, bright objects (``BRIGHT_OBJECT_LEVEL``) left out."""
    mask = coarse > MASK_LEVEL * float(np.percentile(coarse, 95))
    if BRIGHT_OBJECT_LEVEL > 0 and mask.any():
        mask &= ~(coarse > BRIGHT_OBJECT_LEVEL * float(np.median(coarse[mask])))
    return mask


def brightest_gain(coarse: np.ndarray, field: np.ndarray) -> float:
    """The geometric mean of ``field`` over the specimen's brightest tenth (of the view's
    ``coarse_view``, within ``fit_mask`` of the view as it is, uncorrected) over its geometric mean
    over the whole mask: about 1 or below for a field from the right face, above for one that
    brightens the already bright near side."""
    mask = fit_mask(coarse)
    if mask.sum() < 10:
        return 1.0
    top = mask & (coarse >= np.percentile(coarse[mask], 90))
    log_field = np.log(np.maximum(field, np.float32(1e-6)))
    return float(np.exp(log_field[top].mean() - log_field[mask].mean()))


def guard(coarse: np.ndarray, field: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """The field as used (ones when rejected), its ``brightest_gain`` and whether it exceeded
    ``GUARD_RATIO``; ``coarse`` is the view's ``coarse_view``."""
    ratio = brightest_gain(coarse, field)
    rejected = ratio > GUARD_RATIO
    return (np.ones_like(field) if rejected else field), ratio, rejected


def estimate_attenuation(volume: np.ndarray, voxel_size_zyx: VoxelSizeZYX,
                         transform: Callable[[np.ndarray], np.ndarray] | None = None, *,
                         light_from: str | None = None) -> AttenuationField:
    """Estimate the attenuation field of a single view (any size; ``transform`` normalises the raw
    slabs it reads, e.g. ``PercentileNorm.forward``). ``light_from`` (one of
    ``ILLUMINATION_FACES``) names the face the light sheet entered from, when the microscope's
    user knows it: the estimate then fits that face's rate only, and cannot name the wrong axis or
    side (from the view alone, a specimen filling the frame with a brightness gradient of its own
    is ambiguous). The guard (``GUARD_RATIO``) still applies."""
    shape = tuple(int(n) for n in volume.shape)
    if len(shape) != 3:
        raise ValueError(f"expected a 3-D ZYX volume, got shape {shape}")
    if light_from is not None and light_from not in ILLUMINATION_FACES:
        raise ValueError(f"light_from must be one of {ILLUMINATION_FACES}, got {light_from!r}")
    faces = ILLUMINATION_FACES if light_from is None else (light_from,)
    factors = working_factors(shape)
    grid = block_mean(volume, factors, transform)
    grid_voxel = tuple(float(v) * f for v, f in zip(voxel_size_zyx, factors))
    coarse = coarse_view(grid, grid_voxel)  # type: ignore[arg-type]
    field, face, rate, detection_face, detection_rate = estimate_on_grid(grid, grid_voxel, faces,  # type: ignore[arg-type]
                                                                         coarse=coarse)
    field, ratio, rejected = guard(coarse, field)
    result = AttenuationField(field, factors, shape, face, rate, detection_face, detection_rate,  # type: ignore[arg-type]
                              ratio, rejected)
    log.debug("attenuation: %s (estimated on a %s grid)", result.describe(), "x".join(map(str, grid.shape)))
    return result
