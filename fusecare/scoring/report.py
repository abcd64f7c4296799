"""The scoring report: per-case CSV, per-channel summary (JSON and a printed table), one HTML page.

The summary holds the four leaderboard numbers (N_SSIM_nucleus, N_SSIM_membrane,
N_IOU_nucleus, N_IOU_membrane: the mean over the cases of each channel, as the challenge ranks)
and, per channel and metric, the mean, median, minimum and count, so one bad case that drags a
mean down is visible. Cases that could not be scored are listed with their one-line reason, and
so are scored cases excluded from the means (``ScoredCase.excluded``: undefined N-scores); the
counts say how many of each.

Each case's picture is drawn by ``scoring.figures``; ``index.html`` shows a run in one page.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

from fusecare.config import strict_json
from fusecare.io import CHANNELS
from fusecare.scoring.evaluate import ScoredCase

CSV_COLUMNS: tuple[str, ...] = (
    "case", "channel", "study", "ssim_input", "ssim_pred", "n_ssim",
    "iou_input", "iou_pred", "n_iou", "seconds", "status", "error",
)
LEADERBOARD: tuple[str, ...] = ("N_SSIM_nucleus", "N_SSIM_membrane", "N_IOU_nucleus", "N_IOU_membrane")
_METRICS = (("n_ssim", "N_SSIM"), ("n_iou", "N_IOU"))


# --------------------------------------------------------------------------- tables


def result_row(result: ScoredCase) -> dict[str, Any]:
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


def write_csv(results: Iterable[ScoredCase], path: str | Path) -> Path:
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
    return {"mean": strict_json(float(np.mean(values))), "median": strict_json(float(median(values))),
            "min": strict_json(float(min(values))), "count": len(values)}


def summarize(results: Sequence[ScoredCase], settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- one page


_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    var up = th.dataset.dir !== 'asc'; th.dataset.dir = up ? 'asc' : 'desc';
    function key(row) { var c = row.cells[col]; var v = c.dataset.v; return v === undefined ? c.textContent : v; }
    rows.sort(function (a, b) {
      var x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
      var d = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
      return up ? d : -d;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

_CSS = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5em auto; padding: 0 1em; max-width: 1500px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
table.sortable th { cursor: pointer; } table.sortable th:hover { background: #e0e8ff; }
td.bad { color: #b00; } td.good { color: #060; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; height: auto; box-sizing: border-box; border: 1px solid #ddd; }
.failed { color: #b00; }
"""


def _cell(value: Any, digits: int = 4, signed: bool = True) -> str:
    if value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)):
        shown = "-" if value in (None, "") else str(value)
        return f'<td data-v="-1e9">{html.escape(shown)}</td>'
    if isinstance(value, float):
        css = ' class="bad"' if signed and value < 0 else ' class="good"' if signed and value > 0 else ""
        text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
        return f'<td data-v="{value!r}"{css}>{text}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def write_html(results: Sequence[ScoredCase], summary: Mapping[str, Any], path: str | Path,
               png_dir: str | Path | None = None) -> Path:
    """``index.html``: the leaderboard numbers, per-channel statistics, a sortable per-case table
    and every case's PNG (linked relatively, so the folder can be moved or zipped as a whole)."""
    path = Path(path)
    esc = html.escape
    lead = "".join(f"<tr><td>{esc(k)}</td>{_cell(v)}</tr>" for k, v in summary["leaderboard"].items())
    stats = []
    for channel, entry in summary["channels"].items():
        for attr, label in _METRICS:
            s = entry[attr]
            stats.append(f"<tr><td>{esc(channel)}</td><td>{label}</td>{_cell(s['mean'])}{_cell(s['median'])}"
                         f"{_cell(s['min'])}<td>{s['count']}</td></tr>")
    rows, figures = [], []
    for result in results:
        row = result_row(result)
        anchor = esc(Path(result.case).stem)
        png = Path(result.png) if getattr(result, "png", None) else None
        link = (f'<a href="#{anchor}">{esc(result.case)}</a>' if png is not None else esc(result.case))
        status = '<td class="failed">' + esc(f"failed: {row['error']}") + "</td>" if not result.ok else "<td>ok</td>"
        rows.append(
            f"<tr><td>{link}</td><td>{esc(str(row['channel']))}</td><td>{esc(str(row['study']))}</td>"
            + _cell(row["n_ssim"] if row["n_ssim"] != "" else None)
            + _cell(row["ssim_input"] if row["ssim_input"] != "" else None, signed=False)
            + _cell(row["ssim_pred"] if row["ssim_pred"] != "" else None, signed=False)
            + _cell(row["n_iou"] if row["n_iou"] != "" else None)
            + _cell(float(row["seconds"]), 1, signed=False) + status + "</tr>")
        if png is not None:
            src = os.path.relpath(png, path.parent) if png.is_absolute() else str(png)
            figures.append(f'<figure id="{anchor}"><img src="{esc(Path(src).as_posix())}" alt="{esc(result.case)}" '
                           f'loading="lazy"></figure>')
    cases = summary["cases"]
    settings = esc(json.dumps(summary.get("settings", {}), indent=2))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fusecare scores</title><style>{_CSS}</style></head>
<body>
<h1>fusecare scores</h1>
<p>{cases['scored']} of {cases['total']} cases scored{f", {cases['failed']} failed" if cases['failed'] else ""}.
N-SSIM and N-IoU are the challenge's normalised gains over the input: 0 is as good as the input, 1 is perfect.</p>
<h2>Leaderboard</h2>
<table><tr><th>metric</th><th>mean</th></tr>{lead}</table>
<h2>Per channel</h2>
<table><tr><th>channel</th><th>metric</th><th>mean</th><th>median</th><th>min</th><th>count</th></tr>{''.join(stats)}</table>
<h2>Cases</h2>
<p>Click a column to sort; click a case to see its picture.</p>
<table class="sortable"><thead><tr><th>case</th><th>channel</th><th>study</th><th>N-SSIM</th><th>SSIM input</th>
<th>SSIM prediction</th><th>N-IoU</th><th>seconds</th><th>status</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<h2>Pictures</h2>
<p>Maximum projections, each volume percentile-normalised (p2 -> 0, p99.8 -> 1). The difference
panels of all cases share one colour scale (the 99th percentile over the run).</p>
{''.join(figures) or '<p>No pictures (scored with --no-png).</p>'}
<details><summary>Settings</summary><pre>{settings}</pre></details>
<script>{_SORT_JS}</script>
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
