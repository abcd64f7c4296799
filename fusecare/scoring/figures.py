"""Pictures of scored cases: one PNG per case, drawn once the whole run is scored.

PNGs are drawn with matplotlib: maximum-intensity projections along Z (XY) and Y (XZ, at
physical aspect) of the percentile-normalised input, prediction and target, of |prediction -
target|, and of the ensemble's uncertainty when one is given, with the case, its channel and
scores in the title and colour bars in normalised units. The projections are accumulated slab by
slab in one pass (no float copy of a whole volume) and kept, shrunk to display size, until the
run is scored, so the difference panels of every case share one scale (the 99th percentile over
all cases): a bad case looks worse than a good one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fusecare.constants import UNCERTAINTY_UNIT
from fusecare.io import Volume
from fusecare.normalize import PercentileNorm, z_slabs

PANEL_ROLES = ("input", "pred", "target")
"""Keys of ``write_case_png``'s ``norms``."""

STORED_MAX = 512
"""Longest side, in pixels, of the projections kept per case until the run's PNGs are drawn."""
DIFFERENCE_PERCENTILE = 99.0
"""The run-wide top of the difference colour scale: this percentile over all cases' projections."""
DPI, COLUMN_IN, FONT_PT = 100, 2.6, 12
"""PNG resolution, inches per panel column, smallest font (12 pt at 100 dpi is 17 px)."""
_LEFT_IN, _RIGHT_IN, _TOP_IN, _BOTTOM_IN, _GAP_IN = 0.6, 0.2, 0.95, 1.0, 0.15
_SLAB_VOXELS = 1 << 23


Projections = tuple[np.ndarray, np.ndarray]
"""Maximum projections of a volume: XY (over Z) and XZ (over Y)."""

COLUMNS: dict[str, str] = {
    "input": "input", "pred": "prediction", "target": "target",
    "difference": "|prediction - target|", "uncertainty": "uncertainty (spread)",
}
"""Panel keys of ``CasePicture.panels`` and their column titles, in drawing order."""


def projections(volumes: Sequence[Volume], *, norms: Sequence[PercentileNorm | None] | None = None,
                difference: tuple[int, int] | None = None) -> list[Projections]:
    """Maximum projections of each of ``volumes`` (one shape), in one slab-by-slab pass.

    ``norms[k]`` normalises volume k first (None: raw values). ``difference = (i, j)`` appends
    the projections of ``|volume i - volume j|`` (after their norms), from the same slabs.
    """
    n_z, n_y, n_x = volumes[0].shape
    n_out = len(volumes) + (difference is not None)
    xy = [np.full((n_y, n_x), -np.inf, dtype=np.float32) for _ in range(n_out)]
    xz = [np.empty((n_z, n_x), dtype=np.float32) for _ in range(n_out)]
    norms = norms or [None] * len(volumes)
    for z0, z1 in z_slabs(n_z, n_y * n_x, _SLAB_VOXELS):
        blocks = [norm.forward(v[z0:z1]) if norm is not None else np.asarray(v[z0:z1], dtype=np.float32)
                  for v, norm in zip(volumes, norms)]
        if difference is not None:
            blocks.append(np.abs(blocks[difference[0]] - blocks[difference[1]]))
        for k, block in enumerate(blocks):
            np.maximum(xy[k], block.max(axis=0), out=xy[k])
            xz[k][z0:z0 + block.shape[0]] = block.max(axis=1)
    return list(zip(xy, xz))


def _shrink(image: np.ndarray, limit: int | None = None) -> np.ndarray:
    """Block maximum down to at most ``limit`` (``STORED_MAX``) pixels a side: a maximum keeps
    thin bright walls that an average would wash out."""
    limit = limit or STORED_MAX
    factors = [max(1, math.ceil(n / limit)) for n in image.shape]
    if factors == [1, 1]:
        return image
    from skimage.measure import block_reduce

    return block_reduce(image, tuple(factors), np.max).astype(np.float32)


@dataclass
class CasePicture:
    """What one case's PNG shows, kept small (``STORED_MAX``) until every case of the run is scored.

    ``panels`` maps keys of ``COLUMNS`` to (XY, XZ) projections in normalised units;
    ``extent_um`` is the (Z, Y, X) size of the volume in microns, for the physical aspect.
    """

    case: str
    channel: str | None
    shape: tuple[int, int, int]
    extent_um: tuple[float, float, float]
    panels: dict[str, Projections] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)


def case_picture(input: Volume, pred: Volume, target: Volume, voxel_size: Sequence[float], *,
                 uncertainty: Volume | None = None, norms: Mapping[str, PercentileNorm] | None = None,
                 case: str = "", channel: str | None = None) -> CasePicture:
    """The projections of one case (see the module doc): input, prediction and target each read
    once (plus once for a norm not given in ``norms``), the uncertainty once when given.

    Integer uncertainty maps (inference.py writes uint16) are converted with ``UNCERTAINTY_UNIT``
    to normalised units, the units of the difference panel beside them.
    """
    norms = norms or {}
    fitted = [norms.get(role) or PercentileNorm.fit(v) for role, v in zip(PANEL_ROLES, (input, pred, target))]
    *mips, difference = projections((input, pred, target), norms=fitted, difference=(1, 2))
    panels = dict(zip(PANEL_ROLES, mips))
    panels["difference"] = difference
    if uncertainty is not None:
        [(xy, xz)] = projections([uncertainty])
        unit = UNCERTAINTY_UNIT if np.dtype(uncertainty.dtype).kind in "ui" else 1.0
        panels["uncertainty"] = (xy * unit, xz * unit)
    shape = tuple(int(n) for n in target.shape)
    extent = tuple(float(n * v) for n, v in zip(shape, voxel_size))
    return CasePicture(case=case, channel=channel, shape=shape, extent_um=extent,  # type: ignore[arg-type]
                       panels={k: (_shrink(xy), _shrink(xz)) for k, (xy, xz) in panels.items()})


def run_scales(pictures: Iterable[CasePicture], q: float = DIFFERENCE_PERCENTILE) -> dict[str, float]:
    """Tops of the difference and uncertainty colour scales: the ``q``-th percentile over every
    case's projections, so the same colour means the same error in every PNG of the run."""
    values: dict[str, list[np.ndarray]] = {"difference": [], "uncertainty": []}
    for picture in pictures:
        for key, found in values.items():
            if key in picture.panels:
                found.extend(p[np.isfinite(p)].ravel() for p in picture.panels[key])
    return {key: max(float(np.percentile(np.concatenate(found), q)), 1e-6) if found else 1.0
            for key, found in values.items() if found}


def _layout(extent_um: Sequence[float], columns: int) -> tuple[float, float, float, float]:
    """(width, height, XY row height, XZ row height) in inches; rows at physical aspect, clipped
    to [0.4, 2] column widths so that a long thin volume stays readable."""
    z, y, x = extent_um
    h_xy = min(2 * COLUMN_IN, max(0.4 * COLUMN_IN, COLUMN_IN * y / max(x, 1e-9)))
    h_xz = min(2 * COLUMN_IN, max(0.4 * COLUMN_IN, COLUMN_IN * z / max(x, 1e-9)))
    width = _LEFT_IN + columns * COLUMN_IN + (columns - 1) * _GAP_IN + _RIGHT_IN
    height = _TOP_IN + h_xy + _GAP_IN + h_xz + _BOTTOM_IN
    return width, height, h_xy, h_xz


def png_size(shape: Sequence[int], voxel_size: Sequence[float], columns: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG drawn for a volume of ``shape`` with ``columns`` panels."""
    width, height, _, _ = _layout([n * v for n, v in zip(shape, voxel_size)], columns)
    return round(width * DPI), round(height * DPI)


def _title(picture: CasePicture) -> str:
    parts = [picture.case or "case", picture.channel or "channel unknown"]
    for key, label in (("n_ssim", "N-SSIM"), ("n_iou", "N-IoU")):
        value = picture.scores.get(key)
        if value is not None:
            parts.append(f"{label} {value:+.3f}")
    return "   |   ".join(parts)


def render_case_png(path: str | Path, picture: CasePicture, scales: Mapping[str, float] | None = None) -> Path:
    """Draw ``picture`` into ``path``: rows XY and XZ, one column per panel, colour bars under the
    difference and uncertainty columns. ``scales``: tops of those colour maps (``run_scales``;
    default this case's own)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    scales = dict(scales or run_scales([picture]))
    keys = [k for k in COLUMNS if k in picture.panels]
    width, height, h_xy, h_xz = _layout(picture.extent_um, len(keys))
    z_um, y_um, x_um = picture.extent_um
    xy_t, xz_t = picture.panels["target"]
    grey = {"xy": (_lower(xy_t), _upper(xy_t)), "xz": (_lower(xz_t), _upper(xz_t))}
    fig = plt.figure(figsize=(width, height), dpi=DPI, facecolor="white")
    fig.suptitle(_title(picture), x=0.5, y=1 - 0.12 / height, va="top", fontsize=FONT_PT + 3, fontweight="bold")

    def box(left_in: float, bottom_in: float, w_in: float, h_in: float) -> list[float]:
        return [left_in / width, bottom_in / height, w_in / width, h_in / height]

    rows = (("xy", "XY (max over Z)", _BOTTOM_IN + h_xz + _GAP_IN, h_xy, [0, x_um, y_um, 0]),
            ("xz", "XZ (max over Y)", _BOTTOM_IN, h_xz, [0, x_um, z_um, 0]))
    for col, key in enumerate(keys):
        left = _LEFT_IN + col * (COLUMN_IN + _GAP_IN)
        image = None
        for row, (name, label, bottom, h, extent) in enumerate(rows):
            ax = fig.add_axes(box(left, bottom, COLUMN_IN, h))
            data = picture.panels[key][row]
            if key in scales:
                cmap = "magma" if key == "difference" else "viridis"
                image = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=scales[key], extent=extent,
                                  interpolation="nearest", aspect="equal")
            else:
                ax.imshow(data, cmap="gray", vmin=grey[name][0], vmax=grey[name][1], extent=extent,
                          interpolation="nearest", aspect="equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(COLUMNS[key], fontsize=FONT_PT + 1, pad=4)
            if col == 0:
                ax.set_ylabel(label, fontsize=FONT_PT)
        if key in scales and image is not None:
            cax = fig.add_axes(box(left + 0.1 * COLUMN_IN, 0.62, 0.8 * COLUMN_IN, 0.12))
            bar = fig.colorbar(image, cax=cax, orientation="horizontal", extend="max")
            bar.set_label("normalised units", fontsize=FONT_PT)
            bar.ax.tick_params(labelsize=FONT_PT)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def write_case_png(
    path: str | Path, input: Volume, pred: Volume, target: Volume,
    voxel_size: Sequence[float], *, uncertainty: Volume | None = None,
    norms: Mapping[str, PercentileNorm] | None = None, case: str = "", channel: str | None = None,
    scores: Mapping[str, float] | None = None, scales: Mapping[str, float] | None = None,
) -> Path:
    """One case on its own (``case_picture`` then ``render_case_png``); a run uses ``write_run_pngs``
    instead, so that its cases share the difference scale."""
    picture = case_picture(input, pred, target, voxel_size, uncertainty=uncertainty, norms=norms,
                           case=case or Path(path).stem, channel=channel)
    picture.scores.update(scores or {})
    return render_case_png(path, picture, scales)


def write_run_pngs(pictures: Mapping[str, CasePicture], png_dir: str | Path) -> dict[str, Path]:
    """Draw every case's PNG (``png_dir/<name>.png``) on the run's shared scales; name -> path."""
    scales = run_scales(pictures.values())
    return {name: render_case_png(Path(png_dir) / f"{name}.png", picture, scales)
            for name, picture in pictures.items()}


def _upper(values: np.ndarray, q: float = 99.9) -> float:
    finite = values[np.isfinite(values)]
    return float(np.percentile(finite, q)) if finite.size else 1.0


def _lower(values: np.ndarray) -> float:
    return _upper(values, 0.5)
