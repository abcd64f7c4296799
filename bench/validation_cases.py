"""Per-case validation N-SSIM of training checkpoints: which validation cases a run moved.

Training logs only the mean and worst case of its validation (``log.csv``); this scores every
case of the same validation (``build_data`` of the run's config: content never trained on, but
used to choose checkpoints) with each checkpoint given, as training scores it (one member
ungated; members that read the corrected view get each case's ``member_input``), and through the
config's ``validation_gate`` when it has one (a second column per checkpoint, ``gated``).

    run=train/checkpoints/corrected_gated/membrane cfg=train/configs/corrected_gated_membrane.json
    python bench/validation_cases.py $cfg $run/member_0/best.pt $run/member_0/last.pt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusecare.restoration.model import CareUNet  # noqa: E402
from fusecare.training.config import TrainConfig  # noqa: E402
from fusecare.training.loop import member_case_scores  # noqa: E402
from fusecare.training.sources import build_data  # noqa: E402


def column_name(path: Path, step: int, taken: Iterable[str]) -> str:
    """``<member folder>:<step>``, or with the run folder in front when two runs' members share
    that (member_0 of two runs at the same step); one checkpoint given twice is refused."""
    for name in (f"{path.parent.name}:{step}", f"{path.parent.parent.name}/{path.parent.name}:{step}"):
        if name not in taken:
            return name
    raise SystemExit(f"{path}: given twice (or two run folders of the same name); each column must be one checkpoint")


def case_scores(config: TrainConfig, checkpoints: list[Path]) -> tuple[list[str], dict[str, list[float]]]:
    """Validation case names, and per checkpoint (``<member folder>:<step>``) each case's N-SSIM."""
    _, cases = build_data(config, validation_only=True)
    columns = {}
    for path in checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=False)
        model = CareUNet(config.model)
        model.load_state_dict(state["model"])
        model.eval()
        scores = [member_case_scores(model, c, config.validation_gate, torch.device("cpu")) for c in cases]
        name = column_name(path, state["step"], columns)
        columns[name] = [ungated for ungated, _ in scores]
        if config.validation_gate is not None:
            columns[f"{name} gated"] = [gated for _, gated in scores]
    return [c.name for c in cases], columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="the run's TrainConfig JSON")
    parser.add_argument("checkpoints", type=Path, nargs="+", help="best.pt / last.pt files of that run")
    args = parser.parse_args()
    names, columns = case_scores(TrainConfig.load(args.config), args.checkpoints)
    print(f"{'case':<70}" + "".join(f"{k:>22}" for k in columns))
    for i, name in enumerate(names):
        print(f"{name[:69]:<70}" + "".join(f"{v[i]:>22.3f}" for v in columns.values()))
    print(f"{'mean':<70}" + "".join(f"{np.mean(v):>22.3f}" for v in columns.values()))


if __name__ == "__main__":
    main()
