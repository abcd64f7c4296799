r"""Which ensemble ships: every contender's gate calibrated on the same validation, then the ship rule.

The rule (sessions 13-15, MODEL_CARD.md): a contender replaces the shipped ensemble when its
leave-one-volume-out N-SSIM mean is higher and its leave-one-volume-out worst case is not lower;
among several that pass, the highest mean ships. Leave-one-volume-out is the honest estimate of
what a calibrated gate does on a volume it was not chosen on (``calibrate_gate``'s
``cross_validation``), so the rule compares ensembles as they would ship: each through the gate
its own calibration chooses.

The validation cases come from one recipe config (``build_data(config, validation_only=True)``:
its validation volumes, views and phantoms; content never trained on, used to choose), the same
for every contender. Nothing is written: manifests stay as they are; ship the winner with
``python -m train --config C --weights model_weights --overwrite --from-checkpoints ...`` or
``--calibrate-only``, as the model card says.

    python bench/ship_decision.py train/configs/corrected_gated_membrane.json \
        --shipped model_weights/membrane \
        --contender train/checkpoints/fused_gauss_continue/weights/membrane train/checkpoints/corrected/weights/membrane
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusecare.cli import configure_logging  # noqa: E402
from fusecare.errors import FuseCareError  # noqa: E402
from fusecare.restoration.ensemble import MANIFEST  # noqa: E402
from fusecare.training.calibration import calibrate_ensemble_gate  # noqa: E402
from fusecare.training.config import TrainConfig  # noqa: E402
from fusecare.training.sources import ValidationCase, build_data  # noqa: E402

log = logging.getLogger("fusecare")


@dataclass(frozen=True)
class Estimate:
    """An ensemble's leave-one-volume-out N-SSIM: mean and worst over every held-out case, and
    the mean per held-out volume."""

    mean: float
    worst: float
    per_volume: dict[str, float]


def passes(contender: Estimate, shipped: Estimate) -> bool:
    """The ship rule for one contender: a higher mean and a worst case that is not lower."""
    return contender.mean > shipped.mean and contender.worst >= shipped.worst


def decide(shipped: Estimate, contenders: dict[str, Estimate]) -> str | None:
    """The contender that ships (the highest mean among those that pass), or None: keep."""
    passing = {name: e for name, e in contenders.items() if passes(e, shipped)}
    return max(passing, key=lambda name: passing[name].mean) if passing else None


def estimate(folder: Path, cases: Sequence[ValidationCase]) -> Estimate:
    """Calibrate ``folder``'s gate on ``cases`` (read-only: ``calibrate_ensemble_gate`` writes
    nothing) and return the chosen rule's leave-one-volume-out estimate."""
    calibration = calibrate_ensemble_gate(folder, cases)
    cv = calibration.cross_validation[calibration.rule.name]
    if cv is None:
        raise SystemExit(f"{folder}: the validation holds fewer than two volumes; nothing can be held out")
    per_volume = {held: float(np.mean(scores)) for held, _, scores in cv.folds}
    return Estimate(float(cv.mean), float(cv.worst), per_volume)


def table(shipped_name: str, estimates: dict[str, Estimate], chosen: str | None) -> list[str]:
    """The decision as printed lines: one row per ensemble, the shipped one first."""
    volumes = sorted({v for e in estimates.values() for v in e.per_volume})
    head = f"{'ensemble':<60}{'LOVO mean':>10}{'worst':>9}" + "".join(f"{v[:22]:>24}" for v in volumes)
    lines = [head]
    shipped = estimates[shipped_name]
    for name, e in estimates.items():
        verdict = ("shipped now" if name == shipped_name else "SHIPS" if name == chosen
                   else "passes" if passes(e, shipped) else "kept out")
        lines.append(f"{name[-59:]:<60}{e.mean:>10.4f}{e.worst:>+9.4f}"
                     + "".join(f"{e.per_volume.get(v, float('nan')):>24.3f}" for v in volumes) + f"  {verdict}")
    lines.append(f"decision: {chosen or 'keep ' + shipped_name}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="recipe config whose validation every contender is calibrated on")
    parser.add_argument("--shipped", type=Path, required=True, help="the ensemble folder shipped now")
    parser.add_argument("--contender", type=Path, nargs="+", required=True, help="ensemble folders to compare")
    args = parser.parse_args()
    configure_logging()
    for folder in [args.shipped, *args.contender]:  # before minutes of simulating validation views
        if not (folder / MANIFEST).is_file():
            print(f"ship_decision: {folder}: no ensemble there (no {MANIFEST})", file=sys.stderr)
            raise SystemExit(2)
    try:
        config = TrainConfig.load(args.config)
        _, cases = build_data(config, validation_only=True)
        log.info("%d validation cases from %s", len(cases), args.config)
        estimates = {str(folder): estimate(folder, cases) for folder in [args.shipped, *args.contender]}
    except FuseCareError as error:  # a missing ensemble or volume, a bad config: one line, exit 2
        print(f"ship_decision: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    shipped = estimates[str(args.shipped)]
    chosen = decide(shipped, {k: v for k, v in estimates.items() if k != str(args.shipped)})
    print("\n".join(table(str(args.shipped), estimates, chosen)))


if __name__ == "__main__":
    main()
