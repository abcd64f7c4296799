"""Grand Challenge entry point: restore every single-view volume of a folder.

A thin wrapper of ``fusecare predict`` (``fusecare/cli/predict.py``) with the container's
defaults; ``--input`` may also name one .tif/.tiff file.

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
import sys

from fusecare.cli.predict import GC_INPUT, GC_OUTPUT, build_container_parser, run

__all__ = ["GC_INPUT", "GC_OUTPUT", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    return build_container_parser(None, __doc__)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
