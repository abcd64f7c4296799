r"""Rebuild the shipped ensembles from committed checkpoints and compare them with ``model_weights/``.

Each shipped ``model_weights/<channel>/`` is an ensemble assembled from checkpoints kept under
``train/checkpoints/`` and a gate calibrated on its recipe's validation; ``train/shipped.json``
says which, per channel. This script runs exactly those steps (the ``python -m train`` commands
the model card names) into ``--out``, then compares, member file by member file (sha256), with
``--compare`` (the shipped folder), and the gate and the channel it is for with the manifest's;
the leave-one-volume-out estimates are printed side by side (their last digits may move with the
thread count). Exit 1 when a member, a gate or its channel differs, 2 on a bad recipe or a
missing file.

    python scripts/reproduce_shipped.py                       # both channels, about 10 minutes on 2 CPU cores
    python scripts/reproduce_shipped.py --no-calibrate        # members only, seconds
    python scripts/reproduce_shipped.py --out model_weights --overwrite --no-compare   # re-ship

Needs ``../shared/data`` (the validation volumes) unless ``--no-calibrate``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusecare.cli import configure_logging  # noqa: E402
from fusecare.errors import ConfigError, FuseCareError  # noqa: E402
from fusecare.restoration.ensemble import MANIFEST, read_manifest, verify_manifest, write_manifest  # noqa: E402
from train.train import main as train_main  # noqa: E402

RECIPES = REPO / "train" / "shipped.json"
log = logging.getLogger("fusecare")


@dataclass(frozen=True)
class Comparison:
    """How a rebuilt ensemble matches the shipped one."""

    channel: str
    manifest_channels: tuple[str, str]
    """The channel the rebuilt and the shipped manifest name: the channel their gate is for."""
    members_equal: bool
    gate_equal: bool | None  # None: not calibrated, nothing to compare
    estimate: tuple[float, float] | None  # rebuilt leave-one-volume-out (mean, worst)
    shipped_estimate: tuple[float, float] | None

    @property
    def ok(self) -> bool:
        calibrated_as_shipped = self.gate_equal is None or (
            self.gate_equal and self.manifest_channels == (self.channel, self.channel))
        return self.members_equal and calibrated_as_shipped


def load_recipes(path: Path = RECIPES) -> dict[str, dict]:
    """``train/shipped.json`` without its ``_about``, every named file checked to exist."""
    try:
        recipes = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a recipe file ({exc})") from None
    for channel, recipe in recipes.items():
        if not isinstance(recipe, dict) or "config" not in recipe:
            raise ConfigError(f"{path}: {channel}: no 'config'")
        if ("from_checkpoints" in recipe) == ("members_of" in recipe):
            raise ConfigError(f"{path}: {channel}: give exactly one of 'from_checkpoints' and 'members_of'")
        named = [recipe["config"], *recipe.get("from_checkpoints", []), *filter(None, [recipe.get("members_of")])]
        missing = [p for p in named if not (REPO / p).exists()]
        if missing:
            raise ConfigError(f"{path}: {channel}: missing {', '.join(missing)}")
    return recipes


def rebuild(channel: str, recipe: dict, out: Path, *, calibrate: bool, overwrite: bool) -> None:
    """``out/<channel>/`` by the recipe's ``python -m train`` command, run from the repository
    (so the manifest records the checkpoints as the recipe names them, relative to it)."""
    out = out.resolve()
    common = ["--config", recipe["config"], "--weights", str(out)]
    if "from_checkpoints" in recipe:
        argv = [*common, "--from-checkpoints", *recipe["from_checkpoints"]]
        argv += ["--overwrite"] * overwrite + ["--no-calibrate"] * (not calibrate)
    else:
        folder = out / channel
        if folder.exists():
            if not overwrite:
                raise ConfigError(f"{folder} exists: pass --overwrite to replace it")
            shutil.rmtree(folder)
        shutil.copytree(REPO / recipe["members_of"], folder)
        if not calibrate:  # the copied gate was calibrated for the other ensemble's channel: drop it
            write_manifest(folder, channel, info={"members_of": recipe["members_of"]})
            log.info("%s: members only, no gate (--no-calibrate)", folder)
            return
        argv = [*common, "--calibrate-only"]
    with contextlib.chdir(REPO):
        status = train_main(argv)
    if status != 0:
        raise FuseCareError(f"{channel}: python -m train {' '.join(argv)} failed (see the log above)")


def _estimate(manifest: dict) -> tuple[float, float] | None:
    info = manifest.get("info", {})
    rule = info.get("gate_rule")
    cv = info.get("gate_rule_cross_validation", {}).get(rule) if rule else None
    return None if cv is None else (cv["mean"], cv["worst"])


def member_files(folder: Path) -> dict[str, str]:
    """The sha256 the manifest records for each member file (checked against the files), but
    ``training.json``, which only says where a member came from."""
    manifest = read_manifest(folder)
    verify_manifest(folder, manifest)
    return {name: digest for name, digest in manifest["files"].items() if not name.endswith("training.json")}


def members_equal(ours: Path, theirs: Path) -> bool:
    """Same members, byte for byte: every config and weights file of each (torch.save of the same
    tensors writes the same bytes with the pinned torch)."""
    return member_files(ours) == member_files(theirs)


def compare(channel: str, ours: Path, theirs: Path, *, calibrated: bool) -> Comparison:
    mine, shipped = read_manifest(ours), read_manifest(theirs)
    return Comparison(channel=channel, manifest_channels=(mine["channel"], shipped["channel"]),
                      members_equal=members_equal(ours, theirs),
                      gate_equal=(mine.get("gate") == shipped.get("gate")) if calibrated else None,
                      estimate=_estimate(mine) if calibrated else None, shipped_estimate=_estimate(shipped))


def table(rows: Sequence[Comparison]) -> str:
    def pair(e: tuple[float, float] | None) -> str:
        return "-" if e is None else f"{e[0]:.4f} ({e[1]:+.4f})"

    lines = ["| channel | manifest's channel (rebuilt, shipped) | members (weights, configs) | gate "
             "| leave-one-volume-out, rebuilt | shipped |", "|---|---|---|---|---|---|"]
    for r in rows:
        gate = "not calibrated" if r.gate_equal is None else ("equal" if r.gate_equal else "DIFFERENT")
        named = ("not calibrated" if r.gate_equal is None else ", ".join(r.manifest_channels)
                 + ("" if r.manifest_channels == (r.channel,) * 2 else " (DIFFERENT)"))
        lines.append(f"| {r.channel} | {named} | {'equal' if r.members_equal else 'DIFFERENT'} | {gate} | "
                     f"{pair(r.estimate)} | {pair(r.shipped_estimate)} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "reproduced",
                        help="weights folder to rebuild into (default runs/reproduced)")
    parser.add_argument("--compare", type=Path, default=REPO / "model_weights",
                        help="the shipped weights folder to compare with (default model_weights)")
    parser.add_argument("--no-compare", action="store_true", help="rebuild only")
    parser.add_argument("--channels", nargs="+", choices=("nucleus", "membrane"), default=None,
                        help="default: every channel of train/shipped.json")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="assemble the members only (no validation data needed; gates not compared)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT/<channel>/ when it exists")
    parser.add_argument("--recipes", type=Path, default=RECIPES, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        recipes = load_recipes(args.recipes)
        channels = args.channels or sorted(recipes)
        unknown = [c for c in channels if c not in recipes]
        if unknown:
            raise ConfigError(f"{args.recipes}: no recipe for {', '.join(unknown)}")
        if not args.no_compare and args.out.resolve() == args.compare.resolve():
            raise ConfigError("--out is the folder to compare with: pass --no-compare to rebuild it in place")
        calibrate = not args.no_calibrate
        missing = [c for c in channels if not args.no_compare and not (args.compare / c / MANIFEST).is_file()]
        if missing:  # before any rebuild: a calibration takes minutes
            raise ConfigError(f"no ensemble to compare with in {', '.join(str(args.compare / c) for c in missing)}")
        for channel in channels:
            log.info("rebuilding %s into %s", channel, args.out / channel)
            rebuild(channel, recipes[channel], args.out, calibrate=calibrate, overwrite=args.overwrite)
        if args.no_compare:
            return 0
        rows = [compare(c, args.out / c, args.compare / c, calibrated=calibrate) for c in channels]
    except FuseCareError as exc:
        log.error("%s", exc)
        return 2
    print(table(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
