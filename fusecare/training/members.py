"""Train K members into the layout inference reads (or assemble one from chosen checkpoints): the
ensemble is assembled in a staging folder and swapped in only when complete, so a target folder
never holds half an ensemble or members of two runs."""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from fusecare.config import strict_json
from fusecare.errors import ConfigError, TrainingError, one_line
from fusecare.restoration.ensemble import save_member, write_manifest
from fusecare.restoration.model import CareUNet, ModelConfig
from fusecare.training.calibration import recalibrate_gate
from fusecare.training.config import TrainConfig
from fusecare.training.distributed import barrier, shutdown_distributed
from fusecare.training.loop import CHECKPOINT_BEST, LOG_NAME, MemberResult, train_member
from fusecare.training.sources import build_data

log = logging.getLogger(__name__)


def _member_init(init_weights: str, k: int) -> str:
    """Member k's starting weights: ``init_weights/member_<k mod n>`` when it names an ensemble."""
    folder = Path(init_weights)
    members = sorted(folder.glob("member_*")) if init_weights and folder.is_dir() else []
    return str(members[k % len(members)]) if members else init_weights



def _finite_numbers(values: dict[str, Any]) -> bool:
    return all(math.isfinite(v) for v in values.values() if isinstance(v, (int, float)))


def check_trained(run_dir: Path, best: dict[str, Any], *, warm_started: bool = False) -> None:
    """``TrainingError`` unless a run's best checkpoint exists and is trained (``check_checkpoint``)."""
    if not best or not (run_dir / CHECKPOINT_BEST).is_file():
        raise TrainingError(f"{run_dir}: no best checkpoint (every validation was NaN?): nothing to export")
    check_checkpoint(run_dir, best, warm_started=warm_started)


def check_checkpoint(run_dir: Path, best: dict[str, Any], *, warm_started: bool = False) -> None:
    """``TrainingError`` unless a checkpoint (its ``step`` and logged metrics in ``best``) is trained
    (step > 0, or step 0 of a warm start) with finite metrics.

    Step 0 of a random start is the untrained network, which validation can prefer when training
    never improved on it (too few steps, a diverged loss); exporting it would ship random weights.
    Step 0 of a warm start is the network it started from, already trained.
    """
    if int(best.get("step", 0)) <= 0 and not warm_started:
        raise TrainingError(f"{run_dir}: the best checkpoint is step 0, the untrained network (training never "
                            "improved on it: more steps, another learning rate?); not exported")
    # step 0 has no training loss yet (NaN by design); everything measured must be finite
    measured = {k: v for k, v in best.items() if k != "loss" or int(best.get("step", 0)) > 0}
    if not _finite_numbers(measured):
        raise TrainingError(f"{run_dir}: the best checkpoint (step {best.get('step')}) has non-finite metrics "
                            f"{ {k: v for k, v in best.items() if isinstance(v, float)} }; not exported")


def export_member(run_dir: Path, member_dir: Path, config: TrainConfig) -> None:
    """Best checkpoint of a run -> ``member_dir`` (config.json, weights.pt, training.json).

    ``TrainingError`` (see ``check_trained``) for an untrained or non-finite best checkpoint.
    """
    if not (run_dir / CHECKPOINT_BEST).is_file():
        raise TrainingError(f"{run_dir}: no {CHECKPOINT_BEST}: nothing to export")
    state = torch.load(run_dir / CHECKPOINT_BEST, map_location="cpu", weights_only=False)
    check_trained(run_dir, {**state.get("metrics", {}), "step": state.get("step", 0)},
                  warm_started=bool(config.init_weights))
    model = CareUNet(config.model)
    model.load_state_dict(state["model"])
    _save_trained_member(member_dir, model, config, {"best": strict_json(state["metrics"])})


def _save_trained_member(member_dir: Path, model: CareUNet, config: TrainConfig, record: dict[str, Any]) -> None:
    """A member folder with ``training.json``: the run's config and ``record`` (what chose it)."""
    save_member(member_dir, model, extra_files={"training.json": {"config": config.to_dict(), **record}})


def _logged_row(run_dir: Path, step: int) -> dict[str, Any]:
    """The ``log.csv`` row of ``step`` in a run folder (numbers parsed, the step an int; blank cells
    dropped), or {}."""
    log_path = run_dir / LOG_NAME
    if not log_path.is_file():
        return {}
    with log_path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step") == str(step)]
    row = {k: float(v) for k, v in rows[-1].items() if v not in ("", None)} if rows else {}
    return row | {"step": step} if row else {}


def export_checkpoint(checkpoint: Path, member_dir: Path, model: ModelConfig) -> None:
    """Any checkpoint of a run (``best.pt``, ``last.pt``; its run folder need not hold a best.pt any
    more) -> ``member_dir``, its ``training.json`` naming the checkpoint, its step and what the
    run logged at that step (``logged``), with the run's own config (``config.json`` beside it).
    ``ConfigError`` when it is not a readable checkpoint of ``model``; ``TrainingError`` when it is
    untrained or diverged (``check_checkpoint``, non-finite weights)."""
    run_dir = checkpoint.parent
    if (run_dir / "training.json").is_file():
        raise ConfigError(f"checkpoint {checkpoint}: an exported member, not a run's checkpoint (name the run's "
                          "best.pt or last.pt; a member folder can start a run as init_weights)")
    if not checkpoint.is_file() or not (run_dir / "config.json").is_file():
        raise ConfigError(f"checkpoint {checkpoint}: not a checkpoint in a run folder (with its config.json)")
    run_config = TrainConfig.load(run_dir / "config.json")
    if run_config.model != model:
        raise ConfigError(f"checkpoint {checkpoint}: its model {run_config.model.to_dict()} differs from the "
                          f"config's {model.to_dict()}")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        weights = state["model"]
        network = CareUNet(model)
        network.load_state_dict(weights)
    except Exception as exc:  # not a torch file, not a run's checkpoint, or another network's weights
        raise ConfigError(f"checkpoint {checkpoint}: not a readable checkpoint of this network "
                          f"({one_line(exc)})") from None
    step = int(state.get("step", 0))
    logged = strict_json(state.get("metrics") or _logged_row(run_dir, step))
    check_checkpoint(run_dir, {**logged, "step": step}, warm_started=bool(run_config.init_weights))
    if not all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point()):
        raise TrainingError(f"checkpoint {checkpoint}: non-finite weights (a diverged run?); not exported")
    _save_trained_member(member_dir, network, run_config,
                         {"logged": logged, "checkpoint": str(checkpoint), "step": step})


def assemble_ensemble(config: TrainConfig, checkpoints: Sequence[Path], *, weights_dir: str | Path,
                      overwrite: bool = False, calibrate: bool = True, progress: bool = True) -> Path:
    """``weights_dir/<channel>/`` from chosen checkpoints (member k = ``checkpoints[k]``), its gate
    calibrated on ``config``'s validation: the ensemble training would write if each member's best
    checkpoint were the one named (a run resumed with another score, say, forgets the best it had
    before; ``bench/validation_cases.py`` scores any checkpoint on the same validation). Staged and
    swapped in as ``train_ensemble`` does."""
    if not checkpoints:
        raise ConfigError("no checkpoint to assemble an ensemble from")
    with _staged_ensemble(Path(weights_dir), config.channel, overwrite=overwrite) as staging:
        for k, checkpoint in enumerate(checkpoints):
            export_checkpoint(Path(checkpoint), staging / f"member_{k}", config.model)
        info = strict_json({"members": len(checkpoints), "checkpoints": [str(c) for c in checkpoints]})
        write_manifest(staging, config.channel, info=info)
        if calibrate:
            _, validation = build_data(config, validation_only=True)
            recalibrate_gate(staging, validation, channel=config.channel, device=config.device, info=info,
                             progress=progress)
    folder = Path(weights_dir) / config.channel
    log.info("wrote the %d-member %s ensemble to %s", len(checkpoints), config.channel, folder)
    return folder


def check_ensemble_target(folder: Path, *, overwrite: bool) -> None:
    """``TrainingError`` when ``folder`` holds anything and ``overwrite`` is off.

    Checked before any data is read, so a run is refused in seconds, not after hours of
    training; the shipped ``model_weights/<channel>/`` is never replaced by accident.
    """
    if folder.exists() and not folder.is_dir():
        raise TrainingError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise TrainingError(f"{folder} already holds an ensemble (or other files): refusing to write into it; "
                            "pass --overwrite to replace it, or choose a new --weights folder")


def _swap_in(staging: Path, folder: Path) -> None:
    """Put the complete ensemble in ``staging`` in place of ``folder`` (whatever it held)."""
    old = folder.with_name(f".{folder.name}.replaced-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale_staging(weights_dir: Path, channel: str) -> None:
    """Remove the staging folders of runs that were killed (a SIGKILL or SIGTERM skips the run's
    own clean-up): those named after a process that no longer exists on this machine."""
    for staging in weights_dir.glob(f".{channel}.staging-*"):
        pid = staging.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing %s, left by a run that was stopped (process %s is gone)", staging, pid)
            shutil.rmtree(staging, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue


@contextlib.contextmanager
def _staged_ensemble(weights_dir: Path, channel: str, *, overwrite: bool, writer: bool = True) -> Iterator[Path]:
    """A staging folder for ``weights_dir/<channel>/``, swapped in when the block ends without an
    error and removed either way; the target is checked before (and again right before the swap).
    Only the ``writer`` process (rank 0) touches the folders."""
    folder = weights_dir / channel
    check_ensemble_target(folder, overwrite=overwrite)
    if writer:
        _remove_stale_staging(weights_dir, channel)
    staging = weights_dir / f".{channel}.staging-{os.getpid()}"
    try:
        yield staging
        if writer:
            check_ensemble_target(folder, overwrite=overwrite)  # nothing appeared there meanwhile
            _swap_in(staging, folder)
    finally:
        if writer:
            shutil.rmtree(staging, ignore_errors=True)


def train_ensemble(config: TrainConfig, *, runs_dir: str | Path, weights_dir: str | Path, members: int = 1,
                   resume: bool = False, progress: bool = True, overwrite: bool = False,
                   calibrate: bool = True) -> list[MemberResult]:
    """Train ``members`` members (seeds seed, seed+1, ...) and write ``weights_dir/<channel>/``.

    The ensemble is assembled in a hidden staging folder beside the target and swapped in only
    when complete (every member of this run exported, manifest and gate written), so the target
    never mixes members of two runs nor holds half an ensemble. A non-empty target is refused
    unless ``overwrite`` (then it is replaced as a whole, stale ``member_*`` included); an
    untrained or non-finite member stops the run before anything is written (``check_trained``).
    ``calibrate=False`` skips the gate's calibration (training in phases calibrates once, at the end).
    """
    runs_dir, weights_dir = Path(runs_dir), Path(weights_dir)
    if members < 1:
        raise ConfigError(f"--members must be >= 1, got {members}")
    writer = int(os.environ.get("RANK", "0")) == 0  # the process group starts in train_member
    results = []
    with _staged_ensemble(weights_dir, config.channel, overwrite=overwrite, writer=writer) as staging:
        data = build_data(config)
        for k in range(members):
            member_config = config.replace(seed=config.seed + k,
                                           init_weights=_member_init(config.init_weights, k))
            result = train_member(member_config, runs_dir / f"member_{k}", resume=resume, progress=progress,
                                  data=data)
            results.append(result)
            barrier()  # every rank finished this member before rank 0 reads its checkpoints
            if writer:
                check_trained(result.run_dir, result.best, warm_started=bool(member_config.init_weights))
                export_member(result.run_dir, staging / f"member_{k}", member_config)
            barrier()  # and the export is complete before anyone goes on
        if writer:
            info = strict_json({"members": members, "best": [r.best for r in results]})
            write_manifest(staging, config.channel, info=info)
            _, validation = data
            if validation and calibrate:
                recalibrate_gate(staging, validation, channel=config.channel, device=config.device, info=info,
                                 progress=progress)
            elif calibrate:
                log.warning("no validation case, so no safety net: inference will write this %s ensemble's "
                            "raw mean, with no gate and no attenuation correction (hold out studies with "
                            "--validation-studies, or give validation_files or validation_phantoms)",
                            config.channel)
    if writer:
        log.info("wrote the %d-member %s ensemble to %s", members, config.channel, weights_dir / config.channel)
    shutdown_distributed()  # after rank 0 wrote the ensemble; then every rank's group ends cleanly
    return results

