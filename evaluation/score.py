"""Score predictions locally with the four Fuse My Cells numbers: a thin wrapper of ``fusecare score``.

    python evaluation/score.py --pred DIR --gt DIR --input DIR [--out DIR]

What it writes, its options and its exit status: ``fusecare/cli/score.py`` (``--help`` prints them).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# run as a script from a checkout (``python evaluation/score.py``), the package may not be installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusecare.cli.score import build_parser as _build_parser
from fusecare.cli.score import run


def build_parser() -> argparse.ArgumentParser:
    return _build_parser("score.py")


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
