"""Score predictions locally with the four Fuse My Cells numbers: N-SSIM and N-IoU per channel.

    fusecare score --pred DIR --gt DIR --input DIR [--out DIR]
    python evaluation/score.py ...     (the same command, from a checkout)

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
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fusecare.cli import add_logging_arguments, configure_logging, new_parser, number
from fusecare.constants import CHANNELS, IOU_MODES, MODELS_ENV
from fusecare.errors import FuseCareError

log = logging.getLogger("fusecare")


_positive = number(minimum=0, strict=True)


def _data_range(text: str) -> float | str:
    """``target`` (the target's own range) or a positive number."""
    return text if text == "target" else _positive(text)


def _model(text: str) -> tuple[str, Path]:
    """``PATH`` (every channel) or ``CHANNEL=PATH``."""
    channel, sep, path = text.partition("=")
    if sep and channel in CHANNELS:
        return channel, Path(path)
    return "*", Path(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The score options, grouped: input / output, N-SSIM, N-IoU, hardware / logging."""
    io = parser.add_argument_group("input / output")
    io.add_argument("--pred", type=Path, metavar="DIR", required=True, help="folder of predictions (.tif/.tiff)")
    io.add_argument("--gt", type=Path, metavar="DIR", required=True, help="folder of targets (fused volumes)")
    io.add_argument("--input", type=Path, metavar="DIR", required=True, help="folder of inputs (single views)")
    io.add_argument("--out", type=Path, metavar="DIR", help="write scores.csv, summary.json, png/ and index.html here")
    io.add_argument("--uncertainty", type=Path, metavar="DIR",
                    help="uncertainty maps of the same names (inference.py --uncertainty), drawn in the PNGs")
    io.add_argument("--no-png", dest="png", action="store_false", help="do not draw the per-case PNGs")
    io.add_argument("--channel", choices=CHANNELS, help="score every case as this channel (default: from metadata)")
    ssim = parser.add_argument_group("N-SSIM (choices the organisers did not publish)")
    ssim.add_argument("--ssim-2d", dest="per_slice", action="store_true",
                      help="mean of per-slice 2-D SSIM (default 3-D)")
    ssim.add_argument("--ssim-window", choices=("uniform", "gaussian"), default="uniform",
                      help="uniform 7-voxel window (default) or Gaussian sigma 1.5")
    ssim.add_argument("--data-range", type=_data_range, default=1.0, metavar="1|target|X",
                      help="SSIM data_range on the normalised volumes: a number (default 1) or 'target' "
                           "(its max - min)")
    seg = parser.add_argument_group("N-IoU (cellpose 3 segmentation)")
    seg.add_argument("--no-seg", dest="segment", action="store_false", help="skip segmentation (N-SSIM only; fast)")
    seg.add_argument("--iou", choices=IOU_MODES, default="foreground",
                     help="foreground IoU of the masks (default) or mean IoU of one-to-one matched cells")
    seg.add_argument("--best-iou", type=_positive, default=1.0, metavar="IOU",
                     help="IoU of the verified segmentation (default 1.0)")
    seg.add_argument("--iso-spacing", type=_positive, metavar="UM",
                     help="isotropic voxel size in um (default: the smallest voxel size; coarser is faster)")
    seg.add_argument("--diameter", type=_positive, metavar="VOXELS",
                     help="cell diameter in isotropic voxels (default: estimated on the target)")
    seg.add_argument("--cellpose-model", type=_model, action="append", default=[], metavar="[CHANNEL=]PATH",
                     help="cellpose 3 model file, for every channel or one (repeatable); default the built-in "
                          f"nuclei / cyto3 from ${MODELS_ENV} or ~/.cellpose/models")
    seg.add_argument("--offline", action="store_true", help="never try to download cellpose models")
    misc = parser.add_argument_group("hardware / logging")
    misc.add_argument("--device", default="auto",
                      help="auto (CUDA when present), cpu, cuda or cuda:N (default: %(default)s)")
    misc.add_argument("--threads", type=int, metavar="N",
                      help="torch CPU threads (default: torch's); 1 is often faster when other processes "
                           "share the cores")
    add_logging_arguments(misc)


def build_parser(prog: str | None = "fusecare score") -> argparse.ArgumentParser:
    parser = new_parser(prog, __doc__)
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Check the arguments, then score (numpy, torch and cellpose are imported past the checks)."""
    configure_logging(quiet=args.quiet, debug=args.debug)
    for folder in (args.pred, args.gt, args.input):
        if not folder.is_dir():
            log.error("folder not found: %s", folder)
            return 2
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        log.error("--out %s is an existing file, not a folder: choose a folder for scores.csv and summary.json",
                  args.out)
        return 2
    if not args.debug:
        logging.getLogger("cellpose").setLevel(logging.WARNING)
    if args.threads is not None:
        if args.threads < 1:
            log.error("--threads must be >= 1, got %d", args.threads)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    from tqdm.contrib.logging import logging_redirect_tqdm

    from fusecare.scoring.evaluate import EvalOptions, SsimOptions, all_scored, evaluate_folder
    from fusecare.scoring.report import format_table, summarize, write_csv, write_html, write_json
    from fusecare.scoring.segment import SegOptions

    try:
        options = EvalOptions(
            ssim=SsimOptions(window=args.ssim_window, per_slice=args.per_slice, data_range=args.data_range),
            segment=args.segment,
            seg=SegOptions(iou=args.iou, best_iou=args.best_iou, iso_spacing=args.iso_spacing, diameter=args.diameter),
            channel=args.channel, device=args.device, cellpose_models=dict(args.cellpose_model),
            allow_download=not args.offline, uncertainty_dir=args.uncertainty,
            png_dir=args.out / "png" if args.out is not None and args.png else None,
            progress=not args.quiet,
        )
        with logging_redirect_tqdm():
            results = evaluate_folder(args.pred, args.gt, args.input, options)
    except FuseCareError as exc:
        log.error("%s", exc)
        return 2
    summary = summarize(results, options.settings())
    if args.out is not None:
        write_csv(results, args.out / "scores.csv")
        write_json(summary, args.out / "summary.json")
        page = write_html(results, summary, args.out / "index.html")
        log.info("wrote %s, %s and %s (open it in a browser)", args.out / "scores.csv", args.out / "summary.json", page)
    print(format_table(summary))
    return 0 if all_scored(results) else 1



def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
