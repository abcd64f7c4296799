"""What the entry points (inference.py, evaluation/score.py, train/) share: logging options."""

from __future__ import annotations

import argparse
import logging
import sys


def add_logging_arguments(group: argparse._ActionsContainer) -> None:
    group.add_argument("--quiet", action="store_true", help="warnings and errors only, no progress bar")
    group.add_argument("--debug", action="store_true", help="debug logging, with tracebacks of failures")


def configure_logging(*, quiet: bool = False, debug: bool = False) -> None:
    """One ``fusecare LEVEL: message`` line per record on stderr (stdout stays for results)."""
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="fusecare %(levelname)s: %(message)s", stream=sys.stderr)
