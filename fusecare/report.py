"""The scoring report: per-case CSV, per-channel summary (JSON and a printed table), PNG per case.

The summary holds the four leaderboard numbers (N_SSIM_nucleus, N_SSIM_membrane,
N_IOU_nucleus, N_IOU_membrane: the mean over the cases of each channel, as the challenge ranks)
and, per channel and metric, the mean, median, minimum and count, so one bad case that drags a
mean down is visible. Cases that could not be scored are listed with their one-line reason, and
so are scored cases excluded from the means (``CaseResult.excluded``: undefined N-scores); the
counts say how many of each.

PNGs are drawn with Pillow (a scikit-image dependency): maximum-intensity projections along Z
(XY) and Y (XZ, stretched to physical aspect) of the percentile-normalised input, prediction and
target, of |prediction - target|, and of the ensemble's uncertainty when one is given. The
projections are accumulated slab by slab, so no float copy of a whole volume is made.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Any

import numpy as np

from .io import CHANNELS, Volume
from .normalize import PercentileNorm, z_slabs

if TYPE_CHECKING:
    from .evaluate import CaseResult

CSV_COLUMNS: tuple[str, ...] = (
    "case", "channel", "study", "ssim_input", "ssim_pred", "n_ssim",
    "iou_input", "iou_pred", "n_iou", "seconds", "status", "error",
)
LEADERBOARD: tuple[str, ...] = ("N_SSIM_nucleus", "N_SSIM_membrane", "N_IOU_nucleus", "N_IOU_membrane")
_METRICS = (("n_ssim", "N_SSIM"), ("n_iou", "N_IOU"))
ROLES = ("input", "pred", "target")
"""Keys of ``write_case_png``'s ``norms``."""

PANEL_MAX, PANEL_MIN = 256, 128
"""Longest panel side in pixels: projections are shrunk to PANEL_MAX, small ones enlarged to PANEL_MIN."""
TITLE_H, GAP = 14, 4
_SLAB_VOXELS = 1 << 23


# --------------------------------------------------------------------------- tables


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def result_row(result: CaseResult) -> dict[str, Any]:
    """One CSV row: empty cells for what was not computed (no segmentation, failed case)."""
    ssim, seg = result.ssim, result.seg
    return {
        "case": result.case, "channel": result.channel or "", "study": "" if result.study is None else result.study,
        "ssim_input": ssim.ssim_input if ssim else "", "ssim_pred": ssim.ssim_pred if ssim else "",
        "n_ssim": ssim.n_ssim if ssim else "",
        "iou_input": seg.iou_input if seg else "", "iou_pred": seg.iou_pred if seg else "",
        "n_iou": seg.n_iou if seg else "",
        "seconds": round(result.seconds, 3),
        "status": "failed" if not result.ok else "excluded" if result.excluded else "ok",
        "error": result.error or result.excluded or "",
    }


def write_csv(results: Iterable[CaseResult], path: str | Path) -> Path:
    """Per-case scores, one row per case (failed ones included), columns ``CSV_COLUMNS``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for result in results:
            writer.writerow(result_row(result))
    return path


def _stats(values: Sequence[float]) -> dict[str, float | int | None]:
    if not values:
        return {"mean": None, "median": None, "min": None, "count": 0}
    return {"mean": _finite_or_none(float(np.mean(values))), "median": _finite_or_none(float(median(values))),
            "min": _finite_or_none(float(min(values))), "count": len(values)}


def summarize(results: Sequence[CaseResult], settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Per-channel statistics, the leaderboard numbers, the failures and the settings used.

    Only counted cases (scored, not excluded) enter the statistics; excluded ones (an N-score of
    -inf when the target equals the input) are listed under ``excluded`` with their reason.
    """
    channels: dict[str, dict[str, Any]] = {}
    leaderboard: dict[str, float | None] = {key: None for key in LEADERBOARD}
    for channel in CHANNELS:
        scored = [r for r in results if r.counted and r.channel == channel]
        entry: dict[str, Any] = {}
        for attr, label in _METRICS:
            values = [getattr(getattr(r, "ssim" if attr == "n_ssim" else "seg"), attr) for r in scored
                      if getattr(r, "ssim" if attr == "n_ssim" else "seg") is not None]
            entry[attr] = _stats(values)
            leaderboard[f"{label}_{channel}"] = entry[attr]["mean"]
        channels[channel] = entry
    failed = [r for r in results if not r.ok]
    excluded = [r for r in results if r.ok and r.excluded]
    return {
        "leaderboard": leaderboard,
        "channels": channels,
        "cases": {"total": len(results), "scored": len(results) - len(failed), "failed": len(failed),
                  "excluded": len(excluded), "counted": len(results) - len(failed) - len(excluded)},
        "errors": [{"case": r.case, "error": r.error} for r in failed],
        "excluded": [{"case": r.case, "reason": r.excluded} for r in excluded],
        "settings": dict(settings or {}),
    }


def write_json(summary: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return path


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:+.4f}"


def format_table(summary: Mapping[str, Any]) -> str:
    """The summary as a fixed-width text table, then the leaderboard numbers and failures."""
    lines = [f"{'channel':<9} {'metric':<7} {'mean':>8} {'median':>8} {'min':>8} {'count':>5}"]
    for channel, entry in summary["channels"].items():
        for attr, label in _METRICS:
            s = entry[attr]
            lines.append(f"{channel:<9} {label:<7} {_fmt(s['mean']):>8} {_fmt(s['median']):>8} "
                         f"{_fmt(s['min']):>8} {s['count']:>5}")
    lines.append("")
    lines.extend(f"{key:<16} {_fmt(value)}" for key, value in summary["leaderboard"].items())
    cases = summary["cases"]
    lines.append(f"\n{cases['scored']} of {cases['total']} cases scored")
    if cases.get("excluded"):
        lines.append(f"{cases['excluded']} scored case(s) excluded from the means, {cases['counted']} counted")
    lines.extend(f"FAILED {e['case']}: {e['error']}" for e in summary["errors"])
    lines.extend(f"EXCLUDED {e['case']}: {e['reason']}" for e in summary.get("excluded", []))
    return "\n".join(lines)


# --------------------------------------------------------------------------- pictures


Projections = tuple[np.ndarray, np.ndarray]
"""Maximum projections of a volume: XY (over Z) and XZ (over Y)."""


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


def panel_sizes(shape: Sequence[int], voxel_size: Sequence[float]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(height, width) of the XY and of the XZ panel (see ``PANEL_MAX``), XZ at true aspect."""
    n_z, n_y, n_x = shape
    vz, _, vx = voxel_size
    side = max(n_y, n_x)
    scale = min(PANEL_MAX / side, max(1.0, PANEL_MIN / side))
    width = max(1, round(n_x * scale))
    xz_height = max(1, min(PANEL_MAX, round(n_z * vz / vx * scale)))
    return (max(1, round(n_y * scale)), width), (xz_height, width)


def png_size(shape: Sequence[int], voxel_size: Sequence[float], columns: int) -> tuple[int, int]:
    """(width, height) of the PNG ``write_case_png`` draws for a volume of ``shape``."""
    (h_xy, w), (h_xz, _) = panel_sizes(shape, voxel_size)
    return columns * (w + GAP) + GAP, TITLE_H + h_xy + GAP + h_xz + GAP


def _grey(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)
    return np.repeat((scaled * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)


def _hot(values: np.ndarray, high: float) -> np.ndarray:
    """Black-red-yellow-white colour map on [0, high]."""
    v = np.clip(values / max(high, 1e-12), 0.0, 1.0)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def _upper(values: np.ndarray, q: float = 99.9) -> float:
    finite = values[np.isfinite(values)]
    return float(np.percentile(finite, q)) if finite.size else 1.0


def _lower(values: np.ndarray) -> float:
    return _upper(values, 0.5)


def write_case_png(
    path: str | Path, input: Volume, pred: Volume, target: Volume,
    voxel_size: Sequence[float], *, uncertainty: Volume | None = None,
    norms: Mapping[str, PercentileNorm] | None = None,
) -> Path:
    """Draw the case's projections (see the module doc) into ``path``; returns ``path``.

    Intensity panels share one grey scale: each volume normalised by its own percentiles 2 /
    99.8 (the metric's view), shown between percentiles 0.5 and 99.9 of the target's
    projection. The difference and uncertainty panels use a colour
    map up to their 99.9th percentile, written in their title. ``norms``: the volumes' fitted
    normalisations by role ("input", "pred", "target"), when the caller has them already.
    Each volume is read once (plus once for a norm not given).
    """
    from PIL import Image, ImageDraw

    names = ("input", "prediction", "target")
    norms = norms or {}
    fitted = [norms.get(role) or PercentileNorm.fit(v) for role, v in zip(ROLES, (input, pred, target))]
    *mips, difference = projections((input, pred, target), norms=fitted, difference=(1, 2))
    ranges = [(_lower(p), _upper(p)) for p in mips[2]]  # one grey scale for all three: the target's
    panels: list[tuple[str, np.ndarray, np.ndarray]] = [
        (name, _grey(xy, *ranges[0]), _grey(xz, *ranges[1])) for name, (xy, xz) in zip(names, mips)]
    xy, xz = difference
    high = _upper(xy)
    panels.append((f"|pred-target| 0-{high:.2g}", _hot(xy, high), _hot(xz, high)))
    if uncertainty is not None:
        [(xy, xz)] = projections([uncertainty])
        high = _upper(xy)
        panels.append((f"uncertainty 0-{high:.3g}", _hot(xy, high), _hot(xz, high)))

    (h_xy, w), (h_xz, _) = panel_sizes(target.shape, voxel_size)
    size = png_size(target.shape, voxel_size, len(panels))
    canvas = Image.new("RGB", size, (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    for k, (name, rgb_xy, rgb_xz) in enumerate(panels):
        x0 = GAP + k * (w + GAP)
        draw.text((x0, 1), name, fill=(230, 230, 230))
        canvas.paste(Image.fromarray(rgb_xy).resize((w, h_xy), Image.BILINEAR), (x0, TITLE_H))
        canvas.paste(Image.fromarray(rgb_xz).resize((w, h_xz), Image.BILINEAR), (x0, TITLE_H + h_xy + GAP))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
