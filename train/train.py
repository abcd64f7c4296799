"""Train a CARE ensemble for one channel; a thin wrapper of ``fusecare train`` (``fusecare/cli/train.py``).

    python -m train --config train/configs/fused_gauss_lowlr_nucleus.json --members 2 --weights my_weights
    torchrun --nproc_per_node 4 -m train --config my.json        # DDP, one GPU each

Options, what is written and the exit status: ``fusecare/cli/train.py`` (``--help`` prints them).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ``python train/train.py`` from a checkout, the package not installed
    sys.path.insert(0, str(REPO))

from fusecare.cli.train import build_parser as _build_parser  # noqa: E402
from fusecare.cli.train import merged_config, run  # noqa: E402

__all__ = ["build_parser", "main", "merged_config"]


def build_parser() -> argparse.ArgumentParser:
    return _build_parser("python -m train")


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
