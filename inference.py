"""Grand Challenge entry point: restore every single-view volume of a folder.

With no arguments it follows the Fuse My Cells container contract: it reads
/input/images/fluorescence-lightsheet-3D-microscopy/ and writes
/output/images/fused-fluorescence-lightsheet-3D-microscopy/. Exit status 0 when every case got
an output (restored, or its input written back after a failure), 1 when some case could not be
read at all (one "FAILED <file>: <reason>" line each; the other cases still get their output), 2
for a usage error: an empty or missing input folder, an output folder that is the input folder or
inside it, a --weights folder given explicitly that does not exist. Without --weights (the
container's baked-in default) a missing ensemble still gives every case its input back.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from fusecare.cli import add_logging_arguments, configure_logging
from fusecare.ensemble import WEIGHTS_ENV
from fusecare.errors import FuseCareError
from fusecare.pipeline import DEFAULT_TIME_BUDGET, RestoreOptions, restore_folder

GC_INPUT = Path("/input/images/fluorescence-lightsheet-3D-microscopy")
GC_OUTPUT = Path("/output/images/fused-fluorescence-lightsheet-3D-microscopy")
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "model_weights"

log = logging.getLogger("fusecare")


def _tile(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"tile must be Z,Y,X integers, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"tile must be three positive integers Z,Y,X, got {text!r}")
    return values  # type: ignore[return-value]


def _memory_gb(text: str) -> float:
    """A finite, positive number of GB (NaN, Inf, 0 or negative would refuse every case or none)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of GB > 0, got {text!r}")
    return value


def _seconds(text: str) -> float:
    """A finite number of seconds >= 0 (0 switches the budget off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


class _ExplicitPath(argparse.Action):
    """Stores a path and remembers that the user gave it (``<dest>_given``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, Path(str(values)))
        setattr(namespace, f"{self.dest}_given", True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("input / output")
    io.add_argument("--input", type=Path, default=GC_INPUT, help="folder of .tif/.tiff cases (default: %(default)s)")
    io.add_argument("--output", type=Path, default=GC_OUTPUT, help="folder for predictions (default: %(default)s)")
    io.add_argument("--uncertainty", type=Path, metavar="DIR",
                    help="also write the per-voxel ensemble spread (uint16, unit 1e-4 normalised intensity) here")
    model = parser.add_argument_group("model")
    model.add_argument("--weights", action=_ExplicitPath, default=Path(os.environ.get(WEIGHTS_ENV, DEFAULT_WEIGHTS)),
                       help=f"folder with one ensemble per channel (nucleus/, membrane/); env {WEIGHTS_ENV} "
                            "(default: %(default)s). Given here, it must exist (exit 2 otherwise)")
    model.add_argument("--no-gate", dest="gate", action="store_false",
                       help="do not blend toward the input where members disagree")
    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    hardware.add_argument("--tile", type=_tile, help="tile Z,Y,X in voxels (default: 96,256,256 on CUDA, 64,128,128 on CPU)")
    hardware.add_argument("--fp16", action="store_true", help="float16 autocast on CUDA (ignored on CPU)")
    hardware.add_argument("--max-memory-gb", type=_memory_gb,
                          help="refuse cases needing more host memory than this (a number > 0)")
    hardware.add_argument("--time-budget", type=_seconds, default=DEFAULT_TIME_BUDGET, metavar="SECONDS",
                          help="seconds per case from its start to its last tile (default: %(default)g, "
                               "fitted to the challenge's 10 minutes per case including start, model "
                               "loading and writing). Tiles that will not fit are predicted with fewer "
                               "members (never below 2) or written as the input itself, loudly; 0 = no budget")
    add_logging_arguments(parser.add_argument_group("logging"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(quiet=args.quiet, debug=args.debug)
    if getattr(args, "weights_given", False) and not args.weights.is_dir():
        log.error("--weights %s: no such folder (without --weights the default is used)", args.weights)
        return 2
    options = RestoreOptions(
        tile=args.tile, device=args.device, fp16=args.fp16, gate=args.gate,
        uncertainty_dir=args.uncertainty, progress=not args.quiet,
        time_budget=args.time_budget or None,
        memory_limit=int(args.max_memory_gb * 1e9) if args.max_memory_gb is not None else None,
    )
    try:
        with logging_redirect_tqdm():
            results = restore_folder(args.input, args.output, args.weights, options)
    except FuseCareError as exc:
        log.error("%s", exc)
        return 2
    counts = {s: sum(r.status == s for r in results) for s in ("restored", "fallback", "failed")}
    log.info("done: %d restored, %d written back unchanged (fallback), %d failed",
             counts["restored"], counts["fallback"], counts["failed"])
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
