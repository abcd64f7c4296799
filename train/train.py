"""Train a CARE ensemble for one channel; a thin wrapper of ``fusecare train`` (``fusecare/cli/train.py``).

    python -m train --config configs/nucleus.json --members 2 --weights model_weights --runs runs/
    python -m train --channel nucleus --fmc-dir /data/fmc --validation-studies 5 --members 4
    torchrun --nproc_per_node 4 -m train --config configs/nucleus.json        # DDP, one GPU each

Command-line options override the config file's values; the merged config is validated before
any data is read, and saved as runs/<...>/config.json and beside each member's weights.

Nothing is lost: WEIGHTS/<channel>/ is written only when it is new or empty, unless --overwrite
(then it is replaced as a whole, once the new ensemble is complete). Exit status 0 on success,
2 for a usage error (missing or invalid config, --members < 1, an existing ensemble without
--overwrite, --calibrate-only without an ensemble, an untrained member), each one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ``python train/train.py`` from a checkout, the package not installed
    sys.path.insert(0, str(REPO))

from fusecare.cli.train import build_parser as _build_parser, merged_config, run  # noqa: E402

__all__ = ["build_parser", "main", "merged_config"]


def build_parser() -> argparse.ArgumentParser:
    return _build_parser("python -m train")


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
