"""Restore single-view lightsheet volumes: ``fusecare predict IN [IN ...] -o OUT``.

Each IN is a .tif/.tiff file or a folder of them; every output is written under OUT with its
input's name (uint16, the input's shape and metadata). The ensemble is chosen per case by its
channel (nucleus, else membrane). Weights are looked up in this order: --weights, the
FUSECARE_WEIGHTS environment variable, model_weights/ of the source checkout, the copy installed
with the package.

Exit status 0 when every case got an output (restored, or its input written back after a
failure, one ERROR ... FALLBACK line each), 1 when some case could not be read at all (one FAILED
line each), 2 for a usage error (a path that is neither a TIFF file nor a folder, a folder with
no TIFF, an output folder that would overwrite an input, an explicit --weights folder that does
not exist, ...), each one line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fusecare.cli import add_logging_arguments, configure_logging, new_parser, number
from fusecare.constants import DEFAULT_TILE, DEFAULT_TIME_BUDGET, ILLUMINATION_FACES, TIFF_SUFFIXES
from fusecare.errors import FuseCareError, UsageError
from fusecare.restoration.weights import WEIGHTS_ENV, find_weights

GC_INPUT = Path("/input/images/fluorescence-lightsheet-3D-microscopy")
GC_OUTPUT = Path("/output/images/fused-fluorescence-lightsheet-3D-microscopy")

log = logging.getLogger("fusecare")


# --------------------------------------------------------------------------- argument types


def tile_size(text: str) -> tuple[int, int, int]:
    """``Z,Y,X`` (or ``ZxYxX``, or one number for a cube) positive integers."""
    try:
        values = tuple(int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"tile must be Z,Y,X integers, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"tile must be three positive integers Z,Y,X, got {text!r}")
    return values  # type: ignore[return-value]


memory_gb = number(what="a number of GB", minimum=0, strict=True)
"""NaN, Inf, 0 or negative would refuse every case or none."""
seconds = number(what="a number of seconds", minimum=0)
"""0 switches the time budget off."""


class ExplicitPath(argparse.Action):
    """Stores a path and remembers that the user gave it (``<dest>_given``): an explicit folder
    that does not exist is a typo to report, the default one a missing ensemble to survive."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, Path(str(values)))
        setattr(namespace, f"{self.dest}_given", True)


# --------------------------------------------------------------------------- parsers


def add_model_and_hardware_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, hardware and logging groups, shared by ``fusecare predict`` and ``inference.py``."""
    model = parser.add_argument_group("model")
    model.add_argument("--weights", action=ExplicitPath, default=find_weights(),
                       help=f"folder with one ensemble per channel (nucleus/, membrane/); env {WEIGHTS_ENV} "
                            "(default: %(default)s). Given here, it must exist (exit 2 otherwise)")
    model.add_argument("--no-gate", dest="gate", action="store_false",
                       help="write the members' mean as it is: no blend toward the input, no attenuation "
                       "correction (both are the calibrated gate's)")
    model.add_argument("--no-attenuation-correction", dest="attenuation_correction", action="store_false",
                       help="keep the gate but not its attenuation correction (which brightens the single "
                       "view's dimmed far side as a fused volume is): for views that are not dimmed")
    model.add_argument("--light-from", choices=[f.replace(" ", "-") for f in ILLUMINATION_FACES],
                       help="the face the light sheet entered from, when you know it (y-start: the top "
                       "rows of each plane, x-start: its left columns): the attenuation correction then "
                       "fits that face only instead of choosing one from each view (used by a gate "
                       "that corrects attenuation, as both shipped ones do)")
    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    hardware.add_argument("--tile", type=tile_size,
                          help="tile Z,Y,X in voxels (default: {} on CUDA; on CPU chosen per case, the fewest "
                               "voxels computed within 6 B/voxel + 1.5 GB of memory, at least {})".format(
                              *(",".join(map(str, DEFAULT_TILE[d])) for d in ("cuda", "cpu"))))
    hardware.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True,
                          help="float16 autocast on CUDA, on by default (within 1e-3 of float32 on the shipped "
                          "members; blocks that overflow are redone in float32); --no-fp16 for float32 "
                          "throughout; ignored on CPU")
    hardware.add_argument("--max-memory-gb", type=memory_gb,
                          help="refuse cases needing more host memory than this (a number > 0)")
    hardware.add_argument("--time-budget", type=seconds, default=DEFAULT_TIME_BUDGET, metavar="SECONDS",
                          help="seconds per case from its start to its last tile (default: %(default)g, "
                               "fitted to the challenge's 10 minutes per case including start, model "
                               "loading and writing). Tiles that will not fit are predicted with fewer "
                               "members (never below 2) or written as the input itself, loudly; 0 = no budget")
    add_logging_arguments(parser.add_argument_group("logging"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fusecare predict``: inputs as positional files or folders, ``-o`` for the output folder."""
    io = parser.add_argument_group("input / output")
    io.add_argument("inputs", type=Path, nargs="+", metavar="IN", help=".tif/.tiff file(s) or folder(s) of them")
    io.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="folder for the outputs")
    io.add_argument("--uncertainty", type=Path, metavar="DIR",
                    help="also write the per-voxel ensemble spread (uint16, unit 1e-4 normalised intensity) here")
    io.add_argument("--imagej", action="store_true",
                    help="write ImageJ hyperstacks calibrated in microns (Fiji, napari open them to scale) "
                         "instead of the challenge's BigTIFF layout")
    add_model_and_hardware_arguments(parser)


def build_container_parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """``inference.py``'s parser: ``--input``/``--output`` defaulting to the Grand Challenge folders
    (the container's contract: it runs with no arguments), the other flags as ``fusecare predict``."""
    parser = new_parser(prog, description)
    io = parser.add_argument_group("input / output")
    io.add_argument("--input", type=Path, default=GC_INPUT,
                    help="folder of .tif/.tiff cases, or one such file (default: %(default)s)")
    io.add_argument("--output", type=Path, default=GC_OUTPUT, help="folder for predictions (default: %(default)s)")
    io.add_argument("--uncertainty", type=Path, metavar="DIR",
                    help="also write the per-voxel ensemble spread (uint16, unit 1e-4 normalised intensity) here")
    add_model_and_hardware_arguments(parser)
    parser.set_defaults(inputs=None)
    return parser


def build_parser(prog: str = "fusecare predict") -> argparse.ArgumentParser:
    parser = new_parser(prog, __doc__)
    add_arguments(parser)
    return parser


# --------------------------------------------------------------------------- checks and run


def check_inputs(paths: Sequence[Path]) -> None:
    """``UsageError`` (one line) for a path that is neither a TIFF file nor a folder, or a folder
    without any TIFF. Torch stays unimported: ``fusecare.io``'s listing needs only numpy and tifffile."""
    from fusecare.io import tiff_files

    for path in paths:
        if path.is_dir():
            if not tiff_files(path):
                raise UsageError(f"no .tif/.tiff file in input folder {path}")
        elif path.is_file():
            if path.suffix.lower() not in TIFF_SUFFIXES:
                raise UsageError(f"{path} is neither a .tif/.tiff file nor a folder")
        elif path.exists():
            raise UsageError(f"{path} is neither a .tif/.tiff file nor a folder")
        else:
            raise UsageError(f"input not found: {path} is no file or folder")


def run(args: argparse.Namespace) -> int:
    """Check the arguments, then restore (torch is imported only past the checks)."""
    configure_logging(quiet=args.quiet, debug=args.debug)
    inputs: list[Path] = list(args.inputs) if args.inputs is not None else [args.input]
    try:
        if getattr(args, "weights_given", False) and not args.weights.is_dir():
            raise UsageError(f"--weights {args.weights}: no such folder (without --weights the default is used)")
        if args.light_from and not (args.gate and args.attenuation_correction):
            raise UsageError("--light-from names the face for the attenuation correction, which "
                             f"{'--no-gate' if not args.gate else '--no-attenuation-correction'} turns off")
        check_inputs(inputs)
        from tqdm.contrib.logging import logging_redirect_tqdm

        from fusecare.restoration.pipeline import RestoreOptions, restore_paths

        options = RestoreOptions(
            tile=args.tile, device=args.device, fp16=args.fp16, gate=args.gate,
            attenuation_correction=args.attenuation_correction,
            light_from=args.light_from.replace("-", " ") if args.light_from else None,
            uncertainty_dir=args.uncertainty, progress=not args.quiet,
            time_budget=args.time_budget or None, imagej=getattr(args, "imagej", False),
            memory_limit=int(args.max_memory_gb * 1e9) if args.max_memory_gb is not None else None,
        )
        with logging_redirect_tqdm():
            results = restore_paths(inputs, args.output, args.weights, options)
    except FuseCareError as exc:
        log.error("%s", exc)
        return 2
    counts = {s: sum(r.status == s for r in results) for s in ("restored", "fallback", "failed")}
    log.info("done: %d restored, %d written back unchanged (fallback), %d failed",
             counts["restored"], counts["fallback"], counts["failed"])
    return 1 if counts["failed"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
