"""Export an ensemble for other tools: ``fusecare export bioimageio --channel membrane -o DIR``.

One BioImage Model Zoo zip per channel, ``DIR/fusecare-<channel>.zip``, built and validated with
``bioimageio.spec`` and, unless ``--no-test``, tested with ``bioimageio.core``'s ``test_model``
(``fusecare/export/bioimageio.py`` says what is in it). The model is the ensemble's ungated mean.

Exit status 0, 1 when the written package fails ``test_model`` (it is removed), 2 for bad input
(a channel without weights, an output folder that exists and is not empty without --overwrite).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fusecare.cli import Parser, add_logging_arguments, configure_logging, new_parser
from fusecare.constants import CHANNELS
from fusecare.errors import FuseCareError
from fusecare.restoration.weights import REPO_WEIGHTS, WEIGHTS_ENV, find_weights

log = logging.getLogger("fusecare")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-command per format (only ``bioimageio`` today), each with its own options."""
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT", parser_class=Parser)
    bio = formats.add_parser("bioimageio", help="a BioImage Model Zoo package (zip) per channel",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = bio.add_argument_group("input / output")
    io.add_argument("--channel", choices=CHANNELS, action="append", required=True,
                    help="channel to export (repeat for both)")
    io.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="folder for the zip(s)")
    io.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    model = bio.add_argument_group("model")
    model.add_argument("--weights", type=Path, default=find_weights(), metavar="DIR",
                       help=f"folder with one ensemble per channel (env {WEIGHTS_ENV}; default %(default)s)")
    model.add_argument("--model-card", type=Path, metavar="MD",
                       help="model card to quote in the package's Validation section "
                            "(default: MODEL_CARD.md for the shipped weights, none for others)")
    model.add_argument("--no-test", dest="test", action="store_false",
                       help="skip bioimageio.core's test_model on the written package")
    add_logging_arguments(bio.add_argument_group("logging"))


def build_parser(prog: str | None = "fusecare export") -> argparse.ArgumentParser:
    parser = new_parser(prog, __doc__)
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Export each channel asked for; torch and bioimageio are imported only here."""
    configure_logging(quiet=args.quiet, debug=args.debug)
    from fusecare.errors import ExportError
    from fusecare.export.bioimageio import MODEL_CARD, _quiet_bioimageio, check_output_folder, export_bioimageio

    _quiet_bioimageio(args.debug)
    model_card = args.model_card
    if model_card is None and args.weights.resolve() == REPO_WEIGHTS.resolve() and MODEL_CARD.is_file():
        model_card = MODEL_CARD
    try:
        check_output_folder(args.output, args.overwrite)
        for channel in dict.fromkeys(args.channel):
            export_bioimageio(channel, args.weights, args.output, overwrite=True, test=args.test,
                              model_card=model_card)
    except ExportError as exc:
        log.error("%s", exc)
        return 1 if "failed bioimageio.core" in str(exc) else 2
    except FuseCareError as exc:
        log.error("%s", exc)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
