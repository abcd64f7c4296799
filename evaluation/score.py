"""Score predictions locally with the four Fuse My Cells numbers: N-SSIM and N-IoU per channel.

    python evaluation/score.py --pred DIR --gt DIR --input DIR [--out DIR]

Cases are matched by file name across the three folders (ignoring .tif/.tiff and a trailing
_angle/_fused). Writes, under --out: scores.csv (per case), summary.json (per channel: mean,
median, min, count; the four leaderboard numbers; failures; settings), png/<case>.png
(projections of input, prediction, target, |prediction - target|, uncertainty; the difference on
one scale over the run) and index.html (all of it on one page: open it in a browser). The summary
table goes to stdout, progress and per-case lines to stderr.

A prediction (or target, or input) with NaN/Inf voxels is a failed case; a case whose target
equals its input (N-SSIM undefined, e.g. --pred and --gt swapped) is scored but excluded from the
means, with a warning naming it; the summary counts and lists both.

Exit status: 0 when every case was scored and counted, 1 when some case could not be scored or
was excluded from the means (each named in one line; the others are still scored), 2 for a usage
error (missing folder, --out naming an existing file, cellpose model not available, ...).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# run as a script from a checkout (``python evaluation/score.py``), the package may not be installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusecare.cli.score import build_parser as _build_parser, run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return _build_parser("score.py")


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
