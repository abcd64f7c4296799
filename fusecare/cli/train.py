"""Train a CARE ensemble for one channel; ``fusecare train``, also ``python -m train``.

    fusecare train --config train/configs/corrected_nucleus.json --members 2 --weights my_weights --runs runs/
    python -m train --channel nucleus --fmc-dir /data/fmc --validation-studies 5 --members 4 --weights fmc_weights
    torchrun --nproc_per_node 4 -m train --config my_nucleus.json        # DDP, one GPU each
    fusecare train --config my_nucleus.json --from-checkpoints runs/a/member_0/last.pt runs/b/member_1/best.pt

Command-line options override the config file's values; the merged config is validated before
any data is read, and saved as runs/<...>/config.json and beside each member's weights.

Nothing is lost: WEIGHTS/<channel>/ is written only when it is new or empty, unless --overwrite
(then it is replaced as a whole, once the new ensemble is complete). Exit status 0 on success,
2 for a usage error (missing or invalid config, --members < 1, an existing ensemble without
--overwrite, --calibrate-only without an ensemble, an untrained member, a --from-checkpoints file
that is not a readable checkpoint of the config's network), each one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fusecare.cli import configure_logging, new_parser, number
from fusecare.errors import ConfigError, FuseCareError
from fusecare.restoration.weights import training_weights_dir

if TYPE_CHECKING:
    from fusecare.training.config import TrainConfig

log = logging.getLogger("fusecare")


_members = number(int, what="a number of ensemble members", minimum=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training options, grouped: data, run, hardware / logging."""
    parser.add_argument("--config", type=Path, help="TrainConfig JSON (see --describe)")
    parser.add_argument("--describe", action="store_true", help="list every config field and exit")
    data = parser.add_argument_group("data")
    data.add_argument("--channel", choices=("nucleus", "membrane"))
    data.add_argument("--fmc-dir", help="folder of image_<id>_<channel>_angle/fused.tif pairs")
    data.add_argument("--validation-studies", type=int, nargs="*", help="FMC studies held out")
    data.add_argument("--clean-dir", help="folder of clean volumes to simulate single views from")
    data.add_argument("--phantoms", type=int, help="synthetic phantoms added to the content")
    run = parser.add_argument_group("run")
    run.add_argument("--steps", type=int)
    run.add_argument("--batch-size", type=int)
    run.add_argument("--ssim-weight", type=float, help="weight of the added (1 - SSIM) loss term")
    run.add_argument("--seed", type=int)
    run.add_argument("--members", type=_members, default=1, help="ensemble members (seeds seed..seed+K-1), >= 1")
    run.add_argument("--runs", type=Path, default=Path("runs"), help="checkpoints and logs go here")
    run.add_argument("--weights", type=Path, default=training_weights_dir(),
                     help="the ensemble is written to WEIGHTS/<channel>/ (refused if that holds anything, "
                          "unless --overwrite)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an existing WEIGHTS/<channel>/ (once the new ensemble is complete)")
    run.add_argument("--resume", action="store_true", help="continue each member from its last.pt")
    instead = run.add_mutually_exclusive_group()  # what to do instead of training
    instead.add_argument("--calibrate-only", action="store_true",
                         help="no training: recalibrate the gate of WEIGHTS/<channel>/ on the config's validation data")
    instead.add_argument("--from-checkpoints", type=Path, nargs="+", metavar="CHECKPOINT",
                     help="no training: write WEIGHTS/<channel>/ from these run checkpoints (best.pt or last.pt; "
                          "member k = the k-th), its gate calibrated on the config's validation")
    run.add_argument("--init-weights", help="member or ensemble folder to start from (see --describe)")
    run.add_argument("--no-calibrate", action="store_true",
                     help="skip the gate calibration after training (e.g. between training phases)")
    misc = parser.add_argument_group("hardware / logging")
    misc.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    misc.add_argument("--quiet", action="store_true", help="no progress bar")
    misc.add_argument("--debug", action="store_true", help="debug logging, with tracebacks of failures")


def build_parser(prog: str | None = "fusecare train") -> argparse.ArgumentParser:
    parser = new_parser(prog, __doc__)
    add_arguments(parser)
    return parser


def merged_config(args: argparse.Namespace) -> TrainConfig:
    """The config file's values, overridden by the command line; ``ConfigError`` (one line) for a
    missing or unreadable file, invalid JSON, or JSON that is not an object."""
    from fusecare.training.config import TrainConfig  # torch: only once the arguments parsed

    values: object = {}
    if args.config:
        try:
            values = json.loads(args.config.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {args.config}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {args.config}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config {args.config} is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config {args.config} must be a JSON object (field: value), not a {type(values).__name__}")
    overrides = {"channel": args.channel, "fmc_dir": args.fmc_dir, "clean_dir": args.clean_dir,
                 "phantoms": args.phantoms, "steps": args.steps, "batch_size": args.batch_size,
                 "ssim_weight": args.ssim_weight, "seed": args.seed, "device": args.device,
                 "init_weights": args.init_weights,
                 "validation_studies": tuple(args.validation_studies) if args.validation_studies else None}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    """Train (or recalibrate, or describe); torch is imported only here."""
    configure_logging(debug=args.debug)
    from fusecare.training.calibration import recalibrate_gate
    from fusecare.training.config import TrainConfig
    from fusecare.training.members import assemble_ensemble, train_ensemble
    from fusecare.training.sources import build_data

    if args.describe:
        print(TrainConfig.describe())
        return 0
    try:
        config = merged_config(args)
        if args.calibrate_only:
            _, validation = build_data(config, validation_only=True)
            gate = recalibrate_gate(args.weights / config.channel, validation, channel=config.channel,
                                    device=config.device, progress=not args.quiet)
            log.info("gate of %s: %s", args.weights / config.channel, gate.to_dict())
            return 0
        if args.from_checkpoints:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ConfigError("--from-checkpoints trains nothing: run it as one process, not under torchrun")
            assemble_ensemble(config, args.from_checkpoints, weights_dir=args.weights, overwrite=args.overwrite,
                              calibrate=not args.no_calibrate, progress=not args.quiet)
            return 0
        run_dir = args.runs / config.channel
        results = train_ensemble(config, runs_dir=run_dir, weights_dir=args.weights, members=args.members,
                                 resume=args.resume, progress=not args.quiet, overwrite=args.overwrite,
                                 calibrate=not args.no_calibrate)
    except FuseCareError as exc:
        log.error("%s", exc)
        return 2
    for k, r in enumerate(results):
        best = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                         for key, value in r.best.items())
        log.info("member %d: best checkpoint (%s) after %d steps in %.0f s", k, best, r.steps, r.seconds)
    return 0



def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
