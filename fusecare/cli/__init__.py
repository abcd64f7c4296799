"""The ``fusecare`` command and what every entry point shares: one parser style, one logging setup.

    fusecare predict IN [IN ...] -o OUT       restore files or folders of .tif/.tiff volumes
    fusecare score --pred DIR --gt DIR --input DIR [--out DIR]
    fusecare train --config CONFIG.json       retrain an ensemble
    fusecare export bioimageio --channel membrane -o DIR

``inference.py`` (the container's entry point), ``evaluation/score.py``, ``python -m train`` and
``python -m fusecare.export`` are thin wrappers of the same subcommand modules.

Everything on the way to parsing arguments is standard library only: each subcommand imports its
heavy modules (numpy, torch, cellpose) inside ``run``, after its arguments were checked, so that
``--help`` and usage errors answer in a fraction of a second instead of the seconds torch takes.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

log = logging.getLogger("fusecare")
Number = TypeVar("Number", int, float)


def number(kind: Callable[[str], Number] = float, *, what: str = "a number",  # type: ignore[assignment]
           minimum: float | None = None, strict: bool = False) -> Callable[[str], Number]:
    """An argparse ``type`` for a finite number of ``kind`` at or above ``minimum`` (above it when
    ``strict``): NaN, infinities and out-of-range values are one-line usage errors that name what
    the option counts, instead of a traceback or a run that refuses every case."""
    bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"

    def parse(text: str) -> Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        low_ok = minimum is None or (value > minimum if strict else value >= minimum)
        if not (math.isfinite(value) and low_ok):
            raise argparse.ArgumentTypeError(f"expected {what}{bound}, got {text!r}")
        return value

    return parse


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``PROG: error: ...``), exit status 2.

    argparse prints the whole usage block before the error; for a lab's scripts and logs one
    line per mistake is easier to read and to grep, and ``--help`` still shows everything.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def new_parser(prog: str | None, description: str | None, **kwargs: object) -> Parser:
    """A ``Parser`` with the house style: the module docstring as description, kept as written."""
    return Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                  **kwargs)  # type: ignore[arg-type]


def add_logging_arguments(group: argparse._ActionsContainer) -> None:
    group.add_argument("--quiet", action="store_true", help="warnings and errors only, no progress bar")
    group.add_argument("--debug", action="store_true", help="debug logging, with tracebacks of failures")


def configure_logging(*, quiet: bool = False, debug: bool = False) -> None:
    """One ``fusecare LEVEL: message`` line per record on stderr (stdout stays for results)."""
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="fusecare %(levelname)s: %(message)s", stream=sys.stderr)


def build_parser() -> Parser:
    """The ``fusecare`` parser: one subparser per job, each from its module's ``add_arguments``."""
    from fusecare import __version__
    from fusecare.cli import export, predict, score, train

    parser = new_parser("fusecare", __doc__)
    parser.add_argument("--version", action="version", version=f"fusecare {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    modules: dict[str, tuple[object, str]] = {
        "predict": (predict, "restore .tif/.tiff volumes (files or folders) with the shipped ensembles"),
        "score": (score, "score predictions: N-SSIM and N-IoU per case and channel"),
        "train": (train, "train (or recalibrate) an ensemble for one channel"),
        "export": (export, "export an ensemble (BioImage Model Zoo package)"),
    }
    for name, (module, summary) in modules.items():
        sub = commands.add_parser(name, help=summary, description=module.__doc__,  # type: ignore[attr-defined]
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)  # type: ignore[attr-defined]
        sub.set_defaults(run=module.run)  # type: ignore[attr-defined]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``fusecare COMMAND ...``: the exit status of the subcommand (2 for a usage error)."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)

